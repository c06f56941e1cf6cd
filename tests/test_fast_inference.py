"""The fast volume path (``fast_inference``, on by default) against plain fp32 eager over whole slices.

Same answers on a generated full-size volume (240x240x155, slices at the full preset's 256 px) with a small network
fitted for a few seconds, so that its masks and probabilities mean something; then the pieces: the brain box, the
paste-back, the settings, the memory layout, and the bundle config passing the path on to the inferer.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, run_cli
from monai.bundle import ConfigWorkflow
from test_export import TinyModel, tiny_model

from scripts.data.slices import extract_slices
from scripts.data.volumes import find_cases, load_case
from scripts.inference import predict as predict_module
from scripts.inference.inputs import find_inputs
from scripts.inference.predict import (
    BACKGROUND_LOGIT,
    brain_box,
    fast_layout,
    predict,
    prepare,
    run_network,
    size_divisor,
)
from scripts.inference.quantized import folded_unet, int8_available, stale_builtins
from scripts.inference.settings import make_settings, settings_from_config
from scripts.networks import create_multi_task_model
from scripts.networks.normalization import DomainBatchNorm2d

FULL_SIZE = 256  # configs/full.yaml's image_size and depth; a small network, so that the test takes seconds
FULL_SIZE_NETWORK = {"base_filters": 4, "depth": 4, "num_domains": 2}
FAST = make_settings(FULL_SIZE, 1)
WHOLE = make_settings(FULL_SIZE, 1, fast_inference=False)
# Issue 15's "same answers".
MIN_DICE = 0.99
MAX_PROBABILITY_DIFFERENCE = 0.01
MAX_INT8_SLICE_PROBABILITY_DIFFERENCE = 0.03
PATCH = 64  # the segmentation is fitted on windows of the 256 px slices: the pixel scale of inference, less work


@pytest.fixture(scope="module")
def full_size_brats(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One BraTS-2021-layout case at the generator's full size, 240x240x155."""
    out = tmp_path_factory.mktemp("full_size") / "data"
    run_cli([sys.executable, "scripts/make_synthetic_data.py", "--out", str(out), "--brats-cases", "1",
             "--kaggle-per-class", "2", "--duplicates", "0", "--seed", "11"])  # fmt: skip
    return out / "brats"


