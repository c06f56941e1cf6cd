"""Tests of scripts/make_synthetic_data.py: they run the real command line on the --small preset."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "make_synthetic_data.py"
SMALL_SHAPE = (96, 96, 40)
BRATS_AFFINE = np.array([[-1.0, 0, 0, 0], [0, -1.0, 0, 239.0], [0, 0, 1.0, 0], [0, 0, 0, 1.0]])
CLASSES = ("glioma", "meningioma", "notumor", "pituitary")
# The smallest useful run: one case, two images per class.
TINY = ("--small", "--brats-cases", "1", "--kaggle-per-class", "2", "--shape", "32", "32", "24")
KAGGLE_RICH = ("--kaggle-per-class", "20")
KAGGLE_NAME = re.compile(r"^(Tr|Te)-(gl|me|no|pi)(Tr)?_(\d{4})\.jpg$")


def run_cli(*args: str | Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the generator as a user would."""
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True, cwd=REPO_ROOT, timeout=300
    )
    if check and result.returncode != 0:
        raise AssertionError(f"generator failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def file_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def load_manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory):
    """Generate each layout at most once per module (the brats2021 run also carries the Kaggle checks)."""
    runs: dict[str, Path] = {}

    def get(layout: str) -> Path:
        if layout not in runs:
            out = tmp_path_factory.mktemp(layout) / "synthetic"
            # The brats2021 run carries the Kaggle checks: enough images for lesion statistics.
            extra = KAGGLE_RICH if layout == "brats2021" else ("--kaggle-per-class", "2")
            run_cli("--out", out, "--small", "--seed", "7", "--brats-layout", layout, *extra)
            runs[layout] = out
        return runs[layout]

    return get


# ------------------------------------------------------------------------------------------------------------------
# Command line behaviour
# ------------------------------------------------------------------------------------------------------------------
def test_help_documents_every_option():
    result = run_cli("--help")
    for option in ("--out", "--seed", "--brats-cases", "--kaggle-per-class", "--brats-layout", "--shape"):
        assert option in result.stdout
    for option in ("--kaggle-size-min", "--kaggle-size-max", "--small", "--duplicates", "--force"):
        assert option in result.stdout
    assert "brats2021" in result.stdout and "msd" in result.stdout


def test_prints_location_and_next_command(generated):
    out = generated("brats2021")
    manifest = load_manifest(out)
    assert manifest["generator"] == "make_synthetic_data"
    assert manifest["seed"] == 7
    assert manifest["options"]["small"] is True
    assert manifest["options"]["shape"] == list(SMALL_SHAPE)
    # A second, tiny run to see the message (the fixture's output is not kept).
    tiny = out.parent / "tiny"
    result = run_cli("--out", tiny, *TINY, "--duplicates", "0")
    assert f"--brats {tiny / 'brats'} --kaggle {tiny / 'kaggle'} --out data/prepared" in result.stdout
    assert "python scripts/prepare_data.py" in result.stdout
    # Explicit options override the --small preset.
    manifest = load_manifest(tiny)
    assert manifest["options"]["shape"] == [32, 32, 24]
    assert len(manifest["brats"]["cases"]) == 1
    assert nib.load(tiny / manifest["brats"]["cases"][0]["files"]["flair"]).shape == (32, 32, 24)
    assert manifest["duplicates"] == []
    assert all(r["duplicate_of"] is None for r in manifest["kaggle"]["images"])


def test_refuses_non_empty_output_without_force(tmp_path):
    out = tmp_path / "data"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    tiny = TINY

    refused = run_cli("--out", out, *tiny, check=False)
    assert refused.returncode != 0
    assert "--force" in refused.stderr
    # Even with --force, files the generator did not write are never deleted.
    refused = run_cli("--out", out, *tiny, "--force", check=False)
    assert refused.returncode != 0
    assert (out / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    generated_dir = tmp_path / "generated"
    run_cli("--out", generated_dir, *tiny, "--seed", "1")
    assert run_cli("--out", generated_dir, *tiny, "--seed", "2", check=False).returncode != 0
    assert load_manifest(generated_dir)["seed"] == 1
    run_cli("--out", generated_dir, *tiny, "--seed", "2", "--force")
    assert load_manifest(generated_dir)["seed"] == 2
    assert sorted(p.name for p in generated_dir.iterdir()) == ["brats", "kaggle", "manifest.json"]
    # No staging folder is left behind next to the output.
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_interrupted_run_leaves_no_output(tmp_path):
    out = tmp_path / "interrupted"
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--out", str(out), "--small", "--brats-cases", "12", "--workers", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
        # A shell ignores SIGINT in what it starts in the background, and Python then keeps it ignored: give the
        # run the Ctrl-C a user's terminal would deliver, wherever the tests themselves were started.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 60
    staging = []
    while time.monotonic() < deadline and process.poll() is None and not staging:
        staging = list(tmp_path.glob(".interrupted.partial-*"))
        time.sleep(0.02)
    if process.poll() is not None:
        pytest.skip("the run finished before it could be interrupted")
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    process.communicate(timeout=60)
    assert process.returncode != 0
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------------------------------
# BraTS layouts
# ------------------------------------------------------------------------------------------------------------------
def _check_volume_geometry(path: Path, affine: np.ndarray, shape: tuple[int, ...]) -> nib.Nifti1Image:
    image = nib.load(path)
    assert image.shape == shape, path
    assert np.allclose(image.affine, affine), path
    assert np.allclose(image.header.get_qform(), affine) and int(image.header["qform_code"]) == 1
    assert np.allclose(image.header.get_sform(), affine) and int(image.header["sform_code"]) == 1
    assert image.header.get_zooms()[:3] == (1.0, 1.0, 1.0)
    return image


def _check_anatomy(images: list[np.ndarray], seg: np.ndarray, expected_labels: set[int]) -> None:
    """Skull-stripped brain (background exactly 0, same mask in every modality), labels inside the brain."""
    brain = images[0] > 0
    for image in images:
        assert np.array_equal(image > 0, brain), "modalities disagree on the brain mask"
        assert image.min() == 0
        assert image[brain].min() >= 1
    assert brain.mean() > 0.08
    assert not brain[0].any() and not brain[-1].any() and not brain[:, 0].any() and not brain[:, -1].any()
    assert set(np.unique(seg).tolist()) <= expected_labels
    assert not np.any(seg[~brain]), "tumour labels outside the brain"
    brain_slices = brain.any(axis=(0, 1))
    tumour_slices = (seg > 0).any(axis=(0, 1))
    assert tumour_slices.any()
    assert (brain_slices & ~tumour_slices).sum() >= 4, "need tumour-free brain slices"
    z_brain = np.nonzero(brain_slices)[0]
    assert not tumour_slices[z_brain[0]] and not tumour_slices[z_brain[-1]], "top and bottom slices are tumour-free"


def test_brats2021_layout(generated):
    out = generated("brats2021")
    manifest = load_manifest(out)
    cases = manifest["brats"]["cases"]
    assert len(cases) == 4
    ids = sorted(p.name for p in (out / "brats").iterdir())
    assert ids == sorted(c["id"] for c in cases)
    assert ids[0] == "BraTS2021_00000" and all(re.fullmatch(r"BraTS2021_\d{5}", i) for i in ids)
    labels_seen: set[int] = set()
    intensity_max = {}
    for case in cases:
        case_dir = out / "brats" / case["id"]
        names = sorted(p.name for p in case_dir.iterdir())
        assert names == sorted(f"{case['id']}_{m}.nii.gz" for m in ("flair", "t1", "t1ce", "t2", "seg"))
        images = []
        for modality in ("flair", "t1", "t1ce", "t2"):
            image = _check_volume_geometry(case_dir / f"{case['id']}_{modality}.nii.gz", BRATS_AFFINE, SMALL_SHAPE)
            assert image.get_data_dtype() == np.int16
            data = np.asanyarray(image.dataobj)
            assert data.dtype == np.int16
            images.append(data)
            intensity_max.setdefault(modality, []).append(int(data.max()))
        seg_image = _check_volume_geometry(case_dir / f"{case['id']}_seg.nii.gz", BRATS_AFFINE, SMALL_SHAPE)
        seg = np.asanyarray(seg_image.dataobj)
        assert seg.dtype in (np.uint8, np.int16)
        _check_anatomy(images, seg, {0, 1, 2, 4})
        labels_seen |= set(np.unique(seg).tolist())
        assert case["tumour_voxels"] == int((seg > 0).sum())
        assert sum(case["label_voxels"].values()) == case["tumour_voxels"]
        centre = np.array(np.nonzero(seg)).mean(axis=1)
        assert np.allclose(centre, case["tumour_centre"], atol=0.1)
    assert labels_seen == {0, 1, 2, 4}
    # Raw scanner-like scales: not normalised, different per modality.
    assert all(v > 100 for values in intensity_max.values() for v in values)
    assert np.median(intensity_max["flair"]) < np.median(intensity_max["t1"])
    assert any(c["small"] for c in cases) and any(c["edge"] for c in cases)
    small = [c["tumour_voxels"] for c in cases if c["small"]]
    large = [c["tumour_voxels"] for c in cases if not c["small"]]
    assert max(small) < min(large)


def test_brats2020_layout_with_misnamed_segmentation(generated):
    out = generated("brats2020")
    reference = load_manifest(generated("brats2021"))["brats"]["cases"]
    ids = sorted(p.name for p in (out / "brats").iterdir())
    assert ids == [f"BraTS20_Training_{i:03d}" for i in range(1, 5)]
    for i, case_id in enumerate(ids):
        names = sorted(p.name for p in (out / "brats" / case_id).iterdir())
        seg_name = "W39_1998.09.19_Segm.nii" if i == len(ids) - 1 else f"{case_id}_seg.nii"
        assert names == sorted([*(f"{case_id}_{m}.nii" for m in ("flair", "t1", "t1ce", "t2")), seg_name])
        flair_path = out / "brats" / case_id / f"{case_id}_flair.nii"
        assert int.from_bytes(flair_path.read_bytes()[:4], "little") == 348, "uncompressed NIfTI-1"
        flair = _check_volume_geometry(flair_path, BRATS_AFFINE, SMALL_SHAPE)
        seg = np.asanyarray(nib.load(out / "brats" / case_id / seg_name).dataobj)
        # Same seed, same anatomy as the brats2021 layout (float32 here, int16 there).
        ref_flair = nib.load(generated("brats2021") / reference[i]["files"]["flair"]).get_fdata()
        assert np.array_equal(flair.get_fdata(), ref_flair)
        ref_seg = np.asanyarray(nib.load(generated("brats2021") / reference[i]["files"]["seg"]).dataobj)
        assert np.array_equal(seg, ref_seg)


def test_brats2023_layout(generated):
    out = generated("brats2023")
    reference_dir = generated("brats2021")
    reference = load_manifest(reference_dir)["brats"]["cases"]
    cases = load_manifest(out)["brats"]["cases"]
    ids = sorted(p.name for p in (out / "brats").iterdir())
    assert all(re.fullmatch(r"BraTS-GLI-\d{5}-000", i) for i in ids) and len(ids) == 4
    labels_seen: set[int] = set()
    for case, ref in zip(cases, reference, strict=True):
        case_dir = out / "brats" / case["id"]
        names = sorted(p.name for p in case_dir.iterdir())
        assert names == sorted(f"{case['id']}-{s}.nii.gz" for s in ("t1n", "t1c", "t2w", "t2f", "seg"))
        paths = [case_dir / f"{case['id']}-{s}.nii.gz" for s in ("t2f", "t1n", "t1c", "t2w")]
        images = [np.asanyarray(_check_volume_geometry(p, BRATS_AFFINE, SMALL_SHAPE).dataobj) for p in paths]
        seg = np.asanyarray(nib.load(case_dir / f"{case['id']}-seg.nii.gz").dataobj)
        _check_anatomy(images, seg, {0, 1, 2, 3})
        labels_seen |= set(np.unique(seg).tolist())
        # t2f is FLAIR and enhancing tumour moved from label 4 to label 3.
        ref_seg = np.asanyarray(nib.load(reference_dir / ref["files"]["seg"]).dataobj)
        assert np.array_equal(images[0], np.asanyarray(nib.load(reference_dir / ref["files"]["flair"]).dataobj))
        assert np.array_equal(seg == 3, ref_seg == 4) and np.array_equal(seg == 1, ref_seg == 1)
    assert labels_seen == {0, 1, 2, 3}


def test_msd_layout(generated):
    out = generated("msd")
    reference_dir = generated("brats2021")
    reference = load_manifest(reference_dir)["brats"]["cases"]
    task = out / "brats" / "Task01_BrainTumour"
    assert sorted(p.name for p in (out / "brats").iterdir()) == ["Task01_BrainTumour"]
    dataset = json.loads((task / "dataset.json").read_text())
    assert dataset["modality"] == {"0": "FLAIR", "1": "T1w", "2": "t1gd", "3": "T2w"}
    assert dataset["labels"] == {"0": "background", "1": "edema", "2": "non-enhancing tumor", "3": "enhancing tumour"}
    assert dataset["numTraining"] == 4 and dataset["numTest"] == 2
    assert dataset["training"][0] == {"image": "./imagesTr/BRATS_001.nii.gz", "label": "./labelsTr/BRATS_001.nii.gz"}
    assert dataset["test"] == ["./imagesTs/BRATS_005.nii.gz", "./imagesTs/BRATS_006.nii.gz"]
    for key in ("name", "description", "reference", "licence", "release", "tensorImageSize"):
        assert key in dataset

    for folder, numbers in (("imagesTr", range(1, 5)), ("labelsTr", range(1, 5)), ("imagesTs", range(5, 7))):
        names = sorted(p.name for p in (task / folder).iterdir())
        real = [f"BRATS_{n:03d}.nii.gz" for n in numbers]
        assert names == sorted(real + [f"._{name}" for name in real])
        junk = (task / folder / f"._{real[0]}").read_bytes()
        assert junk[:4] == b"\x00\x05\x16\x07"  # AppleDouble, not NIfTI
    labels_seen: set[int] = set()
    for n, ref in enumerate(reference, start=1):
        image = nib.load(task / "imagesTr" / f"BRATS_{n:03d}.nii.gz")
        assert image.shape == (*SMALL_SHAPE, 4)
        assert image.get_data_dtype() == np.float32
        data = np.asanyarray(image.dataobj)
        seg = np.asanyarray(nib.load(task / "labelsTr" / f"BRATS_{n:03d}.nii.gz").dataobj)
        assert seg.dtype == np.uint8
        _check_anatomy([data[..., c] for c in range(4)], seg, {0, 1, 2, 3})
        labels_seen |= set(np.unique(seg).tolist())
        # Channel 0 is FLAIR; MSD labels: 1 edema (BraTS 2), 2 non-enhancing (BraTS 1), 3 enhancing (BraTS 4).
        ref_flair = np.asanyarray(nib.load(reference_dir / ref["files"]["flair"]).dataobj)
        assert np.array_equal(data[..., 0], ref_flair.astype(np.float32))
        ref_seg = np.asanyarray(nib.load(reference_dir / ref["files"]["seg"]).dataobj)
        for msd_label, brats_label in ((1, 2), (2, 1), (3, 4)):
            assert np.array_equal(seg == msd_label, ref_seg == brats_label)
    assert labels_seen == {0, 1, 2, 3}
    test_image = nib.load(task / "imagesTs" / "BRATS_005.nii.gz")
    assert test_image.shape == (*SMALL_SHAPE, 4)


# ------------------------------------------------------------------------------------------------------------------
# Kaggle-style images
# ------------------------------------------------------------------------------------------------------------------
def test_kaggle_layout_names_modes_and_sizes(generated):
    out = generated("brats2021")
    manifest = load_manifest(out)
    records = {r["path"]: r for r in manifest["kaggle"]["images"]}
    files = sorted(str(p.relative_to(out)) for p in (out / "kaggle").rglob("*") if p.is_file())
    assert files == sorted(records)
    assert sorted(p.name for p in (out / "kaggle").iterdir()) == ["Testing", "Training"]
    modes, sizes = set(), {}
    for split in ("Training", "Testing"):
        assert sorted(p.name for p in (out / "kaggle" / split).iterdir()) == list(CLASSES)
        for cls in CLASSES:
            names = sorted(p.name for p in (out / "kaggle" / split / cls).iterdir())
            assert len(names) == manifest["kaggle"]["counts_per_class"][split]
            for name in names:
                match = KAGGLE_NAME.match(name)
                assert match, name
                assert match[1] == split[:2] and match[2] == cls[:2]
                assert (match[3] is not None) == (int(match[4]) < 10), "real names: Tr-glTr_0000..0009, Tr-gl_0010.."
                with Image.open(out / "kaggle" / split / cls / name) as image:
                    assert image.format == "JPEG"
                    record = records[f"kaggle/{split}/{cls}/{name}"]
                    assert record["class"] == cls and record["mode"] == image.mode
                    assert list(image.size) == record["size"]
                    assert min(image.size) >= 64 and max(image.size) <= 128
                    modes.add(image.mode)
                    if image.mode == "RGB":
                        rgb = np.asarray(image)
                        assert np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 1], rgb[..., 2])
                    sizes.setdefault(cls, []).append(image.size)
    assert modes == {"RGB", "L"}
    assert any(w != h for values in sizes.values() for w, h in values), "some images are not square"
    # Size must not give the class away: fresh images of the same slot share their size across classes...
    fresh = [r for r in manifest["kaggle"]["images"] if r["duplicate_of"] is None]
    by_slot: dict[tuple[str, int], set[tuple[int, int]]] = {}
    for r in fresh:
        by_slot.setdefault((r["split"], r["index"]), set()).add(tuple(r["size"]))
    assert all(len(s) == 1 for s in by_slot.values())
    # ... so per-class size distributions are alike, tumour and no-tumour classes included.
    medians = {cls: np.median([w * h for w, h in values]) for cls, values in sizes.items()}
    assert max(medians.values()) / min(medians.values()) < 1.35
    all_areas = sorted(w * h for values in sizes.values() for w, h in values)
    for cls in ("glioma", "notumor"):
        areas = [w * h for w, h in sizes[cls]]
        assert min(areas) <= np.percentile(all_areas, 25) and max(areas) >= np.percentile(all_areas, 75)


