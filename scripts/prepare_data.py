#!/usr/bin/env python
"""Prepare BraTS volumes and Kaggle Brain Tumor MRI images for the bundle.

Checks every input first (all problems reported together, nothing written), then writes 2D slices / images as
``.npy`` arrays, a MONAI datalist, per-patient records and a summary into ``--out``. The output folder is built
beside the target and renamed into place only when complete, so a failed run never leaves half a data set behind.
See docs/data.md for the layouts, the preprocessing and the prepared-folder contract.

Example::

    python scripts/prepare_data.py --brats data/BraTS2021 --kaggle data/kaggle --out data/prepared
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
import zlib
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# The bundle's package is `scripts.*` with bundle/ on sys.path, as MONAI's bundle runner sets it up. The
# preparation's own modules (dataset_splits, kaggle_duplicates) are beside this script, on sys.path as its folder.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "bundle") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "bundle"))

import dataset_splits  # noqa: E402
import kaggle_duplicates  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from scripts.data import OPTIONS_FILE, PRESET_SIZES, images  # noqa: E402
from scripts.data.volumes import MODALITIES, DataError, VolumeCase, check_case, detect_layout, find_cases  # noqa: E402
from scripts.data.volumes import load_case as load_volume_case  # noqa: E402
from scripts.files import file_sha256  # noqa: E402

# Bumped whenever the preprocessing changes what is written, so an older prepared folder is rebuilt, not reused.
# 2: BraTS split by subject (all timepoints of a BraTS 2023+ subject in one split); "subject" recorded per case.
PREPARE_VERSION = 2
DATALIST_KEYS = tuple(f"{source}_{split}" for source in ("brats", "kaggle") for split in dataset_splits.SPLITS)
SUMMARY_FILE, DATALIST_FILE, PATIENTS_FILE = "summary.json", "datalist.json", "patients.json"
# Audit file (not read by the bundle): every duplicate group with its members and where each one went.
DUPLICATES_FILE = "duplicates.json"
# Largest finite float16; z-scored intensities sit far below it, the clip only guards against a corrupt outlier.
FLOAT16_MAX = float(np.finfo(np.float16).max)
NEXT_COMMAND = (
    "python scripts/train.py --config_file \"['bundle/configs/train.yaml','{preset}']\" "
    "--bundle_root bundle --dataset_dir {out}{extra}"
)
# Label-conflict groups kept in summary.json and skipped files printed (the counts are always complete).
LIST_LIMIT = 100


class PreflightError(Exception):
    """The inputs have problems; ``lines`` holds one line per problem (file + problem)."""

    def __init__(self, lines: Sequence[str]) -> None:
        super().__init__(f"{len(lines)} problem(s) in the input data")
        self.lines = list(lines)


@dataclass(frozen=True)
class Options:
    """Command-line options (see ``parse_args``)."""

    brats: Path | None
    kaggle: Path | None
    out: Path
    size: int
    modalities: tuple[str, ...]
    min_brain_fraction: float
    min_tumour_pixels: int
    split: tuple[float, float, float]
    kaggle_val_fraction: float
    near_duplicate_distance: int
    near_duplicate_correlation: float
    seed: int
    workers: int
    force: bool

    def recorded(self) -> dict[str, Any]:
        """The options that change the output (not --out, --workers or --force), as JSON values."""
        return {
            "brats": str(self.brats) if self.brats else None,
            "kaggle": str(self.kaggle) if self.kaggle else None,
            "size": self.size,
            "modalities": list(self.modalities),
            "min_brain_fraction": self.min_brain_fraction,
            "min_tumour_pixels": self.min_tumour_pixels,
            "split": list(self.split),
            "kaggle_val_fraction": self.kaggle_val_fraction,
            "near_duplicate_distance": self.near_duplicate_distance,
            "near_duplicate_correlation": self.near_duplicate_correlation,
            "seed": self.seed,
        }


@dataclass
class Plan:
    """What pre-flight found: the work to do and what is left out."""

    layout: str | None = None
    cases: list[VolumeCase] = field(default_factory=list)
    skipped_cases: list[dict[str, str]] = field(default_factory=list)
    kaggle: images.KaggleScan | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> Options:
    """Parse and validate the command line."""
    parser = argparse.ArgumentParser(
        description="Prepare BraTS slices and Kaggle Brain Tumor MRI images for the bundle (see docs/data.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--brats", type=Path, help="BraTS 2020/2021/2023 or MSD Task01 folder")
    parser.add_argument("--kaggle", type=Path, help="Kaggle Brain Tumor MRI folder holding Training/ and Testing/")
    parser.add_argument("--out", type=Path, required=True, help="prepared-data folder to write")
    parser.add_argument("--size", type=int, default=256, help="side of the square slices / images")
    parser.add_argument("--modalities", default="flair", help=f"comma-separated BraTS channels from {MODALITIES}")
    parser.add_argument("--min-brain-fraction", type=float, default=0.05, help="drop slices with less brain")
    parser.add_argument(
        "--min-tumour-pixels",
        type=int,
        default=1,
        help="tumour pixels (at the prepared --size) a slice needs to be labelled tumour (cls 1)",
    )
    parser.add_argument(
        "--split",
        type=float,
        nargs=3,
        default=list(dataset_splits.DEFAULT_FRACTIONS),
        metavar=("TRAIN", "VAL", "TEST"),
        help="BraTS shares of subjects (every timepoint of a subject goes to the same split)",
    )
    parser.add_argument(
        "--kaggle-val-fraction",
        type=float,
        default=dataset_splits.DEFAULT_KAGGLE_VAL_FRACTION,
        help="share of Training-only duplicate groups (per class) moved to validation",
    )
    parser.add_argument(
        "--near-duplicate-distance",
        type=int,
        default=kaggle_duplicates.DEFAULT_NEAR_DISTANCE,
        help="largest pHash Hamming distance (of 64 bits) making two images near-duplicate candidates; -1: off",
    )
    parser.add_argument(
        "--near-duplicate-correlation",
        type=float,
        default=kaggle_duplicates.DEFAULT_MIN_CORRELATION,
        help="correlation of 64x64 thumbnails a candidate pair needs to count as near duplicates (-1: any)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits")
    parser.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--force", action="store_true", help="rebuild even when the output is up to date")
    args = parser.parse_args(argv)

    if args.brats is None and args.kaggle is None:
        parser.error("give --brats, --kaggle or both")
    modalities = tuple(name.strip() for name in args.modalities.split(",") if name.strip())
    unknown = [name for name in modalities if name not in MODALITIES]
    if not modalities or unknown or len(set(modalities)) != len(modalities):
        parser.error(f"--modalities must be distinct names from {','.join(MODALITIES)}; got {args.modalities!r}")
    try:
        fractions = dataset_splits.check_fractions(args.split)
    except ValueError as error:
        parser.error(f"--split: {error}")
    checks = [
        (args.size >= 16, "--size must be at least 16"),
        (0 <= args.min_brain_fraction < 1, "--min-brain-fraction must be in [0, 1)"),
        (args.min_tumour_pixels >= 1, "--min-tumour-pixels must be at least 1"),
        (0 <= args.kaggle_val_fraction < 1, "--kaggle-val-fraction must be in [0, 1)"),
        (-1 <= args.near_duplicate_distance <= 64, "--near-duplicate-distance must be in [-1, 64]"),
        (-1 <= args.near_duplicate_correlation <= 1, "--near-duplicate-correlation must be in [-1, 1]"),
        (args.workers >= 1, "--workers must be at least 1"),
    ]
    for ok, message in checks:
        if not ok:
            parser.error(message)
    return Options(
        brats=args.brats.expanduser().resolve() if args.brats else None,
        kaggle=args.kaggle.expanduser().resolve() if args.kaggle else None,
        out=args.out.expanduser().resolve(),
        size=args.size,
        modalities=modalities,
        min_brain_fraction=args.min_brain_fraction,
        min_tumour_pixels=args.min_tumour_pixels,
        split=fractions,
        kaggle_val_fraction=args.kaggle_val_fraction,
        near_duplicate_distance=args.near_duplicate_distance,
        near_duplicate_correlation=args.near_duplicate_correlation,
        seed=args.seed,
        workers=args.workers,
        force=args.force,
    )


# ----------------------------------------------------------------------------------------------------------------------
# Output folder: location checks, fingerprint, no-op test, atomic replacement


def check_output_location(options: Options) -> None:
    """Refuse outputs that would overwrite inputs or a folder this script did not write."""
    out = options.out
    for name, root in (("--brats", options.brats), ("--kaggle", options.kaggle)):
        if root is not None and (out == root or out in root.parents or root in out.parents):
            raise PreflightError([f"{out}: --out must lie outside {name} {root} (and not contain it)"])
    if out.exists() and not out.is_dir():
        raise PreflightError([f"{out}: --out exists and is not a folder"])
    if out.is_dir() and any(out.iterdir()) and not (out / OPTIONS_FILE).is_file():
        raise PreflightError(
            [
                f"{out}: --out is a non-empty folder without {OPTIONS_FILE}; it was not written by this script, "
                "so it is not replaced: choose another --out or empty it"
            ]
        )


def fingerprint(root: Path) -> dict[str, Any]:
    """File list + sizes + modification times of an input folder, hashed: changes whenever any input file does."""
    digest = hashlib.sha256()
    count = total = 0
    for directory, folders, files in os.walk(root):
        folders.sort()
        for name in sorted(files):
            path = Path(directory, name)
            stat = path.stat()
            digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
            count += 1
            total += stat.st_size
    return {"path": str(root), "files": count, "bytes": total, "sha256": digest.hexdigest()}


def build_record(options: Options) -> dict[str, Any]:
    """What prepare_options.json holds: version, options and input fingerprints."""
    inputs = {
        name: fingerprint(root) if root.is_dir() else None
        for name, root in (("brats", options.brats), ("kaggle", options.kaggle))
        if root is not None
    }
    return {"prepare_version": PREPARE_VERSION, "options": options.recorded(), "inputs": inputs}


def is_up_to_date(out: Path, record: dict[str, Any]) -> bool:
    """True when ``out`` is a complete prepared folder made from the same inputs with the same options."""
    try:
        previous = json.loads((out / OPTIONS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return False
    complete = all((out / name).is_file() for name in (SUMMARY_FILE, DATALIST_FILE, PATIENTS_FILE))
    return complete and previous == record


def partial_dir(out: Path) -> Path:
    """Temporary sibling the new output is built in."""
    return out.with_name(f"{out.name}.partial-{os.getpid()}")


def remove_abandoned_builds(out: Path) -> None:
    """Delete temporary siblings left by runs that were killed (their process no longer exists)."""
    if not out.parent.is_dir():
        return
    for pattern in (f"{out.name}.partial-*", f"{out.name}.old-*"):
        for path in out.parent.glob(pattern):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and not _process_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def replace_output(partial: Path, out: Path) -> None:
    """Put the finished build in place; the previous output is removed only once the new one is there."""
    if out.exists():
        old = out.with_name(f"{out.name}.old-{os.getpid()}")
        out.rename(old)
        partial.rename(out)
        shutil.rmtree(old)
    else:
        partial.rename(out)


# ----------------------------------------------------------------------------------------------------------------------
# Parallel map with a progress bar


def run_tasks(function: Callable[[Any], Any], tasks: Sequence[Any], workers: int, description: str) -> list[Any]:
    """Apply ``function`` to every task (in worker processes when useful); results come back in task order."""
    results: list[Any] = [None] * len(tasks)
    progress = tqdm(total=len(tasks), desc=description, unit="item", file=sys.stderr, dynamic_ncols=True)
    indexed = list(enumerate(tasks))
    if workers <= 1 or len(tasks) <= 1:
        for index, task in indexed:
            results[index] = function(task)
            progress.update()
    else:
        chunk = max(1, min(32, len(tasks) // (workers * 8)))
        with multiprocessing.Pool(min(workers, len(tasks)), initializer=_limit_worker_threads) as pool:
            for index, result in pool.imap_unordered(_IndexedCall(function), indexed, chunksize=chunk):
                results[index] = result
                progress.update()
    progress.close()
    return results


def _limit_worker_threads() -> None:
    """One compute thread per worker process: the processes already share out the cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


