"""The feature extractor as an ONNX model: export, the export cache, and onnxruntime sessions.

Contract of every exported model: input `image`, float32 N×3×H×W RGB in [0, 1] with N, H and W
dynamic (ImageNet normalisation happens inside the graph); one output per requested layer named
after it (raw features, N×C×h×w) and `gram_<layer>` (the canonical Gram of losses.gram, N×C×C) for
each Gram layer. This module knows models and sessions only, never image files.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from . import disk_cache, losses
from .atomic import check_writable_folder, replacing
from .errors import StylekitError, one_line
from .features import FeatureExtractor, backbone_spec
from .weights import Weights, state_dict_sha256
from .weights_cache import cache_dir

if TYPE_CHECKING:
    from .engine import TargetFn

OPSET = 18
GRAPH_VERSION = 1  # bump when _Graph changes, so older cached exports are not reused
INPUT_NAME = "image"
CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
QUIET = 4  # onnxruntime's FATAL level: its provider-fallback lines stay out of the user's terminal
STALE_TEMP_S = 3600.0  # a temporary export this old is a killed process's, not one being written
PROBE_SIDE = 32  # a cached model is checked against the network on a probe image this size ...
PROBE_TOLERANCE = 1e-3  # ... and must agree to this share of each output's largest value
DEFAULT_LIMIT_MB = 1024.0  # exports kept per version folder ($STYLEKIT_ONNX_CACHE_MB); VGG19's: 52 MB
IN_USE_S = 60.0  # an export used this recently may be loading in another process: never pruned
GRAPH_BYTES = 1 << 20  # an export's size beyond its weights (its graph: tens of KB), with room to spare

log = logging.getLogger(__name__)


def output_names(layers: Sequence[str], gram_layers: Sequence[str]) -> list[str]:
    """The model's outputs in order: raw features per layer, then a Gram per Gram layer."""
    return [*layers, *(f"gram_{name}" for name in gram_layers)]


