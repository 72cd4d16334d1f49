"""The one request/result vocabulary shared by the CLI, presets, server, GIMP plug-in and hot folder."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace

import numpy as np

from .backbones import BACKBONES, backbone_spec
from .errors import StylekitError

OPTIMIZERS = ("lbfgs", "adam")
STYLE_SCALES = (0.05, 8.0)  # the style image's long side relative to the output's: from, to
INITS = ("content", "noise", "style")
COLOR_MODES = ("none", "luminance", "histogram")
DEVICES = ("auto", "cuda", "mps", "cpu")
PRECISIONS = ("auto", "fp32", "bf16-grad", "bf16", "fp16")
POOLINGS = ("max", "avg")
TARGET_ENGINES = ("onnx", "torch")
BACKBONE_NAMES = tuple(BACKBONES)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the losses are float32: a larger number is infinite there
MAX_SEED = 2**63 - 1  # torch's generators take a signed 64-bit seed


@dataclass(frozen=True)
class StyleOptions:
    """Every engine knob, with the defaults a user gets; presets and CLI flags override by name."""

    size: int | None = None  # long side of the output; None: the content's, at most 512
    steps: int = 200  # loss evaluations at the finest scale (coarser ones get half: engine.COARSE_SHARE)
    optimizer: str = "lbfgs"
    init: str = "content"  # content | noise | style (an init image goes in StyleRequest.init_image)
    content_weight: float = 1.0
    style_weight: float = 1e6
    tv_weight: float = 10.0
    content_layers: tuple[str, ...] | None = None  # None: the backbone's default
    style_layers: tuple[str, ...] | None = None
    style_layer_weights: tuple[float, ...] | None = None  # None: 1 for every style layer
    style_blend: tuple[float, ...] | None = None  # None: equal weights over the style images
    style_scale: float = 1.0  # style image long side relative to the output's, within STYLE_SCALES
    preserve_color: str = "none"
    scales: int | None = None  # number of coarse-to-fine scales; None picks from min_scale
    min_scale: int | None = None  # coarsest long side when scales is None; None: half the output's
    # (a quarter for a run of at most engine.SHORT_RUN_STEPS steps)
    learning_rate: float = 0.02  # Adam only, in pixel units of a [0, 1] image
    weights: str = "auto"
    backbone: str = "vgg19"
    pooling: str = "max"
    device: str = "auto"
    precision: str = "auto"
    seed: int = 0
    targets: str = "onnx"  # fixed targets computed by: onnx (onnxruntime, see onnx_features) | torch
    max_memory: float | None = None  # GiB a run may plan to take (None: what the device has free)

    def __post_init__(self) -> None:
        """Lists (as JSON gives them) and numpy values (as array code gives them) become the plain
        tuples and numbers the options hold, so they are checked as such and reports stay JSON."""
        for name in (f.name for f in fields(self)):
            object.__setattr__(self, name, _plain(getattr(self, name)))

    def replace(self, **changes: object) -> StyleOptions:
        """A copy with some options changed, refusing unknown names."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise StylekitError(f"unknown option '{unknown[0]}'")
        return type(self)(**{**{f.name: getattr(self, f.name) for f in fields(self)}, **changes})

    def as_dict(self) -> dict[str, object]:
        """Plain values for JSON reports and image metadata."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _plain(value: object) -> object:
    """A numpy scalar as its Python number, a numpy array or list as a tuple (of plain items)."""
    if isinstance(value, np.ndarray | np.generic):
        value = value.tolist()
    return tuple(_plain(item) for item in value) if isinstance(value, list) else value


_HINTS = typing.get_type_hints(StyleOptions)


def _option_kinds() -> dict[str, type | tuple[type]]:
    """Each StyleOptions field's value type, None stripped: int, float, str, or (element type,)."""
    kinds: dict[str, type | tuple[type]] = {}
    for name, hint in _HINTS.items():
        if typing.get_origin(hint) in (typing.Union, types.UnionType):
            hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
        kinds[name] = (typing.get_args(hint)[0],) if typing.get_origin(hint) is tuple else hint
    return kinds


OPTION_KINDS = _option_kinds()
"""What each option holds, for whoever reads options from text (preset files, config, JSON)."""
_OPTIONAL = {name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint)}
_KIND_WORDS = {int: ("a whole number", "whole numbers"), float: ("a number", "numbers"),
               str: ("a string", "strings")}


def is_kind(value: object, kind: type) -> bool:
    """Whether a value fits a field of that type (a whole number fits a number; a bool fits neither)."""
    return not isinstance(value, bool) and isinstance(value, int | float if kind is float else kind)


