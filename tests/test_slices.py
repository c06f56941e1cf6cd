"""Tests of scripts.data.slices: normalisation, slice dropping, resizing and putting predictions back."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.slices import (
    Slice,
    brain_mask,
    extract_slices,
    from_display_plane,
    normalise_volume,
    resize_slice,
    restore_slice,
    slice_label,
    slices_to_volume,
    to_display_plane,
)
from scripts.data.volumes import LoadedCase, VolumeCase, find_cases, load_case, to_original_grid


def loaded_case(image: np.ndarray, mask: np.ndarray | None) -> LoadedCase:
    """A LoadedCase built in memory (RAS identity grid)."""
    case = VolumeCase("BraTS2021_00000", "brats2021", {}, None)
    return LoadedCase(case, image.astype(np.float32), mask, np.eye(4), np.eye(4), image.shape[1:])


def square(size: int, top: int, left: int, side: int) -> np.ndarray:
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + side, left : left + side] = 1
    return out


def centroid(array: np.ndarray) -> np.ndarray:
    return np.argwhere(array > 0).mean(axis=0)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a > 0, b > 0
    return float((a & b).sum() / (a | b).sum())


# ----------------------------------------------------------------------------------------------------------------------
# Brain mask and normalisation


def test_brain_mask_is_any_channel_nonzero():
    image = np.zeros((2, 4, 4, 3), dtype=np.float32)
    image[0, 0, 0, 0] = 5
    image[1, 1, 1, 1] = -2
    expected = np.zeros((4, 4, 3), dtype=bool)
    expected[0, 0, 0] = expected[1, 1, 1] = True
    np.testing.assert_array_equal(brain_mask(image), expected)


def test_normalise_volume_zscores_brain_and_zeroes_background():
    rng = np.random.default_rng(0)
    brain = np.zeros((40, 40, 10), dtype=bool)
    brain[5:35, 8:30, 1:9] = True
    image = np.zeros((2, *brain.shape), dtype=np.float32)
    image[0][brain] = rng.normal(600, 150, brain.sum())
    image[1][brain] = rng.gamma(2.0, 300, brain.sum()) + 1
    image[1][brain.nonzero()[0][0], brain.nonzero()[1][0], brain.nonzero()[2][0]] = 1e7  # one hot voxel

    out = normalise_volume(image, brain_mask(image))
    assert out.dtype == np.float32 and out.shape == image.shape
    for channel in out:
        assert abs(channel[brain].mean()) < 1e-4
        assert abs(channel[brain].std() - 1) < 1e-4
        assert np.all(channel[~brain] == 0)
    # Clipping at the 99.5th percentile keeps the hot voxel from squashing the scale.
    assert out[1].max() < 10


def test_normalise_volume_constant_or_empty_channel_gives_zeros():
    brain = np.zeros((8, 8, 4), dtype=bool)
    brain[2:6, 2:6, 1:3] = True
    image = np.stack([brain * 5.0, np.zeros(brain.shape)]).astype(np.float32)
    out = normalise_volume(image, brain)
    assert np.isfinite(out).all() and not out.any()
    assert not normalise_volume(np.zeros((1, 4, 4, 2), np.float32), np.zeros((4, 4, 2), bool)).any()


# ----------------------------------------------------------------------------------------------------------------------
# Display plane and resizing


def test_display_plane_puts_anterior_up_and_patient_right_on_the_left():
    ras = np.zeros((5, 7))  # (X, Y): X runs to the patient's right, Y to anterior
    ras[4, 0] = 1  # most right, most posterior
    display = to_display_plane(ras)
    assert display.shape == (7, 5)
    assert display[6, 0] == 1  # bottom row (posterior), first column (patient's right)
    np.testing.assert_array_equal(from_display_plane(display), ras)


@pytest.mark.parametrize("size", [256, 128, 64])
def test_resize_keeps_mask_on_image_and_restore_inverts(size):
    lesion = square(240, 60, 150, 30)
    image = np.stack([lesion * 3 + 1, lesion * -2])  # (2, 240, 240)
    resized = resize_slice(image, size)
    resized_mask = resize_slice(lesion[None], size, is_mask=True)
    assert resized.shape == (2, size, size) and resized.dtype == np.float32
    assert resized_mask.shape == (1, size, size) and resized_mask.dtype == np.uint8
    # The mask's lesion sits where the image's bright lesion is.
    np.testing.assert_allclose(centroid(resized_mask[0]), centroid(resized[0] > 2.5), atol=0.5)
    expected_centre = (np.array([60, 150]) + 14.5 + 0.5) * size / 240 - 0.5
    np.testing.assert_allclose(centroid(resized_mask[0]), expected_centre, atol=0.6)

    back = restore_slice(resized_mask, (240, 240), is_mask=True)
    assert back.shape == (1, 240, 240) and back.dtype == np.uint8
    assert iou(back[0], lesion) > 0.9
    np.testing.assert_allclose(centroid(back[0]), centroid(lesion), atol=0.5)
    restored_image = restore_slice(resized, (240, 240))
    np.testing.assert_allclose(centroid(restored_image[0] > 2.5), centroid(lesion), atol=0.5)


def test_small_structures_survive_shrinking():
    lesion = square(240, 100, 100, 3)  # 3x3 px -> about 1.6x1.6 px at 128
    assert resize_slice(lesion[None], 128, is_mask=True).sum() >= 1


def test_resize_of_a_stack_matches_one_by_one():
    rng = np.random.default_rng(1)
    stack = rng.normal(size=(5, 2, 60, 50)).astype(np.float32)
    together = resize_slice(stack, 32)
    one_by_one = np.stack([resize_slice(s, 32) for s in stack])
    np.testing.assert_allclose(together, one_by_one, atol=1e-6)
    assert restore_slice(together, (60, 50)).shape == (5, 2, 60, 50)
    with pytest.raises(ValueError, match="shape"):
        resize_slice(np.zeros((60, 50)), 32)


# ----------------------------------------------------------------------------------------------------------------------
# Slice extraction


def make_volume(brain_slices: list[int], tumour_slices: list[int], shape=(48, 40, 10)) -> tuple[np.ndarray, np.ndarray]:
    """(2, X, Y, Z) image with a brain rectangle on ``brain_slices`` (and a sliver elsewhere) and a tumour mask."""
    rng = np.random.default_rng(2)
    image = np.zeros((2, *shape), dtype=np.float32)
    for z in range(shape[2]):
        if z in brain_slices:
            image[:, 8:40, 6:34, z] = rng.normal(500, 80, (2, 32, 28))
        else:
            image[:, 20:22, 20:22, z] = 300  # 4 px of 1920: brain fraction ~0.002, dropped
    mask = np.zeros(shape, dtype=np.uint8)
    for z in tumour_slices:
        mask[12:20, 10:16, z] = 1
    return image, mask


@pytest.mark.parametrize("brain_slices", [[2, 3, 4, 5, 6, 7], [1, 2, 6, 7]], ids=["one-run", "gaps"])
def test_extract_slices_drops_low_brain_slices_and_counts_their_tumour(brain_slices):
    image, mask = make_volume(brain_slices, tumour_slices=[1, 4, 9])
    loaded = loaded_case(image, mask)
    slices, dropped = extract_slices(loaded, size=64, min_brain_fraction=0.05)

    assert [s.z for s in slices] == brain_slices
    assert all(isinstance(s, Slice) for s in slices)
    fraction = 32 * 28 / (48 * 40)
    assert all(s.brain_fraction == pytest.approx(fraction) for s in slices)
    assert all(s.image.shape == (2, 64, 64) and s.image.dtype == np.float32 for s in slices)
    assert all(s.mask.shape == (1, 64, 64) and s.mask.dtype == np.uint8 for s in slices)

    # Each kept slice equals: normalise the whole volume, take the slice, display plane, resize.
    normalised = normalise_volume(image, brain_mask(image))
    for s in slices:
        expected = resize_slice(np.ascontiguousarray(to_display_plane(normalised[..., s.z])), 64)
        np.testing.assert_allclose(s.image, expected, atol=1e-5)
        expected_mask = resize_slice(np.ascontiguousarray(to_display_plane(mask[..., s.z]))[None], 64, is_mask=True)
        np.testing.assert_array_equal(s.mask, expected_mask)
        assert s.tumour_pixels == int(s.mask.sum())

    # Tumour 8x6 px at 48x40 -> 64x64 is about 10.7x9.6 px; tumour in dropped slices is counted, not lost.
    per_slice = int(resize_slice(to_display_plane(mask[..., 4])[None].copy(), 64, is_mask=True).sum())
    assert per_slice > 80
    n_dropped_tumour = sum(z not in brain_slices for z in (1, 4, 9))
    assert dropped == n_dropped_tumour * per_slice
    kept_tumour = sum(s.tumour_pixels for s in slices)
    assert kept_tumour + dropped == 3 * per_slice


def test_extract_slices_threshold_and_unlabelled_cases():
    image, _ = make_volume([3, 4], tumour_slices=[])
    slices, dropped = extract_slices(loaded_case(image, None), size=32, min_brain_fraction=0.0)
    assert len(slices) == 10 and dropped == 0  # threshold 0 keeps every slice
    assert all(s.mask is None and s.tumour_pixels == 0 for s in slices)
    slices, _ = extract_slices(loaded_case(image, None), size=32, min_brain_fraction=0.5)
    assert slices == []  # brain fraction 0.47 < 0.5
    # A slice exactly at the threshold is kept.
    slices, _ = extract_slices(loaded_case(image, None), size=32, min_brain_fraction=32 * 28 / (48 * 40))
    assert [s.z for s in slices] == [3, 4]


def test_extract_slices_image_and_mask_stay_aligned():
    image, mask = make_volume(list(range(10)), tumour_slices=[5])
    image[:, 12:20, 10:16, 5] = 5000  # the tumour is bright
    (s,) = [s for s in extract_slices(loaded_case(image, mask), size=100)[0] if s.z == 5]
    bright = s.image[0] > s.image[0][s.image[0] != 0].mean() + 2
    assert iou(bright, s.mask[0]) > 0.8
    np.testing.assert_allclose(centroid(bright), centroid(s.mask[0]), atol=0.5)


def test_slices_to_volume_puts_predictions_back():
    image, mask = make_volume([2, 3, 4, 5, 6, 7], tumour_slices=[3, 5, 9], shape=(48, 48, 10))
    loaded = loaded_case(image, mask)
    # Same size as the (square) slice: the round trip is exact.
    slices, _ = extract_slices(loaded, size=48)
    same = slices_to_volume(np.stack([s.mask for s in slices]), [s.z for s in slices], mask.shape, is_mask=True)
    np.testing.assert_array_equal(same[..., [s.z for s in slices]], mask[..., [s.z for s in slices]])
    assert not same[..., 9].any()  # dropped slice stays empty
    # Another size: probabilities restored, thresholded, overlap the truth.
    slices, _ = extract_slices(loaded, size=80)
    probs = np.stack([s.mask[0].astype(np.float32) for s in slices])
    volume = slices_to_volume(probs, [s.z for s in slices], mask.shape)
    assert volume.dtype == np.float32 and volume.shape == mask.shape
    assert iou(volume[..., 3] >= 0.5, mask[..., 3]) > 0.9
    with pytest.raises(ValueError, match="slices"):
        slices_to_volume(probs, [1], mask.shape)


def test_prediction_round_trip_to_the_input_file_grid(tmp_path: Path):
    """load (LPS file) -> slices -> back to RAS -> original grid reproduces the file's tumour voxels."""
    folder = tmp_path / "BraTS2021_00000"
    folder.mkdir()
    affine = np.diag([-1.0, -1.0, 1.0, 1.0])
    brain = np.zeros((40, 40, 8), dtype=np.int16)  # square slices of the prepared size: no interpolation
    brain[4:36, 3:33, :] = 500
    seg = np.zeros(brain.shape, dtype=np.uint8)
    seg[5:12, 20:30, 2:5] = 2
    seg[6:8, 22:24, 3] = 4
    for name in ("flair", "t1", "t1ce", "t2"):
        nib.save(nib.Nifti1Image(brain, affine), str(folder / f"BraTS2021_00000_{name}.nii.gz"))
    nib.save(nib.Nifti1Image(seg, affine), str(folder / "BraTS2021_00000_seg.nii.gz"))

    loaded = load_case(find_cases(tmp_path)[0])
    slices, dropped = extract_slices(loaded, size=40)
    assert dropped == 0
    ras = slices_to_volume(np.stack([s.mask for s in slices]), [s.z for s in slices], loaded.mask.shape, is_mask=True)
    np.testing.assert_array_equal(to_original_grid(ras, loaded), seg > 0)


# ----------------------------------------------------------------------------------------------------------------------
# Labels


@pytest.mark.parametrize(
    ("pixels", "minimum", "label"),
    [(0, 1, 0), (1, 1, 1), (500, 1, 1), (9, 10, 0), (10, 10, 1), (11, 10, 1)],
)
def test_slice_label_threshold(pixels, minimum, label):
    assert slice_label(pixels, minimum) == label


def test_slice_label_default_and_invalid_threshold():
    assert slice_label(0) == 0 and slice_label(1) == 1
    with pytest.raises(ValueError, match="at least 1"):
        slice_label(5, 0)
