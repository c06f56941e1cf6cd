"""The three training stages: which parts of the network train, and at which learning rates.

Stage settings live in ``configs/train.yaml`` under ``stages``; this module turns one stage's settings into a
network with the right parts frozen and the optimizer's parameter groups. Where a stage starts from and resumes is
``stage_checkpoints``; running the stages in order is ``scripts/train.py`` (outside the bundle's config).

Why not MONAI's ``WarmupCosineSchedule`` alone: it gives every parameter group one schedule, and a stage that
``continues`` an earlier one needs another for the encoder and decoder; freezing by stage is the seed's design.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from monai.optimizers import WarmupCosineSchedule
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from .errors import UsageError
from .flags import as_bool
from .networks.normalization import DomainBatchNorm2d

COMPONENTS = ("encoder", "decoder", "cls_head")
# The parameter groups that carry on an earlier stage's optimisation in a stage that ``continues`` it.
CARRIED_GROUPS = ("encoder", "decoder")


def prepare_network(network: nn.Module, stage: Mapping[str, Any], device: Any = None) -> nn.Module:
    """Freeze every component of the multi-task network that the stage does not train.

    Frozen components get no gradients and keep BatchNorm/Dropout in eval mode (see ``FreezableMixin``), so the
    optimizer built afterwards from :func:`parameter_groups` only sees what trains.

    Args:
        network: a :class:`~scripts.networks.MultiTaskModel`.
        stage: a stage of the config's ``stages`` table: ``trainable`` names the components to train (from
            ``encoder``, ``decoder``, ``cls_head``); ``freeze_batchnorm`` keeps every BatchNorm layer's running
            statistics (:meth:`~scripts.networks.normalization.DomainBatchNorm2d.freeze_statistics`) while its
            scale and shift train.
        device: where the network goes (None: where it is).
    """
    trainable = stage["trainable"]
    unknown = set(trainable) - set(COMPONENTS)
    if unknown:
        raise UsageError(f"Unknown trainable components {sorted(unknown)}: choose from {COMPONENTS}.")
    for name in COMPONENTS:
        component = getattr(network, name)
        component.unfreeze() if name in trainable else component.freeze()
    if as_bool(stage.get("freeze_batchnorm", False), "freeze_batchnorm"):
        for module in network.modules():
            if isinstance(module, DomainBatchNorm2d):
                module.freeze_statistics()
    return network if device is None else network.to(device)


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


def learning_rate_schedule(
    optimizer: Any, stage: Mapping[str, Any], stages: Mapping[str, Mapping[str, Any]], steps_per_epoch: int
) -> Any:
    """The stage's learning-rate schedule, stepped every iteration: MONAI's linear warm-up over ``warmup_epochs``
    then a cosine decay to 0 at ``schedule_epochs`` (default: the stage's ``epochs``; a longer one stops the stage
    part of the way down).

    With ``continues: N`` the encoder and decoder carry on stage N's optimisation instead of starting a new one: their
    rate follows the rest of stage N's cosine (from where stage N stopped down to 0 over this stage), and
    :class:`scripts.stage_checkpoints.OptimizerContinuation` gives them stage N's optimizer state. A joint stage that
    restarts them at a high rate with a fresh AdamW moves every weight by about the rate per step; the seg-only
    baseline, one uninterrupted schedule, never does. Their groups' rate should then be stage N's
    (``lr * encoder_lr_factor``).
    """
    epochs = float(stage["epochs"])
    total = max(int(float(stage.get("schedule_epochs") or epochs) * steps_per_epoch), 1)
    warmup = int(float(stage.get("warmup_epochs") or 0) * steps_per_epoch)
    continues = stage.get("continues")
    if not continues:
        return WarmupCosineSchedule(optimizer, warmup_steps=warmup, t_total=total)
    earlier = stages[str(continues)]
    done = float(earlier["epochs"]) / float(earlier.get("schedule_epochs") or earlier["epochs"])

    def fresh(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))))

    def carried_on(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * (done + (1.0 - done) * min(step / total, 1.0))))

    lambdas = [carried_on if group.get("name") in CARRIED_GROUPS else fresh for group in optimizer.param_groups]
    return LambdaLR(optimizer, lambdas)


def parameter_names(network: nn.Module, trainable: Any) -> list[str]:
    """The names of the parameters a stage training ``trainable`` gives its optimizer, in the optimizer's order
    (:func:`parameter_groups`: encoder, decoder, head)."""
    return [
        f"{name}.{key}"
        for name in COMPONENTS
        if name in trainable
        for key, _ in getattr(network, name).named_parameters()
    ]
