"""The measurements of ``scripts/benchmark.py``; each phase runs in a child process of its own.

A phase builds the real pipeline objects from the bundle's configs (``train.yaml`` + the preset, or
``inference.yaml`` + the preset) with :class:`monai.bundle.ConfigParser`, so the figures describe what users run.
Things that are compared run in the same process, interleaved round by round, and each figure is the median over
the rounds: on a shared machine the load changes from minute to minute, and interleaving exposes both contenders
to the same load. Peak memory is measured in phases of their own, so that one phase's allocations do not show in
another's figure.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import resource
import statistics
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE_ROOT = REPO_ROOT / "bundle"
# As `python -m monai.bundle run` does: the bundle root on sys.path makes its package importable as `scripts`.
if str(BUNDLE_ROOT) not in sys.path:
    sys.path.insert(0, str(BUNDLE_ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from ignite.engine import Engine, Events  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402

from scripts.engines import performance_settings  # noqa: E402
from scripts.inference import predict  # noqa: E402
from scripts.inference.inputs import find_inputs  # noqa: E402
from scripts.networks.checkpoints import load_network_weights  # noqa: E402

# Stage 3 is the multi-task stage (segmentation + classification, BraTS batches alternating with Kaggle batches).
# It starts from scratch here: the figures do not depend on the weights.
STAGE_OVERRIDES = {"stage": 3, "stages#3#init_from": None, "mlflow_tracking": False, "train#handlers": []}
# The seg-only step: stage 3 with the classification task and head switched off, everything else equal (batch,
# optimizer, frozen BatchNorm statistics), so the ratio isolates the cost of the second task.
SEG_ONLY_OVERRIDES = {"stages#3#tasks": ["seg"], "stages#3#trainable": ["encoder", "decoder"]}
# Outputs of two inference back-ends agree when every logit does within these tolerances.
AGREEMENT_ATOL = 1e-3
AGREEMENT_RTOL = 1e-3
MIB = 1024 * 1024
SLICE_CALLS = 5
# The back-ends compared with the eager network at inference (inference_backends); eager is always measured.
BACKENDS = ("eager", "eager_channels_last", "torchscript", "torchscript_frozen", "onnxruntime")


@dataclass
class Spec:
    """What a phase measures and on which data (written as JSON by the parent, read by the child).

    Attributes:
        train_configs: config files (relative to the repository) of the training pipeline.
        infer_configs: config files of the inference pipeline.
        overrides: config values set over both (``--set``).
        train_overrides: config values set over the training configs only (``--batch-size``).
        dataset_dir: prepared data at the preset's image size.
        volume_root: folder with a BraTS case (the per-volume inference latency).
        work_dir: scratch folder (checkpoint and cache folders of the config).
        steps: timed training iterations per round (one replayed batch: compute only).
        loading_steps: timed iterations per round of the loading comparison (0: ``steps``); whole cycles of the
            stage-3 loader (one BraTS batch, ``kaggle_steps`` Kaggle batches) keep both kinds in the figure.
        warmup: untimed iterations before them (first-call allocations, loader start-up).
        rounds: interleaved rounds of the training and loading comparisons.
        slice_rounds: rounds of the per-slice latency.
        volume_rounds: rounds of the per-volume latency.
        onnx: also measure ONNX Runtime when it is installed.
        backends: the inference back-ends to measure (names of ``BACKENDS``; eager always); None: all of them.
        checkpoint: trained weights (``model.pt``) for the inference phases; empty: random weights.
    """

    train_configs: list[str]
    infer_configs: list[str]
    overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    dataset_dir: str = ""
    volume_root: str = ""
    work_dir: str = ""
    steps: int = 10
    loading_steps: int = 0
    warmup: int = 2
    rounds: int = 5
    slice_rounds: int = 20
    volume_rounds: int = 3
    onnx: bool = True
    backends: list[str] | None = None
    checkpoint: str = ""


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def median(values: Sequence[float]) -> float:
    """The median, as a plain float."""
    return float(statistics.median(values))


def synchronize(device: torch.device | str) -> None:
    """Wait for queued GPU work, so that a timestamp means the work is done (nothing to do on a CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_rss_mib() -> float:
    """Peak resident memory of this process (``ru_maxrss``, KiB on Linux), in MiB."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def process_memory_bytes(pid: int) -> int:
    """A process's proportional set size (its private pages plus its share of shared ones), else its RSS."""
    for name, field_name in (("smaps_rollup", "Pss:"), ("status", "VmRSS:")):
        try:
            for line in Path(f"/proc/{pid}/{name}").read_text().splitlines():
                if line.startswith(field_name):
                    return int(line.split()[1]) * 1024
        except OSError:
            continue
    return 0


def _descendants(root: int) -> set[int]:
    """A process and all its descendants (from the parent pids in /proc)."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # The command name (2nd field) may hold spaces; the fields after its closing parenthesis do not.
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = {pid for pid, ppid in parents.items() if ppid == parent} - tree
        tree |= children
        frontier.extend(children)
    return tree


def tree_memory_bytes(root: int) -> int:
    """Memory of a process tree: the sum of its processes' PSS, so that pages a forked loader worker shares with
    the trainer (or a preparation worker with its parent) count once, not once per process."""
    return sum(process_memory_bytes(pid) for pid in _descendants(root))


class TreeMemorySampler:
    """Samples a process tree's memory (:func:`tree_memory_bytes`) in a background thread; ``peak`` in bytes."""

    def __init__(self, pid: int, interval_s: float = 0.1) -> None:
        self.pid, self.interval_s, self.peak = pid, interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_memory_bytes(self.pid))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> TreeMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def batch_images(batch: Mapping[str, Any]) -> int:
    """Number of images in a collated batch."""
    return int(batch["image"].shape[0])


