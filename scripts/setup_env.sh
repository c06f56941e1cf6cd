#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment in .venv and install the project with its dev tools.
# torch: an already-installed torch (e.g. a CUDA build a GPU user put there first) is kept; otherwise the CPU
# build 2.13.0 is installed before the project, so that nothing pulls a multi-GB CUDA build on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
fi
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    echo "[setup] installing torch 2.13.0 (CPU build)"
    "$VENV/bin/python" -m pip install --quiet "torch==2.13.0"
fi
echo "[setup] installing the project and its dependencies"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check ".[dev]"
"$VENV/bin/python" -c "import torch, monai, mlflow; print(f'[setup] torch {torch.__version__}, monai {monai.__version__}, mlflow {mlflow.__version__}')"
