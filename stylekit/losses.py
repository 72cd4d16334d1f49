"""The canonical Gatys et al. loss terms, each a small function of tensors.

Grams and losses are always computed in float32, whatever precision produced the features.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class _SelfProduct(torch.autograd.Function):
    """F Fᵀ whose backward is one product, (dG + dGᵀ) F, where autograd's is two plus a sum."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(flat)
        return flat @ flat.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (flat,) = ctx.saved_tensors
        both = grad + grad.transpose(1, 2)  # symmetric: (dG + dGᵀ) F = (Fᵀ (dG + dGᵀ))ᵀ
        if flat.stride(1) == 1:  # channels-last features: the gradient in their layout, no copy
            return (flat.transpose(1, 2) @ both).transpose(1, 2)
        return both @ flat


def _as_matrix(features: torch.Tensor) -> torch.Tensor:
    """N×C×H×W → N×C×(H·W) as a view in either memory layout (a reshape copies channels-last)."""
    n, c, h, w = features.shape
    if features.is_contiguous(memory_format=torch.channels_last) and not features.is_contiguous():
        return features.permute(0, 2, 3, 1).reshape(n, h * w, c).transpose(1, 2)
    return features.reshape(n, c, h * w)


def gram(features: torch.Tensor) -> torch.Tensor:
    """G = F Fᵀ / (C·H·W) per image (N×C×C), so Grams compare across layer sizes."""
    _, c, h, w = features.shape
    flat = _as_matrix(features.float())
    product = _SelfProduct.apply(flat) if flat.requires_grad else flat @ flat.transpose(1, 2)
    return product / (c * h * w)


def content_loss(features: Mapping[str, torch.Tensor],
                 targets: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared feature difference, summed over the content layers (per image: N values)."""
    terms = [(features[name].float() - target.float()).pow(2).flatten(1).mean(1)
             for name, target in targets.items()]
    return torch.stack(terms).sum(0)


def style_loss(features: Mapping[str, torch.Tensor], target_grams: Mapping[str, torch.Tensor],
               layer_weights: Mapping[str, float]) -> torch.Tensor:
    """Weighted sum over style layers of the mean squared Gram difference (per image: N values)."""
    terms = [layer_weights[name] * (gram(features[name]) - target.float()).pow(2).flatten(1).mean(1)
             for name, target in target_grams.items()]
    return torch.stack(terms).sum(0)


def tv_loss(image: torch.Tensor) -> torch.Tensor:
    """Total variation: mean squared difference of neighbouring pixels (per image: N values)."""
    dy = (image[:, :, 1:, :] - image[:, :, :-1, :]).float().pow(2).flatten(1).mean(1)
    dx = (image[:, :, :, 1:] - image[:, :, :, :-1]).float().pow(2).flatten(1).mean(1)
    return dx + dy


def blend_grams(grams: Sequence[Mapping[str, torch.Tensor]],
                blend: Sequence[float]) -> dict[str, torch.Tensor]:
    """Weighted mean of several styles' Grams: the same gradient as the weighted mean of their losses."""
    total = float(sum(blend))
    return {name: sum(w / total * g[name] for w, g in zip(blend, grams, strict=True))
            for name in grams[0]}
