"""Seed study and cross-validation: train the multi-task pipeline and both single-task baselines with several seeds
(or on every fold), score them all on the validation split, and print how much the result depends on the seed.

    python scripts/seed_study.py --dataset_dir data/prepared --seeds 0 1 2 [--preset configs/demo.yaml] \
        [--out study/seeds] [-- --cls_weight 2.5 ...]
    python scripts/seed_study.py --dataset_dir data/prepared --folds 5 [--seeds 0] --out study/cv

``--folds K`` is K-fold cross-validation: each fold k trains the three models with train.yaml's ``fold: k`` and
``num_folds: K`` (the prepared training and validation lists pooled and dealt by subject and duplicate group; the
test split untouched) in ``<out>/seed_<n>/fold_<k>/``, and scores them on fold k's validation, so that every
patient and image is scored once, by models that never trained on it. ``scripts/compare_runs.py --folds`` then
gives the mean and 95% CI over the folds and the paired multi-task vs baseline differences.

Arguments after ``--`` are bundle overrides for the multi-task pipeline (the settings under study); the baselines
train with the preset alone. Each seed trains in ``<out>/seed_<n>/`` (models/, eval/), as the demo does: the
baselines beside the pipeline, one process each with half the cores. A seed that finished (its result.json) is not
trained again when the study reruns, so give new settings a new ``--out``. The runs go to the study's own MLflow store
(``<out>/mlruns/mlflow.db``), so that a study never mixes with the bundle's runs. ``--reuse`` starts each seed from
an earlier study's stages 1-2 and baselines, so that a study of stage-3 settings trains stage 3 alone.

It prints, per seed, the validation per-patient Dice and Kaggle AUC of the three models, stage 1's best validation
Dice and stage 3's validation Dice epoch by epoch; then the mean and spread (max - min) over seeds, and the joint
stage's targets (PASS / FAIL): stage 3 never more than 0.05 below stage 1's best, a spread of at most 0.03 (seeds
only: folds differ in their data), a Dice at least the seg-only baseline's and a Kaggle AUC at least the cls-only
baseline's minus 0.01. Everything also goes to ``<out>/study.json``.

Validation only: a study chooses settings, so it never looks at the test split.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from statistics import mean

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT / "bundle"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import torch  # noqa: E402

from scripts.datasets import load_datalist  # noqa: E402
from scripts.errors import UsageError  # noqa: E402
from scripts.stage_checkpoints import epoch_checkpoints  # noqa: E402
from scripts.tracking import PARENT_TAG, find_model_run, mlflow_client  # noqa: E402

TRAIN, EVALUATE = "bundle/configs/train.yaml", "bundle/configs/evaluate.yaml"
PIPELINE, BUNDLE_RUN = ("scripts/train.py",), ("-m", "monai.bundle", "run")
EXPERIMENT, CV_EXPERIMENT = "seed_study", "cross_validation"
BASELINES = ("baseline_seg", "baseline_cls")
MAX_DROP, MAX_SPREAD, AUC_MARGIN = 0.05, 0.03, 0.01


def bundle_command(configs: list[str], *overrides: str, script: tuple[str, ...] = BUNDLE_RUN) -> list[str]:
    """``python -m monai.bundle run`` (or, with ``script=("scripts/train.py",)``, the pipeline) with these configs."""
    files = "[" + ",".join(f"'{config}'" for config in configs) + "]"
    return [sys.executable, *script, "--config_file", files, "--bundle_root", "bundle", *overrides]


def run_logged(command: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    print(f"  started: {log.stem} (log: {log})", flush=True)
    with log.open("w") as out:
        return subprocess.Popen(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env)


def wait_for(process: subprocess.Popen, log: Path) -> None:
    if process.wait() != 0:
        tail = "\n".join(log.read_text().splitlines()[-30:])
        sys.exit(f"{tail}\nA study run failed (exit {process.returncode}): see {log}")


def train_and_evaluate(
    seed_dir: Path, seed: int, fold: int | None, args: argparse.Namespace, tracking_uri: str
) -> Path:
    """Train the three models of one seed or fold (the baselines beside the pipeline) and score them on its
    validation split."""
    (seed_dir / "logs").mkdir(parents=True, exist_ok=True)
    common = ["--dataset_dir", str(args.dataset_dir), "--seed", str(seed), "--ckpt_dir", str(seed_dir / "models"),
              "--output_dir", str(seed_dir / "eval"), "--tracking_uri", tracking_uri,
              "--experiment_name", args.experiment]  # fmt: skip
    if fold is not None:
        common += ["--fold", str(fold), "--num_folds", str(args.folds)]
    threads = str(max(1, (os.cpu_count() or 2) // 2))
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads), "PYTHONUNBUFFERED": "1"}
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logs = seed_dir / "logs"
    if args.reuse is not None:
        reuse(args.reuse / seed_dir.relative_to(args.out), seed_dir)
    # Baselines with validation results (reused from an earlier study) are not trained again.
    to_train = [b for b in BASELINES if not (seed_dir / "eval" / b / "metrics.json").is_file()]
    baselines = [bundle_command([TRAIN, *args.preset, f"configs/{b}.yaml"], *common, script=PIPELINE) for b in to_train]
    # The baselines run one after the other in a shell of their own, beside the pipeline (as scripts/demo.sh does).
    script = " && ".join(shlex.join(command) for command in baselines) or "true"
    side = run_logged(["bash", "-c", script], logs / "baselines.log", env)
    command = bundle_command([TRAIN, *args.preset], *common, *args.overrides, script=PIPELINE)
    pipeline = run_logged(command, logs / "multitask.log", env)
    wait_for(pipeline, logs / "multitask.log")
    wait_for(side, logs / "baselines.log")
    for variant, extra in [("multitask", []), *((b, [f"configs/{b}.yaml"]) for b in to_train)]:
        overrides = [*common, "--eval_split", "validation"] + (args.overrides if variant == "multitask" else [])
        log = logs / f"evaluate_{variant}.log"
        wait_for(run_logged(bundle_command([TRAIN, EVALUATE, *args.preset, *extra], *overrides), log, env), log)
    return seed_dir


def reuse(source: Path, seed_dir: Path) -> None:
    """Start a seed from an earlier study's: its stage 1 and 2 checkpoints and its baselines with their validation
    results, so that a study of stage-3 settings trains stage 3 alone."""
    if (seed_dir / "models").exists():
        return
    parts = [Path("models/multitask/stage1"), Path("models/multitask/stage2")]
    parts += [Path("models") / b for b in BASELINES] + [Path("eval") / b for b in BASELINES]
    missing = [str(source / part) for part in parts if not (source / part).is_dir()]
    if missing:
        sys.exit(f"--reuse: {', '.join(missing)} not found: reuse a finished study with the same seeds.")
    for part in parts:
        shutil.copytree(source / part, seed_dir / part)


def stage1_best(seed_dir: Path) -> float:
    """Stage 1's best validation Dice, from its last checkpoint (a reused stage 1 logged it in another store)."""
    last = epoch_checkpoints(seed_dir / "models" / "multitask" / "stage1")[-1]
    saved = torch.load(last, map_location="cpu", weights_only=True)["best"]["_saved"]  # ignite's (score, file) list
    return max(float(score) for score, _ in saved)


