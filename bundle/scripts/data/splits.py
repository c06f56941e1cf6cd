"""Training / validation / test splits that never let a subject or a duplicate group cross from one split to another.

BraTS is split by subject, the person scanned: all slices of a case stay together, and so do all cases (timepoints)
of one subject. BraTS 2023 and later name a case ``BraTS-GLI-00000-001``: subject ``BraTS-GLI-00000`` at timepoint
``001``; earlier releases (``BraTS20_Training_001``, ``BraTS2021_00000``) and MSD Task01 (``BRATS_001``) hold one
case per subject. The Kaggle set is split by duplicate group: its official Testing folder is the test split, and any
group with a copy in Testing goes wholly to test, because the published folders share duplicates and a model would
otherwise be tested on images it trained on.

Cross-validation folds (:func:`assign_folds`) follow the same units: whole subjects, whole duplicate groups.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

SPLITS: tuple[str, ...] = ("training", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
DEFAULT_KAGGLE_VAL_FRACTION = 0.15
DEFAULT_FOLDS = 5
TESTING_FOLDER = "Testing"


# BraTS 2023+ case names: "BraTS-" + cohort (GLI, MEN, MET, PED, SSA; BraTS 2024 adds two-part ones such as MEN-RT)
# + subject number + timepoint number.
_TIMEPOINT_CASE = re.compile(r"^(?P<subject>BraTS(?:-[A-Za-z]+)+-\d+)-(?P<timepoint>\d+)$")


class LeakageError(RuntimeError):
    """A case, a subject or a duplicate group appears in more than one split."""


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


def group_by_subject(case_ids: Iterable[str]) -> dict[str, list[str]]:
    """Collect the cases (timepoints) of each subject.

    Args:
        case_ids: case names (duplicates are ignored).

    Returns:
        Subject -> its cases, both sorted by name.
    """
    groups: dict[str, list[str]] = defaultdict(list)
    for case_id in sorted(set(case_ids)):
        groups[subject_of(case_id)].append(case_id)
    return dict(sorted(groups.items()))


def check_fractions(fractions: Sequence[float]) -> tuple[float, float, float]:
    """Validate training / validation / test fractions.

    Args:
        fractions: three non-negative numbers summing to 1, training above 0.

    Returns:
        The fractions as a tuple.

    Raises:
        ValueError: they do not meet those conditions.
    """
    if len(fractions) != 3:
        raise ValueError(f"expected 3 split fractions (training validation test), got {len(fractions)}")
    train, val, test = (float(value) for value in fractions)
    if min(train, val, test) < 0 or abs(train + val + test - 1.0) > 1e-6 or train <= 0:
        raise ValueError(f"split fractions must be >= 0, sum to 1 and give training a share; got {fractions}")
    return train, val, test


def split_patients(
    patients: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Assign whole patients (subjects) to training, validation and test.

    The order of the input does not matter (patients are sorted first), so the same seed and patient set always give
    the same split. With three or more patients, every split with a non-zero fraction gets at least one patient.
    :func:`split_cases` calls this with subjects, so that a subject's timepoints stay together.

    Args:
        patients: patient (subject) identifiers (unique).
        fractions: training, validation and test shares.
        seed: seed of the shuffle.

    Returns:
        Patient -> split name.
    """
    _, val_fraction, test_fraction = check_fractions(fractions)
    ordered = sorted(set(patients))
    count = len(ordered)
    n_val, n_test = round(count * val_fraction), round(count * test_fraction)
    if count >= 3:
        n_val = max(n_val, 1) if val_fraction > 0 else 0
        n_test = max(n_test, 1) if test_fraction > 0 else 0
    # Training keeps at least one patient; the held-out splits give way, test last.
    while count - n_val - n_test < 1 and (n_val or n_test):
        if n_val >= n_test:
            n_val -= 1
        else:
            n_test -= 1
    shuffled = [ordered[index] for index in np.random.default_rng(seed).permutation(count)]
    names = ["validation"] * n_val + ["test"] * n_test + ["training"] * (count - n_val - n_test)
    return dict(zip(shuffled, names, strict=True))


