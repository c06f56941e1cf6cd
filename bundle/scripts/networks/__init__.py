"""The multi-task U-Net: a shared encoder, a segmentation decoder and a classification head.

Why not MONAI's ``BasicUNet``: it has no classification head, does not expose its encoder's features, and has no
BatchNorm per image domain; the seed's public names, do_seg/do_cls flags and freeze/unfreeze are kept.
"""

from .blocks import DoubleConv, DownBlock, UpBlock
from .checkpoints import (
    CheckpointMismatchError,
    is_bundle_model,
    load_network_weights,
    require_fitting_weights,
    segmentation_state_dict,
)
from .classification_head import ClassificationHead
from .decoder import UNetDecoder
from .encoder import UNetEncoder
from .multi_task import MultiTaskModel, SegmentationUNet, create_multi_task_model, create_segmentation_unet

__all__ = [
    "CheckpointMismatchError",
    "ClassificationHead",
    "DoubleConv",
    "DownBlock",
    "MultiTaskModel",
    "SegmentationUNet",
    "UNetDecoder",
    "UNetEncoder",
    "UpBlock",
    "create_multi_task_model",
    "create_segmentation_unet",
    "is_bundle_model",
    "load_network_weights",
    "require_fitting_weights",
    "segmentation_state_dict",
]
