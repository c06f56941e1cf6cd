"""scripts/prepare_data.py end to end, on data written by scripts/make_synthetic_data.py and on defects planted in it.

The main run and one failing run go through a real subprocess (exit codes, printed output); the other runs call the
CLI's ``main`` in this process, which is the same code without another interpreter start-up.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from types import ModuleType
from typing import Any

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
PREPARE = REPO_ROOT / "scripts" / "prepare_data.py"
SIZE = 64
CLASS4 = {"glioma": 0, "meningioma": 1, "notumor": 2, "pituitary": 3}
BRATS_FIELDS = {"image", "label", "cls", "patient", "subject", "slice", "source"}
KAGGLE_FIELDS = {"image", "cls", "cls4", "group", "source", "original"}
PATIENT_FIELDS = {
    "split",
    "subject",
    "layout",
    "case_dir",
    "original_shape",
    "slices_total",
    "slices_kept",
    "tumour_pixels_kept",
    "tumour_pixels_dropped",
}


def load_cli() -> ModuleType:
    spec = importlib.util.spec_from_file_location("prepare_data_cli", PREPARE)
    module = importlib.util.module_from_spec(spec)
    # Registered first: dataclasses look their module up in sys.modules while the file executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


cli = load_cli()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPARE), *args], capture_output=True, text=True, timeout=300)


def run_main(capsys: pytest.CaptureFixture, *args: str) -> tuple[int, str, str]:
    code = cli.main(["--workers", "1", "--size", str(SIZE), *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def leftovers(out: Path) -> list[Path]:
    """The output folder and any temporary sibling a run could leave behind."""
    return [path for path in out.parent.iterdir() if path.name == out.name or path.name.startswith(f"{out.name}.")]


# ----------------------------------------------------------------------------------------------------------------------
# Data: generated once, then copied and altered per test


@pytest.fixture(scope="module")
def generated(synthetic_small: Path) -> Path:
    """make_synthetic_data.py --small output, shared by the whole test session (conftest.py); only ever copied here."""
    return synthetic_small


def manifest_pairs(generated: Path) -> list[tuple[str, str]]:
    """Planted duplicate pairs from the generator's manifest, as paths relative to the Kaggle root."""
    pairs = []
    for item in read_json(generated / "manifest.json")["duplicates"]:
        pairs.append(tuple(path.removeprefix("kaggle/") for path in (item["original"], item["duplicate"])))
    return pairs


def unplanted(generated: Path) -> list[str]:
    """Training images that take part in no planted duplicate pair."""
    used = {path for pair in manifest_pairs(generated) for path in pair}
    found = sorted(path.relative_to(generated / "kaggle").as_posix() for path in (generated / "kaggle").rglob("*.jpg"))
    return [path for path in found if path.startswith("Training/") and path not in used]


def plant_copies(kaggle: Path, sources: list[str]) -> list[tuple[str, str]]:
    """Add our own duplicates: re-encoded and resized, brightness-shifted, exact across folders, re-saved as PNG."""
    by_class = defaultdict(list)
    for source in sources:
        by_class[source.split("/")[1]].append(source)
    glioma, meningioma, notumor, pituitary = (by_class[name][0] for name in CLASS4)
    planted = []

    image = Image.open(kaggle / glioma)
    smaller = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.Resampling.BICUBIC)
    smaller.save(kaggle / "Testing/glioma/Te-planted_reencoded.jpg", quality=70)
    planted.append((glioma, "Testing/glioma/Te-planted_reencoded.jpg"))

    pixels = np.asarray(Image.open(kaggle / pituitary).convert("L"), dtype=np.int16)
    Image.fromarray(np.clip(pixels + 20, 0, 255).astype(np.uint8)).save(
        kaggle / "Training/pituitary/Tr-planted_bright.jpg", quality=90
    )
    planted.append((pituitary, "Training/pituitary/Tr-planted_bright.jpg"))

    shutil.copy2(kaggle / meningioma, kaggle / "Testing/meningioma/Te-planted_exact.jpg")
    planted.append((meningioma, "Testing/meningioma/Te-planted_exact.jpg"))

    Image.open(kaggle / notumor).save(kaggle / "Training/notumor/Tr-planted_resaved.png")
    planted.append((notumor, "Training/notumor/Tr-planted_resaved.png"))
    return planted


