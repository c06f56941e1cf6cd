"""Compare the latest multi-task pipeline with the single-task baselines, from their MLflow runs.

    python scripts/compare_runs.py [--tracking-uri URI] [--experiment NAME] [--out-dir DIR] [--split S] [--seeds]
                                   [--run-id ID | --run-name NAME ...]

For each variant (multitask, baseline_seg, baseline_cls) it takes the newest finished pipeline run of the
experiment and reads what training and evaluate.yaml logged into it: per-patient Dice, HD95, the official BraTS
lesion-wise Dice and HD95 on the volume's grid, AUC, accuracy and F1 of the split (``--split``: test, the default,
or validation for a study's runs), the parameters the model uses, training time and inference latency (where
logged). It prints them side by side with the best of each column marked, writes comparison.json and
comparison.png to DIR, and logs both into the multi-task run under ``comparison/``. A column a model has no task
for shows "-".

``--run-id ID`` or ``--run-name NAME`` (as the MLflow UI shows them) names a pipeline run
to show in place of its variant's newest, e.g. an earlier multi-task run beside today's baselines; of several runs
with that name the newest is taken, and said so. ``--seeds`` takes the newest finished run of every
seed instead (e.g. the store of scripts/seed_study.py): each cell is the mean over the seeds with their range
[min-max] beside it, so that a difference between models can be read against how much the seed alone moves it.

The store defaults to the bundle's (``MLFLOW_TRACKING_URI`` if set, else ``bundle/mlruns/mlflow.db``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from scripts.tracking import PARENT_TAG, default_tracking_uri, mlflow_client  # noqa: E402

VARIANTS = ("multitask", "baseline_seg", "baseline_cls")
# (MLflow metric or param, column title, True when larger is better, False for a cost), "{split}" the split scored
COLUMN_SPECS = (
    ("{split}_brats_patient_dice_mean", "patient Dice", True),
    ("{split}_brats_hd95_mean", "HD95 mm", False),
    ("{split}_brats_patient_lesionwise_dice_mean", "lesion-wise Dice", True),
    ("{split}_brats_patient_lesionwise_hd95_mean", "lesion-wise HD95", False),
    ("{split}_brats_cls_roc_auc", "BraTS AUC", True),
    ("{split}_kaggle_cls_roc_auc", "Kaggle AUC", True),
    ("{split}_kaggle_cls_accuracy", "Kaggle acc", True),
    ("{split}_kaggle_cls_f1", "Kaggle F1", True),
    ("parameters", "parameters", False),
    ("training_time_s", "train s", False),
    ("{split}_latency_ms_per_slice", "ms/slice", False),
)


def columns(split: str) -> tuple[tuple[str, str, bool], ...]:
    return tuple((key.format(split=split), title, larger) for key, title, larger in COLUMN_SPECS)


def finished_pipeline_runs(client, experiment_id: str, per_seed: bool = False) -> dict[str, list]:
    """The newest finished pipeline run of each variant, or with ``per_seed`` the newest of each seed."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.kind = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    latest: dict[str, dict[str, object]] = {}
    for run in runs:
        variant = run.data.tags.get("variant")
        seed = run.data.params.get("seed", "") if per_seed else ""
        if variant in VARIANTS:
            latest.setdefault(variant, {}).setdefault(seed, run)
    return {variant: list(latest[variant].values()) for variant in VARIANTS if variant in latest}


def pipeline_runs(client, experiment_id: str) -> Iterator:
    """Every pipeline run of the experiment, newest first, page by page (a study may hold thousands)."""
    token = None
    while True:
        page = client.search_runs(
            [experiment_id], filter_string="tags.kind = 'pipeline'", order_by=["attributes.start_time DESC"],
            max_results=1000, page_token=token,
        )  # fmt: skip
        yield from page
        token = page.token
        if not token:
            return


