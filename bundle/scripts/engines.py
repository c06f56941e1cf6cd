"""How MONAI's engines read a batch, for every training stage and validation.

A batch says what it can be trained on: a BraTS batch carries a ``label`` mask (segmentation) and a ``cls`` target,
a Kaggle batch only ``cls``. The network runs the tasks that are both enabled for the stage and labelled in the
batch, so a classification-only batch never runs the decoder. Training is MONAI's own ``SupervisedTrainer`` step:
:class:`MultiTaskBatch` is its ``prepare_batch`` and :class:`scripts.losses.MultiTaskLoss` its loss; the trainer's
``accumulation_steps`` makes one optimizer step of a BraTS batch and the Kaggle batches that follow it. Validation
is MONAI's ``SupervisedEvaluator`` with the same ``prepare_batch``; :func:`scripts.metrics.task_probabilities` turns
its output into probabilities for the metrics.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from monai.data import MetaTensor
from monai.engines.utils import PrepareBatch
from torch import nn

from .networks.normalization import DOMAINS, DomainBatchNorm2d


def batch_domain(batch: Mapping[str, Any]) -> int:
    """The image domain of a batch (0: BraTS volume slices, 1: Kaggle images), from its ``source``.

    The loaders never mix sources in one batch; a batch that did would be normalised with one domain's BatchNorm
    statistics for all its images, so it is refused.
    """
    sources = batch.get("source", "brats")
    sources = {sources} if isinstance(sources, str) else set(sources)
    if len(sources) != 1 or not sources <= DOMAINS.keys():
        raise ValueError(f"A batch must hold images of one source out of {sorted(DOMAINS)}, got {sorted(sources)}.")
    return DOMAINS[sources.pop()]


def performance_settings(network: nn.Module, channels_last: bool = False, cudnn_benchmark: bool = False) -> nn.Module:
    """Apply the speed settings of a config to the network the engines run, and return it.

    Args:
        network: the network (before it is moved to its device: the memory format survives ``.to(device)``).
        channels_last: store convolution weights as NHWC. oneDNN on CPUs and cuDNN's tensor-core kernels on GPUs
            are faster in that layout; a convolution with NHWC weights gives NHWC outputs, so the whole network
            follows from its weights (inputs need no conversion). Values and checkpoints are unchanged.
        cudnn_benchmark: let cuDNN time its algorithms for each input shape once and keep the fastest (the
            training slices all have one shape, so the search pays off after the first iterations).
    """
    if cudnn_benchmark:
        torch.backends.cudnn.benchmark = True
    if channels_last:
        network = network.to(memory_format=torch.channels_last)
    return network


def plain_tensor(value: Any, device: torch.device) -> torch.Tensor:
    """A plain ``torch.Tensor`` on ``device``.

    MONAI transforms hand out MetaTensors; fed to the network, their metadata handling wraps every operation of the
    forward and backward passes and even the optimizer's gradients (which then miss the fast multi-tensor path):
    several times slower on a CPU, for metadata that training never reads.
    """
    tensor = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(value)
    return tensor.to(device, non_blocking=True)


def batch_targets(batch: Mapping[str, Any], tasks: Sequence[str], device: torch.device) -> dict[str, torch.Tensor]:
    """The targets of the enabled tasks that this batch is labelled for."""
    targets: dict[str, torch.Tensor] = {}
    if "seg" in tasks and "label" in batch:
        targets["seg"] = plain_tensor(batch["label"], device).float()
    if "cls" in tasks and "cls" in batch:
        targets["cls"] = plain_tensor(batch["cls"], device).long().view(-1)
    return targets


# What a batch says about its samples; it rides along with the targets into the engines' output, where the
# per-patient and per-source metrics read it.
SAMPLE_KEYS = ("source", "patient", "slice", "group", "cls4")


class MultiTaskBatch(PrepareBatch):
    """``prepare_batch`` of MONAI's ``SupervisedTrainer`` and ``SupervisedEvaluator``: a one-source batch as the
    network's input, the targets of the stage's tasks it is labelled for (with the batch's ``SAMPLE_KEYS``), and
    the network's keyword arguments (tasks to run, image domain).

    The engine then calls ``network(images, do_seg=..., do_cls=..., domain=...)`` through its inferer, and the
    trainer ``loss_function(outputs, targets)``.

    Args:
        tasks: the tasks this stage trains ("seg", "cls").
        augmentation: applied to the batch's images (and masks) on the device, e.g.
            :class:`scripts.augmentation.BatchAugmentation`; None for none.
    """

    def __init__(self, tasks: Sequence[str] = ("seg", "cls"), augmentation: nn.Module | None = None) -> None:
        self.tasks = tuple(tasks)
        self.augmentation = augmentation

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, dict[str, Any], tuple, dict[str, Any]]:  # fmt: skip
        device = torch.device("cpu") if device is None else torch.device(device)
        targets: dict[str, Any] = batch_targets(batchdata, self.tasks, device)
        if not targets:
            raise ValueError(
                f"A batch from '{batchdata.get('source')}' has no target for the stage's tasks {self.tasks}."
            )
        options = {"do_seg": "seg" in targets, "do_cls": "cls" in targets, "domain": batch_domain(batchdata)}
        targets.update({key: batchdata[key] for key in SAMPLE_KEYS if key in batchdata})
        # The training cache holds float16 slices; cast on the device (half the bytes to copy to a GPU).
        images = plain_tensor(batchdata["image"], device).float()
        if self.augmentation is not None:
            with torch.no_grad():
                images, mask = self.augmentation(images, targets.get("seg"))
            if mask is not None:
                targets["seg"] = mask
        return images, targets, (), options


def estimate_domain_statistics(network: nn.Module, loader: Any, source: str = "kaggle") -> nn.Module:
    """Estimate the encoder's BatchNorm statistics of a data source's domain from its images (AdaBN).

    A stage that first shows the network a new source with the encoder frozen (stage 2 shows the Kaggle images to
    an encoder trained on BraTS slices) has no statistics for that domain yet. One pass over the source's training
    images, without gradients, sets them to the exact mean of the batch statistics; the encoder's weights stay as
    they are. Does nothing for a network that keeps one set of statistics.

    Args:
        network: the multi-task network (with ``encoder``), on its device.
        loader: the source's training images.
        source: the data source, a key of ``DOMAINS``.
    """
    domain = DOMAINS[source]
    layers = [m for m in network.encoder.modules() if isinstance(m, DomainBatchNorm2d) and m.num_domains > domain]
    if not layers or not loader:
        return network
    modes = [layer.training for layer in layers]
    momenta = [layer.momentum for layer in layers]
    device = next(network.parameters()).device
    with torch.no_grad():
        for layer in layers:
            layer.train()
        for count, batch in enumerate(loader):
            for layer in layers:
                # A running mean over the batches, each weighing the same; the first (weight 1) replaces the old.
                layer.momentum = 1.0 / (count + 1)
            network.encoder(plain_tensor(batch["image"], device).float(), domain)
    for layer, mode, momentum in zip(layers, modes, momenta, strict=True):
        layer.train(mode)
        layer.momentum = momentum
    print(f"BatchNorm statistics of the {source} images estimated from {count + 1} batches.", flush=True)
    return network
