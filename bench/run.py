"""`make bench`: stylekit and the textbook reference loop side by side, in one process run.

Per size it reports time-to-quality (seconds until stylekit's total loss reaches the reference's final
loss), loss evaluations per second, final losses scored by the reference's own code at full size, peak
memory, and on a GPU the achieved TFLOP/s. Results: bench/results/*.json and docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import stylekit
from bench.reference import run_reference, score
from stylekit import StyleOptions, StyleRequest, stylize
from stylekit.engine import _fit_long_side, pick_runtime, to_array, to_tensor
from stylekit.examples import example_pair
from stylekit.image import load_image
from stylekit.request import Progress
from stylekit.weights import resolve_weights

ROOT = Path(__file__).resolve().parent.parent
SHARED_IMAGES = ROOT.parent / "shared" / "images"
DOC = ROOT / "docs" / "benchmarks.md"
# Dense peak TFLOP/s by device-name fragment and precision, for the "share of peak" column.
PEAK_TFLOPS = {"H100": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0},
               "H200": {"fp32": 67.0, "tf32": 495.0, "bf16": 989.0, "fp16": 989.0}}


def images() -> tuple[np.ndarray, np.ndarray, str]:
    """The classic pair from ../shared when present, else the built-in example pair."""
    content, style = SHARED_IMAGES / "tubingen.jpg", SHARED_IMAGES / "starry_night.jpg"
    if content.is_file() and style.is_file():
        return load_image(content).rgb, load_image(style).rgb, "tubingen.jpg × starry_night.jpg"
    photo, painting = example_pair()
    return photo, painting, "built-in example pair"


@contextmanager
def peak_memory(device: torch.device) -> Iterator[Callable[[], int]]:
    """Peak bytes during the block: CUDA allocator high-water mark, or sampled RSS on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        yield lambda: int(torch.cuda.max_memory_allocated(device))
        return
    page = 4096
    peak = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            with open("/proc/self/statm") as handle:
                peak[0] = max(peak[0], int(handle.read().split()[1]) * page)
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield lambda: peak[0]
    finally:
        stop.set()
        thread.join()


EVAL_FLOPS = 2  # a loss evaluation: forward, then the input gradient only (the weights are frozen)


def tflops(flops: float, seconds: float, precision: str) -> dict[str, float]:
    """Achieved TFLOP/s, and its share of the device's dense peak in that precision when known."""
    if precision == "fp32" and torch.backends.cudnn.allow_tf32:
        precision = "tf32"  # cuDNN's default: fp32 convolutions run on the TF32 tensor cores
    achieved = flops / seconds / 1e12
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in torch.cuda.get_device_name()), None)
    peak_in_precision = peak and peak.get(precision)  # bf16-grad mixes two: no single peak
    return {"tflops": achieved,
            **({"share_of_peak": achieved / peak_in_precision} if peak_in_precision else {})}


def vgg_flops(width: int, height: int) -> float:
    """Forward FLOPs of VGG19 up to relu5_1 at this size (2·Cin·Cout·9 per output pixel per conv)."""
    cfg = [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512]
    flops, channels, w, h = 0.0, 3, width, height
    for item in cfg:
        if item == "M":
            w, h = w // 2, h // 2
        else:
            flops += 2 * channels * item * 9 * w * h
            channels = item
    return flops