def describe_kind(kind: type | tuple[type]) -> str:
    """Words for what an option needs, for error messages: 'a number', 'a list of strings'."""
    return f"a list of {_KIND_WORDS[kind[0]][1]}" if isinstance(kind, tuple) else _KIND_WORDS[kind][0]


def _check_type(name: str, value: object) -> None:
    """Refuse a value of the wrong type (as code may pass) by name, before it is compared or used."""
    kind = OPTION_KINDS[name]
    if value is None and name in _OPTIONAL:
        return
    fits = (isinstance(value, tuple) and all(is_kind(item, kind[0]) for item in value)
            if isinstance(kind, tuple) else is_kind(value, kind))
    if not fits:
        raise StylekitError(f"bad {name} {value!r} (must be {describe_kind(kind)})")


def _check_weights(name: str, values: Sequence[float]) -> None:
    """Loss and blend weights: finite (in float32, where the losses are computed) and not negative."""
    for value in values:
        if not 0 <= value <= FLOAT32_MAX:
            raise StylekitError(f"bad {name} {value} (must be a finite number ≥ 0)")


MIN_SIDE = 16  # VGG pools four times before relu5_1: anything smaller has no deep features


def validate(options: StyleOptions) -> None:
    """Refuse impossible option values up front, with a message naming the option."""
    choices = {"optimizer": OPTIMIZERS, "init": INITS, "preserve_color": COLOR_MODES,
               "device": DEVICES, "precision": PRECISIONS, "pooling": POOLINGS,
               "targets": TARGET_ENGINES}
    for name, allowed in choices.items():
        if getattr(options, name) not in allowed:
            raise StylekitError(f"bad {name} '{getattr(options, name)}' "
                                f"(choose from {', '.join(allowed)})")
    try:
        spec = backbone_spec(options.backbone)
    except ValueError as exc:
        raise StylekitError(str(exc)) from None
    for name in OPTION_KINDS:
        _check_type(name, getattr(options, name))
    if not STYLE_SCALES[0] <= options.style_scale <= STYLE_SCALES[1]:  # past 8, a style pass of gigapixels
        raise StylekitError(f"bad style_scale {options.style_scale} (must be from {STYLE_SCALES[0]:g} to "
                            f"{STYLE_SCALES[1]:g})")
    positive = {"steps": options.steps}
    if options.min_scale is not None:
        positive["min_scale"] = options.min_scale
    if options.size is not None:
        positive["size"] = options.size
    if options.scales is not None:
        positive["scales"] = options.scales
    for name, value in positive.items():
        if not 0 < value <= FLOAT32_MAX:
            raise StylekitError(f"bad {name} {value} (must be a finite number greater than 0)")
    if options.size is not None and options.size < MIN_SIDE:  # a preset's too: the CLI's own range
        raise StylekitError(f"bad size {options.size} (the output's long side in pixels: at least "
                            f"{MIN_SIDE})")
    if not 0 < options.learning_rate <= 1:  # larger crosses the whole [0, 1] range per step (and overflows)
        raise StylekitError(f"bad learning_rate {options.learning_rate} (Adam's step in pixel units of a "
                            "[0, 1] image: greater than 0 and at most 1)")
    if options.max_memory is not None and not 0 < options.max_memory < math.inf:
        raise StylekitError(f"bad max_memory {options.max_memory} (GiB, must be a number greater than 0)")
    if not 0 <= options.seed <= MAX_SEED:
        raise StylekitError(f"bad seed {options.seed} (must be a whole number from 0 to {MAX_SEED})")
    for name in ("content_weight", "style_weight", "tv_weight"):
        _check_weights(name, (getattr(options, name),))
    for name in ("style_layer_weights", "style_blend"):
        _check_weights(name, getattr(options, name) or ())
    for name, default in (("content_layers", spec.content_layers), ("style_layers", spec.style_layers)):
        if getattr(options, name) == ():  # None takes the backbone's own; none at all is no loss
            raise StylekitError(f"bad {name}: none given (e.g. {', '.join(default)})")
    for layer in (options.content_layers or ()) + (options.style_layers or ()):
        if layer not in spec.layers:
            raise StylekitError(f"unknown layer '{layer}' for {options.backbone} "
                                f"(e.g. {', '.join(spec.style_layers)})")
    style_layers = options.style_layers or spec.style_layers
    if options.style_layer_weights and len(options.style_layer_weights) != len(style_layers):
        raise StylekitError(f"{len(options.style_layer_weights)} style layer weights given for "
                            f"{len(style_layers)} style layers")


