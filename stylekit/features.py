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

from . import winograd
from .backbones import BACKBONES, VGG_CFGS, backbone_spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_network(backbone: str) -> nn.Module:
    """The torchvision definition without its classifier (saves ~500 MiB for VGG), untrained."""
    if backbone in VGG_CFGS:
        model = nn.Module()
        model.features = torchvision.models.vgg.make_layers(VGG_CFGS[backbone], batch_norm=False)
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
    if backbone in VGG_CFGS:
        return list(zip(BACKBONES[backbone].layers, model.features, strict=True))
    stem = nn.Sequential(model.conv1, model.bn1)
    modules = (stem, model.relu, model.maxpool, model.layer1, model.layer2, model.layer3, model.layer4)
    return list(zip(BACKBONES[backbone].layers, modules, strict=True))


@dataclass(frozen=True)
class _Convolution:
    """How the gradient path runs one of the network's convolutions."""

    weight: torch.Tensor  # the network's own weight, matched by identity
    gradient_weight: torch.Tensor  # what the input gradient uses: a low-precision copy, or the weight
    winograd: torch.Tensor | None  # its Winograd kernels, where that is faster than conv2d
    winograd_gradient: torch.Tensor | None  # those of its input gradient, when that runs in fp32


_Convolutions = dict[int, _Convolution]
"""The network's convolutions by the id of their weight."""


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
        self._convolutions: dict[tuple[torch.dtype | None, bool, torch.device], _Convolutions] = {}

    def forward(self, image: torch.Tensor, checkpoint: bool = False,
                gradient_dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """Run the network once and keep only the requested activations.

        With `checkpoint`, activations inside each block (up to a pooling layer) are not kept for the
        backward pass but recomputed: about a third more compute for the memory of a huge image.
        With `gradient_dtype`, the convolutions' gradients to their inputs run in that precision
        (bf16: about twice as fast on CPUs with native bf16) while the forward pass, and so every
        activation and loss, stays in the image's precision. On the CPU in fp32, the gradient path
        runs the deep 3×3 convolutions' forward as Winograd convolutions (see winograd.py);
        forward-only passes, which compute the targets, keep the direct convolution.
        """
        x = (image - self.mean.to(image.dtype)) / self.std.to(image.dtype)
        use_winograd = (image.device.type == "cpu" and image.dtype == torch.float32
                        and not torch.is_autocast_enabled("cpu"))
        # Only the image can carry a gradient (the weights are frozen): forward-only passes run
        # the plain modules, without the routing mode's per-operation dispatch.
        on_gradient_path = torch.is_grad_enabled() and image.requires_grad
        routed = (self._routed_convolutions(gradient_dtype, use_winograd, image.device)
                  if on_gradient_path and (gradient_dtype or use_winograd) else None)
        out: dict[str, torch.Tensor] = {}
        for block in self.blocks:
            if checkpoint and torch.is_grad_enabled() and x.requires_grad:
                x, *kept = torch.utils.checkpoint.checkpoint(self._run_block, block, x, routed,
                                                             use_reentrant=False)
            else:
                x, *kept = self._run_block(block, x, routed)
            out.update(zip([self.names[i] for i in block if self.names[i] in self.layers], kept,
                           strict=True))
        return out

    def _run_block(self, block: tuple[int, ...], x: torch.Tensor,
                   routed: _Convolutions | None = None) -> tuple[torch.Tensor, ...]:
        """One block: its output, then the requested activations inside it, in block order."""
        kept = []
        with _RoutedConvolutions(routed) if routed else nullcontext():
            for index in block:
                x = self.stages[index](x)
                if self.names[index] in self.layers:
                    kept.append(x)
        return (x, *kept)

    def _routed_convolutions(self, gradient_dtype: torch.dtype | None, use_winograd: bool,
                             device: torch.device) -> _Convolutions:
        """Each convolution's gradient weight and Winograd kernels (made once: weights are frozen)."""
        key = (gradient_dtype, use_winograd, device)
        if key not in self._convolutions:
            self._convolutions[key] = {}
            for conv in self.stages.modules():
                if isinstance(conv, nn.Conv2d):
                    fast = use_winograd and winograd.pays_off(conv.weight, conv.stride, conv.padding,
                                                             conv.dilation, conv.groups)
                    self._convolutions[key][id(conv.weight)] = _Convolution(
                        conv.weight, conv.weight.detach().to(gradient_dtype or conv.weight.dtype),
                        winograd.transform_weight(conv.weight) if fast else None,
                        winograd.transform_weight(conv.weight, transposed=True)
                        if fast and gradient_dtype is None else None)
        return self._convolutions[key]


class _RoutedConvolution(torch.autograd.Function):
    """A convolution whose forward may run as Winograd and whose input gradient may run from a
    low-precision weight copy. The weights are frozen, so the input gradient is the whole backward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                how: _Convolution, stride, padding, dilation, groups: int) -> torch.Tensor:
        ctx.input_shape, ctx.how = x.shape, how
        ctx.geometry = (stride, padding, dilation, groups)
        ctx.fits = winograd.fits(x)  # the gradient has the input's size: one decision for both
        if how.winograd is not None and ctx.fits:
            return winograd.conv3x3(x, how.winograd, bias)
        return F.conv2d(x, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.how.winograd_gradient is not None and ctx.fits:
            return (winograd.conv3x3(grad, ctx.how.winograd_gradient, None),
                    None, None, None, None, None, None, None)
        weight = ctx.how.gradient_weight
        grad_input = torch.nn.grad.conv2d_input(ctx.input_shape, weight, grad.to(weight.dtype),
                                                *ctx.geometry)
        return grad_input.to(grad.dtype), None, None, None, None, None, None, None


class _RoutedConvolutions(TorchFunctionMode):
    """Routes the network's own convolutions (known by weight id) on the gradient path through the
    function above; forward-only passes are left alone."""

    def __init__(self, convolutions: _Convolutions) -> None:
        super().__init__()
        self.convolutions = convolutions

    def __torch_function__(self, func, types, args=(), kwargs=None):
        # nn.Conv2d calls conv2d(input, weight, bias, stride, padding, dilation, groups).
        if func is torch.conv2d and len(args) == 7 and not kwargs:
            how = self.convolutions.get(id(args[1]))
            if (how is not None and how.weight is args[1] and args[0].requires_grad
                    and torch.is_grad_enabled() and not isinstance(args[4], str)):
                return _RoutedConvolution.apply(*args[:3], how, *args[3:])
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