def cycle(iterable: Iterable) -> Iterator:
    """Pass over an iterable again and again (a new iterator, hence a new epoch, each time)."""
    while True:
        yield from iterable


def bundle_parser(configs: Sequence[str]) -> ConfigParser:
    """The bundle's config files merged, with its metadata (``_meta_``, which ``inference.yaml`` reads the network's
    settings from), as ``monai.bundle run`` reads them."""
    parser = ConfigParser()
    parser.read_config([str(REPO_ROOT / name) for name in configs])
    parser.read_meta(str(BUNDLE_ROOT / "configs" / "metadata.json"))
    return parser


def train_parser(spec: Spec, **extra: Any) -> ConfigParser:
    """The training config of the spec, at stage 3, with the benchmark's overrides."""
    parser = bundle_parser(spec.train_configs)
    work = Path(spec.work_dir)
    parser.update(
        {
            "bundle_root": str(BUNDLE_ROOT),
            "dataset_dir": spec.dataset_dir,
            "ckpt_dir": str(work / "models"),
            "output_dir": str(work / "eval"),
            "cache_dir": str(work / "cache"),
            **STAGE_OVERRIDES,
            **spec.overrides,
            **spec.train_overrides,
            **extra,
        }
    )
    return parser


def infer_parser(spec: Spec) -> ConfigParser:
    """The inference config of the spec with the benchmark's overrides."""
    parser = bundle_parser(spec.infer_configs)
    parser.update({"bundle_root": str(BUNDLE_ROOT), **spec.overrides})
    return parser


def channels_last_configured(parser: ConfigParser) -> bool:
    """Whether the config asks for channels_last (a ``channels_last`` key that is true)."""
    return bool(parser.get("channels_last", False))


# ----------------------------------------------------------------------------------------------------------------------
# Training


