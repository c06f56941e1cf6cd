#!/usr/bin/env python
"""Benchmark the bundle's training and inference: throughput, data pipeline, latency, peak memory.

Prints a table and writes the figures as JSON (``--out``). Every phase runs in a child process of its own
(``benchmark_phases.py``), so that peak-memory figures do not mix; what is compared is measured in one process,
interleaved round by round, and reported as medians. Ratios sit under keys that say what they divide, e.g.
``multitask_step_s_over_seg_only_step_s``. See docs/performance.md for the figures, the targets and the machine.

Without ``--dataset-dir`` the data are generated (``make_synthetic_data.py``: 4 BraTS cases of 240x240x155 and
200 Kaggle-style images) and prepared at the preset's image size under ``--work-dir``, once; later runs reuse them.

``--only`` runs some sections alone (e.g. ``--only inference``: the back-ends and the fast volume path against
plain fp32 eager); the others are left out of the JSON and the table.

Example::

    python scripts/benchmark.py --preset demo --out demo.json
    python scripts/benchmark.py --preset full --out full.json     # the seed's network: minutes on a CPU
    python scripts/benchmark.py --preset full --only inference --out full_inference.json
    python scripts/benchmark.py --preset full --train-config configs/gpu.yaml --batch-size 16 --peak-tflops 989
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import benchmark_phases as phases
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIG = "bundle/configs/train.yaml"
INFER_CONFIG = "bundle/configs/inference.yaml"
# The targets of issue 7, as ratios measured in one run.
MAX_MULTITASK_OVER_SEG_ONLY = 1.05
MIN_REAL_LOADING_OVER_COMPUTE_ONLY = 0.95
MAX_SCRIPTED_OVER_EAGER = 1.0
# The targets of issue 15: the fast volume path in at most this fraction of plain fp32 eager's time, same masks.
MAX_FAST_OVER_EAGER_FP32 = 0.35
MIN_FAST_MASK_DICE = 0.99
# Generated data when no --dataset-dir is given: enough slices for several batches of every kind.
SYNTHETIC_CASES = 4
SYNTHETIC_KAGGLE_PER_CLASS = 50
THREAD_POLICIES = ("ACTIVE", "PASSIVE")
# What --only can pick; "memory" is the peak memory of training and of inference, "threads" the OpenMP study.
SECTIONS = ("training", "data", "inference", "memory", "threads")


@dataclass(frozen=True)
class Preset:
    """A benchmark preset: the bundle preset it measures and how long it measures.

    Attributes:
        config: the repository's preset layered over the bundle's configs.
        batch_size: training batch override (None: the preset's own); the full preset uses a small batch on CPUs.
        steps, loading_steps, warmup, rounds, slice_rounds, volume_rounds: see ``benchmark_phases.Spec``.
        thread_study: also compare OpenMP wait policies (two extra child processes per policy).
    """

    config: str
    batch_size: int | None
    steps: int
    loading_steps: int
    warmup: int
    rounds: int
    slice_rounds: int
    volume_rounds: int
    thread_study: bool


PRESETS = {
    "demo": Preset("configs/demo.yaml", None, steps=4, loading_steps=28, warmup=2, rounds=7, slice_rounds=10,
                   volume_rounds=3, thread_study=True),
    "full": Preset("configs/full.yaml", 2, steps=1, loading_steps=4, warmup=1, rounds=7, slice_rounds=3,
                   volume_rounds=1, thread_study=False),
}  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------------
# Command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(
        description="Benchmark training and inference of the bundle (see docs/performance.md).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="bundle preset to measure")
    parser.add_argument("--out", type=Path, help="JSON file to write the figures to")
    parser.add_argument("--dataset-dir", type=Path, help="prepared data at the preset's size (default: generated)")
    parser.add_argument("--volume", type=Path, help="folder with a BraTS case for the per-volume latency")
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=Path(tempfile.gettempdir()) / "brain_tumour_benchmark",
        help="generated data, caches and logs (kept between runs)",
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for training and inference, VALUE in YAML (e.g. --set base_filters=8)",
    )
    parser.add_argument(
        "--train-config",
        action="append",
        default=[],
        metavar="FILE",
        help="extra config layered over the training configs, e.g. configs/gpu.yaml (repeatable)",
    )
    parser.add_argument("--batch-size", type=int, help="training batch size (default: the preset's)")
    for name in ("steps", "loading-steps", "warmup", "rounds", "slice-rounds", "volume-rounds"):
        parser.add_argument(f"--{name}", type=int, help=f"override the preset's {name}")
    parser.add_argument(
        "--only", nargs="+", choices=SECTIONS, help="measure only these sections (default: all; threads: demo preset)"
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        choices=phases.BACKENDS,
        help="inference back-ends to compare (default: all; eager is always measured, with the fast path)",
    )
    parser.add_argument(
        "--checkpoint",
        type=Path,
        help="trained model.pt of the preset for inference (default: random weights; the fast path's mask Dice "
        "means something only with trained ones)",
    )
    parser.add_argument("--no-onnx", action="store_true", help="leave ONNX Runtime out even when installed")
    parser.add_argument("--no-thread-study", action="store_true", help="skip the OpenMP wait-policy comparison")
    parser.add_argument(
        "--peak-tflops", type=float, help="the device's peak TFLOP/s, to report the fraction of it that training uses"
    )
    parser.add_argument("--phase", help=argparse.SUPPRESS)  # internal: run one phase (child process)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def parse_overrides(pairs: Sequence[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs as config overrides, the values read as YAML (numbers, booleans, lists)."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set expects KEY=VALUE, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
    return overrides


# ----------------------------------------------------------------------------------------------------------------------
# Data


def run_logged(command: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run a command from the repository root, its output into ``log``; on failure, exit with its last lines."""
    with open(log, "w") as out:
        code = subprocess.run(command, cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-40:])
        raise SystemExit(f"{' '.join(command)} exited {code}; its output ends:\n{tail}\n(full log: {log})")


