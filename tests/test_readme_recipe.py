"""The README's "Your own data" recipe, run as written (its bash block, on generated data with a tiny network), and
the bundle it makes checked as MONAI's model zoo checks a submitted bundle: alone, from outside the repository."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from conftest import BUNDLE_ROOT, REPO_ROOT, TINY_SIZE

# What the recipe's full-size settings become here: the full preset with the tiny network and one epoch a stage.
TINY = {"base_filters": 8, "depth": 3, "image_size": TINY_SIZE, "batch_size": 8, "num_workers": 0,
        "epochs": {"1": 1, "2": 1, "3": 1}}  # fmt: skip
# MONAI model-zoo's CI (Project-MONAI/model-zoo ci/, copied unchanged: see its README).
ZOO_CI = REPO_ROOT / "tests" / "resources" / "model_zoo_ci"
SCHEMA = REPO_ROOT / "tests" / "resources" / "meta_schema_20240725.json"


def _recipe() -> str:
    """The first bash block of the README's "Your own data" section."""
    section = REPO_ROOT.joinpath("README.md").read_text().split("## Your own data", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```bash\n(.*?)```", section, re.DOTALL).group(1)


def _digest(paths: list[Path]) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths if p.is_file()}


def _user_env(home: Path) -> dict[str, str]:
    """A user's shell: HOME for ~, no tracking URI set (a bundle's own store), nothing on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    return env | {"HOME": str(home), "MLFLOW_DISABLE_TELEMETRY": "true"}


def _run(args: list[str], cwd: Path, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


@pytest.fixture(scope="module")
def recipe(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """HOME after the recipe ran, with its inputs: ~/data/new_cases holds one case; the preset is the tiny one."""
    root = tmp_path_factory.mktemp("recipe")
    home = root / "home"
    case = sorted((synthetic_small / "brats").iterdir())[0]
    shutil.copytree(case, home / "data" / "new_cases" / case.name)
    preset = root / "presets" / "full.yaml"
    preset.parent.mkdir()
    preset.write_text(yaml.safe_dump(yaml.safe_load((REPO_ROOT / "configs" / "full.yaml").read_text()) | TINY))
    script = (
        _recipe()
        .replace("~/data/BraTS2021_Training_Data", str(synthetic_small / "brats"))
        .replace("~/data/brain-tumor-mri", str(synthetic_small / "kaggle"))
        .replace("--size 256", f"--size {TINY_SIZE}")
        .replace("configs/full.yaml", str(preset))
        .replace(".venv/bin/python", sys.executable)
    )
    assert script.count(str(preset)) == 2 and "--size 256" not in script, "the recipe changed: update this test"
    # The repository's own bundle is left alone: its weights and metadata.
    own = [BUNDLE_ROOT / "configs" / "metadata.json", *(BUNDLE_ROOT / "models").glob("*")]
    before = _digest(own)
    _run(["bash", "-euo", "pipefail", "-c", script], REPO_ROOT, _user_env(home))
    assert _digest(own) == before
    return {"home": home, "bundle": home / "brain" / "bundle", "case": case}


def test_the_own_data_recipe_runs_as_written(recipe: dict[str, Path]) -> None:
    bundle, case = recipe["bundle"], recipe["case"]
    network = json.loads((bundle / "configs" / "metadata.json").read_text())["network_settings"]
    assert (network["base_filters"], network["image_size"]) == (8, TINY_SIZE)
    for stage in (1, 2, 3):
        assert (bundle / "models" / "multitask" / f"stage{stage}" / "best.pt").is_file()
    assert json.loads((bundle / "eval" / "metrics.json").read_text())["brats_patients"] > 0
    assert (bundle / "mlruns" / "mlflow.db").is_file()
    predictions = recipe["home"] / "brain" / "predictions"
    assert json.loads((predictions / f"{case.name}_pred.json").read_text())["preprocessing"]["image_size"] == TINY_SIZE
    assert (predictions / f"{case.name}_pred_wt.nii.gz").is_file()


def test_the_trained_bundle_alone_passes_the_model_zoo_verification(recipe: dict[str, Path], tmp_path: Path) -> None:
    # Copied away from the repository, as the zoo receives a bundle; run from there, nothing of the repository on
    # the paths.
    name = "brain_tumour_multitask"
    bundle = tmp_path / name
    shutil.copytree(recipe["bundle"], bundle, ignore=shutil.ignore_patterns("mlruns", "eval", "__pycache__"))
    env, case = _user_env(recipe["home"]), recipe["case"]
    monai_bundle = [sys.executable, "-m", "monai.bundle"]

    # model.pt with the bundle's inference.yaml alone gives model.ts's masks (the recipe's predictions).
    _run([*monai_bundle, "run", "--config_file", f"{name}/configs/inference.yaml", "--bundle_root", name,
          "--dataset_dir", str(case.parent), "--output_dir", str(tmp_path / "from_pt")], tmp_path, env)  # fmt: skip
    mask = f"{case.name}_pred_wt.nii.gz"
    from_ts = recipe["home"] / "brain" / "predictions" / mask
    assert np.array_equal(*(np.asanyarray(nib.load(p).dataobj) for p in (tmp_path / "from_pt" / mask, from_ts)))

    # The zoo's own check, as its CI runs it (tests/resources/model_zoo_ci/README.md).
    shutil.copytree(ZOO_CI, tmp_path / "ci")
    custom = tmp_path / "ci" / "bundle_custom_data.py"
    exclude = f'exclude_verify_shape_list = [\n    "{name}",'  # a multi-output network, as the zoo's HoVerNet
    custom.write_text(custom.read_text().replace("exclude_verify_shape_list = [", exclude, 1))
    (tmp_path / "model_info.json").write_text("{}")  # a new bundle: no earlier version
    (bundle / "eval").mkdir()
    shutil.copy(SCHEMA, bundle / "eval" / "schema.json")  # the zoo downloads it
    result = _run([sys.executable, "ci/verify_bundle.py", "-b", name, "-p", str(tmp_path), "-m", "full"], tmp_path, env)
    output = result.stdout + result.stderr
    for passed in ("metadata format is verified correctly", "export weights into TorchScript module successfully",
                   "Provided TorchScript module is verified correctly"):  # fmt: skip
        assert passed in output, output[-3000:]

    # The seed's full-size preset over these weights: one message naming the settings that differ, no traceback.
    config = repr([f"{name}/configs/inference.yaml", str(REPO_ROOT / "configs" / "full.yaml")])
    result = _run([*monai_bundle, "run", "--config_file", config, "--bundle_root", name, "--dataset_dir",
                   str(case.parent), "--output_dir", str(tmp_path / "wrong")], tmp_path, env, check=False)  # fmt: skip
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "base_filters 8 (this run: 64)" in result.stderr and "Leave the preset out" in result.stderr
    assert not (tmp_path / "wrong").exists()
