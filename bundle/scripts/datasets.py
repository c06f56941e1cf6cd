"""Datasets over prepared slices with a configurable MONAI cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset

CACHE_MODES = ("memory", "disk", "none")
PATH_KEYS = ("image", "label")


def load_datalist(datalist_path: str | os.PathLike, key: str, base_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read one list of a prepared datalist.json, making ``image`` and ``label`` paths absolute.

    MONAI's ``load_decathlon_datalist`` is not used because it also joins base_dir to any other string value
    that happens to name an existing path: a ``"source": "brats"`` field becomes ``<dataset_dir>/brats``.

    Raises:
        FileNotFoundError: the datalist does not exist (with the command that writes it).
        KeyError: the datalist has no list under ``key``.
    """
    if not os.path.isfile(datalist_path):
        raise FileNotFoundError(
            f"No datalist at {datalist_path}: point --dataset_dir at a folder written by scripts/prepare_data.py."
        )
    with open(datalist_path) as file:
        datalist = json.load(file)
    if key not in datalist:
        raise KeyError(f"{datalist_path} has no '{key}' list (it has {sorted(datalist)}).")
    items = []
    for item in datalist[key]:
        item = dict(item)
        for path_key in PATH_KEYS:
            if path_key in item:
                item[path_key] = os.path.join(base_dir, item[path_key])
        items.append(item)
    return items


def slice_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """A dataset of prepared slices, cached as configured.

    Args:
        data: datalist items.
        transform: the pipeline; MONAI caches its deterministic head (up to the first random transform).
        cache: ``"memory"`` (CacheDataset: ``cache_rate`` of the items held in RAM, the rest read each epoch, so
            memory stays bounded by the rate), ``"disk"`` (PersistentDataset under ``cache_dir``: RAM stays flat
            whatever the data size) or ``"none"`` (read every epoch).
        cache_rate: fraction of items cached in memory mode.
        cache_dir: cache folder for disk mode.
        num_workers: threads that fill the memory cache.
    """
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache 'disk' needs a cache_dir.")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"Unknown cache mode '{cache}': choose from {CACHE_MODES}.")
