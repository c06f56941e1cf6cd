"""The multi-task network: shapes, parameter counts, freezing, scripting and checkpoint compatibility."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
import torch
from conftest import BUNDLE_ROOT, REPO_ROOT

from scripts.networks import (
    CheckpointMismatchError,
    ClassificationHead,
    MultiTaskModel,
    UNetDecoder,
    UNetEncoder,
    create_multi_task_model,
    create_segmentation_unet,
    load_network_weights,
    require_fitting_weights,
    segmentation_state_dict,
)
from scripts.networks.normalization import DomainBatchNorm2d, is_batch_norm

SMALL = {"base_filters": 8, "depth": 3}


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_counts(in_channels: int, base: int, depth: int, hidden: int, classes: int, out: int) -> dict[str, int]:
    """Parameter counts from the architecture's definition, layer by layer, independent of the code under test."""

    def double_conv(cin: int, cout: int) -> int:  # two bias-free 3x3 convs, each with BatchNorm (weight + bias)
        return 9 * cin * cout + 2 * cout + 9 * cout * cout + 2 * cout

    channels = [base * 2**level for level in range(depth + 1)]
    encoder = double_conv(in_channels, channels[0]) + sum(
        double_conv(channels[i], channels[i + 1]) for i in range(depth)
    )
    decoder = sum(
        4 * channels[i + 1] * channels[i] + channels[i] + double_conv(2 * channels[i], channels[i])
        for i in range(depth)
    )
    decoder += channels[0] * out + out
    head = channels[-1] * hidden + hidden + hidden * classes + classes
    return {"encoder": encoder, "decoder": decoder, "cls_head": head, "total": encoder + decoder + head}


@pytest.fixture(scope="module")
def default_model() -> MultiTaskModel:
    return create_multi_task_model().eval()


@pytest.mark.parametrize("in_channels", [1, 4])
@pytest.mark.parametrize("size", [256, 128])
def test_output_and_feature_shapes(in_channels: int, size: int) -> None:
    model = create_multi_task_model(in_channels=in_channels).eval()
    x = torch.randn(2, in_channels, size, size)
    with torch.no_grad():
        out = model(x)
        features = model.features(x)
    assert set(out) == {"seg", "cls"}
    assert out["seg"].shape == (2, 1, size, size)
    assert out["cls"].shape == (2, 2)
    expected = [(2, 64 * 2**level, size // 2**level, size // 2**level) for level in range(5)]
    assert [tuple(f.shape) for f in features] == expected


def test_flags_return_only_what_was_asked(default_model: MultiTaskModel) -> None:
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        assert set(default_model(x, do_seg=True, do_cls=False)) == {"seg"}
        assert set(default_model(x, do_seg=False, do_cls=True)) == {"cls"}
        assert default_model(x, do_seg=False, do_cls=False) == {}


def test_parameter_counts_at_seed_defaults(default_model: MultiTaskModel) -> None:
    expected = expected_counts(in_channels=1, base=64, depth=4, hidden=256, classes=2, out=1)
    actual = {name: count(getattr(default_model, name)) for name in ("encoder", "decoder", "cls_head")}
    actual["total"] = count(default_model)
    assert actual == expected
    assert actual["cls_head"] / actual["total"] < 0.01


def test_readme_reports_the_real_parameter_counts(default_model: MultiTaskModel) -> None:
    readme = (REPO_ROOT / "README.md").read_text()
    for label, module in [
        ("Encoder", default_model.encoder),
        ("Decoder", default_model.decoder),
        ("Classification head", default_model.cls_head),
        ("Total", default_model),
    ]:
        row = re.search(rf"^\| \*?\*?{label}\*?\*? \| \*?\*?([\d,]+)", readme, flags=re.MULTILINE)
        assert row is not None, f"README has no parameter row for {label}"
        assert int(row.group(1).replace(",", "")) == count(module), label


def _train_step(model: MultiTaskModel, x: torch.Tensor) -> None:
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    loss = out["seg"].mean() + out["cls"].logsumexp(1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


@pytest.mark.parametrize("component", ["encoder", "decoder", "cls_head"])
def test_frozen_component_gets_no_gradient_and_keeps_batchnorm_statistics(component: str) -> None:
    torch.manual_seed(0)
    model = create_multi_task_model(**SMALL)
    getattr(model, f"freeze_{component}")()
    model.train()
    frozen = getattr(model, component)
    weights_before = {k: v.clone() for k, v in frozen.state_dict().items()}
    others_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(component)}

    _train_step(model, torch.randn(4, 1, 32, 32) * 3 + 1)

    assert all(p.grad is None for p in frozen.parameters())
    assert not any(m.training for m in frozen.modules())
    for key, value in frozen.state_dict().items():
        assert torch.equal(value, weights_before[key]), f"{component}.{key} moved while frozen"
    moved = [k for k, v in model.state_dict().items() if k in others_before and not torch.equal(v, others_before[k])]
    assert moved, "the unfrozen components did not train"


def test_unfreeze_restores_training() -> None:
    model = create_multi_task_model(**SMALL)
    model.freeze_encoder()
    model.unfreeze_encoder()
    model.train()
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.encoder.modules())


def test_every_trainable_parameter_receives_a_gradient() -> None:
    model = create_multi_task_model(**SMALL).train()
    out = model(torch.randn(2, 1, 32, 32))
    (out["seg"].square().mean() + out["cls"].square().mean()).backward()
    without = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert without == []


def test_scripted_model_round_trip_matches_eager(tmp_path) -> None:
    torch.manual_seed(0)
    model = create_multi_task_model(in_channels=4, **SMALL).eval()
    path = tmp_path / "model.ts"
    torch.jit.save(torch.jit.script(model), str(path))
    loaded = torch.jit.load(str(path))
    x = torch.randn(3, 4, 48, 48)
    with torch.no_grad():
        for do_seg, do_cls in [(True, True), (True, False), (False, True)]:
            eager, scripted = model(x, do_seg, do_cls), loaded(x, do_seg=do_seg, do_cls=do_cls)
            assert set(eager) == set(scripted)
            for key in eager:
                torch.testing.assert_close(scripted[key], eager[key], atol=1e-5, rtol=1e-5)
        for eager_f, scripted_f in zip(model.features(x), loaded.features(x), strict=True):
            torch.testing.assert_close(scripted_f, eager_f, atol=1e-5, rtol=1e-5)


def test_indivisible_input_is_a_clear_error() -> None:
    model = create_multi_task_model(**SMALL)
    with pytest.raises(ValueError, match=r"divisible by 2\*\*depth = 8, got 36x40"):
        model(torch.randn(1, 1, 36, 40))
    with pytest.raises(torch.jit.Error, match="divisible by 2"):
        torch.jit.script(model)(torch.randn(1, 1, 36, 40))


def test_segmentation_checkpoint_loads_with_fresh_head_only() -> None:
    torch.manual_seed(1)
    unet = create_segmentation_unet(**SMALL).eval()
    torch.manual_seed(2)
    model = create_multi_task_model(**SMALL).eval()
    head_before = {k: v.clone() for k, v in model.cls_head.state_dict().items()}

    fresh = load_network_weights(model, {"model": unet.state_dict()})

    assert fresh == sorted(f"cls_head.{k}" for k in head_before)
    for key, value in model.cls_head.state_dict().items():
        assert torch.equal(value, head_before[key])
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x, do_cls=False)["seg"], unet(x))


