"""Duplicate grouping (exact and perceptual) and the patient / duplicate-group splits."""

from __future__ import annotations

import io
import time
from collections import Counter

import dataset_splits
import kaggle_duplicates
import numpy as np
import pytest
from PIL import Image


def textured(seed: int, size: int = 256) -> np.ndarray:
    """A head-like ellipse with smooth random internal structure, uint8."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:size, :size] / size
    field = np.zeros((size, size))
    for _ in range(6):
        fy, fx, phase = rng.uniform(1, 6), rng.uniform(1, 6), rng.uniform(0, 2 * np.pi)
        field += np.sin(2 * np.pi * (fy * rows + fx * cols) + phase)
    centre_y, centre_x = 0.5 + rng.normal(0, 0.03, 2)
    inside = ((rows - centre_y) / rng.uniform(0.35, 0.45)) ** 2 + ((cols - centre_x) / rng.uniform(0.3, 0.4)) ** 2 < 1
    return np.clip(np.where(inside, 120 + 25 * field, 0), 0, 255).astype(np.uint8)


def reencoded(array: np.ndarray, quality: int = 70, scale: float = 0.75) -> np.ndarray:
    """JPEG re-encode at lower quality after resizing: what re-publishing an image does to it."""
    image = Image.fromarray(array)
    image = image.resize((int(image.width * scale), int(image.height * scale)), Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer), dtype=np.float32)


def phash(array: np.ndarray) -> int:
    return kaggle_duplicates.perceptual_hash(np.asarray(array, dtype=np.float32))


def distance(a: int, b: int) -> int:
    return int(kaggle_duplicates.popcount64(np.array([a ^ b], dtype=np.uint64))[0])


# ----------------------------------------------------------------------------------------------------------------------
# Perceptual hash and pairwise distances


def fingerprint(array: np.ndarray, name: str) -> kaggle_duplicates.ImageHashes:
    """Fingerprints as the CLI computes them; ``name`` stands in for the byte and pixel hashes."""
    return kaggle_duplicates.image_hashes(np.asarray(array, dtype=np.float32), f"file-{name}", f"pixels-{name}")


COPIES = {
    "jpeg q70 + resize 0.75": reencoded,
    "resize 0.5": lambda a: reencoded(a, quality=95, scale=0.5),
    "brightness +25": lambda a: np.clip(a.astype(np.float32) + 25, 0, 255),
    "foreground brightness +25": lambda a: np.clip(a.astype(np.float32) + 25 * (a > 0), 0, 255),
    "intensity x0.8": lambda a: a * 0.8,
    "gamma 0.8": lambda a: 255 * (a / 255.0) ** 0.8,
}


@pytest.mark.parametrize("name", sorted(COPIES))
def test_near_copies_are_grouped(name: str) -> None:
    original = textured(1)
    copy = COPIES[name](original)
    assert distance(phash(original), phash(copy)) <= kaggle_duplicates.DEFAULT_NEAR_DISTANCE
    groups = kaggle_duplicates.group_duplicates([fingerprint(original, "a"), fingerprint(copy, "b")])
    assert groups.labels.tolist() == [0, 0] and groups.kinds == ["near"]


def test_distinct_images_are_not_merged() -> None:
    fingerprints = [fingerprint(textured(seed), str(seed)) for seed in range(60)]
    groups = kaggle_duplicates.group_duplicates(fingerprints)
    assert groups.count == 60 and groups.near_links == 0


def test_hash_candidates_need_correlated_thumbnails() -> None:
    """Two images with identical hashes but unrelated content stay apart; without signatures the hash decides."""
    a, b = fingerprint(textured(3), "a"), fingerprint(textured(4), "b")
    forged = kaggle_duplicates.ImageHashes(b.file_sha256, b.pixel_sha256, a.phash, b.signature)
    assert kaggle_duplicates.group_duplicates([a, forged]).count == 2
    assert kaggle_duplicates.group_duplicates([a, forged], min_correlation=-1).count == 1
    bare = [kaggle_duplicates.ImageHashes("x", "x1", a.phash), kaggle_duplicates.ImageHashes("y", "y1", a.phash)]
    groups = kaggle_duplicates.group_duplicates(bare)
    assert groups.count == 1 and groups.near_candidates == 1


def test_popcount_fallback_matches() -> None:
    values = np.random.default_rng(0).integers(0, 2**63, 1000, dtype=np.uint64) * np.uint64(2)
    expected = np.array([bin(int(value)).count("1") for value in values])
    assert np.array_equal(kaggle_duplicates.popcount64(values), expected)
    table = kaggle_duplicates._BYTE_POPCOUNT[values.view(np.uint8).reshape(-1, 8)].sum(axis=1)
    assert np.array_equal(table, expected)


def test_near_pairs_matches_brute_force_across_chunks() -> None:
    rng = np.random.default_rng(1)
    base = rng.integers(0, 2**64, 50, dtype=np.uint64)
    flips = np.uint64(1) << rng.integers(0, 64, 50).astype(np.uint64)
    hashes = np.concatenate([base, base ^ flips, base[:5]])
    pairs = kaggle_duplicates.near_pairs(hashes, 2, chunk_rows=7)
    brute = {
        (i, j)
        for i in range(len(hashes))
        for j in range(i + 1, len(hashes))
        if bin(int(hashes[i]) ^ int(hashes[j])).count("1") <= 2
    }
    assert {tuple(pair) for pair in pairs.tolist()} == brute
    assert len(kaggle_duplicates.near_pairs(hashes, -1)) == 0


def test_grouping_7000_hashes_takes_seconds() -> None:
    hashes = [
        kaggle_duplicates.ImageHashes(str(i), str(i), int(code))
        for i, code in enumerate(np.random.default_rng(2).integers(0, 2**64, 7023, dtype=np.uint64))
    ]
    started = time.perf_counter()
    groups = kaggle_duplicates.group_duplicates(hashes, kaggle_duplicates.DEFAULT_NEAR_DISTANCE)
    assert time.perf_counter() - started < 10
    assert groups.count == 7023


# ----------------------------------------------------------------------------------------------------------------------
# Grouping


def test_groups_join_exact_and_near_copies_and_keep_others_apart() -> None:
    a, b, c = textured(10), textured(11), textured(12)
    fingerprints = [
        kaggle_duplicates.ImageHashes("fa", "pa", phash(a)),
        kaggle_duplicates.ImageHashes("fb", "pb", phash(b)),
        kaggle_duplicates.ImageHashes("fa2", "pa", phash(a)),  # re-saved losslessly: same pixels, other bytes
        kaggle_duplicates.ImageHashes("fc", "pc", phash(c)),
        kaggle_duplicates.ImageHashes("fb2", "pb2", phash(reencoded(b))),  # re-encoded: near copy
        kaggle_duplicates.ImageHashes("fa", "pa", phash(a)),  # byte copy
    ]
    groups = kaggle_duplicates.group_duplicates(fingerprints)
    assert groups.labels.tolist() == [0, 1, 0, 2, 1, 0]
    assert groups.kinds == ["exact", "near", "single"]
    assert groups.sizes().tolist() == [3, 2, 1]
    assert groups.exact_links == 2 and groups.near_links == 1
    off = kaggle_duplicates.group_duplicates(fingerprints, max_distance=-1)
    assert off.labels.tolist() == [0, 1, 0, 2, 3, 0]


def test_near_links_chain_into_one_group() -> None:
    base = 0xFFFF_0000_FFFF_0000
    chain = [base, base ^ 0b111, base ^ 0b111111, base ^ 0b111111111]
    fingerprints = [kaggle_duplicates.ImageHashes(str(i), str(i), code) for i, code in enumerate(chain)]
    assert kaggle_duplicates.group_duplicates(fingerprints, max_distance=3).labels.tolist() == [0, 0, 0, 0]
    assert kaggle_duplicates.group_duplicates([], 3).count == 0


# ----------------------------------------------------------------------------------------------------------------------
# Patient split


def test_patient_split_is_deterministic_and_order_free() -> None:
    patients = [f"BraTS2021_{i:05d}" for i in range(100)]
    first = dataset_splits.split_patients(patients, seed=3)
    assert first == dataset_splits.split_patients(list(reversed(patients)), seed=3)
    assert first != dataset_splits.split_patients(patients, seed=4)
    assert Counter(first.values()) == {"training": 70, "validation": 15, "test": 15}


@pytest.mark.parametrize(
    ("count", "expected"), [(1, (1, 0, 0)), (2, (2, 0, 0)), (3, (1, 1, 1)), (10, (6, 2, 2)), (20, (14, 3, 3))]
)
def test_small_patient_counts(count: int, expected: tuple[int, int, int]) -> None:
    assignment = dataset_splits.split_patients([f"p{i}" for i in range(count)])
    counts = Counter(assignment.values())
    assert (counts["training"], counts["validation"], counts["test"]) == expected


# Ten cases named by the pattern, numbered from its first value, and the held-out cases of the split the code before
# subject grouping (commit 5301ccf) gave them for the seed; every other case went to training.
SPLITS_BEFORE_SUBJECTS = {
    ("BraTS2021_{:05d}", 0, 0): {
        "BraTS2021_00002": "test",
        "BraTS2021_00004": "validation",
        "BraTS2021_00006": "validation",
        "BraTS2021_00007": "test",
    },
    ("BraTS-GLI-{:05d}-000", 0, 0): {
        "BraTS-GLI-00002-000": "test",
        "BraTS-GLI-00004-000": "validation",
        "BraTS-GLI-00006-000": "validation",
        "BraTS-GLI-00007-000": "test",
    },
    ("BRATS_{:03d}", 1, 5): {
        "BRATS_002": "test",
        "BRATS_004": "test",
        "BRATS_007": "validation",
        "BRATS_008": "validation",
    },
}


@pytest.mark.parametrize(("pattern", "first", "seed"), sorted(SPLITS_BEFORE_SUBJECTS))
def test_datasets_without_timepoints_split_exactly_as_before(pattern: str, first: int, seed: int) -> None:
    cases = [pattern.format(number) for number in range(first, first + 10)]
    held_out = SPLITS_BEFORE_SUBJECTS[pattern, first, seed]
    assert dataset_splits.split_cases(cases, seed=seed) == {case: held_out.get(case, "training") for case in cases}


def test_one_timepoint_per_subject_gives_the_case_level_split() -> None:
    """BraTS 2023 sets where every subject has one scan split as the case names always did, for any seed."""
    cases = [f"BraTS-GLI-{i:05d}-000" for i in range(0, 90, 3)]
    for seed in range(20):
        assert dataset_splits.split_cases(cases, seed=seed) == dataset_splits.split_patients(cases, seed=seed)


@pytest.mark.parametrize(
    ("case", "subject"),
    [
        ("BraTS-GLI-00000-000", "BraTS-GLI-00000"),
        ("BraTS-GLI-00000-001", "BraTS-GLI-00000"),
        ("BraTS-GLI-01234-102", "BraTS-GLI-01234"),
        ("BraTS-MEN-00012-002", "BraTS-MEN-00012"),
        ("BraTS-SSA-00041-000", "BraTS-SSA-00041"),
        ("BraTS-PED-00001-000", "BraTS-PED-00001"),
        ("BraTS-MET-00086-001", "BraTS-MET-00086"),
        ("BraTS-MEN-RT-0010-1", "BraTS-MEN-RT-0010"),
        # One case per subject: the name is the subject.
        ("BraTS20_Training_001", "BraTS20_Training_001"),
        ("BraTS20_Validation_001", "BraTS20_Validation_001"),
        ("BraTS2021_00000", "BraTS2021_00000"),
        ("BRATS_001", "BRATS_001"),
        ("BraTS-GLI-00000", "BraTS-GLI-00000"),
    ],
)
def test_subject_is_read_from_the_case_name(case: str, subject: str) -> None:
    assert dataset_splits.subject_of(case) == subject


def test_group_by_subject_collects_every_timepoint_and_keeps_cohorts_apart() -> None:
    cases = ["BraTS-GLI-00002-001", "BraTS-MEN-00002-000", "BraTS-GLI-00000-000", "BraTS-GLI-00002-000"]
    assert dataset_splits.group_by_subject([*cases, cases[0]]) == {
        "BraTS-GLI-00000": ["BraTS-GLI-00000-000"],
        "BraTS-GLI-00002": ["BraTS-GLI-00002-000", "BraTS-GLI-00002-001"],
        "BraTS-MEN-00002": ["BraTS-MEN-00002-000"],
    }
    assert dataset_splits.group_by_subject(["BraTS2021_00001", "BraTS2021_00000"]) == {
        "BraTS2021_00000": ["BraTS2021_00000"],
        "BraTS2021_00001": ["BraTS2021_00001"],
    }


def timepoint_cases(subjects: int, seed: int = 0) -> dict[str, list[str]]:
    """Subject -> its cases: one to three timepoints each, as in a longitudinal BraTS 2023+ cohort."""
    counts = np.random.default_rng(seed).integers(1, 4, subjects)
    return {
        f"BraTS-GLI-{i:05d}": [f"BraTS-GLI-{i:05d}-{t:03d}" for t in range(count)] for i, count in enumerate(counts)
    }


def split_of_subjects(assignment: dict[str, str], subjects: dict[str, list[str]]) -> dict[str, set[str]]:
    return {subject: {assignment[case] for case in cases} for subject, cases in subjects.items()}


def test_every_timepoint_of_a_subject_lands_in_one_split() -> None:
    subjects = timepoint_cases(20)
    cases = [case for group in subjects.values() for case in group]
    assert len(cases) > 30
    for seed in range(10):
        assignment = dataset_splits.split_cases(cases, seed=seed)
        assert set(assignment) == set(cases)
        found = split_of_subjects(assignment, subjects)
        assert all(len(split_names) == 1 for split_names in found.values()), seed
        # The fractions are shares of subjects, not of cases.
        counts = Counter(split_names.pop() for split_names in found.values())
        assert counts == {"training": 14, "validation": 3, "test": 3}
    # The data can catch the fault: splitting cases one by one tears subjects apart.
    case_level = [split_of_subjects(dataset_splits.split_patients(cases, seed=seed), subjects) for seed in range(10)]
    assert all(any(len(split_names) > 1 for split_names in found.values()) for found in case_level)


def test_subject_split_is_deterministic_and_order_free() -> None:
    cases = [case for group in timepoint_cases(20, seed=1).values() for case in group]
    first = dataset_splits.split_cases(cases, seed=3)
    assert first == dataset_splits.split_cases(list(reversed(cases)), seed=3)
    assert first != dataset_splits.split_cases(cases, seed=4)


def test_zero_fraction_is_respected_and_bad_fractions_fail() -> None:
    assignment = dataset_splits.split_patients([f"p{i}" for i in range(10)], fractions=(0.8, 0.0, 0.2))
    assert "validation" not in assignment.values()
    for bad in [(0.5, 0.5, 0.5), (0.0, 0.5, 0.5), (0.7, -0.1, 0.4), (1.0, 0.0)]:
        with pytest.raises(ValueError):
            dataset_splits.check_fractions(bad)


# ----------------------------------------------------------------------------------------------------------------------
# Kaggle split by duplicate group


def kaggle_items() -> list[dataset_splits.KaggleItem]:
    items = []
    for cls4 in range(4):
        for i in range(20):
            group = f"g{cls4}_{i}"
            items.append(dataset_splits.KaggleItem(f"Training/c{cls4}/tr_{i:02d}.jpg", "Training", cls4, group))
            if i < 4:
                # A copy of the training image in Testing: the whole group must go to test.
                items.append(dataset_splits.KaggleItem(f"Testing/c{cls4}/te_{i:02d}.jpg", "Testing", cls4, group))
            if 10 <= i < 13:
                # A second Training copy: the group is one unit wherever it lands.
                items.append(
                    dataset_splits.KaggleItem(f"Training/c{cls4}/tr_{i:02d}_copy.jpg", "Training", cls4, group)
                )
        items.append(dataset_splits.KaggleItem(f"Testing/c{cls4}/te_only.jpg", "Testing", cls4, f"t{cls4}"))
    return items


def test_kaggle_split_moves_groups_touching_testing_and_keeps_one_copy() -> None:
    items = kaggle_items()
    assignment = dataset_splits.split_kaggle(items, val_fraction=0.25, seed=0)
    group_split: dict[str, set[str]] = {}
    for item in items:
        group_split.setdefault(item.group, set()).add(assignment[item.key].split)
    assert all(len(found) == 1 for found in group_split.values())
    for item in items:
        result = assignment[item.key]
        if item.group.startswith("t") or int(item.group.split("_")[1]) < 4:
            assert result.split == "test"
            assert result.kept == (item.folder == "Testing")
            assert result.moved == (item.folder == "Training")
    kept_groups = Counter(
        item.group for item in items if assignment[item.key].kept and assignment[item.key].split != "training"
    )
    assert set(kept_groups.values()) == {1}
    training_keys = [item.key for item in items if assignment[item.key].split == "training"]
    assert all(assignment[key].kept for key in training_keys)
    # Validation: a quarter of the 16 Training-only groups of each class.
    val_labels = Counter(
        item.cls4 for item in items if assignment[item.key].split == "validation" and assignment[item.key].kept
    )
    assert val_labels == {0: 4, 1: 4, 2: 4, 3: 4}


def test_kaggle_split_is_deterministic() -> None:
    items = kaggle_items()
    assert dataset_splits.split_kaggle(items, 0.25, seed=1) == dataset_splits.split_kaggle(
        list(reversed(items)), 0.25, seed=1
    )
    assert dataset_splits.split_kaggle(items, 0.25, seed=1) != dataset_splits.split_kaggle(items, 0.25, seed=2)


def test_check_disjoint_names_the_crossing_member() -> None:
    dataset_splits.check_disjoint({"training": ["a", "b", "b"], "test": ["c"]}, "patient")
    with pytest.raises(dataset_splits.LeakageError, match="patient b in training and test"):
        dataset_splits.check_disjoint({"training": ["a", "b"], "test": ["b"]}, "patient")
    # Two timepoints of one subject: distinct cases, one subject.
    cases = {"training": ["BraTS-GLI-00001-000"], "test": ["BraTS-GLI-00001-001"]}
    dataset_splits.check_disjoint(cases, "patient")
    subjects = {split: [dataset_splits.subject_of(case) for case in names] for split, names in cases.items()}
    with pytest.raises(dataset_splits.LeakageError, match="subject BraTS-GLI-00001 in training and test"):
        dataset_splits.check_disjoint(subjects, "subject")
