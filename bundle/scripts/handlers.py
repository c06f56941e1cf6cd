"""Ignite handlers the stages need beyond MONAI's own."""

from __future__ import annotations

import math
from typing import Any

import torch
from ignite.engine import Events
from monai.handlers import CheckpointSaver
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .engines import estimate_domain_statistics
from .errors import UsageError
from .flags import as_bool


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's :class:`~monai.handlers.CheckpointSaver`, writing every file atomically (temporary file, then rename),
    with its best score in the stage's resumable state. Takes the same arguments.

    MONAI's saver writes in place, so a run killed while saving leaves a truncated file that looks complete and
    breaks the resume; written this way, a killed save leaves the previous file. A best model with a fixed name
    (``key_metric_filename``) is replaced by the rename, not removed first, so ``best.pt`` never goes missing. A
    score that is not a number (e.g. an AUC on one class) never beats a real one. ``state_dict`` (which MONAI's
    saver lacks) lets the training state carry the best score, so a resumed stage only replaces ``best.pt`` with a
    better model than the interrupted run saw.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
            if checkpoint is not None:
                checkpoint.save_handler._atomic = True  # ignite's DiskSaver option, which MONAI turns off
        best = self._key_metric_checkpoint
        if best is not None:
            score = best.score_function
            best.score_function = lambda engine: _number_or_lowest(score(engine))
            if kwargs.get("key_metric_filename"):
                best.save_handler.remove = lambda filename: None

    def state_dict(self) -> dict[str, Any]:
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}


def _number_or_lowest(score: float) -> float:
    return -math.inf if math.isnan(score) else score


class DomainStatistics:
    """Estimate a data source's BatchNorm statistics when the stage starts (see ``estimate_domain_statistics``).

    Attached after the handler that loads the stage's starting checkpoint, so the estimate is not overwritten by
    the previous stage's statistics for that source (which it never saw).

    Args:
        network: the network being trained (not its DistributedDataParallel wrapper).
        loader: the source's training images.
        source: the data source whose domain gets the statistics (None: the stage estimates nothing).
    """

    def __init__(self, network: torch.nn.Module, loader: Any, source: str | None = "kaggle") -> None:
        self.network = network
        self.loader = loader
        self.source = source

    def attach(self, engine: Any) -> None:
        if self.source:
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


class BratsGradientCarry:
    """A joint stage that steps on every batch (``step_every_batch``), each update still carrying the segmentation.

    The accumulated joint step gives the encoder one update per cycle (a BraTS batch and its Kaggle batches), where
    the cls-only baseline gets one per batch. With this handler the trainer steps on every batch: the BraTS batch's
    gradient (``L_seg`` plus ``lambda * L_cls`` of its slices divided by the cycle's batches, so that they count
    once: :class:`scripts.losses.MultiTaskLoss`'s ``carried_batches``) is kept after its backward pass and added to
    the gradient of each Kaggle batch after it, so that every update holds the segmentation's gradient, at the cost
    of reusing it as the weights move within the cycle (and, with ``amp``'s gradient scaler, at the loss scale of its
    own batch). MONAI's ``SupervisedTrainer`` can sum a cycle into one update (``accumulation_steps``) but not reuse
    one batch's gradient.

    Args:
        network: the trained network (unwrapped from DistributedDataParallel).
        stage: the stage's settings: ``step_every_batch`` (false: the handler does nothing).
    """

    def __init__(self, network: nn.Module, stage: dict[str, Any]) -> None:
        self.enabled = as_bool(stage.get("step_every_batch", False), "step_every_batch")
        self.parameters = [p for p in network.parameters() if p.requires_grad]
        self._brats: list[torch.Tensor | None] = []

    def attach(self, trainer: Any) -> None:
        if not self.enabled:
            return
        from monai.engines.utils import IterationEvents

        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.after_backward)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: self._brats.clear())

    def after_backward(self, engine: Any) -> None:
        from monai.utils import CommonKeys

        if "seg" in engine.state.output[CommonKeys.PRED]:
            self._brats = [None if p.grad is None else p.grad.detach().clone() for p in self.parameters]
            return
        for parameter, brats in zip(self.parameters, self._brats, strict=False):
            if brats is None:
                continue
            if parameter.grad is None:
                parameter.grad = brats.clone()
            else:
                parameter.grad.add_(brats)