def config_value(configs: Sequence[str], overrides: dict[str, Any], key: str) -> Any:
    """A plain value of the merged configs (e.g. image_size), as the bundle would read it."""
    parser = phases.bundle_parser(configs)
    parser.update(overrides)
    return parser.get_parsed_content(key)


def generate_synthetic(
    out: Path, cases: int, kaggle_per_class: int, log: Path, shape: Sequence[int] | None = None
) -> Path:
    """Synthetic BraTS + Kaggle data from make_synthetic_data.py in ``out``, unless it is there already."""
    if not (out / "manifest.json").is_file():
        command = [sys.executable, "scripts/make_synthetic_data.py", "--out", str(out), "--force",
                   "--brats-cases", str(cases), "--kaggle-per-class", str(kaggle_per_class)]  # fmt: skip
        run_logged(command + (["--shape", *map(str, shape)] if shape else []), log)
    return out


def generated_data(work_dir: Path, image_size: int, prepare: bool = True) -> tuple[Path | None, Path]:
    """Synthetic BraTS + Kaggle data under ``work_dir``, and, with ``prepare``, prepared at ``image_size`` (made
    once, then reused): the prepared folder (None without ``prepare``) and the BraTS folder."""
    synthetic = work_dir / "synthetic"
    generate_synthetic(synthetic, SYNTHETIC_CASES, SYNTHETIC_KAGGLE_PER_CLASS, work_dir / "make_synthetic_data.log")
    if not prepare:
        return None, synthetic / "brats"
    prepared = work_dir / f"prepared_{image_size}"
    # prepare_data.py does nothing when its output is up to date.
    run_logged(
        [sys.executable, "scripts/prepare_data.py", "--brats", str(synthetic / "brats"),
         "--kaggle", str(synthetic / "kaggle"), "--out", str(prepared), "--size", str(image_size)],
        work_dir / "prepare_data.log",
    )  # fmt: skip
    return prepared, synthetic / "brats"


# ----------------------------------------------------------------------------------------------------------------------
# Child processes


