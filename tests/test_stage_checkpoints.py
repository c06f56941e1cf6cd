"""A stage resumes or starts only from checkpoints made for it: the scenarios of issue 12, through the real CLI."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_OVERRIDES, TRAIN, bundle_run, pipeline_run, run_cli

from scripts.errors import UsageError
from scripts.stage_checkpoints import StageCheckpoints, epoch_checkpoints

STAGES = {
    "1": {"name": "seg", "tasks": ["seg"], "trainable": ["encoder", "decoder"], "init_from": None, "data": "brats",
          "epochs": 2},
    "2": {"name": "cls", "tasks": ["cls"], "trainable": ["cls_head"], "init_from": 1, "data": "brats+kaggle",
          "epochs": 1},
}  # fmt: skip


@pytest.fixture
def own_copy(trained: dict, tmp_path: Path) -> dict:
    """The tiny trained pipeline's checkpoints and MLflow store, copied so that a test may change them."""
    shutil.copytree(trained["ckpt"], tmp_path / "models")
    database = Path(str(trained["tracking_uri"]).removeprefix("sqlite:///"))
    shutil.copytree(database.parent, tmp_path / "mlruns")
    store = "sqlite:///" + str(tmp_path / "mlruns" / database.name)
    common = ["--dataset_dir", str(trained["data"]), "--ckpt_dir", str(tmp_path / "models"), "--tracking_uri", store,
              "--output_dir", str(tmp_path / "eval"), *TINY_OVERRIDES]  # fmt: skip
    return {"models": tmp_path / "models", "store": store, "common": common}


def _runs(store: str) -> list:
    from scripts.tracking import mlflow_client

    client = mlflow_client(store)
    return client.search_runs([client.get_experiment_by_name("brain_tumour_multitask").experiment_id])


def _record(models: Path, stage: int) -> dict:
    return json.loads((models / "multitask" / f"stage{stage}" / "stage.json").read_text())


def test_a_finished_pipeline_rerun_trains_nothing_and_opens_no_run(own_copy: dict) -> None:
    before = {run.info.run_id for run in _runs(own_copy["store"])}
    model = (own_copy["models"] / "model.pt").read_bytes()
    result = pipeline_run([TRAIN, "configs/demo.yaml"], *own_copy["common"])
    assert result.stdout.count("already trained, nothing to do") == 3
    assert "Every stage was already trained" in result.stdout and "Epoch:" not in result.stdout + result.stderr
    assert {run.info.run_id for run in _runs(own_copy["store"])} == before, "no MLflow run for a stage without work"
    assert (own_copy["models"] / "model.pt").read_bytes() == model


def test_other_settings_or_data_stop_before_anything_is_read(own_copy: dict, prepared_small: Path, tmp_path: Path):
    changed = bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "2", "--lr#2", "0.01",
                         check=False)  # fmt: skip
    message = changed.stderr.strip().splitlines()[-2]
    assert changed.returncode == 1 and "Traceback" not in changed.stderr
    assert message.startswith("Error: Stage 2 cannot resume: its checkpoints were made with other settings or data")
    assert "stage.lr: 0.001 -> 0.01" in message and "--restart true" in message and "--ckpt_dir DIR" in message
    # The segmentation loss is a setting of the stages that segment, and only of those.
    squared = bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "1", "--squared_pred", "true",
                         check=False)  # fmt: skip
    assert squared.returncode == 1 and "loss.squared_pred: False -> True" in squared.stderr
    unaffected = bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "2", "--squared_pred",
                            "true", check=False)  # fmt: skip
    assert unaffected.returncode == 0, unaffected.stderr[-2000:]
    # Other prepared data (another split seed): the same, named by the data's digest.
    other = tmp_path / "other"
    shutil.copytree(prepared_small, other)
    datalist = json.loads((other / "datalist.json").read_text())
    datalist["brats_training"] = datalist["brats_training"][:-1]
    (other / "datalist.json").write_text(json.dumps(datalist))
    common = list(own_copy["common"])
    common[common.index("--dataset_dir") + 1] = str(other)
    moved = pipeline_run([TRAIN, "configs/demo.yaml"], *common, check=False)
    assert moved.returncode == 1 and "Stage 1 cannot resume" in moved.stderr and "data_digest" in moved.stderr
    assert "Epoch:" not in moved.stdout + moved.stderr


def test_a_restarted_stage_retrains_the_stages_after_it(own_copy: dict) -> None:
    bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "2", "--restart", "true")
    assert "stage 2 was trained again" in _record(own_copy["models"], 3)["retrain"]
    # Stage 3 alone now starts over from the new stage 2, as the pipeline does.
    result = pipeline_run([TRAIN, "configs/demo.yaml"], *own_copy["common"])
    assert "stage 3 (joint fine-tuning)" in result.stdout and "starts from" in result.stdout
    assert result.stdout.count("already trained, nothing to do") == 2, "stages 1 and 2 are kept"
    assert "=== multitask stage 3" in result.stdout and "=== multitask stage 2" not in result.stdout
    assert _record(own_copy["models"], 3)["retrain"] is None


