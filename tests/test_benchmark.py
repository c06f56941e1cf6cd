"""scripts/benchmark.py at a tiny size: a real run from the command line, its JSON keys and sane values.

No timing thresholds: the figures depend on the machine and its load; only their consistency is checked.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from conftest import TINY_SIZE, run_cli

BACKENDS = ("eager", "eager_channels_last", "torchscript", "torchscript_frozen")


@pytest.fixture(scope="module")
def figures(prepared_small: Path, synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("benchmark")
    out = work / "figures.json"
    result = run_cli(
        [sys.executable, "scripts/benchmark.py", "--preset", "demo", "--dataset-dir", str(prepared_small),
         "--volume", str(synthetic_small / "brats"), "--work-dir", str(work / "work"), "--out", str(out),
         "--set", "base_filters=8", "--set", "depth=3", "--set", f"image_size={TINY_SIZE}", "--batch-size", "4",
         "--steps", "2", "--warmup", "1", "--rounds", "1", "--slice-rounds", "2", "--volume-rounds", "1",
         "--no-thread-study"]
    )  # fmt: skip
    assert "multi-task / seg-only step time" in result.stdout, "the table is printed"
    return json.loads(out.read_text())


def test_training_figures_are_positive_and_ratios_are_their_quotients(figures: dict) -> None:
    training = figures["training"]
    for name in ("multitask", "seg_only", "multitask_channels_last", "real_loading", "compute_only"):
        assert training[f"{name}_images_per_s"] > 0
    assert training["batch_size"] == 4
    assert training["multitask_step_s"] == pytest.approx(4 / training["multitask_images_per_s"])
    assert training["multitask_step_s_over_seg_only_step_s"] == pytest.approx(
        training["multitask_step_s"] / training["seg_only_step_s"]
    )
    assert training["real_loading_images_per_s_over_compute_only_images_per_s"] == pytest.approx(
        training["real_loading_images_per_s"] / training["compute_only_images_per_s"]
    )
    assert training["multitask_gflop_per_image"] > 0


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
    # ONNX Runtime is optional: measured when installed, else a note says why the column is missing.
    assert "onnxruntime" in inference["backends"] or any("onnx" in note.lower() for note in inference["notes"])


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