class _IndexedCall:
    """Picklable wrapper that keeps each result's position (imap_unordered returns them as they finish)."""

    def __init__(self, function: Callable[[Any], Any]) -> None:
        self.function = function

    def __call__(self, indexed: tuple[int, Any]) -> tuple[int, Any]:
        index, task = indexed
        return index, self.function(task)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-flight


def preflight(options: Options) -> Plan:
    """Check every input before any long work; raise PreflightError listing all problems found."""
    plan = Plan()
    errors: list[str] = []
    if options.brats is not None:
        errors += _preflight_brats(options, plan)
    if options.kaggle is not None:
        plan.kaggle = images.scan_kaggle(options.kaggle)
        errors += plan.kaggle.errors
    if errors:
        raise PreflightError(errors)
    return plan


def _preflight_brats(options: Options, plan: Plan) -> list[str]:
    try:
        plan.layout = detect_layout(options.brats)
        cases = find_cases(options.brats, plan.layout)
    except DataError as error:
        return [str(error)]
    problems = run_tasks(
        _check_case_task, [(case, options.modalities) for case in cases], options.workers, "checking BraTS cases"
    )
    errors = [problem for problem in problems if problem]
    plan.cases = [case for case in cases if case.seg_file is not None]
    if not plan.cases:
        # One line, not one per case: a whole validation set without labels is a wrong folder, not many faults.
        return [*errors, f"{options.brats}: no case has a segmentation (is this a validation set without labels?)"]
    for case in cases:
        if case.seg_file is not None:
            continue
        if _is_unlabelled_by_design(case):
            plan.skipped_cases.append({"case": case.case_id, "reason": "no segmentation (unlabelled validation/test)"})
        else:
            folder = next(iter(case.modality_files.values()), options.brats / case.case_id).parent
            errors.append(f"{folder}: case {case.case_id} has no segmentation file")
    return errors