def add_strays(kaggle: Path) -> None:
    (kaggle / "Training/glioma/Thumbs.db").write_bytes(b"\x00" * 32)
    (kaggle / "Testing/notes.txt").write_text("downloaded 2025")
    (kaggle / "Training/glioma/._Tr-glTr_0000.jpg").write_bytes(b"\x00\x05\x16\x07")
    (kaggle / "Training/.DS_Store").write_bytes(b"Bud1")


@pytest.fixture(scope="module")
def inputs(generated: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("inputs")
    kaggle = root / "kaggle"
    shutil.copytree(generated / "kaggle", kaggle)
    planted = plant_copies(kaggle, unplanted(generated))
    add_strays(kaggle)
    return {"brats": generated / "brats", "kaggle": kaggle, "pairs": manifest_pairs(generated) + planted}


@pytest.fixture(scope="module")
def prepared(inputs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("prepared") / "prepared"
    args = ["--brats", str(inputs["brats"]), "--kaggle", str(inputs["kaggle"]), "--out", str(out)]
    result = run_cli(*args, "--size", str(SIZE), "--workers", "2")
    assert result.returncode == 0, result.stderr
    return {"out": out, "stdout": result.stdout, "datalist": read_json(out / "datalist.json")}


def copy_brats(generated: Path, target: Path) -> Path:
    shutil.copytree(generated / "brats", target)
    return target


# ----------------------------------------------------------------------------------------------------------------------
# The prepared folder


def test_datalist_follows_the_contract(prepared: dict[str, Any]) -> None:
    out, datalist = prepared["out"], prepared["datalist"]
    assert list(datalist) == [f"{s}_{p}" for s in ("brats", "kaggle") for p in ("training", "validation", "test")]
    assert all(datalist[key] for key in datalist)
    for key, entries in datalist.items():
        fields = BRATS_FIELDS if key.startswith("brats") else KAGGLE_FIELDS
        for entry in entries:
            assert set(entry) == fields
            assert entry["source"] == key.split("_")[0]
            assert (out / entry["image"]).is_file()
            assert not Path(entry["image"]).is_absolute()
        if key.startswith("brats"):
            order = [(entry["patient"], entry["slice"]) for entry in entries]
        else:
            order = [entry["original"] for entry in entries]
        assert order == sorted(order)


def test_brats_arrays_and_slice_labels_match_the_masks(prepared: dict[str, Any]) -> None:
    out = prepared["out"]
    entries = [
        entry for split in ("training", "validation", "test") for entry in prepared["datalist"][f"brats_{split}"]
    ]
    tumour = 0
    for entry in entries:
        image, mask = np.load(out / entry["image"]), np.load(out / entry["label"])
        assert image.dtype == np.float16 and image.shape == (1, SIZE, SIZE)
        assert mask.dtype == np.uint8 and mask.shape == (1, SIZE, SIZE)
        assert set(np.unique(mask)) <= {0, 1}
        assert entry["cls"] == int(mask.sum() >= 1)
        assert entry["image"] == f"brats/{entry['patient']}/z{entry['slice']:03d}_image.npy"
        tumour += entry["cls"]
    assert 0 < tumour < len(entries)


def test_patients_record_their_split_and_slices(prepared: dict[str, Any], inputs: dict[str, Any]) -> None:
    patients = read_json(prepared["out"] / "patients.json")
    assert sorted(patients) == sorted(path.name for path in inputs["brats"].iterdir() if path.is_dir())
    for patient, record in patients.items():
        assert set(record) == PATIENT_FIELDS
        entries = prepared["datalist"][f"brats_{record['split']}"]
        assert record["slices_kept"] == [entry["slice"] for entry in entries if entry["patient"] == patient]
        assert record["layout"] == "brats2021" and len(record["original_shape"]) == 3
        assert Path(record["case_dir"]).name == patient
        # BraTS 2021 has one scan per person: each case is its own subject.
        assert record["subject"] == patient
        assert {entry["subject"] for entry in entries if entry["patient"] == patient} == {patient}


def test_kaggle_arrays_and_labels(prepared: dict[str, Any]) -> None:
    out = prepared["out"]
    for split in ("training", "validation", "test"):
        for entry in prepared["datalist"][f"kaggle_{split}"]:
            class_name = entry["original"].split("/")[1]
            assert entry["cls4"] == CLASS4[class_name]
            assert entry["cls"] == int(class_name != "notumor")
            assert entry["image"] == "kaggle/" + entry["original"].rsplit(".", 1)[0] + ".npy"
            image = np.load(out / entry["image"])
            assert image.dtype == np.float16 and image.shape == (1, SIZE, SIZE)
    test_folders = {entry["original"].split("/")[0] for entry in prepared["datalist"]["kaggle_test"]}
    assert test_folders == {"Testing"}


def test_only_referenced_arrays_are_written(prepared: dict[str, Any]) -> None:
    out = prepared["out"]
    referenced = {
        entry[field]
        for entries in prepared["datalist"].values()
        for entry in entries
        for field in ("image", "label")
        if field in entry
    }
    written = {path.relative_to(out).as_posix() for path in out.rglob("*.npy")}
    assert written == referenced
    names = sorted(path.name for path in out.iterdir() if path.is_file())
    assert names == ["datalist.json", "duplicates.json", "patients.json", "prepare_options.json", "summary.json"]


def test_summary_is_printed_and_written(prepared: dict[str, Any]) -> None:
    summary = read_json(prepared["out"] / "summary.json")
    assert summary["brats"]["splits"]["training"]["patients"] >= 1
    assert summary["brats"]["subjects"] == summary["brats"]["cases"]
    assert summary["brats"]["subjects_with_several_timepoints"] == 0
    assert summary["kaggle"]["splits"]["test"]["cls4"].keys() == CLASS4.keys()
    assert summary["options"]["size"] == SIZE
    assert {"preflight_s", "brats_s", "kaggle_images_s", "duplicates_s", "total_s"} <= summary["timings_s"].keys()
    stdout = prepared["stdout"]
    for text in ("BraTS (brats2021", "Kaggle (", "duplicate groups", "Next:", "--dataset_dir " + str(prepared["out"])):
        assert text in stdout
    # The suggested command builds the network for the size the slices were prepared at.
    assert SIZE == 64 and stdout.rstrip().endswith(
        f"configs/demo.yaml']\" --bundle_root bundle --dataset_dir {prepared['out']}"
    )


def test_the_suggested_training_command_pairs_the_slice_size_with_its_preset(tmp_path: Path) -> None:
    assert "configs/demo.yaml" in cli.next_command(tmp_path, 64, 1) and "--image_size" not in cli.next_command(
        tmp_path, 64, 1
    )
    assert "configs/full.yaml" in cli.next_command(tmp_path, 256, 1)
    assert cli.next_command(tmp_path, 256, 4).endswith(f"--dataset_dir {tmp_path} --in_channels 4")


# ----------------------------------------------------------------------------------------------------------------------
# Splits: no patient and no duplicate group on two sides


def test_no_patient_or_duplicate_group_crosses_splits(prepared: dict[str, Any]) -> None:
    datalist = prepared["datalist"]
    for source, key in (("brats", "patient"), ("brats", "subject"), ("kaggle", "group")):
        seen: dict[str, str] = {}
        for split in ("training", "validation", "test"):
            for entry in datalist[f"{source}_{split}"]:
                assert seen.setdefault(entry[key], split) == split, f"{entry[key]} in {seen[entry[key]]} and {split}"


def test_planted_duplicates_stay_together_and_distinct_images_apart(
    prepared: dict[str, Any], inputs: dict[str, Any]
) -> None:
    groups = read_json(prepared["out"] / "duplicates.json")
    group_of = {member["original"]: name for name, group in groups.items() for member in group["members"]}
    for a, b in inputs["pairs"]:
        assert a in group_of and group_of[a] == group_of.get(b), f"{a} and {b} not grouped"
        group = groups[group_of[a]]
        kept = [member["original"] for member in group["members"] if member["kept"]]
        if group["split"] == "training":
            assert len(kept) == len(group["members"])
        else:
            assert len(kept) == 1
        if any(path.startswith("Testing/") for path in (a, b)):
            assert group["split"] == "test" and kept[0].startswith("Testing/")
    # No group beyond the planted pairs: distinct images were not merged.
    planted = {frozenset(pair) for pair in inputs["pairs"]}
    assert {frozenset(member["original"] for member in group["members"]) for group in groups.values()} == planted
    listed = {
        entry["original"] for entries in prepared["datalist"].values() for entry in entries if "original" in entry
    }
    for a, b in inputs["pairs"]:
        split = groups[group_of[a]]["split"]
        assert (a in listed) + (b in listed) == (2 if split == "training" else 1)


def test_summary_counts_duplicates_and_skipped_files(prepared: dict[str, Any], inputs: dict[str, Any]) -> None:
    kaggle = read_json(prepared["out"] / "summary.json")["kaggle"]
    duplicates = kaggle["duplicates"]
    crossing = [pair for pair in inputs["pairs"] if {p.split("/")[0] for p in pair} == {"Training", "Testing"}]
    assert duplicates["groups_exact"] + duplicates["groups_near"] == len(inputs["pairs"])
    assert duplicates["groups_crossing_training_testing"] == len(crossing)
    assert duplicates["training_images_moved_to_test"] == len(crossing)
    assert sorted(item["file"] for item in kaggle["skipped_files"]) == [
        "Testing/notes.txt",
        "Training/glioma/Thumbs.db",
    ]
    assert "Training/glioma/Thumbs.db" in prepared["stdout"]
    assert "._Tr" not in prepared["stdout"] and ".DS_Store" not in prepared["stdout"]


def test_split_is_deterministic_for_a_seed(
    prepared: dict[str, Any], inputs: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    sources = ["--brats", str(inputs["brats"]), "--kaggle", str(inputs["kaggle"])]
    assert run_main(capsys, *sources, "--out", str(tmp_path / "same"))[0] == 0
    assert read_json(tmp_path / "same" / "datalist.json") == prepared["datalist"]
    assert run_main(capsys, *sources, "--out", str(tmp_path / "other"), "--seed", "3")[0] == 0
    assert read_json(tmp_path / "other" / "datalist.json") != prepared["datalist"]


# ----------------------------------------------------------------------------------------------------------------------
# Subjects scanned at several timepoints (BraTS 2023 naming: BraTS-GLI-<subject>-<timepoint>)


def add_timepoint(brats: Path, case_id: str, timepoint: int) -> str:
    """Another scan of the subject of ``case_id``: the case's NIfTI files copied under the new case's exact names.

    Only the names tell timepoints apart in the split; the voxels are the generator's, so the case prepares as well
    as the one it copies.
    """
    new_id = f"{case_id.rsplit('-', 1)[0]}-{timepoint:03d}"
    (brats / new_id).mkdir()
    for path in (brats / case_id).iterdir():
        shutil.copy2(path, brats / new_id / path.name.replace(case_id, new_id))
    return new_id


def subjects_of(cases: list[str]) -> dict[str, list[str]]:
    """Subject -> cases, read from the names as the BraTS 2023 convention defines them (not by the code under test)."""
    subjects: dict[str, list[str]] = defaultdict(list)
    for case in sorted(cases):
        subjects[case.rsplit("-", 1)[0]].append(case)
    return dict(subjects)


def torn_subjects(split_of: dict[str, str], subjects: dict[str, list[str]]) -> list[str]:
    """Subjects whose cases lie in more than one split."""
    return [subject for subject, cases in subjects.items() if len({split_of[case] for case in cases}) > 1]


@pytest.fixture(scope="module")
def longitudinal(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Six generated BraTS 2023 subjects, one scanned three times and one twice (nine cases), prepared by the CLI.

    The seed is one for which splitting case by case would put a subject's timepoints in two splits, so the run
    shows the grouping, not luck.
    """
    root = tmp_path_factory.mktemp("longitudinal")
    generator = [sys.executable, str(REPO_ROOT / "scripts" / "make_synthetic_data.py"), "--out", str(root / "data")]
    options = ["--small", "--brats-layout", "brats2023", "--brats-cases", "6", "--kaggle-per-class", "2"]
    made = subprocess.run([*generator, *options], capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr
    brats = root / "data" / "brats"
    first, _, third, *_ = sorted(path.name for path in brats.iterdir())
    added = [add_timepoint(brats, first, 1), add_timepoint(brats, first, 2), add_timepoint(brats, third, 1)]
    cases = sorted(path.name for path in brats.iterdir())
    subjects = subjects_of(cases)
    seed = next(
        seed for seed in range(100) if torn_subjects(cli.dataset_splits.split_patients(cases, seed=seed), subjects)
    )
    out = root / "prepared"
    result = run_cli("--brats", str(brats), "--out", str(out), "--size", "32", "--workers", "2", "--seed", str(seed))
    assert result.returncode == 0, result.stderr
    return {
        "out": out,
        "stdout": result.stdout,
        "cases": cases,
        "added": added,
        "subjects": subjects,
        "seed": seed,
        "datalist": read_json(out / "datalist.json"),
        "patients": read_json(out / "patients.json"),
        "summary": read_json(out / "summary.json"),
    }


def test_every_timepoint_of_a_subject_lands_in_one_split(longitudinal: dict[str, Any]) -> None:
    cases, subjects, patients = longitudinal["cases"], longitudinal["subjects"], longitudinal["patients"]
    assert len(cases) == 9 and sorted(len(group) for group in subjects.values()) == [1, 1, 1, 1, 2, 3]
    assert set(longitudinal["added"]) <= set(patients)
    # Case by case, this seed would have torn a subject apart.
    assert torn_subjects(cli.dataset_splits.split_patients(cases, seed=longitudinal["seed"]), subjects)

    assert sorted(patients) == cases
    assert torn_subjects({case: record["split"] for case, record in patients.items()}, subjects) == []
    for subject, group in subjects.items():
        assert all(patients[case]["subject"] == subject for case in group)
    listed: dict[str, set[str]] = defaultdict(set)
    for split in ("training", "validation", "test"):
        for entry in longitudinal["datalist"][f"brats_{split}"]:
            assert entry["subject"] == entry["patient"].rsplit("-", 1)[0]
            assert patients[entry["patient"]]["split"] == split
            listed[entry["subject"]].add(split)
    assert sorted(listed) == sorted(subjects) and all(len(found) == 1 for found in listed.values())


def test_split_fractions_count_subjects_and_the_summary_says_so(longitudinal: dict[str, Any]) -> None:
    brats = longitudinal["summary"]["brats"]
    counts = {key: brats[key] for key in ("cases", "subjects", "subjects_with_several_timepoints")}
    assert brats["layout"] == "brats2023"
    assert counts == {"cases": 9, "subjects": 6, "subjects_with_several_timepoints": 2}
    # 0.7 / 0.15 / 0.15 of six subjects, however many scans each has.
    by_split = {split: row["subjects"] for split, row in brats["splits"].items()}
    assert by_split == {"training": 4, "validation": 1, "test": 1}
    assert sum(row["patients"] for row in brats["splits"].values()) == 9
    stdout = longitudinal["stdout"]
    assert "9 labelled cases of 6 subjects" in stdout and "subjects with several timepoints: 2" in stdout


def test_the_leakage_check_is_keyed_by_subject(longitudinal: dict[str, Any]) -> None:
    """Moving one timepoint of a subject to another split breaks no case rule, only the subject rule."""
    datalist = {key: list(entries) for key, entries in longitudinal["datalist"].items()}
    cli.check_no_leakage(datalist)
    subject = next(subject for subject, group in longitudinal["subjects"].items() if len(group) == 3)
    case = longitudinal["subjects"][subject][-1]
    split = longitudinal["patients"][case]["split"]
    other = "test" if split != "test" else "training"
    moved = [entry for entry in datalist[f"brats_{split}"] if entry["patient"] == case]
    datalist[f"brats_{split}"] = [entry for entry in datalist[f"brats_{split}"] if entry["patient"] != case]
    datalist[f"brats_{other}"] += moved
    with pytest.raises(cli.dataset_splits.LeakageError, match=f"subject {subject} in "):
        cli.check_no_leakage(datalist)


# ----------------------------------------------------------------------------------------------------------------------
# Bad inputs: every problem named, non-zero exit, nothing written


def break_kaggle(kaggle: Path) -> dict[str, Path]:
    """One of each Kaggle defect; returns the path each error must name."""
    good = next((kaggle / "Training/meningioma").glob("*.jpg"))
    truncated = kaggle / "Training/meningioma/Tr-cut.jpg"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    not_jpeg = kaggle / "Testing/notumor/Te-html.jpg"
    not_jpeg.write_text("<!DOCTYPE html><title>Kaggle - sign in</title>")
    empty = kaggle / "Training/pituitary"
    for path in empty.iterdir():
        path.unlink()
    missing = kaggle / "Testing/glioma"
    shutil.rmtree(missing)
    return {"truncated": truncated, "not_jpeg": not_jpeg, "empty": empty, "missing": missing}


def break_brats(brats: Path) -> dict[str, Path]:
    cases = sorted(path for path in brats.iterdir() if path.is_dir())
    missing = cases[0] / f"{cases[0].name}_flair.nii.gz"
    missing.unlink()
    truncated = cases[1] / f"{cases[1].name}_seg.nii.gz"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    return {"missing_modality": missing, "truncated_nifti": truncated}


def test_all_problems_are_reported_together_by_the_cli(generated: Path, tmp_path: Path) -> None:
    kaggle = tmp_path / "kaggle"
    shutil.copytree(generated / "kaggle", kaggle)
    brats = copy_brats(generated, tmp_path / "brats")
    named = break_kaggle(kaggle) | break_brats(brats)
    out = tmp_path / "out"
    result = run_cli("--brats", str(brats), "--kaggle", str(kaggle), "--out", str(out))
    assert result.returncode != 0
    assert f"{len(named)} problem(s)" in result.stderr and "nothing was written" in result.stderr
    for path in named.values():
        assert str(path.parent if path.name.endswith("flair.nii.gz") else path) in result.stderr
    assert "_flair" in result.stderr
    assert leftovers(out) == []


@pytest.mark.parametrize("defect", ["truncated", "not_jpeg", "empty", "missing"])
def test_each_kaggle_defect_stops_the_run(
    defect: str, generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    kaggle = tmp_path / "kaggle"
    shutil.copytree(generated / "kaggle", kaggle)
    named = break_kaggle(kaggle)
    # Undo every defect but the one under test.
    fresh = tmp_path / "fresh"
    shutil.copytree(generated / "kaggle", fresh)
    for name, path in named.items():
        if name != defect:
            if path.suffix == ".jpg":
                path.unlink()
            else:
                shutil.rmtree(path, ignore_errors=True)
                shutil.copytree(fresh / path.relative_to(kaggle), path)
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "--kaggle", str(kaggle), "--out", str(out))
    assert code != 0 and "1 problem(s)" in err and str(named[defect]) in err
    assert leftovers(out) == []


@pytest.mark.parametrize("defect", ["missing_modality", "truncated_nifti"])
def test_each_brats_defect_stops_the_run(
    defect: str, generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    brats = copy_brats(generated, tmp_path / "brats")
    named = break_brats(brats)
    if defect == "missing_modality":
        shutil.copy2(generated / "brats" / named["truncated_nifti"].relative_to(brats), named["truncated_nifti"])
    else:
        shutil.copy2(generated / "brats" / named["missing_modality"].relative_to(brats), named["missing_modality"])
    out = tmp_path / "out"
    code, _, err = run_main(capsys, "--brats", str(brats), "--out", str(out))
    assert code != 0 and "1 problem(s)" in err
    assert str(named[defect].parent if defect == "missing_modality" else named[defect]) in err
    assert leftovers(out) == []


def test_failure_during_the_build_keeps_the_previous_output(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """Labels outside the BraTS 2021 scheme only show when the volume is read: the half-built folder goes away."""
    brats = copy_brats(generated, tmp_path / "brats")
    out = tmp_path / "out"
    assert run_main(capsys, "--brats", str(brats), "--out", str(out))[0] == 0
    before = (out / "datalist.json").read_bytes()
    seg_path = sorted(brats.glob("*/*_seg.nii.gz"))[0]
    seg = nib.load(seg_path)
    labels = np.asanyarray(seg.dataobj).copy()
    assert (labels == 4).any()
    labels[labels == 4] = 3
    nib.save(nib.Nifti1Image(labels, seg.affine, seg.header), seg_path)
    code, _, err = run_main(capsys, "--brats", str(brats), "--out", str(out))
    assert code != 0 and seg_path.name in err
    assert (out / "datalist.json").read_bytes() == before
    assert leftovers(out) == [out]


def test_output_must_not_overwrite_inputs_or_foreign_folders(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    foreign = tmp_path / "documents"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("keep me")
    code, _, err = run_main(capsys, "--brats", str(generated / "brats"), "--out", str(foreign))
    assert code != 0 and "not written by this script" in err and (foreign / "thesis.tex").exists()
    code, _, err = run_main(capsys, "--brats", str(generated / "brats"), "--out", str(generated))
    assert code != 0 and "outside --brats" in err


# ----------------------------------------------------------------------------------------------------------------------
# Reruns


def test_rerun_is_a_no_op_and_a_changed_option_rebuilds_cleanly(
    generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    args = ["--brats", str(generated / "brats"), "--kaggle", str(generated / "kaggle"), "--out", str(out)]
    assert run_main(capsys, *args)[0] == 0
    stamps = {path: path.stat().st_mtime_ns for path in out.rglob("*")}

    code, stdout, _ = run_main(capsys, *args)
    assert code == 0 and "up to date" in stdout and "Kaggle (" in stdout
    assert {path: path.stat().st_mtime_ns for path in out.rglob("*")} == stamps

    code, stdout, _ = run_main(capsys, *args, "--min-brain-fraction", "0.3")
    assert code == 0 and "up to date" not in stdout
    datalist = read_json(out / "datalist.json")
    referenced = {
        entry[key] for entries in datalist.values() for entry in entries for key in ("image", "label") if key in entry
    }
    written = {path.relative_to(out).as_posix() for path in out.rglob("*.npy")}
    assert written == referenced and len(written) < sum(1 for path in stamps if path.suffix == ".npy")
    assert read_json(out / "prepare_options.json")["options"]["min_brain_fraction"] == 0.3
    assert leftovers(out) == [out]


def test_changed_input_file_rebuilds(generated: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kaggle = tmp_path / "kaggle"
    shutil.copytree(generated / "kaggle", kaggle)
    out = tmp_path / "out"
    assert run_main(capsys, "--kaggle", str(kaggle), "--out", str(out))[0] == 0
    extra = kaggle / "Training/glioma/Tr-new.png"
    buffer = io.BytesIO()
    Image.fromarray(np.full((40, 40), 90, dtype=np.uint8)).save(buffer, format="PNG")
    extra.write_bytes(buffer.getvalue())
    code, stdout, _ = run_main(capsys, "--kaggle", str(kaggle), "--out", str(out))
    assert code == 0 and "up to date" not in stdout
    assert read_json(out / "summary.json")["brats"] is None
    datalist = read_json(out / "datalist.json")
    assert "Training/glioma/Tr-new.png" in {entry.get("original") for entries in datalist.values() for entry in entries}
    assert (out / "kaggle/Training/glioma/Tr-new.npy").is_file()
