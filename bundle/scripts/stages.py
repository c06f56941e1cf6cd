"""The three training stages: which parts train, where they start from, and running them in order.

Stage settings live in ``configs/train.yaml`` under ``stages``; this module turns one stage's settings into a
network with the right parts frozen, optimizer parameter groups, and the checkpoints to start or resume from.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .errors import UsageError
from .networks.normalization import DomainBatchNorm2d
from .tracking import PipelineTracking

COMPONENTS = ("encoder", "decoder", "cls_head")
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off", ""}


def as_bool(value: Any, name: str = "value") -> bool:
    """A yes/no setting that may come from the command line as text.

    ``python -m monai.bundle run --restart false`` hands the config the string ``"false"``, which Python would
    take as true; only ``False`` (capitalised) arrives as a boolean.

    Raises:
        ValueError: the value is neither a boolean nor one of true/false, yes/no, on/off, 1/0.
    """
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise UsageError(f"{name} must be true or false, got {value!r}.")


def prepare_network(network: nn.Module, trainable: Sequence[str], freeze_batchnorm: Any = False) -> nn.Module:
    """Freeze every component of the multi-task network that the stage does not train.

    Frozen components get no gradients and keep BatchNorm/Dropout in eval mode (see ``FreezableMixin``), so the
    optimizer built afterwards from :func:`parameter_groups` only sees what trains.

    Args:
        network: a :class:`~scripts.networks.MultiTaskModel`.
        trainable: component names to train, from ``encoder``, ``decoder``, ``cls_head``.
        freeze_batchnorm: keep every BatchNorm layer's running statistics (see
            :meth:`~scripts.networks.normalization.DomainBatchNorm2d.freeze_statistics`); its scale and shift train.
    """
    unknown = set(trainable) - set(COMPONENTS)
    if unknown:
        raise UsageError(f"Unknown trainable components {sorted(unknown)}: choose from {COMPONENTS}.")
    for name in COMPONENTS:
        component = getattr(network, name)
        component.unfreeze() if name in trainable else component.freeze()
    if as_bool(freeze_batchnorm, "freeze_batchnorm"):
        for module in network.modules():
            if isinstance(module, DomainBatchNorm2d):
                module.freeze_statistics()
    return network


def parameter_groups(network: nn.Module, stage: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Optimizer parameter groups over trainable parameters only, from a stage of the config's ``stages`` table:
    the encoder at ``lr * encoder_lr_factor``, the decoder at ``lr * decoder_lr_factor``, the classification head at
    ``lr`` (factors default to 1).

    In joint fine-tuning a lower encoder rate keeps the features learnt in the segmentation warm-up while the
    classification adapts, and a lower decoder rate keeps the decoder that stage 1 trained: at the head's rate, a
    fresh AdamW moves every decoder weight by about the learning rate each step, which drifted the demo's masks to
    empty within an epoch (README, "The joint stage"). Empty groups are left out, so a stage with a frozen encoder
    has no encoder group.
    """
    lr = float(stage["lr"])
    groups = [
        ("encoder", network.encoder.parameters(), lr * float(stage.get("encoder_lr_factor", 1.0))),
        ("decoder", network.decoder.parameters(), lr * float(stage.get("decoder_lr_factor", 1.0))),
        ("cls_head", network.cls_head.parameters(), lr),
    ]
    result = []
    for name, params, group_lr in groups:
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            result.append({"params": trainable, "lr": group_lr, "name": name})
    if not result:
        raise ValueError("The stage trains no parameter: every component is frozen.")
    return result


def stage_dir(ckpt_dir: str | os.PathLike, variant: str, stage: int) -> str:
    """Where a stage of a variant (multitask, baseline_seg, baseline_cls) keeps its checkpoints."""
    return os.path.join(ckpt_dir, variant, f"stage{stage}")


def init_checkpoint(ckpt_dir: str | os.PathLike, variant: str, init_from: int | None) -> str:
    """The best checkpoint of the stage this one starts from ('' when it starts from scratch).

    Raises:
        UsageError: the previous stage has not produced its best checkpoint yet.
    """
    if not init_from:
        return ""
    path = os.path.join(stage_dir(ckpt_dir, variant, init_from), "best.pt")
    if not os.path.isfile(path):
        raise UsageError(
            f"This stage starts from stage {init_from}'s best checkpoint {path}, which does not exist: "
            f"run stage {init_from} first (--stage {init_from}), or the whole pipeline (--stage 0)."
        )
    return path


def epoch_checkpoints(directory: str | os.PathLike) -> list[str]:
    """A stage's ``checkpoint_epoch=N.pt`` files, oldest epoch first."""

    def epoch_of(path: str) -> int:
        return int(re.search(r"checkpoint_epoch=(\d+)\.pt$", path).group(1))

    return sorted(glob.glob(os.path.join(directory, "checkpoint_epoch=*.pt")), key=epoch_of)