def _is_unlabelled_by_design(case: VolumeCase) -> bool:
    """MSD test images and BraTS 2020 Validation folders come without labels; elsewhere a missing seg is a fault."""
    return case.layout == "msd" or "_Validation_" in case.case_id


def _check_case_task(task: tuple[VolumeCase, tuple[str, ...]]) -> str | None:
    case, modalities = task
    try:
        check_case(case, modalities)
    except DataError as error:
        return str(error)
    return None


# ----------------------------------------------------------------------------------------------------------------------
# BraTS


@dataclass(frozen=True)
class CaseTask:
    """Everything a worker needs to turn one case into slices."""

    case: VolumeCase
    modalities: tuple[str, ...]
    size: int
    min_brain_fraction: float
    out_dir: Path


def prepare_case(task: CaseTask) -> dict[str, Any] | str:
    """Load one case, cut it into axial slices and save them; return the slice records or an error line."""
    # Imported here: slices needs torch (about 2 s to import), which Kaggle-only runs can do without.
    from scripts.data.slices import extract_slices

    case = task.case
    try:
        loaded = load_volume_case(case, task.modalities)
        slices, tumour_dropped = extract_slices(loaded, size=task.size, min_brain_fraction=task.min_brain_fraction)
    except (DataError, OSError, EOFError, zlib.error) as error:
        return f"case {case.case_id}: {error}"
    if loaded.mask is None:
        return f"case {case.case_id}: no segmentation"
    case_dir = task.out_dir / case.case_id
    case_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for item in slices:
        image = np.clip(item.image, -FLOAT16_MAX, FLOAT16_MAX).astype(np.float16)
        mask = np.asarray(item.mask, dtype=np.uint8)
        np.save(case_dir / f"z{item.z:03d}_image.npy", image)
        np.save(case_dir / f"z{item.z:03d}_label.npy", mask)
        # The label is counted on the mask as saved, so cls always agrees with the file the bundle reads.
        records.append({"z": int(item.z), "tumour_pixels": int(np.count_nonzero(mask))})
    return {
        "case_id": case.case_id,
        "case_dir": str(next(iter(case.modality_files.values())).parent),
        "original_shape": [int(value) for value in loaded.original_shape],
        "slices_total": int(loaded.image.shape[-1]),
        "slices": records,
        "tumour_pixels_dropped": int(tumour_dropped),
    }


