"""MLflow tracking against real stores: the embedded sqlite store, a real `mlflow server` (sqlite and PostgreSQL
backends), the fault cases, the comparison script, and the UI's compare page rendered in headless Chromium."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import EVALUATE, REPO_ROOT, TINY_OVERRIDES, TRAIN, bundle_command, bundle_run, run_cli
from mlflow.tracking import MlflowClient

EXPERIMENT = "brain_tumour_multitask"
PARENT = "mlflow.parentRunId"


def _runs(uri: str, filter_string: str = "") -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} in {uri}"
    return client.search_runs([experiment.experiment_id], filter_string=filter_string, max_results=500)


def _pipeline(uri: str, variant: str):
    runs = _runs(uri, f"tags.kind = 'pipeline' and tags.variant = '{variant}'")
    assert len(runs) == 1, f"{len(runs)} pipeline runs for {variant}"
    return runs[0]


def _children(uri: str, parent) -> dict[int, object]:
    children = _runs(uri, f"tags.`{PARENT}` = '{parent.info.run_id}'")
    return {int(child.data.tags["stage"]): child for child in children}


def _artifacts(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    """Every artifact file of a run. MLflow 3.17 lists a logged model's folder (``model/``) through the default
    tracking store, not the client's ("Logged model with ID ... not found" where conftest's store is the default):
    the client's store is made the default while listing."""
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(client.tracking_uri)
    try:
        found = set()
        for item in client.list_artifacts(run_id, path or None):
            found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
        return found
    finally:
        mlflow.set_tracking_uri(previous)


# ---- the embedded sqlite store, filled by the tiny main job (conftest's `trained`)


def test_a_pipeline_run_is_a_parent_with_one_child_run_per_stage(trained: dict) -> None:
    uri = trained["tracking_uri"]
    parent = _pipeline(uri, "multitask")
    assert parent.info.status == "FINISHED" and PARENT not in parent.data.tags
    assert parent.data.tags["baseline"] == "false"
    children = _children(uri, parent)
    assert sorted(children) == [1, 2, 3]
    for stage, child in children.items():
        assert child.info.status == "FINISHED"
        assert child.info.run_name.startswith(f"multitask stage {stage}: ")
        assert child.info.start_time >= parent.info.start_time
    assert parent.data.metrics["training_time_s"] > 0
    assert json.loads(parent.data.params["pipeline"]) == [1, 2, 3]


def test_stage_runs_hold_params_metrics_and_artifacts(trained: dict) -> None:
    uri = trained["tracking_uri"]
    client = MlflowClient(uri)
    stage3 = _children(uri, _pipeline(uri, "multitask"))[3]
    params = stage3.data.params
    lr, factor = float(params["stage.lr"]), float(params["stage.encoder_lr_factor"])
    assert math.isclose(float(params["lr_groups.encoder"]), lr * factor, rel_tol=1e-5)
    assert math.isclose(float(params["lr_groups.cls_head"]), lr, rel_tol=1e-5)
    assert params["network.base_filters"] == "8" and params["network.image_size"] == "32"
    assert params["seed"] == "0" and params["loss.seg"] == "DiceFocalLoss" and "loss.lambda" in params
    assert params["data_summary.brats.training"].endswith("tumour") and "images" in params["data_summary.kaggle.test"]
    assert params["code_version"] not in ("", "unknown")
    assert all(len(value) <= 500 for value in params.values())
    assert int(params["parameters_used"]) == sum(
        t.numel()
        for k, t in torch.load(trained["ckpt"] / "model.pt", map_location="cpu").items()
        if "running" not in k and "num_batches" not in k
    )

    losses = client.get_metric_history(stage3.info.run_id, "train_loss")
    assert len(losses) >= 2 and all(math.isfinite(m.value) for m in losses)
    assert [m.step for m in losses] == sorted(m.step for m in losses) and len({m.step for m in losses}) == len(losses)
    for name in ("val_dice", "val_auc", "val_kaggle_auc", "train_loss_epoch", "lr_encoder"):
        history = client.get_metric_history(stage3.info.run_id, name)
        assert history, name
    assert 0.0 <= client.get_metric_history(stage3.info.run_id, "val_dice")[-1].value <= 1.0

    artifacts = _artifacts(client, stage3.info.run_id)
    assert {"config/executed_config.json", "data/summary.json", "checkpoints/best.pt"} <= artifacts
    config = json.loads(Path(client.download_artifacts(stage3.info.run_id, "config/executed_config.json")).read_text())
    assert config["base_filters"] == 8 and "stages" in config and config["parent_run_id"] == stage3.data.tags[PARENT]
    logged = torch.load(client.download_artifacts(stage3.info.run_id, "checkpoints/best.pt"), map_location="cpu")
    best = torch.load(trained["ckpt"] / "multitask" / "stage3" / "best.pt", map_location="cpu")
    assert logged.keys() == best.keys() and all(torch.equal(logged[k], best[k]) for k in best)


