"""The official BraTS 2023+ whole-tumour metrics of one patient: global and lesion-wise Dice and HD95, with panoptica.

Why lesion-wise: since 2023 BraTS ranks segmentations by lesion-wise Dice and HD95, not by the Dice of the whole
mask. Every connected component is a lesion; predicted and reference lesions are paired, and a lesion left without
a partner costs a whole lesion: Dice 0 and the maximal HD95. A false-positive blob of a few voxels far from the
tumour barely moves the global Dice (its voxels are few) but halves the lesion-wise Dice of a one-lesion patient.

How: with panoptica (Apache-2.0, BrainLesion/panoptica), the engine of the official BraTS evaluation package
``brats-evaluation`` (AGPL-3.0, not a dependency), configured as its glioma config ``config_gli.yaml`` configures the
whole tumour (``wt``):

* semantic input, lesions from ``ConnectedComponentsInstanceApproximator`` (cc3d, 26-connectivity in 3D: the
  config's ``cca_backend: null`` picks cc3d for 3D input, whose default is 26; BraTS 2023's own script used 26 too);
* ``MaxBipartiteMatching`` on DSC with ``matching_threshold`` 1e-6: one-to-one pairs, any overlap counts;
* instance and global metrics DSC and HD95 (the config also has NSD, left out here), with its edge cases: Dice 0
  and HD95 inf when the prediction or the reference is empty, NaN when both are;
* one ``LabelMergeGroup`` with ``value_labels: [1]``: the input is already the binary whole-tumour mask.

What is returned, per patient (see :func:`whole_tumour_metrics`):

* ``global_dice``, ``global_hd95``: the whole masks, as panoptica's ``global_bin_dsc`` / ``global_bin_hd95`` (HD95
  in mm, see the edge cases).
* ``lesionwise_dice``, ``lesionwise_hd95``: the BraTS lesion-wise scores, the mean over *all* lesions, matched and
  unmatched, an unmatched one (missed reference lesion or false-positive prediction) counting Dice 0 and HD95 373:
  the sum of the matched lesions' scores over TP + FN + FP. This is the formula BraTS 2023 ranked by and the one
  ``brats-evaluation``'s metastasis parser applies to panoptica's per-lesion results, here on the glioma config's
  matching (BraTS 2023's own script paired lesions differently: reference lesions grown by 3 voxels, several
  predicted components per lesion, reference lesions of 50 voxels or less left out; the metastasis parser also
  sets small lesions aside).
* ``matched_lesion_dice``, ``matched_lesion_hd95``: panoptica's ``sq_dsc`` / ``sq_hd95``, the mean over *matched*
  lesions only, which is what ``brats-evaluation``'s glioma parser (``metrics_parser.py seg``) writes as
  ``lesionwise_dsc_mean`` / ``lesionwise_hd95_mean``. A false positive does not lower it (panoptica keeps its
  "segmentation quality" to matched pairs, BrainLesion/panoptica#9); the lesion counts and ``lesion_f1`` show it.
* ``lesion_f1`` (panoptica's ``rq``, the parser's ``all_instance_f1``) and ``lesions_tp``, ``lesions_fp``,
  ``lesions_fn``.

Edge cases, and where each rule comes from:

* HD95 where panoptica gives inf (an empty prediction or reference, or no matched lesion) is 373 mm, the diagonal
  of the 240 x 240 x 155 mm SRI-24 box: ``metrics_parser.py`` replaces an inf global HD95 and scores an unmatched
  lesion so (BraTS 2023's script used 374). Its glioma parser leaves an inf ``lesionwise_hd95_mean`` as inf; here
  it is 373 too, so that a patient mean stays finite.
* Prediction and reference both empty: panoptica's ``no_instances_result`` is NaN for every Dice and HD95 and the
  official parser keeps the NaN, so the patient drops out of the pandas means it reports. The same here: NaN,
  counts 0 (BraTS 2023's script scored such a patient Dice 1, HD95 0; :mod:`scripts.evaluation` gives Dice 1).
* HD95 is in mm, from ``spacing``. panoptica 2.1.7 passes the voxel spacing to the per-lesion metrics but not to
  the global ones (its ``global_bin_hd95`` is in voxels), so the global HD95 is computed here with panoptica's own
  HD95 function and the spacing; on BraTS data (1 mm isotropic) the two agree.

panoptica is imported on the first call, not with this module (importing it takes seconds and pulls in plotly,
pandas and rich), and its citation banner is switched off; cite it as its README asks.

Sources: ``brats_evaluation/configs/config_gli.yaml`` and ``metrics_parser.py`` of brats-evaluation 0.0.10 (PyPI);
panoptica 2.1.7 (``instance_approximator.py``, ``instance_matcher.py``, ``panoptica_result.py``,
``utils/edge_case_handling.py``); rachitsaluja/BraTS-2023-Metrics ``eval.py``; Kofler et al., "Panoptica --
instance-wise evaluation of 3D semantic and instance segmentation maps", arXiv:2312.02608.

Why not MONAI's ``DiceMetric`` / ``HausdorffDistanceMetric``: they score the whole mask; BraTS pairs connected
components as lesions and has its own edge-case rules, which MONAI does not implement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

__all__ = ["MAX_HD95_MM", "whole_tumour_metrics"]

# HD95 of a lesion or mask without a partner: the diagonal of the 240 x 240 x 155 mm SRI-24 box (373.1 mm),
# as brats-evaluation's metrics_parser.py writes it in place of panoptica's inf.
MAX_HD95_MM = 373.0

# Background kept around the masks when they are cropped to their box. panoptica 2.1.7 would not need it (its
# erosion counts beyond the array's edge as background), but one voxel makes the crop exact whatever the surface
# extraction assumes there.
_CROP_MARGIN = 1


@lru_cache(maxsize=1)
def _evaluator() -> Any:
    """panoptica's evaluator with the official glioma config (``config_gli.yaml``) for one binary region."""
    # Imported here: panoptica takes seconds to import and is needed only when the BraTS metrics are computed.
    from panoptica import (
        CCABackend,
        ConnectedComponentsInstanceApproximator,
        InputType,
        MaxBipartiteMatching,
        Metric,
        Panoptica_Evaluator,
    )
    from panoptica.utils import LabelMergeGroup, SegmentationClassGroups
    from panoptica.utils.citation_reminder import disable_citation_reminder
    from panoptica.utils.edge_case_handling import EdgeCaseHandler, EdgeCaseResult, MetricZeroTPEdgeCaseHandling

    # The first evaluation would print a banner on stdout, in the middle of the evaluation's own output.
    disable_citation_reminder()

    def zero_tp(value: EdgeCaseResult) -> MetricZeroTPEdgeCaseHandling:
        # config_gli.yaml: `value` for an empty prediction, an empty reference or no matched pair; NaN when both
        # masks are empty.
        return MetricZeroTPEdgeCaseHandling(
            empty_prediction_result=value,
            empty_reference_result=value,
            no_instances_result=EdgeCaseResult.NAN,
            normal=value,
        )

    return Panoptica_Evaluator(
        expected_input=InputType.SEMANTIC,
        # config_gli.yaml says `cca_backend: null`, which panoptica resolves to cc3d (26-connectivity) for 3D input;
        # named here so that a change of panoptica's default cannot change what a lesion is.
        instance_approximator=ConnectedComponentsInstanceApproximator(cca_backend=CCABackend.cc3d),
        instance_matcher=MaxBipartiteMatching(matching_metric=Metric.DSC, matching_threshold=1e-6),
        edge_case_handler=EdgeCaseHandler(
            listmetric_zeroTP_handling={
                Metric.DSC: zero_tp(EdgeCaseResult.ZERO),
                Metric.HD95: zero_tp(EdgeCaseResult.INF),
            },
            empty_list_std=EdgeCaseResult.NAN,
        ),
        segmentation_class_groups=SegmentationClassGroups({"wt": LabelMergeGroup([1])}),
        instance_metrics=[Metric.DSC, Metric.HD95],
        # Global HD95 is computed in whole_tumour_metrics, with the spacing panoptica 2.1.7 does not pass on.
        global_metrics=[Metric.DSC],
    )