def phase_command(name: str, spec: phases.Spec, work_dir: Path, tag: str = "") -> tuple[list[str], Path, Path]:
    """The child process that runs one phase: its command line, log file and result file."""
    stem = work_dir / f"{name}{tag}"
    spec_path, result_path = stem.with_suffix(".spec.json"), stem.with_suffix(".result.json")
    spec_path.write_text(json.dumps(dataclasses.asdict(spec)))
    result_path.unlink(missing_ok=True)
    command = [sys.executable, str(Path(__file__).resolve()), "--phase", name, "--spec", str(spec_path),
               "--result", str(result_path)]  # fmt: skip
    return command, stem.with_suffix(".log"), result_path


def run_phase(name: str, spec: phases.Spec, work_dir: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run one phase in a child process and return its figures."""
    command, log, result_path = phase_command(name, spec, work_dir)
    print(f"  {name} ...", flush=True)
    start = time.perf_counter()
    run_logged(command, log, env=env)
    result = json.loads(result_path.read_text())
    result["phase_wall_s"] = round(time.perf_counter() - start, 1)
    return result


def run_phases_together(
    name: str, spec: phases.Spec, work_dir: Path, env: dict[str, str], count: int
) -> list[dict[str, Any]]:
    """Run ``count`` copies of one phase at the same time, each in its own child process; their figures."""
    children = [phase_command(name, spec, work_dir, tag=f"_{index}") for index in range(count)]
    print(f"  {name} x{count} side by side ...", flush=True)
    with ThreadPoolExecutor(count) as pool:
        list(pool.map(lambda child: run_logged(child[0], child[1], env=env), children))
    return [json.loads(result_path.read_text()) for _, _, result_path in children]


def child_main(args: argparse.Namespace) -> int:
    """Entry point of a child process: run the phase, write its figures."""
    spec = phases.Spec(**json.loads(args.spec.read_text()))
    result = phases.PHASES[args.phase](spec)
    args.result.write_text(json.dumps(result))
    return 0


def thread_study(spec: phases.Spec, work_dir: Path) -> dict[str, Any]:
    """The multi-task step under each OpenMP wait policy, and with one thread alone and side by side.

    The policy and the thread count are read when the OpenMP runtime starts (``import torch``), so they cannot
    change inside a process: each setting gets its own child processes, alternating. "Side by side" runs two
    one-thread processes at once, as ``scripts/demo.sh`` trains the baselines beside the pipeline; their images/s
    add up.
    """
    short = dataclasses.replace(spec, rounds=2)
    runs: dict[str, list[float]] = {policy: [] for policy in (*THREAD_POLICIES, "ONE_THREAD", "SIDE_BY_SIDE")}
    all_threads = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    one_thread = {**all_threads, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    for _ in range(2):
        for policy in THREAD_POLICIES:
            env = {**all_threads, "OMP_WAIT_POLICY": policy}
            runs[policy] += run_phase("step", short, work_dir, env=env)["images_per_s_rounds"]
        runs["ONE_THREAD"] += run_phase("step", short, work_dir, env=one_thread)["images_per_s_rounds"]
        pair = run_phases_together("step", short, work_dir, env=one_thread, count=2)
        runs["SIDE_BY_SIDE"] += [sum(rates) for rates in zip(*(r["images_per_s_rounds"] for r in pair), strict=True)]
    return {f"{policy.lower()}_images_per_s_rounds": values for policy, values in runs.items()}


# ----------------------------------------------------------------------------------------------------------------------
# Figures


def ratio(numerator: float, denominator: float) -> float:
    """numerator / denominator."""
    return numerator / denominator


def training_figures(raw: dict[str, Any], peak_tflops: float | None) -> dict[str, Any]:
    """Images/s, step times and the ratios of the training phase."""
    rounds = raw["images_per_s_rounds"]
    ips = {name: phases.median(values) for name, values in rounds.items()}
    batch = raw["batch_size"]
    step_s = {name: batch / value for name, value in ips.items()}
    achieved = raw["multitask_flop_per_image"] * ips["multitask"] / 1e12
    # One multi-task trainer ran the configured memory layout, the other the opposite one.
    layouts = ("multitask", "multitask_other_layout")
    channels_last, contiguous = layouts if raw["channels_last_configured"] else layouts[::-1]
    figures = {
        "device": raw["device"],
        "batch_size": batch,
        "amp": raw["amp"],
        "num_workers": raw["num_workers"],
        "kaggle_steps": raw["kaggle_steps"],
        "channels_last_configured": raw["channels_last_configured"],
        **{f"{name}_images_per_s": value for name, value in ips.items()},
        "multitask_step_s": step_s["multitask"],
        "seg_only_step_s": step_s["seg_only"],
        "multitask_channels_last_images_per_s": ips[channels_last],
        "multitask_channels_last_step_s": step_s[channels_last],
        "multitask_contiguous_step_s": step_s[contiguous],
        "multitask_step_s_over_seg_only_step_s": ratio(step_s["multitask"], step_s["seg_only"]),
        "multitask_channels_last_step_s_over_multitask_contiguous_step_s": ratio(
            step_s[channels_last], step_s[contiguous]
        ),
        "real_loading_images_per_s_over_compute_only_images_per_s": ratio(ips["real_loading"], ips["compute_only"]),
        # The same per round (real loading and compute only run next to each other), then the median.
        "real_loading_over_compute_only_median_of_rounds": phases.median(
            [ratio(real, compute) for real, compute in zip(rounds["real_loading"], rounds["compute_only"], strict=True)]
        ),
        # The batch augmentation's share of the multi-task step (it runs in the step, on the batch).
        "augmentation_share_of_multitask_step": 1.0 - ratio(step_s["multitask_no_augmentation"], step_s["multitask"]),
        # Time fetching batches (the loader alone) over time fetching and computing them.
        "data_path_share_of_training_time": ratio(ips["compute_only"], ips["compute_only"] + ips["loader_alone"]),
        "multitask_gflop_per_image": raw["multitask_flop_per_image"] / 1e9,
        "multitask_achieved_tflops": achieved,
        "rounds": rounds,
    }
    if peak_tflops:
        figures["peak_tflops"] = peak_tflops
        figures["multitask_achieved_tflops_over_peak_tflops"] = ratio(achieved, peak_tflops)
    return figures


def data_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Images/s delivered by the loader with and without the cache."""
    ips = {name: phases.median(values) for name, values in raw["images_per_s_rounds"].items()}
    return {
        "cache": raw["cache"],
        "cache_fill_s": raw["cache_fill_s"],
        "batches_per_round": raw["batches_per_round"],
        "cached_images_per_s": ips["cached"],
        "uncached_images_per_s": ips["uncached"],
        "cached_images_per_s_over_uncached_images_per_s": ratio(ips["cached"], ips["uncached"]),
        "rounds": raw["images_per_s_rounds"],
    }


def inference_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Per-slice and per-volume latency of every back-end, their ratios to eager, and the output agreement."""
    slice_s = {name: phases.median(values) for name, values in raw["slice_latency_s_rounds"].items()}
    network_s = {name: phases.median(values) for name, values in raw["volume_network_s_rounds"].items()}
    volume_s = {name: raw["prepare_s"] + value + raw["finish_s"] for name, value in network_s.items()}
    figures: dict[str, Any] = {
        "volume_shape": raw["volume_shape"],
        "slices_analysed": raw["slices_analysed"],
        "slice_batch_size": raw["slice_batch_size"],
        "backends": list(slice_s),
        "notes": raw["notes"],
        "volume_prepare_s": raw["prepare_s"],
        "volume_finish_s": raw["finish_s"],
    }
    for name in slice_s:
        figures[f"{name}_slice_s"] = slice_s[name]
        figures[f"{name}_volume_network_s"] = network_s[name]
        figures[f"{name}_volume_s"] = volume_s[name]
        figures[f"{name}_volume_slices_per_s"] = raw["slices_analysed"] / network_s[name]
        if name != "eager":
            figures[f"{name}_slice_s_over_eager_slice_s"] = ratio(slice_s[name], slice_s["eager"])
            figures[f"{name}_volume_s_over_eager_volume_s"] = ratio(volume_s[name], volume_s["eager"])
    figures.update(fast_path_figures(raw, volume_s))
    figures["agreement"] = raw["agreement"]
    figures["rounds"] = {"slice_s": raw["slice_latency_s_rounds"], "volume_network_s": raw["volume_network_s_rounds"]}
    return figures


def fast_path_figures(raw: dict[str, Any], volume_s: dict[str, float]) -> dict[str, Any]:
    """The fast volume path (``fast_inference``) against plain fp32 eager over whole slices: seconds per volume
    (reading and put-back included, the same for both), their ratio, and how far their answers are apart."""
    return {
        "fast_volume_s": volume_s["fast"],
        "eager_fp32_volume_s": volume_s["eager"],
        "fast_volume_s_over_eager_fp32_volume_s": ratio(volume_s["fast"], volume_s["eager"]),
        "fast_int8": raw["fast_int8"],
        # The fast path without int8 (`int8_inference: false`), when the fast path ran int8.
        **(
            {
                "fast_float32_volume_s": volume_s["fast_float32"],
                "fast_float32_volume_s_over_eager_fp32_volume_s": ratio(volume_s["fast_float32"], volume_s["eager"]),
            }
            if "fast_float32" in volume_s
            else {}
        ),
        "fast_vs_eager_fp32_mask_dice": raw["fast_vs_eager_fp32_mask_dice"],
        "weights": raw["weights"],
        "fast_vs_eager_fp32_max_tumour_probability_diff": raw["fast_vs_eager_fp32_max_tumour_probability_diff"],
        "fast_brain_box": raw["fast_brain_box"],
    }


def thread_figures(raw: dict[str, Any]) -> dict[str, Any]:
    """Images/s of the multi-task step under each OpenMP wait policy, with one thread, and two processes at once."""
    ips = {key[: -len("_images_per_s_rounds")]: phases.median(values) for key, values in raw.items()}
    return {
        "active_images_per_s": ips["active"],
        "passive_images_per_s": ips["passive"],
        "passive_images_per_s_over_active_images_per_s": ratio(ips["passive"], ips["active"]),
        "one_thread_images_per_s": ips["one_thread"],
        "one_thread_images_per_s_over_passive_images_per_s": ratio(ips["one_thread"], ips["passive"]),
        "side_by_side_images_per_s": ips["side_by_side"],
        "side_by_side_images_per_s_over_passive_images_per_s": ratio(ips["side_by_side"], ips["passive"]),
        "rounds": raw,
    }


def training_targets(training: dict[str, Any]) -> dict[str, Any]:
    """Whether the training ratios of this run meet issue 7's targets."""
    return {
        "multitask_step_within_1.05x_of_seg_only": training["multitask_step_s_over_seg_only_step_s"]
        <= MAX_MULTITASK_OVER_SEG_ONLY,
        "real_loading_at_least_0.95_of_compute_only": training[
            "real_loading_images_per_s_over_compute_only_images_per_s"
        ]
        >= MIN_REAL_LOADING_OVER_COMPUTE_ONLY,
    }


def inference_targets(inference: dict[str, Any]) -> dict[str, Any]:
    """Whether the inference ratios of this run meet issue 7's and issue 15's targets: the scripted back-ends' only
    when one was measured, the fast path's masks only with trained weights (random ones make masks that say nothing
    about it)."""
    met: dict[str, Any] = {
        "fast_volume_at_most_0.35_of_eager_fp32": inference["fast_volume_s_over_eager_fp32_volume_s"]
        <= MAX_FAST_OVER_EAGER_FP32,
        "outputs_agree": all(entry["agree"] for entry in inference["agreement"].values()),
    }
    if inference["weights"] != "random":
        met["fast_masks_dice_at_least_0.99_with_eager_fp32"] = (
            inference["fast_vs_eager_fp32_mask_dice"] >= MIN_FAST_MASK_DICE
        )
    scripted = {
        name: inference[f"{name}_volume_s_over_eager_volume_s"]
        for name in ("torchscript", "torchscript_frozen", "onnxruntime")
        if f"{name}_volume_s_over_eager_volume_s" in inference
    }
    if scripted:
        best = min(scripted, key=scripted.get)
        met["scripted_or_onnx_not_slower_than_eager"] = scripted[best] <= MAX_SCRIPTED_OVER_EAGER
        met["fastest_scripted_or_onnx_backend"] = best
    return met


def targets(result: dict[str, Any]) -> dict[str, Any]:
    """Whether the issues' targets are met by the ratios of this run, for the sections it measured."""
    met: dict[str, Any] = {}
    if "training" in result:
        met.update(training_targets(result["training"]))
    if "inference" in result:
        met.update(inference_targets(result["inference"]))
    return met


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    ) if Path("/proc/cpuinfo").is_file() else platform.processor()  # fmt: skip
    memory = next(
        (int(line.split()[1]) / 1024 / 1024 for line in Path("/proc/meminfo").read_text().splitlines()
         if line.startswith("MemTotal")),
        None,
    ) if Path("/proc/meminfo").is_file() else None  # fmt: skip
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "memory_gib": None if memory is None else round(memory, 1),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(unset: ACTIVE spinning)"),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


