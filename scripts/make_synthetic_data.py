#!/usr/bin/env python
"""Make a small synthetic stand-in for the BraTS and Kaggle Brain Tumor MRI collections, in their exact layouts.

The data are procedural (no download, no real patient): brain-shaped volumes with a glioma and its BraTS labels,
and 2D head slices with or without a glioma, meningioma or pituitary lesion. File names, folder layouts, dtypes,
affines, label values and the known quirks of the real collections (BraTS 2020's misnamed segmentation, MSD's
macOS ``._`` files, Kaggle's ``Tr-glTr_`` names and duplicates across its Training/Testing split) are reproduced so
that data preparation can be tested end to end. ``manifest.json`` records what was planted.

Example:
    python scripts/make_synthetic_data.py --out data/synthetic
    python scripts/make_synthetic_data.py --out /tmp/tiny --small --brats-layout msd
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from PIL import Image
from tqdm import tqdm

# The anatomy module sits next to this script; scripts/ is deliberately not a package.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_anatomy as anatomy

GENERATOR = "make_synthetic_data"
GENERATOR_VERSION = "1.0.0"
LAYOUTS = ("brats2021", "brats2020", "brats2023", "msd")
SPLITS = ("Training", "Testing")
CLASS_PREFIX = {"glioma": "gl", "meningioma": "me", "notumor": "no", "pituitary": "pi"}
# What the generator owns inside --out; --force only ever deletes these.
OUTPUT_ENTRIES = ("brats", "kaggle", "manifest.json")

# Nibabel view of the real BraTS header (ITK writes LPS direction identity with origin (0, -239, 0)).
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
MSD_AFFINE = np.eye(4)
MSD_TEST_CASES = 2
BRATS2020_MISNAMED_SEG = "W39_1998.09.19_Segm.nii"

DEFAULTS = {
    "brats_cases": 12,
    "kaggle_per_class": 60,
    "shape": (240, 240, 155),
    "kaggle_size_min": 200,
    "kaggle_size_max": 512,
}
SMALL_PRESET = {
    "brats_cases": 4,
    "kaggle_per_class": 8,
    "shape": (96, 96, 40),
    "kaggle_size_min": 64,
    "kaggle_size_max": 128,
}


@dataclass(frozen=True)
class Options:
    """Resolved command-line options (the --small preset applied, explicit options winning)."""

    out: str
    seed: int
    brats_cases: int
    kaggle_per_class: int
    brats_layout: str
    shape: tuple[int, int, int]
    kaggle_size_min: int
    kaggle_size_max: int
    small: bool
    duplicates: float
    force: bool
    workers: int


# --------------------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The argparse parser (defaults of preset-able options are None so --small can tell them apart)."""
    parser = argparse.ArgumentParser(
        description=(
            "Write synthetic BraTS-style volumes (DIR/brats) and Kaggle-style brain MRI JPEGs (DIR/kaggle) in the "
            "exact layouts of the real collections, plus DIR/manifest.json describing every case, image and "
            "planted duplicate. Deterministic for a seed."
        ),
        epilog="Next step: python scripts/prepare_data.py --brats DIR/brats --kaggle DIR/kaggle --out data/prepared",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    parser.add_argument(
        "--brats-cases", type=int, default=None, help=f"number of BraTS cases (default: {DEFAULTS['brats_cases']})"
    )
    parser.add_argument(
        "--kaggle-per-class",
        type=int,
        default=None,
        help="Kaggle images per class, Training and Testing together, about 80/20 "
        f"(default: {DEFAULTS['kaggle_per_class']})",
    )
    parser.add_argument(
        "--brats-layout",
        choices=LAYOUTS,
        default="brats2021",
        help="folder and file naming of the volume collection (default: brats2021)",
    )
    parser.add_argument(
        "--shape",
        type=int,
        nargs=3,
        default=None,
        metavar=("X", "Y", "Z"),
        help="volume shape in voxels of 1 mm (default: 240 240 155)",
    )
    parser.add_argument(
        "--kaggle-size-min",
        type=int,
        default=None,
        help=f"smallest JPEG side in pixels (default: {DEFAULTS['kaggle_size_min']})",
    )
    parser.add_argument(
        "--kaggle-size-max",
        type=int,
        default=None,
        help=f"largest JPEG side in pixels (default: {DEFAULTS['kaggle_size_max']})",
    )
    parser.add_argument(
        "--small",
        action="store_true",
        help="fast preset for tests: shape 96x96x40, 4 cases, 8 images per class of 64-128 px (explicit options win)",
    )
    parser.add_argument(
        "--duplicates",
        type=float,
        default=0.05,
        help="fraction of Testing images that are exact copies of Training images; as many near-duplicates are "
        "planted across the split, and a few exact copies within Training (default: 0.05; 0 disables)",
    )
    parser.add_argument("--force", action="store_true", help="replace the generated content of a non-empty DIR")
    parser.add_argument(
        "--workers", type=int, default=0, help="worker processes (default: 0 = automatic, 1 = no subprocesses)"
    )
    return parser


def resolve_options(args: argparse.Namespace) -> Options:
    """Apply the --small preset under explicit options and validate the result."""
    preset = SMALL_PRESET if args.small else DEFAULTS
    values = {key: getattr(args, key) if getattr(args, key) is not None else preset[key] for key in DEFAULTS}
    shape = tuple(int(s) for s in values["shape"])
    errors = []
    if values["brats_cases"] < 1:
        errors.append("--brats-cases must be at least 1")
    if values["kaggle_per_class"] < 2:
        errors.append("--kaggle-per-class must be at least 2 (one Training and one Testing image)")
    if min(shape) < 24:
        errors.append("--shape must be at least 24 voxels along every axis")
    if not 16 <= values["kaggle_size_min"] <= values["kaggle_size_max"]:
        errors.append("need 16 <= --kaggle-size-min <= --kaggle-size-max")
    if not 0.0 <= args.duplicates <= 0.3:
        errors.append("--duplicates must be between 0 and 0.3")
    if errors:
        raise ValueError("; ".join(errors))
    voxels = shape[0] * shape[1] * shape[2] * values["brats_cases"]
    workers = args.workers or (1 if voxels < 5_000_000 else min(4, os.cpu_count() or 1))
    return Options(
        out=args.out,
        seed=args.seed,
        brats_cases=values["brats_cases"],
        kaggle_per_class=values["kaggle_per_class"],
        brats_layout=args.brats_layout,
        shape=shape,  # type: ignore[arg-type]
        kaggle_size_min=values["kaggle_size_min"],
        kaggle_size_max=values["kaggle_size_max"],
        small=args.small,
        duplicates=args.duplicates,
        force=args.force,
        workers=max(1, workers),
    )


# --------------------------------------------------------------------------------------------------------------
# Output folder handling: build in a hidden sibling, move into place only when complete
# --------------------------------------------------------------------------------------------------------------
def check_output_dir(out: Path, force: bool) -> None:
    """Refuse a non-empty --out unless --force, and never delete anything the generator did not write."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder")
    if not out.exists():
        return
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if not force:
        raise FileExistsError(f"{out} is not empty; choose another --out or add --force to replace generated data")
    foreign = [name for name in entries if name not in OUTPUT_ENTRIES]
    if foreign:
        raise FileExistsError(
            f"{out} holds files this generator did not write ({', '.join(foreign[:5])}); "
            "--force only replaces brats/, kaggle/ and manifest.json, so choose another --out"
        )


def install_output(staging: Path, out: Path) -> None:
    """Move the finished staging folder to ``out``; the manifest arrives last, so it marks completeness."""
    if out.exists():
        # The manifest goes first: an interruption now leaves a folder that visibly lacks it.
        for name in ("manifest.json", "brats", "kaggle"):
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        for name in ("brats", "kaggle", "manifest.json"):
            os.replace(staging / name, out / name)
        staging.rmdir()
    else:
        os.replace(staging, out)


# --------------------------------------------------------------------------------------------------------------
# BraTS-style volume collections
# --------------------------------------------------------------------------------------------------------------
def case_rng(seed: int, index: int) -> np.random.Generator:
    """Each case draws from its own stream, so its content does not depend on other cases or on the layout."""
    return np.random.default_rng([seed, 1, index])


def brats_case_ids(opts: Options) -> list[dict[str, Any]]:
    """Case names and file paths (relative to --out) for the chosen layout."""
    n = opts.brats_cases
    cases: list[dict[str, Any]] = []
    if opts.brats_layout in ("brats2021", "brats2023"):
        # Real BraTS 2021/2023 ids have gaps (00000, 00002, 00003, 00005, ...).
        gaps = np.random.default_rng([opts.seed, 4]).integers(1, 3, size=n)
        numbers = np.concatenate([[0], np.cumsum(gaps[1:])])
        for i, number in enumerate(numbers):
            if opts.brats_layout == "brats2021":
                case_id = f"BraTS2021_{number:05d}"
                names = {m: f"{case_id}_{m}.nii.gz" for m in (*anatomy.MODALITIES, "seg")}
            else:
                case_id = f"BraTS-GLI-{number:05d}-000"
                suffix = {"flair": "t2f", "t1": "t1n", "t1ce": "t1c", "t2": "t2w", "seg": "seg"}
                names = {m: f"{case_id}-{s}.nii.gz" for m, s in suffix.items()}
            files = {m: f"brats/{case_id}/{name}" for m, name in names.items()}
            cases.append({"index": i, "id": case_id, "split": "training", "files": files})
    elif opts.brats_layout == "brats2020":
        for i in range(n):
            case_id = f"BraTS20_Training_{i + 1:03d}"
            files = {m: f"brats/{case_id}/{case_id}_{m}.nii" for m in (*anatomy.MODALITIES, "seg")}
            if i == n - 1:  # as case 355 of the real collection
                files["seg"] = f"brats/{case_id}/{BRATS2020_MISNAMED_SEG}"
            cases.append({"index": i, "id": case_id, "split": "training", "files": files})
    else:
        root = "brats/Task01_BrainTumour"
        for i in range(n + MSD_TEST_CASES):
            case_id = f"BRATS_{i + 1:03d}"
            if i < n:
                files = {"image": f"{root}/imagesTr/{case_id}.nii.gz", "seg": f"{root}/labelsTr/{case_id}.nii.gz"}
                cases.append({"index": i, "id": case_id, "split": "training", "files": files})
            else:
                files = {"image": f"{root}/imagesTs/{case_id}.nii.gz"}
                cases.append({"index": i, "id": case_id, "split": "test", "files": files})
    return cases


def layout_labels(layout: str) -> dict[str, int]:
    """Label values of the tumour compartments in each layout."""
    if layout == "brats2023":
        return {"necrotic_core": 1, "edema": 2, "enhancing": 3}
    if layout == "msd":
        return {"edema": 1, "non_enhancing": 2, "enhancing": 3}
    return {"necrotic_core": 1, "edema": 2, "enhancing": 4}


def remap_labels(seg: np.ndarray, layout: str) -> np.ndarray:
    """Convert a BraTS 2021 label map (1 NCR, 2 ED, 4 ET) to the layout's label scheme."""
    table = np.zeros(5, dtype=np.uint8)
    if layout == "brats2023":
        table[[1, 2, 4]] = (1, 2, 3)
    elif layout == "msd":
        table[[1, 2, 4]] = (2, 1, 3)
    else:
        table[[1, 2, 4]] = (1, 2, 4)
    return table[seg]


def save_nifti(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Save with 1 mm voxels and qform/sform both set (code 1, scanner), as the real files are."""
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


def apple_double_bytes(name: str) -> bytes:
    """A 4 KiB AppleDouble sidecar like the ``._*`` files macOS tar leaves in the MSD tarball."""
    header = b"\x00\x05\x16\x07" + b"\x00\x02\x00\x00" + b"Mac OS X        " + b"\x00\x02"
    entries = (9).to_bytes(4, "big") + (50).to_bytes(4, "big") + (3870).to_bytes(4, "big")
    entries += (2).to_bytes(4, "big") + (3920).to_bytes(4, "big") + (176).to_bytes(4, "big")
    body = header + entries + b"ATTR" + hashlib.md5(name.encode()).digest()
    return body + b"\x00" * (4096 - len(body))


def write_brats_case(task: tuple[Options, dict[str, Any]]) -> dict[str, Any]:
    """Generate one case and write it in the layout of ``task``; returns its manifest record."""
    opts, case = task
    staging = Path(case["staging"])
    images, seg, info = anatomy.brats_case(opts.shape, case_rng(opts.seed, case["index"]), case["index"])
    layout = opts.brats_layout
    files = case["files"]
    if layout == "msd":
        # MSD stacks FLAIR, T1w, t1gd, T2w as the last axis, in float32.
        stacked = np.stack([images[m] for m in anatomy.MODALITIES], axis=-1).astype(np.float32)
        save_nifti(stacked, MSD_AFFINE, staging / files["image"])
        if "seg" in files:
            save_nifti(remap_labels(seg, layout), MSD_AFFINE, staging / files["seg"])
        for rel in files.values():
            path = staging / rel
            (path.parent / f"._{path.name}").write_bytes(apple_double_bytes(path.name))
    else:
        # BraTS 2020 (Kaggle copy) holds float32 images; 2021 and 2023 hold int16.
        image_dtype = np.float32 if layout == "brats2020" else np.int16
        for modality in anatomy.MODALITIES:
            save_nifti(images[modality].astype(image_dtype), BRATS_AFFINE, staging / files[modality])
        save_nifti(remap_labels(seg, layout), BRATS_AFFINE, staging / files["seg"])
    labels = layout_labels(layout)
    label_voxels = info.pop("label_voxels")
    in_layout = {
        labels["enhancing"]: label_voxels["4"],
        labels["edema"]: label_voxels["2"],
        labels.get("necrotic_core", labels.get("non_enhancing")): label_voxels["1"],
    }
    info["label_voxels"] = {str(k): in_layout[k] for k in sorted(in_layout)}
    return {"id": case["id"], "split": case["split"], "files": files, **info}


def write_msd_dataset_json(staging: Path, cases: list[dict[str, Any]]) -> None:
    """dataset.json with the keys and values of the real MSD Task01_BrainTumour file."""
    training = [c for c in cases if c["split"] == "training"]
    test = [c for c in cases if c["split"] == "test"]
    root = "brats/Task01_BrainTumour/"
    dataset = {
        "name": "BRATS",
        "description": "Gliomas segmentation tumour and oedema in on brain images (SYNTHETIC stand-in)",
        "reference": "https://www.med.upenn.edu/sbia/brats2017.html",
        "licence": "CC-BY-SA 4.0",
        "release": "2.0 04/05/2018",
        "tensorImageSize": "4D",
        "modality": {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "numTraining": len(training),
        "numTest": len(test),
        "training": [
            {"image": "./" + c["files"]["image"][len(root) :], "label": "./" + c["files"]["seg"][len(root) :]}
            for c in training
        ],
        "test": ["./" + c["files"]["image"][len(root) :] for c in test],
    }
    path = staging / root / "dataset.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataset, indent=4) + "\n")


# --------------------------------------------------------------------------------------------------------------
# Kaggle-style JPEG collection
# --------------------------------------------------------------------------------------------------------------
def kaggle_name(split: str, cls: str, index: int) -> str:
    """File name as in the real collection: ``Tr-glTr_0000.jpg`` .. ``Tr-glTr_0009.jpg``, then ``Tr-gl_0010.jpg``."""
    prefix = "Tr" if split == "Training" else "Te"
    code = CLASS_PREFIX[cls]
    return f"{prefix}-{code}Tr_{index:04d}.jpg" if index < 10 else f"{prefix}-{code}_{index:04d}.jpg"


def kaggle_counts(per_class: int) -> dict[str, int]:
    """Training/Testing counts per class, about 80/20, at least one of each."""
    n_train = min(max(1, round(0.8 * per_class)), per_class - 1)
    return {"Training": n_train, "Testing": per_class - n_train}


def slot_look(opts: Options, split: str, index: int) -> tuple[tuple[int, int], str]:
    """Image size and mode of a slot, shared by all four classes so neither gives the class away."""
    rng = np.random.default_rng([opts.seed, 2, SPLITS.index(split), index])
    lo, hi = opts.kaggle_size_min, opts.kaggle_size_max
    width = int(rng.integers(lo, hi + 1))
    height = width if rng.random() < 0.6 else int(np.clip(round(width * rng.uniform(0.8, 1.2)), lo, hi))
    mode = "L" if index % 7 == 2 else "RGB"  # about 15% single-channel, deterministic so small runs have some
    return (width, height), mode


def encode_jpeg(array: np.ndarray, mode: str, quality: int) -> bytes:
    """JPEG bytes, grey replicated to R=G=B for RGB (as most of the real files are)."""
    image = Image.fromarray(array, mode="L")
    if mode == "RGB":
        image = image.convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=int(quality))
    return buffer.getvalue()


def write_kaggle_image(task: tuple[Options, dict[str, Any]]) -> dict[str, Any]:
    """Render and write one fresh image; returns its manifest record."""
    opts, slot = task
    cls, split, index = slot["class"], slot["split"], slot["index"]
    rng = np.random.default_rng([opts.seed, 3, anatomy.KAGGLE_CLASSES.index(cls), SPLITS.index(split), index])
    (width, height), mode = slot_look(opts, split, index)
    pixels, info = anatomy.kaggle_slice(rng, cls, width, height)
    quality = int(rng.integers(80, 96))
    path = Path(slot["staging"]) / slot["path"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_jpeg(pixels, mode, quality))
    return {**_image_record(slot, (width, height), mode), "jpeg_quality": quality, **info}


def _image_record(slot: dict[str, Any], size: tuple[int, int], mode: str) -> dict[str, Any]:
    return {
        "path": slot["path"],
        "split": slot["split"],
        "class": slot["class"],
        "index": slot["index"],
        "size": [int(size[0]), int(size[1])],
        "mode": mode,
        "duplicate_of": None,
    }


def plan_duplicates(opts: Options, counts: dict[str, int]) -> list[dict[str, Any]]:
    """Choose which slots receive copies instead of fresh images (sources are always fresh images).

    Exact copies go from Training to Testing, near-duplicates from either split to the other, and a few exact
    copies stay within Training, as in the real collection. Copies keep the class of their original.
    """
    if opts.duplicates <= 0:
        return []
    n_test_total = counts["Testing"] * len(anatomy.KAGGLE_CLASSES)
    n_cross = max(1, round(opts.duplicates * n_test_total))
    n_within = max(1, round(n_cross / 2))
    rng = np.random.default_rng([opts.seed, 5])
    taken: set[tuple[str, str, int]] = set()
    sources: set[tuple[str, str, int]] = set()
    plan = []

    def pick(split: str, cls: str, avoid_sources: bool) -> tuple[str, str, int] | None:
        free = [
            (split, cls, i)
            for i in range(counts[split])
            if (split, cls, i) not in taken and not (avoid_sources and (split, cls, i) in sources)
        ]
        return free[int(rng.integers(len(free)))] if free else None

    requests = [("exact", "Training", "Testing")] * n_cross
    requests += [
        ("near", "Training", "Testing") if k % 2 == 0 else ("near", "Testing", "Training") for k in range(n_cross)
    ]
    requests += [("exact", "Training", "Training")] * n_within
    for kind, source_split, target_split in requests:
        cls = anatomy.KAGGLE_CLASSES[int(rng.integers(len(anatomy.KAGGLE_CLASSES)))]
        target = pick(target_split, cls, avoid_sources=True)
        if target is None:
            continue
        taken.add(target)
        source = pick(source_split, cls, avoid_sources=False)
        if source is None:
            taken.discard(target)
            continue
        sources.add(source)
        plan.append({"kind": kind, "source": source, "target": target})
    return plan


def write_duplicate(
    opts: Options, staging: Path, dup: dict[str, Any], source: dict[str, Any], target_path: str, k: int
) -> dict[str, Any]:
    """Write an exact byte copy, or a re-encoded / resized / brightened near copy, of ``source``."""
    data = (staging / source["path"]).read_bytes()
    record = dict(source)
    split, cls, index = dup["target"]
    record.update({"path": target_path, "split": split, "class": cls, "index": index, "duplicate_of": source["path"]})
    changes: list[str] = []
    if dup["kind"] == "near":
        rng = np.random.default_rng([opts.seed, 6, k])
        image = Image.open(io.BytesIO(data))
        image.load()
        mode = image.mode
        width, height = image.size
        if rng.random() < 0.6:
            factor = rng.uniform(0.8, 1.25)
            width = int(np.clip(round(width * factor), opts.kaggle_size_min, opts.kaggle_size_max))
            height = int(np.clip(round(height * factor), opts.kaggle_size_min, opts.kaggle_size_max))
            if (width, height) != image.size:
                scale_x, scale_y = width / image.size[0], height / image.size[1]
                image = image.resize((width, height), Image.Resampling.BICUBIC)
                changes.append("resize")
                if record.get("lesion"):
                    lesion = dict(record["lesion"])
                    cx, cy = lesion["centre_xy"]
                    lesion["centre_xy"] = [round(cx * scale_x, 1), round(cy * scale_y, 1)]
                    lesion["radius"] = round(lesion["radius"] * (scale_x + scale_y) / 2, 1)
                    record["lesion"] = lesion
        pixels = np.asarray(image.convert("L"), dtype=np.float32)
        if rng.random() < 0.6:
            pixels = pixels * rng.uniform(0.92, 1.08) + rng.uniform(-6, 6)
            changes.append("brightness")
        quality = int(rng.integers(60, 96))
        if abs(quality - source["jpeg_quality"]) < 5:
            quality = quality - 10 if quality > 75 else quality + 10
        changes.append("jpeg_quality")
        data = encode_jpeg(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), mode, quality)
        record.update({"size": [width, height], "mode": mode, "jpeg_quality": quality})
    path = staging / target_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    record["duplicate_kind"] = dup["kind"]
    return {"record": record, "changes": changes}


# --------------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------------
def run_tasks(
    func: Callable[[Any], dict[str, Any]], tasks: list[Any], workers: int, progress: tqdm
) -> list[dict[str, Any]]:
    """Run independent tasks, in worker processes when asked, returning results in task order."""
    if workers <= 1 or len(tasks) <= 1:
        results = []
        for task in tasks:
            results.append(func(task))
            progress.update()
        return results
    with ProcessPoolExecutor(max_workers=workers) as pool:
        results = []
        for result in pool.map(func, tasks, chunksize=max(1, len(tasks) // (8 * workers))):
            results.append(result)
            progress.update()
        return results


def generate(opts: Options, staging: Path) -> dict[str, Any]:
    """Write everything under ``staging`` and return the manifest."""
    cases = brats_case_ids(opts)
    for case in cases:
        case["staging"] = str(staging)
    counts = kaggle_counts(opts.kaggle_per_class)
    duplicates = plan_duplicates(opts, counts)
    targets = {dup["target"] for dup in duplicates}
    slots = [
        {
            "class": cls,
            "split": split,
            "index": i,
            "path": f"kaggle/{split}/{cls}/{kaggle_name(split, cls, i)}",
            "staging": str(staging),
        }
        for split in SPLITS
        for cls in anatomy.KAGGLE_CLASSES
        for i in range(counts[split])
    ]
    fresh = [s for s in slots if (s["split"], s["class"], s["index"]) not in targets]
    total = len(cases) + len(slots)
    with tqdm(total=total, desc="synthetic data", unit="file", dynamic_ncols=True) as progress:
        case_records = run_tasks(write_brats_case, [(opts, c) for c in cases], opts.workers, progress)
        image_records = run_tasks(write_kaggle_image, [(opts, s) for s in fresh], opts.workers, progress)
        by_key = {(r["split"], r["class"], r["index"]): r for r in image_records}
        path_of = {(s["split"], s["class"], s["index"]): s["path"] for s in slots}
        pairs = []
        for k, dup in enumerate(duplicates):
            source = by_key[dup["source"]]
            written = write_duplicate(opts, staging, dup, source, path_of[dup["target"]], k)
            by_key[dup["target"]] = written["record"]
            pairs.append(
                {
                    "kind": dup["kind"],
                    "original": source["path"],
                    "duplicate": written["record"]["path"],
                    "cross_split": dup["source"][0] != dup["target"][0],
                    "changes": written["changes"],
                }
            )
            progress.update()
    if opts.brats_layout == "msd":
        write_msd_dataset_json(staging, case_records)
    images = [by_key[(s["split"], s["class"], s["index"])] for s in slots]
    return build_manifest(opts, case_records, images, pairs, counts)


def build_manifest(
    opts: Options,
    cases: list[dict[str, Any]],
    images: list[dict[str, Any]],
    pairs: list[dict[str, Any]],
    counts: dict[str, int],
) -> dict[str, Any]:
    """The JSON document that tells tests and data preparation what was planted where."""
    options = asdict(opts)
    options.pop("out")
    options.pop("force")
    options.pop("workers")  # does not change the output
    options["shape"] = list(opts.shape)
    root = "brats/Task01_BrainTumour" if opts.brats_layout == "msd" else "brats"
    return {
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": opts.seed,
        "options": options,
        "numpy_version": np.__version__,
        "brats": {
            "layout": opts.brats_layout,
            "root": root,
            "shape": list(opts.shape),
            "spacing_mm": [1.0, 1.0, 1.0],
            "affine": (MSD_AFFINE if opts.brats_layout == "msd" else BRATS_AFFINE).tolist(),
            "labels": layout_labels(opts.brats_layout),
            "cases": cases,
        },
        "kaggle": {
            "root": "kaggle",
            "classes": list(anatomy.KAGGLE_CLASSES),
            "counts_per_class": counts,
            "images": images,
        },
        "duplicates": pairs,
    }


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Iterable[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    try:
        opts = resolve_options(args)
    except ValueError as error:
        parser.error(str(error))
    out = Path(opts.out)
    try:
        check_output_dir(out, opts.force)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    # A plain `kill` should clean up like Ctrl-C does, not leave the staging folder behind.
    signal.signal(signal.SIGTERM, _interrupt)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        manifest = generate(opts, staging)
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
        install_output(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    n_images = len(manifest["kaggle"]["images"])
    print(
        f"Wrote {opts.brats_cases} BraTS cases ({opts.brats_layout} layout, {'x'.join(map(str, opts.shape))}) to "
        f"{out / 'brats'}, {n_images} Kaggle-style images to {out / 'kaggle'}, and {out / 'manifest.json'}."
    )
    print("Next step:")
    print(f"  python scripts/prepare_data.py --brats {out / 'brats'} --kaggle {out / 'kaggle'} --out data/prepared")
    return 0


if __name__ == "__main__":
    sys.exit(main())
