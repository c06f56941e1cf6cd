"""Cross-validation (issue 14, point 2): the folds, what a fold trains and validates on, the statistics of the
fold-aware comparison on hand-computed cases, and a tiny K = 2 study through the real launcher."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, EVALUATE, REPO_ROOT, TINY_OVERRIDES, TRAIN, bundle_run, pipeline_run, run_cli
from mlflow.tracking import MlflowClient
from monai.bundle import ConfigParser
from sklearn.metrics import roc_auc_score

from scripts.data.splits import assign_folds, subject_of
from scripts.datasets import fold_entries, load_datalist
from scripts.errors import UsageError
from scripts.stage_checkpoints import StageCheckpoints
from scripts.tracking import artifact_location


def _compare_runs():
    spec = importlib.util.spec_from_file_location("compare_runs_cli", REPO_ROOT / "scripts" / "compare_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _compare_runs()

# ---- the statistics, on cases small enough to work out by hand


def test_t_interval_of_five_values() -> None:
    # mean 3, s = sqrt(2.5), t(0.975, 4) = 2.776445: 3 ± 2.776445 * sqrt(2.5) / sqrt(5) = 3 ± 1.963243
    mean, low, high = compare.t_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and low == pytest.approx(1.036757, abs=1e-6) and high == pytest.approx(4.963243, abs=1e-6)
    # Two folds: t(0.975, 1) = 12.706205, s = 0.1 * sqrt(2): 0.5 ± 12.706205 * 0.1 = [-0.770621, 1.770621]
    assert compare.t_interval([0.4, 0.6])[1:] == pytest.approx((-0.770621, 1.770621), abs=1e-6)
    assert all(math.isnan(bound) for bound in compare.t_interval([0.7])[1:])


def test_auc_is_the_mann_whitney_statistic() -> None:
    # Positives 0.9, 0.4; negatives 0.5, 0.4, 0.1: pairs won 3 + (1 + 0.5 tie) = 4.5 of 6.
    assert compare.roc_auc(np.array([1, 1, 0, 0, 0]), np.array([0.9, 0.4, 0.5, 0.4, 0.1])) == 0.75
    rng = np.random.default_rng(0)
    targets, scores = rng.integers(0, 2, 200), rng.normal(size=200).round(1)  # rounded: many ties
    assert compare.roc_auc(targets, scores) == pytest.approx(roc_auc_score(targets, scores), abs=1e-12)
    assert math.isnan(compare.roc_auc(np.ones(4), np.arange(4.0)))


def test_paired_bootstrap_verdicts_on_clear_cases() -> None:
    rng = np.random.default_rng(1)
    base = rng.uniform(0.5, 0.9, 30)
    # Every unit 0.05 better: every resample's difference is 0.05, so is the interval.
    better = compare.paired_bootstrap(base + 0.05, base)
    assert better["difference"] == pytest.approx(0.05) and better["ci95"] == pytest.approx([0.05, 0.05])
    assert better["verdict"] == "better" and better["units"] == 30
    assert compare.paired_bootstrap(base - 0.05, base)["verdict"] == "worse"
    same = compare.paired_bootstrap(base, base)
    assert same["ci95"] == [0.0, 0.0] and same["verdict"] == "no difference detected"
    # A cost (HD95): lower is better.
    assert compare.paired_bootstrap(base - 1, base, larger_is_better=False)["verdict"] == "better"
    # Differences of +-0.1 in equal numbers: the interval holds 0.
    noisy = compare.paired_bootstrap(base + np.tile([0.1, -0.1], 15), base)
    assert noisy["ci95"][0] < 0 < noisy["ci95"][1] and noisy["verdict"] == "no difference detected"


def test_paired_bootstrap_interval_by_hand() -> None:
    # Two units with differences 0 and 1: a resample's mean is 0, 0.5 or 1 (1/4, 1/2, 1/4), so over 2,000 resamples
    # the 2.5th and 97.5th percentiles are 0 and 1.
    result = compare.paired_bootstrap([0.5, 1.5], [0.5, 0.5])
    assert result["difference"] == 0.5 and result["ci95"] == [0.0, 1.0]
    # Clusters resampled whole: patient A's three slices differ by 0, patient B's one by 4. Resamples are AA (0),
    # AB (mean of 0, 0, 0, 4 = 1) or BB (4): the interval is [0, 4]. Slices resampled alone almost never give 4.
    a, b = [0.0, 0.0, 0.0, 4.0], [0.0] * 4
    assert compare.paired_bootstrap(a, b, clusters=["A", "A", "A", "B"])["ci95"] == [0.0, 4.0]
    assert compare.paired_bootstrap(a, b)["ci95"][1] < 4.0
    # AUC on the same resample: a perfect ranking against an inverted one.
    targets = [0, 0, 0, 1, 1, 1]
    auc = compare.paired_bootstrap([0.1, 0.2, 0.3, 0.7, 0.8, 0.9], [0.9, 0.8, 0.7, 0.3, 0.2, 0.1], "auc", targets)
    assert auc["difference"] == 1.0 and auc["ci95"] == [1.0, 1.0] and auc["verdict"] == "better"
    # Fixed seed: the same interval every time.
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=40), rng.normal(size=40)
    assert compare.paired_bootstrap(x, y)["ci95"] == compare.paired_bootstrap(x, y)["ci95"]


# ---- the folds


def _datalist() -> dict[str, list]:
    """A prepared datalist as scripts/prepare_data.py writes it: BraTS subjects with one to three timepoints (three
    slices each); Kaggle duplicate groups of one to three copies in training (validation keeps one per group)."""
    rng = np.random.default_rng(4)
    lists: dict[str, list] = {f"{source}_{split}": [] for source in ("brats", "kaggle")
                              for split in ("training", "validation", "test")}  # fmt: skip
    for number in range(23):
        split = "test" if number < 4 else "validation" if number < 7 else "training"
        subject = f"BraTS-GLI-{number:05d}"
        for timepoint in range(int(rng.integers(1, 4))):
            case = f"{subject}-{timepoint:03d}"
            lists[f"brats_{split}"] += [
                {"image": f"brats/{case}/z{z:03d}_image.npy", "label": f"brats/{case}/z{z:03d}_label.npy",
                 "cls": int(z > 0), "patient": case, "subject": subject, "slice": z, "source": "brats"}
                for z in range(3)
            ]  # fmt: skip
    for number in range(80):
        cls4 = number % 4
        split = "test" if number < 12 else "validation" if number < 24 else "training"
        copies = 1 if split != "training" else int(rng.integers(1, 4))
        for copy in range(copies):
            name = f"{['glioma', 'meningioma', 'notumor', 'pituitary'][cls4]}/img{number:03d}_{copy}.jpg"
            item = {"image": f"kaggle/{name}.npy", "cls": int(cls4 != 2), "cls4": cls4, "group": f"k{number:05d}"}
            lists[f"kaggle_{split}"].append({**item, "source": "kaggle", "original": name})
    return lists


def _write(folder: Path, datalist: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "datalist.json").write_text(json.dumps(datalist))
    (folder / "prepare_options.json").write_text(json.dumps({"options": {"size": 32, "modalities": ["flair"]}}))
    return folder


def test_every_subject_and_duplicate_group_is_validated_in_exactly_one_fold() -> None:
    datalist, folds = _datalist(), 5
    pooled = {source: datalist[f"{source}_training"] + datalist[f"{source}_validation"] for source in ("brats",
              "kaggle")}  # fmt: skip
    unit = {"brats": lambda item: item["subject"], "kaggle": lambda item: item["group"]}
    for source in ("brats", "kaggle"):
        all_units = {unit[source](item) for item in pooled[source]}
        validated: Counter = Counter()
        for fold in range(folds):
            training = fold_entries(datalist, f"{source}_training", fold, folds)
            validation = fold_entries(datalist, f"{source}_validation", fold, folds)
            seen, trained = {unit[source](i) for i in validation}, {unit[source](i) for i in training}
            assert seen and not seen & trained and seen | trained == all_units, (source, fold)
            validated.update(seen)
            # Training keeps every copy of its units; validation one image per duplicate group.
            assert sorted(map(json.dumps, training)) == sorted(
                json.dumps(item) for item in pooled[source] if unit[source](item) in trained
            )
            if source == "kaggle":
                assert len(validation) == len(seen)
            else:
                assert len(validation) == sum(unit["brats"](item) in seen for item in pooled["brats"])
                # Every timepoint of a subject on one side.
                for item in validation:
                    assert subject_of(item["patient"]) == item["subject"] and item["subject"] not in trained
        assert set(validated) == all_units and set(validated.values()) == {1}, source
        # Sizes: units dealt in turn, so folds differ by at most one unit.
        sizes = Counter(assign_folds({u: 0 for u in all_units}, folds).values())
        assert max(sizes.values()) - min(sizes.values()) <= 1


def test_folds_keep_the_class_balance_and_do_not_depend_on_order() -> None:
    datalist, folds = _datalist(), 4
    counts = [Counter(item["cls4"] for item in fold_entries(datalist, "kaggle_validation", fold, folds))
              for fold in range(folds)]  # fmt: skip
    for cls4 in range(4):  # 17 groups of each class over 4 folds: 4 or 5 in each
        assert {count[cls4] for count in counts} <= {4, 5}, counts
    shuffled = {key: list(reversed(items)) for key, items in datalist.items()}
    for key in ("brats_validation", "kaggle_validation", "kaggle_training"):
        first = {json.dumps(item, sort_keys=True) for item in fold_entries(datalist, key, 1, folds)}
        assert first == {json.dumps(item, sort_keys=True) for item in fold_entries(shuffled, key, 1, folds)}
        assert first != {json.dumps(item, sort_keys=True) for item in fold_entries(datalist, key, 2, folds)}


def test_the_test_split_and_the_prepared_split_stay_as_they_are(tmp_path: Path) -> None:
    datalist = _datalist()
    folder = _write(tmp_path / "prepared", datalist)
    for key in datalist:
        prepared = load_datalist(folder / "datalist.json", key, folder)
        assert [item["image"] for item in prepared] == [str(folder / item["image"]) for item in datalist[key]]
        if key.endswith("_test"):
            assert load_datalist(folder / "datalist.json", key, folder, fold=2, num_folds=5) == prepared


def test_bad_folds_are_refused_naming_the_setting_and_the_datalist(tmp_path: Path) -> None:
    folder = _write(tmp_path / "prepared", _datalist())
    path = folder / "datalist.json"
    with pytest.raises(UsageError, match=r"fold 5 is not one of the 5 folds \(num_folds\) of .*datalist\.json"):
        load_datalist(path, "brats_training", folder, fold=5, num_folds=5)
    with pytest.raises(UsageError, match="num_folds is 1: cross-validation needs at least 2 folds"):
        load_datalist(path, "brats_validation", folder, fold=0, num_folds=1)
    # 19 BraTS subjects in training + validation: 20 folds cannot all validate someone.
    with pytest.raises(UsageError, match=r"holds 19 brats subjects in brats_training \+ brats_validation, fewer"):
        load_datalist(path, "brats_training", folder, fold=0, num_folds=20)


def test_the_launcher_refuses_more_folds_than_subjects_before_training(tmp_path: Path) -> None:
    folder = _write(tmp_path / "prepared", _datalist())
    result = run_cli([sys.executable, "scripts/seed_study.py", "--dataset_dir", str(folder), "--folds", "20", "--out",
                      str(tmp_path / "cv")], check=False)  # fmt: skip
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "holds 19 brats subjects in brats_training + brats_validation, fewer than num_folds (20)" in result.stderr
    assert not (tmp_path / "cv" / "seed_0").exists()


def _parser(config_files: list[str], **overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_meta(str(BUNDLE_ROOT / "configs" / "metadata.json"))
    parser.read_config([str(BUNDLE_ROOT / "configs" / name) for name in config_files])
    parser.update({"bundle_root": str(BUNDLE_ROOT), "cache": "none", **overrides})
    return parser


def test_fold_k_trains_and_validates_on_its_side_and_says_so_in_its_settings(tmp_path: Path) -> None:
    folder = _write(tmp_path / "prepared", _datalist())
    path = folder / "datalist.json"
    train = _parser(["train.yaml"], dataset_dir=str(folder), fold=1, num_folds=3, stage=3)
    sides = {"train#dataset": "brats_training", "train#kaggle_dataset": "kaggle_training",
             "validate#dataset": "brats_validation", "validate#kaggle_dataset": "kaggle_validation"}  # fmt: skip
    for name, key in sides.items():
        assert train.get_parsed_content(name).data == load_datalist(path, key, folder, 1, 3), name
    settings = train.get_parsed_content("settings")
    assert settings["fold"] == 1 and settings["num_folds"] == 3
    # Evaluation on the validation split scores the same fold's validation; the test split is every fold's.
    evaluate = _parser(["train.yaml", "evaluate.yaml"], dataset_dir=str(folder), fold=1, num_folds=3,
                       eval_split="validation")  # fmt: skip
    assert evaluate.get_parsed_content("validate#dataset").data == load_datalist(path, "brats_validation", folder, 1, 3)
    evaluate["eval_split"] = "test"
    assert evaluate.get_parsed_content("validate#kaggle_dataset").data == load_datalist(path, "kaggle_test", folder)
    # No fold: the prepared lists, and settings that say so.
    plain = _parser(["train.yaml"], dataset_dir=str(folder))
    assert plain.get_parsed_content("train#dataset").data == load_datalist(path, "brats_training", folder)
    settings = plain.get_parsed_content("settings")
    assert settings["fold"] is None


def test_a_folds_checkpoints_never_resume_as_another_folds(tmp_path: Path) -> None:
    folder = _write(tmp_path / "prepared", _datalist())
    stages = {"1": {"name": "seg", "tasks": ["seg"], "trainable": ["encoder", "decoder"], "init_from": None,
                    "data": "brats", "epochs": 2}}  # fmt: skip
    settings = {"network": {"image_size": 32, "in_channels": 1}, "stage": stages["1"]}
    stage_dir = tmp_path / "models" / "multitask" / "stage1"

    def checkpoints(fold: int | None) -> StageCheckpoints:
        folds = {} if fold is None else {"fold": fold, "num_folds": 5}
        return StageCheckpoints(str(stage_dir), 1, stages, {**settings, **folds}, str(folder))

    # Checkpoints recorded before folds existed (no fold in their settings) still resume with fold null.
    made = checkpoints(None)
    made.write_record(settings=made.settings, epochs_done=1)
    torch.save({"epoch": 1}, stage_dir / "checkpoint_epoch=1.pt")
    now = StageCheckpoints(str(stage_dir), 1, stages, {**settings, "fold": None, "num_folds": 5}, str(folder))
    assert "resumes after epoch 1" in now.check(dry_run=True)
    # Fold 0's checkpoints: fold 1 stops, naming the difference.
    made = checkpoints(0)
    made.write_record(settings=made.settings)
    with pytest.raises(UsageError, match=r"made with other settings or data \(fold: 0 -> 1\)"):
        checkpoints(1).check(dry_run=True)
    assert "resumes after epoch 1" in checkpoints(0).check(dry_run=True)


# ---- the fold-aware comparison, on a store laid out as a cross-validation leaves it

# Three folds, two patients and four Kaggle images each (out of fold: every unit in one fold).
DICE_GAIN, HD95_LOSS = 0.05, 3.0


def _fold_units(fold: int) -> tuple[list[dict], list[dict]]:
    patients = [{"patient": f"BraTS-{fold}-{i}", "dice": 0.6 + 0.1 * i + 0.02 * fold, "hd95": 10.0 + fold + i}
                for i in range(2)]  # fmt: skip
    images = [{"source": "kaggle", "key": f"k{fold}{i}", "z": "", "cls": i % 2, "cls4": "", "prob": 0.2 + 0.6 * (i % 2)}
              for i in range(4)]  # fmt: skip
    images += [{"source": "brats", "key": p["patient"], "z": z, "cls": z % 2, "cls4": "", "prob": 0.3 + 0.4 * (z % 2)}
               for p in patients for z in range(2)]  # fmt: skip
    return patients, images


def _csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def _log_cross_validation(uri: str, tmp_path: Path) -> None:
    """The multi-task model beats the seg-only one by DICE_GAIN on every patient but has HD95_LOSS mm more; it ranks
    Kaggle images perfectly where the cls-only model inverts them; both give BraTS slices the same probabilities.
    Before them, a run without a fold and a fold 0 that a rerun replaced."""
    client = MlflowClient(uri)
    experiment = client.create_experiment("cross_validation", artifact_location=artifact_location(uri))
    runs = [("multitask", None, 0.1), ("multitask", 0, 0.0)]
    runs += [(variant, fold, None) for fold in range(3) for variant in ("multitask", "baseline_seg", "baseline_cls")]
    for index, (variant, fold, dice) in enumerate(runs):
        tags = {"kind": "pipeline", "variant": variant, **({} if fold is None else {"fold": str(fold)})}
        start = 1_700_000_000_000 + 1000 * index  # in order: "newest" must not depend on the clock's resolution
        run = client.create_run(experiment, start, tags, f"{variant} fold {fold}").info.run_id
        client.log_param(run, "fold", fold)
        patients, images = _fold_units(fold or 0)
        if variant == "baseline_seg":
            patients = [{**p, "dice": p["dice"] - DICE_GAIN, "hd95": p["hd95"] - HD95_LOSS} for p in patients]
        if variant == "baseline_cls":
            images = [{**i, "prob": 1 - i["prob"]} if i["source"] == "kaggle" else i for i in images]
        mean_dice = float(np.mean([p["dice"] for p in patients])) if dice is None else dice
        client.log_metric(run, "validation_brats_patient_dice_mean", mean_dice)
        folder = tmp_path / run
        folder.mkdir(parents=True)
        if variant != "baseline_cls":
            client.log_artifact(run, str(_csv(folder / "per_patient.csv", patients)), "evaluation_validation")
        if variant != "baseline_seg":
            client.log_artifact(run, str(_csv(folder / "per_image.csv", images)), "evaluation_validation")
        client.set_terminated(run)


def test_compare_runs_gives_the_mean_and_ci_over_folds_and_the_paired_verdicts(tmp_path: Path) -> None:
    uri = "sqlite:///" + str(tmp_path / "mlflow.db")
    _log_cross_validation(uri, tmp_path / "files")
    args = [sys.executable, "scripts/compare_runs.py", "--tracking-uri", uri, "--experiment", "cross_validation",
            "--out-dir", str(tmp_path), "--split", "validation"]  # fmt: skip
    result = run_cli([*args, "--folds"])
    table = json.loads((tmp_path / "comparison.json").read_text())
    assert table["folds"]["multitask"] == ["0", "1", "2"] and len(table["runs"]["baseline_seg"]) == 3
    # Fold means of the multi-task Dice: 0.65, 0.67, 0.69 (the replaced fold 0 run and the fold-less run left out).
    # mean 0.67, s = 0.02, t(0.975, 2) = 4.302653: 0.67 ± 0.049683
    dice = table["models"]["multitask"]
    assert dice["validation_brats_patient_dice_mean"] == pytest.approx(0.67)
    assert dice["validation_brats_patient_dice_mean_ci95"] == pytest.approx([0.620317, 0.719683], abs=1e-6)
    row = next(line for line in result.stdout.splitlines() if line.startswith("multitask"))
    assert "0.670 ±0.050" in row and "mean ±95% CI (t, K-1 dof) over K = 3 folds" in result.stdout
    verdicts = {(item["baseline"], item["metric"]): item for item in table["paired"]}
    dice_gain = verdicts[("baseline_seg", "patient Dice")]
    assert dice_gain["units"] == 6 and dice_gain["verdict"] == "better"
    assert dice_gain["difference"] == pytest.approx(DICE_GAIN) and dice_gain["ci95"] == pytest.approx([0.05, 0.05])
    hd95 = verdicts[("baseline_seg", "HD95 mm")]
    assert hd95["difference"] == pytest.approx(HD95_LOSS) and hd95["verdict"] == "worse"
    kaggle = verdicts[("baseline_cls", "Kaggle AUC")]
    assert kaggle["units"] == 12 and kaggle["difference"] == 1.0 and kaggle["verdict"] == "better"
    brats = verdicts[("baseline_cls", "BraTS AUC")]
    assert brats["units"] == 12 and brats["clusters"] == 6 and brats["verdict"] == "no difference detected"
    lines = result.stdout.splitlines()
    assert any("patient Dice" in line and "+0.050 [+0.050, +0.050]" in line and "better" in line for line in lines)
    assert any("BraTS AUC" in line and "12 units of 6 subjects" in line for line in lines)

    # The newest run of every model carries a fold: fold-aware without --folds too.
    run_cli(args)
    assert json.loads((tmp_path / "comparison.json").read_text())["models"] == table["models"]


# ---- through the real command lines


def test_a_fold_trains_scores_and_tracks_its_own_side(prepared_small: Path, tmp_path: Path) -> None:
    """The seg-only baseline (one stage: the cheapest pipeline) on fold 1 of 2, scored on that fold's validation."""
    uri = "sqlite:///" + str(tmp_path / "mlruns" / "mlflow.db")
    common = ["--dataset_dir", str(prepared_small), "--ckpt_dir", str(tmp_path / "models"), "--output_dir",
              str(tmp_path / "eval"), "--tracking_uri", uri, *TINY_OVERRIDES]  # fmt: skip
    configs = [TRAIN, "configs/demo.yaml", "configs/baseline_seg.yaml"]
    pipeline_run(configs, *common, "--fold", "1", "--num_folds", "2")
    bundle_run([*configs[:1], EVALUATE, *configs[1:]], *common, "--fold", "1", "--num_folds", "2", "--eval_split",
               "validation")  # fmt: skip
    path = prepared_small / "datalist.json"
    validation = {item["patient"] for item in load_datalist(path, "brats_validation", prepared_small, 1, 2)}
    with (tmp_path / "eval" / "baseline_seg" / "per_patient.csv").open(newline="") as handle:
        assert {row["patient"] for row in csv.DictReader(handle)} == validation
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("brain_tumour_multitask").experiment_id
    (run,) = client.search_runs([experiment], filter_string="tags.kind = 'pipeline'")
    assert run.data.tags["fold"] == "1" and run.data.params["fold"] == "1" and run.data.params["num_folds"] == "2"
    assert "validation_brats_patient_dice_mean" in run.data.metrics
    logged = {item.path for item in client.list_artifacts(run.info.run_id, "evaluation_validation")}
    assert {"evaluation_validation/per_patient.csv", "evaluation_validation/per_image.csv"} <= logged
    # The same checkpoints asked to train fold 0: refused before anything is read, naming the fold.
    other = pipeline_run(configs, *common, "--fold", "0", "--num_folds", "2", check=False)
    assert other.returncode == 1 and "Stage 1 cannot resume" in other.stderr and "fold: 1 -> 0" in other.stderr
