"""TorchScript export with `python -m monai.bundle ckpt_export`: embedded files, loading, eager agreement, checks.

The model used here (and by test_inference.py and test_deploy.py, through :func:`tiny_model`) is the tiny network
of TINY_OVERRIDES, fitted for a few seconds on synthetic slices so that its masks are neither empty nor full, saved
as a state dict like training's model.pt and exported with the real CLI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import BUNDLE_ROOT, REPO_ROOT, SHIPPED_METADATA, TINY_SIZE
from monai.data import load_net_with_metadata

from scripts.data.slices import extract_slices
from scripts.data.volumes import find_cases, load_case
from scripts.inference.model import embedded_configs, inference_network, settings_from_model
from scripts.inference.settings import InferenceSettings, make_settings
from scripts.networks import create_multi_task_model

INFERENCE = "bundle/configs/inference.yaml"
METADATA = SHIPPED_METADATA  # not the working file, which the demo rewrites for its own weights
TINY_NETWORK = {"base_filters": 8, "depth": 3, "num_domains": 2}  # num_domains as in inference.yaml
TOLERANCE = 1e-4


@dataclass(frozen=True)
class TinyModel:
    """A trained-ish tiny model and its export."""

    preset: Path  # the preset file the model was "trained" and exported with
    ckpt_dir: Path  # holds model.pt and model.ts, as bundle/models does
    settings: InferenceSettings

    @property
    def checkpoint(self) -> Path:
        return self.ckpt_dir / "model.pt"

    @property
    def torchscript(self) -> Path:
        return self.ckpt_dir / "model.ts"

    def eager(self) -> torch.nn.Module:
        network = create_multi_task_model(**TINY_NETWORK)
        network.load_state_dict(torch.load(self.checkpoint, map_location="cpu", weights_only=True))
        return network.eval()


def run_tool(args: list[str], check: bool = True, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a command from the repository root with bundle/ importable, as the export docs do (PYTHONPATH=bundle)."""
    env = {**os.environ, "PYTHONPATH": str(BUNDLE_ROOT), "OMP_NUM_THREADS": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    result = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-6000:]}")
    return result


def export_command(ckpt_dir: Path, preset: Path) -> list[str]:
    """The export command of docs/inference.md for a checkpoint folder and preset."""
    return [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def",
        "--filepath", str(ckpt_dir / "model.ts"), "--ckpt_file", str(ckpt_dir / "model.pt"),
        "--meta_file", str(METADATA), "--config_file", repr([INFERENCE, str(preset)]), "--bundle_root", "bundle",
    ]  # fmt: skip


def _training_slices(brats: Path) -> tuple[torch.Tensor, torch.Tensor]:
    images, masks = [], []
    for case in find_cases(brats)[:3]:
        slices, _ = extract_slices(load_case(case), size=TINY_SIZE)
        images += [s.image for s in slices]
        masks += [s.mask for s in slices]
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)).float()


