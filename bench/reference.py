"""THE REFERENCE — a plain textbook Gatys loop, the yardstick stylekit is measured against.

Written the way the PyTorch neural-style tutorial does it: full resolution only, L-BFGS (lr 1, 20
iterations per step call), fp32, the input clamped in the closure, a fixed budget of loss
evaluations. It deliberately shares no code with stylekit (only torchvision's VGG definition), so a
bug in stylekit's losses cannot hide by being copied here. The loss is the same canonical one.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchvision

MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
# Module indices of torchvision's vgg19.features after each ReLU the canonical loss reads.
RELU_INDEX = {"relu1_1": 1, "relu2_1": 6, "relu3_1": 11, "relu4_1": 20, "relu4_2": 22, "relu5_1": 29}
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"


@dataclass
class ReferenceRun:
    """What the reference produced: the image, losses, and (seconds, total loss) per evaluation."""

    image: torch.Tensor
    content_loss: float
    style_loss: float
    total_loss: float
    seconds: float
    history: list[tuple[float, float]] = field(default_factory=list)


def _vgg(state_dict: dict, device: torch.device) -> torch.nn.Sequential:
    features = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs["E"])
    features.load_state_dict({k.removeprefix("features."): v for k, v in state_dict.items()
                              if k.startswith("features.")})
    for module in features:
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False
    return features[: RELU_INDEX["relu5_1"] + 1].to(device).eval().requires_grad_(False)


def _features(vgg: torch.nn.Sequential, image: torch.Tensor) -> dict[str, torch.Tensor]:
    x = (image - MEAN.to(image.device)) / STD.to(image.device)
    out = {}
    wanted = {index: name for name, index in RELU_INDEX.items()}
    for index, module in enumerate(vgg):
        x = module(x)
        if index in wanted:
            out[wanted[index]] = x
    return out


def _gram(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    f = x.view(n * c, h * w)
    return f @ f.t() / (n * c * h * w)


def _losses(vgg: torch.nn.Sequential, x: torch.Tensor, content_target: torch.Tensor,
            style_targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    features = _features(vgg, x)
    c = F.mse_loss(features[CONTENT_LAYER], content_target)
    s = sum(F.mse_loss(_gram(features[k]), style_targets[k]) for k in STYLE_LAYERS)
    tv = (x[:, :, 1:] - x[:, :, :-1]).pow(2).mean() + (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).mean()
    return c, s, tv


def score(image: torch.Tensor, content: torch.Tensor, style: torch.Tensor, state_dict: dict, *,
          content_weight: float = 1.0, style_weight: float = 1e6, tv_weight: float = 10.0,
          ) -> dict[str, float]:
    """The reference's own verdict on any image at full size: content, style and total loss."""
    vgg = _vgg(state_dict, content.device)
    with torch.no_grad():
        content_target = _features(vgg, content)[CONTENT_LAYER]
        style_targets = {k: _gram(v) for k, v in _features(vgg, style).items() if k in STYLE_LAYERS}
        c, s, tv = _losses(vgg, image.float().clamp(0, 1), content_target, style_targets)
    return {"content_loss": c.item(), "style_loss": s.item(),
            "total_loss": (content_weight * c + style_weight * s + tv_weight * tv).item()}


def run_reference(content: torch.Tensor, style: torch.Tensor, state_dict: dict, *, steps: int = 300,
                  content_weight: float = 1.0, style_weight: float = 1e6, tv_weight: float = 10.0,
                  ) -> ReferenceRun:
    """Stylise `content` (1×3×H×W in [0, 1]) towards `style`, already at their final sizes."""
    start = time.perf_counter()
    vgg = _vgg(state_dict, content.device)
    with torch.no_grad():
        content_target = _features(vgg, content)[CONTENT_LAYER].detach()
        style_targets = {k: _gram(v).detach() for k, v in _features(vgg, style).items() if k in STYLE_LAYERS}
    image = content.clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([image])
    history: list[tuple[float, float]] = []

    def losses(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return _losses(vgg, x, content_target, style_targets)

    def closure() -> torch.Tensor:
        with torch.no_grad():
            image.clamp_(0, 1)
        optimizer.zero_grad()
        c, s, tv = losses(image)
        total = content_weight * c + style_weight * s + tv_weight * tv
        total.backward()
        history.append((time.perf_counter() - start, total.item()))
        return total

    while len(history) < steps:
        optimizer.step(closure)
    with torch.no_grad():
        image.clamp_(0, 1)
        c, s, tv = losses(image)
    seconds = time.perf_counter() - start
    total = content_weight * c + style_weight * s + tv_weight * tv
    return ReferenceRun(image.detach(), c.item(), s.item(), total.item(), seconds, history)