def prepare_brats(
    options: Options, plan: Plan, partial: Path, timings: dict[str, float]
) -> tuple[dict[str, list], dict[str, Any], dict]:
    """Slice every labelled case and split by subject (all timepoints of a subject in one split).

    Returns:
        The three BraTS datalists, patients.json's content and the BraTS part of the summary.
    """
    from scripts.data.slices import slice_label

    started = time.perf_counter()
    tasks = [
        CaseTask(case, options.modalities, options.size, options.min_brain_fraction, partial / "brats")
        for case in plan.cases
    ]
    results = run_tasks(prepare_case, tasks, options.workers, "BraTS cases")
    errors = [result for result in results if isinstance(result, str)]
    if errors:
        raise PreflightError(errors)
    timings["brats_s"] = time.perf_counter() - started
    timings["brats_per_case_s"] = timings["brats_s"] / max(1, len(tasks))
    split_of = dataset_splits.split_cases([r["case_id"] for r in results], options.split, options.seed)
    lists: dict[str, list] = {f"brats_{split}": [] for split in dataset_splits.SPLITS}
    patients: dict[str, Any] = {}
    for result in sorted(results, key=lambda r: r["case_id"]):
        case_id, split = result["case_id"], split_of[result["case_id"]]
        # Recorded with every slice, so that later groupings (folds) can keep a subject's timepoints together too.
        subject = dataset_splits.subject_of(case_id)
        for record in sorted(result["slices"], key=lambda r: r["z"]):
            stem = f"brats/{case_id}/z{record['z']:03d}"
            lists[f"brats_{split}"].append(
                {
                    "image": f"{stem}_image.npy",
                    "label": f"{stem}_label.npy",
                    "cls": slice_label(record["tumour_pixels"], options.min_tumour_pixels),
                    "patient": case_id,
                    "subject": subject,
                    "slice": record["z"],
                    "source": "brats",
                }
            )
        patients[case_id] = {
            "split": split,
            "subject": subject,
            "layout": plan.layout,
            "case_dir": result["case_dir"],
            "original_shape": result["original_shape"],
            "slices_total": result["slices_total"],
            "slices_kept": [record["z"] for record in result["slices"]],
            "tumour_pixels_kept": sum(record["tumour_pixels"] for record in result["slices"]),
            "tumour_pixels_dropped": result["tumour_pixels_dropped"],
        }
    return lists, patients, _brats_summary(plan, lists, patients)


