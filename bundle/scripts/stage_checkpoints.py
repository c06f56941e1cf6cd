"""A training stage's checkpoints: where they are, what they were made for, and whether a run may use them.

Each stage keeps, in ``models/<variant>/stage<N>/``:

- ``stage.json``: what the checkpoints were made for (the stage's settings, the prepared data's digest, the
  sha256 of the checkpoint it started from) and how far training got;
- ``checkpoint_epoch=N.pt``: the last epoch's training state (weights, optimizer, schedule, best score, trainer);
- ``best.pt``: the weights with the best validation score, the next stage's starting point.

MONAI's ``CheckpointSaver``/``CheckpointLoader`` write and read the files; what they cannot know is whether the
files on disk belong to this run. The rules, checked before any data is read (:meth:`StageCheckpoints.check`):

- ``--restart true`` empties the stage's folder and marks the stages that start from it as to be retrained;
- a stage marked to be retrained (an earlier stage trained again since) starts over from the new starting point;
- checkpoints made with other settings or data, or from another starting checkpoint, are never resumed: the run
  stops, saying what differs and the two ways out (``--restart true``, or another ``--ckpt_dir``);
- a finished stage asked for the same epochs has nothing to train; for more epochs it continues with its
  learning-rate schedule stretched to the new end; for fewer it is refused.

A stage that ``continues`` another also takes that stage's optimizer state for the parts they share
(:class:`OptimizerContinuation`).
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import CheckpointLoader
from torch import nn

from .datasets import check_prepared, data_digest
from .errors import UsageError
from .files import file_sha256, write_json_atomic
from .flags import as_bool
from .handlers import AtomicCheckpointSaver
from .networks.checkpoints import is_bundle_model
from .postprocessing import forget_stale_choice
from .stages import CARRIED_GROUPS, parameter_names
from .tracking import flatten_settings

RECORD = "stage.json"
BEST = "best.pt"
# Settings that may change between a stage's runs without making its checkpoints someone else's.
FREE_SETTINGS = ("stage.epochs", "stage.name")
# Attributes of PyTorch and MONAI schedulers that set the schedule's length: a resumed stage keeps the configured
# ones, not the interrupted run's, so that more epochs stretch the schedule instead of training at its end value.
SCHEDULE_LENGTH = ("t_total", "warmup_steps", "total_iters", "T_max")


def _epoch_of(path: str) -> int:
    return int(re.search(r"checkpoint_epoch=(\d+)\.pt$", path).group(1))


def epoch_checkpoints(directory: str | os.PathLike) -> list[str]:
    """A stage's ``checkpoint_epoch=N.pt`` files, oldest epoch first."""
    return sorted(glob.glob(os.path.join(glob.escape(str(directory)), "checkpoint_epoch=*.pt")), key=_epoch_of)


