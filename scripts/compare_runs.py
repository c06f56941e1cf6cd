"""Compare the latest multi-task pipeline with the single-task baselines, from their MLflow runs.

    python scripts/compare_runs.py [--tracking-uri URI] [--experiment NAME] [--out-dir DIR]

For each variant (multitask, baseline_seg, baseline_cls) it takes the newest finished pipeline run of the
experiment and reads what training and evaluate.yaml logged into it: test-split per-patient Dice, HD95, AUC,
accuracy, F1, the parameters the model uses, training time and inference latency (where logged). It prints them
side by side with the best of each column marked, writes comparison.json and comparison.png to DIR, and logs both
into the multi-task run under ``comparison/``. A column a model has no task for shows "-".

The store defaults to the bundle's (``MLFLOW_TRACKING_URI`` if set, else ``bundle/mlruns/mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from scripts.tracking import PARENT_TAG, default_tracking_uri  # noqa: E402

VARIANTS = ("multitask", "baseline_seg", "baseline_cls")
# (MLflow metric or param, column title, True when larger is better, None when neither: a cost)
COLUMNS = (
    ("test_brats_patient_dice_mean", "patient Dice", True),
    ("test_brats_hd95_mean", "HD95 mm", False),
    ("test_brats_cls_roc_auc", "BraTS AUC", True),
    ("test_kaggle_cls_roc_auc", "Kaggle AUC", True),
    ("test_kaggle_cls_accuracy", "Kaggle acc", True),
    ("test_kaggle_cls_f1", "Kaggle F1", True),
    ("parameters", "parameters", False),
    ("training_time_s", "train s", False),
    ("test_latency_ms_per_slice", "ms/slice", False),
)
QUALITY = [key for key, _, _ in COLUMNS[:6]]


def latest_pipeline_runs(client, experiment_id: str) -> dict[str, object]:
    """The newest finished pipeline run of each variant."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.kind = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=200,
    )
    latest: dict[str, object] = {}
    for run in runs:
        variant = run.data.tags.get("variant")
        if variant in VARIANTS and variant not in latest:
            latest[variant] = run
    return {variant: latest[variant] for variant in VARIANTS if variant in latest}


def parameters_of(client, run) -> float | None:
    """Parameters the model uses: the largest count its stage runs logged (every stage trains the same model)."""
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'", max_results=50
    )
    counts = [
        float(child.data.params["parameters_used"]) for child in children if "parameters_used" in child.data.params
    ]
    return max(counts) if counts else None


def table_rows(client, runs: dict[str, object]) -> dict[str, dict[str, float | None]]:
    rows = {}
    for variant, run in runs.items():
        metrics = run.data.metrics
        row: dict[str, float | None] = {key: metrics.get(key) for key, _, _ in COLUMNS}
        row["parameters"] = parameters_of(client, run)
        rows[variant] = row
    return rows


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def best_per_column(rows: dict[str, dict[str, float | None]]) -> dict[str, str]:
    """The variant with the best value of each column (ties go to the first listed)."""
    best = {}
    for key, _, larger_is_better in COLUMNS:
        values = {variant: row[key] for variant, row in rows.items() if _defined(row[key])}
        if len(values) > 1:
            best[key] = (max if larger_is_better else min)(values, key=values.get)
    return best


def _cell(key: str, value: float | None) -> str:
    if not _defined(value):
        return "-"
    if key == "parameters":
        return f"{value:,.0f}"
    if key in ("training_time_s", "test_latency_ms_per_slice", "test_brats_hd95_mean"):
        return f"{value:.1f}"
    return f"{value:.3f}"


def format_table(rows: dict[str, dict[str, float | None]], runs: dict[str, object]) -> str:
    best = best_per_column(rows)
    widths = [max(len(title), 12) for _, title, _ in COLUMNS]
    lines = [f"{'model':<13}" + "".join(f" {title:>{w}}" for (_, title, _), w in zip(COLUMNS, widths, strict=True))]
    for variant, row in rows.items():
        cells = [_cell(key, row[key]) + ("*" if best.get(key) == variant else "") for key, _, _ in COLUMNS]
        lines.append(f"{variant:<13}" + "".join(f" {c:>{w}}" for c, w in zip(cells, widths, strict=True)))
    lines.append("* best in its column.  Runs: " + ", ".join(f"{v} = {r.info.run_name!r}" for v, r in runs.items()))
    return "\n".join(lines)


def plot(rows: dict[str, dict[str, float | None]], path: Path) -> None:
    """Grouped bars of the quality metrics (0-1 scale; HD95 on its own axis would mislead, so it is left out)."""
    keys = [key for key in QUALITY if key != "test_brats_hd95_mean"]
    titles = {key: title for key, title, _ in COLUMNS}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(rows), 1)
    for index, (variant, row) in enumerate(rows.items()):
        values = [row[key] if _defined(row[key]) else 0.0 for key in keys]
        bars = ax.bar([k + index * width for k in range(len(keys))], values, width, label=variant)
        for bar, key in zip(bars, keys, strict=True):
            if not _defined(row[key]):
                ax.text(bar.get_x() + bar.get_width() / 2, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))], [titles[k] for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("test split")
    ax.set_title("Multi-task model vs single-task baselines")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tracking-uri", default=None, help="MLflow store (default: the bundle's sqlite store)")
    parser.add_argument("--experiment", default="brain_tumour_multitask", help="MLflow experiment name")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "bundle" / "eval", help="for the JSON and PNG")
    args = parser.parse_args(argv)

    from mlflow.tracking import MlflowClient

    uri = args.tracking_uri or default_tracking_uri(REPO_ROOT / "bundle")
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"No experiment {args.experiment!r} in {uri}: train with tracking on first.", file=sys.stderr)
        return 1
    runs = latest_pipeline_runs(client, experiment.experiment_id)
    if not runs:
        print(f"No finished pipeline run in experiment {args.experiment!r} at {uri}.", file=sys.stderr)
        return 1
    rows = table_rows(client, runs)
    print(format_table(rows, runs))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = {
        "tracking_uri": uri,
        "experiment": args.experiment,
        "runs": {variant: run.info.run_id for variant, run in runs.items()},
        "models": rows,
        "best": best_per_column(rows),
    }
    json_path, png_path = args.out_dir / "comparison.json", args.out_dir / "comparison.png"
    json_path.write_text(json.dumps(table, indent=2))
    plot(rows, png_path)
    target = runs.get("multitask") or next(iter(runs.values()))
    for path in (json_path, png_path):
        client.log_artifact(target.info.run_id, str(path), "comparison")
    print(f"\nComparison written to {json_path} and {png_path}, and logged to run {target.info.run_name!r}.")
    print(f"Browse the runs: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"Runs at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
