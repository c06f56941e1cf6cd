#!/usr/bin/env bash
# Create (or reuse) the MONAI Deploy application's own virtual environment, .venv-deploy at the repository root.
#
# It is separate from the training environment (.venv): the App SDK pulls Holoscan, CuPy and cuda-python, and it
# breaks a plain `import monai` there. torch 2.13.0 is installed first (scripts/install_torch.sh: the CPU build
# on a machine without an NVIDIA GPU), so that nothing resolves a multi-GB CUDA build on a CPU machine. Rerunning
# is cheap: the installation is skipped while the requirement files are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${DEPLOY_VENV:-.venv-deploy}
STAMP="$VENV/.requirements.sha256"
wanted=$(cat deploy/requirements.txt deploy/requirements-tools.txt | sha256sum | cut -d' ' -f1)

if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$wanted" ]; then
    echo "[deploy-setup] $VENV is up to date"
    exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
    echo "[deploy-setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi
bash scripts/install_torch.sh "$VENV"
echo "[deploy-setup] installing the App SDK and the application's requirements"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r deploy/requirements.txt -r deploy/requirements-tools.txt
"$VENV/bin/python" -c "import holoscan, torch, nibabel; from monai.deploy.core import Application; print(f'[deploy-setup] torch {torch.__version__}, holoscan {holoscan.__version__}')"
echo "$wanted" > "$STAMP"
