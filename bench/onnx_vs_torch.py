"""ONNX vs torch forward passes: the time to compute one image's targets (features and Grams).

Times the engine's two TargetFn implementations on the current device, fp32, for the default
VGG19 layers: every content and style layer's features plus the style layers' Grams, as stylize()
asks for them. Results: JSON lines, bench/results/onnx-*.json and a docs/benchmarks.md section.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from bench.run import ROOT, environment, record, section_name
from stylekit.engine import Runtime, TargetFn, pick_runtime, torch_targets
from stylekit.features import FeatureExtractor, backbone_spec
from stylekit.onnx_features import onnx_targets
from stylekit.weights import resolve_weights

SPEC = backbone_spec("vgg19")
LAYERS = tuple(dict.fromkeys(SPEC.content_layers + SPEC.style_layers))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_forward(compute: TargetFn, image: torch.Tensor, repeats: int) -> list[float]:
    """Seconds per call after one warm-up call (allocators, kernels and caches settle)."""
    compute(image, LAYERS, SPEC.style_layers)
    _sync(image.device)
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        compute(image, LAYERS, SPEC.style_layers)
        _sync(image.device)
        seconds.append(time.perf_counter() - started)
    return seconds


def markdown(results: dict[str, object]) -> str:
    """The results as this device kind's ONNX section of docs/benchmarks.md."""
    env = results["environment"]
    lines = [f"### ONNX vs torch forward, {env['kind'].upper()}: {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · onnxruntime provider {results['provider']} · "
             f"{results['weights']} weights · fp32 · median of {results['repeats']} after a warm-up; "
             "one forward pass computing the features of "
             f"{', '.join(LAYERS)} and the Grams of the style layers", "",
             "| size | torch s | ONNX s | ONNX / torch |", "|---|---|---|---|"]
    for row in results["rows"]:
        lines.append(f"| {row['size']}×{row['size']} | {row['torch_seconds']:.3f} | "
                     f"{row['onnx_seconds']:.3f} | {row['onnx_seconds'] / row['torch_seconds']:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Time both paths at each size on the current device and record the results."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="*", default=[512, 1024])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--weights", default="random", help="Weights (timing does not depend on them).")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-doc", action="store_true", help="Do not touch docs/benchmarks.md.")
    args = parser.parse_args(argv)
    device = pick_runtime(args.device, "fp32").device
    weights = resolve_weights(args.weights, "vgg19", progress=False)
    extractor = FeatureExtractor("vgg19", weights.state_dict, LAYERS).to(device)
    by_torch = torch_targets(extractor, Runtime(device, torch.float32))
    by_onnx, provider = onnx_targets(weights, LAYERS, SPEC.style_layers, "max",
                                     use_gpu=device.type == "cuda")
    rows = []
    for size in args.sizes:
        image = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size)).to(device)
        torch_times = time_forward(by_torch, image, args.repeats)
        onnx_times = time_forward(by_onnx, image, args.repeats)
        row = {"size": size, "torch_seconds": statistics.median(torch_times),
               "onnx_seconds": statistics.median(onnx_times), "torch_all": torch_times,
               "onnx_all": onnx_times}
        print(json.dumps(row), flush=True)
        rows.append(row)
    results = {"environment": environment(device), "provider": provider,
               "weights": weights.description, "repeats": args.repeats, "rows": rows}
    record(results, markdown(results), f"onnx-{section_name(device)}", args.output, not args.no_doc)
    return results


if __name__ == "__main__":
    main()
