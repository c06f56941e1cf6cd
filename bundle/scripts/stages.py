"""The three training stages: which parts of the network train, and at which learning rates.

Stage settings live in ``configs/train.yaml`` under ``stages``; this module turns one stage's settings into a
network with the right parts frozen and the optimizer's parameter groups. Where a stage starts from and resumes is
``stage_checkpoints``; running the stages in order is ``scripts/train.py`` (outside the bundle's config).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .errors import UsageError
from .flags import as_bool
from .networks.normalization import DomainBatchNorm2d

COMPONENTS = ("encoder", "decoder", "cls_head")


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