# ----------------------------------------------------------------------------------------------------------------------
# Table


Row = tuple[str, str, str]


def training_rows(training: dict[str, Any]) -> list[Row]:
    """Table rows of the training section."""
    return [
        ("training: multi-task step", f"{training['multitask_images_per_s']:.1f} img/s",
         f"{training['multitask_step_s']:.3f} s/step"),
        ("training: seg-only step", f"{training['seg_only_images_per_s']:.1f} img/s",
         f"{training['seg_only_step_s']:.3f} s/step"),
        ("  multi-task / seg-only step time", f"{training['multitask_step_s_over_seg_only_step_s']:.3f}", "<= 1.05"),
        ("training: multi-task, channels_last", f"{training['multitask_channels_last_images_per_s']:.1f} img/s",
         f"x{training['multitask_channels_last_step_s_over_multitask_contiguous_step_s']:.3f} of NCHW step time"),
        ("training: real loading", f"{training['real_loading_images_per_s']:.1f} img/s", "stage 3, both sources"),
        ("training: compute only", f"{training['compute_only_images_per_s']:.1f} img/s", "same batches in memory"),
        ("  real loading / compute only",
         f"{training['real_loading_images_per_s_over_compute_only_images_per_s']:.3f}", ">= 0.95"),
        ("  the same, median of the rounds' ratios",
         f"{training['real_loading_over_compute_only_median_of_rounds']:.3f}", ""),
        ("training: loader alone", f"{training['loader_alone_images_per_s']:.0f} img/s",
         f"data path {training['data_path_share_of_training_time']:.1%} of training time"),
        ("training: augmentation", f"{training['augmentation_share_of_multitask_step']:.1%}", "of the multi-task step"),
    ]  # fmt: skip