def _binary_volume(mask: Any, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 3:
        raise ValueError(f"{name} must be a 3D mask, got shape {array.shape}")
    if array.dtype != bool and not np.isin(array, (0, 1)).all():
        # A label map (BraTS labels 1-4) would need its whole-tumour labels chosen first (scripts.data.volumes).
        raise ValueError(f"{name} must be a binary mask (0/1 or bool), got values {np.unique(array)[:8].tolist()}")
    return array.astype(bool, copy=False)


def union_box(prediction: np.ndarray, reference: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of both masks plus a margin: every score below is the same on it as on the whole grid, and
    so are the prediction's connected components (a whole-grid box when both masks are empty)."""
    union = prediction | reference
    if not union.any():
        return tuple(slice(0, n) for n in union.shape)
    box = []
    for axis in range(union.ndim):
        hits = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(max(int(hits[0]) - _CROP_MARGIN, 0), int(hits[-1]) + 1 + _CROP_MARGIN))
    return tuple(box)


def _capped(hd95: float) -> float:
    """HD95 with panoptica's inf (nothing to measure against) replaced by the official maximum."""
    return MAX_HD95_MM if math.isinf(hd95) else float(hd95)


def whole_tumour_metrics(prediction: np.ndarray, reference: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Official BraTS 2023+ whole-tumour metrics of one patient, on the volume's own grid.

    Args:
        prediction: Binary whole-tumour mask (bool or 0/1), 3D, on the grid of the volume as stored.
        reference: Ground-truth whole-tumour mask of the same shape.
        spacing: Voxel size in mm per array axis (e.g. ``nibabel.affines.voxel_sizes(affine)``).

    Returns:
        ``global_dice``, ``global_hd95`` (mm), ``lesionwise_dice``, ``lesionwise_hd95`` (mm; unmatched lesions count
        0 / 373), ``matched_lesion_dice``, ``matched_lesion_hd95`` (mm; the official glioma parser's
        ``lesionwise_*_mean``), ``lesion_f1`` and ``lesions_tp``, ``lesions_fp``, ``lesions_fn``. Every Dice and
        HD95 and ``lesion_f1`` are NaN when both masks are empty. See the module docstring for the definitions.

    Raises:
        ValueError: On masks that are not 3D, not binary or not of one shape, or a spacing that is not 3 positive
            numbers.

    Example:
        >>> import numpy as np
        >>> reference = np.zeros((32, 32, 32), dtype=bool)
        >>> reference[8:16, 8:16, 8:16] = True
        >>> prediction = reference.copy()
        >>> prediction[26:28, 26:28, 26:28] = True  # 8 false-positive voxels far from the tumour
        >>> scores = whole_tumour_metrics(prediction, reference, spacing=(1.0, 1.0, 1.0))
        >>> round(scores["global_dice"], 3), scores["lesionwise_dice"], scores["lesionwise_hd95"]
        (0.992, 0.5, 186.5)
        >>> scores["matched_lesion_dice"], scores["lesions_tp"], scores["lesions_fp"], scores["lesions_fn"]
        (1.0, 1, 1, 0)
    """
    prediction = _binary_volume(prediction, "prediction")
    reference = _binary_volume(reference, "reference")
    if prediction.shape != reference.shape:
        raise ValueError(f"prediction {prediction.shape} and reference {reference.shape} are not on one grid")
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != 3 or not all(s > 0 and math.isfinite(s) for s in spacing):
        raise ValueError(f"spacing must be 3 positive voxel sizes in mm, got {spacing}")

    if not prediction.any() and not reference.any():
        # panoptica: NaN for every score (no_instances_result); the official parser keeps it (module docstring).
        nan = math.nan
        return {
            "global_dice": nan,
            "global_hd95": nan,
            "lesionwise_dice": nan,
            "lesionwise_hd95": nan,
            "matched_lesion_dice": nan,
            "matched_lesion_hd95": nan,
            "lesion_f1": nan,
            "lesions_tp": 0,
            "lesions_fp": 0,
            "lesions_fn": 0,
        }

    # Scoring the masks' box instead of a 240 x 240 x 155 grid gives the same numbers (components, surfaces and the
    # distances between them all lie inside it) in a fraction of the time.
    crop = union_box(prediction, reference)
    prediction, reference = np.ascontiguousarray(prediction[crop]), np.ascontiguousarray(reference[crop])
    result = _evaluator().evaluate(
        prediction.astype(np.uint8), reference.astype(np.uint8), result_all=False, voxelspacing=spacing
    )["wt"]

    tp, fp, fn = int(result.tp), int(result.fp), int(result.fn)
    matched_dice, matched_hd95 = float(result.sq_dsc), _capped(float(result.sq_hd95))
    lesions = tp + fp + fn
    # Sum over the matched lesions (their mean times their number), and 0 / 373 for each unmatched one.
    matched_dice_sum = tp * matched_dice if tp else 0.0
    matched_hd95_sum = tp * matched_hd95 if tp else 0.0

    if prediction.any() and reference.any():
        from panoptica import Metric  # loaded by _evaluator() above

        global_hd95 = float(Metric.HD95(reference_arr=reference, prediction_arr=prediction, voxelspacing=spacing))
    else:
        global_hd95 = MAX_HD95_MM  # panoptica's global edge case: inf, written as 373 by the official parser
    return {
        "global_dice": float(result.global_bin_dsc),
        "global_hd95": global_hd95,
        "lesionwise_dice": matched_dice_sum / lesions,
        "lesionwise_hd95": (matched_hd95_sum + MAX_HD95_MM * (fp + fn)) / lesions,
        "matched_lesion_dice": matched_dice,
        "matched_lesion_hd95": matched_hd95,
        "lesion_f1": float(result.rq),
        "lesions_tp": tp,
        "lesions_fp": fp,
        "lesions_fn": fn,
    }
