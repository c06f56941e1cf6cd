"""Find, check and read BraTS-style brain MRI volumes in the layouts users actually download.

Supported layouts (exact folder and file names):

- ``brats2020``: ``ROOT/BraTS20_Training_001/BraTS20_Training_001_{flair,t1,t1ce,t2,seg}.nii`` (labels 0,1,2,4).
  Validation folders (``BraTS20_Validation_001``) have no seg. Case 355 of the Kaggle copy ships its seg as
  ``W39_1998.09.19_Segm.nii``: a single extra NIfTI whose name contains "seg" is taken as the seg, with a warning.
- ``brats2021``: ``ROOT/BraTS2021_00000/BraTS2021_00000_{flair,t1,t1ce,t2,seg}.nii.gz`` (labels 0,1,2,4).
- ``brats2023`` (GLI): ``ROOT/BraTS-GLI-00000-000/BraTS-GLI-00000-000-{t2f,t1n,t1c,t2w,seg}.nii.gz``
  (labels 0,1,2,3 with 3 = enhancing tumour).
- ``msd`` (Task01_BrainTumour): ``ROOT`` or ``ROOT/Task01_BrainTumour`` holding ``dataset.json``,
  ``imagesTr/BRATS_001.nii.gz`` (4D: FLAIR, T1w, t1gd, T2w), ``labelsTr/`` (1 edema, 2 non-enhancing, 3 enhancing)
  and ``imagesTs/`` (no labels).

BraTS 2020/2021 folders may hold either ``.nii`` or ``.nii.gz`` files. macOS ``._*`` and ``.DS_Store`` files are
ignored everywhere. Modalities always use the canonical names ``flair``, ``t1``, ``t1ce``, ``t2``.

Why not MONAI's ``LoadImaged``: it reads files it is given; finding a case's files in four release layouts, checking
them (complete, finite, one grid) and naming the file at fault before any work starts is not its job, and the Deploy
app reads volumes without MONAI core.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel import orientations

from scripts.errors import UsageError

__all__ = [
    "LAYOUTS",
    "MODALITIES",
    "WHOLE_TUMOUR_LABELS",
    "DataError",
    "LoadedCase",
    "VolumeCase",
    "case_folder",
    "check_case",
    "detect_layout",
    "find_cases",
    "load_case",
    "to_original_grid",
    "whole_tumour_mask",
]

LAYOUTS = ("brats2020", "brats2021", "brats2023", "msd")
MODALITIES = ("flair", "t1", "t1ce", "t2")

# Explicit maps on purpose: MONAI's ConvertToMultiChannelBasedOnBratsClasses hard-codes 1/2/4, which is wrong for
# BraTS 2023 (enhancing tumour = 3) and MSD Task01 (1 edema, 2 non-enhancing, 3 enhancing).
WHOLE_TUMOUR_LABELS: dict[str, frozenset[int]] = {
    "brats2020": frozenset({1, 2, 4}),
    "brats2021": frozenset({1, 2, 4}),
    "brats2023": frozenset({1, 2, 3}),
    "msd": frozenset({1, 2, 3}),
}

_AFFINE_ATOL = 1e-3
_IGNORED_NAMES = frozenset({".DS_Store", "Thumbs.db", "desktop.ini"})

# Case folder names per BraTS layout.
_CASE_FOLDER = {
    "brats2020": re.compile(r"^BraTS20_(Training|Validation)_\d+$"),
    "brats2021": re.compile(r"^BraTS2021_\d+$"),
    "brats2023": re.compile(r"^BraTS-GLI-\d+-\d+$"),
}
# File-name suffix (after the case id and its separator) -> canonical modality, or "seg".
_SUFFIXES = {
    "brats2020": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"},
    "brats2021": {"flair": "flair", "t1": "t1", "t1ce": "t1ce", "t2": "t2", "seg": "seg"},
    "brats2023": {"t2f": "flair", "t1n": "t1", "t1c": "t1ce", "t2w": "t2", "seg": "seg"},
}
_SEPARATOR = {"brats2020": "_", "brats2021": "_", "brats2023": "-"}
_EXTENSIONS = {"brats2020": (".nii", ".nii.gz"), "brats2021": (".nii.gz", ".nii"), "brats2023": (".nii.gz",)}
_EXAMPLE = {
    "brats2020": "BraTS20_Training_001/BraTS20_Training_001_flair.nii",
    "brats2021": "BraTS2021_00000/BraTS2021_00000_flair.nii.gz",
    "brats2023": "BraTS-GLI-00000-000/BraTS-GLI-00000-000-t2f.nii.gz",
    "msd": "Task01_BrainTumour/dataset.json with imagesTr/BRATS_001.nii.gz",
}
# MSD dataset.json "modality" names -> canonical names (compared lower-case).
_MSD_MODALITY_NAMES = {
    "flair": "flair",
    "t1w": "t1",
    "t1": "t1",
    "t1gd": "t1ce",
    "t1ce": "t1ce",
    "t2w": "t2",
    "t2": "t2",
}
_MSD_DEFAULT_CHANNELS = {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}


class DataError(UsageError):
    """Input data is missing, unreadable or inconsistent; the message names the file or folder and the problem."""


@dataclass(frozen=True)
class VolumeCase:
    """One patient's files.

    Attributes:
        case_id: Patient id, e.g. ``"BraTS2021_00000"`` or ``"BRATS_001"``.
        layout: One of :data:`LAYOUTS`.
        modality_files: Canonical modality -> file, for the modalities present on disk (MSD: all four map to
            the same 4D file).
        seg_file: Segmentation file, or None for unlabelled (validation / test) cases.
        channel_index: MSD only: canonical modality -> channel of the 4D image.
    """

    case_id: str
    layout: str
    modality_files: dict[str, Path]
    seg_file: Path | None
    channel_index: dict[str, int] | None = None


@dataclass
class LoadedCase:
    """A case read into memory in RAS orientation.

    Attributes:
        case: The case that was read.
        image: ``(C, X, Y, Z)`` float32, RAS, channels in the requested order.
        mask: ``(X, Y, Z)`` uint8 whole-tumour mask (0/1) on the same grid, or None without a seg.
        affine: RAS affine of ``image`` and ``mask``.
        original_affine: Affine of the files as stored.
        original_shape: Spatial shape of the files as stored.
        modalities: Channel names of ``image``, in order.
    """

    case: VolumeCase
    image: np.ndarray
    mask: np.ndarray | None
    affine: np.ndarray
    original_affine: np.ndarray
    original_shape: tuple[int, int, int]
    modalities: tuple[str, ...] = field(default=())


# ----------------------------------------------------------------------------------------------------------------------
# Layout detection and case discovery


def _is_ignored(name: str) -> bool:
    """True for macOS resource forks, Finder files and other hidden entries."""
    return name.startswith(".") or name in _IGNORED_NAMES


def _visible_entries(folder: Path) -> list[Path]:
    """Entries of a folder without hidden / macOS files, sorted by name."""
    return sorted((p for p in folder.iterdir() if not _is_ignored(p.name)), key=lambda p: p.name)


def _is_nifti_name(name: str) -> bool:
    return name.endswith((".nii", ".nii.gz"))


def _msd_root(root: Path) -> Path | None:
    """The folder holding MSD's dataset.json: ``root`` itself or ``root/Task01_BrainTumour``."""
    for candidate in (root, root / "Task01_BrainTumour"):
        if (candidate / "dataset.json").is_file():
            return candidate
    return None