def timed_run(trainer: Engine, data: Iterable, steps: int, warmup: int = 0) -> float:
    """Run the trainer for ``warmup + steps`` iterations over ``data``; images per second of the last ``steps``.

    The clock runs from the end of the last warm-up iteration (without warm-up: from the first batch's fetch) to
    the end of the last iteration, so loading the batches (when ``data`` is a real loader) counts as it does in
    training; a warm-up keeps the loader's start of a pass out of the figure.
    """
    starts: list[float] = []
    ends: list[float] = []
    images: list[int] = []

    def started(engine: Engine) -> None:
        starts.append(time.perf_counter())

    def completed(engine: Engine) -> None:
        synchronize(engine.state.device)
        ends.append(time.perf_counter())
        images.append(batch_images(engine.state.batch))

    handles = [
        trainer.add_event_handler(Events.GET_BATCH_STARTED, started),
        trainer.add_event_handler(Events.ITERATION_COMPLETED, completed),
    ]
    try:
        # A fresh ignite state (not the stage's epochs): this many iterations, then stop.
        trainer.state.max_epochs = None
        trainer.state.max_iters = None
        Engine.run(trainer, data, max_epochs=1, epoch_length=warmup + steps)
    finally:
        for handle in handles:
            handle.remove()
    start = ends[warmup - 1] if warmup else starts[0]
    return sum(images[warmup:]) / (ends[-1] - start)