def data_rows(data: dict[str, Any]) -> list[Row]:
    """Table rows of the data section."""
    return [
        ("data: cached loader", f"{data['cached_images_per_s']:.0f} img/s", f"cache {data['cache']}"),
        ("data: uncached loader", f"{data['uncached_images_per_s']:.0f} img/s", "cache none"),
        ("  cached / uncached", f"{data['cached_images_per_s_over_uncached_images_per_s']:.2f}", ""),
    ]


def inference_rows(inference: dict[str, Any]) -> list[Row]:
    """Table rows of the inference section: every back-end, then the fast volume path."""
    rows = []
    for name in inference["backends"]:
        slice_ratio = inference.get(f"{name}_slice_s_over_eager_slice_s")
        volume_ratio = inference.get(f"{name}_volume_s_over_eager_volume_s")
        note = "" if slice_ratio is None else f"x{slice_ratio:.2f} / x{volume_ratio:.2f} of eager"
        rows.append(
            (f"inference: {name}", f"{inference[f'{name}_slice_s'] * 1000:.1f} ms/slice",
             f"{inference[f'{name}_volume_s']:.2f} s/volume {note}")
        )  # fmt: skip
    rows += [
        ("inference: fast path", f"{inference['fast_volume_s']:.2f} s/volume",
         f"brain box {inference['fast_brain_box']}"),
        ("  fast / eager fp32 volume time", f"{inference['fast_volume_s_over_eager_fp32_volume_s']:.3f}", "<= 0.35"),
        ("  fast / eager fp32 mask Dice", f"{inference['fast_vs_eager_fp32_mask_dice']:.4f}",
         f">= 0.99 (weights: {inference['weights']})"),
    ]  # fmt: skip
    return rows + [("note", "", note) for note in inference["notes"]]