def stage_history(client, parent_run_id: str, experiment_id: str, stage: int, metric: str) -> list[float]:
    """A stage run's per-epoch values of ``metric``, in order."""
    runs = client.search_runs(
        [experiment_id], filter_string=f"tags.`{PARENT_TAG}` = '{parent_run_id}' and tags.stage = '{stage}'"
    )
    if not runs:
        return []
    history = client.get_metric_history(runs[0].info.run_id, metric)
    return [entry.value for entry in sorted(history, key=lambda entry: entry.step)]


def seed_result(seed_dir: Path, tracking_uri: str, experiment: str = EXPERIMENT) -> dict:
    """One seed's (fold's) figures: validation metrics of the three models and the pipeline's stage histories."""
    client = mlflow_client(tracking_uri)
    metrics = {}
    for variant in ("multitask", *BASELINES):
        eval_dir = seed_dir / "eval" / ("" if variant == "multitask" else variant)
        metrics[variant] = json.loads((eval_dir / "metrics.json").read_text())
    run = client.get_run(find_model_run(tracking_uri, experiment, seed_dir / "models" / "model.pt"))

    def stage3(metric: str) -> list[float]:
        return stage_history(client, run.info.run_id, run.info.experiment_id, 3, metric)

    return {
        "dice": metrics["multitask"]["brats_patient_dice_mean"],
        "kaggle_auc": metrics["multitask"]["kaggle_cls_roc_auc"],
        "seg_only_dice": metrics["baseline_seg"]["brats_patient_dice_mean"],
        "cls_only_kaggle_auc": metrics["baseline_cls"]["kaggle_cls_roc_auc"],
        "stage1_best_val_dice": stage1_best(seed_dir),
        "stage3_val_dice": stage3("val_dice"),
        # The cosine between the BraTS and the Kaggle batches' encoder gradients (scripts/handlers.py).
        "stage3_encoder_grad_cosine": stage3("encoder_grad_cosine"),
        "training_time_s": run.data.metrics.get("training_time_s"),
    }


