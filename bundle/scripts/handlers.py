"""Ignite handlers the stages need beyond MONAI's own."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Events
from torch import nn


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
