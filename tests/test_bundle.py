"""The MONAI bundle: model-zoo checks, and real `python -m monai.bundle run` training, evaluation and resumption."""

from __future__ import annotations

import ast
import csv
import hashlib
import json
import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (
    BUNDLE_ROOT,
    EVALUATE,
    REPO_ROOT,
    TINY_OVERRIDES,
    TINY_SIZE,
    TRAIN,
    bundle_command,
    bundle_run,
    pipeline_run,
    run_cli,
)
from monai.bundle import ConfigWorkflow

MULTI_GPU = "bundle/configs/multi_gpu_train.yaml"
SCHEMA = REPO_ROOT / "tests" / "resources" / "meta_schema_20240725.json"
# The hash MONAI's own tests record for the official schema.
SCHEMA_MD5 = "06954cad2cc5d3784e72077ac76f0fc8"


def test_metadata_is_valid_against_the_official_schema() -> None:
    assert hashlib.md5(SCHEMA.read_bytes()).hexdigest() == SCHEMA_MD5
    result = run_cli(
        [
            sys.executable,
            "-m",
            "monai.bundle",
            "verify_metadata",
            "--meta_file",
            "bundle/configs/metadata.json",
            "--filepath",
            str(SCHEMA),
        ]
    )
    assert "metadata is verified with no error" in result.stdout + result.stderr
    metadata = json.loads((BUNDLE_ROOT / "configs" / "metadata.json").read_text())
    assert metadata["version"] in metadata["changelog"]
    formats = metadata["network_data_format"]
    assert set(formats["inputs"]) == {"image"} and set(formats["outputs"]) == {"pred", "cls"}


def test_bundle_has_the_model_zoo_layout() -> None:
    for name in (
        "metadata.json",
        "train.yaml",
        "evaluate.yaml",
        "inference.yaml",
        "multi_gpu_train.yaml",
        "logging.conf",
    ):
        assert (BUNDLE_ROOT / "configs" / name).is_file(), name
    assert (BUNDLE_ROOT / "docs" / "README.md").is_file()
    assert (BUNDLE_ROOT / "LICENSE").is_file()
    tracked = run_cli(["git", "ls-files", "bundle"]).stdout.split()
    assert not [path for path in tracked if path.startswith("bundle/models/")], "weights are build outputs"
    assert all((REPO_ROOT / path).stat().st_size < 1_000_000 for path in tracked)


