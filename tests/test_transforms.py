"""The bundle's MONAI transform pipelines: augmentation keeps mask and image aligned; caching modes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT
from monai.bundle import ConfigParser
from monai.data import CacheDataset, Dataset, PersistentDataset

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


def test_training_augmentation_keeps_mask_and_image_aligned(tmp_path: Path) -> None:
    parser = _parser()
    # Every spatial transform always fires; intensity transforms off, so the image stays a scaled copy of the mask.
    parser["augmentation#transforms#0#prob"] = 1.0
    parser["augmentation#transforms#2#prob"] = 1.0
    parser["augmentation#transforms"] = parser["augmentation#transforms"][:3]  # the spatial ones
    transform = parser.get_parsed_content("train#preprocessing")
    transform.set_random_state(seed=5)
    moved = 0
    for index in range(12):
        item = _write_slice(tmp_path, index)
        original = np.load(item["label"])
        out = transform(item)
        image, label = out["image"], out["label"]
        assert image.dtype == torch.float32 and image.shape == label.shape == (1, 64, 64)
        assert set(torch.unique(label).tolist()) <= {0.0, 1.0}, "the mask was interpolated, not resampled"
        image_mask = image > 2.0  # half the image's tumour intensity
        intersection = (image_mask & (label > 0.5)).sum().item()
        union = (image_mask | (label > 0.5)).sum().item()
        assert union > 0 and intersection / union > 0.9
        moved += not np.array_equal(label.numpy(), original)
    assert moved >= 10, "the spatial augmentation did not move the slices"


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
