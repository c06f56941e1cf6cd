"""The MONAI Deploy application, run end to end in its own environment (.venv-deploy) on generated NIfTI volumes.

The environment is created by deploy/setup_venv.sh on first use (about 1.5 minutes; reused afterwards). These tests
are skipped, saying why, only when that installation fails (for example without access to the package index).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from compare_outputs import compare_outputs
from conftest import REPO_ROOT, TINY_SIZE
from test_export import INFERENCE, METADATA, TINY_NETWORK, TinyModel, run_tool, tiny_model
from test_fast_inference import padded_volume

from scripts.data.lesions import remove_small_lesions
from scripts.inference.inputs import find_inputs
from scripts.inference.predict import brain_box, prepare
from scripts.inference.settings import make_settings

DEPLOY_PYTHON = REPO_ROOT / ".venv-deploy" / "bin" / "python"
# What pip says when it cannot reach or find a package: the only failures of the set-up that skip these tests.
CANNOT_INSTALL = (
    "No matching distribution",
    "Could not find a version",
    "Failed to establish a new connection",
    "Temporary failure in name resolution",
    "Network is unreachable",
    "ProxyError",
    "Read timed out",
)
CASE = "BraTS2021_00002"


@pytest.fixture(scope="module")
def deploy_python() -> Path:
    """The application's environment, created or reused by deploy/setup_venv.sh."""
    try:
        result = subprocess.run(
            ["bash", "deploy/setup_venv.sh"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=1200
        )
    except subprocess.TimeoutExpired:
        pytest.skip("the MONAI Deploy App SDK could not be installed: deploy/setup_venv.sh ran over 20 minutes")
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines() if "is ignored" not in line]
        report = "\n".join(lines[-15:])
        if any(sign in report for sign in CANNOT_INSTALL):
            pytest.skip(f"the MONAI Deploy App SDK could not be installed (deploy/setup_venv.sh):\n{report}")
        pytest.fail(f"deploy/setup_venv.sh failed:\n{report}")
    return DEPLOY_PYTHON