def memory_rows(memory: dict[str, Any]) -> list[Row]:
    """Table rows of the peak-memory section."""
    return [
        ("peak RSS: training", f"{memory['training_peak_rss_mib']:.0f} MiB",
         f"with loader workers (PSS) {memory['training_peak_tree_pss_mib']:.0f} MiB"),
        ("peak RSS: inference (one volume)", f"{memory['inference_peak_rss_mib']:.0f} MiB", "as inference.yaml"),
    ]  # fmt: skip


def thread_rows(threads: dict[str, Any]) -> list[Row]:
    """Table rows of the OpenMP thread study."""
    return [
        ("OpenMP wait policy PASSIVE / ACTIVE", f"{threads['passive_images_per_s_over_active_images_per_s']:.2f}",
         f"{threads['passive_images_per_s']:.1f} vs {threads['active_images_per_s']:.1f} img/s"),
        ("one thread / all (PASSIVE)", f"{threads['one_thread_images_per_s_over_passive_images_per_s']:.2f}",
         f"{threads['one_thread_images_per_s']:.1f} img/s"),
        ("two one-thread processes / one with all",
         f"{threads['side_by_side_images_per_s_over_passive_images_per_s']:.2f}",
         f"{threads['side_by_side_images_per_s']:.1f} img/s together"),
    ]  # fmt: skip