def _fit(images: torch.Tensor, masks: torch.Tensor) -> torch.nn.Module:
    """A few seconds of fitting: enough for masks that are neither empty nor everywhere.

    On two threads, whatever the environment says: the fit's float sums depend on the thread count, and the model
    fitted on one thread (OMP_NUM_THREADS=1) left some test volumes with empty masks, which the Deploy test refuses.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return _fit_steps(images, masks)
    finally:
        torch.set_num_threads(threads)


def _fit_steps(images: torch.Tensor, masks: torch.Tensor) -> torch.nn.Module:
    torch.manual_seed(0)
    network = create_multi_task_model(**TINY_NETWORK)
    optimiser = torch.optim.Adam(network.parameters(), lr=1e-2)
    labels = (masks.flatten(1).sum(1) > 0).long()
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        batch = torch.randint(0, len(images), (16,), generator=generator)
        outputs = network(images[batch])
        seg = torch.nn.functional.binary_cross_entropy_with_logits(
            outputs["seg"], masks[batch], pos_weight=torch.tensor(3.0)
        )
        loss = seg + torch.nn.functional.cross_entropy(outputs["cls"], labels[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    # Statistics of their own for 2D images (domain 1), unlike the slices': inference that mixed up the domains
    # would then give other outputs than the network called with the right one.
    with torch.no_grad():
        for _ in range(5):
            network(images[:16] * 2.0 + 1.0, do_seg=False, domain=1)
    return network.eval()


def tiny_model(synthetic: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    """Fit, save and export the tiny model once per test session (shared by the export, inference and deploy tests)."""
    root = tmp_path_factory.getbasetemp() / "tiny_model"
    preset = root / "tiny.yaml"
    settings = make_settings(TINY_SIZE, 1, slice_batch_size=8)
    model = TinyModel(preset, root / "models", settings)
    if model.torchscript.is_file():
        return model
    shutil.rmtree(root, ignore_errors=True)
    model.ckpt_dir.mkdir(parents=True)
    preset.write_text(
        f"base_filters: {TINY_NETWORK['base_filters']}\ndepth: {TINY_NETWORK['depth']}\n"
        f"image_size: {TINY_SIZE}\nbatch_size: 8\n"
    )
    torch.save(_fit(*_training_slices(synthetic / "brats")).state_dict(), model.checkpoint)
    run_tool(export_command(model.ckpt_dir, preset))
    return model


@pytest.fixture(scope="module")
def model(synthetic_small: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyModel:
    return tiny_model(synthetic_small, tmp_path_factory)


def test_export_embeds_metadata_and_configs(model: TinyModel) -> None:
    names = zipfile.ZipFile(model.torchscript).namelist()
    assert {"model/extra/metadata.json", "model/extra/inference.json", "model/extra/tiny.json"} <= set(names)
    network, metadata, extra = load_net_with_metadata(
        str(model.torchscript), map_location="cpu", more_extra_files=("inference.json", "tiny.json")
    )
    expected = json.loads(METADATA.read_text())
    assert metadata["version"] == expected["version"] and metadata["name"] == expected["name"]
    assert set(metadata["network_data_format"]["outputs"]) == {"pred", "cls"}
    inference = json.loads(extra["inference.json"])
    assert inference["network_def"]["_target_"] == "scripts.networks.create_multi_task_model"
    assert json.loads(extra["tiny.json"])["image_size"] == TINY_SIZE
    assert isinstance(network, torch.jit.ScriptModule)


def test_exported_and_eager_outputs_agree_on_random_and_real_inputs(model: TinyModel, synthetic_small: Path) -> None:
    eager = model.eager()
    scripted, _, _ = load_net_with_metadata(str(model.torchscript), map_location="cpu")
    scripted.eval()
    real, masks = _training_slices(synthetic_small / "brats")
    random = torch.randn(5, 1, TINY_SIZE, TINY_SIZE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for inputs in (random, real):
            expected, exported = eager(inputs), scripted(inputs)
            assert set(exported) == {"seg", "cls"}
            assert exported["seg"].shape == (len(inputs), 1, TINY_SIZE, TINY_SIZE)
            assert exported["cls"].shape == (len(inputs), 2)
            for key in ("seg", "cls"):
                assert (exported[key] - expected[key]).abs().max().item() <= TOLERANCE, key
        # The task flags survive scripting: a classification-only call skips the decoder.
        assert set(scripted(real[:2], False, True)) == {"cls"}
    # The fitted model is not trivial: its masks are neither empty nor everywhere.
    predicted = torch.sigmoid(expected["seg"]) > 0.5
    assert 0 < predicted.sum() < 0.5 * predicted.numel() and masks.sum() > 0


def test_verify_net_in_out_passes_on_the_segmentation_view(model: TinyModel) -> None:
    # The demo preset in between: training presets must layer over the inference config.
    result = run_tool([
        sys.executable, "-m", "monai.bundle", "verify_net_in_out", "seg_view", "--meta_file", str(METADATA),
        "--config_file", repr([INFERENCE, "configs/demo.yaml", str(model.preset)]), "--bundle_root", "bundle",
        "--device", "cpu",
    ])  # fmt: skip
    assert "data shape of network is verified with no error" in result.stdout + result.stderr


def test_settings_come_from_the_embedded_configs_even_after_renaming(model: TinyModel, tmp_path: Path) -> None:
    assert settings_from_model(model.torchscript) == model.settings
    renamed = tmp_path / "brain_tumour_v1.ts"
    shutil.copy(model.torchscript, renamed)
    assert [name for name, _ in embedded_configs(renamed)] == ["inference.json", "tiny.json"]
    assert settings_from_model(renamed) == model.settings


def test_a_model_ts_with_other_preprocessing_settings_is_refused(model: TinyModel) -> None:
    with pytest.raises(ValueError, match=r"exported with image_size 32 \(this run: 256\).*tiny\.json"):
        inference_network(model.torchscript, None, "cpu", make_settings(256, 1))
    with pytest.raises(ValueError, match="in_channels 1"):
        inference_network(model.torchscript, None, "cpu", make_settings(TINY_SIZE, 4))
    network = inference_network(model.torchscript, None, "cpu", model.settings)
    assert isinstance(network, torch.jit.ScriptModule) and not network.training