def _lesion_contrast(pixels: np.ndarray, centre: list[float], radius: float) -> float:
    """|mean inside the lesion disc - mean of the ring around it| in units of the head's intensity spread."""
    yy, xx = np.mgrid[0 : pixels.shape[0], 0 : pixels.shape[1]]
    distance = np.hypot(xx - centre[0], yy - centre[1])
    inner = pixels[distance < max(0.7 * radius, 1.5)]
    ring = pixels[(distance > 1.3 * radius + 1) & (distance < 2.0 * radius + 2)]
    return float(abs(inner.mean() - ring.mean()) / (pixels[pixels > 10].std() + 1e-6))


def test_tumour_images_show_a_lesion_that_notumor_images_lack(generated):
    out = generated("brats2021")
    records = load_manifest(out)["kaggle"]["images"]
    fresh = {(r["split"], r["class"], r["index"]): r for r in records if r["duplicate_of"] is None}
    tumour, pairs = [], []
    for (split, cls, index), record in fresh.items():
        if cls == "notumor":
            assert record["lesion"] is None
            continue
        lesion = record["lesion"]
        assert lesion is not None and lesion["radius"] > 1
        x, y = lesion["centre_xy"]
        assert 0 <= x < record["size"][0] and 0 <= y < record["size"][1]
        pixels = np.asarray(Image.open(out / record["path"]).convert("L"), dtype=np.float32)
        tumour.append(_lesion_contrast(pixels, lesion["centre_xy"], lesion["radius"]))
        # The same place in the no-tumour image of the same size slot is the control.
        twin = fresh.get((split, "notumor", index))
        if twin is not None:
            pixels = np.asarray(Image.open(out / twin["path"]).convert("L"), dtype=np.float32)
            pairs.append((tumour[-1], _lesion_contrast(pixels, lesion["centre_xy"], lesion["radius"])))
    assert len(tumour) >= 40 and len(pairs) >= 30
    assert np.median(tumour) > 1.5 * np.median([control for _, control in pairs])
    assert np.mean([lesion > control for lesion, control in pairs]) > 0.6