def summary(results: dict[str, dict], folds: bool = False) -> dict:
    def stats(key: str) -> dict[str, float]:
        values = [result[key] for result in results.values()]
        return {"mean": mean(values), "spread": max(values) - min(values), "min": min(values), "max": max(values)}

    columns = ("dice", "kaggle_auc", "seg_only_dice", "cls_only_kaggle_auc", "training_time_s")
    table = {key: stats(key) for key in columns}
    worst_drop = max(r["stage1_best_val_dice"] - min(r["stage3_val_dice"]) for r in results.values())
    targets = {
        f"stage 3 never more than {MAX_DROP} below stage 1's best (worst: {worst_drop:.3f})": worst_drop <= MAX_DROP,
        f"Dice at least the seg-only baseline's ({table['dice']['mean']:.3f} vs {table['seg_only_dice']['mean']:.3f})":
        table["dice"]["mean"] >= table["seg_only_dice"]["mean"],
        f"Kaggle AUC at least the cls-only baseline's - {AUC_MARGIN} ({table['kaggle_auc']['mean']:.3f} vs "
        f"{table['cls_only_kaggle_auc']['mean']:.3f})": table["kaggle_auc"]["mean"]
        >= table["cls_only_kaggle_auc"]["mean"] - AUC_MARGIN,
    }  # fmt: skip
    if not folds:  # the seed alone should move the Dice little; folds differ in their data as well
        targets[f"spread of the Dice at most {MAX_SPREAD} ({table['dice']['spread']:.3f})"] = (
            table["dice"]["spread"] <= MAX_SPREAD
        )
    return {"columns": table, "targets": targets}


