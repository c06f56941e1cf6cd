"""Train every stage of the bundle's pipeline in order, under one MLflow parent run, and publish the model.

    python scripts/train.py --config_file "['bundle/configs/train.yaml','configs/demo.yaml']" \
        --bundle_root bundle --dataset_dir data/prepared [more bundle overrides]

Takes exactly the arguments of ``python -m monai.bundle run`` (without ``--stage``) and runs, for each stage of the
config's ``pipeline`` (1, 2, 3; a baseline preset has one), ``python -m monai.bundle run ... --stage N`` as its own
process: a stage's cached data is freed when it ends, and an interrupted stage resumes on its own. With
``nproc_per_node`` in the config (``multi_gpu_train.yaml``), each stage runs under ``torchrun`` with that many
processes. Then the last stage's best weights become the variant's ``model.pt`` (``monai.bundle run publish``).

Before anything starts, each stage says whether its checkpoints fit this run (``stage_checkpoints.py``): stages
already trained for these settings and data are skipped, the first one with work to do trains and every later one
after it; a stage whose checkpoints were made for something else stops the pipeline before any training. When
nothing is left to train, no MLflow run is opened.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def stage_parser(args: list[str], stage: int):
    """The bundle's config for one stage, with the bundle's package importable (as ``monai.bundle run`` does)."""
    from scripts.tracking import bundle_parser

    parser = bundle_parser(args)
    parser["stage"] = stage
    return parser


def bundle_root(args: list[str]) -> Path:
    for index, arg in enumerate(args):
        if arg == "--bundle_root" and index + 1 < len(args):
            return Path(args[index + 1]).resolve()
        if arg.startswith("--bundle_root="):
            return Path(arg.split("=", 1)[1]).resolve()
    return REPO_ROOT / "bundle"


def stages_to_train(args: list[str], pipeline: list[int]) -> list[int]:
    """The stages with work to do: from the first whose checkpoints do not cover this run, every later one."""
    for position, stage in enumerate(pipeline):
        checkpoints = stage_parser(args, stage).get_parsed_content("train#checkpoints")
        print(checkpoints.check(dry_run=True), flush=True)
        if not checkpoints.done:
            return pipeline[position:]
    return []


def run_stage(args: list[str], stage: int, parent_run_id: str, processes: int) -> int:
    launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={processes}"] if processes else []
    command = [sys.executable, *launcher, "-m", "monai.bundle", "run", *args, "--stage", str(stage)]
    if parent_run_id:
        command += ["--parent_run_id", parent_run_id]
    # `monai.bundle run` puts the bundle on sys.path only when `run` starts; multi_gpu_train.yaml's `initialize`
    # (the process group) resolves the config's imports before that, `import scripts` among them.
    path = os.pathsep.join(filter(None, [str(bundle_root(args)), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run(command, check=False, env={**os.environ, "PYTHONPATH": path}).returncode


def main(args: list[str]) -> int:
    if not args or any(arg in ("-h", "--help") for arg in args):
        print(__doc__)
        return 0
    if not any(arg == "--config_file" or arg.startswith("--config_file=") for arg in args):
        raise SystemExit(f"scripts/train.py needs --config_file (the bundle's train.yaml and a preset):\n{__doc__}")
    if any(arg == "--stage" or arg.startswith("--stage=") for arg in args):
        raise SystemExit(
            "scripts/train.py trains every stage of the config's pipeline; to train one stage, run "
            "`python -m monai.bundle run` with the same arguments and --stage N."
        )
    sys.path.insert(0, str(bundle_root(args)))
    import scripts  # noqa: F401  (its error hook: a user's mistake is one line, not a traceback)
    from scripts.flags import as_bool
    from scripts.tracking import PipelineRun, check_tracking

    config = stage_parser(args, 1)
    pipeline = [int(stage) for stage in config.get_parsed_content("pipeline")]
    last = stage_parser(args, pipeline[-1])
    variant = last.get_parsed_content("variant")
    tracking = as_bool(last.get_parsed_content("mlflow_tracking"), "mlflow_tracking")
    check_tracking(last.get_parsed_content("tracking_uri"), tracking)
    todo = stages_to_train(args, pipeline)

    parent, durations, status = None, [], "FAILED"
    if todo and tracking:
        parent = PipelineRun(
            last.get_parsed_content("tracking_uri"), last.get_parsed_content("experiment_name"), variant,
            params={**last.get_parsed_content("settings"), "stages": last.get_parsed_content("stages")},
            dataset_dir=last.get_parsed_content("dataset_dir"), code_dir=str(REPO_ROOT),
        )  # fmt: skip
    parent_run_id = parent.start(pipeline, last.get()) if parent is not None else ""
    processes = int(last.get("nproc_per_node", 0))
    try:
        for stage in todo:
            print(f"\n=== {variant} stage {stage}: {last['stages'][str(stage)].get('name', '')} ===", flush=True)
            start = time.perf_counter()
            code = run_stage(args, stage, parent_run_id, processes)
            if code != 0:
                print(f"Stage {stage} failed (exit status {code}; its error is above): later stages skipped.")
                return code
            durations.append(time.perf_counter() - start)
        model_path = last.get_parsed_content("train#checkpoints").publish(
            last.get_parsed_content("model_path"), last.get_parsed_content("metadata_file"),
            last.get_parsed_content("network_settings"),
        )  # fmt: skip
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if parent is not None:
            shape = [last.get_parsed_content(key) for key in ("in_channels", "image_size", "image_size")]
            network = last.get_parsed_content("network_def") if status == "FINISHED" else None
            parent.finish(durations, status, model_path if status == "FINISHED" else "", network, shape)
    for stage, seconds in zip(todo, durations, strict=True):
        print(f"stage {stage}: {seconds:.0f} s")
    print(f"{'All stages trained' if todo else 'Every stage was already trained'}; the model is {model_path}.")
    if tracking:
        print(f"Runs: mlflow ui --backend-store-uri {last.get_parsed_content('tracking_uri')}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
