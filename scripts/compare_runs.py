"""Compare the multi-task model with the single-task baselines on the test split.

    python scripts/compare_runs.py [--eval-dir bundle/eval] [--models-dir bundle/models] [--out FILE.json]

Reads the ``metrics.json`` that ``evaluate.yaml`` wrote for each model (``eval/`` for the multi-task model,
``eval/baseline_seg/`` and ``eval/baseline_cls/`` for the baselines), prints them side by side with the best value
of each column marked, and writes the table as JSON. A column a model has no task for shows "-".
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

VARIANTS = {"multitask": "", "baseline_seg": "baseline_seg", "baseline_cls": "baseline_cls"}
# (metrics.json key, column title, True when larger is better)
COLUMNS = (
    ("brats_patient_dice_mean", "patient Dice", True),
    ("brats_hd95_mean", "HD95 (mm)", False),
    ("brats_slice_dice_mean", "slice Dice", True),
    ("brats_cls_roc_auc", "BraTS AUC", True),
    ("kaggle_cls_roc_auc", "Kaggle AUC", True),
    ("kaggle_cls_accuracy", "Kaggle acc", True),
    ("kaggle_cls_f1", "Kaggle F1", True),
)
# The parts of the network each model uses; the unused ones are not counted as its parameters.
USED_PARTS = {
    "multitask": ("encoder.", "decoder.", "cls_head."),
    "baseline_seg": ("encoder.", "decoder."),
    "baseline_cls": ("encoder.", "cls_head."),
}


def parameter_count(model_file: Path, variant: str) -> int | None:
    """Parameters of the parts a model uses, from its saved weights (BatchNorm buffers excluded)."""
    if not model_file.is_file():
        return None
    state = torch.load(model_file, map_location="cpu", weights_only=True)
    return sum(
        value.numel()
        for key, value in state.items()
        if key.startswith(USED_PARTS[variant])
        and not key.endswith(("running_mean", "running_var", "num_batches_tracked"))
    )


def load_rows(eval_dir: Path, models_dir: Path) -> dict[str, dict[str, float | None]]:
    """One row of metrics per evaluated model; models without a metrics.json are left out."""
    rows = {}
    for variant, folder in VARIANTS.items():
        metrics_file = eval_dir / folder / "metrics.json"
        if not metrics_file.is_file():
            continue
        metrics = json.loads(metrics_file.read_text())
        row: dict[str, float | None] = {key: metrics.get(key) for key, _, _ in COLUMNS}
        row["parameters"] = parameter_count(models_dir / folder / "model.pt", variant)
        rows[variant] = row
    return rows


def best_per_column(rows: dict[str, dict[str, float | None]]) -> dict[str, str]:
    """The variant with the best value of each metric column (ties go to the first listed)."""
    best = {}
    for key, _, larger_is_better in COLUMNS:
        values = {v: r[key] for v, r in rows.items() if r[key] is not None and not math.isnan(r[key])}
        if values:
            best[key] = (max if larger_is_better else min)(values, key=values.get)
    return best


def format_table(rows: dict[str, dict[str, float | None]]) -> str:
    best = best_per_column(rows)
    titles = ["model", *(title for _, title, _ in COLUMNS), "parameters"]
    lines = [" | ".join(f"{t:>13}" for t in titles)]
    for variant, row in rows.items():
        cells = [f"{variant:>13}"]
        for key, _, _ in COLUMNS:
            value = row[key]
            text = (
                "-"
                if value is None or math.isnan(value)
                else f"{value:.3f}" + ("*" if best.get(key) == variant else "")
            )
            cells.append(f"{text:>13}")
        cells.append(f"{row['parameters']:>13,}" if row["parameters"] is not None else f"{'-':>13}")
        lines.append(" | ".join(cells))
    lines.append("* best in its column")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--eval-dir", type=Path, default=Path("bundle/eval"), help="evaluate.yaml's output_dir")
    parser.add_argument("--models-dir", type=Path, default=Path("bundle/models"), help="train.yaml's ckpt_dir")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON file for the table (default: EVAL_DIR/comparison.json)"
    )
    args = parser.parse_args(argv)

    rows = load_rows(args.eval_dir, args.models_dir)
    if not rows:
        print(f"No evaluated model under {args.eval_dir}: run evaluate.yaml first.", file=sys.stderr)
        return 1
    print(format_table(rows))
    out = args.out or args.eval_dir / "comparison.json"
    out.write_text(json.dumps({"models": rows, "best": best_per_column(rows)}, indent=2))
    print(f"\nComparison written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
