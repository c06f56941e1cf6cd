"""Test set-up shared by every test: the bundle's package on sys.path, and real CLI runs on small generated data."""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest
from filelock import FileLock

REPO_ROOT = Path(__file__).resolve().parents[1]
T = TypeVar("T")
BUNDLE_ROOT = REPO_ROOT / "bundle"

# As `python -m monai.bundle run` does: the bundle root on sys.path makes its package importable as `scripts`.
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))
# The data preparation's own modules (dataset_splits, kaggle_duplicates), beside scripts/prepare_data.py.
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.append(str(REPO_ROOT / "scripts"))


def _shipped_metadata() -> Path:
    """bundle/configs/metadata.json as the repository ships it (git's HEAD), in a folder of this process's own.

    Training rewrites the working file to describe the weights it published (``bash scripts/demo.sh``: its
    network_settings and its post-processing), and those are not the tests' models: tests that export or run
    inference with a model of their own read this copy, so that they pass after the demo too. Without git (a source
    archive) the working file is taken as it is.
    """
    folder = Path(tempfile.mkdtemp(prefix="shipped_metadata_"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    path = folder / "metadata.json"
    shipped = subprocess.run(
        ["git", "show", "HEAD:bundle/configs/metadata.json"], cwd=REPO_ROOT, capture_output=True, text=True
    )
    working = BUNDLE_ROOT / "configs" / "metadata.json"
    path.write_text(shipped.stdout if shipped.returncode == 0 else working.read_text())
    return path


SHIPPED_METADATA = _shipped_metadata()


# Tiny settings that let a real bundle run finish in seconds on 2 CPU cores.
TINY_SIZE = 32
TINY_OVERRIDES = (
    "--base_filters", "8", "--depth", "3", "--image_size", str(TINY_SIZE), "--batch_size", "8",
    "--num_workers", "0", "--epochs", "{'1': 1, '2': 1, '3': 1}",
)  # fmt: skip


def run_cli(args: list[str], timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command from the repository root, as a user would; on failure, fail with its output."""
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(
            f"{args} exited {result.returncode}\n--- stdout ---\n{result.stdout[-6000:]}\n"
            f"--- stderr ---\n{result.stderr[-6000:]}"
        )
    return result


def bundle_command(config_files: list[str], *overrides: str, launcher: tuple[str, ...] = ()) -> list[str]:
    """The ``python -m monai.bundle run`` command line for these config files, as the README writes it."""
    return [
        sys.executable, *launcher, "-m", "monai.bundle", "run", "--config_file", repr(config_files),
        "--bundle_root", "bundle", *overrides,
    ]  # fmt: skip


def bundle_run(config_files: list[str], *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``python -m monai.bundle run`` from the repository root."""
    return run_cli(bundle_command(config_files, *overrides), **kwargs)


def pipeline_run(config_files: list[str], *overrides: str, **kwargs) -> subprocess.CompletedProcess:
    """Run ``scripts/train.py`` (every stage of the config's pipeline) from the repository root, as the README does."""
    command = [sys.executable, "scripts/train.py", "--config_file", repr(config_files), "--bundle_root", "bundle"]
    return run_cli([*command, *overrides], **kwargs)


def made_once(tmp_path_factory: pytest.TempPathFactory, worker_id: str, name: str, make: Callable[[Path], T]) -> T:
    """``make(folder)``'s result, made once per test run: under pytest-xdist (scripts/test.sh runs two workers) the
    first worker to ask makes it in the run's shared temporary folder while the others wait, then all read it (a
    session fixture alone would be made once per worker). The result must be JSON-able (paths as strings inside)."""
    if worker_id == "master":  # one process: nothing to share
        return make(tmp_path_factory.mktemp(name))
    root = tmp_path_factory.getbasetemp().parent  # this run's, shared by its workers
    done = root / f"{name}.json"
    with FileLock(str(root / f"{name}.lock")):
        if not done.is_file():
            folder = root / name
            folder.mkdir()
            done.write_text(json.dumps(make(folder), default=str))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def synthetic_small(tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """Synthetic BraTS-2021 and Kaggle data in the real layouts, at the generator's small test size."""

    def make(folder: Path) -> str:
        out = folder / "data"
        run_cli([sys.executable, "scripts/make_synthetic_data.py", "--out", str(out), "--small", "--seed", "3"])
        return str(out)

    return Path(made_once(tmp_path_factory, worker_id, "synthetic", make))


@pytest.fixture(scope="session")
def prepared_small(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> Path:
    """The small synthetic data prepared as the bundle reads it, at TINY_SIZE."""

    def make(folder: Path) -> str:
        out = folder / "prepared"
        brats, kaggle = str(synthetic_small / "brats"), str(synthetic_small / "kaggle")
        run_cli([sys.executable, "scripts/prepare_data.py", "--brats", brats, "--kaggle", kaggle, "--out", str(out),
                 "--size", str(TINY_SIZE)])  # fmt: skip
        return str(out)

    return Path(made_once(tmp_path_factory, worker_id, "prepared", make))


@pytest.fixture(scope="session", autouse=True)
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Every bundle run in the tests tracks into a throw-away sqlite store, never the repository's own."""
    uri = "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlflow.db")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return uri


TRAIN = "bundle/configs/train.yaml"
EVALUATE = "bundle/configs/evaluate.yaml"


@pytest.fixture(scope="session")
def trained(prepared_small: Path, tmp_path_factory: pytest.TempPathFactory, worker_id: str) -> dict[str, Path | str]:
    """The README's main job, tiny: all three stages through the real CLI (scripts/train.py runs them in order), the
    test-split evaluation, then both baselines, each evaluated, all tracked into their own sqlite MLflow store."""

    def make(root: Path) -> dict[str, str]:
        dirs: dict[str, Path | str] = {"ckpt": root / "models", "eval": root / "eval", "data": prepared_small}
        dirs["tracking_uri"] = "sqlite:///" + str(root / "mlruns" / "mlflow.db")
        common = ["--dataset_dir", str(prepared_small), "--ckpt_dir", str(dirs["ckpt"]), "--output_dir",
                  str(dirs["eval"]), "--tracking_uri", str(dirs["tracking_uri"])]  # fmt: skip
        result = pipeline_run([TRAIN, "configs/demo.yaml"], *common, *TINY_OVERRIDES)
        dirs["train_log"] = root / "train.log"
        dirs["train_log"].write_text(result.stdout + result.stderr)
        result = bundle_run([TRAIN, EVALUATE, "configs/demo.yaml"], *common, *TINY_OVERRIDES)
        dirs["eval_log"] = root / "eval.log"
        dirs["eval_log"].write_text(result.stdout + result.stderr)
        dirs["model_sha256"] = hashlib.sha256((root / "models" / "model.pt").read_bytes()).hexdigest()
        for variant in ("baseline_seg", "baseline_cls"):
            preset = f"configs/{variant}.yaml"
            result = pipeline_run([TRAIN, "configs/demo.yaml", preset], *common, *TINY_OVERRIDES)
            (root / f"{variant}.log").write_text(result.stdout + result.stderr)
            bundle_run([TRAIN, EVALUATE, "configs/demo.yaml", preset], *common, *TINY_OVERRIDES)
        return {key: str(value) for key, value in dirs.items()}

    made = made_once(tmp_path_factory, worker_id, "trained", make)
    return {key: value if key in ("tracking_uri", "model_sha256") else Path(value) for key, value in made.items()}