def test_planted_duplicates(generated):
    out = generated("brats2021")
    manifest = load_manifest(out)
    pairs = manifest["duplicates"]
    records = {r["path"]: r for r in manifest["kaggle"]["images"]}
    kinds = {(p["kind"], p["cross_split"]) for p in pairs}
    assert {("exact", True), ("near", True), ("exact", False)} <= kinds
    for pair in pairs:
        original, duplicate = out / pair["original"], out / pair["duplicate"]
        assert original.is_file() and duplicate.is_file() and original != duplicate
        assert records[pair["duplicate"]]["duplicate_of"] == pair["original"]
        assert records[pair["original"]]["duplicate_of"] is None
        assert records[pair["original"]]["class"] == records[pair["duplicate"]]["class"]
        split_a, split_b = pair["original"].split("/")[1], pair["duplicate"].split("/")[1]
        assert pair["cross_split"] == (split_a != split_b)
        if pair["kind"] == "exact":
            assert original.read_bytes() == duplicate.read_bytes()
        else:
            assert original.read_bytes() != duplicate.read_bytes()
            a = Image.open(original).convert("L")
            b = Image.open(duplicate).convert("L").resize(a.size, Image.Resampling.BILINEAR)
            assert np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() < 12
    # Every byte-identical pair on disk is a planted one (so duplicate checks can trust the manifest).
    by_hash: dict[str, list[str]] = {}
    for path, digest in file_hashes(out / "kaggle").items():
        by_hash.setdefault(digest, []).append(f"kaggle/{path}")
    groups = [sorted(g) for g in by_hash.values() if len(g) > 1]
    planted = [sorted([p["original"], p["duplicate"]]) for p in pairs if p["kind"] == "exact"]
    assert sorted(groups) == sorted(planted)


# ------------------------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------------------------
def test_same_seed_same_bytes_different_seed_different_data(generated, tmp_path):
    first = generated("brats2021")
    again = tmp_path / "again"
    run_cli("--out", again, "--small", "--seed", "7", *KAGGLE_RICH, "--workers", "2")  # workers change no byte
    assert file_hashes(first) == file_hashes(again)

    other = tmp_path / "other"
    run_cli("--out", other, "--small", "--seed", "8", "--kaggle-per-class", "2")
    case = load_manifest(first)["brats"]["cases"][0]["files"]["flair"]
    assert not np.array_equal(
        np.asanyarray(nib.load(first / case).dataobj), np.asanyarray(nib.load(other / case).dataobj)
    )
    first_hashes, other_hashes = file_hashes(first), file_hashes(other)
    shared = [p for p in other_hashes if p.endswith(".jpg") and p in first_hashes]
    assert shared and all(first_hashes[p] != other_hashes[p] for p in shared)
