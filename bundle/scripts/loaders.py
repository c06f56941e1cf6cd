"""Data loaders that feed one engine from two sources: BraTS slices and Kaggle images.

Why not one MONAI ``DataLoader``: it reads one dataset, and a step here is one BraTS batch and the Kaggle batches
after it, from two datasets with their own transforms.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from monai.data import DataLoader, Dataset
from torch.utils.data import DistributedSampler

from .flags import as_bool


def _set_epoch(loader: Any, epoch: int) -> None:
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)


class AlternatingLoader:
    """Interleave BraTS and Kaggle batches: one BraTS batch, then ``kaggle_steps`` Kaggle batches, and so on.

    An epoch is one pass over the BraTS loader; the Kaggle loader restarts whenever it runs out, so a small Kaggle
    set is revisited and a large one is sampled across epochs. Distributed samplers get their epoch set here
    because the engine only does that for a plain DataLoader.

    Args:
        brats: loader of BraTS slice batches (image, label, cls).
        kaggle: loader of Kaggle image batches (image, cls).
        kaggle_steps: Kaggle batches after each BraTS batch. Kaggle steps skip the decoder and are cheap.
    """

    def __init__(self, brats: Any, kaggle: Any, kaggle_steps: int = 1) -> None:
        if len(brats) == 0 and len(kaggle) == 0:
            raise ValueError("AlternatingLoader needs data: both the BraTS and the Kaggle loaders are empty.")
        self.brats, self.kaggle, self.kaggle_steps = brats, kaggle, kaggle_steps
        self.epoch = 0

    @property
    def batches_per_step(self) -> int:
        """Batches of one cycle (a BraTS batch and its Kaggle batches), trained as one optimizer step."""
        return 1 + self.kaggle_steps if len(self.brats) and len(self.kaggle) else 1

    def __len__(self) -> int:
        if len(self.brats) == 0:
            return len(self.kaggle)
        if len(self.kaggle) == 0:
            return len(self.brats)
        return len(self.brats) * (1 + self.kaggle_steps)

    def __iter__(self) -> Iterator[Any]:
        _set_epoch(self.brats, self.epoch)
        _set_epoch(self.kaggle, self.epoch)
        self.epoch += 1
        if len(self.brats) == 0 or len(self.kaggle) == 0:
            yield from self.brats if len(self.brats) else self.kaggle
            return
        kaggle = iter(self.kaggle)
        for brats_batch in self.brats:
            yield brats_batch
            for _ in range(self.kaggle_steps):
                try:
                    yield next(kaggle)
                except StopIteration:
                    kaggle = iter(self.kaggle)
                    yield next(kaggle)


class SequentialLoader:
    """All batches of each loader in turn: validation over BraTS slices, then Kaggle images."""

    def __init__(self, *loaders: Any) -> None:
        self.loaders = [loader for loader in loaders if len(loader) > 0]
        self.epoch = 0

    def __len__(self) -> int:
        return sum(len(loader) for loader in self.loaders)

    def __iter__(self) -> Iterator[Any]:
        for loader in self.loaders:
            _set_epoch(loader, self.epoch)
            yield from loader
        self.epoch += 1


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, num_workers: int = 0, distributed: bool = False, **kwargs: Any
) -> DataLoader | list:
    """A MONAI DataLoader, or an empty list for an empty dataset (a stage that does not use this source).

    With worker processes, the workers persist between passes: :class:`AlternatingLoader` restarts the Kaggle
    loader several times an epoch, and each restart would otherwise start every worker again (a process fork and
    MONAI's worker set-up, on the training's critical path). On a GPU machine batches are put in pinned memory, so
    that the engines' non-blocking copies to the GPU overlap with compute. Both can be overridden in ``kwargs``.

    Args:
        dataset: the dataset.
        batch_size: samples per batch.
        shuffle: shuffle every epoch (through a DistributedSampler when ``distributed``).
        num_workers: loader worker processes.
        distributed: shard the data across processes with a DistributedSampler.
        kwargs: more DataLoader arguments (pin_memory, persistent_workers, ...).
    """
    if len(dataset) == 0:
        return []
    sampler = DistributedSampler(dataset, shuffle=shuffle) if distributed else None
    kwargs.setdefault("pin_memory", torch.cuda.is_available())
    if num_workers == 0:
        kwargs.pop("persistent_workers", None)
    else:
        kwargs.setdefault("persistent_workers", True)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle and sampler is None,
        sampler=sampler,
        num_workers=num_workers,
        **kwargs,
    )


def training_loader(stage: Mapping[str, Any], brats: Any, kaggle: Any) -> Any:
    """A stage's training loader, from its ``data``: BraTS alone (``"brats"``) or BraTS alternating with Kaggle
    (``"brats+kaggle"``, ``kaggle_steps`` Kaggle batches after each BraTS batch)."""
    if stage["data"] == "brats":
        return brats
    if stage["data"] == "brats+kaggle":
        return AlternatingLoader(brats, kaggle, int(stage["kaggle_steps"]))
    raise ValueError(f"Unknown stage data '{stage['data']}': use 'brats' or 'brats+kaggle'.")


def batches_per_step(loader: Any, stage: Mapping[str, Any]) -> int:
    """Batches the trainer accumulates into one optimizer step.

    A stage that trains both tasks on an :class:`AlternatingLoader` takes one step per cycle, so that every update
    follows the design's ``L_seg + lambda * L_cls`` (the Kaggle batches carry no mask), unless its
    ``step_every_batch`` has each Kaggle batch add the cycle's BraTS gradient instead
    (:class:`scripts.handlers.BratsGradientCarry`). A stage with one task has no other task's gradient to keep in its
    updates: each batch is its own step, as the single-task baselines train.
    """
    return 1 if _every_batch(stage) else _joint_cycle(loader, stage)


def carried_batches(loader: Any, stage: Mapping[str, Any]) -> int:
    """The updates that carry a BraTS batch's gradient: its cycle's batches when the stage steps on every batch
    (``step_every_batch``), else 1."""
    return _joint_cycle(loader, stage) if _every_batch(stage) else 1


def _joint_cycle(loader: Any, stage: Mapping[str, Any]) -> int:
    """The batches of one cycle of a stage that trains both tasks on an :class:`AlternatingLoader`, else 1."""
    return getattr(loader, "batches_per_step", 1) if {"seg", "cls"} <= set(stage["tasks"]) else 1


def _every_batch(stage: Mapping[str, Any]) -> bool:
    return as_bool(stage.get("step_every_batch", False), "step_every_batch")


def validation_loader(brats: Any, kaggle: Any) -> Any:
    """Validation over BraTS slices, then Kaggle images (an empty source is skipped)."""
    return SequentialLoader(brats, kaggle)