def _brats_layout_counts(root: Path) -> dict[str, int]:
    """Number of case folders per BraTS layout directly under root."""
    counts = dict.fromkeys(_CASE_FOLDER, 0)
    for entry in _visible_entries(root):
        if not entry.is_dir():
            continue
        for layout, pattern in _CASE_FOLDER.items():
            if pattern.match(entry.name):
                counts[layout] += 1
    return counts


def _expected_layouts_text() -> str:
    return "; ".join(f"{layout}: ROOT/{example}" for layout, example in _EXAMPLE.items())


def _require_dir(root: Path) -> Path:
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder {root} does not exist")
    if not root.is_dir():
        raise DataError(f"data folder {root} is not a folder")
    return root


def detect_layout(root: Path) -> str:
    """Tell which of :data:`LAYOUTS` a data folder uses.

    Args:
        root: The folder holding the case folders (BraTS) or ``dataset.json`` / ``Task01_BrainTumour`` (MSD).

    Returns:
        The layout name.

    Raises:
        DataError: When the folder is missing, empty, mixes BraTS releases or matches no known layout; the message
            says what was expected and, when the cases sit one level deeper, which folder to pass instead.
    """
    root = _require_dir(root)
    if _msd_root(root) is not None:
        return "msd"
    counts = _brats_layout_counts(root)
    found = [layout for layout, n in counts.items() if n]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        summary = ", ".join(f"{counts[layout]} {layout}" for layout in found)
        raise DataError(
            f"data folder {root} mixes case folders of several BraTS releases ({summary}); "
            "keep one release per folder (their label schemes differ)"
        )
    entries = _visible_entries(root)
    if not entries:
        raise DataError(f"data folder {root} is empty; expected one of: {_expected_layouts_text()}")
    if (root / "imagesTr").is_dir():
        raise DataError(f"data folder {root} has imagesTr/ but no dataset.json; the MSD layout needs dataset.json")
    # Archives often unpack into an extra level (e.g. MICCAI_BraTS2020_TrainingData/): name the folder to use.
    for sub in (e for e in entries if e.is_dir()):
        if _msd_root(sub) is not None or any(_brats_layout_counts(sub).values()):
            raise DataError(f"data folder {root} holds no cases itself, but {sub} does: pass {sub} instead")
    shown = ", ".join(e.name for e in entries[:5]) + (", ..." if len(entries) > 5 else "")
    raise DataError(
        f"data folder {root} matches no known layout (found: {shown}); expected one of: {_expected_layouts_text()}"
    )