def test_runs_carry_mlflow_models_and_the_prepared_data_as_input(trained: dict) -> None:
    import mlflow

    from scripts.datasets import data_digest

    uri = trained["tracking_uri"]
    client = MlflowClient(uri)
    parent = _pipeline(uri, "multitask")
    runs = [parent, *_children(uri, parent).values()]
    models = client.search_logged_models([parent.info.experiment_id])
    by_run = {model.source_run_id: model for model in models}
    assert all(run.info.run_id in by_run for run in runs), "every run logged its model (the UI's Models column)"
    for run in runs:
        inputs = client.get_run(run.info.run_id).inputs.dataset_inputs
        assert [i.dataset.digest for i in inputs] == [data_digest(trained["data"])[:16]], "the Dataset column"
        assert inputs[0].dataset.name == Path(trained["data"]).name
    # The pipeline's MLflow model is the published model.pt, and loads back as a network that runs.
    mlflow.set_tracking_uri(uri)
    network = mlflow.pytorch.load_model(f"models:/{by_run[parent.info.run_id].model_id}")
    published = torch.load(trained["ckpt"] / "model.pt", map_location="cpu")
    assert all(torch.equal(network.state_dict()[k], published[k]) for k in published)
    signature = mlflow.models.get_model_info(f"models:/{by_run[parent.info.run_id].model_id}").signature
    assert signature is not None and "cls" in str(signature.outputs) and "seg" in str(signature.outputs)
    outputs = network(torch.zeros(2, 1, 32, 32))
    assert outputs["seg"].shape == (2, 1, 32, 32) and outputs["cls"].shape == (2, 2)


def test_evaluation_is_logged_into_the_run_it_evaluates(trained: dict) -> None:
    uri = trained["tracking_uri"]
    client = MlflowClient(uri)
    metrics = json.loads((trained["eval"] / "metrics.json").read_text())
    for variant, folder in (("multitask", ""), ("baseline_seg", "baseline_seg"), ("baseline_cls", "baseline_cls")):
        run = _pipeline(uri, variant)
        metrics = json.loads((trained["eval"] / folder / "metrics.json").read_text())
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                assert math.isclose(run.data.metrics[f"test_{key}"], value, rel_tol=1e-6, abs_tol=1e-9), key
        artifacts = _artifacts(client, run.info.run_id)
        assert {"evaluation/metrics.json", "evaluation/report.md", "model/model.pt"} <= artifacts, variant
        assert not any(path.startswith("evaluation/baseline") for path in artifacts)


def test_the_post_processing_chosen_on_validation_is_logged_into_the_models_run(trained: dict, tmp_path: Path) -> None:
    # A copy of the store and of the model (the same sha256, so the same run): the session's own stay as they are.
    store = tmp_path / "mlflow.db"
    shutil.copy(Path(trained["tracking_uri"].removeprefix("sqlite:///")), store)
    (tmp_path / "models").mkdir()
    shutil.copy(trained["ckpt"] / "model.pt", tmp_path / "models" / "model.pt")
    bundle_run([TRAIN, EVALUATE, "configs/demo.yaml"], "--dataset_dir", str(trained["data"]), "--ckpt_dir",
               str(tmp_path / "models"), "--output_dir", str(tmp_path / "eval"), "--tracking_uri", f"sqlite:///{store}",
               "--eval_split", "validation", "--choose_postprocessing", "true", *TINY_OVERRIDES)  # fmt: skip
    chosen = json.loads((tmp_path / "models" / "postprocessing.json").read_text())["min_lesion_voxels"]
    run = _pipeline(f"sqlite:///{store}", "multitask")
    assert run.data.metrics["validation_postprocessing_min_lesion_voxels"] == chosen
    assert "validation_brats_patient_lesionwise_dice_mean" in run.data.metrics
    artifacts = _artifacts(MlflowClient(f"sqlite:///{store}"), run.info.run_id, "evaluation_validation")
    assert {"evaluation_validation/postprocessing.json", "evaluation_validation/metrics.json"} <= artifacts