def _windows(images: torch.Tensor, masks: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Eight PATCH x PATCH windows, half of them centred on tumour (it is a few percent of the pixels)."""
    tumour = torch.nonzero(masks[:, 0])
    picked = []
    for index in range(8):
        if index % 2 == 0:
            z, y, x = tumour[torch.randint(len(tumour), (1,), generator=generator)][0].tolist()
        else:
            z = int(torch.randint(len(images), (1,), generator=generator))
            y, x = torch.randint(FULL_SIZE, (2,), generator=generator).tolist()
        top, left = (min(max(c - PATCH // 2, 0), FULL_SIZE - PATCH) for c in (y, x))
        picked.append((z, slice(top, top + PATCH), slice(left, left + PATCH)))
    return tuple(torch.stack([t[z, :, rows, cols] for z, rows, cols in picked]) for t in (images, masks))


def _fit(images: torch.Tensor, masks: torch.Tensor) -> torch.nn.Module:
    """A few seconds of fitting: the segmentation on windows, then the classification head alone on the whole
    slices' bottlenecks, so that its probabilities depend on the whole slice as a trained head's do (an encoder run
    on a crop would then move them)."""
    torch.manual_seed(0)
    network = create_multi_task_model(**FULL_SIZE_NETWORK)
    optimiser = torch.optim.Adam(network.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(80):
        window, target = _windows(images, masks, generator)
        seg = network(window, do_cls=False)["seg"]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(seg, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    network.eval()
    with torch.no_grad():
        bottleneck = torch.cat([network.features(batch)[-1] for batch in images.split(16)])
    labels = (masks.flatten(1).sum(1) > 0).long()
    head = network.cls_head.train()
    optimiser = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(100):
        loss = torch.nn.functional.cross_entropy(head(bottleneck), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return network.eval()


@pytest.fixture(scope="module")
def fitted(full_size_brats: Path) -> torch.nn.Module:
    slices, _ = extract_slices(load_case(find_cases(full_size_brats)[0]), size=FULL_SIZE)
    images = torch.from_numpy(np.stack([s.image for s in slices]))
    masks = torch.from_numpy(np.stack([s.mask for s in slices])).float()
    return _fit(images, masks)


def _dice(first: np.ndarray, second: np.ndarray) -> float:
    a, b = first.astype(bool), second.astype(bool)
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def _probabilities(report: dict[str, Any]) -> np.ndarray:
    return np.array([s["tumour_probability"] for s in report["slices"] if s["analysed"]])


@pytest.mark.parametrize("int8", [True, False])
def test_the_fast_path_gives_the_masks_and_probabilities_of_whole_slices(
    int8: bool, fitted: torch.nn.Module, full_size_brats: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = dataclasses.replace(FAST, int8_inference=int8)
    quantised = _spy(monkeypatch, "quantize_for_volume")
    (item,) = find_inputs(full_size_brats, settings)
    whole = predict(fitted, item, WHOLE)
    fast = predict(fast_layout(copy.deepcopy(fitted), settings), item, settings)
    assert len(quantised) == int8  # once per volume
    # What is compared is not trivial: a mask of a few percent of the voxels, slices on both sides of 0.5, and a
    # brain box well inside the slice.
    assert 0 < whole.mask.sum() < 0.05 * whole.mask.size
    assert _probabilities(whole.report).min() < 0.5 < _probabilities(whole.report).max()
    rows, cols = brain_box(torch.from_numpy(prepare(item, FAST).image), size_divisor(fitted))
    assert (rows.stop - rows.start) * (cols.stop - cols.start) < 0.8 * FULL_SIZE**2
    assert fast.mask.shape == whole.mask.shape and fast.mask.dtype == whole.mask.dtype
    assert _dice(fast.mask, whole.mask) >= MIN_DICE
    for key in ("max_tumour_probability", "mean_tumour_probability"):
        assert fast.report["volume"][key] == pytest.approx(whole.report["volume"][key], abs=MAX_PROBABILITY_DIFFERENCE)
    # Slice by slice, int8 moves a probability by up to a few hundredths (0.014 at most here).
    per_slice = MAX_INT8_SLICE_PROBABILITY_DIFFERENCE if int8 else MAX_PROBABILITY_DIFFERENCE
    assert np.abs(_probabilities(fast.report) - _probabilities(whole.report)).max() <= per_slice
    assert fast.report["volume"]["predicted_class"] == whole.report["volume"]["predicted_class"]
    assert fast.report["preprocessing"]["fast_inference"] is True
    assert fast.report["preprocessing"]["int8_inference"] is int8
    assert whole.report["preprocessing"]["fast_inference"] is False


# ---- the pieces


def test_the_brain_box_covers_every_slice_and_channel_on_the_divisor_grid() -> None:
    stack = torch.zeros(3, 2, 64, 64)
    stack[0, 0, 10:20, 30:35] = 1.0
    stack[2, 1, 40, 5:9] = -2.0  # z-scored brain is negative too
    assert brain_box(stack, 8) == (slice(8, 48), slice(0, 40))
    assert brain_box(stack, 16) == (slice(0, 48), slice(0, 48))
    assert brain_box(stack, None) is None  # a network that does not say its divisor: whole slices
    assert brain_box(stack, 48) is None  # a slice the network cannot take: it fails as it would whole
    assert brain_box(torch.zeros(2, 1, 64, 64), 8) is None
    assert brain_box(torch.ones(2, 1, 64, 64), 8) is None  # the box would be the whole slice


def _tiny_random_network() -> torch.nn.Module:
    torch.manual_seed(1)
    network = create_multi_task_model(base_filters=4, depth=3, num_domains=2).eval()
    with torch.no_grad():  # other BatchNorm statistics per domain, so that a lost domain shows
        network(torch.randn(4, 1, 32, 32) * 3.0 + 1.0, domain=1)
    return network


@pytest.mark.parametrize("domain", [0, 1])
def test_the_cropped_run_pastes_background_around_the_box_and_keeps_the_classification(domain: int) -> None:
    network = _tiny_random_network()
    stack = torch.zeros(5, 1, 32, 32)
    stack[:, :, 9:20, 12:23] = torch.randn(5, 1, 11, 11)
    whole = run_network(network, stack, 2, domain)
    cropped = run_network(network, stack, 2, domain, fast=True)
    assert cropped["seg"].shape == whole["seg"].shape == (5, 1, 32, 32)
    # The encoder runs whole: the classification is the whole slice's.
    torch.testing.assert_close(cropped["cls"], whole["cls"], atol=1e-5, rtol=1e-5)
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False  # the box, aligned to 2**3
    assert torch.all(cropped["seg"][..., outside] == BACKGROUND_LOGIT)
    assert not torch.equal(cropped["seg"][..., 8:24, 8:24], torch.full((5, 1, 16, 16), BACKGROUND_LOGIT))


def test_a_network_that_cannot_be_cropped_runs_whole_slices() -> None:
    network = _tiny_random_network()
    stack = torch.zeros(2, 1, 32, 32)
    stack[:, :, 9:20, 12:23] = 1.0

    def opaque(x: torch.Tensor, *args: Any) -> dict[str, torch.Tensor]:  # no parts, no divisor (e.g. a runtime)
        return network(x, *args)

    assert size_divisor(opaque) is None and size_divisor(network) == 8
    torch.testing.assert_close(run_network(opaque, stack, 2, fast=True), run_network(network, stack, 2))


def test_fast_inference_is_a_setting_on_by_default() -> None:
    base = {"image_size": 64, "in_channels": 1}
    # A model.ts exported before the setting existed carries configs without it: the fast path.
    assert settings_from_config(base, "old model").fast_inference is True
    assert settings_from_config({**base, "fast_inference": False}, "config").fast_inference is False
    # `monai.bundle run --fast_inference false` passes the text.
    assert make_settings(64, 1, fast_inference="false").fast_inference is False
    with pytest.raises(ValueError, match="fast_inference must be true or false"):
        make_settings(64, 1, fast_inference="sometimes")
    assert make_settings(64, 1).summary()["fast_inference"] is True
    assert settings_from_config(base, "old model").int8_inference is True
    assert make_settings(64, 1, int8_inference="false").int8_inference is False
    assert make_settings(64, 1).summary()["int8_inference"] is True


def _channels_last(network: torch.nn.Module) -> bool:
    # Kernels whose two layouts differ (a 1x1 kernel or a single input channel has the same strides in both).
    weights = [p for p in network.parameters() if p.dim() == 4 and p.shape[1] > 1 and p.shape[-1] > 1]
    return all(w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous() for w in weights)


@pytest.mark.parametrize("scripted", [False, True])
def test_the_fast_layout_is_channels_last_on_a_cpu_and_only_when_asked(scripted: bool) -> None:
    def network() -> torch.nn.Module:
        eager = _tiny_random_network()
        return torch.jit.script(eager) if scripted else eager

    off = network()
    assert fast_layout(off, make_settings(32, 1, fast_inference=False)) is off and not _channels_last(off)
    on = network()
    stack = torch.randn(2, 1, 32, 32)
    expected = run_network(on, stack, 2)
    assert fast_layout(on, make_settings(32, 1)) is on and _channels_last(on)
    torch.testing.assert_close(run_network(on, stack, 2), expected, atol=1e-5, rtol=1e-5)


# ---- the bundle config passes the path on


def padded_volume(source: Path, target: Path, margin: int) -> Path:
    """``source`` with ``margin`` zero voxels added around each in-plane side: a wider field of view, so that the
    brain box is smaller than the slice even at the tests' tiny slice size."""
    image = nib.load(source)
    voxels = np.pad(np.asanyarray(image.dataobj), ((margin, margin), (margin, margin), (0, 0)))
    affine = image.affine.copy()
    affine[:3, 3] -= image.affine[:3, :2] @ np.array([margin, margin])
    nib.save(nib.Nifti1Image(voxels, affine), target)
    return target


@pytest.fixture(scope="module")
def model(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_model(synthetic_small, tmp_path_factory)


def _spy(monkeypatch: pytest.MonkeyPatch, name: str = "_forward_decoding_box") -> list[int]:
    """Count the calls of a function of scripts.inference.predict (by default: the batches decoded on a brain
    box; ``quantize_for_volume``: the volumes run in int8)."""
    calls: list[int] = []
    original: Callable = getattr(predict_module, name)

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(predict_module, name, counted)
    return calls


@pytest.mark.parametrize(
    ("fast_inference", "int8_inference", "model_file"),
    [(True, True, "model.pt"), (True, True, "model.ts"), (False, True, "model.pt"), (False, True, "model.ts"),
     (True, False, "model.pt")],
)  # fmt: skip
def test_the_inference_config_runs_the_fast_path_unless_turned_off(
    fast_inference: bool,
    int8_inference: bool,
    model_file: str,
    model: TinyModel,
    synthetic_small: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    case = find_cases(synthetic_small / "brats")[0]
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    padded_volume(case.modality_files["flair"], inputs / "wide.nii.gz", margin=32)
    calls = _spy(monkeypatch)
    quantised = _spy(monkeypatch, "quantize_for_volume")
    workflow = ConfigWorkflow(
        config_file=[str(BUNDLE_ROOT / "configs" / "inference.yaml"), str(model.preset)],
        workflow_type="infer",
        bundle_root=str(BUNDLE_ROOT),
        dataset_dir=str(inputs),
        output_dir=str(tmp_path / "out"),
        ckpt_dir=str(model.ckpt_dir),
        model_file=str(model.ckpt_dir / model_file),
        fast_inference=fast_inference,
        int8_inference=int8_inference,
    )
    workflow.initialize()
    workflow.run()
    network = workflow.parser.get_parsed_content("network")
    assert _channels_last(network) is fast_inference
    assert bool(calls) is fast_inference
    assert len(quantised) == (fast_inference and int8_inference)  # one volume
    assert (tmp_path / "out" / "wide_pred_wt.nii.gz").is_file()
    # The volume does have a box to crop to at this size.
    (item,) = find_inputs(inputs, model.settings)
    assert brain_box(torch.from_numpy(prepare(item, model.settings).image), size_divisor(network)) is not None


# ---- int8


def test_the_folded_network_is_the_network_for_each_domain() -> None:
    """What int8 quantises computes what the network does: BatchNorm of the domain folded into the convolutions,
    the transposed convolution as a 1x1 convolution and pixel shuffle, the joined features as two convolutions."""
    network = _tiny_random_network()
    with torch.no_grad():  # statistics of domain 1 unlike domain 0's, so that folding the wrong ones shows
        for layer in network.encoder.modules():
            if isinstance(layer, DomainBatchNorm2d):
                layer.running_mean[1] += 0.5
                layer.running_var[1] *= 2.0
    scripted = torch.jit.script(network)
    x = torch.randn(3, 1, 32, 32)
    for domain in (0, 1):
        encoder, decoder = folded_unet(scripted, domain)  # a model.ts gives its weights as the eager network does
        with torch.no_grad():
            features, expected = encoder(x), network.features(x, domain)
            for got, want in zip(features, expected, strict=True):
                torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(decoder(features), network.decoder(expected), atol=1e-5, rtol=1e-4)
    other_domain, _ = folded_unet(network, 1)
    with torch.no_grad():
        assert not torch.allclose(other_domain(x)[0], network.features(x, 0)[0], atol=1e-3)


def test_int8_runs_only_on_networks_with_batch_norm_on_a_cpu() -> None:
    assert int8_available(_tiny_random_network())
    assert not int8_available(create_multi_task_model(base_filters=4, depth=3, norm="instance").eval())
    network = create_multi_task_model(base_filters=4, depth=3, norm="instance").eval()
    stack = torch.zeros(2, 1, 32, 32)
    stack[:, :, 9:20, 12:23] = torch.randn(2, 1, 11, 11)
    # Asked for int8, a network that cannot be quantised runs the float fast path.
    torch.testing.assert_close(
        run_network(network, stack, 2, fast=True, int8=True), run_network(network, stack, 2, fast=True)
    )


def test_int8_is_the_same_for_the_eager_and_the_torchscript_network(fitted: torch.nn.Module) -> None:
    stack = torch.zeros(6, 1, 64, 64)
    stack[:, :, 8:56, 12:52] = torch.randn(6, 1, 48, 40)
    eager = run_network(fitted, stack, 4, fast=True, int8=True)
    scripted = run_network(torch.jit.script(copy.deepcopy(fitted)), stack, 4, fast=True, int8=True)
    torch.testing.assert_close(scripted, eager)
    # and not the float path's to the last bit: int8 did run
    assert not torch.equal(eager["seg"], run_network(fitted, stack, 4, fast=True)["seg"])


def test_int8_leaves_no_freed_operator_among_torchscripts_builtins() -> None:
    """Importing FX quantisation swaps operator functions under torch.library (torch 2.13); a freed one left in
    TorchScript's id-keyed table of builtins made a later ``torch.jit.script`` fail whenever an object landed at its
    address (the suite's "builtin cannot be used as a value", at random)."""
    network = _tiny_random_network()
    stack = torch.zeros(4, 1, 32, 32)
    stack[:, :, 9:20, 12:23] = torch.randn(4, 1, 11, 11)
    run_network(network, stack, 2, fast=True, int8=True)
    assert not stale_builtins()
    torch.jit.script(_tiny_random_network())  # and scripting a fresh network works