def _brats_case_files(folder: Path, layout: str) -> tuple[dict[str, Path], Path | None]:
    """Modality files and seg of one BraTS case folder (files missing on disk are simply absent)."""
    case_id = folder.name
    prefix = case_id + _SEPARATOR[layout]
    found: dict[str, Path] = {}
    unrecognised: list[Path] = []
    for entry in _visible_entries(folder):
        if not (entry.is_file() and _is_nifti_name(entry.name)):
            continue
        stem = entry.name[: -len(".nii.gz")] if entry.name.endswith(".nii.gz") else entry.name[: -len(".nii")]
        suffix = stem[len(prefix) :] if stem.startswith(prefix) else None
        key = _SUFFIXES[layout].get(suffix) if suffix is not None else None
        if key is None or not entry.name.endswith(_EXTENSIONS[layout]):
            unrecognised.append(entry)
            continue
        if key in found:
            raise DataError(
                f"case folder {folder} holds two files for {key}: {found[key].name} and {entry.name}; keep one"
            )
        found[key] = entry
    seg = found.pop("seg", None)
    if seg is None and unrecognised:
        seg = _misnamed_seg(folder, unrecognised, f"{case_id}{_SEPARATOR[layout]}seg{_EXTENSIONS[layout][0]}")
    return found, seg