def interleaved(contenders: Mapping[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call every contender once per round, in an order that alternates between rounds; the values by name."""
    names = list(contenders)
    values: dict[str, list[float]] = {name: [] for name in names}
    for index in range(rounds):
        for name in names if index % 2 == 0 else reversed(names):
            values[name].append(contenders[name]())
    return values


def step_flops(trainer: Any, batch: Mapping[str, Any]) -> float:
    """Floating-point operations of one training iteration (forward, backward) on this batch, as PyTorch counts
    them (matrix multiplications and convolutions)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        trainer._process_function(trainer, batch)
    return float(counter.get_total_flops())


def replay_batches(loader: Iterable, count: int) -> list[Any]:
    """The first ``count`` batches the loader delivers (starting a new epoch when it runs out), held in memory."""
    return list(islice(cycle(loader), count))


def measure_training(spec: Spec) -> dict[str, Any]:
    """Training throughput: multi-task against seg-only (compute only), real loading against compute only."""
    parser = train_parser(spec)
    trainer = parser.get_parsed_content("train#trainer")
    loading_steps = spec.loading_steps or spec.steps
    replay = replay_batches(trainer.data_loader, spec.warmup + loading_steps)
    brats = [next(batch for batch in replay if "label" in batch)] * max(spec.warmup, spec.steps)
    seg_only = train_parser(spec, **SEG_ONLY_OVERRIDES).get_parsed_content("train#trainer")
    # The other memory layout than the configured one (train.yaml trains channels_last): their ratio is its gain.
    other_layout = train_parser(spec, channels_last=not channels_last_configured(parser))
    # And without the batch augmentation, which the trainer's prepare_batch applies: its share of the step.
    no_augmentation = train_parser(spec, **{"train#prepare_batch#augmentation": None})
    trainers = {"multitask": trainer, "seg_only": seg_only,
                "multitask_other_layout": other_layout.get_parsed_content("train#trainer"),
                "multitask_no_augmentation": no_augmentation.get_parsed_content("train#trainer")}  # fmt: skip
    for each in trainers.values():  # first iterations allocate; the rounds need no warm-up of their own
        timed_run(each, brats, spec.warmup)
    # One batch replayed: compute only, so rounds can be short and finely interleaved.
    compute = interleaved(
        {name: (lambda t=each: timed_run(t, brats, spec.steps)) for name, each in trainers.items()}, spec.rounds
    )
    # The loader alone as well: the loading's own cost, which the difference of the other two (a few percent of
    # rounds that vary by several) cannot resolve.
    loading = interleaved(
        {
            "real_loading": lambda: timed_run(trainer, trainer.data_loader, loading_steps, spec.warmup),
            "compute_only": lambda: timed_run(trainer, replay, loading_steps, spec.warmup),
            "loader_alone": lambda: timed_iteration(trainer.data_loader, loading_steps, spec.warmup),
        },
        spec.rounds,
    )
    flops = step_flops(trainer, brats[0]) / batch_images(brats[0])
    return {
        "device": str(trainer.state.device),
        "batch_size": batch_images(brats[0]),
        "amp": bool(trainer.amp),
        "channels_last_configured": channels_last_configured(parser),
        "num_workers": int(parser.get_parsed_content("num_workers")),
        "kaggle_steps": int(parser.get_parsed_content("stage_spec")["kaggle_steps"]),
        "images_per_s_rounds": {**compute, **loading},
        "multitask_flop_per_image": flops,
    }


def measure_step(spec: Spec) -> dict[str, Any]:
    """The multi-task step alone (compute only): the unit of the thread-settings comparison."""
    trainer = train_parser(spec).get_parsed_content("train#trainer")
    n = max(spec.warmup, spec.steps)
    brats = [next(batch for batch in replay_batches(trainer.data_loader, n) if "label" in batch)] * n
    timed_run(trainer, brats, spec.warmup)
    rounds = [timed_run(trainer, brats, spec.steps) for _ in range(spec.rounds)]
    return {"images_per_s_rounds": rounds, "torch_threads": torch.get_num_threads()}


# ----------------------------------------------------------------------------------------------------------------------
# Data pipeline


def timed_iteration(loader: Iterable, count: int, warmup: int) -> float:
    """Images per second the loader delivers over ``count`` batches after ``warmup`` untimed ones (a fresh
    iterator: a new epoch, the loader's workers started during the warm-up)."""
    batches = iter(cycle(loader))
    for _ in range(warmup):
        next(batches)
    start, images = time.perf_counter(), 0
    for _ in range(count):
        images += batch_images(next(batches))
    return images / (time.perf_counter() - start)


def measure_data(spec: Spec) -> dict[str, Any]:
    """Images per second of the stage-3 training loader with the configured cache and without one."""
    cached_parser = train_parser(spec)
    start = time.perf_counter()
    cached = cached_parser.get_parsed_content("train#dataloader")
    cache_fill_s = time.perf_counter() - start
    uncached = train_parser(spec, cache="none").get_parsed_content("train#dataloader")
    count = max(spec.steps * 2, 8)
    rounds = interleaved(
        {
            "cached": lambda: timed_iteration(cached, count, spec.warmup),
            "uncached": lambda: timed_iteration(uncached, count, spec.warmup),
        },
        spec.rounds,
    )
    return {
        "cache": str(cached_parser.get_parsed_content("cache")),
        "cache_fill_s": cache_fill_s,
        "batches_per_round": count,
        "images_per_s_rounds": rounds,
    }


def measure_training_memory(spec: Spec) -> dict[str, Any]:
    """Peak memory of the real stage-3 training (the configured cache filled, then training over the real loader):
    the trainer's RSS, and the whole process tree's PSS (the trainer and its loader workers, shared pages once)."""
    with TreeMemorySampler(os.getpid()) as sampler:
        trainer = train_parser(spec).get_parsed_content("train#trainer")
        timed_run(trainer, trainer.data_loader, spec.steps, spec.warmup)
    result = {"peak_rss_mib": peak_rss_mib(), "peak_tree_pss_mib": round(sampler.peak / MIB, 1)}
    if torch.device(trainer.state.device).type == "cuda":
        result["peak_gpu_allocated_mib"] = round(torch.cuda.max_memory_allocated() / MIB, 1)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Inference


class OnnxNetwork:
    """An ONNX Runtime session called like the multi-task network: ``f(x) -> {"seg": ..., "cls": ...}``.

    The graph is exported for volume slices (both outputs, domain 0): other arguments are refused.
    """

    def __init__(self, session: Any) -> None:
        self.session = session

    def __call__(
        self, x: torch.Tensor, do_seg: bool = True, do_cls: bool = True, domain: int = 0
    ) -> dict[str, torch.Tensor]:
        if not (do_seg and do_cls and domain == 0):
            raise ValueError("the ONNX graph computes both outputs of volume slices (domain 0) only")
        seg, cls = self.session.run(None, {"image": x.detach().cpu().numpy()})
        return {"seg": torch.from_numpy(seg), "cls": torch.from_numpy(cls)}


class OnDevice:
    """A module without parameters to tell its device (a frozen TorchScript module), fed on its device."""

    def __init__(self, module: Callable, device: torch.device) -> None:
        self.module, self.device = module, device

    def __call__(self, x: torch.Tensor, *args: Any) -> dict[str, torch.Tensor]:
        return self.module(x.to(self.device), *args)


class TupleOutputs(torch.nn.Module):
    """The multi-task network with a tuple output (ONNX export takes no dict output)."""

    def __init__(self, network: torch.nn.Module) -> None:
        super().__init__()
        self.network = network

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        outputs = self.network(x)
        return outputs["seg"], outputs["cls"]


def onnx_network(network: torch.nn.Module, example: torch.Tensor, path: Path) -> OnnxNetwork | str:
    """The network exported to ONNX and loaded in ONNX Runtime on the CPU, or why it cannot be (a note)."""
    try:
        import onnxruntime
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime onnx): ONNX Runtime column skipped"
    try:
        torch.onnx.export(
            TupleOutputs(network).eval(),
            (example,),
            str(path),
            input_names=["image"],
            output_names=["seg", "cls"],
            dynamic_axes={"image": {0: "batch"}, "seg": {0: "batch"}, "cls": {0: "batch"}},
            dynamo=False,
        )
    except Exception as error:  # an optional column: report why it is missing, measure the rest
        return f"ONNX export failed ({type(error).__name__}: {error}): ONNX Runtime column skipped"
    finally:
        network.eval()  # the exporter may leave the module in another mode
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return OnnxNetwork(onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]))


