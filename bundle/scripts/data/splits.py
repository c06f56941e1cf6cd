"""Cross-validation folds that never let a subject or a duplicate group cross from one fold to another.

BraTS is dealt by subject, the person scanned: all slices of a case stay together, and so do all cases (timepoints)
of one subject. BraTS 2023 and later name a case ``BraTS-GLI-00000-001``: subject ``BraTS-GLI-00000`` at timepoint
``001``; earlier releases (``BraTS20_Training_001``, ``BraTS2021_00000``) and MSD Task01 (``BRATS_001``) hold one
case per subject. The Kaggle set is dealt by duplicate group. The training / validation / test split itself is made
once, when the data are prepared (``scripts/dataset_splits.py`` at the repository root, by the same units).

Why not MONAI's ``partition_dataset_classes``: it deals items one by one, so slices of one subject and copies of one
image would land in different folds.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Mapping

import numpy as np

DEFAULT_FOLDS = 5

# BraTS 2023+ case names: "BraTS-" + cohort (GLI, MEN, MET, PED, SSA; BraTS 2024 adds two-part ones such as MEN-RT)
# + subject number + timepoint number.
_TIMEPOINT_CASE = re.compile(r"^(?P<subject>BraTS(?:-[A-Za-z]+)+-\d+)-(?P<timepoint>\d+)$")


def subject_of(case_id: str) -> str:
    """The subject (person) a BraTS or MSD case belongs to, read from the case name.

    ``BraTS-GLI-00000-001`` is subject ``BraTS-GLI-00000`` at timepoint ``001``. The cohort stays part of the
    subject: BraTS numbers each cohort on its own, so ``BraTS-GLI-00002`` and ``BraTS-MEN-00002`` are different
    people. Names without a timepoint (BraTS 2020 / 2021, MSD Task01) are their own subject.

    Args:
        case_id: case (folder) name, e.g. ``BraTS-GLI-00000-001``, ``BraTS2021_00000`` or ``BRATS_001``.

    Returns:
        The subject identifier.
    """
    match = _TIMEPOINT_CASE.match(case_id)
    return match["subject"] if match else case_id


def assign_folds(labels: Mapping[str, int], num_folds: int = DEFAULT_FOLDS, seed: int = 0) -> dict[str, int]:
    """Deal units (BraTS subjects, Kaggle duplicate groups) into ``num_folds`` cross-validation folds.

    Within each label the units are shuffled and dealt in turn, each label starting where the previous one stopped,
    so that every fold gets its share of each class and fold sizes differ by at most one unit. Units are sorted
    first: the same units and seed always give the same folds, whatever their order.

    Args:
        labels: unit -> the label to stratify by (e.g. the group's 4-class label; one value for no stratification).
        num_folds: K, at least 2 and at most the number of units (every fold validates something).
        seed: seed of the shuffle.

    Returns:
        Unit -> fold index, 0 to ``num_folds - 1``.

    Raises:
        ValueError: ``num_folds`` below 2 or above the number of units.
    """
    if not 2 <= num_folds <= len(labels):
        raise ValueError(f"{num_folds} folds of {len(labels)} units: K must be at least 2 and at most the units")
    by_label: dict[int, list[str]] = defaultdict(list)
    for unit in sorted(labels):
        by_label[labels[unit]].append(unit)
    rng = np.random.default_rng(seed)
    folds: dict[str, int] = {}
    for label in sorted(by_label):
        units = by_label[label]
        for unit in (units[index] for index in rng.permutation(len(units))):
            folds[unit] = len(folds) % num_folds
    return folds