def test_extending_a_finished_stage_stretches_its_schedule(own_copy: dict) -> None:
    result = bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "2", "--epochs#2", "2")
    assert "resumes after epoch 1" in result.stdout
    state = torch.load(epoch_checkpoints(own_copy["models"] / "multitask" / "stage2")[-1], map_location="cpu")
    assert state["trainer"]["iteration"] == 2 * state["trainer"]["epoch_length"]
    # The cosine schedule now ends at epoch 2: the extra epoch trained at a learning rate above 0.
    stage2 = [r for r in _runs(own_copy["store"]) if r.data.tags.get("stage") == "2"]
    newest = max(stage2, key=lambda run: run.info.start_time)
    from scripts.tracking import mlflow_client

    history = mlflow_client(own_copy["store"]).get_metric_history(newest.info.run_id, "lr_cls_head")
    assert newest.data.tags["resumed_from_epoch"] == "1" and max(entry.value for entry in history) > 1e-5
    assert "stage 2 was trained again" in _record(own_copy["models"], 3)["retrain"]
    fewer = bundle_run([TRAIN, "configs/demo.yaml"], *own_copy["common"], "--stage", "2", "--epochs#2", "1",
                       check=False)  # fmt: skip
    assert fewer.returncode == 1 and "already trained 2 epochs, more than the 1 asked" in fewer.stderr


def test_checkpoints_without_a_record_are_never_resumed(tmp_path: Path, prepared_small: Path) -> None:
    folder = tmp_path / "multitask" / "stage1"
    folder.mkdir(parents=True)
    torch.save({"epoch": 1}, folder / "checkpoint_epoch=1.pt")
    settings = {"network": {"image_size": 32, "in_channels": 1}, "stage": STAGES["1"]}
    checkpoints = StageCheckpoints(str(folder), 1, STAGES, settings, str(prepared_small))
    with pytest.raises(UsageError, match=r"have no stage\.json saying what they were made for"):
        checkpoints.check()
    # --restart true discards them (and a dry run, the launcher's, removes nothing).
    fresh = StageCheckpoints(str(folder), 1, STAGES, settings, str(prepared_small), restart="true")
    assert "starts from scratch" in fresh.check(dry_run=True) and (folder / "checkpoint_epoch=1.pt").exists()
    assert "starts from scratch" in fresh.check() and not folder.exists()


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_when_resuming(tmp_path: Path, prepared_small: Path) -> None:
    folder = tmp_path / "multitask" / "stage1"
    settings = {"network": {"image_size": 32, "in_channels": 1}, "stage": STAGES["1"]}
    checkpoints = StageCheckpoints(str(folder), 1, STAGES, settings, str(prepared_small))
    checkpoints.write_record(settings=checkpoints.settings, epochs_done=2)
    torch.save({"epoch": 1}, folder / "checkpoint_epoch=1.pt")
    torch.save({"epoch": 2}, folder / "checkpoint_epoch=2.pt")
    whole = (folder / "checkpoint_epoch=2.pt").read_bytes()
    (folder / "checkpoint_epoch=2.pt").write_bytes(whole[: len(whole) // 2])  # as a kill during torch.save leaves
    assert "resumes after epoch 1" in checkpoints.check()
    assert checkpoints.resume_path == str(folder / "checkpoint_epoch=1.pt")
    assert not (folder / "checkpoint_epoch=2.pt").exists()


def test_restart_takes_booleans_as_the_command_line_gives_them(tmp_path: Path, prepared_small: Path) -> None:
    settings = {"network": {"image_size": 32, "in_channels": 1}, "stage": STAGES["1"]}
    with pytest.raises(ValueError, match="restart must be true or false, got 'maybe'"):
        StageCheckpoints(str(tmp_path / "stage1"), 1, STAGES, settings, str(prepared_small), restart="maybe")


def test_publishing_describes_the_network_in_the_bundle_it_ships(tmp_path: Path, prepared_small: Path) -> None:
    bundle = tmp_path / "bundle"
    shutil.copytree(Path(__file__).parents[1] / "bundle" / "configs", bundle / "configs")
    folder = bundle / "models" / "multitask" / "stage3"
    folder.mkdir(parents=True)
    torch.save({"w": torch.ones(2)}, folder / "best.pt")
    settings = {"network": {"image_size": 32, "in_channels": 1}, "stage": STAGES["1"]}
    checkpoints = StageCheckpoints(str(folder), 1, STAGES, settings, str(prepared_small))
    network = {"in_channels": 1, "base_filters": 8, "depth": 3, "image_size": 32}
    metadata = bundle / "configs" / "metadata.json"
    # A post-processing size chosen for other weights: forgotten when these are published (the baseline's beside it).
    stale = {"min_lesion_voxels": 50, "model_sha256": "of other weights"}
    metadata.write_text(json.dumps(json.loads(metadata.read_text()) | {"postprocessing": stale}))
    (bundle / "models" / "baseline_seg").mkdir(parents=True)
    (bundle / "models" / "baseline_seg" / "postprocessing.json").write_text(json.dumps(stale))
    before = metadata.read_text()
    # A baseline's model, or one trained outside the bundle: the bundle's metadata stays as it is.
    checkpoints.publish(str(bundle / "models" / "baseline_seg" / "model.pt"), str(metadata), network)
    assert not (bundle / "models" / "baseline_seg" / "postprocessing.json").exists()
    checkpoints.publish(str(tmp_path / "elsewhere" / "model.pt"), str(metadata), network)
    assert metadata.read_text() == before
    checkpoints.publish(str(bundle / "models" / "model.pt"), str(metadata), network)
    written = json.loads(metadata.read_text())
    assert written["network_settings"] == network
    assert written["postprocessing"] == {"min_lesion_voxels": 0}
    assert written["network_data_format"]["inputs"]["image"]["spatial_shape"] == [32, 32]
    assert torch.equal(torch.load(bundle / "models" / "model.pt")["w"], torch.ones(2))


def test_the_pipeline_launcher_explains_itself_instead_of_a_traceback() -> None:
    shown = run_cli([sys.executable, "scripts/train.py", "--help"])
    assert "Train every stage of the bundle's pipeline" in shown.stdout and "Traceback" not in shown.stderr
    missing = run_cli([sys.executable, "scripts/train.py", "--dataset_dir", "data/prepared"], check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert "needs --config_file" in missing.stderr
