"""Backbone networks as named-layer feature extractors (VGG19, VGG16, ResNet-50 from torchvision).

This module knows networks and tensors only: no files, no downloads (see weights.py for those).
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneSpec:
    """What the engine needs to know about a backbone: its layer names and default layer sets."""

    name: str
    layers: tuple[str, ...]
    content_layers: tuple[str, ...]
    style_layers: tuple[str, ...]


def _vgg_layer_names(cfg: list) -> list[str]:
    """Name every module of torchvision's VGG `features` the way the style-transfer papers do."""
    names: list[str] = []
    block, index = 1, 1
    for item in cfg:
        if item == "M":
            names.append(f"pool{block}")
            block, index = block + 1, 1
        else:
            names += [f"conv{block}_{index}", f"relu{block}_{index}"]
            index += 1
    return names


_VGG_CFG = {"vgg19": torchvision.models.vgg.cfgs["E"], "vgg16": torchvision.models.vgg.cfgs["D"]}
_RESNET_LAYERS = ("conv1", "relu", "pool", "layer1", "layer2", "layer3", "layer4")
_GATYS_STYLE = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")

BACKBONES: dict[str, BackboneSpec] = {
    "vgg19": BackboneSpec("vgg19", tuple(_vgg_layer_names(_VGG_CFG["vgg19"])), ("relu4_2",),
                          _GATYS_STYLE),
    "vgg16": BackboneSpec("vgg16", tuple(_vgg_layer_names(_VGG_CFG["vgg16"])), ("relu4_2",),
                          _GATYS_STYLE),
    "resnet50": BackboneSpec("resnet50", _RESNET_LAYERS, ("layer2",),
                             ("relu", "layer1", "layer2", "layer3")),
}


def backbone_spec(name: str) -> BackboneSpec:
    """Look a backbone up by name, with the list of valid names in the error."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone '{name}' (choose from {', '.join(BACKBONES)})") from None


def build_network(backbone: str) -> nn.Module:
    """The torchvision definition without its classifier (saves ~500 MiB for VGG), untrained."""
    if backbone in _VGG_CFG:
        model = nn.Module()
        model.features = torchvision.models.vgg.make_layers(_VGG_CFG[backbone], batch_norm=False)
        return model
    if backbone == "resnet50":
        model = torchvision.models.resnet50(weights=None)
        model.fc = nn.Identity()
        return model
    backbone_spec(backbone)
    raise AssertionError("unreachable")


def network_state_keys(backbone: str) -> dict[str, torch.Size]:
    """The parameter and buffer names and shapes a weights file must provide for `backbone`."""
    return {k: v.shape for k, v in build_network(backbone).state_dict().items()}


def _named_stages(model: nn.Module, backbone: str) -> list[tuple[str, nn.Module]]:
    """The network as an ordered list of (layer name, module) pairs."""
    if backbone in _VGG_CFG:
        return list(zip(BACKBONES[backbone].layers, model.features, strict=True))
    stem = nn.Sequential(model.conv1, model.bn1)
    return [("conv1", stem), ("relu", model.relu), ("pool", model.maxpool),
            ("layer1", model.layer1), ("layer2", model.layer2), ("layer3", model.layer3),
            ("layer4", model.layer4)]


_WeightCopies = dict[int, tuple[torch.Tensor, torch.Tensor]]
"""Convolution weights by id: (the weight itself, its low-precision copy)."""


class FeatureExtractor(nn.Module):
    """Maps images in [0, 1] (N×3×H×W, RGB) to a dict of raw activations at the named layers.

    ImageNet normalisation happens inside so callers never have to remember it, and the network is
    cut after the deepest requested layer so no work is wasted on layers nobody reads.
    """

    def __init__(self, backbone: str, state_dict: dict[str, torch.Tensor],
                 layers: Iterable[str], pooling: str = "max") -> None:
        super().__init__()
        spec = backbone_spec(backbone)
        self.layers = tuple(dict.fromkeys(layers))
        unknown = [name for name in self.layers if name not in spec.layers]
        if unknown:
            raise ValueError(f"unknown layer '{unknown[0]}' for {backbone} "
                             f"(valid: {', '.join(spec.layers)})")
        if pooling not in ("max", "avg"):
            raise ValueError(f"unknown pooling '{pooling}' (choose max or avg)")
        model = build_network(backbone)
        model.load_state_dict(state_dict, strict=True)
        cut = max(spec.layers.index(name) for name in self.layers) + 1
        stages = _named_stages(model, backbone)[:cut]
        self.names = [name for name, _ in stages]
        self.stages = nn.ModuleList(_with_pooling(module, pooling) for _, module in stages)
        self.blocks = _blocks(self.names, self.stages)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)
        for module in self.modules():
            if isinstance(module, nn.ReLU):
                module.inplace = False
        self._low_weights: dict[tuple[torch.dtype, torch.device], _WeightCopies] = {}

    def forward(self, image: torch.Tensor, checkpoint: bool = False,
                gradient_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Run the network once and keep only the requested activations.

        With `checkpoint`, activations inside each block (up to a pooling layer) are not kept for the
        backward pass but recomputed: about a third more compute for the memory of a huge image.
        With `gradient_dtype`, the convolutions' gradients to their inputs run in that precision
        (bf16: about twice as fast on CPUs with native bf16) while the forward pass, and so every
        activation and loss, stays in the image's precision.
        """
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        low = self._low_precision_weights(gradient_dtype) if gradient_dtype else None
        out: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x, *kept = torch.utils.checkpoint.checkpoint(self._run_block, block, x, low,
                                                             use_reentrant=False)
            else:
                x, *kept = self._run_block(block, x, low)
            out.update(zip([self.names[i] for i in block if self.names[i] in self.layers], kept,
                           strict=True))
        return out

    def _run_block(self, block: tuple[int, ...], x: torch.Tensor,
                   low_weights: _WeightCopies | None = None) -> tuple[torch.Tensor, ...]:
        """One block: its output, then the requested activations inside it, in block order."""
        kept = []
        with _LowPrecisionInputGradients(low_weights) if low_weights else nullcontext():
            for index in block:
                x = self.stages[index](x)
                if self.names[index] in self.layers:
                    kept.append(x)
        return (x, *kept)

    def _low_precision_weights(self, dtype: torch.dtype) -> _WeightCopies:
        """Each convolution weight's copy in `dtype` (made once: the weights are frozen)."""
        device = self.mean.device
        if (dtype, device) not in self._low_weights:
            self._low_weights[dtype, device] = {
                id(module.weight): (module.weight, module.weight.detach().to(dtype))
                for module in self.stages.modules() if isinstance(module, nn.Conv2d)}
        return self._low_weights[dtype, device]


