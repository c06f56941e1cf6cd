#!/usr/bin/env python
"""How data preparation and the training cache grow with the number of patients, and what full data would need.

For each size N (default 10, 40 and 160 patients) the study prepares N BraTS cases and N x 7023/1251 Kaggle images
(the real collections' ratio) with ``scripts/prepare_data.py`` and measures its wall time, the peak memory of
its whole process tree (PSS sampled from /proc: pages shared between processes count once) and the disk it writes;
then it builds the bundle's memory cache of the training slices (``train#dataset``, stage 1) in a child process
and measures the memory it adds. A
least-squares line through the sizes gives the cost per patient, the growth exponent between the smallest and the
largest size says whether growth is linear (1) or better (< 1), and the line is extrapolated to full BraTS 2021
(1,251 patients) + Kaggle (7,023 images).

The BraTS cases are ``--base-cases`` generated volumes (240x240x155) linked under new case names as often as
needed: preparation does the same work on a linked case as on a new one (it decompresses, normalises and resizes
every volume), and generating 160 volumes would take half an hour. Kaggle images are generated for each size
(copies would all fall into one duplicate group).

Example::

    python scripts/scale_study.py --out scale.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from benchmark import generate_synthetic
from benchmark_phases import TreeMemorySampler, process_memory_bytes

REPO_ROOT = Path(__file__).resolve().parents[1]
FULL_BRATS_PATIENTS = 1251
FULL_KAGGLE_IMAGES = 7023
KAGGLE_CLASSES = 4
TINY_SHAPE = (24, 24, 24)
GIB = 1024**3


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Measure how preparation time, memory and disk grow with the number of patients.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 40, 160], help="numbers of patients")
    parser.add_argument("--base-cases", type=int, default=10, help="generated BraTS volumes that the cases link to")
    parser.add_argument("--size", type=int, default=256, help="prepared slice size (prepare_data.py --size)")
    parser.add_argument("--workers", type=int, help="prepare_data.py --workers (default: its own)")
    parser.add_argument("--shape", type=int, nargs=3, help="generated volume shape (default: the generator's)")
    parser.add_argument(
        "--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "brain_tumour_scale", help="scratch folder"
    )
    parser.add_argument("--keep", action="store_true", help="keep each size's prepared folder (disk: see --help)")
    parser.add_argument("--no-cache", action="store_true", help="skip the training-cache measurement")
    parser.add_argument("--out", type=Path, help="JSON file to write the figures to")
    parser.add_argument("--cache-phase", type=Path, help=argparse.SUPPRESS)  # internal: child measuring the cache
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------------------
# Measuring


def measured_run(command: list[str], log: Path) -> dict[str, float]:
    """Run a command from the repository root; its wall time and the peak memory (PSS) of its process tree."""
    with open(log, "w") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT)
        with TreeMemorySampler(process.pid) as sampler:
            code = process.wait()
        wall = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(command)} exited {code}; see {log}")
    return {"wall_s": wall, "peak_tree_pss_gib": sampler.peak / GIB}


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under a folder."""
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


# ----------------------------------------------------------------------------------------------------------------------
# Data


def linked_cases(base: Path, patients: int, out: Path) -> Path:
    """``patients`` BraTS 2021 case folders whose files link to the base cases in turn."""
    if out.exists():
        shutil.rmtree(out)
    sources = sorted(path for path in base.iterdir() if path.is_dir())
    for index in range(patients):
        source = sources[index % len(sources)]
        case = out / f"BraTS2021_{index:05d}"
        case.mkdir(parents=True)
        for file in source.iterdir():
            (case / file.name.replace(source.name, case.name)).symlink_to(file.resolve())
    return out


def kaggle_per_class(patients: int) -> int:
    """Kaggle images per class for this many patients, at the real collections' ratio."""
    return max(2, round(patients * FULL_KAGGLE_IMAGES / FULL_BRATS_PATIENTS / KAGGLE_CLASSES))


# ----------------------------------------------------------------------------------------------------------------------
# The training cache (child process)


def cache_phase(dataset_dir: Path) -> dict[str, Any]:
    """Memory (PSS) that the bundle's memory cache of the stage-1 training slices adds (run in a child process)."""
    sys.path.insert(0, str(REPO_ROOT / "bundle"))
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / "bundle/configs/train.yaml")])
    parser.update({"bundle_root": str(REPO_ROOT / "bundle"), "dataset_dir": str(dataset_dir), "stage": 1,
                   "cache": "memory", "cache_rate": 1.0, "mlflow_tracking": False})  # fmt: skip
    items = parser.get_parsed_content("brats_training")
    before = process_memory_bytes(os.getpid())
    start = time.perf_counter()
    dataset = parser.get_parsed_content("train#dataset")
    fill_s = time.perf_counter() - start
    added = process_memory_bytes(os.getpid()) - before
    return {"slices": len(dataset), "items": len(items), "cache_pss_gib": added / GIB, "fill_s": fill_s}


def measure_cache(dataset_dir: Path, work: Path) -> dict[str, Any]:
    """Run :func:`cache_phase` in a child process and return its figures."""
    result = work / "cache.json"
    measured_run([sys.executable, str(Path(__file__).resolve()), "--cache-phase", str(dataset_dir), "--out",
                  str(result)], work / "cache.log")  # fmt: skip
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------------------------------------------------
# Growth and extrapolation


