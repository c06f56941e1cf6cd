"""Inference with `python -m monai.bundle run --config_file inference.yaml` on NIfTI volumes and 2D images.

Real CLI runs on generated BraTS-layout data, plain NIfTI files (one stored in another axis order) and images;
outputs are checked against the input files' grids and against the network called directly.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
import yaml
from conftest import BUNDLE_ROOT, REPO_ROOT, SHIPPED_METADATA, TINY_SIZE
from monai.bundle import ConfigWorkflow
from PIL import Image
from test_export import TinyModel, run_tool, tiny_model

from scripts.data.images import load_grey, preprocess_grey
from scripts.data.slices import extract_slices, slices_to_volume
from scripts.data.volumes import DataError, VolumeCase, load_case, to_original_grid
from scripts.inference.inputs import InferenceInput, find_inputs
from scripts.inference.predict import prepare
from scripts.inference.settings import make_settings

CASE = "BraTS2021_00000"
PERMUTED = "permuted"  # the case's FLAIR stored as (Z, X, Y), its affine's columns permuted to match


@pytest.fixture(scope="module")
def model(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_model(synthetic_small, tmp_path_factory)


def _flair(synthetic: Path) -> Path:
    return synthetic / "brats" / CASE / f"{CASE}_flair.nii.gz"


@pytest.fixture(scope="module")
def inputs(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A BraTS case folder, the same FLAIR stored in another axis order, a Kaggle JPEG, a PNG and a stray file."""
    folder = tmp_path_factory.mktemp("inference_inputs")
    shutil.copytree(synthetic_small / "brats" / CASE, folder / CASE)
    flair = nib.load(_flair(synthetic_small))
    permuted = nib.Nifti1Image(
        np.ascontiguousarray(np.transpose(np.asanyarray(flair.dataobj), (2, 0, 1))), flair.affine[:, [2, 0, 1, 3]]
    )
    nib.save(permuted, folder / f"{PERMUTED}.nii.gz")
    jpegs = sorted((synthetic_small / "kaggle" / "Testing" / "glioma").glob("*.jpg"))
    shutil.copy(jpegs[0], folder / "kaggle.jpg")
    grey, _ = load_grey(jpegs[1])
    Image.fromarray(grey[:, : grey.shape[1] * 2 // 3].astype(np.uint8)).save(folder / "narrow.png")  # not square
    (folder / "notes.txt").write_text("not an input\n")
    return folder


def _run(model: TinyModel, inputs: Path, output: Path, *extra: str, bundle: Path = BUNDLE_ROOT, check: bool = True):
    config = bundle / "configs" / "inference.yaml"
    metadata = SHIPPED_METADATA if bundle == BUNDLE_ROOT else bundle / "configs" / "metadata.json"
    return run_tool(
        [
            sys.executable, "-m", "monai.bundle", "run", "--config_file", repr([str(config), str(model.preset)]),
            "--meta_file", str(metadata), "--bundle_root", str(bundle), "--dataset_dir", str(inputs),
            "--output_dir", str(output), "--ckpt_dir", str(model.ckpt_dir), *extra,
        ],
        check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def outputs(model: TinyModel, inputs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Outputs of the bundle command with models/model.pt, in float32 (they are compared with the float network
    called directly; int8's agreement is tests/test_fast_inference.py's)."""
    output = tmp_path_factory.mktemp("inference_outputs") / "out"
    _run(model, inputs, output, "--int8_inference", "false")
    return output


def _mask(path: Path) -> np.ndarray:
    return np.asanyarray(nib.load(path).dataobj)


def _direct_volume(model: TinyModel, case: VolumeCase) -> tuple[np.ndarray, np.ndarray, dict[int, float]]:
    """Mask, voxel probabilities and slice probabilities of the eager network called on the training preprocessing."""
    loaded = load_case(case, ("flair",))
    slices, _ = extract_slices(loaded, size=TINY_SIZE)
    with torch.no_grad():
        out = model.eager()(torch.from_numpy(np.stack([s.image for s in slices])))
    z = [s.z for s in slices]
    seg = torch.sigmoid(out["seg"]).numpy()
    shape = loaded.image.shape[1:]
    mask, voxels = (to_original_grid(slices_to_volume(seg, z, shape, is_mask=m), loaded) for m in (True, False))
    probabilities = torch.softmax(out["cls"], 1)[:, 1].tolist()
    return mask, voxels, dict(zip(z, probabilities, strict=True))


@pytest.mark.parametrize("presets", [[], ["configs/demo.yaml"]])
def test_the_training_presets_layer_over_the_inference_config(presets: list[str], inputs: Path, tmp_path: Path) -> None:
    # As the README's commands do: the preset a model was trained with goes after inference.yaml. The bundle as
    # shipped: its metadata.json, and no model.pt (the demo's would not fit the presets).
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / "inference.yaml"), *(str(REPO_ROOT / p) for p in presets)],
        meta_file=str(SHIPPED_METADATA),
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(inputs),
        metadata_file=str(SHIPPED_METADATA),
        ckpt_dir=str(tmp_path),
    )
    workflow.initialize()
    assert workflow.check_properties() == []
    # The preset's image size wins over the seed's 256 of inference.yaml.
    expected = yaml.safe_load((REPO_ROOT / presets[0]).read_text())["image_size"] if presets else 256
    assert workflow.parser.get_parsed_content("settings").image_size == expected


def test_every_input_gets_its_outputs_and_strays_are_skipped(outputs: Path) -> None:
    volumes = [f"{name}{suffix}" for name in (CASE, PERMUTED) for suffix in ("_pred_wt.nii.gz", "_pred.json")]
    images = [f"{name}{suffix}" for name in ("kaggle", "narrow") for suffix in ("_pred_wt.png", "_pred.json")]
    assert sorted(p.name for p in outputs.iterdir()) == sorted(volumes + images)


@pytest.mark.parametrize("name", [CASE, PERMUTED])
def test_volume_masks_overlay_their_input(name: str, inputs: Path, outputs: Path) -> None:
    source = nib.load(inputs / CASE / f"{CASE}_flair.nii.gz" if name == CASE else inputs / f"{name}.nii.gz")
    mask = nib.load(outputs / f"{name}_pred_wt.nii.gz")
    assert mask.shape == source.shape
    assert np.array_equal(mask.affine, source.affine)
    for code in ("qform_code", "sform_code"):
        assert mask.header[code] == source.header[code]
    assert mask.get_data_dtype() == np.uint8
    assert set(np.unique(np.asanyarray(mask.dataobj)).tolist()) == {0, 1}


def test_volume_outputs_match_the_network_called_directly(
    model: TinyModel, synthetic_small: Path, inputs: Path, outputs: Path
) -> None:
    case = VolumeCase(CASE, "brats2021", {"flair": _flair(synthetic_small)}, None)
    expected_mask, voxel_probabilities, probabilities = _direct_volume(model, case)
    mask = _mask(outputs / f"{CASE}_pred_wt.nii.gz")
    # Equal, but for a voxel whose probability sits on 0.5 (other thread counts round differently).
    differ = mask != expected_mask
    assert np.count_nonzero(differ) <= 5 and np.all(np.abs(voxel_probabilities[differ] - 0.5) < 1e-3)
    report = json.loads((outputs / f"{CASE}_pred.json").read_text())
    assert report["input"] == str(inputs / CASE) and report["grid_file"] == str(inputs / CASE / f"{CASE}_flair.nii.gz")
    # BraTS files are stored with the axial axis last, inferior to superior: file index = RAS z.
    assert report["axial_axis"] == 2 and len(report["slices"]) == expected_mask.shape[2]
    for entry in report["slices"]:
        expected = probabilities.get(entry["index"])
        assert entry["analysed"] == (expected is not None)
        assert entry["mask_voxels"] == int(mask[:, :, entry["index"]].sum())
        if expected is not None:
            assert entry["tumour_probability"] == pytest.approx(expected, abs=1e-5)
            assert entry["predicted_class"] == int(expected >= 0.5)
    volume = report["volume"]
    values = list(probabilities.values())
    assert volume["max_tumour_probability"] == pytest.approx(max(values), abs=1e-5)
    assert volume["mean_tumour_probability"] == pytest.approx(np.mean(values), abs=1e-5)
    assert volume["predicted_class"] == int(max(values) >= 0.5)
    assert volume["predicted_label"] == ("tumour" if volume["predicted_class"] else "no tumour")
    assert volume["slices_analysed"] == len(values) < volume["slices_total"]
    assert volume["tumour_voxels"] == int(mask.sum()) > 0
    assert volume["tumour_volume_ml"] == pytest.approx(mask.sum() * 1.0 / 1000)  # 1 mm voxels
    assert all(0.0 <= p <= 1.0 for p in values)


def test_a_volume_stored_in_another_axis_order_gets_the_same_mask_in_its_order(outputs: Path) -> None:
    original = _mask(outputs / f"{CASE}_pred_wt.nii.gz")
    assert np.array_equal(_mask(outputs / f"{PERMUTED}_pred_wt.nii.gz"), np.transpose(original, (2, 0, 1)))
    case, permuted = (json.loads((outputs / f"{name}_pred.json").read_text()) for name in (CASE, PERMUTED))
    assert permuted["axial_axis"] == 0
    assert permuted["slices"] == case["slices"] and permuted["volume"] == case["volume"]


@pytest.mark.parametrize("name", ["kaggle", "narrow"])
def test_image_outputs_match_the_network_called_directly(name: str, model: TinyModel, inputs: Path, outputs: Path):
    source = next(inputs.glob(f"{name}.*"))
    grey, _ = load_grey(source)
    image, _ = preprocess_grey(grey, TINY_SIZE)
    with torch.no_grad():
        out = model.eager()(torch.from_numpy(image[None]), domain=1)  # a 2D image: the Kaggle images' statistics
        assert not torch.allclose(model.eager()(torch.from_numpy(image[None]))["cls"], out["cls"])
    mask = np.asarray(Image.open(outputs / f"{name}_pred_wt.png"))
    assert mask.shape == grey.shape and set(np.unique(mask).tolist()) <= {0, 255}
    report = json.loads((outputs / f"{name}_pred.json").read_text())
    probability = torch.softmax(out["cls"], 1)[0, 1].item()
    assert report["tumour_probability"] == pytest.approx(probability, abs=1e-5)
    assert report["predicted_class"] == int(probability >= 0.5)
    assert report["shape"] == list(grey.shape) and report["tumour_pixels"] == int((mask > 0).sum())
    # Enlarging interpolates each pixel from the 2x2 network pixels around it, all within the 3x3 neighbourhood of
    # the nearest one: where that whole neighbourhood is above (below) 0.5, the mask must be tumour (background).
    seg_probability = torch.sigmoid(out["seg"])
    lowest = -torch.nn.functional.max_pool2d(-seg_probability, 3, stride=1, padding=1)
    highest = torch.nn.functional.max_pool2d(seg_probability, 3, stride=1, padding=1)
    side = max(grey.shape)
    top, left = (side - grey.shape[0]) // 2, (side - grey.shape[1]) // 2
    for bound, value in ((lowest, 255), (highest, 0)):
        nearest = torch.nn.functional.interpolate(bound, size=(side, side), mode="nearest")[0, 0].numpy()
        sure = nearest[top : top + grey.shape[0], left : left + grey.shape[1]]
        assert np.all(mask[(sure > 0.5) if value else (sure < 0.5)] == value)


def test_model_ts_alone_runs_without_the_training_code(model: TinyModel, inputs: Path, outputs: Path, tmp_path: Path):
    # A bundle holding only the inference config and the data / inference packages: no scripts.networks.
    bundle = tmp_path / "bundle"
    (bundle / "scripts").mkdir(parents=True)
    shutil.copytree(BUNDLE_ROOT / "configs", bundle / "configs", ignore=shutil.ignore_patterns("train.yaml", "eval*"))
    shutil.copy(SHIPPED_METADATA, bundle / "configs" / "metadata.json")  # as shipped, like `outputs`
    for module in ("__init__.py", "errors.py", "flags.py"):
        shutil.copy(BUNDLE_ROOT / "scripts" / module, bundle / "scripts")
    for package in ("data", "inference"):
        shutil.copytree(BUNDLE_ROOT / "scripts" / package, bundle / "scripts" / package)
    output = tmp_path / "out"
    _run(model, inputs, output, "--model_file", str(model.torchscript), "--int8_inference", "false", bundle=bundle)
    assert sorted(p.name for p in output.iterdir()) == sorted(p.name for p in outputs.iterdir())
    for name in (CASE, PERMUTED):
        scripted, eager = _mask(output / f"{name}_pred_wt.nii.gz"), _mask(outputs / f"{name}_pred_wt.nii.gz")
        # Scripted and eager logits agree within 1e-4: at most a voxel where the probability sits on 0.5 may flip.
        assert np.count_nonzero(scripted != eager) <= 1e-4 * scripted.size
        ts_report, pt_report = (json.loads((d / f"{name}_pred.json").read_text()) for d in (output, outputs))
        for ts_slice, pt_slice in zip(ts_report["slices"], pt_report["slices"], strict=True):
            if pt_slice["analysed"]:
                assert ts_slice["tumour_probability"] == pytest.approx(pt_slice["tumour_probability"], abs=1e-4)


# ---- bad inputs


def _write_nifti(path: Path, array: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)
    return path


@pytest.fixture()
def bad_inputs(tmp_path: Path) -> dict[str, Path]:
    folder = tmp_path / "bad"
    folder.mkdir()
    return {
        "four_channels": _write_nifti(folder / "four_channels.nii.gz", np.ones((16, 16, 8, 4), np.float32)),
        "flat": _write_nifti(folder / "flat.nii.gz", np.ones((16, 16), np.float32)),
        "text_png": folder / "text.png",
        "text_nifti": folder / "text.nii.gz",
    }


def test_every_bad_input_is_named_before_anything_runs(bad_inputs: dict[str, Path], model: TinyModel) -> None:
    bad_inputs["text_png"].write_text("not an image")
    bad_inputs["text_nifti"].write_text("not a volume")
    with pytest.raises(DataError) as raised:
        find_inputs(bad_inputs["flat"].parent, model.settings)
    message = str(raised.value)
    assert "4 problem(s)" in message
    assert f"{bad_inputs['four_channels']} has 4 channels" in message and "the model takes 1 (flair)" in message
    assert f"{bad_inputs['flat']} is 2D" in message
    assert f"{bad_inputs['text_png']}: not a readable image" in message
    assert f"{bad_inputs['text_nifti']} is not a readable NIfTI file" in message
    notes = bad_inputs["flat"].parent / "notes.txt"
    notes.write_text("neither")
    with pytest.raises(DataError, match=f"{notes} is not an accepted input"):
        find_inputs(notes, model.settings)
    with pytest.raises(DataError, match="missing does not exist"):
        find_inputs(bad_inputs["flat"].parent.parent / "missing", model.settings)


def test_a_single_channel_volume_is_refused_by_a_four_channel_model(tmp_path: Path, model: TinyModel) -> None:
    volume = _write_nifti(tmp_path / "flair_only.nii.gz", np.ones((16, 16, 8), np.float32))
    with pytest.raises(DataError, match=rf"{volume} has 1 channel .* the model takes 4 \(flair, t1, t1ce, t2\)"):
        find_inputs(volume, make_settings(TINY_SIZE, 4))


def test_empty_volumes_and_blank_images_are_named(tmp_path: Path, model: TinyModel) -> None:
    empty = _write_nifti(tmp_path / "empty.nii.gz", np.zeros((16, 16, 8), np.float32))
    blank = tmp_path / "blank.png"
    Image.fromarray(np.zeros((20, 30), np.uint8)).save(blank)
    for path, what in ((empty, "the volume is empty"), (blank, "the image is empty")):
        (item,) = find_inputs(path, model.settings)
        assert isinstance(item, InferenceInput)
        with pytest.raises(DataError, match=f"{path}.*{what}"):
            prepare(item, model.settings)


@pytest.mark.parametrize("problem", ["wrong_channels", "empty_volume"])
def test_the_command_fails_naming_the_file_and_writes_nothing(
    problem: str, model: TinyModel, synthetic_small: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "inputs"
    # A good case comes first: with an empty volume it is predicted, then the run fails and drops it.
    shutil.copytree(synthetic_small / "brats" / CASE, folder / CASE)
    if problem == "wrong_channels":
        bad = _write_nifti(folder / "multi.nii.gz", np.ones((16, 16, 8, 2), np.float32))
        expected = f"{bad} has 2 channels"
    else:
        bad = _write_nifti(folder / "zeros.nii.gz", np.zeros((16, 16, 8), np.float32))
        expected = f"{bad}: the volume is empty"
    output = tmp_path / "out"
    result = _run(model, folder, output, check=False)
    assert result.returncode != 0
    assert expected in result.stderr + result.stdout
    assert not output.exists(), sorted(output.rglob("*"))


def _checksums(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.md5(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.mark.parametrize("where", ["case_folder", "below_the_input_folder"])
def test_an_output_folder_inside_the_inputs_is_refused_and_the_ground_truth_kept(
    where: str, model: TinyModel, synthetic_small: Path, tmp_path: Path
) -> None:
    # The scenario of a user who writes the predictions next to the case: BraTS's own seg must survive.
    folder = tmp_path / "inputs"
    shutil.copytree(synthetic_small / "brats" / CASE, folder / CASE)
    before = _checksums(folder)
    output = folder / CASE if where == "case_folder" else folder / "predictions"
    result = _run(model, folder, output, check=False)
    assert result.returncode != 0
    assert f"the output folder {output} is inside the input folder's tree" in result.stdout + result.stderr
    assert _checksums(folder) == before


def test_output_beside_a_single_input_file_is_refused(model: TinyModel, tmp_path: Path) -> None:
    volume = _write_nifti(tmp_path / "scan.nii.gz", np.ones((16, 16, 8), np.float32))
    with pytest.raises(DataError, match=f"inside the input file's tree {tmp_path}"):
        find_inputs(volume, model.settings, tmp_path)
    assert len(find_inputs(volume, model.settings, tmp_path / "predictions")) == 1


def test_a_single_case_folder_is_one_case_and_its_segmentation_is_not_an_input(
    model: TinyModel, synthetic_small: Path, tmp_path: Path
) -> None:
    case_folder = synthetic_small / "brats" / CASE
    assert (case_folder / f"{CASE}_seg.nii.gz").is_file()
    output = tmp_path / "out"
    _run(model, case_folder, output)
    assert sorted(p.name for p in output.iterdir()) == [f"{CASE}_pred.json", f"{CASE}_pred_wt.nii.gz"]
    report = json.loads((output / f"{CASE}_pred.json").read_text())
    assert report["input"] == str(case_folder) and report["grid_file"].endswith(f"{CASE}_flair.nii.gz")


def test_loose_ground_truth_is_refused_and_earlier_predictions_are_skipped(model: TinyModel, tmp_path: Path) -> None:
    volume = _write_nifti(tmp_path / "scan.nii.gz", np.ones((16, 16, 8), np.float32))
    truth = _write_nifti(tmp_path / "scan_seg.nii.gz", np.ones((16, 16, 8), np.uint8))
    with pytest.raises(DataError, match=f"{truth} is named as a segmentation"):
        find_inputs(tmp_path, model.settings)
    truth.unlink()
    # What an earlier run wrote (into a folder later used as input) is not read as new inputs.
    _write_nifti(tmp_path / "scan_pred_wt.nii.gz", np.ones((16, 16, 8), np.uint8))
    Image.fromarray(np.ones((8, 8), np.uint8)).save(tmp_path / "photo_pred_wt.png")
    (tmp_path / "scan_pred.json").write_text("{}")
    assert [item.source for item in find_inputs(tmp_path, model.settings)] == [volume]