def inference_backends(
    network: torch.nn.Module, example: torch.Tensor, spec: Spec, notes: list[str]
) -> dict[str, Callable]:
    """The ways to run the network at inference, each ``f(x) -> {"seg", "cls"}``.

    - ``eager``: the network as ``inference.yaml`` builds it for a ``model.pt``.
    - ``eager_channels_last``: the same with NHWC weights (``performance_settings``).
    - ``torchscript``: ``torch.jit.script``, what ``ckpt_export`` writes to ``model.ts``.
    - ``torchscript_frozen``: that module frozen and optimised for inference (BatchNorm folded into the
      convolutions, weights pre-packed for oneDNN).
    - ``onnxruntime``: ONNX Runtime's CPU provider, when it is installed (else a note in ``notes``).

    Only those the spec names (``Spec.backends``), and eager always: it is what the others are compared with.
    """
    network = network.eval()
    device = next(network.parameters()).device
    wanted = set(BACKENDS if spec.backends is None else spec.backends) | {"eager"}
    makers: dict[str, Callable[[], Callable]] = {
        "eager": lambda: network,
        "eager_channels_last": lambda: performance_settings(copy.deepcopy(network), channels_last=True).eval(),
        "torchscript": lambda: torch.jit.script(network).eval(),
        "torchscript_frozen": lambda: OnDevice(
            torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.script(network).eval())), device
        ),
    }
    backends = {name: make() for name, make in makers.items() if name in wanted}
    if "onnxruntime" in wanted and spec.onnx and device.type == "cpu":
        session = onnx_network(network, example, Path(spec.work_dir) / "model.onnx")
        if isinstance(session, str):
            notes.append(session)
        else:
            backends["onnxruntime"] = session
    return backends


def fast_path_network(network: torch.nn.Module, settings: Any) -> torch.nn.Module:
    """A copy of the eager network as the fast path runs it (``predict.fast_layout``: channels_last on a CPU),
    whatever the config's ``fast_inference``: the benchmark compares the fast path with plain fp32 eager."""
    return predict.fast_layout(copy.deepcopy(network), dataclasses.replace(settings, fast_inference=True))


