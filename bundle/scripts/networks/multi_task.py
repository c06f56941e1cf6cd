"""The multi-task model, the segmentation-only U-Net it extends, and their factories."""

from __future__ import annotations

import torch
from torch import nn

from .classification_head import ClassificationHead
from .decoder import UNetDecoder
from .encoder import UNetEncoder


class MultiTaskModel(nn.Module):
    """One shared encoder feeding a segmentation decoder and a classification head.

    ``forward`` returns a dict holding only what was asked for: ``"seg"`` (B, seg_out_channels, H, W) logits
    and/or ``"cls"`` (B, num_classes) logits. Skipping a task skips its computation, so a classification-only
    batch never runs the decoder. The encoder's feature maps are available through :meth:`features` (exported,
    so it also works on the TorchScript module) or ``model.encoder`` itself.

    ``domain`` says what kind of image the batch holds: 0 for slices of skull-stripped MRI volumes (BraTS), 1 for
    whole-head 2D images (Kaggle). It picks the encoder's BatchNorm statistics when the encoder keeps one set per
    domain (``num_domains=2``) and changes nothing otherwise.

    Args:
        encoder: the shared encoder.
        decoder: the segmentation decoder, built for the same ``base_filters`` and ``depth``.
        cls_head: the classification head, reading the encoder's bottleneck.
    """

    def __init__(self, encoder: UNetEncoder, decoder: UNetDecoder, cls_head: ClassificationHead) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.cls_head = cls_head

    def forward(
        self, x: torch.Tensor, do_seg: bool = True, do_cls: bool = True, domain: int = 0
    ) -> dict[str, torch.Tensor]:
        features = self.encoder(x, domain)
        outputs: dict[str, torch.Tensor] = {}
        if do_seg:
            outputs["seg"] = self.decoder(features)
        if do_cls:
            outputs["cls"] = self.cls_head(features[-1])
        return outputs

    @torch.jit.export
    def features(self, x: torch.Tensor, domain: int = 0) -> list[torch.Tensor]:
        """The encoder's feature maps ``[x0, x1, ..., bottleneck]`` for ``x``."""
        return self.encoder(x, domain)

    def freeze_encoder(self) -> None:
        self.encoder.freeze()

    def unfreeze_encoder(self) -> None:
        self.encoder.unfreeze()

    def freeze_decoder(self) -> None:
        self.decoder.freeze()

    def unfreeze_decoder(self) -> None:
        self.decoder.unfreeze()

    def freeze_cls_head(self) -> None:
        self.cls_head.freeze()

    def unfreeze_cls_head(self) -> None:
        self.cls_head.unfreeze()

    def unfreeze_all(self) -> None:
        for component in (self.encoder, self.decoder, self.cls_head):
            component.unfreeze()


class SegmentationUNet(nn.Module):
    """The plain U-Net (encoder + decoder): the segmentation-only baseline.

    Its state dict uses the same ``encoder.*`` / ``decoder.*`` keys as :class:`MultiTaskModel`, so its checkpoints
    load into the multi-task model (with a fresh classification head) and back.
    """

    def __init__(self, encoder: UNetEncoder, decoder: UNetDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, x: torch.Tensor, domain: int = 0) -> torch.Tensor:
        return self.decoder(self.encoder(x, domain))


def create_multi_task_model(
    in_channels: int = 1,
    seg_out_channels: int = 1,
    cls_num_classes: int = 2,
    base_filters: int = 64,
    depth: int = 4,
    cls_hidden_dim: int = 256,
    cls_dropout: float = 0.3,
    norm: str = "batch",
    num_domains: int = 1,
    cls_pooling: str = "avg",
) -> MultiTaskModel:
    """Build the multi-task U-Net.

    Args:
        in_channels: input channels: 1 for FLAIR alone, 4 for all BraTS modalities.
        seg_out_channels: segmentation output channels (1: whole-tumour logits).
        cls_num_classes: classification classes (2: no tumour, tumour).
        base_filters: channels of the first encoder level (64 in the original U-Net).
        depth: number of down-samplings; inputs must be divisible by ``2**depth``.
        cls_hidden_dim: hidden width of the classification head.
        cls_dropout: dropout of the classification head.
        norm: normalisation in the encoder and decoder: ``"batch"`` (the seed's) or ``"instance"``.
        num_domains: the encoder's BatchNorm running-statistics sets: 1 (the seed's) or 2, one for volume slices
            and one for whole-head 2D images, selected by ``forward``'s ``domain``. Parameters are the same either
            way.
        cls_pooling: the classification head's global pooling, ``"avg"`` (the seed's) or ``"avgmax"``.
    """
    encoder = UNetEncoder(in_channels, base_filters, depth, norm, num_domains)
    decoder = UNetDecoder(base_filters, depth, seg_out_channels, norm)
    cls_head = ClassificationHead(
        in_channels=encoder.out_channels[-1],
        num_classes=cls_num_classes,
        hidden_dim=cls_hidden_dim,
        dropout=cls_dropout,
        pooling=cls_pooling,
    )
    return MultiTaskModel(encoder, decoder, cls_head)


def create_segmentation_unet(
    in_channels: int = 1,
    seg_out_channels: int = 1,
    base_filters: int = 64,
    depth: int = 4,
    norm: str = "batch",
    num_domains: int = 1,
) -> SegmentationUNet:
    """Build the segmentation-only U-Net with the same encoder and decoder as :func:`create_multi_task_model`."""
    encoder = UNetEncoder(in_channels, base_filters, depth, norm, num_domains)
    decoder = UNetDecoder(base_filters, depth, seg_out_channels, norm)
    return SegmentationUNet(encoder, decoder)
