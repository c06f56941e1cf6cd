"""Kaggle Brain Tumor MRI images: scanning the folder layout, checking files, and turning a JPEG into a model input.

The layout users download (Nickparvar's Kaggle set) is::

    ROOT/Training/{glioma,meningioma,notumor,pituitary}/Tr-gl_0010.jpg
    ROOT/Testing/{glioma,meningioma,notumor,pituitary}/Te-gl_0010.jpg

Preprocessing turns every image into one grey channel, pads it to a square and resizes it, so that neither colour
nor the original size or aspect ratio (both correlate with the class in this data set) survive as a cue, then
z-scores the foreground.

Why not MONAI's ``LoadImage``: the Deploy app shares this code without MONAI core, and a scan that names each file
at fault before work starts is not a reader's job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

KAGGLE_FOLDERS: tuple[str, ...] = ("Training", "Testing")
KAGGLE_CLASSES: tuple[str, ...] = ("glioma", "meningioma", "notumor", "pituitary")
# 4-class label: alphabetical index of the folder name; binary label: tumour (1) unless the folder is "notumor".
CLASS4_INDEX: dict[str, int] = {name: index for index, name in enumerate(KAGGLE_CLASSES)}
NO_TUMOUR_CLASS = "notumor"
IMAGE_SUFFIXES: frozenset[str] = frozenset({".jpg", ".jpeg", ".png"})
SUPPORTED_FORMATS: frozenset[str] = frozenset({"JPEG", "PNG", "MPO"})

# JPEG end-of-image marker. Entropy-coded data stuffs every 0xFF with 0x00, so FFD9 cannot appear inside the scan:
# its absence near the end of the file means the download stopped early.
JPEG_EOI = b"\xff\xd9"
# Some writers append a few bytes after the marker (padding, vendor trailers); look for it in this many tail bytes.
JPEG_TAIL_BYTES = 1024

# Pixels at or below this fraction of the image's 99.5th percentile count as background. JPEG ringing leaves the
# black background a few grey levels above zero; brain tissue is far brighter than 5% of the bright end.
FOREGROUND_THRESHOLD = 0.05
# Luminance weights (ITU-R BT.601, as PIL's "L" conversion) for the rare image stored in genuine colour.
LUMINANCE_WEIGHTS = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class KaggleImage:
    """One image file of the Kaggle layout.

    Attributes:
        path: the file on disk.
        original: its path relative to the Kaggle root, with forward slashes (``Training/glioma/Tr-gl_0010.jpg``).
        folder: ``Training`` or ``Testing``: the official split the file came in.
        class_name: the class folder it sits in.
        output: where its prepared array goes, relative to the prepared folder (``kaggle/Training/glioma/x.npy``).
    """

    path: Path
    original: str
    folder: str
    class_name: str
    output: str

    @property
    def cls(self) -> int:
        """Binary label: 0 no tumour, 1 tumour."""
        return binary_label(self.class_name)

    @property
    def cls4(self) -> int:
        """4-class label, alphabetical: glioma 0, meningioma 1, notumor 2, pituitary 3."""
        return CLASS4_INDEX[self.class_name]


@dataclass
class KaggleScan:
    """What a scan of the Kaggle folder found.

    Attributes:
        root: the Kaggle root.
        images: readable images in a deterministic order (by ``original``).
        skipped: (relative path, reason) for stray files that are not images and were left out.
        errors: one line per problem (file + problem); preparation must not go on when this is not empty.
    """

    root: Path
    images: list[KaggleImage] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def binary_label(class_name: str) -> int:
    """Tumour (1) / no tumour (0) label of a Kaggle class folder."""
    return 0 if class_name == NO_TUMOUR_CLASS else 1


def is_ignored(path: Path) -> bool:
    """macOS metadata (``._*`` AppleDouble files, ``.DS_Store``) that archives carry along: ignored silently."""
    return path.name.startswith("._") or path.name == ".DS_Store"


def find_image_problem(path: Path) -> str | None:
    """Cheap completeness check of one image file, without decoding the pixels.

    Args:
        path: the image file.

    Returns:
        None when the file looks complete, otherwise a short description of the problem.
    """
    try:
        with Image.open(path) as image:
            image_format = image.format
            image.verify()
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        return f"not a readable image ({error})"
    if image_format not in SUPPORTED_FORMATS:
        return f"unsupported image format {image_format} (expected JPEG or PNG)"
    if image_format in ("JPEG", "MPO") and not _ends_with_jpeg_eoi(path):
        return "truncated JPEG: no end-of-image marker (FFD9) at the end of the file"
    return None


def _ends_with_jpeg_eoi(path: Path) -> bool:
    with path.open("rb") as handle:
        handle.seek(0, 2)
        size = handle.tell()
        handle.seek(max(0, size - JPEG_TAIL_BYTES))
        tail = handle.read()
    return JPEG_EOI in tail


def scan_kaggle(root: Path) -> KaggleScan:
    """Find the images of a Kaggle Brain Tumor MRI folder and check that each one is complete.

    Every problem is collected rather than raised, so that the user sees all of them at once.

    Args:
        root: the folder holding ``Training`` and ``Testing``.

    Returns:
        The images, the stray files skipped, and the errors found.
    """
    scan = KaggleScan(root=root)
    if not root.is_dir():
        scan.errors.append(f"{root}: Kaggle folder does not exist")
        return scan
    for folder in KAGGLE_FOLDERS:
        folder_dir = root / folder
        if not folder_dir.is_dir():
            scan.errors.append(f"{folder_dir}: missing folder {folder}/ ({_layout_hint(root)})")
            continue
        _skip_strays_beside_classes(scan, folder_dir)
        for class_name in KAGGLE_CLASSES:
            _scan_class_folder(scan, folder, class_name)
    scan.images.sort(key=lambda image: image.original)
    _give_unique_outputs(scan.images)
    return scan


def _layout_hint(root: Path) -> str:
    found = sorted(entry.name for entry in root.iterdir() if not is_ignored(entry))
    nested = [name for name in found if (root / name / KAGGLE_FOLDERS[0]).is_dir()]
    if nested:
        return f"found it one level down: pass --kaggle {root / nested[0]}"
    expected = "{" + ",".join(KAGGLE_CLASSES) + "}"
    return f"expected {'|'.join(KAGGLE_FOLDERS)}/{expected}/*.jpg; found: {', '.join(found) or 'nothing'}"


def _skip_strays_beside_classes(scan: KaggleScan, folder_dir: Path) -> None:
    for entry in sorted(folder_dir.iterdir()):
        if is_ignored(entry) or (entry.is_dir() and entry.name in KAGGLE_CLASSES):
            continue
        reason = "folder is not one of the four classes" if entry.is_dir() else "file outside the class folders"
        scan.skipped.append((_relative(entry, scan.root), reason))


def _scan_class_folder(scan: KaggleScan, folder: str, class_name: str) -> None:
    class_dir = scan.root / folder / class_name
    if not class_dir.is_dir():
        scan.errors.append(f"{class_dir}: missing class folder {folder}/{class_name}/")
        return
    found_images = 0
    for entry in sorted(class_dir.iterdir()):
        if is_ignored(entry):
            continue
        relative = _relative(entry, scan.root)
        if entry.is_dir():
            scan.skipped.append((relative, "sub-folder inside a class folder (not read)"))
            continue
        if entry.suffix.lower() not in IMAGE_SUFFIXES:
            scan.skipped.append((relative, f"not an image file (suffix {entry.suffix or 'none'!r})"))
            continue
        found_images += 1
        problem = find_image_problem(entry)
        if problem is not None:
            scan.errors.append(f"{entry}: {problem}")
            continue
        scan.images.append(KaggleImage(path=entry, original=relative, folder=folder, class_name=class_name, output=""))
    if found_images == 0:
        scan.errors.append(f"{class_dir}: empty class folder (no .jpg, .jpeg or .png image)")


def _give_unique_outputs(images: list[KaggleImage]) -> None:
    """Name each output array after its source; ``x.jpg`` and ``x.png`` in one folder keep their suffix apart."""
    stems: dict[str, int] = {}
    for image in images:
        key = str(Path(image.original).with_suffix(""))
        stems[key] = stems.get(key, 0) + 1
    for index, image in enumerate(images):
        stem = Path(image.original).with_suffix("")
        if stems[str(stem)] > 1:
            stem = stem.with_name(f"{stem.name}_{image.path.suffix.lstrip('.').lower()}")
        output = f"kaggle/{stem.as_posix()}.npy"
        images[index] = KaggleImage(image.path, image.original, image.folder, image.class_name, output)


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def pixels_sha256(grey: np.ndarray) -> str:
    """SHA-256 of a decoded grey image (shape included): equal for re-saved copies with identical pixels."""
    digest = hashlib.sha256(repr(grey.shape).encode())
    digest.update(np.ascontiguousarray(grey, dtype=np.float32).tobytes())
    return digest.hexdigest()


def load_grey(path: Path) -> tuple[np.ndarray, str]:
    """Decode an image into one grey channel.

    Args:
        path: a JPEG or PNG file.

    Returns:
        The (H, W) float32 image and how it was stored: ``grey`` (one channel), ``rgb-grey`` (three equal channels,
        the usual case in the Kaggle set; one is kept) or ``colour`` (genuine colour, converted to luminance).

    Raises:
        OSError: the pixels cannot be decoded (for example a file cut short in the middle of the scan).
    """
    with Image.open(path) as opened:
        opened.load()
        # Orientation stored in EXIF is applied, as any viewer would show the image.
        image = ImageOps.exif_transpose(opened)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("L", "I", "F") or image.mode.startswith("I;"):
        return np.asarray(image, dtype=np.float32), "grey"
    if image.mode in ("LA", "La"):
        return np.asarray(image.getchannel(0), dtype=np.float32), "grey"
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
        return np.ascontiguousarray(rgb[..., 0]), "rgb-grey"
    return rgb @ LUMINANCE_WEIGHTS, "colour"


def pad_to_square(grey: np.ndarray) -> np.ndarray:
    """Pad an (H, W) image with zeros, centred, to a square of side max(H, W)."""
    height, width = grey.shape
    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    square = np.zeros((side, side), dtype=np.float32)
    square[top : top + height, left : left + width] = grey
    return square


def resize_square(square: np.ndarray, size: int) -> np.ndarray:
    """Resize a square image to (size, size), antialiased (Lanczos filter widened when shrinking)."""
    if square.shape == (size, size):
        return square.astype(np.float32, copy=True)
    resized = Image.fromarray(square.astype(np.float32), mode="F").resize(
        (size, size), resample=Image.Resampling.LANCZOS
    )
    # Lanczos overshoots slightly around sharp edges; the source had no negative intensities.
    return np.clip(np.asarray(resized, dtype=np.float32), 0.0, None)


def normalise_foreground(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """Z-score the foreground pixels and set the background to 0.

    Args:
        image: a non-negative (H, W) image.

    Returns:
        The normalised image and whether the image was blank (no foreground: returned as zeros).
    """
    bright = float(np.percentile(image, 99.5))
    foreground = image > FOREGROUND_THRESHOLD * bright
    if bright <= 0 or np.count_nonzero(foreground) < 2:
        return np.zeros_like(image, dtype=np.float32), True
    values = image[foreground]
    std = float(values.std())
    normalised = np.zeros_like(image, dtype=np.float32)
    normalised[foreground] = (values - float(values.mean())) / (std if std > 0 else 1.0)
    return normalised, False


def preprocess_grey(grey: np.ndarray, size: int) -> tuple[np.ndarray, bool]:
    """Turn a decoded grey image into the model input.

    Args:
        grey: (H, W) grey image, any size or aspect ratio.
        size: side of the output square.

    Returns:
        The (1, size, size) float32 image and whether it was blank.
    """
    resized = resize_square(pad_to_square(grey), size)
    normalised, blank = normalise_foreground(resized)
    return normalised[np.newaxis], blank