def _plain(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The settings as JSON would store them, so that a fresh run compares equal to the record it wrote."""
    return json.loads(json.dumps(settings, default=str))


def _unused(settings: Mapping[str, Any]) -> set[str]:
    """Settings the stage does not train with: a seg-only stage ignores the classification loss (a cls-only one the
    segmentation's), a stage without both tasks the balance lambda, a BraTS-only stage the Kaggle batch size (e.g. a
    study of lambda reuses stage 1), the prepared split (no fold) the number of folds (so checkpoints made before
    folds existed still fit)."""
    stage = settings.get("stage", {})
    tasks, unused = set(stage.get("tasks", ())), set(FREE_SETTINGS)
    if settings.get("fold") is None:
        unused.add("num_folds")
    if "cls" not in tasks:
        unused |= {"loss.cls", "loss.focal_gamma"}
    if "seg" not in tasks:
        unused.add("loss.squared_pred")
    if tasks != {"seg", "cls"}:
        unused.add("loss.lambda")
    if stage.get("data") == "brats":
        unused.add("data.kaggle_batch_size")
    return unused


def _differences(recorded: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    old, new = flatten_settings(recorded), flatten_settings(current)
    keys = sorted((set(old) | set(new)) - _unused(current))
    changed = [key for key in keys if old.get(key) != new.get(key)]
    return [f"{key}: {old.get(key, '(unset)')} -> {new.get(key, '(unset)')}" for key in changed]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


class StageCheckpoints:
    """The checkpoints of one training stage, and the rules for starting or resuming from them (module docstring).

    Args:
        directory: the stage's folder, ``<ckpt_dir>/<variant>/stage<N>``; the other stages' are beside it.
        stage: the stage number.
        stages: the config's ``stages`` table: the stage's epochs, which stage it starts from, which start from it.
        settings: everything the stage trains with (network, stage settings, losses, batch sizes, seed), nested
            dicts allowed; with the prepared data's digest, compared with the record of existing checkpoints.
        dataset_dir: the prepared data.
        restart: discard the stage's checkpoints and train it from its starting point again.
        rank: the process's rank; only rank 0 writes.

    Example::

        checkpoints = StageCheckpoints("models/multitask/stage2", 2, stages, settings, "data/prepared")
        print(checkpoints.check())      # before any data is read: raises UsageError if the checkpoints do not fit
        checkpoints.attach(trainer, {"model": model, "optimizer": optimizer})
    """

    def __init__(
        self,
        directory: str,
        stage: int,
        stages: Mapping[str, Mapping[str, Any]],
        settings: Mapping[str, Any],
        dataset_dir: str,
        restart: Any = False,
        rank: int = 0,
    ) -> None:
        self.directory, self.stage, self.stages = str(directory), int(stage), stages
        self.variant_dir = os.path.dirname(self.directory)
        if str(self.stage) not in stages:
            raise UsageError(f"--stage {stage} is not a stage of this config: choose from {sorted(stages)}.")
        self.best_path = os.path.join(self.directory, BEST)
        self.dataset_dir = dataset_dir
        self.settings = _plain({**settings, "data_digest": data_digest(dataset_dir)})
        self.epochs = int(stages[str(self.stage)]["epochs"])
        self.restart = as_bool(restart, "restart")
        self.rank = int(rank)
        self.resume_path = ""
        self.done = False
        init_from = stages[str(self.stage)].get("init_from")
        self.init_dir = os.path.join(self.variant_dir, f"stage{init_from}") if init_from else ""

    @property
    def init_path(self) -> str:
        """The previous stage's best checkpoint this stage starts from ('' when it starts from scratch)."""
        return os.path.join(self.init_dir, BEST) if self.init_dir else ""

    def later_stages(self) -> list[int]:
        """The stages that start from this one's checkpoint, directly or through another."""
        later, frontier = [], {self.stage}
        while frontier:
            frontier = {int(n) for n, spec in self.stages.items() if spec.get("init_from") in frontier} - set(later)
            later.extend(sorted(frontier))
        return later

    # ---- the rules, before any data is read

    def read_record(self) -> dict[str, Any] | None:
        return _read_json(os.path.join(self.directory, RECORD))

    def write_record(self, **changes: Any) -> None:
        if self.rank == 0:
            path = os.path.join(self.directory, RECORD)
            write_json_atomic(path, {**(_read_json(path) or {}), **changes})

    def check(self, dry_run: bool = False, announce: bool = False) -> str:
        """Decide whether this run starts the stage, resumes it, or has nothing to train; returns a line for the log.

        With ``dry_run`` nothing is written or removed (the pipeline launcher asks each stage before it starts).
        With ``announce`` the line is also printed, by rank 0 only (every process of a DDP run checks).

        Raises:
            UsageError: the prepared data do not fit the network, the starting checkpoint is missing, or the stage's
                checkpoints were made for other settings, data or starting checkpoint, or for more epochs than asked.
        """
        network = self.settings["network"]
        check_prepared(self.dataset_dir, network["image_size"], network["in_channels"])
        if self.init_dir and not os.path.isfile(self.init_path):
            raise UsageError(
                f"Stage {self.stage} starts from stage {self.stages[str(self.stage)]['init_from']}'s best checkpoint "
                f"{self.init_path}, which does not exist: train that stage first (scripts/train.py runs every "
                "stage in order)."
            )
        record = self.read_record()
        fresh = self.restart or (record is not None and record.get("retrain"))
        if fresh and not dry_run:
            reason = "--restart true" if self.restart else record["retrain"]
            self._start_over(reason)
        elif not fresh:
            self._check_record(record)
        self.resume_path = "" if fresh else self._newest_complete(remove_incomplete=not dry_run)
        done = _epoch_of(self.resume_path) if self.resume_path else 0
        if done > self.epochs:
            self._refuse(f"it has already trained {done} epochs, more than the {self.epochs} asked")
        self.done = bool(self.resume_path) and done >= self.epochs
        spec = self.stages[str(self.stage)]
        what = (
            f"stage {self.stage} ({spec.get('name', '')}): tasks {list(spec['tasks'])}, training "
            f"{list(spec['trainable'])}, data {spec['data']}, {self.epochs} epochs, checkpoints in {self.directory}"
        )
        if self.done:
            line = f"{what}: already trained, nothing to do (--restart true trains it again)."
        elif self.resume_path:
            line = f"{what}: resumes after epoch {done} from {self.resume_path}."
        else:
            line = f"{what}: starts {f'from {self.init_path}' if self.init_dir else 'from scratch'}."
        if announce and self.rank == 0:
            print(line, flush=True)
        return line

    def _check_record(self, record: Mapping[str, Any] | None) -> None:
        """Stop when existing checkpoints were made for something else than this run."""
        if record is None:
            if epoch_checkpoints(self.directory) or os.path.isfile(self.best_path):
                self._refuse(f"its checkpoints in {self.directory} have no {RECORD} saying what they were made for")
            return
        problems = _differences(record["settings"], self.settings)
        if problems:
            shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
            self._refuse(f"its checkpoints were made with other settings or data ({shown})")
        if self.init_dir and record.get("init_sha256") != file_sha256(self.init_path):
            self._refuse(f"it started from another version of {self.init_path} than the one there now")

    def _refuse(self, problem: str) -> None:
        raise UsageError(
            f"Stage {self.stage} cannot resume: {problem}. Either train it again with --restart true (its "
            f"checkpoints in {self.directory} are discarded), or keep them and train into another folder with "
            "--ckpt_dir DIR."
        )

    def _start_over(self, reason: str) -> None:
        if self.rank == 0:
            if os.path.isdir(self.directory):
                shutil.rmtree(self.directory)
            for later in self.later_stages():
                self.mark_retrain(later, f"stage {self.stage} was trained again ({reason})")
        if _distributed():
            torch.distributed.barrier()  # the other ranks look at the folder only once it is emptied

    def mark_retrain(self, stage: int, reason: str) -> None:
        """Mark a later stage as to be trained again from this stage's new checkpoint."""
        path = os.path.join(self.variant_dir, f"stage{stage}", RECORD)
        record = _read_json(path)
        if record is not None:
            write_json_atomic(path, {**record, "retrain": reason})

    def _newest_complete(self, remove_incomplete: bool) -> str:
        """The newest epoch checkpoint that is a complete file: a kill while saving can leave a truncated one."""
        for candidate in reversed(epoch_checkpoints(self.directory)):
            if zipfile.is_zipfile(candidate):
                return candidate
            if remove_incomplete and self.rank == 0:
                print(f"{candidate} is incomplete (the run was stopped while saving it): removed.", flush=True)
                os.remove(candidate)
        return ""

    # ---- during training

    def attach(self, trainer: Engine, state: Mapping[str, Any]) -> None:
        """Resume the training state (when :meth:`check` found one), save it every epoch (rank 0) and keep the
        stage's record up to date. Call after :meth:`check`, and after the handler that loads the starting
        checkpoint was attached (so that a resumed state replaces it).

        Args:
            trainer: the stage's trainer.
            state: what a resumed stage needs (model, optimizer, scheduler, best score, ...); the trainer joins it
                here, as a config cannot name the trainer in a component the trainer is built from.
        """
        self.state = {**state, "trainer": trainer}
        if self.resume_path:
            CheckpointLoader(self.resume_path, self.state, map_location="cpu").attach(trainer)
            scheduler = self.state.get("lr_scheduler")
            if scheduler is not None:
                configured = {name: getattr(scheduler, name) for name in SCHEDULE_LENGTH if hasattr(scheduler, name)}
                trainer.add_event_handler(Events.STARTED, lambda _: scheduler.__dict__.update(configured))
        trainer.add_event_handler(Events.STARTED, self._started)
        # On every rank: ignite's saver writes on rank 0 only, and setting it up is a collective step under DDP.
        saver = AtomicCheckpointSaver(save_dir=self.directory, save_dict=self.state, save_interval=1, n_saved=1)
        saver.attach(trainer)
        if self.rank == 0:
            trainer.add_event_handler(Events.EPOCH_COMPLETED, self._epoch_completed)
        trainer.add_event_handler(Events.COMPLETED, self._completed)

    def _started(self, trainer: Engine) -> None:
        init_sha = file_sha256(self.init_path) if self.init_dir else None
        self.write_record(stage=self.stage, settings=self.settings, init_sha256=init_sha, retrain=None)
        if self.rank == 0:
            for later in self.later_stages():
                self.mark_retrain(later, f"stage {self.stage} was trained again after it")

    def _epoch_completed(self, trainer: Engine) -> None:
        # The saver keeps one file per process; a resumed process does not know the one the interrupted run left.
        for path in epoch_checkpoints(self.directory)[:-1]:
            os.remove(path)
        self.write_record(epochs_done=int(trainer.state.epoch), epochs=self.epochs)

    def _completed(self, trainer: Engine) -> None:
        if self.rank == 0:
            print(
                f"Stage {self.stage} done. Checkpoints in {self.directory}:\n"
                f"  {BEST:<22}  weights with the best validation score (the next stage starts from them)\n"
                f"  {'checkpoint_epoch=N.pt':<22}  the last epoch's training state (a rerun resumes from it)\n"
                f"  {RECORD:<22}  what they were made for",
                flush=True,
            )

    def publish(self, model_path: str, metadata_file: str = "", network: Mapping[str, Any] | None = None) -> str:
        """Make the stage's best weights the variant's model: ``model.pt`` as a plain state dict (what
        ``ckpt_export``, ``inference.yaml`` and the Deploy app load); when that is the bundle's own
        ``models/model.pt``, the network's settings and input size go into its ``metadata_file``, so that
        ``bundle/`` alone describes its weights; a post-processing size chosen for other weights is forgotten
        (:func:`scripts.postprocessing.forget_stale_choice`). Returns the model's path."""
        if not os.path.isfile(self.best_path):
            raise UsageError(f"Nothing to publish: {self.best_path} does not exist (train stage {self.stage} first).")
        state = torch.load(self.best_path, map_location="cpu", weights_only=True)
        Path(model_path).parent.mkdir(parents=True, exist_ok=True)
        partial = f"{model_path}.partial"
        torch.save(state.get("model", state), partial)
        os.replace(partial, model_path)
        # The bundle describes the model it ships (models/model.pt beside configs/), not a baseline's or one elsewhere.
        if is_bundle_model(metadata_file, model_path) and network is not None:
            describe_network(metadata_file, network)
        forget_stale_choice(metadata_file, model_path)
        return model_path


def describe_network(metadata_file: str, network: Mapping[str, Any]) -> None:
    """Write the trained network's settings into ``metadata.json``: its input and output sizes in
    ``network_data_format`` and all of them under ``network_settings``."""
    metadata = _read_json(metadata_file)
    size = [int(network["image_size"])] * 2
    formats = metadata["network_data_format"]
    formats["inputs"]["image"]["num_channels"] = int(network["in_channels"])
    formats["inputs"]["image"]["spatial_shape"] = size
    formats["outputs"]["pred"]["spatial_shape"] = size
    metadata["network_settings"] = dict(network)
    write_json_atomic(metadata_file, metadata, indent=4, sort_keys=False)  # the file's own layout and key order


def _read_json(path: str) -> Any:
    """A JSON file's content, or None where there is no file."""
    if not os.path.isfile(path):
        return None
    with open(path) as file:
        return json.load(file)


class OptimizerContinuation:
    """At the start of a stage with ``continues: N``, the encoder's and decoder's AdamW state of stage N's last
    epoch (its ``checkpoint_epoch=*.pt``), so that they carry on stage N's optimisation (see
    :func:`scripts.stages.learning_rate_schedule`). A resumed stage then loads its own state over it. MONAI's
    CheckpointLoader loads a whole optimizer, not the parameters that two stages share.

    Args:
        optimizer: the stage's optimizer.
        network: the trained network (unwrapped from DistributedDataParallel).
        stage: the stage's settings.
        stages: the config's ``stages`` table.
        checkpoint_dir: this stage's folder (``<ckpt_dir>/<variant>/stage<N>``); the stage it continues is beside it.
    """

    def __init__(
        self, optimizer: Any, network: nn.Module, stage: dict[str, Any], stages: dict[str, Any], checkpoint_dir: str
    ) -> None:
        self.optimizer, self.network, self.stage, self.stages = optimizer, network, stage, stages
        self.variant_dir = os.path.dirname(str(checkpoint_dir))

    def attach(self, trainer: Any) -> None:
        if self.stage.get("continues"):
            trainer.add_event_handler(Events.STARTED, self)

    def __call__(self, _: Any = None) -> None:
        earlier = str(self.stage["continues"])
        found = epoch_checkpoints(os.path.join(self.variant_dir, f"stage{earlier}"))
        if not found:
            raise UsageError(f"stage {earlier} has no checkpoint_epoch=*.pt in {self.variant_dir}: nothing to continue")
        saved = torch.load(found[-1], map_location="cpu", weights_only=False)["optimizer"]
        then = parameter_names(self.network, self.stages[earlier]["trainable"])
        by_name = dict(self.network.named_parameters())
        groups = {id(p): group.get("name") for group in self.optimizer.param_groups for p in group["params"]}
        moved = 0
        for index, state in saved["state"].items():
            name = then[int(index)]
            parameter = by_name[name]
            if groups.get(id(parameter)) in CARRIED_GROUPS:
                self.optimizer.state[parameter] = {k: v.to(parameter.device) if torch.is_tensor(v) else v
                                                   for k, v in state.items()}  # fmt: skip
                moved += 1
        print(
            f"Encoder and decoder carry on stage {earlier}'s optimizer state ({moved} parameters, {found[-1]}).",
            flush=True,
        )
