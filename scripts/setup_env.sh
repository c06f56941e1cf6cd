#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project with its dev tools.
# torch is installed first (scripts/install_torch.sh: the CPU build on a machine without an NVIDIA GPU), so that
# the project's own requirement never pulls a multi-GB CUDA build there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
bash scripts/install_torch.sh "$VENV"
echo "[setup] installing the project and its dependencies"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ".[dev]"
"$VENV/bin/python" -c "import torch, monai, mlflow; print(f'[setup] torch {torch.__version__}, monai {monai.__version__}, mlflow {mlflow.__version__}')"
