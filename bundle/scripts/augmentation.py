"""The training augmentation, drawn per image and applied to a whole batch at once on the batch's device.

Why not MONAI's dictionary transforms (``RandFlipd``, ``RandAffined``, ...) in the dataset: they run one image at a
time in the loader, and at the demo's 64 px their per-call overhead was about 29% of a training step on two idle
cores (issue 15; docs/performance.md). The same draws applied to the batch as tensor operations cost a few
milliseconds a step on a CPU and nothing on a GPU, where they run beside the network.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class BatchAugmentation(nn.Module):
    """Random flip, affine, intensity scale and shift and Gaussian noise, each drawn per image.

    The distributions are those of MONAI's ``RandFlipd(spatial_axis=1)``, ``RandAffined`` (rotation, per-axis scale
    ``1 + U(-scale_range, scale_range)`` and translation in pixels, about the image centre, zero padding, bilinear
    for the image and nearest for the mask), ``RandScaleIntensityd`` (``x * (1 + U(-f, f))``),
    ``RandShiftIntensityd`` (``x + U(-o, o)``) and ``RandGaussianNoised`` (standard deviation drawn from
    ``U(0, noise_std)``), in that order, each applied with its own probability. Random numbers come from torch's
    generator, which ``monai.utils.set_determinism`` seeds.

    Args:
        flip_prob: probability of a left-right flip (the slices' last axis; see train.yaml on the display plane).
        affine_prob: probability of the affine transform.
        rotate_range: largest rotation, radians.
        scale_range: largest relative change of scale per axis.
        translate_range: largest shift per axis, pixels.
        scale_prob: probability of the intensity scaling.
        scale_factor: largest relative change of intensity.
        shift_prob: probability of the intensity shift.
        shift_offset: largest intensity offset.
        noise_prob: probability of Gaussian noise.
        noise_std: largest standard deviation of the noise.

    Example::

        augment = BatchAugmentation()
        images, masks = augment(torch.randn(16, 1, 64, 64), torch.zeros(16, 1, 64, 64))
    """

    def __init__(
        self,
        flip_prob: float = 0.5,
        affine_prob: float = 0.5,
        rotate_range: float = 0.26,
        scale_range: float = 0.1,
        translate_range: float = 8.0,
        scale_prob: float = 0.5,
        scale_factor: float = 0.1,
        shift_prob: float = 0.5,
        shift_offset: float = 0.1,
        noise_prob: float = 0.2,
        noise_std: float = 0.05,
    ) -> None:
        super().__init__()
        self.flip_prob, self.affine_prob = flip_prob, affine_prob
        self.rotate_range, self.scale_range, self.translate_range = rotate_range, scale_range, translate_range
        self.scale_prob, self.scale_factor = scale_prob, scale_factor
        self.shift_prob, self.shift_offset = shift_prob, shift_offset
        self.noise_prob, self.noise_std = noise_prob, noise_std

    def forward(
        self, images: torch.Tensor, masks: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Augment a batch of images (B, C, H, W) and, with the same geometry, their masks (B, 1, H, W)."""
        count = images.shape[0]
        flip = _chosen(count, self.flip_prob, images.device)
        if flip.any():
            images = torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)
            masks = None if masks is None else torch.where(flip.view(-1, 1, 1, 1), masks.flip(-1), masks)
        moved = _chosen(count, self.affine_prob, images.device)
        if moved.any():
            grid = F.affine_grid(self._affines(moved, images.shape), list(images.shape), align_corners=False)
            images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
            if masks is not None:
                masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
        images = images * (1 + self._draws(count, self.scale_prob, self.scale_factor, images))
        images = images + self._draws(count, self.shift_prob, self.shift_offset, images)
        noisy = _chosen(count, self.noise_prob, images.device)
        if noisy.any():
            std = torch.rand(count, device=images.device) * self.noise_std * noisy
            images = images + torch.randn_like(images) * std.view(-1, 1, 1, 1)
        return images, masks

    def _draws(self, count: int, prob: float, bound: float, like: torch.Tensor) -> torch.Tensor:
        """Per-image ``U(-bound, bound)``, 0 for the images not chosen (probability ``prob``), as (B, 1, 1, 1)."""
        return _uniform(_chosen(count, prob, like.device), bound).to(like.dtype).view(-1, 1, 1, 1)

    def _affines(self, moved: torch.Tensor, shape: torch.Size) -> torch.Tensor:
        """(B, 2, 3) matrices from output to input coordinates (normalised to [-1, 1]), the identity where
        ``moved`` is False. Rotation and scale act about the centre as in ``RandAffined``; square pixels assumed."""
        height, width = shape[-2], shape[-1]
        angle = _uniform(moved, self.rotate_range)
        scale = 1 + _uniform(moved, self.scale_range, 2)
        shift = _uniform(moved, self.translate_range, 2) * 2 / torch.tensor([width, height], device=moved.device)
        cos, sin = torch.cos(angle), torch.sin(angle)
        # Rotation in pixel units, expressed in normalised coordinates (x spans width, y spans height).
        aspect = height / width
        rotation = torch.stack([torch.stack([cos, -sin * aspect], -1), torch.stack([sin / aspect, cos], -1)], -2)
        linear = rotation * scale.unsqueeze(-2)
        return torch.cat([linear, shift.unsqueeze(-1)], -1)


def _chosen(count: int, prob: float, device: torch.device) -> torch.Tensor:
    """A (B,) boolean mask of the images that a transform of probability ``prob`` applies to."""
    return torch.rand(count, device=device) < prob


def _uniform(chosen: torch.Tensor, bound: float, *size: int) -> torch.Tensor:
    """(B, *size) draws of ``U(-bound, bound)``, 0 for the images ``chosen`` (B,) leaves out."""
    values = torch.rand(chosen.shape[0], *size, device=chosen.device) * 2 - 1
    return values * bound * chosen.view(-1, *([1] * len(size)))
