"""The optimisation loop: `stylize(request, progress) -> Result`. It never touches files."""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from . import color, gram_cache, heap, lbfgs, losses, memory
from .errors import NotEnoughMemory, StylekitError, one_line
from .features import FeatureExtractor, backbone_spec
from .gradients import gradient_function
from .onnx_features import CUDA_PROVIDER, gpu_provider_installed, onnx_targets
from .request import (
    MIN_SIDE,
    Progress,
    ProgressCallback,
    Result,
    StyleOptions,
    StyleRequest,
    check_request,
)
from .weights import Weights, resolve_weights
from .weights_cache import names_a_file

DEFAULT_LONG_SIDE = 512  # without --size, larger images are scaled down to this; smaller ones kept


CHECKPOINT_PIXELS = 8 << 20  # a batch larger than this recomputes activations in the backward pass
HISTORY_SIZE = 50  # L-BFGS curvature pairs kept ...
HISTORY_BYTES = 4 << 30  # ... unless two image-sized vectors per pair would take more than this ...
MIN_HISTORY = 5  # ... or free memory holds fewer; a run with room for fewer than this is refused
CUDA_GRAPHS = True  # on a GPU, record each scale's evaluation once and replay it (gradients.py) ...
GRAPH_MIN_STEPS = 20  # ... when it has this many evaluations: recording costs about four
CHANNELS_LAST = True  # on a GPU or CPU, activations in N×H×W×C order (see memory_format)
PROGRESS_EVERY_S = 0.05  # on a GPU, progress is reported at most this often
LINE_SEARCH_MIN_STEPS = 100  # scales with fewer L-BFGS evaluations than this backtrack instead ...
LINE_SEARCH_ON_GPU = False  # ... and so does every scale on a GPU (see _optimise)
COARSE_SHARE = 0.5  # coarse scales get this share of --steps: they only have to set up the finest one
# (a third took 5% less time on tubingen × starry_night, 5% more on golden_gate × shipwreck; a
# quarter, ~15% less on an H100 with tubingen, left golden_gate at 3.14 instead of 2.67 on a CPU)
DRAFT_SHARE = 2 / 3  # with bf16 gradients on a CPU, this share of a coarse scale runs its forward in bf16 too
MIN_COARSE_SIDE = 32  # a coarse scale smaller than this teaches the finer ones nothing
SHORT_RUN_STEPS = 100  # a run of at most this many steps starts at a quarter of the size, not half
# (three scales, not two: at 50 / 100 steps 2.48 / 1.66 against 2.66 / 1.70 on tubingen × starry_night
# at 256 px, 4.00 / 3.00 against 4.76 / 3.25 on golden_gate × shipwreck; at 150–200 level, at 300 mixed)
NAMED_SIZE_SLACK = 0.98  # a refusal names a size 2% inside the edge: free memory moves between runs
LEAN_WARNING = ("this image fits into memory only with freed memory handed back to the system at "
                "once, which makes each step about 20% slower")


def output_long_side(width: int, height: int, size: int | None) -> int:
    """The output's long side: the size asked for, else the content's own, at most DEFAULT_LONG_SIDE."""
    return size or min(max(width, height), DEFAULT_LONG_SIDE)