class GradientConflict:
    """The joint step's gradient conflict on the shared encoder: measured always, projected away on request (PCGrad).

    In a joint step (a BraTS batch, then its Kaggle batches, gradients accumulated) the encoder's gradient is the
    BraTS batch's ``g_b`` (L_seg and its slices' classification) plus the Kaggle batches' ``g_k``. Their cosine,
    averaged over the epoch's steps, goes to the trainer's metrics as ``encoder_grad_cosine``, and the share of steps
    where it is negative as ``encoder_grad_conflicts``, and the mean of ``|g_k| / |g_b|`` as
    ``encoder_grad_norm_ratio``. With ``project_conflicts``, a conflicting ``g_k`` loses its component along ``g_b``
    before the optimizer steps (Yu et al. 2020, "Gradient surgery for multi-task learning", one-sided: the Kaggle
    images may not undo the BraTS batch's update); with ``max_kaggle_grad_ratio``, a ``g_k`` longer than that many
    times ``|g_b|`` is scaled down to it. MONAI has no such handler.

    Args:
        network: the trained network (unwrapped from DistributedDataParallel), with an ``encoder``.
        stage: the stage's settings: ``project_conflicts`` and ``max_kaggle_grad_ratio`` (null: no cap).
        every: trainer iterations per optimizer update (the trainer's ``accumulation_steps``); 1: nothing to do.
    """

    def __init__(self, network: nn.Module, stage: dict[str, Any], every: int = 1) -> None:
        self.parameters = [p for p in network.encoder.parameters() if p.requires_grad]
        # From the command line "false" arrives as text, which bool() would take as true.
        self.project = as_bool(stage.get("project_conflicts", False), "stages#3#project_conflicts")
        self.every = int(every)
        ratio = stage.get("max_kaggle_grad_ratio")
        try:
            self.max_ratio = None if ratio is None else float(ratio)
        except ValueError:
            raise UsageError(f"stages#3#max_kaggle_grad_ratio must be a number or null, got {ratio!r}.") from None
        self._brats: list[torch.Tensor] | None = None
        self._cosines: list[float] = []
        self._ratios: list[float] = []

    def attach(self, trainer: Any) -> None:
        if self.every < 2 or not self.parameters:
            return
        from monai.engines.utils import IterationEvents

        trainer.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self.after_backward)
        trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: (self._cosines.clear(), self._ratios.clear()))
        trainer.add_event_handler(Events.EPOCH_COMPLETED, self.summarise)

    def after_backward(self, engine: Any) -> None:
        # The same step boundaries as SupervisedTrainer's accumulation (the epoch's last step may be shorter).
        position = (engine.state.iteration - 1) % engine.state.epoch_length
        if position % self.every == 0:
            self._brats = [_grad(p).clone() for p in self.parameters]
        elif (position + 1) % self.every == 0 or position + 1 == engine.state.epoch_length:
            self._combine()

    def _combine(self) -> None:
        if self._brats is None:
            return
        brats = torch.cat([g.flatten() for g in self._brats])
        kaggle = torch.cat([_grad(p).flatten() for p in self.parameters]) - brats
        dot, brats_norm, kaggle_norm = float(torch.dot(kaggle, brats)), float(brats.norm()), float(kaggle.norm())
        self._cosines.append(dot / (brats_norm * kaggle_norm) if brats_norm * kaggle_norm > 0 else 0.0)
        self._ratios.append(kaggle_norm / brats_norm if brats_norm > 0 else math.inf)
        changed = False
        if self.project and dot < 0:
            kaggle -= dot / brats_norm**2 * brats
            kaggle_norm, changed = float(kaggle.norm()), True
        if self.max_ratio is not None and kaggle_norm > self.max_ratio * brats_norm:
            kaggle *= self.max_ratio * brats_norm / kaggle_norm
            changed = True
        if changed:
            offset = 0
            for p in self.parameters:
                size = p.numel()
                p.grad.copy_((brats[offset : offset + size] + kaggle[offset : offset + size]).view_as(p))
                offset += size
        self._brats = None

    def summarise(self, engine: Any) -> None:
        if self._cosines:
            engine.state.metrics["encoder_grad_cosine"] = sum(self._cosines) / len(self._cosines)
            engine.state.metrics["encoder_grad_conflicts"] = sum(c < 0 for c in self._cosines) / len(self._cosines)
            engine.state.metrics["encoder_grad_norm_ratio"] = sum(self._ratios) / len(self._ratios)


def _grad(parameter: torch.Tensor) -> torch.Tensor:
    return parameter.grad.detach() if parameter.grad is not None else torch.zeros_like(parameter)
