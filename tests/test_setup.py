"""The environment set-up: torch's CPU build is asked for by name on a machine without an NVIDIA GPU."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this test is about a machine without a GPU")
def test_a_machine_without_a_gpu_gets_the_cpu_build_of_torch_and_keeps_it(tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    # pip must resolve the "+cpu" version itself: a plain torch==2.13.0 is PyPI's CUDA build on a public index.
    first = run_cli(["bash", "scripts/install_torch.sh", str(venv)], timeout=900)
    assert "installing torch 2.13.0+cpu (no NVIDIA GPU" in first.stdout
    version = run_cli([str(venv / "bin/python"), "-c", "import torch; print(torch.__version__)"])
    assert version.stdout.strip() == "2.13.0+cpu"
    # A torch already there (a GPU user's own build, say) is kept: nothing is installed again.
    again = run_cli(["bash", "scripts/install_torch.sh", str(venv)])
    assert again.stdout == ""
