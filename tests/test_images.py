"""Kaggle image folder scanning, file checks and preprocessing, on real image files written to a temporary folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.data import images


def brain_like(height: int = 180, width: int = 160, seed: int = 0) -> np.ndarray:
    """A bright textured ellipse on a black background, uint8."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width]
    inside = ((rows - height / 2) / (0.4 * height)) ** 2 + ((cols - width / 2) / (0.4 * width)) ** 2 < 1
    texture = 120 + 40 * np.sin(rows / 7.0) * np.cos(cols / 5.0) + rng.normal(0, 8, (height, width))
    return np.clip(np.where(inside, texture, 0), 0, 255).astype(np.uint8)


def save_jpeg(path: Path, array: np.ndarray, quality: int = 95, mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).convert(mode).save(path, quality=quality)
    return path


def make_layout(root: Path, per_class: int = 2) -> Path:
    for f_index, folder in enumerate(images.KAGGLE_FOLDERS):
        for c_index, name in enumerate(images.KAGGLE_CLASSES):
            for i in range(per_class):
                save_jpeg(
                    root / folder / name / f"{folder[:2]}-{name[:2]}_{i:04d}.jpg",
                    brain_like(seed=f_index * 100 + c_index * 10 + i),
                )
    return root


def test_labels_follow_the_class_folder() -> None:
    assert [images.binary_label(name) for name in images.KAGGLE_CLASSES] == [1, 1, 0, 1]
    assert [images.CLASS4_INDEX[name] for name in images.KAGGLE_CLASSES] == [0, 1, 2, 3]


def test_scan_finds_every_image_with_labels_and_outputs(tmp_path: Path) -> None:
    scan = images.scan_kaggle(make_layout(tmp_path / "kaggle"))
    assert scan.errors == [] and scan.skipped == []
    assert len(scan.images) == 16
    first = scan.images[0]
    assert first.original == "Testing/glioma/Te-gl_0000.jpg"
    assert first.output == "kaggle/Testing/glioma/Te-gl_0000.npy"
    assert (first.folder, first.cls, first.cls4) == ("Testing", 1, 0)
    notumor = next(image for image in scan.images if image.class_name == "notumor")
    assert (notumor.cls, notumor.cls4) == (0, 2)
    assert [image.original for image in scan.images] == sorted(image.original for image in scan.images)