class _LowPrecisionInputGradient(torch.autograd.Function):
    """A convolution as given, whose input gradient is computed from a low-precision weight copy.

    The weights are frozen, so the input gradient is the whole backward of a convolution.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                low_weight: torch.Tensor, stride, padding, dilation, groups: int) -> torch.Tensor:
        ctx.input_shape, ctx.low_weight = x.shape, low_weight
        ctx.geometry = (stride, padding, dilation, groups)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        low = ctx.low_weight
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, low, grad.to(low.dtype),
                                                *ctx.geometry)
        return grad_input.to(grad.dtype), None, None, None, None, None, None, None


class _LowPrecisionInputGradients(TorchFunctionMode):
    """Routes the network's own convolutions (known by weight id) through the function above."""

    def __init__(self, low_weights: _WeightCopies) -> None:
        super().__init__()
        self.low_weights = low_weights

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # nn.Conv2d calls conv2d(input, weight, bias, stride, padding, dilation, groups).
        if func is torch.conv2d and len(args) == 7 and not kwargs:
            weight, low = self.low_weights.get(id(args[1]), (None, None))
            if (weight is args[1] and args[0].requires_grad and torch.is_grad_enabled()
                    and not isinstance(args[4], str)):
                return _LowPrecisionInputGradient.apply(*args[:3], low, *args[3:])
        return func(*args, **(kwargs or {}))


def _blocks(names: list[str], stages: Iterable[nn.Module]) -> list[tuple[int, ...]]:
    """Stage indices split after each pooling layer and around composite stages (checkpoint units)."""
    blocks: list[tuple[int, ...]] = [()]
    for index, (name, stage) in enumerate(zip(names, stages, strict=True)):
        blocks[-1] += (index,)
        if isinstance(stage, (nn.MaxPool2d, nn.AvgPool2d)) or not name.startswith(("conv", "relu")):
            blocks.append(())
    return [block for block in blocks if block]


def _with_pooling(module: nn.Module, pooling: str) -> nn.Module:
    """Swap max pooling for average pooling (Gatys found it gives smoother results)."""
    if pooling == "avg" and isinstance(module, nn.MaxPool2d):
        return nn.AvgPool2d(module.kernel_size, module.stride, module.padding,
                            ceil_mode=module.ceil_mode)
    return module
