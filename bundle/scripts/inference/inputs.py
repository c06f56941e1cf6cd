"""Find the inputs of an inference run and check every one of them before anything is computed or written.

Accepted, in one folder (or a single file, or a single BraTS case folder):

- BraTS 2020 / 2021 / 2023 case folders or an MSD Task01 folder, as :mod:`scripts.data.volumes` reads them for
  training (segmentations, when present, are ignored);
- plain NIfTI volumes (``.nii``, ``.nii.gz``): 3D for a one-channel model, 4D ``(X, Y, Z, C)`` with the channels in
  the order of the settings' modalities for a C-channel model;
- 2D images (``.png``, ``.jpg``, ``.jpeg``), preprocessed like the Kaggle images of training.

Other files (``name_mapping.csv``, ``dataset.json``, notes), hidden entries and the outputs of an earlier run
(:mod:`.names`) are skipped; a loose NIfTI named like a ground truth (``*_seg``, ``*-seg``) is refused rather than
read as an image. Every problem found is reported at once, one line per file. Outputs go outside every input tree,
so that no prediction can replace or shadow an input.

Why not MONAI's ``LoadImage``: it reads a file it is given; finding inputs in the layouts users have and refusing
ground truths before any work starts is not its job.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib

from scripts.data.images import IMAGE_SUFFIXES, find_image_problem, is_ignored
from scripts.data.volumes import DataError, VolumeCase, case_folder, check_case, find_cases

from .names import PREDICTION_SUFFIXES
from .settings import InferenceSettings

__all__ = ["NIFTI_SUFFIXES", "InferenceInput", "check_output_dir", "find_inputs", "input_name"]

NIFTI_SUFFIXES = (".nii.gz", ".nii")
_ACCEPTED = "BraTS / MSD case folders, NIfTI volumes (.nii, .nii.gz) or 2D images (.png, .jpg, .jpeg)"
# Plain files get a layout only so that scripts.data.volumes can read them: one with a 3D file, MSD's 4D reading
# for several channels. No label scheme is involved: inference never reads a segmentation.
_PLAIN_3D_LAYOUT = "brats2021"
_PLAIN_4D_LAYOUT = "msd"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InferenceInput:
    """One thing to predict on.

    Attributes:
        name: Output file stem: the case id or the file name without its suffix.
        kind: ``"volume"`` or ``"image"``.
        source: The case folder or file, as named in messages and in the output JSON.
        case: For volumes, the files to read (segmentation dropped).
    """

    name: str
    kind: str
    source: Path
    case: VolumeCase | None = None

    @property
    def reference_file(self) -> Path:
        """The file whose grid (shape, affine, NIfTI header) the outputs share."""
        if self.case is None:
            return self.source
        return next(iter(self.case.modality_files.values()))


def input_name(path: Path) -> str:
    """A file's name without ``.nii.gz``, ``.nii`` or its image suffix."""
    name = path.name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def _is_hidden(path: Path) -> bool:
    return path.name.startswith(".") or is_ignored(path)


def _is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_prediction(path: Path) -> bool:
    return path.name.endswith(PREDICTION_SUFFIXES)


def _looks_like_ground_truth(path: Path) -> bool:
    """``x_seg.nii.gz`` / ``x-seg.nii.gz``: BraTS's names for a segmentation, never an image to predict on."""
    return _is_nifti(path) and input_name(path).lower().endswith(("_seg", "-seg"))


def _plain_volume(path: Path, settings: InferenceSettings) -> InferenceInput:
    """A NIfTI file given as it is: check its channels against the model, then as training checks files."""
    try:
        shape = tuple(int(s) for s in nib.load(str(path)).shape)
    except Exception:  # unreadable: check_case below names the problem
        shape = ()
    channels = shape[3] if len(shape) == 4 and shape[3] > 1 else 1
    if len(shape) >= 3 and channels != settings.in_channels:
        wanted = ", ".join(settings.modalities)
        raise DataError(
            f"file {path} has {channels} channel{'s' if channels > 1 else ''} (shape {shape}) but the model takes "
            f"{settings.in_channels} ({wanted}): give "
            + ("a 3D volume" if settings.in_channels == 1 else f"a 4D volume (X, Y, Z, {settings.in_channels})")
        )
    files = dict.fromkeys(settings.modalities, path)
    if settings.in_channels == 1:
        case = VolumeCase(input_name(path), _PLAIN_3D_LAYOUT, files, None)
    else:
        channel_index = {modality: index for index, modality in enumerate(settings.modalities)}
        case = VolumeCase(input_name(path), _PLAIN_4D_LAYOUT, files, None, channel_index=channel_index)
    check_case(case, settings.modalities)
    return InferenceInput(case.case_id, "volume", path, case)


