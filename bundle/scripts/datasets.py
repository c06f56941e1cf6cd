"""Datasets over prepared slices with a configurable MONAI cache."""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from monai.data import CacheDataset, Dataset, PersistentDataset, get_track_meta, set_track_meta
from monai.transforms import Compose

from .data import OPTIONS_FILE, PRESET_SIZES
from .errors import UsageError

CACHE_MODES = ("memory", "disk", "none")
PATH_KEYS = ("image", "label")


def check_prepared(dataset_dir: str | os.PathLike, image_size: int, in_channels: int) -> None:
    """Stop before any data is loaded when the prepared slices do not fit the network the config builds.

    A network trains on slices of any size, so a mismatch would pass silently, and then HD95 in mm, the logged
    ``image_size`` and the exported metadata would all be wrong.

    Raises:
        UsageError: the folder was not written by scripts/prepare_data.py, or its slice size or channel count
            differs from the config's, with both ways out.
    """
    path = os.path.join(dataset_dir, OPTIONS_FILE)
    if not os.path.isfile(path):
        raise UsageError(
            f"No prepared data at {dataset_dir} (no {OPTIONS_FILE}): point --dataset_dir at a folder written by "
            "scripts/prepare_data.py."
        )
    with open(path) as file:
        options = json.load(file)["options"]
    size, channels = int(options["size"]), len(options["modalities"])
    problems = []
    if size != int(image_size):
        preset = PRESET_SIZES.get(size)
        fix = f"train with {preset}" if preset else f"add --image_size {size}"
        problems.append(f"its slices are {size} px but the config builds the network for {image_size} px "
                        f"(image_size): {fix}, or prepare the data again with --size {image_size}")  # fmt: skip
    if channels != int(in_channels):
        problems.append(f"its slices have {channels} channel(s) ({','.join(options['modalities'])}) but the config's "
                        f"in_channels is {in_channels}: add --in_channels {channels}, or prepare the data again "
                        f"with {in_channels} --modalities")  # fmt: skip
    if problems:
        raise UsageError(f"{dataset_dir} does not fit this config ({path}): " + "; ".join(problems) + ".")


def data_digest(dataset_dir: str | os.PathLike) -> str:
    """The sha256 of a prepared folder's datalist and preparation options: which slices, prepared how.

    Checkpoints record it (a stage never resumes on other data) and MLflow shows it as the runs' input. The slices
    themselves are not read: scripts/prepare_data.py writes them all-or-nothing, with the two files last.
    """
    digest = hashlib.sha256()
    for name in ("datalist.json", OPTIONS_FILE):
        path = os.path.join(dataset_dir, name)
        if os.path.isfile(path):
            with open(path, "rb") as file:
                digest.update(file.read())
    return digest.hexdigest()


def load_datalist(datalist_path: str | os.PathLike, key: str, base_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Read one list of a prepared datalist.json, making ``image`` and ``label`` paths absolute.

    MONAI's ``load_decathlon_datalist`` is not used because it also joins base_dir to any other string value
    that happens to name an existing path: a ``"source": "brats"`` field becomes ``<dataset_dir>/brats``.

    Raises:
        UsageError: the datalist does not exist (with the command that writes it), or it has no list under
            ``key``.
    """
    if not os.path.isfile(datalist_path):
        raise UsageError(
            f"No datalist at {datalist_path}: point --dataset_dir at a folder written by scripts/prepare_data.py."
        )
    with open(datalist_path) as file:
        datalist = json.load(file)
    if key not in datalist:
        raise UsageError(f"{datalist_path} has no '{key}' list (it has {sorted(datalist)}).")
    items = []
    for item in datalist[key]:
        item = dict(item)
        for path_key in PATH_KEYS:
            if path_key in item:
                item[path_key] = os.path.join(base_dir, item[path_key])
        items.append(item)
    return items


class _MetadataSwitch:
    """Turns MONAI's process-wide metadata tracking off while any thread is inside :meth:`off`.

    A reference count keeps the switch correct when several threads (CacheDataset fills its cache with a thread
    pool) enter and leave at different times: the first one in saves the setting, the last one out restores it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0
        self._saved = True

    @contextmanager
    def off(self) -> Iterator[None]:
        with self._lock:
            if self._inside == 0:
                self._saved = get_track_meta()
                set_track_meta(False)
            self._inside += 1
        try:
            yield
        finally:
            with self._lock:
                self._inside -= 1
                if self._inside == 0:
                    set_track_meta(self._saved)


_METADATA = _MetadataSwitch()


class PlainTensorCompose(Compose):
    """A ``Compose`` whose transforms hand out plain tensors instead of MetaTensors.

    The slices carry no metadata that training or evaluation reads (the engines strip it), yet tracking it doubles
    the CPU cost of the augmentation (every operation of RandAffined goes through ``MetaTensor.__torch_function__``),
    makes collation copy metadata dictionaries and adds per-item overhead to a memory cache. The values are the
    same either way.
    """

    def __call__(self, input_: Any, start: int = 0, end: int | None = None, threading: bool = False, lazy=None):
        with _METADATA.off():
            return super().__call__(input_, start=start, end=end, threading=threading, lazy=lazy)


def without_metadata(transform: Callable) -> Callable:
    """The same pipeline (same transform objects, same random states) producing plain tensors; other callables
    are returned unchanged."""
    if not isinstance(transform, Compose) or isinstance(transform, PlainTensorCompose):
        return transform
    # Not Compose(transform.transforms): a new Compose would reseed the transforms it is given.
    plain = PlainTensorCompose.__new__(PlainTensorCompose)
    plain.__dict__.update(transform.__dict__)
    return plain


def slice_dataset(
    dataset_dir: str | os.PathLike,
    key: str,
    transform: Callable,
    used: bool = True,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """A dataset of one list of prepared slices (``datalist.json``), cached as configured.

    Args:
        dataset_dir: the folder scripts/prepare_data.py wrote.
        key: the list, e.g. ``brats_training`` or ``kaggle_validation``.
        transform: the pipeline (nested ``Compose`` are unrolled); MONAI caches its deterministic head (up to the
            first random transform). It runs without MONAI metadata tracking (see :class:`PlainTensorCompose`), so
            items hold plain tensors.
        used: False gives an empty dataset (a stage that does not train on this source spends nothing on it).
        cache: ``"memory"`` (CacheDataset: ``cache_rate`` of the items held in RAM, the rest read each epoch, so
            memory stays bounded by the rate), ``"disk"`` (PersistentDataset under ``cache_dir/key``: RAM stays flat
            whatever the data size) or ``"none"`` (read every epoch).
        cache_rate: fraction of items cached in memory mode.
        cache_dir: cache folder for disk mode.
        num_workers: threads that fill the memory cache.
    """
    data = load_datalist(os.path.join(dataset_dir, "datalist.json"), key, dataset_dir) if used else []
    return cached_dataset(data, transform, cache, cache_rate, os.path.join(cache_dir, key) if cache_dir else None,
                          num_workers)  # fmt: skip


def cached_dataset(
    data: Sequence[dict[str, Any]],
    transform: Callable,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """A MONAI dataset over these items, cached as configured (see :func:`slice_dataset`)."""
    if isinstance(transform, Compose):
        transform = transform.flatten()
    transform = without_metadata(transform)
    if cache == "memory":
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=num_workers, progress=False)
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache 'disk' needs a cache_dir.")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    if cache == "none":
        return Dataset(data, transform)
    raise ValueError(f"Unknown cache mode '{cache}': choose from {CACHE_MODES}.")
