"""int8 convolutions for the fast path on a CPU: the network's U-Net quantised per volume, calibrated on its slices.

PyTorch's FX post-training static quantisation (``x86`` engine: oneDNN/FBGEMM int8 kernels) needs plain
convolution-ReLU modules, where the network keeps its BatchNorm statistics per image domain
(:class:`scripts.networks.normalization.DomainBatchNorm2d`) and checks its input size in Python; MONAI has no
quantisation. So the encoder and the decoder are rebuilt from the network's weights (eager or TorchScript: only its
``state_dict`` is read) with the domain's BatchNorm folded into each convolution, traced once per network, and each
volume gets its own activation ranges from a few of its slices before its int8 pass. The classification head stays
float32 on the int8 encoder's bottleneck (it is a few thousand operations per slice).

On the full preset's network the fast path took 29.0 s per volume in int8 against 52.7 s in float32 on 2 CPU cores
(docs/performance.md); tests/test_fast_inference.py checks that masks and probabilities agree.
"""

from __future__ import annotations

import copy
import functools
import warnings
import weakref
from collections.abc import Mapping
from types import ModuleType

import numpy as np
import torch
from torch import nn

__all__ = ["QuantizedUNet", "folded_unet", "int8_available", "quantize_for_volume"]

ENGINE = "x86"
# Slices of a volume run through the observed float network to set its activation ranges: spread over the volume,
# so that tumour and tumour-free slices both count; each is one more float32 slice of work per volume.
CALIBRATION_SLICES = 8
BATCH_NORM_EPS = 1e-5  # DomainBatchNorm2d's, which the state dict does not carry


def int8_available(network: nn.Module) -> bool:
    """Whether the network can run int8 here: a CPU with PyTorch's x86 int8 engine, and BatchNorm to fold (a network
    with instance normalisation computes statistics per image, which int8 convolutions cannot absorb)."""
    state = network.state_dict()
    first = next(iter(state.values()), None)
    return (
        ENGINE in torch.backends.quantized.supported_engines
        and first is not None
        and first.device.type == "cpu"
        and "encoder.stem.norm1.running_mean" in state
    )


def _folded(state: Mapping[str, torch.Tensor], prefix: str, domain: int) -> nn.Sequential:
    """A DoubleConv (``prefix``: its state-dict prefix) as conv-ReLU-conv-ReLU, the domain's BatchNorm folded in."""
    layers: list[nn.Module] = []
    for index in (1, 2):
        weight = state[f"{prefix}conv{index}.weight"].float()
        mean, var = state[f"{prefix}norm{index}.running_mean"], state[f"{prefix}norm{index}.running_var"]
        row = min(max(domain, 0), mean.shape[0] - 1) if mean.dim() == 2 else None
        mean, var = (mean[row], var[row]) if row is not None else (mean, var)
        scale = state[f"{prefix}norm{index}.weight"] / torch.sqrt(var + BATCH_NORM_EPS)
        conv = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=weight.shape[-1], padding=weight.shape[-1] // 2)
        conv.weight.data = (weight * scale.view(-1, 1, 1, 1)).contiguous()
        conv.bias.data = state[f"{prefix}norm{index}.bias"] - mean * scale
        layers += [conv, nn.ReLU()]
    return nn.Sequential(*layers)