def test_scan_skips_stray_files_and_ignores_macos_metadata(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "kaggle", per_class=1)
    (root / "Training" / "glioma" / "Thumbs.db").write_bytes(b"\x00" * 64)
    (root / "Training" / "notes.txt").write_text("downloaded from kaggle")
    (root / "Testing" / "pituitary" / "._Te-pi_0000.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (root / "Testing" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    scan = images.scan_kaggle(root)
    assert scan.errors == []
    assert sorted(path for path, _ in scan.skipped) == ["Training/glioma/Thumbs.db", "Training/notes.txt"]
    assert len(scan.images) == 8


def test_scan_collects_every_problem(tmp_path: Path) -> None:
    root = make_layout(tmp_path / "kaggle", per_class=1)
    good = root / "Training" / "glioma" / "Tr-gl_0000.jpg"
    truncated = root / "Training" / "meningioma" / "cut.jpg"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    fake = root / "Testing" / "notumor" / "fake.jpg"
    fake.write_text("<html>404 not found</html>")
    for path in (root / "Training" / "pituitary").iterdir():
        path.unlink()
    (root / "Testing" / "glioma" / "Te-gl_0000.jpg").unlink()
    (root / "Testing" / "glioma").rmdir()
    errors = "\n".join(images.scan_kaggle(root).errors)
    assert f"{truncated}: truncated JPEG" in errors
    assert f"{fake}: not a readable image" in errors
    assert f"{root / 'Training' / 'pituitary'}: empty class folder" in errors
    assert f"{root / 'Testing' / 'glioma'}: missing class folder" in errors


def test_missing_split_folder_points_one_level_down(tmp_path: Path) -> None:
    make_layout(tmp_path / "download" / "archive", per_class=1)
    errors = images.scan_kaggle(tmp_path / "download").errors
    assert len(errors) == 2 and all("pass --kaggle" in line and "archive" in line for line in errors)


def test_find_image_problem(tmp_path: Path) -> None:
    jpeg = save_jpeg(tmp_path / "a.jpg", brain_like())
    png = tmp_path / "b.png"
    Image.fromarray(brain_like()).save(png)
    assert images.find_image_problem(jpeg) is None
    assert images.find_image_problem(png) is None
    cut_png = tmp_path / "cut.png"
    cut_png.write_bytes(png.read_bytes()[:200])
    assert images.find_image_problem(cut_png) is not None
    # Trailing padding after the end-of-image marker is common and harmless.
    padded = tmp_path / "padded.jpg"
    padded.write_bytes(jpeg.read_bytes() + b"\x00" * 100)
    assert images.find_image_problem(padded) is None


def test_load_grey_keeps_one_channel_or_converts_colour(tmp_path: Path) -> None:
    array = brain_like()
    Image.fromarray(array).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(array).save(tmp_path / "grey.png")
    colour = np.stack([array, array // 2, np.zeros_like(array)], axis=-1)
    Image.fromarray(colour).save(tmp_path / "colour.png")
    rgb, kind = images.load_grey(tmp_path / "rgb.png")
    assert kind == "rgb-grey" and np.array_equal(rgb, array.astype(np.float32))
    grey, kind = images.load_grey(tmp_path / "grey.png")
    assert kind == "grey" and np.array_equal(grey, rgb)
    luminance, kind = images.load_grey(tmp_path / "colour.png")
    expected = 0.299 * array + 0.587 * (array // 2)
    assert kind == "colour" and np.allclose(luminance, expected, atol=1e-3)


def test_preprocess_pads_resizes_and_zscores_the_foreground() -> None:
    out, blank = images.preprocess_grey(brain_like(180, 120).astype(np.float32), 64)
    assert out.shape == (1, 64, 64) and out.dtype == np.float32 and not blank
    foreground = out[0] != 0
    assert abs(out[0][foreground].mean()) < 1e-3 and abs(out[0][foreground].std() - 1) < 1e-3
    # The narrow image is centred: the padded columns on both sides stay background.
    assert not foreground[:, :8].any() and not foreground[:, -8:].any()


def test_image_size_does_not_leak_into_the_input() -> None:
    small = brain_like(200, 200)
    large = np.asarray(Image.fromarray(small).resize((512, 512), Image.Resampling.BICUBIC), dtype=np.float32)
    out_small, _ = images.preprocess_grey(small.astype(np.float32), 128)
    out_large, _ = images.preprocess_grey(large, 128)
    foreground = (out_small != 0) & (out_large != 0)
    assert foreground.mean() > 0.3
    assert np.corrcoef(out_small[foreground], out_large[foreground])[0, 1] > 0.97


def test_blank_image_becomes_zeros() -> None:
    out, blank = images.preprocess_grey(np.zeros((50, 70), dtype=np.float32), 32)
    assert blank and not out.any()


@pytest.mark.parametrize("name", ["x.jpg", "x.png"])
def test_outputs_stay_unique_when_stems_collide(tmp_path: Path, name: str) -> None:
    root = make_layout(tmp_path / "kaggle", per_class=1)
    Image.fromarray(brain_like(seed=5)).save(root / "Training" / "glioma" / "x.png")
    save_jpeg(root / "Training" / "glioma" / "x.jpg", brain_like(seed=6))
    scan = images.scan_kaggle(root)
    outputs = {image.original: image.output for image in scan.images}
    assert len(set(outputs.values())) == len(outputs)
    assert outputs[f"Training/glioma/{name}"] == f"kaggle/Training/glioma/x_{name[-3:]}.npy"
