"""scripts/benchmark.py at a tiny size: a real run from the command line, its JSON keys and sane values.

No timing thresholds: the figures depend on the machine and its load; only their consistency is checked.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from conftest import REPO_ROOT, TINY_SIZE, run_cli

from scripts.networks import create_multi_task_model

BACKENDS = ("eager", "eager_channels_last", "torchscript", "torchscript_frozen")
TINY = ["--set", "base_filters=8", "--set", "depth=3", "--set", f"image_size={TINY_SIZE}", "--slice-rounds", "2",
        "--volume-rounds", "1"]  # fmt: skip


@pytest.fixture(scope="module")
def figures(prepared_small: Path, synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("benchmark")
    out = work / "figures.json"
    result = run_cli(
        [sys.executable, "scripts/benchmark.py", "--preset", "demo", "--dataset-dir", str(prepared_small),
         "--volume", str(synthetic_small / "brats"), "--work-dir", str(work / "work"), "--out", str(out), *TINY,
         "--batch-size", "4", "--steps", "2", "--warmup", "1", "--rounds", "1", "--no-thread-study"]
    )  # fmt: skip
    assert "multi-task / seg-only step time" in result.stdout, "the table is printed"
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def full_inference(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """``--preset full --only inference``, the network made tiny and its weights from a checkpoint; eager alone beside
    the fast path. Called in this process (its phase still runs in a child of its own): the parent's start-up would
    only add seconds."""
    work = tmp_path_factory.mktemp("benchmark_full")
    out, checkpoint = work / "figures.json", work / "model.pt"
    torch.save(create_multi_task_model(base_filters=8, depth=3, num_domains=2).state_dict(), checkpoint)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _benchmark_module().main(
            ["--preset", "full", "--only", "inference", "--backends", "eager", "--checkpoint", str(checkpoint),
             "--volume", str(synthetic_small / "brats"), "--work-dir", str(work / "work"), "--out", str(out), *TINY]
        )  # fmt: skip
    assert "fast / eager fp32 volume time" in printed.getvalue() and "training:" not in printed.getvalue()
    return json.loads(out.read_text())


def test_training_figures_are_positive_and_ratios_are_their_quotients(figures: dict) -> None:
    training = figures["training"]
    for name in ("multitask", "seg_only", "multitask_other_layout", "real_loading", "compute_only"):
        assert training[f"{name}_images_per_s"] > 0
    # train.yaml trains channels_last: the other trainer is the NCHW one the ratio divides by.
    assert training["channels_last_configured"] is True
    assert training["multitask_channels_last_step_s"] == pytest.approx(training["multitask_step_s"])
    assert training["multitask_channels_last_step_s_over_multitask_contiguous_step_s"] == pytest.approx(
        training["multitask_step_s"] / training["multitask_contiguous_step_s"]
    )
    assert training["batch_size"] == 4
    assert training["multitask_step_s"] == pytest.approx(4 / training["multitask_images_per_s"])
    assert training["multitask_step_s_over_seg_only_step_s"] == pytest.approx(
        training["multitask_step_s"] / training["seg_only_step_s"]
    )
    assert training["real_loading_images_per_s_over_compute_only_images_per_s"] == pytest.approx(
        training["real_loading_images_per_s"] / training["compute_only_images_per_s"]
    )
    assert training["multitask_gflop_per_image"] > 0
    # With one round, the median of the rounds' ratios is that round's.
    assert training["real_loading_over_compute_only_median_of_rounds"] == pytest.approx(
        training["real_loading_images_per_s_over_compute_only_images_per_s"]
    )
    # The data path's own cost: the loader alone against the computation.
    assert training["loader_alone_images_per_s"] > 0
    assert training["data_path_share_of_training_time"] == pytest.approx(
        training["compute_only_images_per_s"]
        / (training["compute_only_images_per_s"] + training["loader_alone_images_per_s"])
    )
    assert training["augmentation_share_of_multitask_step"] == pytest.approx(
        1 - (4 / training["multitask_no_augmentation_images_per_s"]) / training["multitask_step_s"]
    )


def test_data_figures(figures: dict) -> None:
    data = figures["data"]
    assert data["cache"] == "memory"
    assert data["cached_images_per_s"] > 0 and data["uncached_images_per_s"] > 0
    assert data["cached_images_per_s_over_uncached_images_per_s"] == pytest.approx(
        data["cached_images_per_s"] / data["uncached_images_per_s"]
    )


def test_inference_backends_agree_and_ratios_are_their_quotients(figures: dict) -> None:
    inference = figures["inference"]
    assert set(BACKENDS) <= set(inference["backends"])
    assert inference["volume_shape"] == [96, 96, 40]  # the generator's --small volumes
    assert 0 < inference["slices_analysed"] <= 40
    for name in inference["backends"]:
        assert inference[f"{name}_slice_s"] > 0
        assert inference[f"{name}_volume_s"] > inference[f"{name}_volume_network_s"] > 0
        if name != "eager":
            assert inference[f"{name}_volume_s_over_eager_volume_s"] == pytest.approx(
                inference[f"{name}_volume_s"] / inference["eager_volume_s"]
            )
            assert inference["agreement"][name]["agree"] is True
            assert inference["agreement"][name]["mask_equal_fraction"] > 0.99
    assert figures["targets"]["outputs_agree"] is True
    assert_fast_path_figures(inference)
    # configs/demo.yaml runs the fast path in float32: nothing else to time beside it.
    assert inference["fast_int8"] is False and "fast_float32_volume_s" not in inference
    # Random weights: their masks say nothing about the fast path, so its masks' target is not judged.
    assert inference["weights"] == "random" and "fast_volume_at_most_0.35_of_eager_fp32" in figures["targets"]
    assert "fast_masks_dice_at_least_0.99_with_eager_fp32" not in figures["targets"]
    # ONNX Runtime is optional: measured when installed, else a note says why the column is missing.
    assert "onnxruntime" in inference["backends"] or any("onnx" in note.lower() for note in inference["notes"])


def assert_fast_path_figures(inference: dict) -> None:
    """The fast volume path's keys (issue 15): positive seconds, the ratio their quotient, a Dice in [0, 1]."""
    assert inference["fast_volume_s"] > 0 and inference["eager_fp32_volume_s"] > 0
    assert inference["eager_fp32_volume_s"] == inference["eager_volume_s"]  # the same measurement, named for the ratio
    assert inference["fast_volume_s_over_eager_fp32_volume_s"] == pytest.approx(
        inference["fast_volume_s"] / inference["eager_fp32_volume_s"]
    )
    assert 0.0 <= inference["fast_vs_eager_fp32_mask_dice"] <= 1.0
    assert 0.0 <= inference["fast_vs_eager_fp32_max_tumour_probability_diff"] <= 1.0