def _misnamed_seg(folder: Path, unrecognised: list[Path], seg_name: str) -> Path | None:
    """Pick up a seg saved under another name (BraTS 2020 case 355: ``W39_1998.09.19_Segm.nii``).

    Only a single extra NIfTI file with "seg" in its name qualifies; anything else is left alone, with a warning.
    """
    candidates = [p for p in unrecognised if "seg" in p.name.lower()]
    if len(candidates) > 1:
        names = ", ".join(p.name for p in candidates)
        raise DataError(
            f"case folder {folder} has no {seg_name} and several candidates ({names}); "
            f"rename the right one to {seg_name}"
        )
    if len(candidates) == 1:
        warnings.warn(
            f"case folder {folder}: no {seg_name}; using {candidates[0].name} as its "
            "segmentation (the only other NIfTI file with 'seg' in its name)",
            UserWarning,
            stacklevel=5,
        )
        return candidates[0]
    names = ", ".join(p.name for p in unrecognised)
    warnings.warn(
        f"case folder {folder}: no segmentation; ignored unrecognised NIfTI files ({names}). If one of "
        f"them is the segmentation, rename it to {seg_name}",
        UserWarning,
        stacklevel=5,
    )
    return None


def case_folder(folder: Path) -> VolumeCase | None:
    """The case that ``folder`` is, when it is itself one BraTS case folder (named and filled as in
    :data:`LAYOUTS`), else None. Lets a caller given one case folder read it as one case, not as loose files.
    """
    folder = Path(folder)
    for layout, pattern in _CASE_FOLDER.items():
        if folder.is_dir() and pattern.match(folder.name):
            case = _brats_case(folder, layout)
            if case.modality_files:
                return case
    return None


def _brats_case(folder: Path, layout: str) -> VolumeCase:
    files, seg = _brats_case_files(folder, layout)
    return VolumeCase(case_id=folder.name, layout=layout, modality_files=files, seg_file=seg)


def _find_brats_cases(root: Path, layout: str) -> list[VolumeCase]:
    pattern = _CASE_FOLDER[layout]
    cases = []
    for folder in _visible_entries(root):
        if folder.is_dir() and pattern.match(folder.name):
            cases.append(_brats_case(folder, layout))
    if not cases:
        raise DataError(f"data folder {root} has no {layout} case folders (expected e.g. ROOT/{_EXAMPLE[layout]})")
    return cases


def _msd_channels(dataset: dict, json_path: Path) -> dict[str, int]:
    """Canonical modality -> channel, from dataset.json's "modality" entry (MSD order when absent)."""
    names = dataset.get("modality")
    if not names:
        return dict(_MSD_DEFAULT_CHANNELS)
    channels = {}
    for channel, name in names.items():
        canonical = _MSD_MODALITY_NAMES.get(str(name).lower())
        if canonical is None:
            raise DataError(
                f"{json_path}: unknown modality {name!r} for channel {channel}; expected FLAIR, T1w, t1gd, T2w"
            )
        channels[canonical] = int(channel)
    if sorted(channels) != sorted(MODALITIES):
        raise DataError(f"{json_path}: modalities {names} do not name FLAIR, T1w, t1gd and T2w once each")
    return channels


def _msd_path(base: Path, entry: str, json_path: Path) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{json_path}: invalid file entry {entry!r}")
    return base / os.path.normpath(entry)


def _msd_case_id(path: Path) -> str:
    name = path.name
    return name[: -len(".nii.gz")] if name.endswith(".nii.gz") else path.stem