def report(results: dict[str, dict], overview: dict, what: str = "seed") -> str:
    lines = [f"{what:<5} Dice   seg-only  Kaggle AUC  cls-only  stage 1 best  stage 3 validation Dice by epoch  "
             "train s"]  # fmt: skip
    for seed, r in results.items():
        epochs = " ".join(f"{value:.3f}" for value in r["stage3_val_dice"])
        lines.append(f"{seed:<5} {r['dice']:.3f}  {r['seg_only_dice']:.3f}     {r['kaggle_auc']:.3f}       "
                     f"{r['cls_only_kaggle_auc']:.3f}     {r['stage1_best_val_dice']:.3f}         {epochs:<33} "
                     f"{r['training_time_s'] or float('nan'):.0f}")  # fmt: skip
    lines.append("")
    lines.append(f"{what:<5} stage 3 cosine of the BraTS and Kaggle gradients on the encoder, by epoch")
    for seed, r in results.items():
        lines.append(f"{seed:<5} " + " ".join(f"{value:+.3f}" for value in r.get("stage3_encoder_grad_cosine", [])))
    lines.append("")
    for key, stats in overview["columns"].items():
        lines.append(f"{key:<20} mean {stats['mean']:.3f}  spread {stats['spread']:.3f}")
    lines.append("")
    lines += [f"{'PASS' if passed else 'FAIL'}  {target}" for target, passed in overview["targets"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required=True, help="what scripts/prepare_data.py wrote")
    parser.add_argument("--seeds", type=int, nargs="+", help="default: 0 1 2, or 0 with --folds")
    parser.add_argument("--folds", type=int, help="K-fold cross-validation: train and score every fold (K >= 2)")
    parser.add_argument("--preset", nargs="+", default=["configs/demo.yaml"], help="preset(s) over train.yaml")
    parser.add_argument("--out", type=Path, help="default: study/seeds, or study/cv with --folds")
    parser.add_argument(
        "--reuse", type=Path, help="an earlier study (same data, preset and seeds) whose stages 1-2 and baselines "
        "this one starts from: a study of stage-3 settings then trains stage 3 alone",
    )  # fmt: skip
    args = parser.parse_args(argv[:split])
    args.overrides = argv[split + 1 :]
    if args.folds is not None and args.folds < 2:
        parser.error(f"--folds {args.folds}: cross-validation needs at least 2 folds.")
    args.seeds = args.seeds or ([0] if args.folds else [0, 1, 2])
    args.experiment = CV_EXPERIMENT if args.folds else EXPERIMENT
    args.out = args.out or Path("study/cv" if args.folds else "study/seeds")
    if not (args.dataset_dir / "datalist.json").is_file():
        parser.error(f"{args.dataset_dir} has no datalist.json: prepare the data with scripts/prepare_data.py first.")
    if args.folds:  # before anything trains: K folds need K subjects and K duplicate groups
        try:
            for key in ("brats_validation", "kaggle_validation"):
                load_datalist(args.dataset_dir / "datalist.json", key, args.dataset_dir, 0, args.folds)
        except UsageError as error:
            parser.error(str(error))
    args.dataset_dir, args.out = args.dataset_dir.resolve(), args.out.resolve()
    args.reuse = args.reuse.resolve() if args.reuse else None
    args.out.mkdir(parents=True, exist_ok=True)
    tracking_uri = "sqlite:///" + str(args.out / "mlruns" / "mlflow.db")
    (args.out / "mlruns").mkdir(exist_ok=True)
    start = time.monotonic()
    # One unit per seed, or per seed and fold: "0", or "0/2" for fold 2 of seed 0 ("2" when there is one seed).
    units = [(seed, fold) for seed in args.seeds for fold in (range(args.folds) if args.folds else [None])]
    results = {}
    for index, (seed, fold) in enumerate(units, 1):
        name = str(seed) if fold is None else f"{seed}/{fold}" if len(args.seeds) > 1 else str(fold)
        unit_dir = args.out / f"seed_{seed}" / ("" if fold is None else f"fold_{fold}")
        label = f"seed {seed}" + ("" if fold is None else f", fold {fold} of {args.folds}")
        print(f"==== {label} ({index}/{len(units)}), {time.monotonic() - start:.0f} s so far ====", flush=True)
        done = unit_dir / "result.json"
        if done.is_file():  # a rerun of the study reports the units it finished without training them again
            results[name] = json.loads(done.read_text())
            continue
        trained = train_and_evaluate(unit_dir, seed, fold, args, tracking_uri)
        results[name] = seed_result(trained, tracking_uri, args.experiment)
        done.write_text(json.dumps(results[name], indent=2))
    overview = summary(results, folds=bool(args.folds))
    output = args.out / "study.json"
    document = {"overrides": args.overrides, "preset": args.preset, "num_folds": args.folds,
                "folds" if args.folds else "seeds": results, **overview}  # fmt: skip
    output.write_text(json.dumps(document, indent=2))
    print("\n" + report(results, overview, "fold" if args.folds else "seed"))
    logs = f"{args.out}/seed_*/{'fold_*/' if args.folds else ''}logs/"
    print(f"\nDone in {time.monotonic() - start:.0f} s. Study: {output}; logs: {logs}")
    compare = (f".venv/bin/python scripts/compare_runs.py --tracking-uri {tracking_uri} --experiment {args.experiment} "
               f"--split validation --out-dir {args.out}")  # fmt: skip
    if args.folds:
        print(f"Every metric, mean and 95% CI over the folds, and multi-task vs each baseline:\n  {compare} --folds")
    else:
        print(f"All metrics of the models, mean and range over the seeds:\n  {compare} --seeds")
    print(f"The runs: .venv/bin/mlflow ui --backend-store-uri {tracking_uri}")  # fmt: skip


if __name__ == "__main__":
    main()