def test_the_full_preset_measures_inference_alone(full_inference: dict) -> None:
    assert full_inference["preset"] == "full" and full_inference["sections"] == ["inference"]
    assert not {"training", "data", "memory", "threads"} & set(full_inference)
    inference = full_inference["inference"]
    assert inference["backends"] == ["eager"] and inference["slice_batch_size"] == 16  # configs/full.yaml's
    assert_fast_path_figures(inference)
    # The full preset's fast path runs int8, and its float32 variant is timed beside it.
    assert inference["fast_int8"] is True
    assert inference["fast_float32_volume_s_over_eager_fp32_volume_s"] == pytest.approx(
        inference["fast_float32_volume_s"] / inference["eager_fp32_volume_s"]
    )
    assert full_inference["settings"]["dataset_dir"] == ""  # nothing prepared for inference alone
    assert inference["weights"] == full_inference["settings"]["checkpoint"] != ""
    # With weights from a checkpoint the masks' target is judged; no scripted back-end was measured.
    assert {"fast_volume_at_most_0.35_of_eager_fp32", "fast_masks_dice_at_least_0.99_with_eager_fp32"} <= set(
        full_inference["targets"]
    )
    assert "scripted_or_onnx_not_slower_than_eager" not in full_inference["targets"]


def test_memory_machine_and_targets(figures: dict) -> None:
    memory = figures["memory"]
    assert memory["training_peak_rss_mib"] > 100 and memory["inference_peak_rss_mib"] > 100
    assert figures["machine"]["cpu_count"] >= 1 and figures["machine"]["load_average_start"]
    assert figures["settings"]["image_size"] == TINY_SIZE
    assert {
        "multitask_step_within_1.05x_of_seg_only",
        "real_loading_at_least_0.95_of_compute_only",
        "scripted_or_onnx_not_slower_than_eager",
    } <= set(figures["targets"])


def _benchmark_module() -> ModuleType:
    """scripts/benchmark.py as a module (scripts/ is not a package: the bundle's package owns that name)."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        return importlib.import_module("benchmark")
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))


def test_two_one_thread_processes_side_by_side(figures: dict, tmp_path: Path) -> None:
    # Part of the thread study, on the tiny spec of the fixture's run: two "step" children at once, one thread
    # each, as scripts/demo.sh trains the baselines beside the pipeline.
    benchmark = _benchmark_module()
    settings = {key: value for key, value in figures["settings"].items() if key != "image_size"}
    spec = benchmark.phases.Spec(**{**settings, "rounds": 2})
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    results = benchmark.run_phases_together("step", spec, tmp_path, env=env, count=2)
    assert [result["torch_threads"] for result in results] == [1, 1]
    assert all(len(r["images_per_s_rounds"]) == 2 and min(r["images_per_s_rounds"]) > 0 for r in results)
    assert sorted(path.name for path in tmp_path.glob("*.log")) == ["step_0.log", "step_1.log"]
    figures = benchmark.thread_figures(
        {f"{name}_images_per_s_rounds": [2.0, 4.0] for name in ("active", "passive", "one_thread")}
        | {"side_by_side_images_per_s_rounds": [sum(r["images_per_s_rounds"]) / 2 for r in results]}
    )
    assert figures["one_thread_images_per_s_over_passive_images_per_s"] == pytest.approx(1.0)
    assert figures["side_by_side_images_per_s_over_passive_images_per_s"] == pytest.approx(
        figures["side_by_side_images_per_s"] / 3.0
    )