def _find_msd_cases(root: Path) -> list[VolumeCase]:
    base = _msd_root(root)
    if base is None:
        raise DataError(
            f"data folder {root} has no dataset.json (nor Task01_BrainTumour/dataset.json); the MSD layout needs it"
        )
    json_path = base / "dataset.json"
    try:
        dataset = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{json_path} is not readable JSON: {err}") from err
    if not isinstance(dataset, dict):
        raise DataError(f"{json_path} does not hold a JSON object")
    channels = _msd_channels(dataset, json_path)
    pairs: list[tuple[Path, Path | None]] = []
    for item in dataset.get("training") or []:
        if not isinstance(item, dict) or "image" not in item or "label" not in item:
            raise DataError(f"{json_path}: training entry {item!r} lacks 'image' or 'label'")
        pairs.append((_msd_path(base, item["image"], json_path), _msd_path(base, item["label"], json_path)))
    for item in dataset.get("test") or []:
        image = item.get("image") if isinstance(item, dict) else item
        pairs.append((_msd_path(base, image, json_path), None))
    if not pairs:
        raise DataError(f"{json_path} lists no training or test cases")
    cases, seen = [], set()
    for image, label in pairs:
        case_id = _msd_case_id(image)
        if case_id in seen:
            raise DataError(f"{json_path} lists case {case_id} twice")
        seen.add(case_id)
        files = dict.fromkeys(MODALITIES, image)
        cases.append(VolumeCase(case_id, "msd", files, label, channel_index=dict(channels)))
    return cases


def find_cases(root: Path, layout: str | None = None) -> list[VolumeCase]:
    """List the cases of a data folder, without opening any image.

    Args:
        root: Data folder (see :func:`detect_layout`).
        layout: One of :data:`LAYOUTS`; detected when None.

    Returns:
        Cases sorted by case id. A modality missing on disk is absent from ``modality_files`` (reported by
        :func:`check_case` when requested); cases without seg have ``seg_file`` None.

    Raises:
        DataError: When the folder holds no case of the layout or is malformed.
    """
    root = _require_dir(root)
    layout = detect_layout(root) if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    cases = _find_msd_cases(root) if layout == "msd" else _find_brats_cases(root, layout)
    return sorted(cases, key=lambda c: c.case_id)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-flight checks


def _validate_modalities(modalities: Sequence[str]) -> tuple[str, ...]:
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in MODALITIES]
    if not modalities or unknown or len(set(modalities)) != len(modalities):
        raise ValueError(f"modalities must be distinct names from {MODALITIES}; got {modalities}")
    return modalities


def _open_nifti(path: Path) -> nib.Nifti1Image:
    """Open a NIfTI file's header, turning every failure into a DataError naming the file."""
    if not path.is_file():
        raise DataError(f"file {path} does not exist")
    try:
        image = nib.load(str(path))
    except Exception as err:  # nibabel raises many types (ImageFileError, OSError, EOFError, zlib.error, ...)
        raise DataError(f"file {path} is not a readable NIfTI file: {err}") from err
    if not isinstance(image, (nib.Nifti1Image, nib.Nifti2Image)):
        raise DataError(f"file {path} is not a NIfTI image ({type(image).__name__})")
    return image


def _spatial_shape(image: nib.Nifti1Image, path: Path, channels: int | None) -> tuple[int, int, int]:
    """Check dimensionality: a 3D volume (trailing singleton axes allowed) or, with ``channels``, 4D with that many."""
    shape = tuple(int(s) for s in image.shape)
    if channels is None:
        ok = len(shape) >= 3 and all(s == 1 for s in shape[3:])
        expected = "a 3D volume"
    else:
        ok = len(shape) == 4 and shape[3] == channels
        expected = f"a 4D volume with {channels} channels (X, Y, Z, {channels})"
    if len(shape) < 3 or min(shape[:3]) < 2:
        raise DataError(f"file {path} is 2D (shape {shape}); expected {expected}")
    if not ok:
        raise DataError(f"file {path} has shape {shape}; expected {expected}")
    return shape[0], shape[1], shape[2]


def _expected_bytes(image: nib.Nifti1Image) -> int:
    """Bytes the file must hold: data offset plus voxel data."""
    header = image.header
    n_voxels = int(np.prod(header.get_data_shape(), dtype=np.int64))
    # nibabel resets the loaded header's vox_offset to 0; the offset it really reads from is on the array proxy.
    offset = int(getattr(image.dataobj, "offset", header.get_data_offset()))
    return offset + n_voxels * header.get_data_dtype().itemsize


