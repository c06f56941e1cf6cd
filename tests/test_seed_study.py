"""scripts/seed_study.py through its command line: two seeds of the pipeline and both baselines, tiny, scored on
the validation split."""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

from conftest import TINY_SIZE, run_cli
from mlflow.tracking import MlflowClient

TINY_PRESET = f"""base_filters: 8
depth: 3
image_size: {TINY_SIZE}
batch_size: 8
num_workers: 0
epochs: {{"1": 1, "2": 1, "3": 1}}
"""


def test_a_seed_study_trains_each_seed_scores_validation_and_reports_the_targets(
    prepared_small: Path, tmp_path: Path
) -> None:
    preset = tmp_path / "tiny.yaml"
    preset.write_text(TINY_PRESET)
    out = tmp_path / "study"
    command = [sys.executable, "scripts/seed_study.py", "--dataset_dir", str(prepared_small), "--seeds", "0", "1",
               "--preset", "configs/demo.yaml", str(preset), "--out", str(out), "--", "--cls_weight", "3"]  # fmt: skip
    result = run_cli(command, timeout=1200)
    study = json.loads((out / "study.json").read_text())
    assert study["overrides"] == ["--cls_weight", "3"] and set(study["seeds"]) == {"0", "1"}
    for seed in study["seeds"].values():
        for key in ("dice", "kaggle_auc", "seg_only_dice", "cls_only_kaggle_auc", "stage1_best_val_dice"):
            assert 0.0 <= seed[key] <= 1.0, key
        assert len(seed["stage3_val_dice"]) == 1, "stage 3's validation Dice of its one epoch"
        (cosine,) = seed["stage3_encoder_grad_cosine"]
        assert -1.0 <= cosine <= 1.0, "the joint stage measured its gradient conflict"
    dice = [seed["dice"] for seed in study["seeds"].values()]
    assert abs(study["columns"]["dice"]["spread"] - (max(dice) - min(dice))) < 1e-12
    assert (
        len(study["targets"]) == 4
        and sum(line.startswith(("PASS", "FAIL")) for line in result.stdout.splitlines()) == 4
    )
    # The seed reached the training: the two seeds' models differ.
    models = [out / f"seed_{seed}" / "models" / "model.pt" for seed in (0, 1)]
    assert len({hashlib.sha256(path.read_bytes()).hexdigest() for path in models}) == 2
    # The multi-task pipeline got the study's override, the baselines did not; nothing looked at the test split.
    client = MlflowClient("sqlite:///" + str(out / "mlruns" / "mlflow.db"))
    experiment = client.get_experiment_by_name("seed_study").experiment_id
    pipelines = client.search_runs([experiment], filter_string="tags.kind = 'pipeline'")
    assert len(pipelines) == 6
    for run in pipelines:
        assert "validation_brats_patient_dice_mean" in run.data.metrics or run.data.tags["variant"] == "baseline_cls"
        assert not any(name.startswith("test_") for name in run.data.metrics)
        assert (run.data.params["loss.lambda"] == "3") == (run.data.tags["variant"] == "multitask")

    # A rerun reports the finished seeds without training them again.
    again = run_cli(command)
    assert json.loads((out / "study.json").read_text())["seeds"] == study["seeds"]
    assert len(client.search_runs([experiment], filter_string="tags.kind = 'pipeline'")) == 6
    assert "started:" not in again.stdout
