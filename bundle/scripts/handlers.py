"""Ignite handlers the stages need beyond MONAI's own."""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from ignite.engine import Events
from monai.handlers import CheckpointSaver
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .engines import estimate_domain_statistics
from .stages import epoch_checkpoints


def save_atomically(state: dict[str, torch.Tensor], path: str) -> None:
    """Write a checkpoint through a temporary file, so a crash never leaves a truncated file under ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    partial = f"{path}.partial"
    torch.save(state, partial)
    os.replace(partial, path)


class BestCheckpoint:
    """Save the network's weights whenever the evaluator's key metric improves.

    Unlike a plain saver it remembers the best score in its own state (``state_dict``/``load_state_dict``), which
    the stage's resumable training checkpoint includes: after an interruption the stage only replaces ``best.pt``
    with a model that beats the best one seen before the interruption.

    Args:
        network: the network whose ``state_dict`` is saved (the unwrapped model under DistributedDataParallel).
        paths: files to write on every improvement, e.g. the stage's ``best.pt`` and, for the final stage, the
            bundle's ``models/model.pt``.
        metric_name: the evaluator metric to maximise.
    """

    def __init__(self, network: nn.Module, paths: Sequence[str], metric_name: str = "val_score") -> None:
        self.network = network
        self.paths = [p for p in paths if p]
        self.metric_name = metric_name
        self.best_metric = -math.inf
        self.best_epoch = -1
        self.logger = logging.getLogger(__name__)

    def attach(self, evaluator: Any) -> None:
        evaluator.add_event_handler(Events.COMPLETED, self)

    def __call__(self, evaluator: Any) -> None:
        score = evaluator.state.metrics.get(self.metric_name, math.nan)
        if math.isnan(score) or score <= self.best_metric:
            return
        self.best_metric = float(score)
        # MONAI's ValidationHandler runs the evaluator with the trainer's epoch as its own.
        self.best_epoch = int(evaluator.state.epoch)
        state = self.network.state_dict()
        for path in self.paths:
            save_atomically(state, path)
        self.logger.info(f"new best {self.metric_name} {score:.4f}: saved {', '.join(self.paths)}")

    def state_dict(self) -> dict[str, float]:
        return {"best_metric": self.best_metric, "best_epoch": self.best_epoch}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.best_metric = float(state["best_metric"])
        self.best_epoch = int(state["best_epoch"])


class SlicePredictionWriter:
    """Write each slice's predicted mask (``.npy``, uint8) and a JSON of tumour probabilities per slice.

    Attach to an evaluator whose (collated) outputs carry ``seg_prob``, ``cls_prob``, ``patient`` and ``slice``,
    as :class:`~scripts.engines.MultiTaskEvalStep` gives them. The JSON is written when the run completes.

    Args:
        output_dir: folder for ``<patient>/z<slice>_mask.npy`` files and ``predictions.json``.
    """

    def __init__(self, output_dir: str) -> None:
        self.output_dir = output_dir
        self.predictions: list[dict[str, Any]] = []

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED, self.save_batch)
        engine.add_event_handler(Events.COMPLETED, self.save_summary)

    def save_batch(self, engine: Any) -> None:
        output = engine.state.output
        masks = (output["seg_prob"] >= 0.5).to(torch.uint8).cpu().numpy()
        for index, (patient, z) in enumerate(zip(output["patient"], output["slice"].tolist(), strict=True)):
            folder = os.path.join(self.output_dir, patient)
            os.makedirs(folder, exist_ok=True)
            np.save(os.path.join(folder, f"z{z:03d}_mask.npy"), masks[index])
            probability = float(output["cls_prob"][index])
            self.predictions.append(
                {"patient": patient, "slice": z, "tumour_probability": probability, "tumour": probability >= 0.5}
            )

    def save_summary(self, engine: Any) -> None:
        os.makedirs(self.output_dir, exist_ok=True)
        partial = os.path.join(self.output_dir, "predictions.json.partial")
        with open(partial, "w") as file:
            json.dump(self.predictions, file, indent=1)
        os.replace(partial, os.path.join(self.output_dir, "predictions.json"))


class KeepLatestEpochCheckpoint:
    """After each epoch, delete every ``checkpoint_epoch=N.pt`` in a folder but the newest.

    The epoch saver keeps one file within a process, but a resumed process does not know the file the interrupted
    one left behind; without this, a resumed stage would end with two "last" checkpoints.

    Args:
        directory: the stage's checkpoint folder.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Any) -> None:
        for path in epoch_checkpoints(self.directory)[:-1]:
            os.remove(path)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver`, writing every file atomically (temporary file, then rename).

    MONAI's saver writes in place, so a run killed while saving leaves a truncated ``checkpoint_epoch=N.pt`` that
    looks complete and breaks the resume; written this way, a killed save leaves the previous epoch's file.
    Takes the same arguments.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # ignite's DiskSaver option, which MONAI turns off


class DomainStatistics:
    """Estimate a data source's BatchNorm statistics when the stage starts (see ``estimate_domain_statistics``).

    Attached after the handler that loads the stage's starting checkpoint, so the estimate is not overwritten by
    the previous stage's statistics for that source (which it never saw).

    Args:
        network: the network being trained (not its DistributedDataParallel wrapper).
        loader: the source's training images.
        source: the data source whose domain gets the statistics.
    """

    def __init__(self, network: torch.nn.Module, loader: Any, source: str = "kaggle") -> None:
        self.network = network
        self.loader = loader
        self.source = source

    def attach(self, engine: Any) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Any) -> None:
        estimate_domain_statistics(self.network, self.loader, self.source)


class WeightAverage:
    """An exponential moving average of the weights (``torch.optim.swa_utils``), which the stage's validation scores
    and its best checkpoint keeps; MONAI has no such handler.

    After each optimizer update the average moves ``1 - decay`` of the way to the network's new weights and
    BatchNorm statistics. The validator runs on the average: the network holds it from the validator's start to its
    end (after the best checkpoint is saved), then gets its own weights back and training goes on from them. The
    average smooths the step-to-step noise of fine-tuning, so the validation curve and the saved model depend less
    on which update happened to end an epoch.

    Args:
        network: the trained network (unwrapped from DistributedDataParallel).
        validator: the stage's evaluator.
        decay: weight of the old average at each update; 0 turns averaging off (the handler does nothing).
        every: trainer iterations per optimizer update (the trainer's ``accumulation_steps``).
    """

    def __init__(self, network: nn.Module, validator: Any, decay: float = 0.0, every: int = 1) -> None:
        self.network, self.validator, self.every = network, validator, int(every)
        average = float(decay) > 0
        self.average = (
            AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True) if average else None
        )
        self._own: dict[str, torch.Tensor] | None = None

    def attach(self, trainer: Any) -> None:
        if self.average is None:
            return
        trainer.add_event_handler(Events.ITERATION_COMPLETED(every=self.every), self.update)
        self.validator.add_event_handler(Events.STARTED, self.swap_in)
        self.validator.add_event_handler(Events.COMPLETED, self.swap_out)

    def update(self, _: Any = None) -> None:
        self.average.update_parameters(self.network)

    def swap_in(self, _: Any = None) -> None:
        self._own = {key: value.detach().clone() for key, value in self.network.state_dict().items()}
        self.network.load_state_dict(self.average.module.state_dict())

    def swap_out(self, _: Any = None) -> None:
        if self._own is not None:
            self.network.load_state_dict(self._own)
            self._own = None

    def state_dict(self) -> dict[str, Any]:
        return {} if self.average is None else self.average.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.average is not None and state:
            self.average.load_state_dict(state)