def _check_complete(image: nib.Nifti1Image, path: Path) -> None:
    """Detect truncated files cheaply: compare stored sizes with what the header needs, without decompressing."""
    needed = _expected_bytes(image)
    size = path.stat().st_size
    if path.name.endswith(".gz"):
        # gzip ends with CRC32 and ISIZE (uncompressed size mod 2**32); a cut file ends in deflate data instead.
        if size < 18:
            raise DataError(f"file {path} is truncated ({size} bytes, too short for gzip)")
        with path.open("rb") as handle:
            magic = handle.read(2)
            handle.seek(-4, os.SEEK_END)
            isize = int.from_bytes(handle.read(4), "little")
        if magic != b"\x1f\x8b":
            raise DataError(f"file {path} is not gzip-compressed despite its .gz name")
        if isize != needed % 2**32:
            raise DataError(
                f"file {path} is truncated or corrupt: its gzip trailer records {isize} uncompressed bytes "
                f"but the header needs {needed} (mod 2**32: {needed % 2**32})"
            )
    elif size < needed:
        raise DataError(f"file {path} is truncated: {size} bytes, the header needs {needed}")


def _check_same_grid(grids: Iterable[tuple[Path, tuple[int, int, int], np.ndarray]], case_id: str) -> None:
    """All files of a case must share spatial shape and affine (allclose, atol 1e-3)."""
    grids = list(grids)
    ref_path, ref_shape, ref_affine = grids[0]
    for path, shape, affine in grids[1:]:
        if shape != ref_shape:
            raise DataError(
                f"case {case_id}: file {path} has spatial shape {shape} but {ref_path.name} has {ref_shape}"
            )
        if not np.allclose(affine, ref_affine, atol=_AFFINE_ATOL):
            raise DataError(
                f"case {case_id}: file {path} has affine\n{np.round(affine, 4)}\nbut {ref_path.name} "
                f"has\n{np.round(ref_affine, 4)}"
            )


def _case_files(case: VolumeCase, modalities: tuple[str, ...]) -> list[tuple[Path, int | None]]:
    """Distinct files to read for the requested modalities plus seg, with the channel count each must have."""
    files: list[tuple[Path, int | None]] = []
    for modality in modalities:
        path = case.modality_files.get(modality)
        if path is None:
            raise DataError(
                f"case {case.case_id}: no {modality} image (expected {_expected_modality_name(case, modality)})"
            )
        channels = 4 if case.layout == "msd" else None
        if (path, channels) not in files:
            files.append((path, channels))
    if case.seg_file is not None:
        files.append((case.seg_file, None))
    return files


def _expected_modality_name(case: VolumeCase, modality: str) -> str:
    if case.layout not in _SUFFIXES:
        return f"a {modality} file"
    suffix = next(s for s, m in _SUFFIXES[case.layout].items() if m == modality)
    known = [*case.modality_files.values(), case.seg_file]
    folder = next((p.parent for p in known if p is not None), None)
    where = f"{folder}/" if folder is not None else ""
    return f"{where}{case.case_id}{_SEPARATOR[case.layout]}{suffix}{_EXTENSIONS[case.layout][0]}"


def check_case(case: VolumeCase, modalities: Sequence[str]) -> None:
    """Cheap pre-flight check of one case, meant to run on every case before any long work.

    Checks that the requested modality files and the seg exist, have readable NIfTI headers, are not truncated
    (without decompressing them), have the right number of dimensions (MSD images: 4 channels) and share one
    spatial shape and affine.

    Args:
        case: The case to check.
        modalities: Canonical modality names that will be read.

    Raises:
        DataError: Naming the offending file and the problem.
    """
    modalities = _validate_modalities(modalities)
    grids = []
    for path, channels in _case_files(case, modalities):
        image = _open_nifti(path)
        shape = _spatial_shape(image, path, channels)
        _check_complete(image, path)
        grids.append((path, shape, image.affine))
    _check_same_grid(grids, case.case_id)