def test_baselines_are_their_own_runs_tagged_as_baselines(trained: dict) -> None:
    uri = trained["tracking_uri"]
    for variant, stage in (("baseline_seg", 1), ("baseline_cls", 2)):
        run = _pipeline(uri, variant)
        assert run.data.tags["baseline"] == "true" and run.data.tags["variant"] == variant
        children = _children(uri, run)
        assert list(children) == [stage] and children[stage].data.tags["baseline"] == "true"
    seg = _children(uri, _pipeline(uri, "baseline_seg"))[1]
    assert "val_dice" in seg.data.metrics and "val_auc" not in seg.data.metrics


def test_compare_runs_prints_marks_plots_and_logs_the_comparison(trained: dict, tmp_path: Path) -> None:
    uri = trained["tracking_uri"]
    result = run_cli([sys.executable, "scripts/compare_runs.py", "--tracking-uri", uri, "--out-dir", str(tmp_path)])
    lines = result.stdout.splitlines()
    rows = {
        line.split()[0]: line
        for line in lines
        if line.split() and line.split()[0] in ("multitask", "baseline_seg", "baseline_cls")
    }
    assert set(rows) == {"multitask", "baseline_seg", "baseline_cls"}
    table = json.loads((tmp_path / "comparison.json").read_text())
    for variant in rows:
        run = _pipeline(uri, variant)
        assert table["runs"][variant] == run.info.run_id
        assert table["models"][variant]["test_brats_patient_dice_mean"] == run.data.metrics.get(
            "test_brats_patient_dice_mean"
        )
        assert table["models"][variant]["training_time_s"] == run.data.metrics["training_time_s"]
        lesionwise = "test_brats_patient_lesionwise_dice_mean"  # the official BraTS metric, logged from metrics.json
        assert table["models"][variant][lesionwise] == run.data.metrics.get(lesionwise)
    assert table["models"]["multitask"][lesionwise] is not None and any("lesion-wise Dice" in line for line in lines)
    # The seg-only baseline has no classifier, the cls-only baseline no decoder: their columns are empty.
    assert table["models"]["baseline_seg"]["test_kaggle_cls_roc_auc"] is None
    assert table["models"]["baseline_cls"]["test_brats_patient_dice_mean"] is None
    params = table["models"]
    assert params["baseline_seg"]["parameters"] < params["multitask"]["parameters"]
    assert params["baseline_cls"]["parameters"] < params["multitask"]["parameters"]
    dice = {v: m["test_brats_patient_dice_mean"] for v, m in params.items() if m["test_brats_patient_dice_mean"]}
    assert table["best"]["test_brats_patient_dice_mean"] == max(dice, key=dice.get)
    assert f"{dice[max(dice, key=dice.get)]:.3f}*" in rows[max(dice, key=dice.get)]
    assert (tmp_path / "comparison.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    logged = _artifacts(MlflowClient(uri), table["runs"]["multitask"])
    assert {"comparison/comparison.json", "comparison/comparison.png"} <= logged


# ---- a tracking server


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def mlflow_server(backend_uri: str, artifacts: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1, stopped (with its workers) on exit."""
    port = _free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
               "--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts),
               "--workers", "1"]  # fmt: skip
    artifacts.mkdir(parents=True, exist_ok=True)
    log = artifacts.parent / f"mlflow-server-{port}.log"
    with log.open("w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"mlflow server did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        yield url
    finally:
        stop_server(server)


def stop_server(server: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(server.pid, signal.SIGTERM)
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def _stage_one(data: Path, ckpt_dir: Path, uri: str, epochs: int = 1) -> list[str]:
    return ["--dataset_dir", str(data), "--ckpt_dir", str(ckpt_dir), "--stage", "1", "--tracking_uri", uri,
            *TINY_OVERRIDES, "--epochs#1", str(epochs)]  # fmt: skip


_OPEN_NEW_STORE = """
import sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from scripts.tracking import TrackingClient
while not Path(sys.argv[3]).exists():  # start together
    time.sleep(0.01)
client = TrackingClient(sys.argv[2], "brain_tumour_multitask")
assert client.experiment_id() is not None, client.error
"""


def test_processes_that_open_a_new_sqlite_store_at_once_all_get_it(tmp_path: Path) -> None:
    # scripts/demo.sh starts the baselines beside the pipeline: their first MLflow clients meet on a store whose
    # tables do not exist yet; unserialised, two of them run MLflow's migrations and one fails.
    uri = "sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db")
    go = tmp_path / "go"
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    processes = [
        subprocess.Popen([sys.executable, "-c", _OPEN_NEW_STORE, str(REPO_ROOT / "bundle"), uri, str(go)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        for _ in range(4)
    ]  # fmt: skip
    time.sleep(8)  # let every process import MLflow and wait at the start line
    go.touch()
    outputs = [process.communicate(timeout=120)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4, "\n".join(outputs)
    assert len(MlflowClient(tracking_uri=uri).search_experiments(filter_string="name = 'brain_tumour_multitask'")) == 1


def test_a_moved_store_reads_its_old_artifacts_and_writes_new_ones_beside_it(tmp_path: Path, caplog) -> None:
    # MLflow records absolute artifact locations: a moved repository read and wrote the old place.
    from scripts.tracking import TrackingClient, mlflow_client

    old, new, note = tmp_path / "repo", tmp_path / "moved", tmp_path / "note.txt"
    note.write_text("logged before the move")
    before = TrackingClient("sqlite:///" + str(old / "mlruns" / "mlflow.db"), EXPERIMENT)
    elsewhere = tmp_path / "elsewhere" / "artifacts"  # not the store's: left alone
    elsewhere.mkdir(parents=True)
    before.client.create_experiment("own folder", artifact_location=elsewhere.as_uri())
    run_id = before.start_run("before the move", {"kind": "pipeline"})
    before.log_artifact(run_id, note, "notes")
    assert before.error is None
    assert (old / "mlruns" / "artifacts" / run_id / "artifacts" / "notes" / "note.txt").is_file()
    old.rename(new)

    uri = "sqlite:///" + str(new / "mlruns" / "mlflow.db")
    with caplog.at_level(logging.INFO, logger="scripts.tracking"):
        after = TrackingClient(uri, EXPERIMENT)
        client = mlflow_client(uri)  # a second opener finds nothing left to re-point
    assert len([record for record in caplog.records if "was moved" in record.getMessage()]) == 1
    assert _artifacts(client, run_id) == {"notes/note.txt"}
    assert Path(client.download_artifacts(run_id, "notes/note.txt", str(tmp_path))).read_text() == note.read_text()
    new_run = after.start_run("after the move", {"kind": "pipeline"})
    after.log_artifact(new_run, note, "notes")
    assert after.error is None
    assert (new / "mlruns" / "artifacts" / new_run / "artifacts" / "notes" / "note.txt").is_file()
    assert client.get_experiment_by_name("own folder").artifact_location == elsewhere.as_uri()
    assert not old.exists()  # nothing was written at the old place

    # A copy reads and writes its own artifacts; the original keeps its own.
    shutil.copytree(new, tmp_path / "copy")
    copy = mlflow_client("sqlite:///" + str(tmp_path / "copy" / "mlruns" / "mlflow.db"))
    copied = (tmp_path / "copy" / "mlruns" / "artifacts" / run_id / "artifacts").as_uri()
    assert copy.get_run(run_id).info.artifact_uri == copied
    assert _artifacts(copy, run_id) == {"notes/note.txt"}
    assert client.get_run(run_id).info.artifact_uri.startswith((new / "mlruns" / "artifacts").as_uri() + "/")


def test_a_server_tracks_a_stage_and_a_rerun_never_merges(prepared_small: Path, tmp_path: Path) -> None:
    with mlflow_server("sqlite:///" + str(tmp_path / "server.db"), tmp_path / "artifacts") as url:
        bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path / "models", url))
        bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path / "models", url),
                   "--restart", "true")  # fmt: skip
        runs = _runs(url, "tags.stage = '1'")
        assert len(runs) == 2 and len({run.info.run_id for run in runs}) == 2
        assert all(run.info.status == "FINISHED" and "val_dice" in run.data.metrics for run in runs)
        client = MlflowClient(url)
        assert "checkpoints/best.pt" in _artifacts(client, runs[0].info.run_id)
        logged = torch.load(client.download_artifacts(runs[0].info.run_id, "checkpoints/best.pt"), map_location="cpu")
        assert any(key.startswith("encoder.") for key in logged)


def test_an_unreachable_server_stops_the_run_at_once_unless_tracking_is_off(prepared_small: Path, tmp_path: Path):
    url = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.monotonic()
    result = bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path, url), check=False)
    elapsed = time.monotonic() - start
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert f"The MLflow tracking server at {url} cannot be reached" in output and "--mlflow_tracking false" in output
    assert not (tmp_path / "multitask" / "stage1" / "best.pt").exists()
    assert elapsed < 90, f"took {elapsed:.0f} s to give up"  # seconds, not MLflow's minutes of retries

    result = bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path, url),
                        "--mlflow_tracking", "false")  # fmt: skip
    assert (tmp_path / "multitask" / "stage1" / "best.pt").is_file()
    assert "tracked in MLflow" not in result.stdout


def test_training_finishes_when_the_server_goes_away(prepared_small: Path, tmp_path: Path) -> None:
    epochs = 25
    with mlflow_server("sqlite:///" + str(tmp_path / "server.db"), tmp_path / "artifacts") as url:
        log = tmp_path / "train.log"
        with log.open("w") as out:
            training = subprocess.Popen(
                bundle_command([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path, url, epochs)),
                cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )  # fmt: skip
            client, deadline = MlflowClient(url), time.monotonic() + 300
            while True:  # wait until the stage has logged a validation, then take the server away
                runs = _runs(url) if client.get_experiment_by_name(EXPERIMENT) else []
                if runs and client.get_metric_history(runs[0].info.run_id, "val_dice"):
                    break
                assert training.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, "no validation logged"
                time.sleep(0.3)
    # The server is gone (the context manager stopped it); training must carry on to the end.
    assert training.wait(timeout=600) == 0, log.read_text()[-3000:]
    output = log.read_text()
    assert f"checkpoint_epoch={epochs}.pt" in {p.name for p in (tmp_path / "multitask" / "stage1").iterdir()}
    assert "MLflow tracking failed" in output and "FAILED" in output and "incomplete" in output
    assert f"Epoch: {epochs}/{epochs}" in output


# ---- a team server on PostgreSQL

PG_BIN = Path("/usr/lib/postgresql")


def _postgres_bin() -> Path | None:
    found = sorted(PG_BIN.glob("*/bin/initdb"))
    return found[-1].parent if found else None


@pytest.mark.skipif(_postgres_bin() is None, reason="PostgreSQL server binaries absent (apt-get install postgresql)")
def test_a_tracking_server_on_postgresql(prepared_small: Path, tmp_path: Path) -> None:
    bin_dir, port = _postgres_bin(), _free_port()
    data = Path(tempfile.mkdtemp(prefix="pg-"))
    as_postgres = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # initdb refuses root
    shutil.chown(data, "postgres") if as_postgres else None
    run_cli([*as_postgres, str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust"])
    options = f"-p {port} -k {data} -c listen_addresses=127.0.0.1"
    run_cli([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-o", options, "-w", "start",
             "-l", str(data / "server.log")])  # fmt: skip
    try:
        run_cli([str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow"])
        backend = f"postgresql://postgres@127.0.0.1:{port}/mlflow"
        with mlflow_server(backend, tmp_path / "artifacts") as url:
            bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path / "models", url))
            runs = _runs(url, "tags.stage = '1'")
            assert len(runs) == 1 and runs[0].info.status == "FINISHED"
            assert 0.0 <= runs[0].data.metrics["val_dice"] <= 1.0
        # The runs live in PostgreSQL itself, not in a file beside the server.
        rows = run_cli(["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "mlflow", "-tAc",
                        "select count(*) from runs"])  # fmt: skip
        assert rows.stdout.strip() == "1"
    finally:
        subprocess.run([*as_postgres, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], check=False)
        shutil.rmtree(data, ignore_errors=True)


# ---- the MLflow UI's compare page

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="Chromium absent (apt-get install chromium; scripts/test.sh does)")
def test_the_compare_page_lists_the_pipeline_and_baselines(trained: dict, tmp_path: Path) -> None:
    uri = trained["tracking_uri"]
    runs = {variant: _pipeline(uri, variant) for variant in ("multitask", "baseline_seg", "baseline_cls")}
    experiment = next(iter(runs.values())).info.experiment_id
    with mlflow_server(uri, tmp_path / "artifacts") as url:
        query = urllib.parse.urlencode(
            {"runs": json.dumps([r.info.run_id for r in runs.values()]), "experiments": json.dumps([experiment])}
        )
        page = f"{url}/#/compare-runs?{query}"
        command = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                   "--disable-background-networking", "--disable-component-update", "--disable-sync",
                   f"--user-data-dir={tmp_path / 'chromium'}", "--virtual-time-budget=15000",
                   "--dump-dom", page]  # fmt: skip
        dom = subprocess.run(command, capture_output=True, text=True, timeout=180).stdout
    for run in runs.values():
        assert run.info.run_name in dom, f"{run.info.run_name!r} not on the rendered compare page"
    # The page renders only the metric rows in view (a virtualised list, sorted by name; the native-grid BraTS
    # metrics push test_brats_patient_* below the fold), so the check takes rows near the top.
    assert "test_brats_cls_roc_auc" in dom and "test_brats_hd95_mean" in dom
