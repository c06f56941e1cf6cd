"""The bundle's transform pipelines: the training augmentation keeps mask and image aligned; caching modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.data import CacheDataset, Dataset, PersistentDataset

from scripts.augmentation import BatchAugmentation
from scripts.datasets import cached_dataset


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(BUNDLE_ROOT / "configs" / "train.yaml"))
    parser.update({"bundle_root": str(BUNDLE_ROOT), **overrides})
    return parser


def _write_slice(folder: Path, index: int) -> dict:
    """A slice whose image is its mask, scaled: alignment stays checkable after any warp."""
    rng = np.random.default_rng(index)
    mask = np.zeros((1, 64, 64), dtype=np.uint8)
    top, left = rng.integers(8, 36, size=2)
    mask[0, top : top + 20, left : left + 14] = 1
    image = (mask * 4.0).astype(np.float16)
    np.save(folder / f"z{index:03d}_image.npy", image)
    np.save(folder / f"z{index:03d}_label.npy", mask)
    return {"image": str(folder / f"z{index:03d}_image.npy"), "label": str(folder / f"z{index:03d}_label.npy")}


def _training_batch(parser: ConfigParser, folder: Path, count: int = 12) -> dict:
    """A BraTS-like training batch read by the training dataset's transforms, collated as the loader does."""
    transform = parser.get_parsed_content("train#preprocessing")
    items = [transform(_write_slice(folder, index)) for index in range(count)]
    return {
        "image": torch.stack([item["image"] for item in items]),
        "label": torch.stack([item["label"] for item in items]),
        "cls": torch.ones(count, dtype=torch.long),
        "source": ["brats"] * count,
    }


def test_training_augmentation_keeps_mask_and_image_aligned(tmp_path: Path) -> None:
    """The trainer's prepare_batch augments image and mask with one geometry per image, the mask kept binary."""
    parser = _parser()
    # Every spatial transform always fires; intensity transforms off, so the image stays a scaled copy of the mask.
    parser.update({"augmentation#flip_prob": 1.0, "augmentation#affine_prob": 1.0, "augmentation#scale_prob": 0.0,
                   "augmentation#shift_prob": 0.0, "augmentation#noise_prob": 0.0})  # fmt: skip
    batch = _training_batch(parser, tmp_path)
    prepare = parser.get_parsed_content("train#prepare_batch")
    torch.manual_seed(5)
    image, targets, _, _ = prepare(batch, torch.device("cpu"))
    label = targets["seg"]
    assert image.dtype == torch.float32 and image.shape == label.shape == (12, 1, 64, 64)
    assert set(torch.unique(label).tolist()) <= {0.0, 1.0}, "the mask was interpolated, not resampled"
    image_mask, label_mask = image > 2.0, label > 0.5  # half the image's tumour intensity
    for index in range(12):
        intersection = (image_mask[index] & label_mask[index]).sum().item()
        union = (image_mask[index] | label_mask[index]).sum().item()
        assert union > 0 and intersection / union > 0.9, f"image {index} and its mask moved apart"
    # Each image its own geometry: no two masks moved alike, and none stayed where it was.
    moved = [not torch.equal(label[index], batch["label"][index].float()) for index in range(12)]
    assert all(moved), "the spatial augmentation left slices in place"
    areas = label.sum(dim=(1, 2, 3)) / batch["label"].float().sum(dim=(1, 2, 3))
    assert areas.std() > 0.01, "every image got the same scale"


def test_training_augmentation_draws_like_the_monai_transforms_it_replaces() -> None:
    """Probabilities and ranges of the draws: flips about half the images, intensity scale within +-10%, a shift
    within +-0.1, noise on about a fifth, of standard deviation at most 0.05."""
    torch.manual_seed(0)
    ramp = torch.linspace(1, 2, 64).expand(4000, 1, 64, 64)
    flipped = BatchAugmentation(affine_prob=0, scale_prob=0, shift_prob=0, noise_prob=0)(ramp)[0]
    assert 0.45 < (flipped[:, 0, 0, 0] > 1.5).float().mean() < 0.55
    ones = torch.ones(4000, 1, 8, 8)
    scaled = BatchAugmentation(flip_prob=0, affine_prob=0, shift_prob=0, noise_prob=0)(ones)[0][:, 0, 0, 0]
    assert 0.45 < (scaled != 1).float().mean() < 0.55 and scaled.min() >= 0.9 and scaled.max() <= 1.1
    shifted = BatchAugmentation(flip_prob=0, affine_prob=0, scale_prob=0, noise_prob=0)(ones)[0][:, 0, 0, 0]
    assert (shifted - 1).abs().max() <= 0.1 and (shifted - 1).abs().max() > 0.09
    noisy = BatchAugmentation(flip_prob=0, affine_prob=0, scale_prob=0, shift_prob=0)(ones)[0]
    noise_std = (noisy - 1).flatten(1).std(dim=1)
    assert 0.15 < (noise_std > 0).float().mean() < 0.25 and noise_std.max() < 0.07


def test_kaggle_images_get_the_network_channels(tmp_path: Path) -> None:
    image = np.random.default_rng(0).normal(size=(1, 32, 32)).astype(np.float16)
    np.save(tmp_path / "img.npy", image)
    parser = _parser(in_channels=4)
    out = parser.get_parsed_content("validate#kaggle_preprocessing")({"image": str(tmp_path / "img.npy")})
    assert out["image"].shape == (4, 32, 32)
    assert all(torch.equal(out["image"][c], out["image"][0]) for c in range(4))


@pytest.mark.parametrize(("mode", "kind"), [("memory", CacheDataset), ("disk", PersistentDataset), ("none", Dataset)])
def test_cache_modes_give_the_same_items(mode: str, kind: type, tmp_path: Path) -> None:
    items = [_write_slice(tmp_path, index) for index in range(4)]
    transform = _parser().get_parsed_content("validate#preprocessing")
    dataset = cached_dataset(items, transform, cache=mode, cache_rate=0.5, cache_dir=str(tmp_path / "cache"))
    assert type(dataset) is kind
    reference = [transform(dict(item)) for item in items]
    for got, expected in zip(dataset, reference, strict=True):
        assert torch.equal(torch.as_tensor(got["image"]), torch.as_tensor(expected["image"]))
    if mode == "memory":
        assert dataset.cache_num == 2, "cache_rate bounds what is held in memory"
    if mode == "disk":
        assert len(list((tmp_path / "cache").glob("*.pt"))) == 4


def test_unknown_cache_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="Unknown cache mode 'ram'"):
        cached_dataset([], lambda x: x, cache="ram")