def scale_sizes(width: int, height: int, long_side: int, scales: int | None,
                min_scale: int | None, steps: int) -> list[tuple[int, int]]:
    """Coarse-to-fine (width, height) pairs, halving the long side down to about min_scale.

    By default (min_scale None) that is two scales, half size then full: with 300 steps a third,
    coarser scale needed more evaluations at 256 px, and at 512 px three scales ended worse than the
    textbook loop (1.120 vs 1.116) where two end at 1.080 (see docs/benchmarks.md). A short run
    (`steps` ≤ SHORT_RUN_STEPS) gets the third scale: there the finest scale has too few steps to
    build the large structures, and the quarter-size scale builds them cheaply.
    Coarse scales whose short side would fall under MIN_COARSE_SIDE are dropped; an output whose
    short side is under MIN_SIDE is refused.
    """
    if scales is None:
        min_scale = min_scale or max(1, long_side // (4 if steps <= SHORT_RUN_STEPS else 2))
        scales = 1 + int(math.log2(long_side / min_scale)) if long_side >= 2 * min_scale else 1
    sizes = []
    for index in reversed(range(min(scales, long_side.bit_length()))):  # coarser: under a pixel, dropped
        ratio = round(long_side / 2**index) / max(width, height)
        size = (max(1, round(width * ratio)), max(1, round(height * ratio)))
        if index == 0 or min(size) >= MIN_COARSE_SIDE:
            sizes.append(size)
    if min(sizes[-1]) < MIN_SIDE:
        enough = math.ceil(MIN_SIDE * max(width, height) / min(width, height))  # rounds to ≥ MIN_SIDE
        fits = _fitted_size(height, width, enough)
        raise StylekitError(f"image too small: the output would be {sizes[-1][0]}×{sizes[-1][1]} px, "
                            f"and at least {MIN_SIDE} px on each side are needed (a long side of "
                            f"{enough} px makes it {fits[0]}×{fits[1]})")
    return sizes


def scale_steps(steps: int, finest: bool) -> int:
    """Loss evaluations at one scale: all of --steps at the finest, COARSE_SHARE of them before."""
    return steps if finest else max(1, round(steps * COARSE_SHARE))


def scale_phases(steps: int, finest: bool, runtime: Runtime) -> list[tuple[Runtime, int]]:
    """One scale's evaluations as (runtime, count) phases, each a fresh optimisation.

    Where the gradient already runs in bf16 on a CPU (`bf16-grad`), a coarse scale drafts its first
    DRAFT_SHARE with the forward in bf16 too (68 against 90 ms per evaluation at 128×96), then
    polishes in the run's own precision, so that the finest scale starts from a point of the fp32
    loss: a coarse scale in bf16 throughout left the finest scale more to undo (docs/benchmarks.md).
    """
    drafts = not finest and runtime.device.type == "cpu" and runtime.gradient_dtype == torch.bfloat16
    draft = int(steps * DRAFT_SHARE) if drafts else 0
    if not draft:
        return [(runtime, steps)]
    return [(replace(runtime, dtype=torch.bfloat16, gradient_dtype=None), draft), (runtime, steps - draft)]


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision the network runs (forward, and the gradient's convolutions)."""

    device: torch.device
    dtype: torch.dtype
    gradient_dtype: torch.dtype | None = None  # None: the gradient in the forward's precision

    @property
    def precision(self) -> str:
        """The precision's user-facing name."""
        return "bf16-grad" if self.gradient_dtype else _DTYPE_NAMES[self.dtype]

    @property
    def forward_precision(self) -> str:
        """What the features, and so the targets and every loss, are computed in."""
        return _DTYPE_NAMES[self.dtype]

    def autocast(self):
        """Convolutions in reduced precision when asked; losses stay fp32 (see losses.py)."""
        if self.dtype == torch.float32:
            return nullcontext()
        # No cast cache: each weight is cast once per pass anyway, and CUDA graphs need it off.
        return torch.autocast(self.device.type, dtype=self.dtype, cache_enabled=False)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether the CPU multiplies bf16 in hardware (AVX512-BF16 or AMX), read from Linux's cpuinfo."""
    try:
        with open("/proc/cpuinfo") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle
                          if line.startswith("flags")), [])
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_runtime(device: str, precision: str) -> Runtime:
    """Resolve `auto` choices: CUDA, then MPS, then CPU; on a CPU with native bf16, fp32 losses with
    bf16 gradient convolutions (same loss, ~20% less time per evaluation); else fp32 (on CUDA that
    means cuDNN's TF32 convolutions: a bf16 forward ended at 1.162 where the reference reaches 1.093
    at 512 px on an H200)."""
    if device == "auto":
        device = ("cuda" if torch.cuda.is_available()
                  else "mps" if torch.backends.mps.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise StylekitError("--device cuda asked for, but no CUDA GPU is available")
    if device == "mps" and not torch.backends.mps.is_available():
        raise StylekitError("--device mps asked for, but Apple's MPS is not available")
    if precision == "auto":
        precision = "bf16-grad" if device == "cpu" and cpu_has_native_bf16() else "fp32"
    dtype = {"fp32": torch.float32, "bf16-grad": torch.float32, "bf16": torch.bfloat16,
             "fp16": torch.float16}[precision]
    if dtype == torch.float16 and device == "cpu":
        raise StylekitError("precision fp16 needs a GPU; use bf16-grad, bf16 or fp32 on the CPU")
    return Runtime(torch.device(device), dtype,
                   torch.bfloat16 if precision == "bf16-grad" else None)


@functools.lru_cache(maxsize=8)
def _weights(spec: str, backbone: str, file_stamp: tuple[int, int] | None) -> Weights:
    """Resolve weights once per process (the server and hot folder stay warm this way)."""
    return resolve_weights(spec, backbone, progress=sys.stderr.isatty())


def weights_key(spec: str, backbone: str) -> tuple[str, str, tuple[int, int] | None]:
    """Cache key for weights: a file given by path is re-read when it changes on disk."""
    stamp = None
    if names_a_file(spec) and os.path.exists(spec):
        info = os.stat(spec)
        stamp = (info.st_mtime_ns, info.st_size)
    return spec, backbone, stamp


def memory_format(device: torch.device) -> torch.memory_format:
    """The network's layout on `device`: channels-last (N×H×W×C) on a GPU and on a CPU.

    On a GPU, cuDNN's tensor-core convolutions would otherwise transpose every N×C×H×W activation in
    and out (on an H100, 4.75 → 4.23 ms per evaluation at 512 px). On a CPU, oneDNN's shallow
    convolutions and max pooling run several times faster on it (at 256×192: conv1_1 12 → 0.9 ms,
    conv1_2 29.5 → 16.2 ms, pool1 10.2 → 1.1 ms) and the Winograd layers emit it (winograd.py), so
    no layer converts: one `bf16-grad` evaluation 0.30–0.33 → 0.26–0.29 s at 256×192, 1.2 → 0.96 s
    at 512×384. Elsewhere (MPS) the plain layout.
    """
    if CHANNELS_LAST and device.type in ("cuda", "cpu"):
        return torch.channels_last
    return torch.contiguous_format


@functools.lru_cache(maxsize=4)
def _extractor(key: tuple[str, str, tuple[int, int] | None], layers: tuple[str, ...],
               pooling: str, device: torch.device, layout: torch.memory_format) -> FeatureExtractor:
    """One network per (weights, layers, pooling, device, memory layout), kept warm."""
    weights = _weights(*key)
    return FeatureExtractor(weights.backbone, weights.state_dict, layers, pooling).to(
        device, memory_format=layout)


def to_tensor(image: np.ndarray, device: torch.device) -> torch.Tensor:
    """H×W×3 float array → 1×3×H×W tensor."""
    # A copy of a read-only array (torch warns of those); others only where not contiguous.
    pixels = np.ascontiguousarray(image) if image.flags.writeable else np.array(image)
    return torch.from_numpy(pixels).permute(2, 0, 1)[None].to(device).contiguous()


def to_array(image: torch.Tensor) -> np.ndarray:
    """1×3×H×W tensor → H×W×3 float32 array in [0, 1]."""
    return np.ascontiguousarray(image[0].detach().clamp(0, 1).permute(1, 2, 0).float().cpu().numpy())


def resize(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """Antialiased bicubic resize (a no-op at the same size)."""
    if image.shape[-2:] == (height, width):
        return image
    return F.interpolate(image, size=(height, width), mode="bicubic", antialias=True,
                         align_corners=False).clamp(0, 1)


def _fit_long_side(image: torch.Tensor, long_side: int) -> torch.Tensor:
    """Resize keeping the aspect ratio so the longer side is long_side."""
    return resize(image, *_fitted_size(*image.shape[-2:], long_side))


def _fitted_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Width and height keeping the aspect ratio with the longer side long_side."""
    ratio = long_side / max(height, width)
    return max(1, round(width * ratio)), max(1, round(height * ratio))


def _style_size(height: int, width: int, long_side: int) -> tuple[int, int]:
    """A style image's width and height at a scale: its long side as asked, but never so small that its
    short side is under MIN_SIDE (no deep features), which a small --style-scale or a panorama style
    would give."""
    return _fitted_size(height, width, max(long_side, math.ceil(MIN_SIDE * max(height, width)
                                                                / min(height, width))))


@dataclass
class _Losses:
    content: torch.Tensor
    style: torch.Tensor
    tv: torch.Tensor
    total: torch.Tensor


def _evaluate(image: torch.Tensor, extractor: FeatureExtractor, runtime: Runtime,
              content_targets: dict[str, torch.Tensor], style_targets: dict[str, torch.Tensor],
              layer_weights: dict[str, float], options: StyleOptions) -> _Losses:
    """The canonical total loss of one image against its targets."""
    with runtime.autocast():
        features = extractor(image, checkpoint=image[:, 0].numel() > CHECKPOINT_PIXELS,
                             gradient_dtype=runtime.gradient_dtype)
    content = losses.content_loss(features, content_targets)
    style = losses.style_loss(features, style_targets, layer_weights)
    tv = losses.tv_loss(image)
    total = options.content_weight * content + options.style_weight * style \
        + options.tv_weight * tv
    return _Losses(content, style, tv, total)


TargetFn = Callable[[torch.Tensor, tuple[str, ...], tuple[str, ...]], dict[str, torch.Tensor]]
"""Forward-only pass for fixed images: (image, feature layers, Gram layers) → {layer: features,
"gram_<layer>": Gram}, float32 on the image's device. Implemented by torch here and by ONNX."""


def torch_targets(extractor: FeatureExtractor, runtime: Runtime) -> TargetFn:
    """Targets from the torch extractor itself (the reference the ONNX path is tested against)."""
    def compute(image: torch.Tensor, feature_layers: tuple[str, ...],
                gram_layers: tuple[str, ...]) -> dict[str, torch.Tensor]:
        with torch.no_grad(), runtime.autocast():
            features = extractor(image)
        out = {name: features[name].float() for name in feature_layers}
        out.update({f"gram_{name}": losses.gram(features[name]) for name in gram_layers})
        return out
    return compute


@dataclass(frozen=True)
class _Targets:
    """How one run computes its fixed targets, and what to report about it."""

    content: TargetFn
    style: TargetFn  # the same function, behind the Gram cache when the styles have a style_key
    name: str  # "torch" or "onnx:<execution provider>"
    warnings: tuple[str, ...]


def _pick_targets(request: StyleRequest, weights: Weights, layers: tuple[str, ...],
                  style_layers: tuple[str, ...], extractor: FeatureExtractor, runtime: Runtime) -> _Targets:
    """ONNX targets unless torch is asked for (or ONNX cannot start: then torch, with a warning).

    A GPU run whose onnxruntime cannot use the GPU computes them with torch too, on the GPU, which
    is faster than onnxruntime on the CPU (the plain onnxruntime package has no CUDA provider).
    """
    options = request.options
    compute, name, notes = torch_targets(extractor, runtime), "torch", ()
    on_gpu = runtime.device.type == "cuda"
    if options.targets == "onnx" and (gpu_provider_installed() or not on_gpu):
        try:
            onnx, provider = onnx_targets(weights, layers, style_layers, options.pooling, use_gpu=on_gpu)
            if provider == CUDA_PROVIDER or not on_gpu:
                compute, name = onnx, f"onnx:{provider}"
        except Exception as exc:  # an exporter or onnxruntime failure must not cost the user the image
            notes = (f"ONNX feature extractor unavailable ({one_line(exc)}); targets computed with torch",)
    style = compute
    if request.style_key and options.preserve_color != "histogram":  # histogram styles follow the content
        context = f"{weights.sha256}|{options.backbone}|{options.pooling}|{name}|{runtime.forward_precision}"
        style = gram_cache.cached_targets(compute, context, request.style_key)
    return _Targets(compute, style, name, notes)


def _upscale(image: torch.Tensor, content: torch.Tensor) -> torch.Tensor:
    """The previous scale's result at this scale's size, with the content's new fine detail added.

    Plain upsampling leaves the image blurred, which the fine scale would spend its first evaluations
    undoing; the content's detail band (content minus its own down-and-up-sampled copy) restores it.
    """
    h, w = content.shape[-2:]
    ph, pw = image.shape[-2:]
    detail = content - resize(resize(content, pw, ph), w, h)
    return (resize(image, w, h) + detail).clamp(0, 1)


def _initial_image(request: StyleRequest, content: torch.Tensor) -> torch.Tensor:
    """The first scale's starting point: content, noise, the first style, or a given image."""
    _, _, h, w = content.shape
    if request.init_image is not None:
        return resize(to_tensor(request.init_image, content.device), w, h)
    if request.options.init == "noise":
        gen = torch.Generator().manual_seed(request.options.seed)
        return torch.rand(content.shape, generator=gen).to(content.device)
    if request.options.init == "style":
        return resize(to_tensor(request.styles[0], content.device), w, h)
    return content.clone()


class _BudgetSpent(Exception):
    """Raised inside the optimiser's closure when the evaluation budget is used up."""


def history_size(pixels: int, fit: int | None = None) -> int:
    """L-BFGS history length for a batch of `pixels`: HISTORY_SIZE, fewer for huge images (at 4096²
    one pair is 400 MB) or where free memory holds only `fit` pairs beside the rest of the run."""
    room = HISTORY_BYTES // (pixels * memory.PAIR_PIXEL_BYTES)
    return max(MIN_HISTORY, min(HISTORY_SIZE, room, HISTORY_SIZE if fit is None else fit))


@dataclass(frozen=True)
class MemoryPlan:
    """What a run may take (None: unknown) and how it holds its memory (a memory.PIXEL_BYTES key)."""

    budget: int | None
    footprint: str


def plan_memory(size: tuple[int, int], batch: int, device: torch.device, free: int | None,
                limit: int | None = None) -> MemoryPlan:
    """Plan a run within free memory and the user's `limit` (bytes): on a CPU with freed blocks
    handed back if only that fits; refuse a run that fits neither way, naming the size that would.

    Why: on Linux such a run is not told it is out of memory; the kernel kills it minutes in.
    """
    budget = free if limit is None else limit if free is None else min(free, limit)
    footprints = ("cpu", "cpu-lean") if device.type == "cpu" else ("cuda",)
    width, height = size
    pixels = batch * width * height
    for footprint in footprints:
        if budget is None or memory.pairs_that_fit(pixels, footprint, budget) >= MIN_HISTORY:
            return MemoryPlan(budget, footprint)
    assert budget is not None
    need = memory.needed_bytes(pixels, footprints[-1], MIN_HISTORY)
    fits = memory.pixels_that_fit(footprints[-1], budget, MIN_HISTORY)
    longest = int(max(width, height) * (fits / pixels) ** 0.5 * NAMED_SIZE_SLACK)
    images = f"{batch} images of {width}×{height}" if batch > 1 else f"a {width}×{height} image"
    raise _refusal(images, device, need, budget, free, longest)


def check_style_pass(style_shapes: Iterable[tuple[int, int]], style_scale: float, size: tuple[int, int],
                     device: torch.device, plan: MemoryPlan, free: int | None) -> None:
    """Refuse style images (heights and widths) whose pass to their targets would not fit at the output's
    size times --style-scale, far larger than the output's own at a large scale; name what fits."""
    if plan.budget is None:  # free memory unknown: nothing to refuse against
        return
    long_style = round(max(size) * style_scale)
    width, height = max((_style_size(h, w, long_style) for h, w in style_shapes), key=lambda s: s[0] * s[1])
    fits = memory.style_pixels_that_fit(plan.budget)
    if width * height <= fits:
        return
    need = int(memory.HEADROOM * (memory.RUN_BYTES + width * height * memory.STYLE_PIXEL_BYTES))
    shrink = (fits / (width * height)) ** 0.5 * NAMED_SIZE_SLACK
    raise _refusal(f"the style image at {width}×{height} (the output's size × --style-scale {style_scale:g})",
                   device, need, plan.budget, free, int(max(size) * shrink),
                   f"a --style-scale of {style_scale * shrink:.2g} or less, or ")


def _refusal(what: str, device: torch.device, need: int, budget: int, free: int | None, longest: int,
             first_hint: str = "") -> NotEnoughMemory:
    """The refusal of a run or a style pass too large for memory, naming what would fit."""
    where = "the CPU" if device.type == "cpu" else "the GPU"
    room = (f"{budget / memory.GIB:.1f} GiB are free" if budget == free
            else f"max_memory allows {budget / memory.GIB:.3g} GiB")
    hint = (f"{first_hint}a long side of {longest} px or less fits" if longest >= MIN_SIDE
            else "close other programs to free some" if budget == free else "raise max_memory")
    return NotEnoughMemory(f"not enough memory for {what} on {where}: it needs about "
                           f"{need / memory.GIB:.1f} GiB and {room} ({hint})",
                           longest if longest >= MIN_SIDE else None)


_OVERFLOW_ADVICE = ("lower --style-weight, --content-weight or --tv-weight "
                    "(or, with --precision fp16, use fp32)")
NOT_FINITE = ("the loss or its gradient is not a finite number at the start (it overflows): "
              + _OVERFLOW_ADVICE)


def overflow_warning(evaluations: int) -> str:
    """What a run says whose loss overflowed part-way: its image is not the last one evaluated."""
    return (f"the loss or its gradient overflowed (not a finite number) after {evaluations} evaluation"
            f"{'' if evaluations == 1 else 's'}: the result is the best image whose loss was finite; "
            + _OVERFLOW_ADVICE)


def _optimise(image: torch.Tensor, evaluate, steps: int, options: StyleOptions,
              report, history: int, graphed: bool = False) -> tuple[int, int | None]:
    """Run one scale's optimiser for `steps` loss evaluations, leaving in `image` the best iterate.

    Line-search trials and Adam steps can be worse than earlier points, so each image keeps the
    lowest-loss pixels it has been evaluated at (a copy per step, no host synchronisation). A loss
    or gradient that is not finite at the first evaluation (loss weights overflowing float32) is
    refused: no step could improve on it. A loss that overflows later is never the best (NaN and inf
    are below no loss), so `image` ends finite. With `graphed`, each evaluation replays a CUDA
    graph (see gradients.py).

    Returns the evaluations spent and how many of them came before the first whose loss or gradient
    was not finite (None: none was), counted on the device and read once at the end.
    """
    image.requires_grad_(True)
    gradient = gradient_function(lambda x: evaluate(x).total, image, graphed)
    count = 0
    best_image = image.detach().clone()
    best_loss = torch.full((image.shape[0],), float("inf"), device=image.device)
    finite_before = torch.tensor(steps, device=image.device)  # evaluations before the first overflow

    def closure() -> torch.Tensor:
        nonlocal count, best_image, best_loss, finite_before
        if count >= steps:
            raise _BudgetSpent  # a line search may ask for more than the budget: stop it there
        per_image = gradient(image)
        with torch.no_grad():
            finite = (per_image.isfinite() & image.grad.flatten(1).isfinite().all(1)).all()
        if count == 0 and not bool(finite):  # one look at the host per scale
            raise StylekitError(NOT_FINITE)
        loss = per_image.sum()
        with torch.no_grad():
            improved = per_image < best_loss
            best_loss = torch.where(improved, per_image, best_loss)
            best_image = torch.where(improved.view(-1, 1, 1, 1), image.detach(), best_image)
            finite_before = torch.where(finite, finite_before, finite_before.clamp(max=count))
        count += 1
        report(count, loss)
        return loss

    if options.optimizer == "lbfgs":
        # On a CPU a strong-Wolfe line search pays for itself in the long tail (at 256 px it
        # reaches the textbook loop's 300-evaluation loss after 242.5–259.5 full-size evaluations in
        # three runs, backtracking after 261.5–265.5) but starts slowly, so short budgets backtrack.
        # On a GPU every scale backtracks: its steps are chosen on the device, so the host never
        # waits for the GPU, where the search reads a loss and a slope back every evaluation.
        line_search = steps >= LINE_SEARCH_MIN_STEPS and (
            LINE_SEARCH_ON_GPU or image.device.type != "cuda")
        minimise = lbfgs.minimise if line_search else lbfgs.minimise_backtracking
        while count < steps:
            # L-BFGS returns early only when its history yields no usable step (a failed line
            # search: projecting onto [0, 1] still bends its path); called again it would repeat that
            # step forever (the built-in pair at 256 px sat at one loss for its last 230 evaluations).
            # So each round starts afresh from the best point; a round that gains nothing ends it.
            round_start = best_loss.clone()
            try:
                minimise(closure, image, history, steps + 1, bounds=(0.0, 1.0))
            except _BudgetSpent:
                break
            if not bool((best_loss < round_start).any()):
                break
            with torch.no_grad():
                image.copy_(best_image)
    else:
        optimizer = torch.optim.Adam([image], lr=options.learning_rate)

        def clamped() -> torch.Tensor:  # Adam's steps leave [0, 1]; L-BFGS keeps inside it itself
            with torch.no_grad():
                image.clamp_(0, 1)
            return closure()
        while count < steps:
            optimizer.step(clamped)
    image.requires_grad_(False)
    image.grad = None
    with torch.no_grad():
        image.copy_(best_image)
    overflowed = int(finite_before)  # the host's one look at it, per scale
    return count, overflowed if overflowed < count else None


def stylize(request: StyleRequest, progress: ProgressCallback | None = None) -> Result:
    """Gatys et al. style transfer of request.content towards request.styles, coarse to fine.

    `progress` gets a Progress after every loss evaluation; raising errors.Cancelled there stops.
    """
    return stylize_batch([request], progress)[0]


def _check_batch(requests: Sequence[StyleRequest], progress: ProgressCallback | None) -> None:
    """A batch shares options and content size (each image may have its own styles and init)."""
    if not isinstance(requests, list | tuple) or not requests:
        raise StylekitError("stylize_batch needs a list of one or more requests")
    if progress is not None and not callable(progress):
        raise StylekitError(f"progress must be a function taking a stylekit.Progress, not "
                            f"{type(progress).__name__}")
    for request in requests:
        check_request(request)
    first = requests[0]
    for request in requests[1:]:
        if request.options != first.options:
            raise StylekitError("requests in one batch must have the same options")
        if request.content.shape != first.content.shape:
            raise StylekitError("requests in one batch must have contents of the same size")


def _same_styles(a: StyleRequest, b: StyleRequest) -> bool:
    """Whether two requests can share style targets (then they are computed once)."""
    if a.options.preserve_color == "histogram":  # the style is recoloured to each content
        return a is b
    if a.style_key != b.style_key:  # a key names the styles: one key is no proof of one set of pixels
        return False
    return len(a.styles) == len(b.styles) and all(
        x is y or np.array_equal(x, y) for x, y in zip(a.styles, b.styles, strict=True))


def stylize_batch(requests: Sequence[StyleRequest],
                  progress: ProgressCallback | None = None) -> list[Result]:
    """Stylise several same-size images together in one batch (one network pass for all per step).

    On a GPU this is what keeps the device busy for small images; style targets are computed once per
    distinct style. With Adam every image follows exactly its own optimisation; with L-BFGS the batch
    shares one curvature history (the summed loss is minimised), so results differ slightly from
    single runs.
    """
    _check_batch(requests, progress)
    options = requests[0].options
    started = time.perf_counter()
    runtime = pick_runtime(options.device, options.precision)
    memory.reset_peak(runtime.device)
    cuda = [runtime.device.index if runtime.device.index is not None else torch.cuda.current_device()] \
        if runtime.device.type == "cuda" else []
    # The seed is this run's: the caller's own random state is restored afterwards.
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(options.seed)
        # On the CPU, freed activations are reused rather than page-faulted anew each evaluation (heap.py).
        with heap.reused_memory() if runtime.device.type == "cpu" else nullcontext():
            return _run_batch(requests, progress, runtime, started)


def _run_batch(requests: Sequence[StyleRequest], progress: ProgressCallback | None,
               runtime: Runtime, started: float) -> list[Result]:
    """stylize_batch's work once the options are checked and the runtime picked."""
    options = requests[0].options
    key = weights_key(options.weights, options.backbone)
    weights = _weights(*key)
    spec = backbone_spec(options.backbone)
    content_layers = options.content_layers or spec.content_layers
    style_layers = options.style_layers or spec.style_layers
    layer_weights = dict(zip(style_layers, options.style_layer_weights
                             or [1.0] * len(style_layers), strict=True))
    layers = tuple(dict.fromkeys(content_layers + style_layers))
    extractor = _extractor(key, layers, options.pooling, runtime.device, memory_format(runtime.device))

    targets = _pick_targets(requests[0], weights, layers, style_layers, extractor, runtime)
    contents_full = [to_tensor(r.content, runtime.device) for r in requests]
    height, width = contents_full[0].shape[-2:]
    long_side = output_long_side(width, height, options.size)
    sizes = scale_sizes(width, height, long_side, options.scales, options.min_scale, options.steps)
    limit = None if options.max_memory is None else int(options.max_memory * memory.GIB)
    free = memory.available_bytes(runtime.device)
    plan = plan_memory(sizes[-1], len(requests), runtime.device, free, limit)
    check_style_pass([style.shape[:2] for r in requests for style in r.styles], options.style_scale,
                     sizes[-1], runtime.device, plan, free)
    lean = plan.footprint == "cpu-lean"
    if lean:
        heap.hand_back_freed_memory()
    # One entry per distinct style: (its style images at full size, the request indices using it).
    style_groups: list[tuple[list[torch.Tensor], StyleRequest, list[int]]] = []
    for index, request in enumerate(requests):
        group = next((g for g in style_groups if _same_styles(g[1], request)), None)
        if group is None:
            full = [to_tensor(style, runtime.device) for style in request.styles]
            if options.preserve_color == "histogram":
                full = [color.match_color_statistics(s, contents_full[index]) for s in full]
            style_groups.append((full, request, [index]))
        else:
            group[2].append(index)
    total_steps = sum(scale_steps(options.steps, index == len(sizes)) for index in range(1, len(sizes) + 1))
    done = 0
    last_loss: float | None = None
    # On a GPU, reading the loss waits for the device: report at most every PROGRESS_EVERY_S there.
    throttle = PROGRESS_EVERY_S if runtime.device.type == "cuda" else 0.0
    last_report = 0.0

    def emit(stage: str, scale: int, size: tuple[int, int]) -> None:
        if progress:
            progress(Progress(stage, scale, len(sizes), size[0], size[1], done, total_steps,
                              last_loss, time.perf_counter() - started))

    image: torch.Tensor | None = None
    overflowed: int | None = None  # evaluations before the loss or its gradient first overflowed
    for scale, (w, h) in enumerate(sizes, start=1):
        emit("prepare", scale, (w, h))
        content = torch.cat([resize(c, w, h) for c in contents_full])
        long_style = round(max(w, h) * options.style_scale)
        per_image: list[dict[str, torch.Tensor]] = [{} for _ in requests]
        for full, _, indices in style_groups:
            styles = [resize(s, *_style_size(*s.shape[-2:], long_style)) for s in full]
            blend = options.style_blend or (1.0,) * len(styles)
            grams = losses.blend_grams(
                [{name: g[f"gram_{name}"] for name in style_layers}
                 for g in (targets.style(s, (), style_layers) for s in styles)], blend)
            for index in indices:
                per_image[index] = grams
        style_targets = {name: torch.cat([g[name] for g in per_image]) for name in style_layers}
        content_targets = targets.content(content, content_layers, ())
        image = _upscale(image, content) if image is not None else torch.cat(
            [_initial_image(r, content[i:i + 1]) for i, r in enumerate(requests)])

        image = image.detach().clone(memory_format=torch.contiguous_format)  # L-BFGS views it flat
        finest = scale == len(sizes)
        pixels = len(requests) * w * h
        history = history_size(pixels, None if plan.budget is None
                               else memory.pairs_that_fit(pixels, plan.footprint, plan.budget))
        for phase_runtime, steps in scale_phases(scale_steps(options.steps, finest), finest, runtime):

            def evaluate(x: torch.Tensor, ct=content_targets, st=style_targets,
                         rt=phase_runtime) -> _Losses:
                if lean:  # what the last evaluation freed inside the heap goes back to the kernel too
                    heap.release_freed_memory()
                return _evaluate(x, extractor, rt, ct, st, layer_weights, options)

            def report(count: int, loss: torch.Tensor, base=done, size=(w, h), index=scale,
                       last=steps) -> None:
                nonlocal done, last_loss, last_report
                done = base + count
                now = time.perf_counter()
                if count < last and now - last_report < throttle:
                    return
                mean = float(loss) / len(requests)
                last_loss, last_report = (mean if math.isfinite(mean) else None), now  # JSON has no NaN
                emit("optimise", index, size)

            base = done
            graphed = (CUDA_GRAPHS and runtime.device.type == "cuda" and steps >= GRAPH_MIN_STEPS
                       and pixels <= CHECKPOINT_PIXELS)  # checkpointing recomputes
            spent, finite = _optimise(image, evaluate, steps, options, report, history, graphed)
            if finite is not None and overflowed is None:
                overflowed = base + finite
            done = base + spent
    assert image is not None
    output = color.keep_content_chroma(image, content) if options.preserve_color == "luminance" else image
    with torch.no_grad():
        final = evaluate(output)  # the losses of the pixels returned, the content's colours restored too
    mean = float(final.total.mean())  # the result's, not the last trial's; and done is all there was
    last_loss, total_steps = (mean if math.isfinite(mean) else None), done
    emit("done", len(sizes), sizes[-1])
    warnings = ((weights.warning,) if weights.warning else ()) + targets.warnings + (
        (LEAN_WARNING,) if lean else ()) + ((overflow_warning(overflowed),) if overflowed is not None else ())
    seconds, peak = time.perf_counter() - started, memory.peak_bytes(runtime.device)
    return [Result(
        image=to_array(output[i:i + 1]), seconds=seconds, iterations=done,
        content_loss=float(final.content[i]), style_loss=float(final.style[i]),
        tv_loss=float(final.tv[i]), total_loss=float(final.total[i]), device=str(runtime.device),
        precision=runtime.precision, width=sizes[-1][0], height=sizes[-1][1],
        peak_memory_bytes=peak, weights=weights.description, targets=targets.name, options=options,
        warnings=warnings) for i in range(len(requests))]