# ----------------------------------------------------------------------------------------------------------------------
# Reading


def _read_array(image: nib.Nifti1Image, path: Path) -> np.ndarray:
    """Read all voxels in their stored type (nibabel applies scl_slope/scl_inter when set).

    Truncated or corrupt data becomes a DataError naming the file.
    """
    try:
        return np.asanyarray(image.dataobj)
    except Exception as err:  # EOFError, zlib.error, OSError, ValueError("mmap length ...") ...
        raise DataError(f"file {path} could not be read (truncated or corrupt?): {err}") from err


def _check_finite(channel: np.ndarray, path: Path) -> None:
    # NaN or inf would silently turn the percentile-based normalisation into NaN everywhere.
    if not np.isfinite(channel).all():
        raise DataError(f"file {path} holds NaN or infinite intensities")


def _squeeze_to_3d(array: np.ndarray) -> np.ndarray:
    return array.reshape(array.shape[:3]) if array.ndim > 3 else array


def load_case(case: VolumeCase, modalities: Sequence[str] = ("flair",)) -> LoadedCase:
    """Read a case fully, reoriented to RAS, with its whole-tumour mask.

    Args:
        case: The case to read.
        modalities: Canonical modality names, in the channel order wanted.

    Returns:
        The loaded case (see :class:`LoadedCase`).

    Raises:
        DataError: When a file is missing, unreadable, truncated, corrupt, of the wrong shape, or holds labels
            outside the layout's scheme.
    """
    modalities = _validate_modalities(modalities)
    opened = {path: (_open_nifti(path), channels) for path, channels in _case_files(case, modalities)}
    grids = [(p, _spatial_shape(img, p, ch), img.affine) for p, (img, ch) in opened.items()]
    _check_same_grid(grids, case.case_id)
    original_shape = grids[0][1]
    original_affine = np.asarray(grids[0][2], dtype=np.float64)
    # One orientation transform for every file of the case, so that to_original_grid can invert it exactly.
    ornt = orientations.io_orientation(original_affine)
    affine = original_affine @ orientations.inv_ornt_aff(ornt, original_shape)

    image = np.empty((len(modalities), *_ras_shape(original_shape, ornt)), dtype=np.float32)
    if case.layout == "msd":
        path = case.modality_files[modalities[0]]
        data = _read_array(opened[path][0], path)
        for i, modality in enumerate(modalities):
            image[i] = orientations.apply_orientation(data[..., case.channel_index[modality]], ornt)
            _check_finite(image[i], path)
        del data
    else:
        for i, modality in enumerate(modalities):
            path = case.modality_files[modality]
            data = _squeeze_to_3d(_read_array(opened[path][0], path))
            image[i] = orientations.apply_orientation(data, ornt)
            _check_finite(image[i], path)

    mask = None
    if case.seg_file is not None:
        seg = _squeeze_to_3d(_read_array(opened[case.seg_file][0], case.seg_file))
        mask = np.ascontiguousarray(
            orientations.apply_orientation(whole_tumour_mask(seg, case.layout, case.seg_file), ornt)
        )
    return LoadedCase(
        case=case,
        image=image,
        mask=mask,
        affine=affine,
        original_affine=original_affine,
        original_shape=original_shape,
        modalities=modalities,
    )


def _ras_shape(shape: tuple[int, int, int], ornt: np.ndarray) -> tuple[int, int, int]:
    """Spatial shape after applying an orientation transform."""
    out = [0, 0, 0]
    for axis, (target, _flip) in enumerate(ornt):
        out[int(target)] = shape[axis]
    return out[0], out[1], out[2]