def mask_dice(first: np.ndarray, second: np.ndarray) -> float:
    """Dice between two 0/1 masks; 1 when both are empty (they agree)."""
    a, b = first.astype(bool), second.astype(bool)
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total


def eager_network(spec: Spec) -> tuple[torch.nn.Module, Any]:
    """The eager network and the inference settings. Random weights unless the spec names a checkpoint: latency
    does not depend on them, but masks do (a random network may call the zero background tumour, which the fast
    path, like a trained network, calls background), so the fast path's mask Dice means something only with
    trained weights."""
    parser = infer_parser(spec)
    network = parser.get_parsed_content("network_def")
    if spec.checkpoint:
        load_network_weights(network, torch.load(spec.checkpoint, map_location="cpu", weights_only=True), ())
    return network.to(parser.get_parsed_content("device")).eval(), parser.get_parsed_content("settings")


def first_volume(spec: Spec, settings: Any) -> Any:
    """The first BraTS case under the spec's volume folder, as an inference input."""
    volumes = [item for item in find_inputs(spec.volume_root, settings) if item.kind == "volume"]
    if not volumes:
        raise FileNotFoundError(f"no BraTS case under {spec.volume_root}")
    return volumes[0]


def timed(function: Callable[[], Any], device: torch.device | str = "cpu") -> tuple[float, Any]:
    """Seconds a call takes (its GPU work included), and what it returned."""
    start = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - start, result


def slice_latency(backend: Callable, one_slice: torch.Tensor, device: torch.device) -> float:
    """Median seconds of ``SLICE_CALLS`` consecutive calls on one slice: the steady state of a back-end (right
    after another back-end ran, the first call can take twice as long, as caches and thread pools change hands)."""
    return median([timed(lambda: backend(one_slice), device)[0] for _ in range(SLICE_CALLS)])


