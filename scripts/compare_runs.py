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

``--folds`` (automatic when the newest run of every model carries a ``fold`` tag, as ``scripts/seed_study.py
--folds K`` leaves them) takes the newest finished run of every cross-validation fold: each cell is the mean over
the K folds ± the half-width of its 95% confidence interval, a t-interval with K - 1 degrees of freedom
(mean ± t(0.975, K-1) * s / sqrt(K)), wider than the normal one as it should be for a handful of folds. The folds
share most of their training data, so their results are not independent and the interval is, as usual for
cross-validation, approximate (on the narrow side).

Below the table, the multi-task model against each baseline, paired on the same units: per-patient Dice and HD95
against the segmentation-only model, Kaggle-image AUC and BraTS-slice AUC against the classification-only model.
The bootstrap resamples images, and BraTS subjects whole (a patient's slices and a person's timepoints are not
independent). The units of every fold (seed) are pooled: on ``--split validation`` each patient and image is
out-of-fold in exactly one fold, so each counts once; a unit scored by several runs (the test split of every fold)
counts once with its mean over them (for AUCs, the mean probability). The difference (multi-task minus baseline) has
a 95% percentile bootstrap interval (2,000 resamples, seed 0; both models' statistic on the same resample) and a
verdict: better or worse where the interval excludes 0, else "no difference detected". The units come from the
``per_patient.csv`` and ``per_image.csv`` that evaluate.yaml logs into each run.

The store defaults to the bundle's (``MLFLOW_TRACKING_URI`` if set, else ``bundle/mlruns/mlflow.db``).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from scipy import stats

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from scripts.data.splits import subject_of  # noqa: E402
from scripts.tracking import PARENT_TAG, default_tracking_uri, evaluation_folder, mlflow_client  # noqa: E402

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


# Multi-task vs a baseline, paired by unit: (baseline, title, table, source, value column, unit columns, statistic,
# True when larger is better). The bootstrap resamples the subject of a unit's first column (a Kaggle group is its own).
PAIRED_SPECS = (
    ("baseline_seg", "patient Dice", "per_patient.csv", None, "dice", ("patient",), "mean", True),
    ("baseline_seg", "HD95 mm", "per_patient.csv", None, "hd95", ("patient",), "mean", False),
    ("baseline_cls", "Kaggle AUC", "per_image.csv", "kaggle", "prob", ("key",), "auc", True),
    ("baseline_cls", "BraTS AUC", "per_image.csv", "brats", "prob", ("key", "z"), "auc", True),
)
RESAMPLES, BOOTSTRAP_SEED = 2000, 0


def t_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """The mean and its two-sided t confidence interval, mean ± t((1 + confidence) / 2, n - 1) * s / sqrt(n) with s
    the sample standard deviation; NaN bounds for fewer than two values."""
    x = np.asarray(values, dtype=np.float64)
    if x.size < 2:
        return float(x.mean()) if x.size else math.nan, math.nan, math.nan
    half = float(stats.t.ppf((1 + confidence) / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return float(x.mean()), float(x.mean()) - half, float(x.mean()) + half


def roc_auc(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half); NaN without both classes. Ranks make it fast
    enough for thousands of bootstrap resamples."""
    positive = np.asarray(targets) == 1
    n_pos, n_neg = int(positive.sum()), int((~positive).sum())
    if not n_pos or not n_neg:
        return math.nan
    ranks = stats.rankdata(scores)
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


STATISTICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "mean": lambda values, _: float(np.mean(values)),
    "auc": lambda scores, targets: roc_auc(targets, scores),
}


def verdict(low: float, high: float, larger_is_better: bool = True) -> str:
    """Better or worse when the interval of (multi-task - baseline) excludes 0, else no difference detected."""
    if not (_defined(low) and _defined(high)):
        return "not enough data"
    if low > 0 or high < 0:
        return "better" if (low > 0) == larger_is_better else "worse"
    return "no difference detected"


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    statistic: str = "mean",
    targets: Sequence[int] | None = None,
    clusters: Sequence[str] | None = None,
    larger_is_better: bool = True,
    resamples: int = RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
) -> dict:
    """The difference statistic(a) - statistic(b) of two models scored on the same units, with its 95% percentile
    bootstrap interval and :func:`verdict`.

    Each resample draws the clusters (by default each unit its own) with replacement and computes both models'
    statistic on the same drawn units, so that what the units share (a hard patient) cancels out of the difference.
    Resamples where the statistic is undefined (an AUC without both classes) are left out.

    Args:
        a, b: each unit's value (Dice, HD95, probability) under the multi-task model and the baseline.
        statistic: ``mean`` or ``auc`` (of ``targets`` by the values).
        targets: 0/1 classes, for ``auc``.
        clusters: each unit's cluster (a BraTS slice's patient), resampled whole.
        larger_is_better: False for a cost (HD95): a negative difference is then better.
        resamples, seed: the bootstrap's size and seed.

    Returns:
        ``difference``, ``ci95`` [low, high], ``units``, ``clusters`` and ``verdict``.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    targets_array = np.zeros(a.size, dtype=np.int64) if targets is None else np.asarray(targets)
    names = np.arange(a.size) if clusters is None else np.asarray(clusters)
    members = [np.flatnonzero(names == name) for name in np.unique(names)]
    compute = STATISTICS[statistic]
    difference = compute(a, targets_array) - compute(b, targets_array)
    rng = np.random.default_rng(seed)
    differences = np.empty(resamples)
    for index in range(resamples):
        drawn = np.concatenate([members[k] for k in rng.integers(0, len(members), len(members))])
        differences[index] = compute(a[drawn], targets_array[drawn]) - compute(b[drawn], targets_array[drawn])
    differences = differences[~np.isnan(differences)]
    low, high = (float(v) for v in np.percentile(differences, [2.5, 97.5])) if differences.size else (math.nan,) * 2
    return {"difference": difference, "ci95": [low, high], "units": int(a.size), "clusters": len(members),
            "verdict": verdict(low, high, larger_is_better)}  # fmt: skip


def columns(split: str) -> tuple[tuple[str, str, bool], ...]:
    return tuple((key.format(split=split), title, larger) for key, title, larger in COLUMN_SPECS)


def fold_of(run) -> str | None:
    """The cross-validation fold a pipeline run trained (its ``fold`` tag), None for the prepared split."""
    return run.data.tags.get("fold")


def finished_pipeline_runs(client, experiment_id: str, per_seed: bool = False, per_fold: bool = False) -> dict:
    """The newest finished pipeline run of each variant; with ``per_seed`` the newest of each seed; with ``per_fold``
    the newest of each fold whatever its seed (runs without a fold left out), folds in order."""
    runs = client.search_runs(
        [experiment_id],
        filter_string="tags.kind = 'pipeline' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1000,
    )
    latest: dict[str, dict[tuple, object]] = {}
    for run in runs:
        variant, fold = run.data.tags.get("variant"), fold_of(run)
        if variant not in VARIANTS or (per_fold and fold is None):
            continue
        key = int(fold) if per_fold else run.data.params.get("seed", "") if per_seed else ""
        latest.setdefault(variant, {}).setdefault(key, run)
    return {variant: [latest[variant][key] for key in (sorted(latest[variant]) if per_fold else latest[variant])]
            for variant in VARIANTS if variant in latest}  # fmt: skip


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


def table_rows(client, runs: dict[str, list], split: str, per_fold: bool = False) -> dict[str, dict[str, float | None]]:
    """Each variant's value of each column: the mean over its runs (seeds or folds), with ``<key>_range`` [min, max]
    over seeds or, with ``per_fold``, ``<key>_ci95`` [low, high] (:func:`t_interval`) over folds."""
    rows = {}
    for variant, variant_runs in runs.items():
        row: dict = {}
        for key, _, _ in columns(split):
            values = [parameters_of(client, run) if key == "parameters" else run.data.metrics.get(key)
                      for run in variant_runs]  # fmt: skip
            values = [value for value in values if _defined(value)]
            row[key] = sum(values) / len(values) if values else None
            if per_fold and len(values) > 1:
                row[key + "_ci95"] = list(t_interval(values)[1:])
            elif len(variant_runs) > 1 and values:
                row[key + "_range"] = [min(values), max(values)]
        rows[variant] = row
    return rows


def read_table(client, run, split: str, name: str, cache: dict) -> list[dict[str, str]] | None:
    """A CSV the run's evaluation of ``split`` logged (None when it has none: an evaluation before the file existed)."""
    key = (run.info.run_id, split, name)
    if key not in cache:
        folder = evaluation_folder(split)
        cache[key] = None
        if name in {Path(item.path).name for item in client.list_artifacts(run.info.run_id, folder)}:
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(run.info.run_id, f"{folder}/{name}", tmp)
                with open(path, newline="", encoding="utf-8") as handle:
                    cache[key] = list(csv.DictReader(handle))
    return cache[key]


def unit_values(client, runs: list, split: str, spec: tuple, cache: dict) -> dict[tuple, tuple] | None:
    """Unit -> (value, target, cluster: its subject) over the runs of one model: each unit's mean over the runs that
    scored it (out-of-fold units are scored once); None when a run has no such table."""
    _, _, name, source, column, unit_columns, _, _ = spec
    collected, classes = defaultdict(list), {}
    for run in runs:
        rows = read_table(client, run, split, name, cache)
        if rows is None:
            return None
        for row in rows:
            if (source and row.get("source") != source) or row.get(column, "") == "":  # an undefined HD95
                continue
            unit = tuple(row[c] for c in unit_columns)
            collected[unit].append(float(row[column]))
            classes[unit] = int(row.get("cls") or 0)
    return {unit: (float(np.mean(values)), classes[unit], subject_of(unit[0])) for unit, values in collected.items()}


def paired_differences(client, runs: dict[str, list], split: str) -> list[dict]:
    """The multi-task model against each baseline it has runs beside, per :data:`PAIRED_SPECS`."""
    results, cache = [], {}
    for spec in PAIRED_SPECS:
        baseline, title, name, _, _, _, statistic, larger = spec
        if "multitask" not in runs or baseline not in runs:
            continue
        ours, theirs = (unit_values(client, runs[v], split, spec, cache) for v in ("multitask", baseline))
        if ours is None or theirs is None:
            results.append({"baseline": baseline, "metric": title, "verdict": f"no {name} in the runs"})
            continue
        units = sorted(set(ours) & set(theirs))
        if not units:
            results.append({"baseline": baseline, "metric": title, "verdict": "no unit scored by both"})
            continue
        result = paired_bootstrap(
            [ours[u][0] for u in units], [theirs[u][0] for u in units], statistic, [ours[u][1] for u in units],
            [ours[u][2] for u in units], larger,
        )  # fmt: skip
        results.append({"baseline": baseline, "metric": title, **result})
    return results


def format_paired(paired: list[dict], runs: dict[str, list], per_fold: bool) -> str:
    if not paired:
        return ""
    count = len(runs.get("multitask", []))
    pooled = f"out-of-fold units pooled over {count} folds" if per_fold else "units pooled over the runs"
    lines = [f"Multi-task minus baseline, paired ({pooled}; 95% bootstrap CI, {RESAMPLES} resamples):"]
    for item in paired:
        if "difference" not in item:
            lines.append(f"  {item['metric']:<13} vs {item['baseline']:<13} {item['verdict']}")
            continue
        low, high = item["ci95"]
        units = f"{item['units']} units" + (f" of {item['clusters']} subjects" if item["clusters"] != item["units"]
                                             else "")  # fmt: skip
        lines.append(f"  {item['metric']:<13} vs {item['baseline']:<13} {item['difference']:+.3f} "
                     f"[{low:+.3f}, {high:+.3f}]  {units:<24} {item['verdict']}")  # fmt: skip
    return "\n".join(lines)


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
    interval = row.get(key + "_ci95")
    if interval and _defined(interval[1]):
        return f"{_number(key, row[key])} ±{_number(key, interval[1] - row[key])}"
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
    if any(key.endswith("_ci95") for row in rows.values() for key in row):
        footer = f"mean ±95% CI (t, K-1 dof) over K = {seeds} folds"
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
        # With several seeds, a line from their lowest to their highest value; with folds, the 95% CI.
        ranges = [row.get(key + "_range") or row.get(key + "_ci95") for key in keys]
        errors = [
            [v - r[0] if r and _defined(r[0]) else 0 for v, r in zip(values, ranges, strict=True)],
            [r[1] - v if r and _defined(r[1]) else 0 for v, r in zip(values, ranges, strict=True)],
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
    parser.add_argument("--folds", action="store_true", help="every fold's newest run: mean and 95%% CI over folds "
                        "(automatic when every model's newest run carries a fold)")  # fmt: skip
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
    newest = finished_pipeline_runs(client, experiment.experiment_id)
    per_fold = args.folds or (bool(newest) and all(fold_of(r[0]) is not None for r in newest.values()))
    runs = finished_pipeline_runs(client, experiment.experiment_id, per_seed=args.seeds, per_fold=per_fold)
    if per_fold:
        folds = {variant: [fold_of(run) for run in variant_runs] for variant, variant_runs in runs.items()}
        if len({tuple(f) for f in folds.values()}) > 1:
            print(f"The models' folds differ: {folds}.", file=sys.stderr)
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
    rows = table_rows(client, runs, args.split, per_fold)
    print(format_table(rows, runs, args.split))
    paired = paired_differences(client, runs, args.split)
    if paired:
        print("\n" + format_paired(paired, runs, per_fold))

    args.out_dir.mkdir(parents=True, exist_ok=True)
    table = {
        "tracking_uri": uri,
        "experiment": args.experiment,
        "split": args.split,
        "runs": {
            v: [run.info.run_id for run in variant_runs] if args.seeds or per_fold else variant_runs[0].info.run_id
            for v, variant_runs in runs.items()
        },
        "folds": {v: [fold_of(run) for run in variant_runs] for v, variant_runs in runs.items()} if per_fold else None,
        "models": rows,
        "best": best_per_column(rows, args.split),
        "paired": paired,
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
