"""Training / validation / test splits that never let a subject or a duplicate group cross from one split to another.

Made once by ``scripts/prepare_data.py``. BraTS is split by subject (:func:`scripts.data.splits.subject_of`, which
the bundle's cross-validation folds use too): all slices of a case stay together, and so do all cases (timepoints)
of one subject. The Kaggle set is split by duplicate group: its official Testing folder is the test split, and any
group with a copy in Testing goes wholly to test, because the published folders share duplicates and a model would
otherwise be tested on images it trained on.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from scripts.data.splits import subject_of

SPLITS: tuple[str, ...] = ("training", "validation", "test")
DEFAULT_FRACTIONS: tuple[float, float, float] = (0.7, 0.15, 0.15)
DEFAULT_KAGGLE_VAL_FRACTION = 0.15
TESTING_FOLDER = "Testing"


class LeakageError(RuntimeError):
    """A case, a subject or a duplicate group appears in more than one split."""


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