def _fit(image: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    return _fit_long_side(to_tensor(image, device), size)


def reference_row(content: np.ndarray, style: np.ndarray, size: int, state: dict,
                  device: torch.device, steps: int, with_reference: bool) -> dict[str, object]:
    """One size's row, with the reference loop's run and its final image scored, if it runs there."""
    content_t, style_t = _fit(content, size, device), _fit(style, size, device)
    height, width = content_t.shape[-2:]
    row: dict[str, object] = {"size": size, "width": width, "height": height}
    if with_reference:
        with peak_memory(device) as peak:
            reference = run_reference(content_t, style_t, state, steps=steps)
            _sync(device)
        best_seconds, best_loss = min(reference.history, key=lambda point: point[1])
        row["reference"] = {"seconds": reference.seconds, "iterations": len(reference.history),
                            "iterations_per_second": len(reference.history) / reference.seconds,
                            "peak_memory_bytes": peak(),
                            # Plain L-BFGS can stray late in its run (a GPU at 1024 px ended at 14 134
                            # after passing 3): its best point is the steadier yardstick beside the last.
                            "best_loss": best_loss, "seconds_to_best": best_seconds,
                            **score(reference.image, content_t, style_t, state)}
        if device.type == "cuda":
            row["reference"].update(tflops(EVAL_FLOPS * vgg_flops(width, height) * steps,
                                           reference.seconds, "fp32"))
    return row


def add_stylekit(row: dict[str, object], content: np.ndarray, style: np.ndarray, state: dict,
                 weights: str, device: torch.device, steps: int) -> None:
    """stylekit at the row's size, scored alike, and when it reached the reference's final loss."""
    content_t, style_t = _fit(content, row["size"], device), _fit(style, row["size"], device)
    width, height = row["width"], row["height"]
    trace: list[Progress] = []  # every optimisation step stylekit reported
    options = StyleOptions(steps=steps, weights=weights, device=device.type, size=row["size"],
                           targets="torch")
    request = StyleRequest(to_array(content_t), [to_array(style_t)], options)
    with peak_memory(device) as peak:
        result = stylize(request, progress=lambda p: trace.append(p) if p.stage == "optimise" else None)
        _sync(device)
    final_scale = max(point.scale for point in trace)
    stylekit_row = {"seconds": result.seconds, "iterations": result.iterations,
                    "iterations_per_second": result.iterations / result.seconds,
                    "peak_memory_bytes": peak(), "scales": final_scale, "precision": result.precision,
                    **score(to_tensor(result.image, device), content_t, style_t, state)}
    # Evaluations since the previous report (progress may be throttled on a GPU), each at its scale.
    new_evaluations = [point.iteration - before for before, point in
                       zip([0, *(p.iteration for p in trace[:-1])], trace, strict=True)]
    if device.type == "cuda":
        flops = sum(count * EVAL_FLOPS * vgg_flops(point.width, point.height)
                    for count, point in zip(new_evaluations, trace, strict=True))
        stylekit_row.update(tflops(flops, result.seconds, result.precision))
    reference = row.get("reference")
    if reference is not None:
        # Also in full-size evaluations spent, a figure that other load on the machine cannot skew.
        spent = np.cumsum([count * point.width * point.height / (width * height)
                           for count, point in zip(new_evaluations, trace, strict=True)])
        reached = [(point.elapsed, cost) for point, cost in zip(trace, spent, strict=True)
                   if point.scale == final_scale and point.loss is not None
                   and point.loss <= reference["total_loss"]]
        stylekit_row["time_to_quality"] = reached[0][0] if reached else None
        stylekit_row["evaluations_to_quality"] = float(reached[0][1]) if reached else None
        stylekit_row["speedup"] = reference["seconds"] / reached[0][0] if reached else None
        if "best_loss" in reference:
            best = next((point.elapsed for point in trace if point.scale == final_scale
                         and point.loss is not None and point.loss <= reference["best_loss"]), None)
            stylekit_row["time_to_best"] = best
            stylekit_row["speedup_to_best"] = reference["seconds_to_best"] / best if best else None
    row["stylekit"] = stylekit_row


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _cpu_name() -> str:
    """The processor's model name (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def section_name(device: torch.device) -> str:
    """docs/benchmarks.md's section for this device: 'cuda', or 'cpu-intel', 'cpu-amd' … by vendor,
    so a run on another kind of CPU adds its table instead of replacing the last machine's."""
    if device.type != "cpu":
        return device.type
    vendor = "".join(ch for ch in _cpu_name().split("(")[0].split(" ")[0].lower() if ch.isalnum())
    return f"cpu-{vendor or 'other'}"


def environment(device: torch.device) -> dict[str, str]:
    """Device name and versions, recorded with every result."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_name()
    cores = torch.get_num_threads()
    return {"device": f"{name} ({cores} threads)" if device.type == "cpu" else name,
            "kind": device.type, "torch": torch.__version__, "stylekit": stylekit.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat()}


def markdown(results: dict[str, object]) -> str:
    """The results as the docs/benchmarks.md section for this kind of device."""
    env = results["environment"]
    gpu = env["kind"] == "cuda"
    lines = [f"### {env['kind'].upper()}: {env['device']}", "",
             f"{env['date']} · torch {env['torch']} · stylekit {env['stylekit']} · images: "
             f"{results['images']} · weights: {results['weights']} · reference: {results['steps']} "
             "L-BFGS evaluations at full size, fp32 · stylekit precision: "
             f"{results['rows'][0]['stylekit']['precision']}", "",
             "| size | reference s | reference loss | stylekit time-to-quality s | speed-up | "
             "full-size evaluations to quality (ref) | stylekit it/s (ref it/s) | stylekit final loss | "
             "final content / style loss, stylekit (ref) | reference's best loss (its s) → stylekit s "
             "(speed-up) | peak memory stylekit / ref |"
             + (" stylekit TFLOP/s (share of peak) |" if gpu else ""),
             "|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if gpu else "")]
    mib = 1 << 20
    for row in results["rows"]:
        ref, sk = row.get("reference") or {}, row["stylekit"]
        cells = [f"{row['width']}×{row['height']}", _fmt(ref.get("seconds"), ".1f"),
                 _fmt(ref.get("total_loss"), ".4g"),
                 _fmt(sk.get("time_to_quality"), ".1f", "not reached" if ref else "—"),
                 _fmt(sk.get("speedup"), ".2f") + ("×" if sk.get("speedup") else ""),
                 f"{_fmt(sk.get('evaluations_to_quality'), '.0f')} ({ref.get('iterations', '—')})",
                 f"{sk['iterations_per_second']:.2f} ({_fmt(ref.get('iterations_per_second'), '.2f')})",
                 f"{sk['total_loss']:.4g}",
                 f"{_terms(sk)}" + (f" ({_terms(ref)})" if ref else ""), _to_best(ref, sk),
                 f"{sk['peak_memory_bytes'] / mib:.0f} / "
                 f"{_fmt(ref.get('peak_memory_bytes', 0) / mib if ref else None, '.0f')} MiB"]
        if gpu:
            share = sk.get("share_of_peak")
            cells.append(f"{sk['tflops']:.1f}" + (f" ({share:.0%})" if share is not None else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _to_best(ref: dict[str, float], sk: dict[str, float]) -> str:
    """'3.41 (2.9 s) → 0.8 s (3.62×)': the reference's lowest loss on its way, and when stylekit got there."""
    if "best_loss" not in ref:
        return "—"
    reached = (f"{sk['time_to_best']:.1f} s ({sk['speedup_to_best']:.2f}×)"
               if sk.get("time_to_best") else "not reached")
    return f"{ref['best_loss']:.4g} ({ref['seconds_to_best']:.1f} s) → {reached}"


def _terms(side: dict[str, float]) -> str:
    """A run's unweighted content and style losses, e.g. '0.703 / 5.64e-07'."""
    return f"{side['content_loss']:.3g} / {side['style_loss']:.3g}"


def _fmt(value: float | None, spec: str, missing: str = "—") -> str:
    return missing if value is None else format(value, spec)


def update_doc(section: str, kind: str) -> None:
    """Replace this device kind's section of docs/benchmarks.md, keeping the others."""
    start, end = f"<!-- bench:{kind}:start -->", f"<!-- bench:{kind}:end -->"
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    block = f"{start}\n{section}{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    DOC.write_text(text)


def record(results: dict[str, object], section: str, name: str, folder: Path, doc: bool) -> None:
    """Keep a run: bench/results/<name>-<time>.json, its docs/benchmarks.md section, and stdout."""
    folder.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (folder / f"{name}-{stamp}.json").write_text(json.dumps(results, indent=2) + "\n")
    if doc:
        update_doc(section, name)
    print(section)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the benchmark for the current device and record it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--sizes", type=int, nargs="*", help="Long sides (default by device).")
    parser.add_argument("--steps", type=int, default=300, help="Reference evaluations (default 300).")
    parser.add_argument("--reference-max", type=int, default=1024,
                        help="Largest size at which the reference also runs.")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-doc", action="store_true", help="Do not touch docs/benchmarks.md.")
    parser.add_argument("--weights", default="auto", help="auto (ImageNet where cached, else random: "
                                                          "seed 0), random[:SEED] or a file.")
    args = parser.parse_args(argv)
    device = pick_runtime(args.device, "auto").device
    sizes = args.sizes or ([256, 512] if device.type == "cpu" else [512, 1024, 2048, 4096])
    content, style, names = images()
    weights = resolve_weights(args.weights, "vgg19", progress=False)
    spec = "random" if args.weights == "auto" and weights.source != "imagenet" else args.weights  # the same
    # The reference loops run first, in a process stylekit has not yet touched: on the CPU stylekit
    # sets glibc's malloc to reuse freed memory (stylekit/heap.py), a process-wide setting that the
    # textbook loop, run the way users run it, does not have.
    run_reference(_fit(content, 32, device), _fit(style, 32, device), weights.state_dict, steps=1)  # warm-up
    rows = [reference_row(content, style, size, weights.state_dict, device, args.steps,
                          size <= args.reference_max) for size in sizes]
    stylize(StyleRequest(content[:32, :32], [style[:32, :32]],
                         StyleOptions(steps=1, weights=spec, device=device.type, targets="torch")))
    for row in rows:
        add_stylekit(row, content, style, weights.state_dict, spec, device, args.steps)
        print(json.dumps(row), flush=True)
    results = {"environment": environment(device), "images": names, "weights": weights.description,
               "steps": args.steps, "rows": rows}
    record(results, markdown(results), section_name(device), args.output, not args.no_doc)
    return results


if __name__ == "__main__":
    main()