SECTION_ROWS = {
    "training": training_rows,
    "data": data_rows,
    "inference": inference_rows,
    "memory": memory_rows,
    "threads": thread_rows,
}


def table(result: dict[str, Any]) -> str:
    """The figures of the sections measured, as a plain-text table."""
    rows = [row for section, make in SECTION_ROWS.items() if section in result for row in make(result[section])]
    rows += [(f"target: {name}", str(met), "") for name, met in result["targets"].items()]
    width = max(len(row[0]) for row in rows)
    return "\n".join(f"{a:<{width}}  {b:>16}  {c}" for a, b, c in rows)


# ----------------------------------------------------------------------------------------------------------------------
# Main


def make_spec(args: argparse.Namespace, preset: Preset, dataset_dir: Path | None, volume_root: Path) -> phases.Spec:
    """The phases' specification from the command line and the preset (no ``dataset_dir``: inference only)."""
    batch_size = args.batch_size or preset.batch_size
    return phases.Spec(
        train_configs=[TRAIN_CONFIG, preset.config, *args.train_config],
        infer_configs=[INFER_CONFIG, preset.config],
        overrides=parse_overrides(args.overrides),
        train_overrides={} if batch_size is None else {"batch_size": batch_size},
        dataset_dir="" if dataset_dir is None else str(dataset_dir.resolve()),
        volume_root=str(volume_root.resolve()),
        work_dir=str(args.work_dir.resolve()),
        steps=args.steps or preset.steps,
        loading_steps=args.loading_steps or preset.loading_steps,
        warmup=max(1, args.warmup or preset.warmup),
        rounds=args.rounds or preset.rounds,
        slice_rounds=args.slice_rounds or preset.slice_rounds,
        volume_rounds=args.volume_rounds or preset.volume_rounds,
        onnx=not args.no_onnx,
        backends=args.backends,
        checkpoint="" if args.checkpoint is None else str(args.checkpoint.resolve()),
    )