def whole_tumour_mask(seg: np.ndarray, layout: str, source: Path | str) -> np.ndarray:
    """Map a BraTS / MSD label volume to a whole-tumour 0/1 mask.

    Args:
        seg: Label volume (any integer dtype, or floats holding integers).
        layout: One of :data:`LAYOUTS`; picks the label scheme.
        source: File the labels came from, named in errors.

    Returns:
        uint8 array of seg's shape: 1 where the label is in ``WHOLE_TUMOUR_LABELS[layout]``.

    Raises:
        DataError: On non-integer or non-finite values, or values outside the layout's scheme (e.g. 3 in BraTS
            2021, 4 in BraTS 2023 / MSD), naming the file and the values found.
    """
    if layout not in WHOLE_TUMOUR_LABELS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {LAYOUTS}")
    tumour = WHOLE_TUMOUR_LABELS[layout]
    allowed = sorted(tumour | {0})
    labels = _integer_labels(np.asarray(seg), source)
    lowest, highest = (int(labels.min()), int(labels.max())) if labels.size else (0, 0)
    if lowest < 0 or highest > max(allowed):
        found = np.unique(labels).tolist()
        raise DataError(_scheme_message(source, layout, allowed, found))
    counts = np.bincount(labels.ravel(), minlength=max(allowed) + 1)
    found = np.flatnonzero(counts).tolist()
    if set(found) - set(allowed):
        raise DataError(_scheme_message(source, layout, allowed, found))
    lookup = np.zeros(max(allowed) + 1, dtype=np.uint8)
    lookup[sorted(tumour)] = 1
    return lookup[labels]


def _integer_labels(seg: np.ndarray, source: Path | str) -> np.ndarray:
    """Seg as an integer array; floats must hold whole numbers (segs saved as float32 are common)."""
    if seg.dtype.kind in "iu":
        return seg
    if seg.dtype.kind == "b":
        return seg.astype(np.uint8)
    if seg.dtype.kind != "f":
        raise DataError(f"file {source}: segmentation has non-numeric type {seg.dtype}")
    if not np.isfinite(seg).all():
        raise DataError(f"file {source}: segmentation holds NaN or infinite values")
    rounded = np.rint(seg)
    fractional = seg != rounded
    if fractional.any():
        examples = np.unique(seg[fractional])[:5].tolist()
        raise DataError(
            f"file {source}: segmentation holds non-integer values, e.g. {examples}; "
            "expected integer labels (was it resampled with linear interpolation?)"
        )
    return rounded.astype(np.int64)


def _scheme_message(source: Path | str, layout: str, allowed: list[int], found: list[int]) -> str:
    unexpected = [v for v in found if v not in allowed]
    hint = ""
    if layout in ("brats2020", "brats2021") and 3 in unexpected:
        hint = " (3 is enhancing tumour in BraTS 2023 / MSD: is this data in the wrong layout?)"
    elif layout in ("brats2023", "msd") and 4 in unexpected:
        hint = " (4 is enhancing tumour in BraTS 2020/2021: is this data in the wrong layout?)"
    return (
        f"file {source}: label values {unexpected} are not in the {layout} scheme {allowed}; "
        f"values found: {found[:20]}{hint}"
    )


def to_original_grid(mask_ras: np.ndarray, loaded: LoadedCase) -> np.ndarray:
    """Undo the RAS reorientation of :func:`load_case`.

    A result on the returned grid can be saved with ``loaded.original_affine`` and overlays the input file
    (e.g. in 3D Slicer).

    Args:
        mask_ras: ``(X, Y, Z)`` array on the grid of ``loaded.image`` (any dtype).
        loaded: The case it was computed from.

    Returns:
        Contiguous array of shape ``loaded.original_shape``.
    """
    ornt = orientations.io_orientation(loaded.original_affine)
    expected = _ras_shape(loaded.original_shape, ornt)
    if tuple(mask_ras.shape) != expected:
        raise ValueError(f"array of shape {mask_ras.shape} is not on the RAS grid {expected} of {loaded.case.case_id}")
    identity = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    back = orientations.ornt_transform(identity, ornt)
    return np.ascontiguousarray(orientations.apply_orientation(mask_ras, back))