def agreement(reference: Mapping[str, torch.Tensor], other: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """How far another back-end's logits are from the eager network's, and whether they agree."""
    result: dict[str, Any] = {}
    agree = True
    for key in ("seg", "cls"):
        expected, got = reference[key].float(), other[key].float()
        result[f"max_abs_diff_{key}_logits"] = float((expected - got).abs().max())
        agree = agree and bool(torch.allclose(expected, got, atol=AGREEMENT_ATOL, rtol=AGREEMENT_RTOL))
    result["agree"] = agree
    return result


def measure_inference(spec: Spec) -> dict[str, Any]:
    """Latency per slice (batch of one) and per volume (read, slice batches through the network, mask back on the
    volume's grid), for every back-end, with their outputs compared against the eager network's; and the fast path
    (``predict.run_network`` with ``fast``, the network in ``predict.fast_layout``) per volume against
    plain fp32 eager over whole slices, with the Dice between their masks."""
    network, settings = eager_network(spec)
    device = next(network.parameters()).device
    item = first_volume(spec, settings)
    prepare_s, prepared = timed(lambda: predict.prepare(item, settings))
    stack = torch.as_tensor(prepared.image)
    one_slice = stack[len(stack) // 2 : len(stack) // 2 + 1].to(device)
    notes: list[str] = []
    backends = inference_backends(network, stack[: settings.slice_batch_size].to(device), spec, notes)
    fast = fast_path_network(network, settings)

    def run(backend: Callable, fast: bool = False, int8: bool = False) -> dict[str, torch.Tensor]:
        return predict.run_network(backend, prepared.image, settings.slice_batch_size, 0, fast, int8)

    int8 = settings.int8_inference

    # Every batch shape a volume gives (full batches, the last one's remainder, one slice) is run twice before the
    # clock starts: the first calls of a shape allocate, and TorchScript profiles and then specialises its graph.
    remainder = len(stack) % settings.slice_batch_size
    shapes = [one_slice, stack[: settings.slice_batch_size].to(device)] + (
        [stack[:remainder].to(device)] * bool(remainder)
    )
    with torch.inference_mode():
        for backend in backends.values():
            for batch in shapes + shapes:
                backend(batch)
        run(fast, fast=True, int8=int8)  # the fast path's shapes depend on the volume's brain box: a whole volume
        slice_rounds = interleaved(
            {name: (lambda b=backend: slice_latency(b, one_slice, device)) for name, backend in backends.items()},
            spec.slice_rounds,
        )
        outputs: dict[str, dict[str, torch.Tensor]] = {}

        def timed_volume(name: str, call: Callable[[], dict[str, torch.Tensor]]) -> float:
            seconds, outputs[name] = timed(call, device)  # the outputs are compared below
            return seconds

        contenders = {name: (lambda b=backend: run(b)) for name, backend in backends.items()}
        contenders["fast"] = lambda: run(fast, fast=True, int8=int8)
        if int8:  # the fast path's float32 variant (`int8_inference: false`), for the record
            contenders["fast_float32"] = lambda: run(fast, fast=True)
        network_rounds = interleaved(
            {name: (lambda n=name, c=call: timed_volume(n, c)) for name, call in contenders.items()},
            spec.volume_rounds,
        )
    finish_s, _ = timed(lambda: predict.finish(prepared, outputs["eager"], settings))
    fast_outputs = outputs.pop("fast")
    outputs.pop("fast_float32", None)  # timed only: the answers compared are the fast path's as it runs
    masks = {name: predict.finish(prepared, out, settings).mask for name, out in outputs.items()}
    fast_mask = predict.finish(prepared, fast_outputs, settings).mask
    return {
        "volume_shape": [int(s) for s in prepared.loaded.original_shape],
        "slices_analysed": len(stack),
        "slice_batch_size": settings.slice_batch_size,
        "notes": notes,
        "prepare_s": prepare_s,
        "finish_s": finish_s,
        "slice_latency_s_rounds": slice_rounds,
        "volume_network_s_rounds": network_rounds,
        "agreement": {
            name: {
                **agreement(outputs["eager"], out),
                "mask_equal_fraction": float((masks[name] == masks["eager"]).mean()),
            }
            for name, out in outputs.items()
            if name != "eager"
        },
        "weights": spec.checkpoint or "random",
        "fast_brain_box": box_shape(stack, network),
        "fast_int8": int8,
        "fast_vs_eager_fp32_mask_dice": mask_dice(fast_mask, masks["eager"]),
        "fast_vs_eager_fp32_max_tumour_probability_diff": float(
            (tumour_probability(fast_outputs) - tumour_probability(outputs["eager"])).abs().max()
        ),
    }


def box_shape(stack: torch.Tensor, network: torch.nn.Module) -> list[int] | None:
    """Height and width of the brain box the fast path decodes (None: whole slices)."""
    box = predict.brain_box(stack, predict.size_divisor(network))
    return None if box is None else [span.stop - span.start for span in box]


def tumour_probability(outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Per-slice tumour probabilities (softmax of the classification logits)."""
    return torch.softmax(outputs["cls"].float(), dim=1)[:, 1]


def measure_inference_memory(spec: Spec) -> dict[str, Any]:
    """Peak RSS of predicting one volume with the eager network, as ``inference.yaml`` runs a ``model.pt`` (the
    fast path when the config's ``fast_inference`` is on, its default)."""
    network, settings = eager_network(spec)
    predict.predict(predict.fast_layout(network, settings), first_volume(spec, settings), settings)
    return {"peak_rss_mib": peak_rss_mib()}


PHASES: dict[str, Callable[[Spec], dict[str, Any]]] = {
    "training": measure_training,
    "step": measure_step,
    "data": measure_data,
    "training_memory": measure_training_memory,
    "inference": measure_inference,
    "inference_memory": measure_inference_memory,
}