def _bundle_modules() -> dict[str, Path]:
    """The bundle's Python package by module name (``scripts.data.volumes``; a package by its own name)."""
    modules = {}
    for path in sorted((BUNDLE_ROOT / "scripts").rglob("*.py")):
        parts = path.relative_to(BUNDLE_ROOT).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def _imported_modules(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The bundle modules ``name`` imports anywhere in its code (a function's late import included), except under
    ``if TYPE_CHECKING`` (annotations only, never run)."""
    tree = ast.parse(path.read_text())
    annotations_only = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for node in ast.walk(branch)
    }
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in annotations_only:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.update(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names)
    return {module for module in found if module in modules and module != name}


def test_the_bundle_package_has_no_import_cycle() -> None:
    modules = _bundle_modules()
    graph = {name: _imported_modules(name, path, modules) for name, path in modules.items()}
    assert "scripts.handlers" in graph["scripts.stage_checkpoints"]  # the walk sees relative imports
    cycles, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycles.append(" -> ".join([*path[path.index(imported) :], imported]))
            elif imported not in state:
                visit(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not cycles


# Modules with no MONAI counterpart (errors, files, output names), and the network's parts, whose package
# (scripts.networks) says why the network is not MONAI's.
_NO_MONAI_COUNTERPART = {"scripts.errors", "scripts.files", "scripts.inference.names"}


def test_every_module_of_the_bundle_says_why_monai_does_not_do_its_job() -> None:
    silent = [
        name
        for name, path in _bundle_modules().items()
        if name not in _NO_MONAI_COUNTERPART
        and not name.startswith("scripts.networks.")
        and "MONAI" not in (ast.get_docstring(ast.parse(path.read_text())) or "")
    ]
    assert not silent, f"module docstrings without a word on MONAI: {silent}"


def _workflow(config_files: list[str], workflow_type: str, dataset_dir: Path, **overrides) -> ConfigWorkflow:
    workflow = ConfigWorkflow(
        config_file=[str(REPO_ROOT / f) for f in config_files],
        meta_file=str(BUNDLE_ROOT / "configs" / "metadata.json"),
        logging_file=str(BUNDLE_ROOT / "configs" / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(dataset_dir),
        **overrides,
    )
    workflow.initialize()
    return workflow


@pytest.mark.parametrize("stage", [1, 2, 3])
@pytest.mark.parametrize(
    "preset",
    [
        [],
        ["configs/demo.yaml"],
        ["configs/demo.yaml", "configs/baseline_seg.yaml"],
        ["configs/demo.yaml", "configs/baseline_cls.yaml"],
        ["configs/full.yaml"],
    ],
)
def test_train_workflow_properties(stage: int, preset: list[str], prepared_small: Path, tmp_path: Path) -> None:
    # Stages 2 and 3 start from the previous stage's best checkpoint: give them one, as stage 1 would.
    for previous in (1, 2):
        for variant in ("multitask", "baseline_seg", "baseline_cls"):
            best = tmp_path / variant / f"stage{previous}" / "best.pt"
            best.parent.mkdir(parents=True, exist_ok=True)
            best.touch()
    workflow = _workflow([TRAIN, *preset], "train", prepared_small, stage=stage, ckpt_dir=str(tmp_path))
    assert workflow.check_properties() == []
    assert workflow.trainer is not None and workflow.evaluator is not None


def test_evaluate_and_multi_gpu_workflow_properties(
    prepared_small: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    evaluate = _workflow([TRAIN, EVALUATE, "configs/demo.yaml"], "train", prepared_small, ckpt_dir=str(tmp_path))
    assert evaluate.check_properties() == []
    inference_view = _workflow([TRAIN, EVALUATE], "infer", prepared_small, ckpt_dir=str(tmp_path))
    assert inference_view.check_properties() == []
    # A one-process group, as torchrun would set it up for rank 0.
    for name, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "29541"}.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    multi_gpu = _workflow([TRAIN, MULTI_GPU], "train", prepared_small, ckpt_dir=str(tmp_path))
    try:
        assert multi_gpu.check_properties() == []
    finally:
        multi_gpu.finalize()
        import ignite.distributed

        ignite.distributed.sync()  # ignite forgets the process group, so later tests save as one process again


def _expressions(node: object) -> list[str]:
    """Every ``$`` expression of a loaded config, however deep."""
    if isinstance(node, dict):
        return [text for value in node.values() for text in _expressions(value)]
    if isinstance(node, list):
        return [text for value in node for text in _expressions(value)]
    return [node] if isinstance(node, str) and node.startswith("$") else []


# ``@stage`` compared, or inside a conditional (``@stages``, ``@stage_spec`` are other items).
_BRANCH_ON_STAGE = re.compile(r"@stage\b(?!_)\s*(==|!=|<|>|in\b)|\bif\b.*@stage\b(?!_)")


def test_train_config_reads_as_a_pipeline() -> None:
    """train.yaml keeps the pipeline in its items, not in Python written inside strings: at most 30 expressions,
    none over 120 characters, and none that branches on the stage (the stages table says what differs)."""
    import yaml

    expressions = _expressions(yaml.safe_load((REPO_ROOT / TRAIN).read_text()))
    assert 10 < len(expressions) <= 30
    assert max(map(len, expressions)) <= 120, max(expressions, key=len)
    branching = [text for text in expressions if _BRANCH_ON_STAGE.search(text)]
    assert not branching, branching
    assert _BRANCH_ON_STAGE.search("$0.1 if @stage == 3 else 1.0")  # the pattern finds what it is for


def test_multi_gpu_config_holds_overrides_only() -> None:
    import yaml

    overrides = yaml.safe_load((REPO_ROOT / MULTI_GPU).read_text())
    assert "run" not in overrides and not any(key.endswith("handlers") for key in overrides)
    train = yaml.safe_load((REPO_ROOT / TRAIN).read_text())
    assert train["initialize"] == [], "multi_gpu_train.yaml's initialize (the process group) replaces nothing"


def _stage_files(ckpt_dir: Path, variant: str, stage: int) -> set[str]:
    return {p.name for p in (ckpt_dir / variant / f"stage{stage}").iterdir()}


def test_all_three_stages_run_in_order_and_save_checkpoints(trained: dict[str, Path]) -> None:
    log = trained["train_log"].read_text()
    starts = [log.index(f"=== multitask stage {stage}: ") for stage in (1, 2, 3)]
    assert starts == sorted(starts)
    for stage in (1, 2, 3):
        assert {"best.pt", "checkpoint_epoch=1.pt"} <= _stage_files(trained["ckpt"], "multitask", stage)
    assert "Restored all variables from" in log and "stage1/best.pt" in log and "stage2/best.pt" in log
    # Stage 2 trains only the head; stage 3 everything.
    assert re.search(r"stage 2 \(classification head\): tasks \['cls'\], training \['cls_head'\]", log)
    assert re.search(r"stage 3 \(joint fine-tuning\): tasks \['seg', 'cls'\]", log)
    final = torch.load(trained["ckpt"] / "model.pt", map_location="cpu")
    best3 = torch.load(trained["ckpt"] / "multitask" / "stage3" / "best.pt", map_location="cpu")
    assert final.keys() == best3.keys() and all(torch.equal(final[k], best3[k]) for k in final)


def test_stage_two_keeps_encoder_and_decoder_of_stage_one(trained: dict[str, Path]) -> None:
    stage1 = torch.load(trained["ckpt"] / "multitask" / "stage1" / "best.pt", map_location="cpu")
    stage2 = torch.load(trained["ckpt"] / "multitask" / "stage2" / "best.pt", map_location="cpu")
    statistic = ("running_", "num_batches_tracked")
    frozen = [k for k in stage1 if k.startswith(("encoder.", "decoder.")) and not any(s in k for s in statistic)]
    assert frozen and all(torch.equal(stage1[k], stage2[k]) for k in frozen), "frozen parts moved in stage 2"
    # BatchNorm statistics: the BraTS slices' stay stage 1's; the Kaggle images' are estimated at the start of
    # stage 2 (the starting checkpoint, loaded first, holds the untouched initial ones).
    statistics = [k for k in stage1 if k.startswith("encoder.") and "running_mean" in k]
    assert all(torch.equal(stage1[k][0], stage2[k][0]) for k in statistics)
    assert all(stage1[k][1].abs().max() == 0 < stage2[k][1].abs().max() for k in statistics)
    decoder_statistics = [k for k in stage1 if k.startswith("decoder.") and any(s in k for s in statistic)]
    assert all(torch.equal(stage1[k], stage2[k]) for k in decoder_statistics)
    head = [k for k in stage1 if k.startswith("cls_head.") and "weight" in k]
    assert any(not torch.equal(stage1[k], stage2[k]) for k in head), "the head did not train in stage 2"


def test_evaluation_writes_flat_metrics_and_report(trained: dict[str, Path]) -> None:
    metrics = json.loads((trained["eval"] / "metrics.json").read_text())
    for key in (
        "brats_patient_dice_mean",
        "brats_hd95_mean",
        "brats_slice_dice_mean",
        "brats_slice_detection_sensitivity",
        "brats_slice_detection_specificity",
        "brats_cls_accuracy",
        "brats_cls_balanced_accuracy",
        "brats_cls_roc_auc",
        "brats_cls_f1",
        "brats_cls_confusion_tp",
        "kaggle_cls_accuracy",
        "kaggle_cls_balanced_accuracy",
        "kaggle_cls_roc_auc",
        "kaggle_cls_f1",
        "kaggle_cls_confusion_tn",
        "latency_ms_per_slice",
    ):
        assert key in metrics, key
    assert all(value is None or isinstance(value, (int, float)) for value in metrics.values())
    assert 0.0 <= metrics["brats_patient_dice_mean"] <= 1.0
    # The official BraTS metrics on each raw volume's grid, computed (counts are numbers, not null) for every patient.
    counts = [metrics[f"brats_lesions_{kind}"] for kind in ("tp", "fp", "fn")] + [
        metrics["brats_patients_native_undefined"]
    ]
    assert all(isinstance(count, int) and count >= 0 for count in counts), counts
    for key in ("global_dice", "lesionwise_dice", "matched_lesion_dice", "lesion_f1"):
        value = metrics[f"brats_patient_{key}_mean"]
        assert value is None or 0.0 <= value <= 1.0, key
    assert 0.0 <= metrics["brats_patient_lesionwise_hd95_mean"] <= 373.0
    with (trained["eval"] / "per_patient.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == metrics["brats_patients"] and all(row["lesions_tp"] != "" for row in rows)
    assert "Official BraTS metrics on the volume's grid" in (trained["eval"] / "report.md").read_text()
    assert metrics["latency_ms_per_slice"] > 0
    patients = json.loads((trained["data"] / "patients.json").read_text())
    assert metrics["brats_patients"] == sum(1 for p in patients.values() if p["split"] == "test")
    datalist = json.loads((trained["data"] / "datalist.json").read_text())
    assert metrics["kaggle_cls_n"] == len(datalist["kaggle_test"])
    assert metrics["brats_cls_n"] == len(datalist["brats_test"])
    for name in ("report.md", "roc.png", "patient_dice.png"):
        assert (trained["eval"] / name).stat().st_size > 0


def test_evaluation_stops_before_scoring_when_the_raw_cases_moved(trained: dict[str, Path], tmp_path: Path) -> None:
    # A copy of the prepared data whose raw cases are gone: the native-grid metrics cannot be computed.
    prepared = tmp_path / "prepared"
    shutil.copytree(trained["data"], prepared)
    patients = json.loads((prepared / "patients.json").read_text())
    for record in patients.values():
        record["case_dir"] = str(tmp_path / "gone" / Path(record["case_dir"]).name)
    (prepared / "patients.json").write_text(json.dumps(patients))
    common = ["--dataset_dir", str(prepared), "--ckpt_dir", str(trained["ckpt"]), "--output_dir", str(tmp_path / "e"),
              "--mlflow_tracking", "false", *TINY_OVERRIDES]  # fmt: skip
    result = bundle_run([TRAIN, EVALUATE, "configs/demo.yaml"], *common, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-2]
    assert str(tmp_path / "gone") in message and "--native_grid_metrics false" in message
    assert not (tmp_path / "e").exists(), "it stopped before evaluating"
    bundle_run([TRAIN, EVALUATE, "configs/demo.yaml"], *common, "--native_grid_metrics", "false")
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert metrics["brats_patient_dice_mean"] is not None and metrics["brats_patient_lesionwise_dice_mean"] is None


def test_a_stage_without_its_starting_checkpoint_fails_clearly(prepared_small: Path, tmp_path: Path) -> None:
    args = ["--dataset_dir", str(prepared_small), "--ckpt_dir", str(tmp_path), "--stage", "2", *TINY_OVERRIDES]
    result = bundle_run([TRAIN, "configs/demo.yaml"], *args, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "stage1/best.pt, which does not exist: train that stage first" in result.stderr.strip().splitlines()[-2]
    # --debug shows the whole story.
    debug = bundle_run([TRAIN, "configs/demo.yaml"], *args, "--debug", "true", check=False)
    assert debug.returncode == 1 and "Traceback" in debug.stderr and "train that stage first" in debug.stderr


def test_missing_prepared_data_fails_clearly(tmp_path: Path) -> None:
    result = bundle_run(
        [TRAIN, "configs/demo.yaml"],
        "--dataset_dir",
        str(tmp_path / "nowhere"),
        "--ckpt_dir",
        str(tmp_path),
        "--stage",
        "1",
        *TINY_OVERRIDES,
        check=False,
    )
    assert result.returncode == 1
    assert f"Error: No prepared data at {tmp_path / 'nowhere'}" in result.stderr and "prepare_data.py" in result.stderr
    assert "Traceback" not in result.stderr, "the one line that matters, not a config traceback"


@pytest.mark.parametrize("config", [[TRAIN, "configs/demo.yaml"], [TRAIN, EVALUATE, "configs/demo.yaml"]])
def test_a_preset_whose_slice_size_differs_from_the_prepared_data_stops_before_loading_it(
    config: list[str], prepared_small: Path, tmp_path: Path
) -> None:
    # The demo preset's 64 px network on slices prepared at TINY_SIZE px: it would train (any size does), and then
    # HD95 in mm, the logged image_size and the exported metadata would be wrong.
    overrides = list(TINY_OVERRIDES)
    overrides[overrides.index("--image_size") + 1] = "64"
    args = ["--dataset_dir", str(prepared_small), "--ckpt_dir", str(tmp_path / "models"), "--in_channels", "2"]
    result = bundle_run(config, *args, "--stage", "1", *overrides, check=False)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = result.stderr.strip().splitlines()[-2]
    assert message.startswith(f"Error: {prepared_small} does not fit this config")
    assert f"its slices are {TINY_SIZE} px but the config builds the network for 64 px" in message
    assert f"add --image_size {TINY_SIZE}, or prepare the data again with --size 64" in message
    assert "1 channel(s) (flair) but the config's in_channels is 2" in message
    assert not (tmp_path / "models").exists(), "nothing was trained or written"


def test_baselines_keep_their_checkpoints_apart(trained: dict[str, Path]) -> None:
    for variant, stage in (("baseline_seg", 1), ("baseline_cls", 2)):
        assert {"best.pt", "checkpoint_epoch=2.pt"} <= _stage_files(trained["ckpt"], variant, stage)
        assert (trained["ckpt"] / variant / "model.pt").is_file()
        metrics = json.loads((trained["eval"] / variant / "metrics.json").read_text())
        if variant == "baseline_seg":
            assert metrics["brats_patient_dice_mean"] is not None and metrics["kaggle_cls_n"] == 0
        else:
            assert metrics["kaggle_cls_n"] > 0 and metrics["brats_slices"] == 0
    model = trained["ckpt"] / "model.pt"
    assert hashlib.sha256(model.read_bytes()).hexdigest() == trained["model_sha256"], "a baseline overwrote it"
    # Budget: the baselines train for stage 1 + 3 (seg) and stage 2 + 3 (cls) epochs: 2 each here.


def _stage_one(data: Path, ckpt_dir: Path, epochs: int) -> list[str]:
    """Overrides that train stage 1 alone, tiny, for ``epochs`` epochs, into ``ckpt_dir``."""
    return ["--dataset_dir", str(data), "--ckpt_dir", str(ckpt_dir), "--stage", "1", *TINY_OVERRIDES,
            "--epochs#1", str(epochs)]  # fmt: skip


def _epochs_run(log: str, total: int) -> list[int]:
    return sorted({int(m) for m in re.findall(rf"Epoch: (\d+)/{total}, Iter", log)})


def test_interrupted_stage_resumes_and_restart_starts_over(prepared_small: Path, tmp_path: Path) -> None:
    epochs = 12
    args = _stage_one(prepared_small, tmp_path, epochs)
    stage_dir = tmp_path / "multitask" / "stage1"
    process = subprocess.Popen(
        bundle_command([TRAIN, "configs/demo.yaml"], *args),
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 300
    while not list(stage_dir.glob("checkpoint_epoch=[2-9].pt")) and process.poll() is None:
        assert time.monotonic() < deadline, "no epoch checkpoint appeared"
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    saved = max(int(re.search(r"=(\d+)", p.name).group(1)) for p in stage_dir.glob("checkpoint_epoch=*.pt"))
    assert 2 <= saved < epochs, "the run finished before it could be interrupted"

    resumed = bundle_run([TRAIN, "configs/demo.yaml"], *args)
    log = resumed.stdout + resumed.stderr
    assert f"checkpoint_epoch={saved}.pt" in log
    assert _epochs_run(log, epochs) == list(range(saved + 1, epochs + 1))
    assert _stage_files(tmp_path, "multitask", 1) == {"best.pt", f"checkpoint_epoch={epochs}.pt", "stage.json"}

    # The best score went through the interruption: ignite's (score, file) list of the best checkpoint.
    best_state = torch.load(stage_dir / f"checkpoint_epoch={epochs}.pt", map_location="cpu")["best"]
    assert len(best_state["_saved"]) == 1 and not math.isinf(best_state["_saved"][0][0])

    restarted = bundle_run([TRAIN, "configs/demo.yaml"], *args, "--restart", "true", "--epochs#1", "2")
    assert _epochs_run(restarted.stdout + restarted.stderr, 2) == [1, 2]


def test_same_seed_gives_the_same_model(prepared_small: Path, tmp_path: Path) -> None:
    states = []
    for run in ("a", "b"):
        bundle_run([TRAIN, "configs/demo.yaml"], *_stage_one(prepared_small, tmp_path / run, 2))
        states.append(torch.load(tmp_path / run / "multitask" / "stage1" / "checkpoint_epoch=2.pt", map_location="cpu"))
    first, second = (state["model"] for state in states)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert states[0]["best"] == states[1]["best"]


def test_two_process_distributed_training_runs_the_same_three_stages(prepared_small: Path, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}"
    args = ["--dataset_dir", str(prepared_small), "--ckpt_dir", str(tmp_path / "models"), "--tracking_uri", store,
            "--output_dir", str(tmp_path / "eval"), *TINY_OVERRIDES]  # fmt: skip
    result = pipeline_run([TRAIN, "configs/demo.yaml", MULTI_GPU], *args)
    log = result.stdout + result.stderr
    for stage in (1, 2, 3):
        assert {"best.pt", "checkpoint_epoch=1.pt", "stage.json"} <= _stage_files(
            tmp_path / "models", "multitask", stage
        )
    # Each process trains on half of the BraTS batches; only rank 0 prints them.
    datalist = json.loads((prepared_small / "datalist.json").read_text())
    per_process = math.ceil(math.ceil(len(datalist["brats_training"]) / 2) / 8)
    assert re.search(rf"Epoch: 1/1, Iter: {per_process}/{per_process} ", log)
    assert log.count("Epoch: 1/1, Iter: 1/") == 3, "one line per stage: only rank 0 logs"
    assert log.count("stage 3 (joint fine-tuning): tasks") == 1, "only rank 0 says what the stage does"
    # Stage 2 estimated the Kaggle images' BatchNorm statistics before training the head, as one process does.
    stage1, stage2 = (torch.load(tmp_path / "models" / "multitask" / f"stage{s}" / "best.pt") for s in (1, 2))
    statistics = [k for k in stage1 if k.startswith("encoder.") and "running_mean" in k]
    assert all(stage1[k][1].abs().max() == 0 < stage2[k][1].abs().max() for k in statistics)
    # Only rank 0 tracks: one parent run and one run per stage.
    from scripts.tracking import mlflow_client

    client = mlflow_client(store)
    runs = client.search_runs([client.get_experiment_by_name("brain_tumour_multitask").experiment_id])
    assert sorted(run.data.tags["kind"] for run in runs) == ["pipeline", "stage", "stage", "stage"]


@pytest.mark.parametrize(("text", "expected"), [("false", False), ("False", False), ("0", False), ("true", True),
                                                ("TRUE", True), (True, True), (False, False)])  # fmt: skip
def test_command_line_booleans_mean_what_they_say(text: object, expected: bool) -> None:
    from scripts.flags import as_bool

    assert as_bool(text) is expected


def test_epoch_checkpoints_are_written_atomically(tmp_path: Path) -> None:
    from ignite.engine import Engine

    from scripts.handlers import AtomicCheckpointSaver

    network, optimizer_free = torch.nn.Linear(2, 1), torch.nn.Linear(1, 1)
    save_dict = {"model": network, "other": optimizer_free}  # two entries: named checkpoint_*, as in train.yaml
    saver = AtomicCheckpointSaver(save_dir=str(tmp_path), save_dict=save_dict, save_interval=1, n_saved=1)
    assert saver._interval_checkpoint.save_handler._atomic
    engine = Engine(lambda engine, batch: None)
    saver.attach(engine)
    engine.run([0, 1], max_epochs=2)
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_epoch=2.pt"]  # no temporary file left behind
    state = torch.load(tmp_path / "checkpoint_epoch=2.pt", map_location="cpu")
    assert torch.equal(state["model"]["weight"], network.weight.detach())
