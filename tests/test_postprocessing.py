"""Post-processing chosen on validation (issue 14 point 4): removal of small components, its choice per model on the
validation split by lesion-wise Dice, where it is stored, and that evaluation, inference and the export apply it."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, TINY_SIZE
from test_evaluation import CASE_ID, raw_case
from test_export import TinyModel, run_tool, tiny_model

from scripts import evaluation as evaluation_module
from scripts.data.lesions import remove_small_lesions
from scripts.errors import UsageError
from scripts.evaluation import PredictionCollector
from scripts.files import file_sha256
from scripts.inference.inputs import find_inputs
from scripts.inference.model import settings_from_model
from scripts.inference.predict import BACKGROUND_LOGIT, finish, prepare
from scripts.inference.settings import make_settings
from scripts.postprocessing import (
    choose_min_lesion_voxels,
    forget_stale_choice,
    lesionwise_dice_by_size,
    require_validation_split,
    store_choice,
    stored_min_lesion_voxels,
)

SIZES = [0, 10, 25, 100, 1000]


def planted() -> np.ndarray:
    """A 27-voxel tumour and, far from it, a 2-voxel speck whose voxels touch by a corner only (one 26-connected
    component, two 6-connected ones)."""
    mask = np.zeros((20, 20, 12), dtype=np.uint8)
    mask[3:6, 3:6, 3:6] = 1
    mask[15, 15, 8] = mask[16, 16, 9] = 1
    return mask


def test_a_planted_small_component_goes_above_the_threshold_and_stays_below_it() -> None:
    mask = planted()
    assert remove_small_lesions(mask, 0) is mask  # none: the mask itself
    np.testing.assert_array_equal(remove_small_lesions(mask, 2), mask)  # 2 voxels is not below 2: kept
    removed = remove_small_lesions(mask, 3)
    assert removed.dtype == mask.dtype and removed.sum() == 27 and removed[15, 15, 8] == removed[16, 16, 9] == 0
    assert remove_small_lesions(mask, 28).sum() == 0  # the tumour itself is below 28
    assert mask.sum() == 29, "the input is left as it was"
    with pytest.raises(ValueError, match="min_lesion_voxels"):
        remove_small_lesions(mask, -1)


def test_components_are_those_of_full_3d_connectivity() -> None:
    # An independent labelling (scikit-image's, connectivity 3 = 26 neighbours) gives the same removal: fewer voxels
    # than the size go, as MONAI's RemoveSmallObjects documents (scikit-image 0.26 under MONAI 1.6.1 also removes
    # components of exactly min_size, see scripts/data/lesions.py).
    measure = pytest.importorskip("skimage.measure")
    mask = (np.random.default_rng(0).random((24, 20, 16)) > 0.8).astype(np.uint8)
    labels = measure.label(mask, connectivity=3)
    sizes = np.bincount(labels.ravel())
    for size in (2, 3, 5, 12):
        expected = mask * (sizes[labels] >= size)
        assert 0 < expected.sum() < mask.sum()
        np.testing.assert_array_equal(remove_small_lesions(mask, size), expected, err_msg=str(size))


def test_inference_removes_the_planted_component_from_a_volume_and_its_report(tmp_path: Path) -> None:
    # A 32 x 32 x 6 brain prepared at 32 px: the prepared slices are the volume's own grid.
    image = np.random.default_rng(1).uniform(1.0, 2.0, (32, 32, 6)).astype(np.float32)
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "head.nii.gz")
    settings = make_settings(TINY_SIZE, 1)
    prepared = prepare(find_inputs(tmp_path / "head.nii.gz", settings)[0], settings)
    seg = torch.full((prepared.image.shape[0], 1, TINY_SIZE, TINY_SIZE), BACKGROUND_LOGIT)
    seg[:, :, 8:14, 8:14] = 30.0  # a tumour through every slice
    seg[2, :, 26, 26] = 30.0  # and one voxel far from it
    outputs = {"seg": seg, "cls": torch.zeros(seg.shape[0], 2)}
    masks = {}
    for size in (0, 1, 2):
        prediction = finish(prepared, outputs, make_settings(TINY_SIZE, 1, min_lesion_voxels=size))
        masks[size] = prediction.mask
        report = prediction.report
        assert report["preprocessing"]["min_lesion_voxels"] == size
        assert report["volume"]["tumour_voxels"] == prediction.mask.sum()
        assert sum(s["mask_voxels"] for s in report["slices"]) == prediction.mask.sum()
    assert masks[0].sum() == masks[1].sum() == 6 * 36 + 1  # none, and a size the speck is not below: kept
    assert masks[2].sum() == 6 * 36  # removed
    np.testing.assert_array_equal(masks[2], remove_small_lesions(masks[0], 2))


# ----------------------------------------------------------------------------------------------------------------------
# The choice, on hand-made native-grid masks

SPACING = (1.0, 1.0, 1.0)


def _volumes() -> tuple[np.ndarray, np.ndarray]:
    reference = np.zeros((40, 40, 30), dtype=bool)
    reference[5:10, 5:10, 5:10] = True  # 125 voxels
    return reference.copy(), reference


def test_a_size_wins_when_it_removes_a_false_positive_speck() -> None:
    prediction, reference = _volumes()
    prediction[30:32, 30:32, 20] = True  # 4 voxels of false positive
    scores = lesionwise_dice_by_size(prediction, reference, SPACING, SIZES)
    assert scores == {0: 0.5, 10: 1.0, 25: 1.0, 100: 1.0, 1000: 0.0}  # 1000 removes the tumour too
    chosen = choose_min_lesion_voxels([scores])
    assert chosen["min_lesion_voxels"] == 10  # the smallest of the best
    assert [row["lesionwise_dice_mean"] for row in chosen["candidates"]] == [0.5, 1.0, 1.0, 1.0, 0.0]


def test_none_wins_when_removal_deletes_a_real_small_lesion_and_ties_go_to_none() -> None:
    prediction, reference = _volumes()
    reference[30:32, 30:32, 20:22] = prediction[30:32, 30:32, 20:22] = True  # a real 8-voxel lesion, found
    scores = lesionwise_dice_by_size(prediction, reference, SPACING, SIZES)
    assert scores[0] == 1.0 and scores[10] == 0.5
    assert choose_min_lesion_voxels([scores])["min_lesion_voxels"] == 0
    # With the speck patient above: 0.75 either way, a tie, which none wins.
    speck, _ = _volumes()
    speck[30:32, 30:32, 20] = True
    both = [scores, lesionwise_dice_by_size(speck, _volumes()[1], SPACING, SIZES)]
    assert choose_min_lesion_voxels(both)["min_lesion_voxels"] == 0
    # Patients undefined for BraTS (both masks empty) are left out; none at all: none.
    empty = np.zeros((8, 8, 8), dtype=bool)
    undefined = lesionwise_dice_by_size(empty, empty, SPACING, SIZES)
    assert all(np.isnan(value) for value in undefined.values())
    assert choose_min_lesion_voxels([undefined])["min_lesion_voxels"] == 0


def test_the_evaluation_chooses_on_what_it_recorded_and_reports_with_the_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    patients, slices = raw_case(tmp_path)

    def stray(item) -> np.ndarray:  # 2 x 2 voxels in one slice, far from the tumour
        prob = item.mask.astype(np.float32)
        prob[0, 18:20, 18:20] = 1.0 if item.z == 8 else 0.0
        return prob

    def run(**options) -> PredictionCollector:
        collector = PredictionCollector(patients=patients, native_grid=True, **options)
        for item in slices:
            sample = {"source": "brats", "patient": CASE_ID, "slice": item.z, "cls_prob": 0.5, "cls": 1}
            collector.add_sample({**sample, "seg_prob": torch.from_numpy(stray(item)), "label": item.mask})
        collector.compute()
        return collector

    plain = run()
    assert plain.metrics["brats_patient_lesionwise_dice_mean"] == 0.5 and plain.selection is None
    assert plain.metrics["postprocessing_min_lesion_voxels"] == 0
    stored = run(min_lesion_voxels=5)  # a stored choice is applied to the native-grid masks only
    assert stored.metrics["brats_patient_lesionwise_dice_mean"] == 1.0
    assert stored.metrics["brats_slice_dice_mean"] == plain.metrics["brats_slice_dice_mean"]
    reads = []
    original_load_case = evaluation_module.load_case
    monkeypatch.setattr(evaluation_module, "load_case", lambda *a, **k: reads.append(1) or original_load_case(*a, **k))
    chosen = run(lesion_size_candidates=[0, 4, 5, 10000])
    assert len(reads) == 1  # the raw case is read once, for the choice and the scores with it
    assert chosen.selection["min_lesion_voxels"] == 5  # 4 voxels are not below 4
    assert chosen.metrics["postprocessing_min_lesion_voxels"] == 5
    assert chosen.metrics["brats_patient_lesionwise_dice_mean"] == 1.0
    with pytest.raises(UsageError, match="native_grid_metrics"):
        PredictionCollector(patients=patients, lesion_size_candidates=[0, 10])


def test_the_choice_is_refused_on_the_test_split() -> None:
    with pytest.raises(UsageError, match="--eval_split validation"):
        require_validation_split("test", True)
    require_validation_split("validation", True)
    require_validation_split("test", False)


# ----------------------------------------------------------------------------------------------------------------------
# Where it is stored


def _bundle(root: Path) -> tuple[Path, Path]:
    (root / "configs").mkdir(parents=True)
    (root / "models").mkdir()
    metadata = root / "configs" / "metadata.json"
    metadata.write_text(json.dumps({"name": "x", "postprocessing": {"min_lesion_voxels": 0}}))
    (root / "models" / "model.pt").write_bytes(b"weights one")
    return metadata, root / "models" / "model.pt"


SELECTION = {"min_lesion_voxels": 25, "criterion": "c", "patients": 2,
             "candidates": [{"min_lesion_voxels": 0, "lesionwise_dice_mean": 0.5},
                            {"min_lesion_voxels": 25, "lesionwise_dice_mean": 0.75}]}  # fmt: skip


def test_the_bundles_model_keeps_its_choice_in_metadata_until_other_weights_are_published(tmp_path: Path) -> None:
    metadata, model = _bundle(tmp_path / "bundle")
    assert stored_min_lesion_voxels(str(metadata), str(model)) == 0
    message = store_choice(SELECTION, str(metadata), str(model))
    assert "min_lesion_voxels 25" in message and "0: 0.5000, 25: 0.7500" in message
    record = json.loads(metadata.read_text())
    assert record["name"] == "x" and record["postprocessing"]["min_lesion_voxels"] == 25
    assert record["postprocessing"]["model_sha256"] == file_sha256(model)
    assert stored_min_lesion_voxels(str(metadata), str(model)) == 25
    forget_stale_choice(str(metadata), str(model))  # the same weights published again: kept
    assert stored_min_lesion_voxels(str(metadata), str(model)) == 25
    model.write_bytes(b"weights two")
    assert stored_min_lesion_voxels(str(metadata), str(model)) == 0  # chosen for other weights: not applied
    forget_stale_choice(str(metadata), str(model))
    assert json.loads(metadata.read_text())["postprocessing"] == {"min_lesion_voxels": 0}


def test_another_models_choice_goes_beside_it_and_leaves_metadata_alone(tmp_path: Path) -> None:
    metadata, _ = _bundle(tmp_path / "bundle")
    baseline = tmp_path / "bundle" / "models" / "baseline_seg" / "model.pt"
    baseline.parent.mkdir()
    baseline.write_bytes(b"baseline")
    before = metadata.read_text()
    store_choice(SELECTION, str(metadata), str(baseline))
    assert metadata.read_text() == before
    assert json.loads((baseline.parent / "postprocessing.json").read_text())["min_lesion_voxels"] == 25
    assert stored_min_lesion_voxels(str(metadata), str(baseline)) == 25
    baseline.write_bytes(b"baseline retrained")
    forget_stale_choice(str(metadata), str(baseline))
    assert not (baseline.parent / "postprocessing.json").exists()
    assert "not chosen" in store_choice(None, str(metadata), str(baseline))


# ----------------------------------------------------------------------------------------------------------------------
# Through the commands: choose on validation, metadata.json, inference.yaml, the export


@pytest.fixture(scope="module")
def model(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_model(synthetic_small, tmp_path_factory)


def test_the_commands_choose_store_and_apply_the_size(
    model: TinyModel, prepared_small: Path, synthetic_small: Path, tmp_path: Path
) -> None:
    # A bundle of its own (the repository's is left alone) holding the tiny model as its models/model.pt.
    repository_metadata = (BUNDLE_ROOT / "configs" / "metadata.json").read_text()
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE_ROOT / "configs", bundle / "configs")
    (bundle / "scripts").symlink_to(BUNDLE_ROOT / "scripts")
    (bundle / "models").mkdir()
    shutil.copy(model.checkpoint, bundle / "models" / "model.pt")
    metadata = bundle / "configs" / "metadata.json"
    configs = [str(bundle / "configs" / name) for name in ("train.yaml", "evaluate.yaml")] + [str(model.preset)]
    evaluate = [sys.executable, "-m", "monai.bundle", "run", "--config_file", repr(configs), "--bundle_root",
                str(bundle), "--dataset_dir", str(prepared_small), "--output_dir", str(tmp_path / "eval"),
                "--mlflow_tracking", "false", "--choose_postprocessing", "true"]  # fmt: skip

    refused = run_tool(evaluate, check=False)  # on the test split (the default)
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "--eval_split validation" in refused.stderr and not (tmp_path / "eval").exists()

    # Candidates whose choice is known: 10**9 voxels removes every prediction (lesion-wise Dice 0 for a patient with
    # tumour, every generated patient has one), so 300 is at least as good and, on a tie, smaller.
    run_tool([*evaluate, "--eval_split", "validation", "--lesion_size_candidates", "[300, 1000000000]"])
    record = json.loads(metadata.read_text())["postprocessing"]
    assert record["min_lesion_voxels"] == 300 and record["model_sha256"] == file_sha256(bundle / "models" / "model.pt")
    table = json.loads((tmp_path / "eval" / "postprocessing.json").read_text())
    assert [row["min_lesion_voxels"] for row in table["candidates"]] == [300, 1000000000] and table["patients"] > 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["postprocessing_min_lesion_voxels"] == 300

    # inference.yaml reads it from metadata.json; --min_lesion_voxels 0 turns it off for comparison.
    case = sorted((synthetic_small / "brats").iterdir())[0]
    infer = [sys.executable, "-m", "monai.bundle", "run", "--config_file",
             repr([str(bundle / "configs" / "inference.yaml"), str(model.preset)]), "--bundle_root", str(bundle),
             "--dataset_dir", str(case)]  # fmt: skip
    masks = {}
    for size, extra in ((300, []), (0, ["--min_lesion_voxels", "0"])):
        out = tmp_path / f"predicted_{size}"
        run_tool([*infer, "--output_dir", str(out), *extra])
        assert json.loads((out / f"{case.name}_pred.json").read_text())["preprocessing"]["min_lesion_voxels"] == size
        masks[size] = np.asanyarray(nib.load(out / f"{case.name}_pred_wt.nii.gz").dataobj)
    np.testing.assert_array_equal(masks[300], remove_small_lesions(masks[0], 300))

    # The export embeds it: model.ts alone (the Deploy app's settings) applies the same size.
    ts = bundle / "models" / "model.ts"
    inference = repr([str(bundle / "configs" / "inference.yaml"), str(model.preset)])
    export = [sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(ts),
              "--ckpt_file", str(bundle / "models" / "model.pt"), "--meta_file", str(metadata), "--config_file",
              inference, "--bundle_root", str(bundle)]  # fmt: skip
    run_tool(export)
    assert settings_from_model(ts).min_lesion_voxels == 300
    assert (BUNDLE_ROOT / "configs" / "metadata.json").read_text() == repository_metadata
