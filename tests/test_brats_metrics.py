"""The official BraTS whole-tumour metrics (scripts.brats_metrics) on small volumes whose answers are known by hand.

Two shapes recur, because their surface distances can be counted:

* an 8^3 cube: predicted exactly, every surface distance is 0;
* a plate two voxels thick (12 x 12 x 2), predicted one voxel further along its thin axis: the two plates share one
  layer, so Dice = 2 * 144 / (288 + 288) = 0.5; every voxel of a 2-thick plate is on its surface, half of them
  coincide with the other plate's and the other half are exactly one voxel step from it, so HD95 (the 95th
  percentile of the pooled distances) is one voxel step: the spacing of the thin axis, in mm.

Expected values are computed in the tests from these counts, not from the module.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from scripts.brats_metrics import MAX_HD95_MM, _evaluator, whole_tumour_metrics

BUNDLE_ROOT = Path(__file__).resolve().parents[1] / "bundle"
N = 32
ISO = (1.0, 1.0, 1.0)
CUBE = 8**3
CUBE_SURFACE = CUBE - 6**3  # voxels of an 8^3 cube with a face neighbour outside it
PLATE = 12 * 12 * 2


def _empty(shape: tuple[int, int, int] = (N, N, N)) -> np.ndarray:
    return np.zeros(shape, dtype=bool)


def _cube(mask: np.ndarray, corner: tuple[int, int, int], size: int = 8) -> np.ndarray:
    x, y, z = corner
    mask[x : x + size, y : y + size, z : z + size] = True
    return mask


def _plate(mask: np.ndarray, axis: int, start: int) -> np.ndarray:
    """A 12 x 12 plate, two voxels thick along ``axis`` from ``start``."""
    box = [slice(8, 20)] * 3
    box[axis] = slice(start, start + 2)
    mask[tuple(box)] = True
    return mask


def test_a_perfect_prediction_scores_one_and_zero_everywhere() -> None:
    reference = _cube(_empty(), (8, 8, 8))
    scores = whole_tumour_metrics(reference.copy(), reference, ISO)
    assert scores == {
        "global_dice": 1.0,
        "global_hd95": 0.0,
        "lesionwise_dice": 1.0,
        "lesionwise_hd95": 0.0,
        "matched_lesion_dice": 1.0,
        "matched_lesion_hd95": 0.0,
        "lesion_f1": 1.0,
        "lesions_tp": 1,
        "lesions_fp": 0,
        "lesions_fn": 0,
    }


def test_a_small_false_positive_far_away_barely_moves_global_dice_but_costs_a_whole_lesion() -> None:
    reference = _cube(_empty(), (8, 8, 8))
    prediction = _cube(reference.copy(), (26, 26, 26), size=2)  # 8 voxels, 10 voxels away from the tumour
    scores = whole_tumour_metrics(prediction, reference, ISO)

    assert scores["global_dice"] == pytest.approx(2 * CUBE / (2 * CUBE + 8))  # 0.992
    # 8 of the 2 * 296 + 8 pooled surface distances are large: under 5%, so the 95th percentile is still 0.
    assert 8 / (2 * CUBE_SURFACE + 8) < 0.05
    assert scores["global_hd95"] == 0.0
    # One matched lesion (Dice 1, HD95 0) and one false-positive lesion (Dice 0, HD95 373), averaged over both.
    assert scores["lesionwise_dice"] == pytest.approx((1.0 + 0.0) / 2)
    assert scores["lesionwise_hd95"] == pytest.approx((0.0 + MAX_HD95_MM) / 2)
    # The official glioma parser's lesion-wise mean covers matched lesions only, so it does not see the blob;
    # the counts and the F1 (2 TP / (2 TP + FP + FN)) do.
    assert scores["matched_lesion_dice"] == 1.0
    assert scores["matched_lesion_hd95"] == 0.0
    assert (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]) == (1, 1, 0)
    assert scores["lesion_f1"] == pytest.approx(2 / 3)


def test_the_lesionwise_mean_counts_an_imperfect_match_and_an_unmatched_lesion() -> None:
    reference = _plate(_empty(), axis=2, start=10)
    prediction = _cube(_plate(_empty(), axis=2, start=11), (26, 26, 26), size=2)
    scores = whole_tumour_metrics(prediction, reference, ISO)

    match_dice, match_hd95 = 2 * 144 / (2 * PLATE), 1.0  # the plates: 0.5, one voxel
    assert scores["matched_lesion_dice"] == pytest.approx(match_dice)
    assert scores["matched_lesion_hd95"] == pytest.approx(match_hd95)
    assert scores["lesionwise_dice"] == pytest.approx((match_dice + 0.0) / 2)  # 0.25
    assert scores["lesionwise_hd95"] == pytest.approx((match_hd95 + MAX_HD95_MM) / 2)  # 187
    assert scores["global_dice"] == pytest.approx(2 * 144 / (2 * PLATE + 8))
    # Pooled: 288 zeros, 288 ones and 8 large distances; the 95th percentile falls among the ones.
    assert scores["global_hd95"] == pytest.approx(1.0)


def test_a_missed_lesion_costs_as_much_as_a_false_positive_one() -> None:
    reference = _cube(_cube(_empty(), (4, 4, 4)), (24, 24, 24), size=2)
    prediction = _cube(_empty(), (4, 4, 4))
    scores = whole_tumour_metrics(prediction, reference, ISO)

    assert (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]) == (1, 0, 1)
    assert scores["lesionwise_dice"] == pytest.approx(0.5)
    assert scores["lesionwise_hd95"] == pytest.approx(MAX_HD95_MM / 2)
    assert scores["matched_lesion_dice"] == 1.0
    assert scores["global_dice"] == pytest.approx(2 * CUBE / (2 * CUBE + 8))
    assert scores["global_hd95"] == 0.0  # 8 of 600 surface distances, as for the false positive


@pytest.mark.parametrize(
    ("empty", "counts"),
    [("prediction", (0, 0, 1)), ("reference", (0, 1, 0))],
)
def test_an_empty_prediction_or_reference_scores_dice_0_and_hd95_373(empty: str, counts: tuple[int, int, int]) -> None:
    tumour = _cube(_empty(), (8, 8, 8))
    prediction, reference = (_empty(), tumour) if empty == "prediction" else (tumour, _empty())
    scores = whole_tumour_metrics(prediction, reference, ISO)

    assert (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]) == counts
    for key in ("global_dice", "lesionwise_dice", "matched_lesion_dice", "lesion_f1"):
        assert scores[key] == 0.0, key
    for key in ("global_hd95", "lesionwise_hd95", "matched_lesion_hd95"):
        assert scores[key] == MAX_HD95_MM, key  # panoptica's inf, as the official parser writes it


def test_a_prediction_beside_the_tumour_matches_nothing() -> None:
    reference = _plate(_empty(), axis=2, start=10)  # layers 10-11
    prediction = _plate(_empty(), axis=2, start=14)  # layers 14-15: no overlap, a false positive and a miss
    scores = whole_tumour_metrics(prediction, reference, ISO)

    assert (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]) == (0, 1, 1)
    assert scores["global_dice"] == scores["lesionwise_dice"] == scores["matched_lesion_dice"] == 0.0
    assert scores["lesionwise_hd95"] == scores["matched_lesion_hd95"] == MAX_HD95_MM
    # Layers 11 and 14 are 3 voxels apart, 10 and 15 are 4: half the pooled distances are 3, half 4.
    assert scores["global_hd95"] == pytest.approx(4.0)


def test_both_empty_is_undefined_as_in_the_official_evaluation() -> None:
    scores = whole_tumour_metrics(_empty(), _empty(), ISO)
    assert (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]) == (0, 0, 0)
    undefined = {key for key, value in scores.items() if isinstance(value, float) and math.isnan(value)}
    assert undefined == {
        "global_dice",
        "global_hd95",
        "lesionwise_dice",
        "lesionwise_hd95",
        "matched_lesion_dice",
        "matched_lesion_hd95",
        "lesion_f1",
    }


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_hd95_is_in_mm_along_the_axis_whose_spacing_it_crosses(axis: int) -> None:
    spacing = (0.5, 0.8, 3.0)  # one distinct voxel size per array axis
    reference = _plate(_empty(), axis=axis, start=10)
    prediction = _plate(_empty(), axis=axis, start=11)
    scores = whole_tumour_metrics(prediction, reference, spacing)

    # The plates are one voxel apart along `axis` and coincide across it: HD95 is that axis's voxel size.
    for key in ("global_hd95", "lesionwise_hd95", "matched_lesion_hd95"):
        assert scores[key] == pytest.approx(spacing[axis]), key
    assert scores["global_dice"] == pytest.approx(0.5)  # Dice counts voxels: no spacing in it
    assert scores["lesionwise_dice"] == pytest.approx(0.5)


@pytest.mark.parametrize(("blob_corner", "separate"), [((16, 16, 16), False), ((17, 17, 17), True)])
def test_lesions_are_26_connected_components(blob_corner: tuple[int, int, int], separate: bool) -> None:
    reference = _cube(_empty(), (8, 8, 8))
    # A voxel touching the cube's corner voxel (15, 15, 15) only at a corner belongs to it (26-connectivity, as
    # cc3d in the official evaluation); one voxel further it is a lesion of its own.
    prediction = reference.copy()
    prediction[blob_corner] = True
    scores = whole_tumour_metrics(prediction, reference, ISO)

    assert scores["lesions_fp"] == int(separate)
    if separate:
        assert scores["lesionwise_dice"] == pytest.approx(0.5)
    else:
        assert scores["lesionwise_dice"] == pytest.approx(2 * CUBE / (2 * CUBE + 1))


def test_scoring_the_masks_box_gives_what_panoptica_gives_on_the_whole_grid() -> None:
    # Lesions at the grid's edges (the crop cannot add a margin there), of several sizes, anisotropic spacing.
    shape, spacing = (40, 36, 30), (0.9, 1.1, 2.5)
    reference, prediction = _empty(shape), _empty(shape)
    reference[0:6, 10:18, 0:5] = True
    prediction[0:5, 11:18, 0:6] = True
    reference[30:40, 28:36, 22:30] = True
    prediction[31:40, 27:36, 24:30] = True
    prediction[15:17, 2:4, 12:14] = True  # false positive
    reference[20:23, 30:33, 5:7] = True  # missed
    scores = whole_tumour_metrics(prediction, reference, spacing)

    whole = _evaluator().evaluate(prediction.astype(np.uint8), reference.astype(np.uint8), voxelspacing=spacing)["wt"]
    counts = (scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"])
    assert counts == (whole.tp, whole.fp, whole.fn) == (2, 1, 1)
    assert scores["matched_lesion_dice"] == pytest.approx(whole.sq_dsc)
    assert scores["matched_lesion_hd95"] == pytest.approx(whole.sq_hd95)
    assert scores["global_dice"] == pytest.approx(whole.global_bin_dsc)


@pytest.mark.parametrize(
    ("prediction", "reference", "spacing", "message"),
    [
        (np.full((4, 4, 4), 2, dtype=np.uint8), np.ones((4, 4, 4), dtype=np.uint8), ISO, "binary"),
        (np.ones((4, 4, 4), dtype=bool), np.ones((4, 4, 5), dtype=bool), ISO, "one grid"),
        (np.ones((4, 4), dtype=bool), np.ones((4, 4), dtype=bool), ISO, "3D"),
        (np.ones((4, 4, 4), dtype=bool), np.ones((4, 4, 4), dtype=bool), (1.0, 1.0), "spacing"),
        (np.ones((4, 4, 4), dtype=bool), np.ones((4, 4, 4), dtype=bool), (1.0, 0.0, 1.0), "spacing"),
    ],
)
def test_inputs_that_cannot_be_scored_are_refused(
    prediction: np.ndarray, reference: np.ndarray, spacing: tuple[float, ...], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        whole_tumour_metrics(prediction, reference, spacing)


def test_importing_the_module_does_not_import_panoptica() -> None:
    # panoptica takes seconds to import; the module loads it on its first use only.
    code = "import sys, scripts.brats_metrics; print('panoptica' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=BUNDLE_ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
