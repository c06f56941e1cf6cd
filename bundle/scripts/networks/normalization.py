"""Normalisation after each convolution, with BatchNorm statistics kept per image domain when asked.

The network sees two kinds of input: skull-stripped slices cut from MRI volumes (BraTS, domain 0) and whole-head 2D
images in mixed sequences (the Kaggle collection, domain 1). Their intensities differ so much that one set of
BatchNorm running statistics fits neither: trained on alternating batches, the averages settle between the two
domains and evaluation, which uses them, sees features unlike any it trained on. :class:`DomainBatchNorm2d` keeps
one set of statistics per domain and shares the learnt scale and shift (domain-specific BatchNorm, Chang et al.,
CVPR 2019), so the parameter count does not change; every normalisation layer takes the domain of its batch.

Why not MONAI's ``Norm`` factory: it has no BatchNorm that keeps statistics per image domain.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

NORMS = ("batch", "instance")
# Domain index of each data source; 2D images given to inference are domain 1, volume slices domain 0.
DOMAINS = {"brats": 0, "kaggle": 1}


class DomainBatchNorm2d(nn.Module):
    """BatchNorm2d with ``num_domains`` sets of running statistics and one learnt scale and shift.

    With one domain it computes exactly what ``nn.BatchNorm2d`` does. A domain index beyond the last set uses
    the last one, so a network trained with one set serves every domain with it.

    Args:
        num_features: channels to normalise.
        num_domains: sets of running statistics.
        eps: added to the variance.
        momentum: weight of each batch in the running statistics.
    """

    def __init__(self, num_features: int, num_domains: int = 1, eps: float = 1e-5, momentum: float = 0.1) -> None:
        super().__init__()
        if num_domains < 1:
            raise ValueError(f"num_domains must be at least 1, got {num_domains}.")
        self.num_features = num_features
        self.num_domains = num_domains
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_domains, num_features))
        self.register_buffer("running_var", torch.ones(num_domains, num_features))
        self.register_buffer("num_batches_tracked", torch.zeros(num_domains, dtype=torch.long))

    def freeze_statistics(self) -> None:
        """Keep the running statistics (eval mode) from now on, even when a parent calls ``train()``; the scale and
        shift still learn. With one set of statistics, alternating BraTS and Kaggle batches would drag it between
        the two domains."""
        self.statistics_frozen = True
        self.eval()

    def train(self, mode: bool = True) -> DomainBatchNorm2d:
        return super().train(mode and not getattr(self, "statistics_frozen", False))

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        domain = min(max(domain, 0), self.num_domains - 1)
        # Rows of the (domains, channels) buffers are contiguous views: batch_norm updates them in place.
        running_mean, running_var = self.running_mean[domain], self.running_var[domain]
        if self.training:
            self.num_batches_tracked[domain] += 1
        return F.batch_norm(
            x, running_mean, running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )

    def extra_repr(self) -> str:
        return f"{self.num_features}, num_domains={self.num_domains}, eps={self.eps}, momentum={self.momentum}"


class InstanceNorm2d(nn.Module):
    """Instance normalisation with a learnt scale and shift: statistics per image, so the domain plays no part.

    Args:
        num_features: channels to normalise.
        eps: added to the variance.
    """

    def __init__(self, num_features: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.num_features = num_features
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def normalization(norm: str, channels: int, num_domains: int = 1) -> nn.Module:
    """The normalisation layer after each convolution, with a learnt scale and shift either way.

    Args:
        norm: ``"batch"`` (the seed's BatchNorm: statistics over the batch, running averages at inference) or
            ``"instance"`` (statistics per image and channel, as nnU-Net: nothing is shared between images).
        channels: channels to normalise.
        num_domains: BatchNorm running-statistics sets, one per image domain (see the module's docstring).
    """
    if norm == "batch":
        return DomainBatchNorm2d(channels, num_domains)
    if norm == "instance":
        return InstanceNorm2d(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")


def is_batch_norm(module: nn.Module) -> bool:
    """Whether ``module`` keeps running statistics (PyTorch's BatchNorm layers or :class:`DomainBatchNorm2d`)."""
    return isinstance(module, (DomainBatchNorm2d, nn.modules.batchnorm._BatchNorm))