def resume_checkpoint(directory: str | os.PathLike, restart: bool = False) -> str:
    """The newest complete training-state checkpoint of a stage, to continue an interrupted run ('' if none).

    A file cut short by a kill during saving (not a complete zip archive, as ``torch.save`` writes) is removed and
    the previous epoch's file used instead. With ``restart`` the stage's old checkpoints are removed first, so the
    stage starts again from scratch.
    """
    if as_bool(restart, "restart") and os.path.isdir(directory):
        shutil.rmtree(directory)
    os.makedirs(directory, exist_ok=True)

    for candidate in reversed(epoch_checkpoints(directory)):
        if zipfile.is_zipfile(candidate):
            return candidate
        print(f"{candidate} is incomplete (the run was stopped while saving it): removed.", flush=True)
        os.remove(candidate)
    return ""


def _bundle_run_arguments(argv: Sequence[str]) -> list[str]:
    """The user's ``python -m monai.bundle run ...`` arguments, without any ``--stage``."""
    main = os.path.join("monai", "bundle", "__main__.py")
    if len(argv) < 2 or not argv[0].endswith(main) or argv[1] != "run":
        raise RuntimeError(
            "Running every stage (stage 0) re-launches `python -m monai.bundle run` once per stage, so it must be "
            f"started that way; this process was started as {list(argv[:2])}. Run a single stage with --stage N."
        )
    args, skip = [], False
    for arg in argv[1:]:
        if skip:
            skip = False
            continue
        if arg == "--stage":
            skip = True
            continue
        if arg.startswith("--stage="):
            continue
        args.append(arg)
    return args


def run_pipeline(
    stages: Sequence[int],
    specs: Mapping[str, Mapping[str, Any]] | None = None,
    nproc_per_node: int = 0,
    tracking: PipelineTracking | None = None,
    model_path: str = "",
) -> list[float]:
    """Run the given stages in order, each as its own ``python -m monai.bundle run --stage N`` process.

    A fresh process per stage frees the previous stage's cached data and lets every stage resume on its own after
    an interruption; a stage that fails stops the pipeline with its exit status.

    Args:
        stages: stage numbers, in order.
        specs: the ``stages`` table of the config, for the stages' names.
        nproc_per_node: with a value above 0, each stage runs under ``torchrun`` with that many processes.
        tracking: the MLflow parent run, under which each stage logs its own run (None: no tracking).
        model_path: the pipeline's final model, logged to the parent run when every stage is done.

    Returns:
        The wall-clock seconds of each stage.
    """
    args = _bundle_run_arguments(sys.argv)
    args += tracking.start(stages) if tracking is not None else []
    durations: list[float] = []
    status = "FAILED"
    try:
        for stage in stages:
            title = (specs or {}).get(str(stage), {}).get("name", "")
            print(f"\n=== stage {stage} {title} ===", flush=True)
            start = time.perf_counter()
            launcher = ["-m", "torch.distributed.run", f"--nproc_per_node={nproc_per_node}"] if nproc_per_node else []
            command = [sys.executable, *launcher, "-m", "monai.bundle", *args, "--stage", str(stage)]
            completed = subprocess.run(command, check=False)
            if completed.returncode != 0:
                raise UsageError(
                    f"Stage {stage} failed with exit status {completed.returncode} (its error is above); later "
                    "stages skipped."
                )
            durations.append(time.perf_counter() - start)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        if tracking is not None:
            tracking.finish(durations, status, model_path if status == "FINISHED" else "")
    print("\n".join(f"stage {s}: {d:.0f} s" for s, d in zip(stages, durations, strict=True)), flush=True)
    return durations


def stage_summary(stage: int, spec: Mapping[str, Any], network: nn.Module, checkpoint_dir: str | Path) -> str:
    """One line that says what a stage is about to do, for the log."""
    trainable = sum(p.numel() for p in network.parameters() if p.requires_grad)
    total = sum(p.numel() for p in network.parameters())
    return (
        f"stage {stage} ({spec.get('name', '')}): tasks {list(spec['tasks'])}, training {list(spec['trainable'])} "
        f"({trainable:,} of {total:,} parameters), {spec['epochs']} epochs, data {spec['data']}, "
        f"checkpoints in {checkpoint_dir}"
    )


def stage_outputs(stage: int, checkpoint_dir: str, final_model_path: str = "") -> str:
    """Where a stage's outputs are, printed when it ends."""
    if stage == 0:
        return "All stages done. Checkpoints are under each stage's folder in the bundle's models/ directory."
    lines = [
        f"Stage {stage} done. Checkpoints in {checkpoint_dir}:",
        "  best.pt                 weights with the best validation score (starting point of the next stage)",
        "  checkpoint_epoch=N.pt   the last epoch's full training state (a rerun resumes from it)",
    ]
    if final_model_path:
        lines.append(f"  {final_model_path}   the pipeline's model (same weights as best.pt)")
    return "\n".join(lines)