def check_image(image: object, what: str) -> None:
    """Refuse pixels the engine cannot take as they are, naming the image: anything but an H×W×3
    float32 array of finite values in [0, 1] (image.load_image makes one from a file)."""
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 \
            or image.dtype != np.float32:
        shape = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) \
            else type(image).__name__
        raise StylekitError(f"{what} must be an H×W×3 float32 array in [0, 1], not a {shape} "
                            "(stylekit.image.load_image reads a file into one)")
    if not image.size:
        raise StylekitError(f"{what} has no pixels ({image.shape[1]}×{image.shape[0]} px)")
    if not (np.isfinite(image).all() and image.min() >= 0 and image.max() <= 1):
        raise StylekitError(f"{what} has values outside [0, 1] (NaN, infinite, or 0–255 rather than 0–1)")


@dataclass(frozen=True)
class StyleRequest:
    """Pixels in, options set: images are float32 H×W×3 arrays in [0, 1] (see image.load_image)."""

    content: np.ndarray
    styles: Sequence[np.ndarray]
    options: StyleOptions = field(default_factory=StyleOptions)
    init_image: np.ndarray | None = None
    style_key: str | None = None  # a stable name for the styles (a preset) to key target caches


@dataclass(frozen=True)
class Progress:
    """A snapshot handed to the progress callback after each loss evaluation."""

    stage: str  # "prepare", "optimise" or "done"
    scale: int  # 1-based index of the current scale
    scales: int
    width: int
    height: int
    iteration: int  # loss evaluations done so far, all scales
    total: int  # loss evaluations planned, all scales
    loss: float | None
    elapsed: float

    @property
    def fraction(self) -> float:
        """Share of the planned work done, 0–1, for progress bars."""
        return min(1.0, self.iteration / self.total) if self.total else 0.0


ProgressCallback = Callable[[Progress], None]


@dataclass(frozen=True)
class Result:
    """The stylised pixels plus what a report, a log line or image metadata needs to say."""

    image: np.ndarray  # float32 H×W×3 in [0, 1]
    seconds: float
    iterations: int
    content_loss: float
    style_loss: float
    tv_loss: float
    total_loss: float
    device: str
    precision: str
    width: int
    height: int
    peak_memory_bytes: int
    weights: str
    targets: str
    options: StyleOptions
    warnings: tuple[str, ...] = ()

    def report(self) -> dict[str, object]:
        """The JSON-ready summary that `--report` writes and the server returns."""
        return {"seconds": round(self.seconds, 4), "iterations": self.iterations,
                "content_loss": self.content_loss, "style_loss": self.style_loss,
                "tv_loss": self.tv_loss, "total_loss": self.total_loss, "device": self.device,
                "precision": self.precision, "size": [self.width, self.height],
                "peak_memory_bytes": self.peak_memory_bytes, "weights": self.weights,
                "targets": self.targets, "warnings": list(self.warnings),
                "options": self.options.as_dict()}


def check_request(request: StyleRequest) -> None:
    """Refuse a request the engine cannot run, naming what is wrong: its options, its images, its blend."""
    if not isinstance(request, StyleRequest):
        raise StylekitError(f"a request must be a stylekit.StyleRequest, not {type(request).__name__}")
    if not isinstance(request.options, StyleOptions):
        raise StylekitError("options must be a stylekit.StyleOptions, not "
                            f"{type(request.options).__name__}")
    validate(request.options)  # first: the blend's weights are compared below
    if not isinstance(request.style_key, str | None):
        raise StylekitError(f"style_key must be a string, not {type(request.style_key).__name__}")
    if not isinstance(request.styles, list | tuple) or not request.styles:
        raise StylekitError("at least one style image is needed, in a list")
    check_image(request.content, "the content image")
    for index, style in enumerate(request.styles, start=1):
        check_image(style, f"style image {index}")
    if request.init_image is not None:
        check_image(request.init_image, "the init image")
    blend = request.options.style_blend or (1.0,) * len(request.styles)
    if len(blend) != len(request.styles):
        images = f"{len(request.styles)} style image{'s' if len(request.styles) > 1 else ''}"
        raise StylekitError(f"style_blend has {len(blend)} weights for {images} (one weight each)")
    if min(blend) < 0 or sum(blend) <= 0:
        raise StylekitError(f"bad style_blend {', '.join(map(str, blend))} "
                            "(weights must be ≥ 0 and not all 0)")


WARM_UP_SIDE = 32


def warm_up_request(request: StyleRequest) -> StyleRequest:
    """A one-step request on a small grey image: loads the network, shows setup errors at once."""
    grey = np.full((WARM_UP_SIDE, WARM_UP_SIDE, 3), 0.5, np.float32)
    options = request.options.replace(size=WARM_UP_SIDE, steps=1, scales=1)
    return replace(request, content=grey, options=options)