def selected_sections(args: argparse.Namespace, preset: Preset) -> list[str]:
    """The sections to measure: ``--only``'s, else all (the thread study only where the preset has one), less the
    thread study with ``--no-thread-study``."""
    default = [name for name in SECTIONS if name != "threads" or preset.thread_study]
    return [name for name in (args.only or default) if not (name == "threads" and args.no_thread_study)]


def benchmark_data(args: argparse.Namespace, image_size: int, sections: Sequence[str]) -> tuple[Path | None, Path]:
    """The prepared data (None when only inference is measured: it reads volumes only) and the BraTS volumes:
    those given on the command line, else generated under ``--work-dir``."""
    needs_prepared = any(name != "inference" for name in sections)
    dataset_dir, volume_root = args.dataset_dir, args.volume
    if (needs_prepared and dataset_dir is None) or volume_root is None:
        prepare = needs_prepared and dataset_dir is None
        what = f"generating and preparing data at {image_size} px" if prepare else "generating volumes"
        print(f"{what.capitalize()} under {args.work_dir} (once) ...", flush=True)
        prepared, volumes = generated_data(args.work_dir, image_size, prepare=prepare)
        dataset_dir, volume_root = dataset_dir or prepared, volume_root or volumes
    return dataset_dir, volume_root


def memory_figures(spec: phases.Spec, work_dir: Path) -> dict[str, Any]:
    """Peak memory of training and of inference, each in a child process of its own."""
    training_memory = run_phase("training_memory", spec, work_dir)
    inference_memory = run_phase("inference_memory", spec, work_dir)
    return {
        "training_peak_rss_mib": training_memory["peak_rss_mib"],
        "training_peak_tree_pss_mib": training_memory["peak_tree_pss_mib"],
        "inference_peak_rss_mib": inference_memory["peak_rss_mib"],
        **({"training_peak_gpu_allocated_mib": training_memory["peak_gpu_allocated_mib"]}
           if "peak_gpu_allocated_mib" in training_memory else {}),
    }  # fmt: skip


def measure(sections: Sequence[str], spec: phases.Spec, args: argparse.Namespace) -> dict[str, Any]:
    """The figures of every selected section, each phase in a child process of its own."""
    work_dir = args.work_dir
    measurers = {
        "training": lambda: training_figures(run_phase("training", spec, work_dir), args.peak_tflops),
        "data": lambda: data_figures(run_phase("data", spec, work_dir)),
        "inference": lambda: inference_figures(run_phase("inference", spec, work_dir)),
        "memory": lambda: memory_figures(spec, work_dir),
        "threads": lambda: thread_figures(thread_study(spec, work_dir)),
    }
    return {name: measurers[name]() for name in SECTIONS if name in sections}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark: data, every phase in its own process, the table and the JSON."""
    args = parse_args(argv)
    if args.phase:
        return child_main(args)
    preset = PRESETS[args.preset]
    args.work_dir.mkdir(parents=True, exist_ok=True)
    overrides = parse_overrides(args.overrides)
    image_size = int(config_value([TRAIN_CONFIG, preset.config, *args.train_config], overrides, "image_size"))
    sections = selected_sections(args, preset)
    result: dict[str, Any] = {"preset": args.preset, "sections": sections, "machine": machine()}
    start = time.perf_counter()
    spec = make_spec(args, preset, *benchmark_data(args, image_size, sections))
    result["settings"] = {**dataclasses.asdict(spec), "image_size": image_size}
    print(f"Benchmark, preset {args.preset}, {', '.join(sections)} (logs under {args.work_dir}):", flush=True)
    result.update(measure(sections, spec, args))
    result["targets"] = targets(result)
    result["machine"]["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
    result["wall_s"] = round(time.perf_counter() - start, 1)
    print(table(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"Figures written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