def line_fit(xs: Sequence[float], ys: Sequence[float]) -> tuple[float, float]:
    """Least-squares ``y = intercept + slope * x``."""
    slope, intercept = np.polyfit(np.asarray(xs, float), np.asarray(ys, float), 1)
    return float(intercept), float(slope)


def growth(xs: Sequence[float], ys: Sequence[float]) -> dict[str, float]:
    """Line fit, growth exponent (log-log slope from the smallest to the largest size) and full-size estimate."""
    intercept, slope = line_fit(xs, ys)
    exponent = float(np.log(ys[-1] / ys[0]) / np.log(xs[-1] / xs[0])) if ys[0] > 0 and ys[-1] > 0 else float("nan")
    return {
        "intercept": intercept,
        "per_patient": slope,
        "growth_exponent": exponent,
        "full_estimate": intercept + slope * FULL_BRATS_PATIENTS,
    }


def study_size(patients: int, args: argparse.Namespace, base: Path) -> dict[str, Any]:
    """Prepare one size and measure it."""
    work = args.work_dir / f"n{patients}"
    work.mkdir(parents=True, exist_ok=True)
    # The generator always writes a BraTS case too: a tiny one, not used.
    kaggle = generate_synthetic(
        work / "kaggle_source", 1, kaggle_per_class(patients), work / "generate.log", TINY_SHAPE
    )
    brats = linked_cases(base / "brats", patients, work / "brats")
    prepared = work / "prepared"
    command = [sys.executable, "scripts/prepare_data.py", "--brats", str(brats), "--kaggle", str(kaggle / "kaggle"),
               "--out", str(prepared), "--size", str(args.size), "--force"]  # fmt: skip
    if args.workers:
        command += ["--workers", str(args.workers)]
    run = measured_run(command, work / "prepare_data.log")
    summary = json.loads((prepared / "summary.json").read_text())
    figures = {
        "patients": patients,
        "kaggle_images": summary["kaggle"]["images_found"],
        "slices": summary["brats"]["slices_total"] - summary["brats"]["slices_dropped_little_brain"],
        "prepare_wall_s": run["wall_s"],
        "prepare_peak_tree_pss_gib": run["peak_tree_pss_gib"],
        "prepared_disk_gib": folder_bytes(prepared) / GIB,
        "timings_s": summary["timings_s"],
    }
    if not args.no_cache:
        cache = measure_cache(prepared, work)
        figures.update({"cache_pss_gib": cache["cache_pss_gib"], "cache_slices": cache["slices"],
                        "cache_fill_s": cache["fill_s"]})  # fmt: skip
    if not args.keep:
        shutil.rmtree(prepared)
    return figures


def study(args: argparse.Namespace) -> dict[str, Any]:
    """Every size, then growth and the full-data extrapolation."""
    args.work_dir.mkdir(parents=True, exist_ok=True)
    base = generate_synthetic(args.work_dir / "base", args.base_cases, 2, args.work_dir / "base.log", args.shape)
    sizes = sorted(args.sizes)
    rows = []
    for patients in sizes:
        print(f"  {patients} patients ...", flush=True)
        rows.append(study_size(patients, args, base))
    metrics = ["prepare_wall_s", "prepare_peak_tree_pss_gib", "prepared_disk_gib"]
    metrics += [] if args.no_cache else ["cache_pss_gib"]
    return {
        "machine": {"cpu_count": os.cpu_count(), "load_average_end": [round(x, 2) for x in os.getloadavg()]},
        "settings": {"size": args.size, "base_cases": args.base_cases, "workers": args.workers, "sizes": sizes},
        "rows": rows,
        "growth": {metric: growth(sizes, [row[metric] for row in rows]) for metric in metrics},
        "full": {"brats_patients": FULL_BRATS_PATIENTS, "kaggle_images": FULL_KAGGLE_IMAGES},
    }


def table(result: dict[str, Any]) -> str:
    """The figures as a plain-text table."""
    lines = [f"{'patients':>8} {'images':>7} {'slices':>7} {'prepare s':>10} {'prep PSS GiB':>13} {'disk GiB':>9}"
             f" {'cache GiB':>10}"]  # fmt: skip
    for row in result["rows"]:
        cache = row.get("cache_pss_gib")
        lines.append(
            f"{row['patients']:>8} {row['kaggle_images']:>7} {row['slices']:>7} {row['prepare_wall_s']:>10.1f}"
            f" {row['prepare_peak_tree_pss_gib']:>13.2f} {row['prepared_disk_gib']:>9.2f}"
            f" {'' if cache is None else f'{cache:.2f}':>10}"
        )
    lines.append("growth (exponent 1 = linear) and full BraTS 2021 + Kaggle estimate:")
    for metric, fit in result["growth"].items():
        lines.append(
            f"  {metric:<28} exponent {fit['growth_exponent']:.2f}  per patient {fit['per_patient']:.4g}"
            f"  full {fit['full_estimate']:.3g}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the study, print the table, write the JSON."""
    args = parse_args(argv)
    if args.cache_phase:
        args.out.write_text(json.dumps(cache_phase(args.cache_phase)))
        return 0
    result = study(args)
    print(table(result))
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"Figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