class _Encoder(nn.Module):
    def __init__(self, state: Mapping[str, torch.Tensor], depth: int, domain: int) -> None:
        super().__init__()
        self.stem = _folded(state, "encoder.stem.", domain)
        self.down = nn.ModuleList(
            nn.Sequential(nn.MaxPool2d(2), _folded(state, f"encoder.down.{level}.conv.", domain))
            for level in range(depth)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        features = [self.stem(x)]
        for block in self.down:
            features.append(block(features[-1]))
        return features


class _Decoder(nn.Module):
    def __init__(self, state: Mapping[str, torch.Tensor], depth: int) -> None:
        super().__init__()
        self.upsample, self.from_skip, self.from_below, self.rest = (nn.ModuleList() for _ in range(4))
        for step in range(depth):
            self.upsample.append(_upsampling(state, f"decoder.up.{step}.upsample."))
            # The first convolution of each level reads the encoder's features and the upsampled ones joined:
            # as two convolutions added, since int8 joining needs both sides on one scale, which PyTorch's FX
            # quantisation gives neither after the pixel shuffle (the masks then lost a few percent of Dice).
            first, relu, *rest = _folded(state, f"decoder.up.{step}.conv.", domain=0)
            skip_channels = first.in_channels // 2
            self.from_skip.append(_part(first, slice(0, skip_channels), bias=False))
            self.from_below.append(_part(first, slice(skip_channels, None), bias=True))
            self.rest.append(nn.Sequential(relu, *rest))
        weight = state["decoder.segmentation_head.weight"]
        self.head = nn.Conv2d(weight.shape[1], weight.shape[0], kernel_size=1)
        self.head.load_state_dict({"weight": weight, "bias": state["decoder.segmentation_head.bias"]})

    def forward(self, features: list[torch.Tensor]) -> torch.Tensor:
        x = features[-1]
        for step in range(len(self.upsample)):
            below = self.upsample[step](x)
            x = self.rest[step](self.from_skip[step](features[-2 - step]) + self.from_below[step](below))
        return self.head(x)


def _part(conv: nn.Conv2d, channels: slice, bias: bool) -> nn.Conv2d:
    """The convolution ``conv`` restricted to some of its input channels (its bias on one part only)."""
    weight = conv.weight.data[:, channels]
    part = nn.Conv2d(weight.shape[1], weight.shape[0], conv.kernel_size, padding=conv.padding, bias=bias)
    part.weight.data = weight.contiguous()
    if bias:
        part.bias.data = conv.bias.data.clone()
    return part


def _upsampling(state: Mapping[str, torch.Tensor], prefix: str) -> nn.Sequential:
    """The decoder's 2x2 stride-2 transposed convolution as the 1x1 convolution and pixel shuffle it equals.

    Output pixel ``(2i + a, 2j + b)`` of channel ``c`` is input pixel ``(i, j)`` weighted by ``W[:, c, a, b]``: a
    1x1 convolution to channels ``(c, a, b)``, which ``PixelShuffle(2)`` lays out. PyTorch's x86 int8 transposed
    convolution gave outputs off by more than their own size (relative error 1.3 against float on random data, torch
    2.13), its 1x1 convolution 0.02.
    """
    weight, bias = state[f"{prefix}weight"], state[f"{prefix}bias"]  # (in, out, 2, 2), (out,)
    channels_in, channels_out, size, _ = weight.shape
    conv = nn.Conv2d(channels_in, channels_out * size * size, kernel_size=1)
    conv.weight.data = weight.permute(1, 2, 3, 0).reshape(-1, channels_in, 1, 1).contiguous()
    conv.bias.data = bias.repeat_interleave(size * size)
    return nn.Sequential(conv, nn.PixelShuffle(size))


@functools.cache
def _quantize_fx() -> ModuleType:
    """``torch.ao.quantization.quantize_fx``, imported without leaving freed operators in TorchScript's builtins
    (once per process: the import is what frees them).

    Why: importing it defines more ``quantized_decomposed`` overloads through ``torch.library``, which swaps the
    function behind an existing operator packet; TorchScript's table of builtins, keyed by ``id()``, keeps the freed
    function's address (torch 2.13). An object later allocated there (a Conv2d's padding list, say) then scripts
    as that operator, and ``torch.jit.script`` of a model fails at random with "builtin cannot be used as a value".
    """
    from torch.ao.quantization import quantize_fx

    table = torch.jit._builtins._get_builtin_table()
    for address in stale_builtins():
        del table[address]
    return quantize_fx


def stale_builtins() -> dict[int, str]:
    """Entries of TorchScript's table of builtins whose operator packet now holds another function (address ->
    qualified name): what :func:`_quantize_fx` removes."""
    stale = {}
    for address, qualified_name in torch.jit._builtins._get_builtin_table().items():
        namespace, _, name = qualified_name.partition("::")
        if namespace in ("aten", "prim"):  # these also name Python functions (torch.add is aten::add)
            continue
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is not None and id(packet._op) != address:
            stale[address] = qualified_name
    return stale


def _qconfig_mapping() -> object:
    from torch.ao.quantization import get_default_qconfig_mapping

    # The first convolution (it reads the z-scored image, whose tails 8 bits would cut) and the segmentation head
    # (its logits are the masks' threshold) stay float32: a few operations per pixel each.
    return get_default_qconfig_mapping(ENGINE).set_module_name("stem.0", None).set_module_name("head", None)


def folded_unet(network: nn.Module, domain: int = 0) -> tuple[nn.Module, nn.Module]:
    """The network's encoder and decoder as plain float32 modules, the domain's BatchNorm folded into the
    convolutions: what is quantised. ``encoder(x)`` gives the feature maps of ``network.features(x, domain)`` and
    ``decoder(features)`` the segmentation logits of ``network.decoder(features)``, up to rounding.

    Args:
        network: The multi-task network with BatchNorm (eager or TorchScript).
        domain: The image domain whose statistics are folded in.
    """
    state = {key: value.detach().float() for key, value in network.state_dict().items()}
    depth = sum(1 for key in state if key.endswith(".upsample.weight"))
    return _Encoder(state, depth, domain).eval(), _Decoder(state, depth).eval()


class _Observed:
    """The folded encoder and decoder of one network and domain with FX observers in place, traced once."""

    def __init__(self, network: nn.Module, domain: int, example: torch.Tensor) -> None:
        quantize_fx = _quantize_fx()
        encoder, decoder = folded_unet(network, domain)
        torch.backends.quantized.engine = ENGINE
        with warnings.catch_warnings():  # PyTorch announces the move of FX quantisation to torchao on every call
            warnings.simplefilter("ignore")
            with torch.no_grad():
                features = encoder(example)
            self.encoder = quantize_fx.prepare_fx(encoder, _qconfig_mapping(), example_inputs=(example,))
            self.decoder = quantize_fx.prepare_fx(decoder, _qconfig_mapping(), example_inputs=(features,))


_observed: weakref.WeakKeyDictionary[nn.Module, dict[int, _Observed]] = weakref.WeakKeyDictionary()


class QuantizedUNet:
    """A network's int8 encoder and decoder for one volume, with its own float32 classification head.

    It offers what :func:`scripts.inference.predict.run_network` calls part by part: ``features``, ``decoder`` and
    ``cls_head``.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module, cls_head: nn.Module) -> None:
        self._encoder, self.decoder, self.cls_head = encoder, decoder, cls_head

    def features(self, x: torch.Tensor, domain: int = 0) -> list[torch.Tensor]:
        return self._encoder(x.contiguous(memory_format=torch.channels_last))


def quantize_for_volume(network: nn.Module, stack: torch.Tensor, domain: int) -> QuantizedUNet:
    """The network in int8 for one volume's ``(K, C, S, S)`` stack, calibrated on up to ``CALIBRATION_SLICES`` of
    its whole slices (the decoder later runs on the brain box, where the activations are those of the same brain).

    Args:
        network: The multi-task network (eager or TorchScript), in eval mode on the CPU.
        stack: The volume's slices, as the network takes them.
        domain: The image domain, whose BatchNorm statistics are folded in.
    """
    quantize_fx = _quantize_fx()
    picks = np.unique(np.linspace(0, stack.shape[0] - 1, min(CALIBRATION_SLICES, stack.shape[0])).round().astype(int))
    sample = stack[torch.as_tensor(picks)].float()
    per_network = _observed.setdefault(network, {})
    if domain not in per_network:
        per_network[domain] = _Observed(network, domain, sample[:1])
    observed = per_network[domain]
    encoder, decoder = copy.deepcopy(observed.encoder), copy.deepcopy(observed.decoder)
    with torch.no_grad():
        decoder(encoder(sample))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoder, decoder = quantize_fx.convert_fx(encoder), quantize_fx.convert_fx(decoder)
    return QuantizedUNet(encoder, decoder, network.cls_head)
