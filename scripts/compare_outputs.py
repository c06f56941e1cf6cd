#!/usr/bin/env python
"""Check two inference output folders against each other and against their inputs.

For the bundle command and the MONAI Deploy application run on the same inputs::

    python scripts/compare_outputs.py bundle/eval/inference bundle/eval/deploy

Every volume mask must have exactly the shape and affine of the file named by its JSON's ``grid_file`` (so that it
overlays the input in 3D Slicer or ITK-SNAP), both folders must hold the same outputs, and masks and per-volume
results must be equal. Exit status 0 when all holds, 1 otherwise (each problem printed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image

# The bundle's package is `scripts.*` with bundle/ on sys.path, as MONAI's bundle runner sets it up.
REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT / "bundle") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "bundle"))

from scripts.inference.names import REPORT_SUFFIX  # noqa: E402

__all__ = ["compare_outputs", "main"]

_TOLERANCE = 1e-5


def _read_mask(path: Path) -> np.ndarray:
    if path.name.endswith(".nii.gz"):
        return np.asanyarray(nib.load(str(path)).dataobj)
    return np.asarray(Image.open(path))


def _overlay_problem(folder: Path, report: dict) -> str | None:
    mask, grid = nib.load(str(folder / report["mask"])), nib.load(report["grid_file"])
    if mask.shape != grid.shape[:3] or not np.allclose(mask.affine, grid.affine, atol=_TOLERANCE):
        return f"{folder / report['mask']} does not overlay {report['grid_file']} (shape or affine differ)"
    return None


def _summary(report: dict) -> dict:
    return report["volume"] if report["type"] == "volume" else {"tumour_probability": report["tumour_probability"]}


def _same_summary(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(
        np.isclose(first[k], second[k], atol=_TOLERANCE) if isinstance(first[k], float) else first[k] == second[k]
        for k in first
    )


def compare_outputs(first: Path, second: Path) -> tuple[int, list[str]]:
    """Compare two output folders.

    Returns:
        The number of inputs compared, and one line per problem (empty when they agree and every mask overlays its
        input).
    """
    reports = {p.name: p for p in Path(first).glob(f"*{REPORT_SUFFIX}")}
    others = {p.name: p for p in Path(second).glob(f"*{REPORT_SUFFIX}")}
    problems = [f"{name} is only in {first}" for name in sorted(reports.keys() - others.keys())]
    problems += [f"{name} is only in {second}" for name in sorted(others.keys() - reports.keys())]
    for name in sorted(reports.keys() & others.keys()):
        report, other = (json.loads(p.read_text()) for p in (reports[name], others[name]))
        if report["type"] == "volume":
            problems += [p for p in (_overlay_problem(Path(first), report), _overlay_problem(Path(second), other)) if p]
        if not np.array_equal(_read_mask(Path(first) / report["mask"]), _read_mask(Path(second) / other["mask"])):
            problems.append(f"the masks of {report['input']} differ")
        if not _same_summary(_summary(report), _summary(other)):
            problems.append(f"the results for {report['input']} differ")
    return len(reports.keys() & others.keys()), problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("first", type=Path, help="an output folder (e.g. the bundle command's)")
    parser.add_argument("second", type=Path, help="another one (e.g. the Deploy application's)")
    args = parser.parse_args(argv)
    compared, problems = compare_outputs(args.first, args.second)
    for problem in problems:
        print(problem)
    if problems or not compared:
        print(f"{len(problems)} problem(s) in {compared} input(s) compared")
        return 1
    print(f"{compared} input(s): identical masks and results, every volume mask overlays its input")
    return 0


if __name__ == "__main__":
    sys.exit(main())
