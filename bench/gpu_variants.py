"""The GPU path's levers side by side in one run (`python -m bench.gpu_variants`, CUDA only).

In order: optional kernel profiles (--profile, channels-last and NCHW); optional timelines
(--timeline: a cold and a warm `stylize`, and a warm one with the strong-Wolfe line search: when
each scale started and how the fine scale's loss fell); `stylize` end to end per precision, with
graphs on and off, channels-last and NCHW; one square image at the largest size with its peak
memory; then per size the milliseconds per L-BFGS
evaluation (steps chosen on the device by backtracking, as the GPU runs them) in fp32 (TF32
convolutions, the reference's precision) with plain autograd and with a CUDA-graph replay, with the
L-BFGS update launched op by op instead of replayed, with torch's strong-Wolfe line search (the
CPU's rule: the host reads each evaluation's loss and slope), in NCHW, with TF32 Grams, through
torch.compile, and with the graph in bf16-grad and bf16.
JSON to --output after every part; each row also on stdout.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from bench.run import ROOT, environment, images
from stylekit import StyleOptions, StyleRequest, engine, lbfgs, stylize
from stylekit.engine import (
    Runtime,
    _evaluate,
    _fit_long_side,
    _optimise,
    pick_runtime,
    to_array,
    to_tensor,
    torch_targets,
)
from stylekit.features import FeatureExtractor, backbone_spec
from stylekit.weights import resolve_weights


@dataclass(frozen=True)
class Variant:
    """One setting of the GPU path's levers; the defaults are the engine's own."""

    precision: str = "fp32"
    graphed: bool = True  # each evaluation replayed as a CUDA graph
    channels_last: bool = True
    tf32_grams: bool = False  # cuBLAS's fp32 matrix products (the Grams') on the TF32 tensor cores
    compiled: bool = False  # the loss through torch.compile
    replay_updates: bool = True  # the L-BFGS update replayed as a CUDA graph, not launched op by op
    line_search: bool = False  # torch's strong-Wolfe search instead of backtracking on the device


VARIANTS = {
    "fp32 eager": Variant(graphed=False),
    "fp32 graph": Variant(),
    "fp32 graph, L-BFGS update op by op": Variant(replay_updates=False),
    "fp32 graph, strong-Wolfe line search": Variant(line_search=True),
    "fp32 graph NCHW": Variant(channels_last=False),
    "fp32 graph TF32 Grams": Variant(tf32_grams=True),
    "fp32 graph compiled": Variant(compiled=True),
    "bf16-grad graph": Variant(precision="bf16-grad"),
    "bf16 graph": Variant(precision="bf16"),
}
# The first run meets each shape cold (graph recording, cuDNN's and cuBLAS's set-up); its repeat
# is warm.
END_TO_END = (Variant(), Variant(), Variant(channels_last=False), Variant(tf32_grams=True),
              Variant(graphed=False), Variant(precision="bf16"))


@contextmanager
def levers(variant: Variant) -> Iterator[None]:
    """The engine's layout and CUDA graphs, cuBLAS's fp32 matrix-product mode (the Grams'), whether
    L-BFGS replays its update as a CUDA graph and whether it runs torch's line search, for one
    variant; the previous settings are back afterwards."""
    saved = (engine.CHANNELS_LAST, engine.CUDA_GRAPHS, torch.backends.cuda.matmul.allow_tf32,
             lbfgs.CUDA_GRAPHS, engine.LINE_SEARCH_ON_GPU)
    (engine.CHANNELS_LAST, engine.CUDA_GRAPHS, torch.backends.cuda.matmul.allow_tf32,
     lbfgs.CUDA_GRAPHS, engine.LINE_SEARCH_ON_GPU) = (
        variant.channels_last, variant.graphed, variant.tf32_grams, variant.replay_updates,
        variant.line_search)
    try:
        yield
    finally:
        (engine.CHANNELS_LAST, engine.CUDA_GRAPHS, torch.backends.cuda.matmul.allow_tf32,
         lbfgs.CUDA_GRAPHS, engine.LINE_SEARCH_ON_GPU) = saved


def fine_scale(content: torch.Tensor, style: torch.Tensor, state: dict, precision: str,
               graphed: bool, compiled: bool = False) -> Callable[[int], float]:
    """A function running one fine-scale optimisation of n evaluations, returning its seconds;
    with `compiled`, the loss goes through torch.compile (inductor fuses the elementwise work
    between the convolutions) before the graph records it."""
    runtime: Runtime = pick_runtime("cuda", precision)
    spec = backbone_spec("vgg19")
    layers = tuple(dict.fromkeys(spec.content_layers + spec.style_layers))
    extractor = FeatureExtractor("vgg19", state, layers).to(
        runtime.device, memory_format=engine.memory_format(runtime.device))
    targets = torch_targets(extractor, runtime)
    content_targets = targets(content, spec.content_layers, ())
    style_targets = targets(style, (), spec.style_layers)
    style_targets = {name: style_targets[f"gram_{name}"] for name in spec.style_layers}
    weights = dict.fromkeys(spec.style_layers, 1.0)
    options = StyleOptions()

    def losses(x: torch.Tensor) -> torch.Tensor:
        return _evaluate(x, extractor, runtime, content_targets, style_targets, weights, options).total

    total = torch.compile(losses, dynamic=False) if compiled else losses

    def evaluate(x: torch.Tensor) -> SimpleNamespace:  # what _optimise reads: .total
        return SimpleNamespace(total=total(x))

    def run(count: int) -> float:
        image = content.clone()
        torch.cuda.synchronize()
        start = time.perf_counter()
        _optimise(image, evaluate, count, options, lambda done, loss: None, graphed)
        torch.cuda.synchronize()
        return time.perf_counter() - start
    return run


def per_evaluation(content: torch.Tensor, style: torch.Tensor, state: dict, variant: Variant,
                   steps: int) -> float:
    """Seconds per evaluation of a fine-scale optimisation, warm: the difference between runs of
    8 and 8 + `steps` evaluations, so that each run's fixed cost (recording its graph: about four
    evaluations) stays out of the figure."""
    with levers(variant):
        run = fine_scale(content, style, state, variant.precision, variant.graphed, variant.compiled)
        run(8)  # first use of these shapes: cuDNN's and cuBLAS's set-up (and compiling) happen here
        return (run(8 + steps) - run(8)) / steps


def timeline(content: np.ndarray, style: np.ndarray, options: StyleOptions) -> dict[str, object]:
    """One `stylize` as it went: when each scale's first evaluation was reported, and the fine
    scale's (seconds, evaluation, loss) at every report — where a run's time goes."""
    points: list[tuple[str, int, float, int, float | None]] = []
    result = stylize(StyleRequest(content, [style], options),
                     lambda p: points.append((p.stage, p.scale, p.elapsed, p.iteration, p.loss)))
    starts: dict[int, float] = {}
    for stage, scale, elapsed, _, _ in points:
        if stage == "optimise":
            starts.setdefault(scale, elapsed)
    fine = [(elapsed, count, loss) for stage, scale, elapsed, count, loss in points
            if stage == "optimise" and scale == max(starts)]
    return {"seconds": result.seconds, "total_loss": result.total_loss,
            "first_evaluation_s": starts, "fine": fine}


def _summary(run: dict[str, object]) -> str:
    """'2.01 s, scales from 0.05, 0.49 s; within 10/5/1% of the final loss after 0.9/1.1/1.6 s'."""
    final = run["total_loss"]
    reached = [next((f"{elapsed:.2f}" for elapsed, _, loss in run["fine"] if loss <= final * (1 + share)),
                    "—") for share in (0.1, 0.05, 0.01)]
    starts = ", ".join(f"{seconds:.2f}" for seconds in run["first_evaluation_s"].values())
    return (f"{run['seconds']:.2f} s, final {final:.4g}, scales from {starts} s; within 10/5/1% of "
            f"the final loss after {'/'.join(reached)} s")


def kernel_profile(content: torch.Tensor, style: torch.Tensor, state: dict, precision: str,
                   steps: int, channels_last: bool) -> str:
    """Where a fine-scale evaluation's GPU time goes: torch.profiler's table of the top operations
    over `steps` evaluations, without graphs so that every kernel is attributed to its operation."""
    with levers(Variant(channels_last=channels_last)):
        run = fine_scale(content, style, state, precision, graphed=False)
        run(8)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as trace:
            run(steps)
    return trace.key_averages().table(sort_by="cuda_time_total", row_limit=30)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Measure every variant at every size, then the end-to-end and largest-image runs."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024, 2048])
    parser.add_argument("--steps", type=int, default=100, help="Evaluations timed per variant.")
    parser.add_argument("--end-to-end", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--square", type=int, default=4096, help="Side of the square image (0: none).")
    parser.add_argument("--square-steps", type=int, default=300)
    parser.add_argument("--profile", type=int, nargs="*", default=[],
                        help="Long sides to profile (fp32, plain autograd); tables to --output.")
    parser.add_argument("--timeline", type=int, nargs="*", default=[],
                        help="Long sides to run cold then warm, reporting when each stage began.")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    device = torch.device("cuda")
    content_np, style_np, names = images()
    weights = resolve_weights("auto", "vgg19", progress=False)
    spec = "auto" if weights.source == "imagenet" else "random"
    results: dict[str, object] = {"environment": environment(device), "images": names,
                                  "weights": weights.description, "per_evaluation_ms": {},
                                  "end_to_end": [], "square": None, "timeline": {}}
    args.output.mkdir(parents=True, exist_ok=True)
    path = args.output / f"gpu-variants-{time.strftime('%Y%m%d-%H%M%S')}.json"

    def save() -> None:  # after every part, so that a run cut short keeps what it measured
        path.write_text(json.dumps(results, indent=2) + "\n")

    for size in args.profile:
        content = _fit_long_side(to_tensor(content_np, device), size)
        style = _fit_long_side(to_tensor(style_np, device), size)
        for layout, channels_last in (("channels-last", True), ("NCHW", False)):
            table = kernel_profile(content, style, weights.state_dict, "fp32", 20, channels_last)
            (args.output / f"gpu-profile-{size}-{layout}.txt").write_text(table)
            print(f"{size} px, {layout}:\n{table}", flush=True)
    base = StyleOptions(weights=spec, device="cuda", targets="torch")
    for size in args.timeline:  # make bench's budget: 300 fine evaluations
        runs = {}
        for label, line_search in (("cold", False), ("warm", False), ("warm, strong-Wolfe", True)):
            with levers(Variant(line_search=line_search)):
                runs[label] = timeline(content_np, style_np, replace(base, size=size, steps=300))
        results["timeline"][str(size)] = runs
        for label, run in runs.items():
            print(f"{size} px {label}: {_summary(run)}", flush=True)
        save()
    for size in args.end_to_end:
        for variant in END_TO_END:
            with levers(variant):
                result = stylize(StyleRequest(content_np, [style_np], replace(
                    base, size=size, precision=variant.precision)))
            results["end_to_end"].append({"size": size, "precision": variant.precision,
                                          "graphs": variant.graphed,
                                          "channels_last": variant.channels_last,
                                          "tf32_grams": variant.tf32_grams,
                                          "seconds": result.seconds, "iterations": result.iterations,
                                          "total_loss": result.total_loss,
                                          "peak_memory_bytes": result.peak_memory_bytes})
            print(json.dumps(results["end_to_end"][-1]), flush=True)
            save()
    if args.square:
        side = min(content_np.shape[:2])
        square = to_array(_fit_long_side(to_tensor(content_np[:side, :side], device), args.square))
        result = stylize(StyleRequest(square, [style_np], replace(base, size=args.square,
                                                                  steps=args.square_steps)))
        results["square"] = {"width": result.width, "height": result.height, "seconds": result.seconds,
                             "total_loss": result.total_loss, "iterations": result.iterations,
                             "peak_memory_bytes": result.peak_memory_bytes}
        print(json.dumps(results["square"]), flush=True)
        save()
    for size in args.sizes:
        content = _fit_long_side(to_tensor(content_np, device), size)
        style = _fit_long_side(to_tensor(style_np, device), size)
        row = {name: 1e3 * per_evaluation(content, style, weights.state_dict, variant, args.steps)
               for name, variant in VARIANTS.items()}
        results["per_evaluation_ms"][f"{content.shape[-1]}×{content.shape[-2]}"] = row
        print(size, json.dumps(row), flush=True)
        save()
    return results


if __name__ == "__main__":
    main()
