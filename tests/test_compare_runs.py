"""compare_runs.py across seeds and on picked runs: a seed study's runs in a real MLflow store, compared through the
command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import run_cli
from mlflow.tracking import MlflowClient

from scripts.tracking import artifact_location

# Validation figures of a two-seed study: (variant, seed) -> per-patient Dice, Kaggle AUC (None: no such task).
STUDY = {
    ("multitask", 0): (0.80, 0.90),
    ("multitask", 1): (0.84, 0.94),
    ("baseline_seg", 0): (0.81, None),
    ("baseline_seg", 1): (0.85, None),
}


def _log_study(uri: str) -> None:
    """Pipeline runs as a seed study leaves them: one per variant and seed, an older one that a rerun replaced."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("seed_study", artifact_location=artifact_location(uri))
    for (variant, seed), (dice, auc) in [(("multitask", 1), (0.10, 0.10)), *STUDY.items()]:
        run = client.create_run(
            experiment, run_name=f"{variant} seed {seed}", tags={"kind": "pipeline", "variant": variant}
        )
        client.log_param(run.info.run_id, "seed", seed)
        client.log_metric(run.info.run_id, "validation_brats_patient_dice_mean", dice)
        client.log_metric(run.info.run_id, "test_brats_patient_dice_mean", 0.0)  # never read by a validation table
        if auc is not None:
            client.log_metric(run.info.run_id, "validation_kaggle_cls_roc_auc", auc)
        client.set_terminated(run.info.run_id)


def test_seeds_give_the_mean_and_range_of_each_models_newest_runs(tmp_path: Path) -> None:
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    _log_study(uri)
    args = ["--tracking-uri", uri, "--experiment", "seed_study", "--out-dir", str(tmp_path), "--split", "validation"]
    result = run_cli([sys.executable, "scripts/compare_runs.py", *args, "--seeds"])
    table = json.loads((tmp_path / "comparison.json").read_text())
    multitask, seg_only = table["models"]["multitask"], table["models"]["baseline_seg"]
    # The rerun of seed 1 replaced its first run (0.10): each seed counts once, with its newest run.
    assert len(table["runs"]["multitask"]) == 2
    assert abs(multitask["validation_brats_patient_dice_mean"] - 0.82) < 1e-9
    assert multitask["validation_brats_patient_dice_mean_range"] == [0.80, 0.84]
    assert abs(seg_only["validation_brats_patient_dice_mean"] - 0.83) < 1e-9
    assert seg_only["validation_kaggle_cls_roc_auc"] is None
    assert table["best"]["validation_brats_patient_dice_mean"] == "baseline_seg"
    row = next(line for line in result.stdout.splitlines() if line.startswith("multitask"))
    assert "0.820 [0.800-0.840]" in row and "0.920 [0.900-0.940]" in row
    assert "mean [min-max] over 2 seeds" in result.stdout and "validation split" in result.stdout

    # Without --seeds: the newest run of each model alone.
    run_cli([sys.executable, "scripts/compare_runs.py", *args])
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["models"]["multitask"]["validation_brats_patient_dice_mean"] == 0.84
    assert "validation_brats_patient_dice_mean_range" not in table["models"]["multitask"]


def test_runs_are_picked_by_id_or_by_name_in_a_moved_store(tmp_path: Path) -> None:
    _log_study("sqlite:///" + str(tmp_path / "before" / "mlflow.db"))
    (tmp_path / "before").rename(tmp_path / "after")  # a moved repository: compare_runs re-points its store
    uri = "sqlite:///" + str(tmp_path / "after" / "mlflow.db")
    args = [sys.executable, "scripts/compare_runs.py", "--tracking-uri", uri, "--experiment", "seed_study",
            "--out-dir", str(tmp_path), "--split", "validation"]  # fmt: skip
    first_of_two = next(  # "multitask seed 1", replaced by a newer run of the same name
        r for r in MlflowClient(uri).search_runs(["1"]) if r.data.metrics["validation_brats_patient_dice_mean"] == 0.10
    )

    run_cli([*args, "--run-id", first_of_two.info.run_id, "--run-name", "baseline_seg seed 0"])
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["runs"]["multitask"] == first_of_two.info.run_id
    assert table["models"]["baseline_seg"]["validation_brats_patient_dice_mean"] == 0.81
    # A name two runs share: the newest, and stderr says so.
    result = run_cli([*args, "--run-name", "multitask seed 1"])
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["models"]["multitask"]["validation_brats_patient_dice_mean"] == 0.84
    assert "2 pipeline runs are named 'multitask seed 1': showing the newest" in result.stderr
    # Nothing matches: one line naming what was searched, no traceback.
    for option, by, wanted in (("--run-id", "id", first_of_two.info.run_id[::-1]), ("--run-name", "name", "nope")):
        missing = run_cli([*args, option, wanted], check=False)
        expected = f"No pipeline run with {by} {wanted!r} in experiment 'seed_study' at {uri}."
        assert missing.returncode == 1 and expected in missing.stderr.splitlines(), missing.stderr
        assert "Traceback" not in missing.stderr
    # The comparisons went into the store's artifacts where it is now.
    assert list((tmp_path / "after" / "artifacts").glob("*/artifacts/comparison/comparison.json"))
    assert not (tmp_path / "before").exists()
