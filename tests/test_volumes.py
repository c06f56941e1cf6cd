"""Tests of scripts.data.volumes on real NIfTI files written into tmp_path in each supported layout."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from scripts.data.volumes import (
    LAYOUTS,
    MODALITIES,
    WHOLE_TUMOUR_LABELS,
    DataError,
    VolumeCase,
    check_case,
    detect_layout,
    find_cases,
    load_case,
    to_original_grid,
    whole_tumour_mask,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
SHAPE = (32, 32, 12)
LPS = np.diag([-1.0, -1.0, 1.0, 1.0])
# Each modality gets its own intensity inside the brain, so a channel's content tells which file it came from.
MARKER = {"flair": 100, "t1": 200, "t1ce": 300, "t2": 400}
FILE_SUFFIX = {
    "brats2020": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2021": {"flair": "_flair", "t1": "_t1", "t1ce": "_t1ce", "t2": "_t2", "seg": "_seg"},
    "brats2023": {"flair": "-t2f", "t1": "-t1n", "t1ce": "-t1c", "t2": "-t2w", "seg": "-seg"},
}
EXTENSION = {"brats2020": ".nii", "brats2021": ".nii.gz", "brats2023": ".nii.gz"}
CASE_IDS = {
    "brats2020": ["BraTS20_Training_001", "BraTS20_Training_002"],
    "brats2021": ["BraTS2021_00002", "BraTS2021_00000"],
    "brats2023": ["BraTS-GLI-00001-000", "BraTS-GLI-00000-000"],
}
# Labels in each layout's scheme: the tumour core label, the edema label and the enhancing label.
SCHEME = {"brats2020": (1, 2, 4), "brats2021": (1, 2, 4), "brats2023": (1, 2, 3), "msd": (3, 1, 2)}


# ----------------------------------------------------------------------------------------------------------------------
# Fixture builders


def brain(shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """An ellipsoid 'brain' covering the middle of the volume."""
    x, y, z = np.ogrid[: shape[0], : shape[1], : shape[2]]
    cx, cy, cz = ((s - 1) / 2 for s in shape)
    return ((x - cx) / (shape[0] * 0.4)) ** 2 + ((y - cy) / (shape[1] * 0.4)) ** 2 + (
        (z - cz) / (shape[2] * 0.45)
    ) ** 2 < 1


def labels(layout: str, shape: tuple[int, int, int] = SHAPE) -> np.ndarray:
    """A small tumour using all three tumour labels of the layout."""
    seg = np.zeros(shape, dtype=np.uint8)
    core, edema, enhancing = SCHEME[layout]
    seg[10:18, 12:20, 4:8] = edema
    seg[12:16, 14:18, 5:7] = core
    seg[13, 15, 6] = enhancing
    return seg


def save(array: np.ndarray, path: Path, affine: np.ndarray = LPS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), str(path))
    return path


def write_brats_case(
    root: Path,
    layout: str,
    case_id: str,
    *,
    seg: bool = True,
    seg_name: str | None = None,
    affine: np.ndarray = LPS,
    ext: str | None = None,
) -> Path:
    """One BraTS case folder with int16 modalities (marker intensities) and, optionally, a seg."""
    folder = root / case_id
    ext = ext or EXTENSION[layout]
    mask = brain()
    for modality in MODALITIES:
        data = (mask * MARKER[modality]).astype(np.int16)
        save(data, folder / f"{case_id}{FILE_SUFFIX[layout][modality]}{ext}", affine)
    if seg:
        save(labels(layout), folder / (seg_name or f"{case_id}{FILE_SUFFIX[layout]['seg']}{ext}"), affine)
    return folder


def write_brats(root: Path, layout: str) -> Path:
    for case_id in CASE_IDS[layout]:
        write_brats_case(root, layout, case_id)
    return root


def write_msd(
    root: Path,
    *,
    channels: int = 4,
    nested: bool = True,
    modality: dict[str, str] | None = None,
) -> Path:
    """An MSD Task01 folder: dataset.json, 4D images (FLAIR, T1w, t1gd, T2w), labels, test images, macOS junk."""
    base = root / "Task01_BrainTumour" if nested else root
    mask = brain()
    image = np.stack([mask * MARKER[m] for m in MODALITIES][:channels], axis=-1).astype(np.float32)
    train, test = ["BRATS_002", "BRATS_001"], ["BRATS_485"]
    for case_id in train:
        save(image, base / "imagesTr" / f"{case_id}.nii.gz")
        save(labels("msd"), base / "labelsTr" / f"{case_id}.nii.gz")
    for case_id in test:
        save(image, base / "imagesTs" / f"{case_id}.nii.gz")
    # The MSD tarball carries AppleDouble files: junk bytes with NIfTI-like names.
    for junk in ("imagesTr/._BRATS_001.nii.gz", "labelsTr/._BRATS_001.nii.gz", "._dataset.json", ".DS_Store"):
        (base / junk).write_bytes(b"\x00\x05\x16\x07 junk")
    dataset = {
        "name": "BRATS",
        "modality": modality or {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"},
        "labels": {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"},
        "training": [{"image": f"./imagesTr/{c}.nii.gz", "label": f"./labelsTr/{c}.nii.gz"} for c in train],
        "test": [f"./imagesTs/{c}.nii.gz" for c in test],
    }
    (base / "dataset.json").write_text(json.dumps(dataset))
    return root


# ----------------------------------------------------------------------------------------------------------------------
# Layouts


@pytest.mark.parametrize("layout", ["brats2020", "brats2021", "brats2023"])
def test_brats_layouts_are_detected_and_read(tmp_path, layout):
    write_brats(tmp_path, layout)
    (tmp_path / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "name_mapping.csv").write_text("a,b\n")

    assert detect_layout(tmp_path) == layout
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == sorted(CASE_IDS[layout])
    case = cases[0]
    assert case.layout == layout
    assert set(case.modality_files) == set(MODALITIES)
    assert case.modality_files["flair"].name == f"{case.case_id}{FILE_SUFFIX[layout]['flair']}{EXTENSION[layout]}"
    check_case(case, MODALITIES)

    loaded = load_case(case, ("t2", "flair", "t1ce", "t1"))
    assert loaded.image.dtype == np.float32 and loaded.image.shape == (4, *SHAPE)
    # Channel order follows the request; each channel holds its own file's marker intensity.
    assert [loaded.image[i].max() for i in range(4)] == [MARKER[m] for m in ("t2", "flair", "t1ce", "t1")]
    assert loaded.modalities == ("t2", "flair", "t1ce", "t1")
    assert loaded.mask.dtype == np.uint8
    expected = np.flip(labels(layout) > 0, axis=(0, 1))  # LPS -> RAS flips X and Y
    np.testing.assert_array_equal(loaded.mask, expected.astype(np.uint8))


def test_brats2023_modality_names_map_to_canonical(tmp_path):
    write_brats(tmp_path, "brats2023")
    case = find_cases(tmp_path)[0]
    names = {m: p.name for m, p in case.modality_files.items()}
    assert names == {
        "flair": "BraTS-GLI-00000-000-t2f.nii.gz",
        "t1": "BraTS-GLI-00000-000-t1n.nii.gz",
        "t1ce": "BraTS-GLI-00000-000-t1c.nii.gz",
        "t2": "BraTS-GLI-00000-000-t2w.nii.gz",
    }
    assert case.seg_file.name == "BraTS-GLI-00000-000-seg.nii.gz"


def test_brats2020_misnamed_seg_of_case_355_is_used_with_a_warning(tmp_path):
    write_brats_case(tmp_path, "brats2020", "BraTS20_Training_001")
    write_brats_case(tmp_path, "brats2020", "BraTS20_Training_355", seg_name="W39_1998.09.19_Segm.nii")
    (tmp_path / "BraTS20_Training_355" / "._W39_1998.09.19_Segm.nii").write_bytes(b"junk")

    with pytest.warns(UserWarning, match=r"W39_1998\.09\.19_Segm\.nii"):
        cases = find_cases(tmp_path)
    case = cases[1]
    assert case.seg_file.name == "W39_1998.09.19_Segm.nii"
    check_case(case, ("flair",))
    assert load_case(case).mask.sum() == (labels("brats2020") > 0).sum()


def test_brats2020_validation_cases_have_no_seg(tmp_path):
    write_brats_case(tmp_path, "brats2020", "BraTS20_Validation_001", seg=False)
    assert detect_layout(tmp_path) == "brats2020"
    (case,) = find_cases(tmp_path)
    assert case.seg_file is None
    check_case(case, MODALITIES)
    loaded = load_case(case, ("flair",))
    assert loaded.mask is None and loaded.image.shape == (1, *SHAPE)


def test_unrecognised_nifti_without_seg_is_ignored_with_warning(tmp_path):
    folder = write_brats_case(tmp_path, "brats2021", "BraTS2021_00000", seg=False)
    save(labels("brats2021"), folder / "prediction.nii.gz")
    with pytest.warns(UserWarning, match=r"prediction\.nii\.gz"):
        (case,) = find_cases(tmp_path)
    assert case.seg_file is None


def test_two_seg_candidates_are_refused(tmp_path):
    folder = write_brats_case(tmp_path, "brats2020", "BraTS20_Training_355", seg_name="a_Segm.nii")
    save(labels("brats2020"), folder / "b_seg_copy.nii")
    with pytest.raises(DataError, match=r"BraTS20_Training_355.*a_Segm\.nii, b_seg_copy\.nii"):
        find_cases(tmp_path)


def test_same_modality_as_nii_and_nii_gz_is_refused(tmp_path):
    folder = write_brats_case(tmp_path, "brats2021", "BraTS2021_00000")
    save(brain().astype(np.int16), folder / "BraTS2021_00000_flair.nii")
    with pytest.raises(DataError, match=r"BraTS2021_00000.*two files for flair"):
        find_cases(tmp_path)


@pytest.mark.parametrize("nested", [True, False])
def test_msd_4d_channel_order_and_macos_files(tmp_path, nested):
    write_msd(tmp_path, nested=nested)
    (tmp_path / "._Task01_BrainTumour").write_bytes(b"junk")

    assert detect_layout(tmp_path) == "msd"
    cases = find_cases(tmp_path)
    assert [c.case_id for c in cases] == ["BRATS_001", "BRATS_002", "BRATS_485"]
    train, test = cases[0], cases[2]
    assert train.channel_index == {"flair": 0, "t1": 1, "t1ce": 2, "t2": 3}
    assert train.seg_file.name == "BRATS_001.nii.gz" and train.seg_file.parent.name == "labelsTr"
    assert test.seg_file is None
    for case in cases:
        check_case(case, MODALITIES)

    loaded = load_case(train, ("t1ce", "flair"))
    assert [loaded.image[i].max() for i in range(2)] == [MARKER["t1ce"], MARKER["flair"]]
    assert loaded.mask.sum() == (labels("msd") > 0).sum()
    assert load_case(test).mask is None


def test_msd_channel_order_comes_from_dataset_json(tmp_path):
    # Channels written in MODALITIES order but declared in another: the declaration wins.
    write_msd(tmp_path, modality={"0": "T2w", "1": "t1gd", "2": "T1w", "3": "FLAIR"})
    case = find_cases(tmp_path)[0]
    assert case.channel_index == {"t2": 0, "t1ce": 1, "t1": 2, "flair": 3}
    loaded = load_case(case, ("flair",))
    assert loaded.image.max() == MARKER["t2"]


def test_msd_without_dataset_json_says_so(tmp_path):
    save(brain().astype(np.float32), tmp_path / "imagesTr" / "BRATS_001.nii.gz")
    with pytest.raises(DataError, match=r"dataset\.json"):
        detect_layout(tmp_path)


def test_cases_one_level_down_name_the_folder_to_use(tmp_path):
    write_brats(tmp_path / "MICCAI_BraTS2020_TrainingData", "brats2020")
    with pytest.raises(DataError, match="MICCAI_BraTS2020_TrainingData"):
        detect_layout(tmp_path)


def test_mixed_releases_are_refused(tmp_path):
    write_brats_case(tmp_path, "brats2021", "BraTS2021_00000")
    write_brats_case(tmp_path, "brats2023", "BraTS-GLI-00000-000")
    with pytest.raises(DataError, match="mixes"):
        detect_layout(tmp_path)


def test_empty_and_unknown_folders_are_refused(tmp_path):
    with pytest.raises(DataError, match=rf"{re.escape(str(tmp_path))}.*empty.*BraTS2021_00000"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="empty"):
        find_cases(tmp_path)
    (tmp_path / "patient1").mkdir()
    with pytest.raises(DataError, match=r"matches no known layout.*patient1"):
        detect_layout(tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        detect_layout(tmp_path / "missing")
    with pytest.raises(DataError, match="no brats2021 case folders"):
        find_cases(tmp_path, "brats2021")


# ----------------------------------------------------------------------------------------------------------------------
# Label schemes


@pytest.mark.parametrize("layout", LAYOUTS)
def test_whole_tumour_mask_maps_every_tumour_label(layout):
    tumour = sorted(WHOLE_TUMOUR_LABELS[layout])
    seg = np.array([0, *tumour, 0], dtype=np.int16)
    np.testing.assert_array_equal(whole_tumour_mask(seg, layout, "x.nii"), [0, 1, 1, 1, 0])
    # Integer-valued float segs (common in BraTS files) are accepted.
    np.testing.assert_array_equal(whole_tumour_mask(seg.astype(np.float32), layout, "x.nii"), [0, 1, 1, 1, 0])


def test_label_schemes_are_explicit():
    assert WHOLE_TUMOUR_LABELS["brats2020"] == WHOLE_TUMOUR_LABELS["brats2021"] == {1, 2, 4}
    assert WHOLE_TUMOUR_LABELS["brats2023"] == WHOLE_TUMOUR_LABELS["msd"] == {1, 2, 3}


@pytest.mark.parametrize(
    ("layout", "values", "message"),
    [
        ("brats2021", [0, 1, 3], r"\[3\].*brats2021"),
        ("brats2020", [0, 5], r"\[5\]"),
        ("brats2023", [0, 2, 4], r"\[4\].*brats2023"),
        ("msd", [0, 4], r"\[4\].*msd"),
        ("msd", [0, -1], r"\[-1\]"),
        ("brats2021", [0, 1.5], r"non-integer.*1\.5"),
        ("brats2021", [0, np.nan], "NaN"),
    ],
)
def test_values_outside_the_scheme_are_refused_naming_the_file(layout, values, message):
    seg = np.array(values, dtype=np.float32 if any(isinstance(v, float) for v in values) else np.int16)
    with pytest.raises(DataError, match=rf"case_seg\.nii\.gz.*{message}|{message}.*case_seg\.nii\.gz"):
        whole_tumour_mask(seg, layout, Path("/data/case_seg.nii.gz"))


def test_load_case_refuses_a_2023_seg_in_a_2021_folder(tmp_path):
    folder = write_brats_case(tmp_path, "brats2021", "BraTS2021_00000")
    save(labels("brats2023"), folder / "BraTS2021_00000_seg.nii.gz")
    (case,) = find_cases(tmp_path)
    with pytest.raises(DataError, match=r"BraTS2021_00000_seg\.nii\.gz.*\[3\]"):
        load_case(case)


# ----------------------------------------------------------------------------------------------------------------------
# Orientation


def _permuted_affine() -> np.ndarray:
    """Voxel axes (i, j, k) pointing to (S, L, A): an unusual but valid orientation, with anisotropic spacing."""
    affine = np.zeros((4, 4))
    affine[2, 0], affine[0, 1], affine[1, 2], affine[3, 3] = 2.0, -1.0, 1.5, 1.0
    affine[:3, 3] = [10.0, -20.0, 5.0]
    return affine


@pytest.mark.parametrize("affine", [LPS, np.eye(4), _permuted_affine()], ids=["LPS", "RAS", "SLA"])
def test_load_case_reorients_to_ras_and_to_original_grid_inverts(tmp_path, affine):
    case_id = "BraTS2021_00000"
    folder = write_brats_case(tmp_path, "brats2021", case_id, affine=affine)
    marker = (3, 20, 7)
    flair = np.zeros(SHAPE, dtype=np.int16)
    flair[brain()] = 10
    flair[marker] = 999
    save(flair, folder / f"{case_id}_flair.nii.gz", affine)
    seg = np.zeros(SHAPE, dtype=np.uint8)
    seg[marker] = 2
    save(seg, folder / f"{case_id}_seg.nii.gz", affine)

    loaded = load_case(find_cases(tmp_path)[0])
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    ras_marker = np.argwhere(loaded.image[0] == 999)
    assert len(ras_marker) == 1
    # The marker keeps its world position: RAS affine at the new index == original affine at the old index.
    world_before = affine @ np.array([*marker, 1.0])
    world_after = loaded.affine @ np.array([*ras_marker[0], 1.0])
    np.testing.assert_allclose(world_after, world_before, atol=1e-6)
    np.testing.assert_array_equal(np.argwhere(loaded.mask), ras_marker)
    # Going back reproduces the files exactly, so predictions overlay the input.
    np.testing.assert_array_equal(to_original_grid(loaded.mask, loaded), seg > 0)
    np.testing.assert_array_equal(to_original_grid(loaded.image[0], loaded), flair)
    assert loaded.original_shape == SHAPE
    np.testing.assert_allclose(loaded.original_affine, affine)


def test_lps_marker_lands_where_expected(tmp_path):
    # With the BraTS LPS affine, i runs right->left and j anterior->posterior: RAS flips both.
    case_id = "BraTS2021_00000"
    folder = write_brats_case(tmp_path, "brats2021", case_id)
    flair = np.zeros(SHAPE, dtype=np.int16)
    flair[1, 2, 3] = 7
    save(flair, folder / f"{case_id}_flair.nii.gz")
    loaded = load_case(find_cases(tmp_path)[0])
    assert loaded.image[0, SHAPE[0] - 2, SHAPE[1] - 3, 3] == 7


def test_to_original_grid_checks_the_shape(tmp_path):
    write_brats_case(tmp_path, "brats2021", "BraTS2021_00000", affine=_permuted_affine())
    loaded = load_case(find_cases(tmp_path)[0])
    with pytest.raises(ValueError, match="RAS grid"):
        to_original_grid(np.zeros(SHAPE, dtype=np.uint8), loaded)


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: every one is a DataError naming the file


@pytest.fixture
def case_folder(tmp_path) -> Path:
    return write_brats_case(tmp_path, "brats2021", "BraTS2021_00000")


def _only_case(folder: Path) -> VolumeCase:
    (case,) = find_cases(folder.parent)
    return case


def test_missing_modality(case_folder):
    (case_folder / "BraTS2021_00000_t1.nii.gz").unlink()
    case = _only_case(case_folder)
    check_case(case, ("flair",))  # not requested: fine
    with pytest.raises(DataError, match=r"no t1 image.*BraTS2021_00000_t1\.nii\.gz"):
        check_case(case, ("flair", "t1"))
    with pytest.raises(DataError, match=r"BraTS2021_00000_t1\.nii\.gz"):
        load_case(case, ("t1",))


def test_file_deleted_after_discovery(case_folder):
    case = _only_case(case_folder)
    (case_folder / "BraTS2021_00000_seg.nii.gz").unlink()
    with pytest.raises(DataError, match=r"BraTS2021_00000_seg\.nii\.gz does not exist"):
        check_case(case, ("flair",))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_garbage_bytes(tmp_path, ext):
    folder = write_brats_case(tmp_path, "brats2021", "BraTS2021_00000", ext=ext)
    (folder / f"BraTS2021_00000_t2{ext}").write_bytes(b"this is not a NIfTI file" * 40)
    case = _only_case(folder)
    with pytest.raises(DataError, match=rf"BraTS2021_00000_t2{ext}.*not a readable NIfTI"):
        check_case(case, ("t2",))
    with pytest.raises(DataError, match=rf"BraTS2021_00000_t2{ext}"):
        load_case(case, ("t2",))


@pytest.mark.parametrize("ext", [".nii.gz", ".nii"])
def test_truncated_file(tmp_path, ext):
    folder = write_brats_case(tmp_path, "brats2021", "BraTS2021_00000", ext=ext)
    path = folder / f"BraTS2021_00000_flair{ext}"
    # Random data so the gzip stream is long enough to cut inside the voxel data, past the header.
    noise = np.random.default_rng(0).integers(1, 1000, SHAPE).astype(np.int16)
    save(noise, path)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * 0.7)])
    case = _only_case(folder)
    with pytest.raises(DataError, match=rf"BraTS2021_00000_flair{ext} is truncated"):
        check_case(case, ("flair",))
    with pytest.raises(DataError, match=rf"BraTS2021_00000_flair{ext}"):
        load_case(case, ("flair",))


def test_image_and_seg_shape_mismatch(case_folder):
    save(np.zeros((32, 32, 11), dtype=np.uint8), case_folder / "BraTS2021_00000_seg.nii.gz")
    case = _only_case(case_folder)
    with pytest.raises(DataError, match=r"BraTS2021_00000_seg\.nii\.gz has spatial shape \(32, 32, 11\)"):
        check_case(case, ("flair",))
    with pytest.raises(DataError, match=r"BraTS2021_00000_seg\.nii\.gz"):
        load_case(case, ("flair",))


def test_affine_mismatch(case_folder):
    shifted = LPS.copy()
    shifted[0, 3] = 1.0
    save(brain().astype(np.int16), case_folder / "BraTS2021_00000_t1.nii.gz", shifted)
    case = _only_case(case_folder)
    check_case(case, ("flair", "t2"))
    with pytest.raises(DataError, match=r"BraTS2021_00000_t1\.nii\.gz has affine"):
        check_case(case, ("flair", "t1"))
    # Differences below the tolerance (rounding in other tools) are fine.
    nearly = LPS.copy()
    nearly[0, 3] = 1e-4
    save(brain().astype(np.int16), case_folder / "BraTS2021_00000_t1.nii.gz", nearly)
    check_case(case, ("flair", "t1"))


def test_2d_and_wrong_dimensional_files(case_folder):
    save(np.ones((32, 32), dtype=np.int16), case_folder / "BraTS2021_00000_flair.nii.gz")
    save(np.ones((32, 32, 12, 2), dtype=np.int16), case_folder / "BraTS2021_00000_t1.nii.gz")
    save(np.ones((32, 32, 1), dtype=np.int16), case_folder / "BraTS2021_00000_t2.nii.gz")
    case = _only_case(case_folder)
    with pytest.raises(DataError, match=r"BraTS2021_00000_flair\.nii\.gz is 2D"):
        check_case(case, ("flair",))
    with pytest.raises(DataError, match=r"BraTS2021_00000_t1\.nii\.gz has shape \(32, 32, 12, 2\); expected a 3D"):
        check_case(case, ("t1",))
    with pytest.raises(DataError, match=r"BraTS2021_00000_t2\.nii\.gz is 2D"):
        load_case(case, ("t2",))


def test_nan_intensities(case_folder):
    flair = brain().astype(np.float32)
    flair[3, 3, 3] = np.nan
    save(flair, case_folder / "BraTS2021_00000_flair.nii.gz")
    case = _only_case(case_folder)
    load_case(case, ("t1",))
    with pytest.raises(DataError, match=r"BraTS2021_00000_flair\.nii\.gz holds NaN"):
        load_case(case, ("t1", "flair"))


def test_msd_wrong_channel_count(tmp_path):
    write_msd(tmp_path, channels=3)
    case = find_cases(tmp_path)[0]
    with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz has shape \(32, 32, 12, 3\); expected a 4D volume with 4"):
        check_case(case, ("flair",))
    with pytest.raises(DataError, match=r"BRATS_001\.nii\.gz"):
        load_case(case, ("flair",))


def test_msd_listed_file_missing(tmp_path):
    write_msd(tmp_path)
    (tmp_path / "Task01_BrainTumour" / "labelsTr" / "BRATS_002.nii.gz").unlink()
    case = find_cases(tmp_path)[1]
    with pytest.raises(DataError, match=r"labelsTr/BRATS_002\.nii\.gz does not exist"):
        check_case(case, ("flair",))


def test_unknown_modality_name_is_a_programming_error(case_folder):
    with pytest.raises(ValueError, match="modalities"):
        check_case(_only_case(case_folder), ("dwi",))


# ----------------------------------------------------------------------------------------------------------------------
# The project's synthetic-data generator writes every layout exactly as the readers expect


@pytest.mark.filterwarnings("ignore:case folder .*W39_1998.09.19_Segm.nii:UserWarning")  # mimics BraTS 2020 case 355
@pytest.mark.parametrize("layout", LAYOUTS)
def test_synthetic_generator_output_is_read(tmp_path, layout):
    script = REPO_ROOT / "scripts" / "make_synthetic_data.py"
    assert script.is_file(), f"{script} is missing"
    subprocess.run(
        [sys.executable, str(script), "--out", str(tmp_path), "--small", "--brats-layout", layout],
        check=True,
        cwd=REPO_ROOT,
        capture_output=True,
        timeout=300,
    )
    root = tmp_path / "brats"
    assert detect_layout(root) == layout
    cases = find_cases(root)
    assert cases
    labelled = [c for c in cases if c.seg_file is not None]
    assert labelled
    for case in cases:
        check_case(case, MODALITIES)
    loaded = load_case(labelled[0], MODALITIES)
    assert loaded.image.shape[0] == 4 and loaded.image.shape[1:] == loaded.mask.shape
    assert nib.aff2axcodes(loaded.affine) == ("R", "A", "S")
    assert loaded.mask.any()
    # Tumour lies inside the brain (skull-stripped data: background exactly 0).
    assert np.all(np.any(loaded.image != 0, axis=0)[loaded.mask > 0])