def _image(path: Path) -> InferenceInput:
    problem = find_image_problem(path)
    if problem is not None:
        raise DataError(f"file {path}: {problem}")
    return InferenceInput(input_name(path), "image", path)


def _file_input(path: Path, settings: InferenceSettings) -> InferenceInput:
    if _looks_like_ground_truth(path):
        raise DataError(
            f"file {path} is named as a segmentation (ground truth), not an image: move it away, or pass its case "
            "folder, whose segmentation is ignored"
        )
    if _is_nifti(path):
        return _plain_volume(path, settings)
    if _is_image(path):
        return _image(path)
    raise DataError(f"file {path} is not an accepted input; expected {_ACCEPTED}")


def _case_input(case: VolumeCase, settings: InferenceSettings) -> InferenceInput:
    case = dataclasses.replace(case, seg_file=None)
    check_case(case, settings.modalities)
    return InferenceInput(case.case_id, "volume", next(iter(case.modality_files.values())).parent, case)


def _folder_candidates(root: Path) -> tuple[list[VolumeCase], list[Path]]:
    """Case folders (when the folder has a BraTS / MSD layout) and plain input files directly under ``root``."""
    entries = sorted((e for e in root.iterdir() if not (_is_hidden(e) or _is_prediction(e))), key=lambda e: e.name)
    files = [e for e in entries if e.is_file() and (_is_nifti(e) or _is_image(e))]
    skipped = [e.name for e in entries if e.is_file() and e not in files]
    cases: list[VolumeCase] = []
    if any(e.is_dir() for e in entries) or (root / "dataset.json").is_file():
        try:
            cases = find_cases(root)
        except DataError as error:
            if not files:
                raise DataError(f"{error}; or put {_ACCEPTED} directly in {root}") from error
            skipped += [f"{e.name}/" for e in entries if e.is_dir()]
    if skipped:
        logger.info(f"{root}: skipped what is not an input: {', '.join(skipped)}")
    return cases, files


def check_output_dir(root: Path | str, output_dir: Path | str) -> None:
    """Refuse an output folder inside the input tree (or, for one input file, the folder holding it).

    Written there, a prediction could replace an input (a case's ground truth among them) or be read as an input by
    the next run.

    Raises:
        DataError: Naming both folders and the fix.
    """
    root, output = Path(root).resolve(), Path(output_dir).resolve()
    tree = root if root.is_dir() else root.parent
    if output == tree or (root.is_dir() and tree in output.parents):
        raise DataError(
            f"the output folder {output_dir} is inside the input {'folder' if root.is_dir() else 'file'}'s tree "
            f"{tree}: predictions there could replace or be read as inputs; choose a folder outside {tree}"
        )


def find_inputs(
    root: Path | str, settings: InferenceSettings, output_dir: Path | str | None = None
) -> list[InferenceInput]:
    """List and check the inputs of a run, reading only headers (cheap), before any prediction.

    Args:
        root: A folder of inputs, one BraTS case folder, or one input file.
        settings: The run's settings (channels and modalities are checked against them).
        output_dir: Where the outputs go; checked by :func:`check_output_dir`.

    Returns:
        The inputs, case folders first, then files, each group by name.

    Raises:
        DataError: Listing every input with a problem (missing modality, not a NIfTI / image file, a 2D NIfTI,
            wrong number of channels, truncated file, mismatched grids, two inputs with one output name), or when
            there is no input at all.
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"input {root} does not exist")
    if output_dir is not None:
        check_output_dir(root, output_dir)
    single_case = case_folder(root)
    if single_case is not None:
        cases, files = [single_case], []
    else:
        cases, files = _folder_candidates(root) if root.is_dir() else ([], [root])
    inputs: list[InferenceInput] = []
    problems: list[str] = []
    for check, candidate in [*((_case_input, c) for c in cases), *((_file_input, f) for f in files)]:
        try:
            inputs.append(check(candidate, settings))
        except DataError as error:
            problems.append(str(error))
    by_name: dict[str, list[InferenceInput]] = {}
    for item in inputs:
        by_name.setdefault(item.name, []).append(item)
    for name, same in by_name.items():
        if len(same) > 1:
            sources = ", ".join(str(item.source) for item in same)
            problems.append(f"inputs {sources} would all write outputs named {name}: rename one")
    if problems:
        raise DataError(f"{len(problems)} problem(s) with the inputs in {root}:\n  " + "\n  ".join(problems))
    if not inputs:
        raise DataError(f"no input found in {root}; expected {_ACCEPTED}")
    return inputs