@pytest.fixture(scope="module")
def model(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_model(synthetic_small, tmp_path_factory)


def run_app(python: Path, app: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the application as a user would, from a folder outside the repository, without the training venv."""
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(python), str(app), *args],
        cwd=app.parent if app.is_file() else app,
        env={**clean, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=600,
    )


def _check(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}"


@pytest.fixture(scope="module")
def volumes(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BraTS case folder, a plain NIfTI volume stored upside down along the axial axis (another affine), and one
    with a wider field of view, whose brain box is smaller than the slice: the fast path crops it."""
    folder = tmp_path_factory.mktemp("deploy_inputs")
    shutil.copytree(synthetic_small / "brats" / CASE, folder / CASE)
    flair = nib.load(synthetic_small / "brats" / "BraTS2021_00004" / "BraTS2021_00004_flair.nii.gz")
    flip = np.diag([1.0, 1.0, -1.0, 1.0])
    flip[2, 3] = flair.shape[2] - 1
    flipped = nib.Nifti1Image(np.asanyarray(flair.dataobj)[:, :, ::-1].copy(), flair.affine @ flip)
    nib.save(flipped, folder / "flipped.nii.gz")
    wide = padded_volume(synthetic_small / "brats" / "BraTS2021_00005" / "BraTS2021_00005_flair.nii.gz",
                         folder / "wide.nii.gz", margin=32)  # fmt: skip
    settings = make_settings(TINY_SIZE, 1)
    stack = torch.from_numpy(prepare(find_inputs(wide, settings)[0], settings).image)
    assert brain_box(stack, 2 ** TINY_NETWORK["depth"]) is not None
    return folder


@pytest.fixture(scope="module")
def bundle_outputs(model: TinyModel, volumes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bundle inference command with the same model.ts, for comparison."""
    output = tmp_path_factory.mktemp("deploy_bundle") / "out"
    run_tool([
        sys.executable, "-m", "monai.bundle", "run", "--config_file", repr([INFERENCE, str(model.preset)]),
        "--meta_file", str(METADATA), "--bundle_root", "bundle", "--dataset_dir", str(volumes),
        "--output_dir", str(output), "--model_file", str(model.torchscript),
    ])  # fmt: skip
    return output


def _assert_same_outputs(app_output: Path, bundle_output: Path, names: list[str], inputs: dict[str, Path]) -> None:
    for name in names:
        app_mask, bundle_mask = (
            nib.load(app_output / f"{name}_pred_wt.nii.gz"),
            nib.load(bundle_output / f"{name}_pred_wt.nii.gz"),
        )
        source = nib.load(inputs[name])
        assert app_mask.shape == source.shape and np.array_equal(app_mask.affine, source.affine)
        assert app_mask.get_data_dtype() == np.uint8
        app_voxels = np.asanyarray(app_mask.dataobj)
        assert np.array_equal(app_voxels, np.asanyarray(bundle_mask.dataobj)) and app_voxels.any()
        app_report = json.loads((app_output / f"{name}_pred.json").read_text())
        bundle_report = json.loads((bundle_output / f"{name}_pred.json").read_text())
        assert app_report["volume"] == bundle_report["volume"] and app_report["slices"] == bundle_report["slices"]
        assert 0.0 <= app_report["volume"]["max_tumour_probability"] <= 1.0


def test_the_app_writes_what_the_bundle_command_writes(
    deploy_python: Path, model: TinyModel, volumes: Path, bundle_outputs: Path, tmp_path: Path
) -> None:
    output = tmp_path / "out"
    result = run_app(deploy_python, REPO_ROOT / "deploy" / "app.py", "-i", str(volumes), "-o", str(output), "-m",
                     str(model.torchscript))  # fmt: skip
    _check(result)
    names = [CASE, "flipped", "wide"]
    assert sorted(p.name for p in output.iterdir()) == sorted(
        f"{n}{s}" for n in names for s in ("_pred_wt.nii.gz", "_pred.json")
    )
    inputs = {
        CASE: volumes / CASE / f"{CASE}_flair.nii.gz",
        "flipped": volumes / "flipped.nii.gz",
        "wide": volumes / "wide.nii.gz",
    }
    _assert_same_outputs(output, bundle_outputs, names, inputs)
    # Stored upside down: per-slice entries follow the file's slice order, not RAS.
    flipped = json.loads((output / "flipped_pred.json").read_text())
    mask = np.asanyarray(nib.load(output / "flipped_pred_wt.nii.gz").dataobj)
    assert flipped["axial_axis"] == 2
    assert [s["mask_voxels"] for s in flipped["slices"]] == mask.sum(axis=(0, 1)).tolist()
    # The comparison docs/inference.md gives users says the same, and notices a changed voxel.
    assert compare_outputs(output, bundle_outputs) == (3, [])
    changed = tmp_path / "changed"
    shutil.copytree(output, changed)
    mask[0, 0, 0] = 1 - mask[0, 0, 0]
    flipped_mask = "flipped_pred_wt.nii.gz"
    nib.save(nib.Nifti1Image(mask, nib.load(output / flipped_mask).affine), changed / flipped_mask)
    assert compare_outputs(changed, bundle_outputs) == (3, [f"the masks of {volumes / 'flipped.nii.gz'} differ"])


def test_the_app_applies_the_post_processing_its_model_ts_carries(
    deploy_python: Path, model: TinyModel, volumes: Path, bundle_outputs: Path, tmp_path: Path
) -> None:
    # The model exported with a post-processing size in its metadata (as choosing it on validation writes it).
    metadata = tmp_path / "metadata.json"
    metadata.write_text(json.dumps(json.loads(METADATA.read_text()) | {"postprocessing": {"min_lesion_voxels": 300}}))
    exported = tmp_path / "post.ts"
    run_tool([sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(exported),
              "--ckpt_file", str(model.checkpoint), "--meta_file", str(metadata),
              "--config_file", repr([INFERENCE, str(model.preset)]), "--bundle_root", "bundle"])  # fmt: skip
    output = tmp_path / "out"
    _check(run_app(deploy_python, REPO_ROOT / "deploy" / "app.py", "-i", str(volumes / CASE), "-o", str(output),
                   "-m", str(exported)))  # fmt: skip
    assert json.loads((output / f"{CASE}_pred.json").read_text())["preprocessing"]["min_lesion_voxels"] == 300
    plain = np.asanyarray(nib.load(bundle_outputs / f"{CASE}_pred_wt.nii.gz").dataobj)  # the same model, none
    mask = np.asanyarray(nib.load(output / f"{CASE}_pred_wt.nii.gz").dataobj)
    np.testing.assert_array_equal(mask, remove_small_lesions(plain, 300))
    assert mask.any()


def test_the_packaged_layout_runs_from_a_model_folder_and_the_holoscan_variables(
    deploy_python: Path, model: TinyModel, volumes: Path, bundle_outputs: Path, tmp_path: Path
) -> None:
    # What `monai-deploy package` copies into the MAP: the staged folder, no repository around it, models in a
    # folder, paths from the environment as the MAP's runtime sets them.
    stage = tmp_path / "app"
    env = {**os.environ, "STAGE": str(stage)}
    subprocess.run(
        ["bash", "deploy/package.sh", "--stage-only"], cwd=REPO_ROOT, env=env, check=True, capture_output=True
    )
    assert not (stage / "bundle" / "scripts" / "networks").exists()
    models = tmp_path / "models" / "brain_tumour"
    models.mkdir(parents=True)
    shutil.copy(model.torchscript, models / "renamed.ts")
    output = tmp_path / "out"
    variables = {
        "HOLOSCAN_INPUT_PATH": str(volumes / "flipped.nii.gz"),
        "HOLOSCAN_OUTPUT_PATH": str(output),
        "HOLOSCAN_MODEL_PATH": str(tmp_path / "models"),
    }
    _check(run_app(deploy_python, stage, env=variables))
    assert sorted(p.name for p in output.iterdir()) == ["flipped_pred.json", "flipped_pred_wt.nii.gz"]
    _assert_same_outputs(output, bundle_outputs, ["flipped"], {"flipped": volumes / "flipped.nii.gz"})


def test_the_app_refuses_bad_input_naming_the_file_and_writes_nothing(
    deploy_python: Path, model: TinyModel, volumes: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "inputs"
    shutil.copytree(volumes / CASE, folder / CASE)
    flat = folder / "flat.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16), np.float32), np.eye(4)), flat)
    zeros = folder / "zeros.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 8), np.float32), np.eye(4)), zeros)
    output = tmp_path / "out"
    result = run_app(deploy_python, REPO_ROOT / "deploy" / "app.py", "-i", str(folder), "-o", str(output), "-m",
                     str(model.torchscript))  # fmt: skip
    assert result.returncode != 0
    assert f"{flat} is 2D" in result.stdout + result.stderr
    assert not output.exists() or not any(output.rglob("*"))
    # An empty volume is found only when read: the case before it was already predicted, and is dropped too.
    flat.unlink()
    result = run_app(deploy_python, REPO_ROOT / "deploy" / "app.py", "-i", str(folder), "-o", str(output), "-m",
                     str(model.torchscript))  # fmt: skip
    assert result.returncode != 0
    assert f"{zeros}: the volume is empty" in result.stdout + result.stderr
    assert not output.exists() or not any(output.rglob("*"))
    # Predictions written into a case folder would sit beside (and could replace) its ground truth.
    zeros.unlink()
    seg = folder / CASE / f"{CASE}_seg.nii.gz"
    before = seg.read_bytes()
    result = run_app(deploy_python, REPO_ROOT / "deploy" / "app.py", "-i", str(folder), "-o", str(folder / CASE), "-m",
                     str(model.torchscript))  # fmt: skip
    assert result.returncode != 0
    assert f"the output folder {folder / CASE} is inside the input folder's tree" in result.stdout + result.stderr
    assert seg.read_bytes() == before and sorted(p.name for p in (folder / CASE).iterdir()) == sorted(
        p.name for p in (volumes / CASE).iterdir()
    )