def split_cases(
    case_ids: Iterable[str], fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> dict[str, str]:
    """Assign BraTS / MSD cases to training, validation and test, every timepoint of a subject to the same split.

    The fractions are shares of subjects (see :func:`split_patients`). Where each case is its own subject (BraTS
    2020 / 2021, MSD, BraTS 2023 with one timepoint per subject) the split is the one :func:`split_patients` gives
    the case names: subjects sort in the same order as their cases, so the shuffle assigns the same places.

    Args:
        case_ids: case names (see :func:`subject_of`).
        fractions: training, validation and test shares of the subjects.
        seed: seed of the shuffle.

    Returns:
        Case -> split name.
    """
    groups = group_by_subject(case_ids)
    split_of_subject = split_patients(list(groups), fractions, seed)
    return {case_id: split_of_subject[subject] for subject, cases in groups.items() for case_id in cases}


@dataclass(frozen=True)
class KaggleItem:
    """What the Kaggle split needs to know about one image.

    Attributes:
        key: unique name of the image (its path relative to the Kaggle root).
        folder: ``Training`` or ``Testing``.
        cls4: 4-class label (used to stratify validation).
        group: duplicate group identifier.
    """

    key: str
    folder: str
    cls4: int
    group: str


@dataclass(frozen=True)
class KaggleAssignment:
    """Where one Kaggle image goes.

    Attributes:
        split: training, validation or test.
        kept: False for the extra copies of a duplicate group in validation or test, which are left out so each
            distinct image is scored once.
        moved: True for a Training-folder image sent to test because its group has a copy in Testing.
    """

    split: str
    kept: bool
    moved: bool


def split_kaggle(
    items: Sequence[KaggleItem], val_fraction: float = DEFAULT_KAGGLE_VAL_FRACTION, seed: int = 0
) -> dict[str, KaggleAssignment]:
    """Split Kaggle images by duplicate group.

    Groups with any image in the Testing folder form the test split. Validation takes ``val_fraction`` of the
    remaining groups in each 4-class label (the label of the group's representative), so class balance holds.
    Validation and test keep one representative per group: the first Testing image by key for test groups, the first
    image by key otherwise. Training keeps every copy (extra copies only reweight the loss).

    Args:
        items: every image, with its group.
        val_fraction: share of the Training-only groups (per class) that goes to validation.
        seed: seed of the choice of validation groups.

    Returns:
        Image key -> assignment.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"the Kaggle validation fraction must be in [0, 1); got {val_fraction}")
    members: dict[str, list[KaggleItem]] = defaultdict(list)
    for item in sorted(items, key=lambda item: item.key):
        members[item.group].append(item)
    test_groups = {group for group, group_items in members.items() if _touches_testing(group_items)}
    representative = {group: _representative(group_items) for group, group_items in members.items()}
    val_groups = _stratified_validation_groups(
        {group: representative[group].cls4 for group in members if group not in test_groups}, val_fraction, seed
    )
    assignments: dict[str, KaggleAssignment] = {}
    for group, group_items in members.items():
        split = "test" if group in test_groups else "validation" if group in val_groups else "training"
        for item in group_items:
            kept = split == "training" or item is representative[group]
            moved = split == "test" and item.folder != TESTING_FOLDER
            assignments[item.key] = KaggleAssignment(split=split, kept=kept, moved=moved)
    return assignments


def _touches_testing(group_items: Sequence[KaggleItem]) -> bool:
    return any(item.folder == TESTING_FOLDER for item in group_items)


def _representative(group_items: Sequence[KaggleItem]) -> KaggleItem:
    """Prefer an image from the official Testing folder, so the test split stays made of official test images."""
    testing = [item for item in group_items if item.folder == TESTING_FOLDER]
    return min(testing or group_items, key=lambda item: item.key)


def _stratified_validation_groups(group_labels: Mapping[str, int], fraction: float, seed: int) -> set[str]:
    by_label: dict[int, list[str]] = defaultdict(list)
    for group in sorted(group_labels):
        by_label[group_labels[group]].append(group)
    rng = np.random.default_rng(seed)
    chosen: set[str] = set()
    for label in sorted(by_label):
        groups = by_label[label]
        count = round(len(groups) * fraction)
        if fraction > 0 and len(groups) >= 2:
            # Every class is represented in validation and keeps at least one group for training.
            count = min(max(count, 1), len(groups) - 1)
        chosen.update(groups[index] for index in rng.permutation(len(groups))[:count])
    return chosen


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


def check_disjoint(members_by_split: Mapping[str, Iterable[str]], what: str) -> None:
    """Fail if any identifier (case, subject or duplicate group) appears in two splits.

    Args:
        members_by_split: split name -> identifiers of the items in it.
        what: what the identifiers are, for the message (``patient``, ``subject``, ``duplicate group``).

    Raises:
        LeakageError: naming the identifiers and the splits they cross.
    """
    seen: dict[str, str] = {}
    crossing: list[str] = []
    for split, members in members_by_split.items():
        for member in set(members):
            if member in seen and seen[member] != split:
                crossing.append(f"{what} {member} in {seen[member]} and {split}")
            seen.setdefault(member, split)
    if crossing:
        raise LeakageError("; ".join(sorted(crossing)[:20]))
