#!/usr/bin/env bash
# Install torch 2.13.0 into a virtual environment that has none: bash scripts/install_torch.sh VENV
#
# On a machine without an NVIDIA GPU the CPU build is named explicitly (2.13.0+cpu): PyPI's Linux wheel of torch is
# the multi-GB CUDA build, and the "+cpu" local version lives on PyTorch's CPU index, not on PyPI. A mirror or wheel
# folder that serves it (pip's own configuration) is tried first, then PyTorch's CPU index. Where `nvidia-smi` lists
# a GPU, PyPI's CUDA build is installed. A torch already in VENV (e.g. a build a GPU user chose) is kept.
set -euo pipefail
VENV=${1:?usage: install_torch.sh VENV}
pip_install() { "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$@"; }

if "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    exit 0
fi
if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
    echo "[setup] installing torch 2.13.0 (an NVIDIA GPU is present: PyPI's CUDA build)"
    pip_install "torch==2.13.0"
else
    echo "[setup] installing torch 2.13.0+cpu (no NVIDIA GPU: the CPU build)"
    pip_install "torch==2.13.0+cpu" 2>/dev/null \
        || pip_install "torch==2.13.0+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
fi