def test_segmentation_state_dict_extracted_from_multi_task_checkpoint() -> None:
    model = create_multi_task_model(**SMALL).eval()
    ddp_style = {"state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}
    unet = create_segmentation_unet(**SMALL).eval()
    unet.load_state_dict(segmentation_state_dict(ddp_style), strict=True)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(unet(x), model(x, do_cls=False)["seg"])


def test_mismatched_checkpoint_names_missing_and_unexpected_keys() -> None:
    model = create_multi_task_model(**SMALL)
    state = model.state_dict()
    state["encoder.extra.weight"] = state.pop("decoder.segmentation_head.weight")
    with pytest.raises(CheckpointMismatchError) as error:
        load_network_weights(model, state)
    message = str(error.value)
    assert "Missing keys (1): decoder.segmentation_head.weight" in message
    assert "Unexpected keys (1): encoder.extra.weight" in message


def test_checkpoint_of_another_size_names_the_shape_mismatch() -> None:
    other = create_multi_task_model(base_filters=4, depth=3)
    with pytest.raises(CheckpointMismatchError, match=r"encoder\.stem\.conv1\.weight: checkpoint \(4, 1, 3, 3\)"):
        load_network_weights(create_multi_task_model(**SMALL), other.state_dict())


def test_a_model_file_of_another_network_names_the_settings_to_fix(tmp_path) -> None:
    path = tmp_path / "model.pt"
    torch.save(create_multi_task_model(**SMALL).state_dict(), path)
    settings = {"base_filters": 16, "depth": 3}
    require_fitting_weights(create_multi_task_model(**SMALL), path, settings)  # fits: nothing to say
    with pytest.raises(CheckpointMismatchError) as error:
        require_fitting_weights(create_multi_task_model(base_filters=16, depth=3), path, settings)
    message = str(error.value)
    assert message.startswith(f"{path} does not fit the network this config builds (shape mismatches: ")
    assert "base_filters 16" in message and "Add the preset (configs/*.yaml) the model was trained with" in message
    assert len(message) < 1000, "one message, not a line per tensor"


def test_components_are_swappable_parts() -> None:
    encoder = UNetEncoder(in_channels=4, base_filters=8, depth=2)
    model = MultiTaskModel(
        encoder, UNetDecoder(base_filters=8, depth=2, out_channels=3), ClassificationHead(32, num_classes=4)
    )
    out = model(torch.randn(1, 4, 16, 16))
    assert out["seg"].shape == (1, 3, 16, 16) and out["cls"].shape == (1, 4)


def test_public_names_import_with_the_bundle_on_sys_path() -> None:
    code = (
        "from scripts.networks import UNetEncoder, UNetDecoder, ClassificationHead, MultiTaskModel, "
        "create_multi_task_model\nimport torch\nm = create_multi_task_model().eval()\n"
        "out = m(torch.zeros(1, 1, 256, 256))\nprint(tuple(out['seg'].shape), tuple(out['cls'].shape))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BUNDLE_ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    assert result.stdout.strip() == "(1, 1, 256, 256) (1, 2)"


def test_instance_norm_variant_normalises_each_image_alone_and_scripts() -> None:
    torch.manual_seed(0)
    batch_norm, instance_norm = create_multi_task_model(**SMALL), create_multi_task_model(norm="instance", **SMALL)
    assert count(instance_norm) == count(batch_norm)  # same learnt scale and shift per channel
    assert not any(is_batch_norm(m) for m in instance_norm.modules())
    instance_norm.eval()
    x = torch.randn(4, 1, 32, 32)
    with torch.no_grad():
        alone = instance_norm(x[:1])["seg"]
        together = instance_norm(x)["seg"][:1]  # no statistic is shared between the images of a batch
        torch.testing.assert_close(alone, together, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.jit.script(instance_norm)(x)["cls"], instance_norm(x)["cls"])
    with pytest.raises(ValueError, match="norm must be one of"):
        create_multi_task_model(norm="group", **SMALL)


def test_one_domain_batchnorm_is_pytorch_batchnorm() -> None:
    torch.manual_seed(0)
    reference, layer = torch.nn.BatchNorm2d(6), DomainBatchNorm2d(6)
    x = torch.randn(8, 6, 5, 5) * 3 + 2
    for _ in range(3):
        torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.running_mean[0], reference.running_mean)
    torch.testing.assert_close(layer.running_var[0], reference.running_var)
    layer.eval(), reference.eval()
    torch.testing.assert_close(layer(x, domain=1), reference(x))  # one set of statistics serves every domain


def test_each_domain_keeps_its_own_statistics_and_shares_the_scale_and_shift() -> None:
    torch.manual_seed(0)
    layer = DomainBatchNorm2d(3, num_domains=2)
    slices, images = torch.randn(16, 3, 4, 4), torch.randn(16, 3, 4, 4) * 5 + 10
    layer(slices, domain=0)
    assert layer.running_mean[1].abs().max() == 0, "a batch of domain 0 moved domain 1's statistics"
    layer(images, domain=1)
    assert layer.running_mean[1].min() > 0.9 > layer.running_mean[0].abs().max()  # 0.1 of the batch means ~10 and ~0
    assert layer.num_batches_tracked.tolist() == [1, 1]
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    layer.eval()
    # Each domain's images come out normalised by their own statistics, not the other domain's.
    assert (layer(images, domain=1) - layer(images, domain=0)).abs().mean() > 1


def test_two_domain_model_has_the_seed_parameters_and_scripts_with_a_domain() -> None:
    torch.manual_seed(0)
    one, two = create_multi_task_model(**SMALL), create_multi_task_model(num_domains=2, **SMALL)
    assert count(two) == count(one)
    two.load_state_dict(two.state_dict())
    with torch.no_grad():
        for module in two.encoder.modules():  # distinct statistics per domain, so the domain must matter
            if isinstance(module, DomainBatchNorm2d):
                module.running_mean[1].normal_()
    two.eval()
    scripted = torch.jit.script(two)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        for domain in (0, 1):
            eager = two(x, domain=domain)
            torch.testing.assert_close(scripted(x, True, True, domain)["cls"], eager["cls"])
            torch.testing.assert_close(scripted(x, True, True, domain)["seg"], eager["seg"])
        assert not torch.allclose(two(x, domain=0)["cls"], two(x, domain=1)["cls"])
    assert not any(m.num_domains > 1 for m in two.decoder.modules() if isinstance(m, DomainBatchNorm2d))


def test_avgmax_head_sees_the_average_and_the_maximum_of_each_channel() -> None:
    torch.manual_seed(0)
    head = ClassificationHead(in_channels=4, num_classes=2, hidden_dim=3, dropout=0.0, pooling="avgmax").eval()
    assert count(head) == (2 * 4) * 3 + 3 + 3 * 2 + 2
    spot, flat = torch.zeros(1, 4, 6, 6), torch.zeros(1, 4, 6, 6)
    spot[0, :, 2, 3] = 36.0  # one bright position...
    flat[...] = 1.0  # ...against the same average spread evenly: only the maximum tells them apart
    with torch.no_grad():
        assert not torch.allclose(head(spot), head(flat))
        avg_only = ClassificationHead(in_channels=4, hidden_dim=3, dropout=0.0).eval()
        torch.testing.assert_close(avg_only(spot), avg_only(flat))
        torch.testing.assert_close(torch.jit.script(head)(spot), head(spot))
    model = create_multi_task_model(cls_pooling="avgmax", **SMALL)
    assert count(model) == count(create_multi_task_model(**SMALL)) + model.encoder.out_channels[-1] * 256
    with pytest.raises(ValueError, match="pooling must be one of"):
        ClassificationHead(pooling="median")
