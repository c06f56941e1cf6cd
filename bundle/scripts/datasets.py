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
from .data.splits import DEFAULT_FOLDS, assign_folds, subject_of
from .errors import UsageError

CACHE_MODES = ("memory", "disk", "none")
PATH_KEYS = ("image", "label")
FOLD_SPLITS = ("_training", "_validation")  # the lists cross-validation pools; test lists are never touched


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


def load_datalist(
    datalist_path: str | os.PathLike,
    key: str,
    base_dir: str | os.PathLike,
    fold: int | None = None,
    num_folds: int = DEFAULT_FOLDS,
) -> list[dict[str, Any]]:
    """Read one list of a prepared datalist.json, making ``image`` and ``label`` paths absolute.

    MONAI's ``load_decathlon_datalist`` is not used because it also joins base_dir to any other string value
    that happens to name an existing path: a ``"source": "brats"`` field becomes ``<dataset_dir>/brats``.

    With ``fold`` set (cross-validation), a ``*_training`` or ``*_validation`` key gives that side of fold
    ``fold`` of ``num_folds`` (see :func:`fold_entries`); test lists stay as prepared.

    Raises:
        UsageError: the datalist does not exist (with the command that writes it), it has no list under
            ``key``, or the fold does not fit (see :func:`fold_entries`).
    """
    if not os.path.isfile(datalist_path):
        raise UsageError(
            f"No datalist at {datalist_path}: point --dataset_dir at a folder written by scripts/prepare_data.py."
        )
    with open(datalist_path) as file:
        datalist = json.load(file)
    if key not in datalist:
        raise UsageError(f"{datalist_path} has no '{key}' list (it has {sorted(datalist)}).")
    entries = datalist[key]
    if fold is not None and key.endswith(FOLD_SPLITS):
        entries = fold_entries(datalist, key, fold, num_folds, str(datalist_path))
    items = []
    for item in entries:
        item = dict(item)
        for path_key in PATH_KEYS:
            if path_key in item:
                item[path_key] = os.path.join(base_dir, item[path_key])
        items.append(item)
    return items


def _fold_unit(source: str, item: dict[str, Any]) -> str:
    """What a fold keeps whole: a Kaggle duplicate group or a BraTS subject (read from the case name in datalists
    written before ``subject`` was recorded)."""
    return item["group"] if source == "kaggle" else item.get("subject") or subject_of(item["patient"])


def fold_entries(
    datalist: dict[str, list], key: str, fold: int, num_folds: int = DEFAULT_FOLDS, where: str = "datalist.json"
) -> list[dict[str, Any]]:
    """One side of a cross-validation fold: ``<source>_training`` or ``<source>_validation`` of fold ``fold``.

    The prepared training and validation lists are pooled and dealt into ``num_folds`` folds at load time
    (:func:`scripts.data.splits.assign_folds`, seed 0), so that any prepared folder can be cross-validated and the
    test split is never touched: BraTS by subject (every timepoint of a person on one side), Kaggle by duplicate
    group, stratified by the group's 4-class label. Fold ``fold`` validates its units and trains on the others. Its
    Kaggle validation keeps one image per duplicate group (the first by name), as the prepared validation does;
    its training keeps every copy the datalist holds.

    Raises:
        UsageError: ``fold`` is not in ``0 .. num_folds - 1``, ``num_folds`` is below 2, or the pooled lists hold
            fewer subjects (groups) than folds; each naming the setting and the datalist.
    """
    source, split = key.rsplit("_", 1)
    fold, num_folds = int(fold), int(num_folds)
    if num_folds < 2:
        raise UsageError(f"num_folds is {num_folds}: cross-validation needs at least 2 folds ({where}).")
    if not 0 <= fold < num_folds:
        raise UsageError(f"fold {fold} is not one of the {num_folds} folds (num_folds) of {where}: "
                         f"choose a fold from 0 to {num_folds - 1}.")  # fmt: skip
    pooled = datalist.get(f"{source}_training", []) + datalist.get(f"{source}_validation", [])
    ordered = sorted(pooled, key=lambda item: item.get("original") or item["image"])
    labels: dict[str, int] = {}
    for item in ordered:  # a duplicate group is stratified by its first image's label, as in the prepared split
        labels.setdefault(_fold_unit(source, item), int(item.get("cls4", 0)))
    if not labels:
        return []
    if len(labels) < num_folds:
        units = "duplicate groups" if source == "kaggle" else "subjects"
        raise UsageError(f"{where} holds {len(labels)} {source} {units} in {source}_training + {source}_validation, "
                         f"fewer than num_folds ({num_folds}): choose at most {len(labels)} folds.")  # fmt: skip
    folds = assign_folds(labels, num_folds)
    chosen = [item for item in pooled if (folds[_fold_unit(source, item)] == fold) == (split == "validation")]
    if split == "training" or source != "kaggle":
        return chosen
    first: dict[str, int] = {}
    for item in ordered:
        first.setdefault(item["group"], id(item))
    return [item for item in chosen if first[item["group"]] == id(item)]


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
    fold: int | None = None,
    num_folds: int = DEFAULT_FOLDS,
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
        fold: None for the prepared split; a fold index for that cross-validation fold's side of the training and
            validation lists (see :func:`fold_entries`).
        num_folds: the number of cross-validation folds.
    """
    path = os.path.join(dataset_dir, "datalist.json")
    data = load_datalist(path, key, dataset_dir, fold, num_folds) if used else []
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