def _brats_summary(plan: Plan, lists: dict[str, list], patients: dict[str, Any]) -> dict[str, Any]:
    per_split = {}
    for split in dataset_splits.SPLITS:
        entries = lists[f"brats_{split}"]
        tumour = sum(entry["cls"] for entry in entries)
        per_split[split] = {
            "subjects": len({record["subject"] for record in patients.values() if record["split"] == split}),
            "patients": sum(1 for record in patients.values() if record["split"] == split),
            "slices": len(entries),
            "tumour_slices": tumour,
            "tumour_fraction": round(tumour / len(entries), 4) if entries else None,
        }
    cases_per_subject = Counter(record["subject"] for record in patients.values())
    return {
        "layout": plan.layout,
        "cases": len(patients),
        "subjects": len(cases_per_subject),
        "subjects_with_several_timepoints": sum(count > 1 for count in cases_per_subject.values()),
        "splits": per_split,
        "slices_total": sum(record["slices_total"] for record in patients.values()),
        "slices_dropped_little_brain": sum(
            record["slices_total"] - len(record["slices_kept"]) for record in patients.values()
        ),
        "tumour_pixels_dropped": sum(record["tumour_pixels_dropped"] for record in patients.values()),
        "skipped_cases": plan.skipped_cases,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Kaggle


@dataclass(frozen=True)
class ImageTask:
    """One image to decode, fingerprint, preprocess and save."""

    source: Path
    target: Path
    size: int


def prepare_image(task: ImageTask) -> dict[str, Any] | str:
    """Decode, fingerprint and preprocess one image; return its hashes or an error line."""
    try:
        grey, storage = images.load_grey(task.source)
    except (OSError, ValueError, SyntaxError) as error:
        return f"{task.source}: pixels cannot be decoded ({error})"
    array, blank = images.preprocess_grey(grey, task.size)
    task.target.parent.mkdir(parents=True, exist_ok=True)
    np.save(task.target, array.astype(np.float16))
    return {
        "hashes": kaggle_duplicates.image_hashes(grey, file_sha256(task.source), images.pixels_sha256(grey)),
        "shape": list(grey.shape),
        "storage": storage,
        "blank": blank,
    }


def prepare_kaggle(options: Options, scan: images.KaggleScan, partial: Path, timings: dict[str, float]) -> tuple:
    """Preprocess every image, group duplicates and split by group.

    Returns:
        The three Kaggle datalists, the Kaggle part of the summary and the duplicate-group records.
    """
    started = time.perf_counter()
    tasks = [ImageTask(image.path, partial / image.output, options.size) for image in scan.images]
    results = run_tasks(prepare_image, tasks, options.workers, "Kaggle images")
    errors = [result for result in results if isinstance(result, str)]
    if errors:
        raise PreflightError(errors)
    timings["kaggle_images_s"] = time.perf_counter() - started

    started = time.perf_counter()
    hashes = [result["hashes"] for result in results]
    groups = kaggle_duplicates.group_duplicates(
        hashes, options.near_duplicate_distance, options.near_duplicate_correlation
    )
    timings["duplicates_s"] = time.perf_counter() - started
    group_ids = [f"k{label:05d}" for label in groups.labels]
    items = [
        dataset_splits.KaggleItem(image.original, image.folder, image.cls4, group)
        for image, group in zip(scan.images, group_ids, strict=True)
    ]
    assignments = dataset_splits.split_kaggle(items, options.kaggle_val_fraction, options.seed)

    lists: dict[str, list] = {f"kaggle_{split}": [] for split in dataset_splits.SPLITS}
    for image, group in zip(scan.images, group_ids, strict=True):
        assignment = assignments[image.original]
        if not assignment.kept:
            # An extra copy in validation / test: scored once through its representative, so its array goes.
            (partial / image.output).unlink()
            continue
        lists[f"kaggle_{assignment.split}"].append(
            {
                "image": image.output,
                "cls": image.cls,
                "cls4": image.cls4,
                "group": group,
                "source": "kaggle",
                "original": image.original,
            }
        )
    summary = _kaggle_summary(scan, results, groups, group_ids, assignments, lists, options)
    return lists, summary, _duplicate_records(scan, groups, group_ids, assignments)


def _duplicate_records(
    scan: images.KaggleScan,
    groups: kaggle_duplicates.DuplicateGroups,
    group_ids: list[str],
    assignments: dict[str, dataset_splits.KaggleAssignment],
) -> dict[str, Any]:
    """duplicates.json: each group of two or more images, its kind, its split and what happened to each copy."""
    records: dict[str, Any] = {}
    for image, label, group in zip(scan.images, groups.labels, group_ids, strict=True):
        if groups.kinds[label] == "single":
            continue
        assignment = assignments[image.original]
        record = records.setdefault(group, {"kind": groups.kinds[label], "split": assignment.split, "members": []})
        record["members"].append(
            {
                "original": image.original,
                "cls4": image.cls4,
                "kept": assignment.kept,
                "moved_to_test": assignment.moved,
            }
        )
    return records


def _kaggle_summary(
    scan: images.KaggleScan,
    results: list[dict[str, Any]],
    groups: kaggle_duplicates.DuplicateGroups,
    group_ids: list[str],
    assignments: dict[str, dataset_splits.KaggleAssignment],
    lists: dict[str, list],
    options: Options,
) -> dict[str, Any]:
    members: dict[str, list[images.KaggleImage]] = defaultdict(list)
    for image, group in zip(scan.images, group_ids, strict=True):
        members[group].append(image)
    crossing = [g for g, imgs in members.items() if len({image.folder for image in imgs}) > 1]
    conflicts = [
        {"group": g, "images": [image.original for image in imgs]}
        for g, imgs in members.items()
        if len({image.cls4 for image in imgs}) > 1
    ]
    sizes = groups.sizes()
    phashes = np.array([r["hashes"].phash for r in results], dtype=np.uint64)
    histogram_limit = max(8, options.near_duplicate_distance + 4)
    close = kaggle_duplicates.near_pairs(phashes, histogram_limit)
    histogram = np.bincount(kaggle_duplicates.hamming_distances(phashes, close), minlength=histogram_limit + 1)
    per_split = {}
    for split in dataset_splits.SPLITS:
        entries = lists[f"kaggle_{split}"]
        per_split[split] = {
            "images": len(entries),
            "groups": len({entry["group"] for entry in entries}),
            "from_training_folder": sum(entry["original"].startswith("Training/") for entry in entries),
            "from_testing_folder": sum(entry["original"].startswith("Testing/") for entry in entries),
            "cls": {"no_tumour": sum(e["cls"] == 0 for e in entries), "tumour": sum(e["cls"] == 1 for e in entries)},
            "cls4": {
                name: sum(e["cls4"] == index for e in entries) for index, name in enumerate(images.KAGGLE_CLASSES)
            },
        }
    storage = Counter(r["storage"] for r in results)
    return {
        "images_found": len(scan.images),
        "splits": per_split,
        "duplicates": {
            "near_duplicate_distance": options.near_duplicate_distance,
            "near_duplicate_correlation": options.near_duplicate_correlation,
            "near_candidate_pairs": groups.near_candidates,
            "near_links": groups.near_links,
            "exact_links": groups.exact_links,
            "groups_exact": groups.kinds.count("exact"),
            "groups_near": groups.kinds.count("near"),
            "images_in_duplicate_groups": int(sizes[sizes > 1].sum()),
            "largest_group": int(sizes.max()) if len(sizes) else 0,
            "groups_crossing_training_testing": len(crossing),
            "training_images_moved_to_test": sum(a.moved for a in assignments.values()),
            "images_collapsed": sum(not a.kept for a in assignments.values()),
            "groups_with_conflicting_labels": len(conflicts),
            "conflicting_label_groups": conflicts[:LIST_LIMIT],
            "phash_pair_distance_histogram": {str(d): int(n) for d, n in enumerate(histogram)},
        },
        "storage": dict(sorted(storage.items())),
        "blank_images": [image.original for image, r in zip(scan.images, results, strict=True) if r["blank"]],
        "skipped_files": [{"file": path, "reason": reason} for path, reason in scan.skipped],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Orchestration


def check_no_leakage(datalist: dict[str, list]) -> None:
    """No BraTS case or subject and no Kaggle duplicate group may appear in two splits.

    Checked on the lists about to be written. The subject check is the one that catches two timepoints of one
    person on both sides; the case check guards the slices of a single scan.
    """
    for source, key, what in (
        ("brats", "patient", "patient"),
        ("brats", "subject", "subject"),
        ("kaggle", "group", "duplicate group"),
    ):
        dataset_splits.check_disjoint(
            {split: [entry[key] for entry in datalist[f"{source}_{split}"]] for split in dataset_splits.SPLITS}, what
        )


def write_json(path: Path, content: Any) -> None:
    """Write JSON with a trailing newline."""
    path.write_text(json.dumps(content, indent=1) + "\n")


def write_datalist(path: Path, datalist: dict[str, list]) -> None:
    """Write the datalist with one entry per line: readable, diff-friendly and a third of the indented size."""
    blocks = []
    for key, entries in datalist.items():
        body = ",\n".join(f"  {json.dumps(entry)}" for entry in entries)
        blocks.append(f" {json.dumps(key)}: [\n{body}\n ]" if entries else f" {json.dumps(key)}: []")
    path.write_text("{\n" + ",\n".join(blocks) + "\n}\n")


def build(
    options: Options, plan: Plan, record: dict[str, Any], timings: dict[str, float], started: float
) -> dict[str, Any]:
    """Write the prepared folder (in a temporary sibling, renamed into place at the end) and return the summary."""
    partial = partial_dir(options.out)
    partial.mkdir(parents=True)
    try:
        datalist: dict[str, list] = {key: [] for key in DATALIST_KEYS}
        patients: dict[str, Any] = {}
        duplicate_records: dict[str, Any] = {}
        summary: dict[str, Any] = {"output": str(options.out), "brats": None, "kaggle": None}
        if plan.cases:
            brats_lists, patients, summary["brats"] = prepare_brats(options, plan, partial, timings)
            datalist.update(brats_lists)
        if plan.kaggle is not None:
            kaggle_lists, summary["kaggle"], duplicate_records = prepare_kaggle(options, plan.kaggle, partial, timings)
            datalist.update(kaggle_lists)
            timings["kaggle_per_image_s"] = timings["kaggle_images_s"] / max(1, len(plan.kaggle.images))
        check_no_leakage(datalist)
        summary["options"] = {**options.recorded(), "workers": options.workers}
        timings["total_s"] = time.perf_counter() - started
        summary["timings_s"] = {name: round(value, 4) for name, value in timings.items()}
        write_datalist(partial / DATALIST_FILE, datalist)
        write_json(partial / PATIENTS_FILE, patients)
        write_json(partial / DUPLICATES_FILE, duplicate_records)
        write_json(partial / SUMMARY_FILE, summary)
        # Written last: its presence marks a complete folder for the no-op check.
        write_json(partial / OPTIONS_FILE, record)
        replace_output(partial, options.out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return summary


# ----------------------------------------------------------------------------------------------------------------------
# Readable summary


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as aligned text tables."""
    lines = [f"Prepared data: {summary['output']}"]
    brats = summary.get("brats")
    if brats:
        lines += ["", f"BraTS ({brats['layout']}, {brats['cases']} labelled cases of {brats['subjects']} subjects)"]
        lines.append(f"  {'split':<11}{'subjects':>9}{'cases':>9}{'slices':>9}{'tumour':>9}{'tumour %':>10}")
        for split, row in brats["splits"].items():
            fraction = "-" if row["tumour_fraction"] is None else f"{100 * row['tumour_fraction']:.1f}"
            counts = f"{row['subjects']:>9}{row['patients']:>9}{row['slices']:>9}{row['tumour_slices']:>9}"
            lines.append(f"  {split:<11}{counts}{fraction:>10}")
        if brats["subjects_with_several_timepoints"]:
            lines.append(
                f"  subjects with several timepoints: {brats['subjects_with_several_timepoints']} "
                "(each kept whole in one split)"
            )
        lines.append(
            f"  slices dropped (brain fraction below threshold): {brats['slices_dropped_little_brain']} of "
            f"{brats['slices_total']}; tumour pixels in them: {brats['tumour_pixels_dropped']}"
        )
        for skipped in brats["skipped_cases"]:
            lines.append(f"  skipped case {skipped['case']}: {skipped['reason']}")
    kaggle = summary.get("kaggle")
    if kaggle:
        lines += _format_kaggle(kaggle)
    timings = summary.get("timings_s", {})
    if timings:
        lines += ["", "Timings (s): " + ", ".join(f"{name} {value:.3g}" for name, value in timings.items())]
    return "\n".join(lines)


def _format_kaggle(kaggle: dict[str, Any]) -> list[str]:
    names = images.KAGGLE_CLASSES
    lines = ["", f"Kaggle ({kaggle['images_found']} images)"]
    header = f"  {'split':<11}{'images':>8}{'groups':>8}{'no tum.':>9}{'tumour':>8}" + "".join(
        f"{name[:10]:>11}" for name in names
    )
    lines.append(header)
    for split, row in kaggle["splits"].items():
        lines.append(
            f"  {split:<11}{row['images']:>8}{row['groups']:>8}{row['cls']['no_tumour']:>9}{row['cls']['tumour']:>8}"
            + "".join(f"{row['cls4'][name]:>11}" for name in names)
        )
    dup = kaggle["duplicates"]
    lines += [
        f"  near-duplicate candidates (pHash distance <= {dup['near_duplicate_distance']}): "
        f"{dup['near_candidate_pairs']} pairs, {dup['near_links']} confirmed "
        f"(64x64 thumbnail correlation >= {dup['near_duplicate_correlation']})",
        f"  duplicate groups: {dup['groups_exact']} exact, "
        f"{dup['groups_near']} near; {dup['images_in_duplicate_groups']} images in them, "
        f"largest {dup['largest_group']}",
        f"  groups crossing Training/Testing: {dup['groups_crossing_training_testing']}; Training images moved to "
        f"test: {dup['training_images_moved_to_test']}; extra copies left out of validation/test: "
        f"{dup['images_collapsed']}; groups with conflicting labels: {dup['groups_with_conflicting_labels']}",
    ]
    if kaggle["blank_images"]:
        lines.append(f"  blank images (no foreground, stored as zeros): {len(kaggle['blank_images'])}")
    skipped = kaggle["skipped_files"]
    if skipped:
        lines.append(f"  skipped {len(skipped)} non-image file(s):")
        lines += [f"    {item['file']}: {item['reason']}" for item in skipped[:LIST_LIMIT]]
    return lines


def next_command(out: Path, size: int, channels: int) -> str:
    """The training command for slices of this size: the preset made for it, or the demo's with the size given."""
    preset = PRESET_SIZES.get(size, "configs/demo.yaml")
    extra = "" if size in PRESET_SIZES else f" --image_size {size}"
    extra += f" --in_channels {channels}" if channels != 1 else ""
    return NEXT_COMMAND.format(preset=preset, out=out, extra=extra)


def print_next_steps(out: Path, size: int, channels: int) -> None:
    """Where the outputs are and what to run next."""
    print(f"\nOutputs: {out / DATALIST_FILE}, {out / PATIENTS_FILE}, {out / SUMMARY_FILE}")
    print("Next:\n  " + next_command(out, size, channels))


def main(argv: Sequence[str] | None = None) -> int:
    """Run the preparation; returns the process exit code (0 done or up to date, 1 failure, 2 bad input)."""
    options = parse_args(argv)
    started = time.perf_counter()
    try:
        check_output_location(options)
        record = build_record(options)
        if not options.force and is_up_to_date(options.out, record):
            print(format_summary(json.loads((options.out / SUMMARY_FILE).read_text())))
            print(f"\n{options.out} is up to date (same inputs and options): nothing to do; --force rebuilds it.")
            print_next_steps(options.out, options.size, len(options.modalities))
            return 0
        remove_abandoned_builds(options.out)
        timings: dict[str, float] = {}
        plan = preflight(options)
        timings["preflight_s"] = time.perf_counter() - started
        summary = build(options, plan, record, timings, started)
    except PreflightError as error:
        _report_problems(error.lines)
        return 2
    except (DataError, dataset_splits.LeakageError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: nothing was written (a previous output is unchanged)", file=sys.stderr)
        return 130
    print(format_summary(summary))
    print(f"\nDone in {time.perf_counter() - started:.1f} s.")
    print_next_steps(options.out, options.size, len(options.modalities))
    return 0


def _report_problems(lines: Iterable[str]) -> None:
    lines = list(lines)
    print(f"error: {len(lines)} problem(s) found in the input data; nothing was written:", file=sys.stderr)
    for line in lines:
        print(f"  {line}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