def checked_layers(backbone: str, layers: Sequence[str],
                   gram_layers: Sequence[str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Deduplicate and validate layer names so a bad request fails before a slow export."""
    try:
        spec = backbone_spec(backbone)
    except ValueError as exc:
        raise StylekitError(str(exc)) from None
    layers, gram_layers = tuple(dict.fromkeys(layers)), tuple(dict.fromkeys(gram_layers))
    if not layers:
        raise StylekitError("no layers to export")
    for name in layers:
        if name not in spec.layers:
            raise StylekitError(f"unknown layer '{name}' for {backbone} "
                                f"(choose from {', '.join(spec.layers)})")
    for name in gram_layers:
        if name not in layers:
            raise StylekitError(f"Gram layer '{name}' is not one of the exported layers")
    return layers, gram_layers


class _Graph(nn.Module):
    """What is exported: image in, raw features and canonical Grams out, in output_names order."""

    def __init__(self, backbone: str, state_dict: Mapping[str, torch.Tensor], layers: tuple[str, ...],
                 gram_layers: tuple[str, ...], pooling: str) -> None:
        super().__init__()
        self.extractor = FeatureExtractor(backbone, dict(state_dict), layers, pooling)
        self.layers, self.gram_layers = layers, gram_layers

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Features, then Grams (a tuple, because ONNX outputs are positional)."""
        features = self.extractor(image)
        return (*(features[name] for name in self.layers),
                *(losses.gram(features[name]) for name in self.gram_layers))


def export_onnx(weights: Mapping[str, torch.Tensor], backbone: str, layers: Sequence[str],
                gram_layers: Sequence[str], pooling: str, path: str | os.PathLike[str]) -> Path:
    """Export the extractor for a state dict to `path` (whole or absent: temp file, then rename)."""
    layers, gram_layers = checked_layers(backbone, layers, gram_layers)
    graph = _Graph(backbone, weights, layers, gram_layers, pooling).eval()
    target = Path(path)
    if not target.parent.is_dir():
        raise StylekitError(f"output folder '{target.parent}' does not exist")
    dim = torch.export.Dim
    with replacing(target) as temp:
        torch.onnx.export(graph, (torch.rand(1, 3, 64, 64),), str(temp), input_names=[INPUT_NAME],
                          output_names=output_names(layers, gram_layers), opset_version=OPSET,
                          dynamo=True, external_data=False, verbose=False,
                          dynamic_shapes={INPUT_NAME: {0: dim("n"), 2: dim("h"), 3: dim("w")}})
    return target


def export_cache_path(weights: Weights, layers: Sequence[str], gram_layers: Sequence[str],
                      pooling: str) -> Path:
    """The automatic export's file, keyed by everything that changes the model or its loader.

    The loader and graph versions name the folder (see _drop_other_generations); the model's own
    inputs name the file.
    """
    key = {"weights": weights.sha256 or state_dict_sha256(weights.state_dict),
           "backbone": weights.backbone, "layers": list(layers), "grams": list(gram_layers),
           "pooling": pooling}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    generation = f"ort{ort.__version__}-opset{OPSET}-graph{GRAPH_VERSION}"
    return cache_dir() / "onnx" / generation / f"{weights.backbone}-{pooling}-{digest}.onnx"


def _drop_other_generations(folder: Path) -> None:
    """Delete exports made for another onnxruntime, opset or graph version (none will be read again),
    and half-written ones that a process killed mid-export left in this one."""
    stale = time.time() - STALE_TEMP_S
    leftovers = [p for p in folder.glob(".*.tmp") if _modified(p) < stale]
    for entry in [*folder.parent.iterdir(), *leftovers]:
        try:
            if entry.is_dir() and entry != folder:
                shutil.rmtree(entry)
            elif entry.suffix in (".onnx", ".tmp"):  # .onnx: the flat layout before these folders
                entry.unlink()
        except OSError as exc:
            log.warning("cannot delete old ONNX export %s (%s)", entry, exc)


@functools.lru_cache(maxsize=4)
def _session(path: str, stamp: tuple[int, int, int], use_gpu: bool) -> ort.InferenceSession:
    """One session per file version and provider choice, kept warm for the server and hot folder."""
    ort.set_default_logger_severity(QUIET)
    options = ort.SessionOptions()
    options.log_severity_level = QUIET
    providers = [CUDA_PROVIDER, CPU_PROVIDER] if use_gpu and gpu_provider_installed() else [CPU_PROVIDER]
    return ort.InferenceSession(path, sess_options=options, providers=providers)


def _modified(path: Path) -> float:
    """When a file was last written; infinity for one gone meanwhile (another process cleaned up)."""
    try:
        return path.stat().st_mtime
    except OSError:
        return float("inf")


def _stamp(path: str | os.PathLike[str]) -> tuple[int, int, int]:
    """A file's version as far as the caches here care: rewritten means a new one."""
    info = os.stat(path)
    return info.st_mtime_ns, info.st_size, info.st_ino


def gpu_provider_installed() -> bool:
    """Whether this onnxruntime has the CUDA provider at all (the plain onnxruntime package has not;
    asking it for CUDA anyway makes it print a warning)."""
    return CUDA_PROVIDER in ort.get_available_providers()


def open_session(path: str | os.PathLike[str], use_gpu: bool = False) -> ort.InferenceSession:
    """A session on CUDA when asked for and usable, else on the CPU; logs the provider really used."""
    session = _session(os.fspath(path), _stamp(path), use_gpu)
    provider = session.get_providers()[0]
    if use_gpu and provider != CUDA_PROVIDER:
        log.info("onnxruntime cannot use the GPU here; running %s on %s", path, provider)
    return session


def _signature(session: ort.InferenceSession) -> tuple[list[str], list[str]]:
    """Input and output names, to tell a cached file made for other layers."""
    return [i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()]


_VERIFIED: set[tuple[str, tuple[int, int, int], bool]] = set()  # cached files found to agree


def _disagreement(session: ort.InferenceSession, weights: Weights, layers: tuple[str, ...],
                  gram_layers: tuple[str, ...], pooling: str) -> str | None:
    """Why a cached model does not compute what the network computes on a probe image (None: it
    does). A file damaged on disk can still load and run, and its numbers would be silently wrong."""
    probe = torch.rand(1, 3, PROBE_SIDE, PROBE_SIDE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = _Graph(weights.backbone, weights.state_dict, layers, gram_layers, pooling)(probe)
    try:
        got = session.run(None, {INPUT_NAME: probe.numpy()})
    except Exception as exc:  # onnxruntime raises many types; a model that cannot run is damaged too
        return one_line(exc)
    for name, want, have in zip(output_names(layers, gram_layers), expected, got, strict=True):
        want = want.numpy()
        if have.shape != want.shape or not np.abs(have - want).max() <= PROBE_TOLERANCE * np.abs(want).max():
            return f"its output {name} differs from the network's"
    return None


def _model_bytes(weights: Weights, layers: tuple[str, ...], pooling: str) -> int:
    """About what an export of these layers takes on disk: its weights, plus its graph."""
    extractor = FeatureExtractor(weights.backbone, weights.state_dict, layers, pooling)
    return GRAPH_BYTES + sum(t.numel() * t.element_size() for t in extractor.state_dict().values())


def _check_room(folder: Path, needed: int) -> None:
    """StylekitError unless the folder can take a file of `needed` bytes: an export spends seconds
    before it writes anything, and on a full or read-only disk every run would spend them again."""
    check_writable_folder(folder, "the ONNX cache folder")
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise StylekitError(f"no room for the ONNX export in '{folder}': it needs about "
                            f"{needed / (1 << 20):.0f} MB and {free / (1 << 20):.0f} MB are free")


def _reused_session(path: Path, weights: Weights, layers: tuple[str, ...], gram_layers: tuple[str, ...],
                    pooling: str, use_gpu: bool) -> ort.InferenceSession | None:
    """The cached export's session if it is there and computes what the network computes, else None
    (an unusable file is logged; a missing one, or one another process pruned meanwhile, is a miss)."""
    expected = ([INPUT_NAME], output_names(layers, gram_layers))
    try:
        disk_cache.mark_used(path)  # before opening: recently used files are not pruned (IN_USE_S)
        session = open_session(path, use_gpu)
        key = (str(path), _stamp(path), use_gpu)  # checked once per file version
    except Exception as exc:  # onnxruntime raises a dozen unrelated types for a bad file
        if not path.is_file():
            log.info("exporting %s features to %s", weights.backbone, path)
            return None
        reason = one_line(exc)
    else:
        reason = ("its inputs and outputs differ" if _signature(session) != expected else None
                  if key in _VERIFIED else _disagreement(session, weights, layers, gram_layers, pooling))
        if reason is None:
            _VERIFIED.add(key)
            return session
    log.warning("rebuilding cached ONNX model %s (%s)", path, reason)
    return None


def cached_session(weights: Weights, layers: Sequence[str], gram_layers: Sequence[str],
                   pooling: str, use_gpu: bool = False) -> ort.InferenceSession:
    """The session for these weights and layers, exporting into the cache when missing or unusable.

    A new export first checks that the cache has room for it, then deletes other versions' folders and
    the least recently used exports beyond $STYLEKIT_ONNX_CACHE_MB (DEFAULT_LIMIT_MB) in its own.
    """
    layers, gram_layers = checked_layers(weights.backbone, layers, gram_layers)
    path = export_cache_path(weights, layers, gram_layers, pooling)
    session = _reused_session(path, weights, layers, gram_layers, pooling, use_gpu)
    if session is not None:
        return session
    path.parent.mkdir(parents=True, exist_ok=True)
    _check_room(path.parent, _model_bytes(weights, layers, pooling))
    export_onnx(weights.state_dict, weights.backbone, layers, gram_layers, pooling, path)
    _drop_other_generations(path.parent)
    session = open_session(path, use_gpu)
    limit = disk_cache.limit_bytes("STYLEKIT_ONNX_CACHE_MB", DEFAULT_LIMIT_MB)
    disk_cache.prune(path.parent, "*.onnx", limit, IN_USE_S)
    return session


def onnx_targets(weights: Weights, layers: Sequence[str], gram_layers: Sequence[str], pooling: str,
                 use_gpu: bool = False) -> tuple[TargetFn, str]:
    """An engine TargetFn computed by onnxruntime, plus the execution provider it runs on."""
    session = cached_session(weights, layers, gram_layers, pooling, use_gpu)
    provider = session.get_providers()[0]
    log.info("ONNX targets on %s", provider)
    # Each pass hands its CPU arena back afterwards: kept, it would sit beside the optimisation
    # (1.1 KB per pixel of a 1024×768 CPU run's peak; 0.5 KB with this, docs/benchmarks.md). The
    # CUDA provider's arena is left as it was: shrinking it has not been tried on a GPU.
    shrink = ort.RunOptions()
    shrink.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def compute(image: torch.Tensor, feature_layers: tuple[str, ...],
                grams: tuple[str, ...]) -> dict[str, torch.Tensor]:
        wanted = output_names(feature_layers, grams)
        pixels = np.ascontiguousarray(image.detach().to("cpu", torch.float32).numpy())
        values = session.run(wanted, {INPUT_NAME: pixels}, shrink)
        return {name: torch.from_numpy(value).to(image.device)
                for name, value in zip(wanted, values, strict=True)}

    return compute, provider