def picked_run(client, experiment_id: str, by: str, wanted: str):
    """The pipeline run ``--run-id`` or ``--run-name`` (``by``: id or name) names, or None.

    Names are matched here rather than in a search filter: MLflow's filter has no escape for a quote in a name.
    Names need not be unique (a run renamed in the UI, a study's runs): of several, the newest, said on stderr.
    """
    if by == "id":
        return next((run for run in pipeline_runs(client, experiment_id) if run.info.run_id == wanted), None)
    named = [run for run in pipeline_runs(client, experiment_id) if run.info.run_name == wanted]
    if len(named) > 1:
        print(f"{len(named)} pipeline runs are named {wanted!r}: showing the newest, {named[0].info.run_id} (pick "
              "another with --run-id).", file=sys.stderr)  # fmt: skip
    return named[0] if named else None


def parameters_of(client, run) -> float | None:
    """Parameters the model uses: the largest count its stage runs logged (every stage trains the same model)."""
    children = client.search_runs(
        [run.info.experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{run.info.run_id}'", max_results=50
    )
    counts = [
        float(child.data.params["parameters_used"]) for child in children if "parameters_used" in child.data.params
    ]
    return max(counts) if counts else None


def table_rows(client, runs: dict[str, list], split: str) -> dict[str, dict[str, float | None]]:
    """Each variant's value of each column: the mean over its runs (seeds), with ``<key>_range`` [min, max]."""
    rows = {}
    for variant, variant_runs in runs.items():
        row: dict = {}
        for key, _, _ in columns(split):
            values = [parameters_of(client, run) if key == "parameters" else run.data.metrics.get(key)
                      for run in variant_runs]  # fmt: skip
            values = [value for value in values if _defined(value)]
            row[key] = sum(values) / len(values) if values else None
            if len(variant_runs) > 1 and values:
                row[key + "_range"] = [min(values), max(values)]
        rows[variant] = row
    return rows


def _defined(value: float | None) -> bool:
    return value is not None and not math.isnan(value)


def best_per_column(rows: dict[str, dict[str, float | None]], split: str) -> dict[str, str]:
    """The variant with the best value of each column (ties go to the first listed)."""
    best = {}
    for key, _, larger_is_better in columns(split):
        values = {variant: row[key] for variant, row in rows.items() if _defined(row[key])}
        if len(values) > 1:
            best[key] = (max if larger_is_better else min)(values, key=values.get)
    return best


def _number(key: str, value: float) -> str:
    if key == "parameters":
        return f"{value:,.0f}"
    if key == "training_time_s" or key.endswith(("_latency_ms_per_slice", "_hd95_mean")):
        return f"{value:.1f}"
    return f"{value:.3f}"


def _cell(key: str, row: dict) -> str:
    if not _defined(row[key]):
        return "-"
    spread = row.get(key + "_range")
    low_high = f" [{_number(key, spread[0])}-{_number(key, spread[1])}]" if spread and key != "parameters" else ""
    return _number(key, row[key]) + low_high


def format_table(rows: dict[str, dict], runs: dict[str, list], split: str) -> str:
    best, cols = best_per_column(rows, split), columns(split)
    cells = {
        v: [_cell(key, row) + ("*" if best.get(key) == v else "") for key, _, _ in cols] for v, row in rows.items()
    }
    widths = [max([len(title), 10] + [len(c[i]) for c in cells.values()]) for i, (_, title, _) in enumerate(cols)]
    lines = [f"{'model':<13}" + "".join(f" {title:>{w}}" for (_, title, _), w in zip(cols, widths, strict=True))]
    for variant, row_cells in cells.items():
        lines.append(f"{variant:<13}" + "".join(f" {c:>{w}}" for c, w in zip(row_cells, widths, strict=True)))
    seeds = max(len(variant_runs) for variant_runs in runs.values())
    named = ", ".join(f"{v} = {r[0].info.run_name!r}" for v, r in runs.items())
    footer = f"mean [min-max] over {seeds} seeds" if seeds > 1 else f"Runs: {named}"
    lines.append(f"{split} split. * best in its column.  {footer}")
    return "\n".join(lines)


def plot(rows: dict[str, dict], path: Path, split: str) -> None:
    """Grouped bars of the quality metrics (0-1 scale; HD95 on its own axis would mislead, so it is left out)."""
    cols = columns(split)
    keys = [key for key, _, _ in cols[:8] if not key.endswith("_hd95_mean")]
    titles = {key: title for key, title, _ in cols}
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / max(len(rows), 1)
    for index, (variant, row) in enumerate(rows.items()):
        values = [row[key] if _defined(row[key]) else 0.0 for key in keys]
        # With several seeds, a line from their lowest to their highest value.
        ranges = [row.get(key + "_range") for key in keys]
        errors = [
            [v - r[0] if r else 0 for v, r in zip(values, ranges, strict=True)],
            [r[1] - v if r else 0 for v, r in zip(values, ranges, strict=True)],
        ]
        bars = ax.bar([k + index * width for k in range(len(keys))], values, width, label=variant, yerr=errors,
                      capsize=2)  # fmt: skip
        for bar, key in zip(bars, keys, strict=True):
            if not _defined(row[key]):
                ax.text(bar.get_x() + bar.get_width() / 2, 0.02, "n/a", ha="center", fontsize=7, rotation=90)
    ax.set_xticks([k + width * (len(rows) - 1) / 2 for k in range(len(keys))], [titles[k] for k in keys])
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"{split} split")
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
    parser.add_argument("--split", default="test", choices=["test", "validation"], help="the evaluation to compare")
    parser.add_argument("--seeds", action="store_true", help="every seed's newest run: mean and range over seeds")
    picks = {"--run-id": ("id", "ID", "run id"), "--run-name": ("name", "NAME", "run name (the newest of the name)")}
    for option, (by, metavar, which) in picks.items():  # one list, in command-line order: a later pick wins
        parser.add_argument(
            option, dest="picks", action="append", default=[], metavar=metavar, type=lambda wanted, by=by: (by, wanted),
            help=f"a pipeline run to show instead of its variant's newest, by {which}; repeat for each model",
        )  # fmt: skip
    args = parser.parse_args(argv)

    uri = args.tracking_uri or default_tracking_uri(REPO_ROOT / "bundle")
    client = mlflow_client(uri)  # re-points a moved store at its artifacts' new place
    experiment = client.get_experiment_by_name(args.experiment)
    if experiment is None:
        print(f"No experiment {args.experiment!r} in {uri}: train with tracking on first.", file=sys.stderr)
        return 1
    runs = finished_pipeline_runs(client, experiment.experiment_id, per_seed=args.seeds)
    for by, wanted in args.picks:
        run = picked_run(client, experiment.experiment_id, by, wanted)
        if run is None:
            print(f"No pipeline run with {by} {wanted!r} in experiment {args.experiment!r} at {uri}.",
                  file=sys.stderr)  # fmt: skip
            return 1
        runs[run.data.tags["variant"]] = [run]
    if not runs:
        print(f"No finished pipeline run in experiment {args.experiment!r} at {uri}.", file=sys.stderr)
        return 1
    rows = table_rows(client, runs, args.split)
    print(format_table(rows, runs, args.split))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = {
        "tracking_uri": uri,
        "experiment": args.experiment,
        "split": args.split,
        "runs": {
            variant: [run.info.run_id for run in variant_runs] if args.seeds else variant_runs[0].info.run_id
            for variant, variant_runs in runs.items()
        },
        "models": rows,
        "best": best_per_column(rows, args.split),
    }
    json_path, png_path = args.out_dir / "comparison.json", args.out_dir / "comparison.png"
    json_path.write_text(json.dumps(table, indent=2))
    plot(rows, png_path, args.split)
    target = (runs.get("multitask") or next(iter(runs.values())))[0]
    for path in (json_path, png_path):
        client.log_artifact(target.info.run_id, str(path), "comparison")
    print(f"\nComparison written to {json_path} and {png_path}, and logged to run {target.info.run_name!r}.")
    print(f"Browse the runs: mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"Runs at {uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
