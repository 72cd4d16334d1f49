"""`make bench`, part two: hot-folder throughput against the reference loop run image by image.

A real `stylekit watch` (watchdog observer on a temporary inbox, one preset) styles `--count` images
of `--size` px; the reference loop (bench/reference.py, 300 evaluations at full size) styles the
same images one after another with the preset's style and loss weights. Both outputs are scored by
the reference's own loss code, so the images-per-minute figures come with their quality.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch

from bench.reference import run_reference, score
from bench.run import ROOT, SHARED_IMAGES, environment, record, section_name
from stylekit.engine import _fit_long_side, pick_runtime, resize, to_array, to_tensor
from stylekit.examples import example_pair
from stylekit.image import load_image, save_image
from stylekit.pipeline.config import FolderConfig, WatchConfig, checked
from stylekit.pipeline.stopping import Stopping
from stylekit.pipeline.watcher import watch
from stylekit.presets import get_preset, preset_request
from stylekit.weights import resolve_weights

PHOTOS = ("tubingen.jpg", "golden_gate.jpg", "shipwreck.jpg")


def photos(count: int, size: int) -> list[np.ndarray]:
    """`count` different 4:3 crops (seeded) of the shared photos, or of the built-in photo, all
    `size`×¾`size` px: one preset and one size, as a photographer's batch would be."""
    sources = [load_image(SHARED_IMAGES / name).rgb for name in PHOTOS if (SHARED_IMAGES / name).is_file()]
    sources = sources or [example_pair()[0]]
    rng = np.random.default_rng(0)
    crops = []
    for index in range(count):
        image = sources[index % len(sources)]
        h, w = image.shape[:2]
        cw = int(min(w, h * 4 / 3) * 0.8)
        ch = cw * 3 // 4
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = to_tensor(image[y:y + ch, x:x + cw], torch.device("cpu"))
        crops.append(to_array(resize(crop, size, size * 3 // 4)))
    return crops


def _wait_for(folder: Path, count: int, stopped: threading.Event, timeout: float) -> None:
    """Block until `folder` holds `count` finished outputs (temporary names excluded)."""
    deadline = time.monotonic() + timeout
    while len([p for p in folder.glob("*.png") if not p.name.startswith(".")]) < count:
        if stopped.is_set():
            raise RuntimeError("the hot folder stopped before finishing")
        if time.monotonic() > deadline:
            raise TimeoutError(f"hot folder did not finish {count} images in {timeout:.0f} s")
        time.sleep(0.05)


def run_hotfolder(images: list[np.ndarray], preset: str, overrides: dict[str, object],
                  folder: Path) -> tuple[float, list[np.ndarray]]:
    """Seconds from dropping the images into a warm hot folder until the last output is published.

    The watcher runs on this thread, as `stylekit watch` does, and a helper thread drops the images:
    torch driven from a second thread next to one that already used it runs a second OpenMP pool, and
    on two cores that cost ~30% per image at 128 px (37 s against 28 s), which would be the bench's
    artefact, not the hot folder's.
    """
    inbox, outbox = folder / "in", folder / "out"
    inbox.mkdir()
    outbox.mkdir()
    config = checked(WatchConfig(folders=(FolderConfig(inbox, outbox, preset=preset, format="png",
                                                       overrides=overrides),), settle=0.2))
    stop = threading.Event()
    timing: dict[str, object] = {}

    def feed() -> None:
        try:
            save_image(inbox / "warm-up.png", images[0])  # the first job pays for any one-time set-up
            _wait_for(outbox, 1, stop, timeout=3600)
            staging = folder / "staging"
            staging.mkdir()
            for index, image in enumerate(images):
                save_image(staging / f"photo-{index:02d}.png", image)
            started = time.perf_counter()
            for path in sorted(staging.iterdir()):
                path.rename(inbox / path.name)  # whole files appear at once, as a finished copy would
            _wait_for(outbox, len(images) + 1, stop, timeout=24 * 3600)
            timing["seconds"] = time.perf_counter() - started
        except Exception as exc:  # re-raised on the main thread below
            timing["error"] = exc
        finally:
            stop.set()

    feeder = threading.Thread(target=feed, name="bench-feeder", daemon=True)
    feeder.start()
    try:
        watch(config, Stopping(stop))
    finally:
        stop.set()
        feeder.join()
    if "error" in timing:
        raise timing["error"]
    return timing["seconds"], [load_image(outbox / f"photo-{i:02d}.png").rgb for i in range(len(images))]


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the throughput comparison for the current device and record it."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--size", type=int,
                        help="Long side (default 512 on a GPU; 128 on a CPU, where 512 takes hours).")
    parser.add_argument("--preset", default="swirl")
    parser.add_argument("--steps", type=int, default=300, help="Reference evaluations per image.")
    parser.add_argument("--stylekit-steps", type=int, help="Override the preset's steps (tests).")
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--no-doc", action="store_true", help="Do not touch docs/benchmarks.md.")
    parser.add_argument("--weights", default="auto", help="auto (ImageNet where cached, else random: "
                                                          "seed 0), random[:SEED] or a file.")
    args = parser.parse_args(argv)
    device = pick_runtime(args.device, "auto").device
    weights = resolve_weights(args.weights, "vgg19", progress=False)
    spec = "random" if args.weights == "auto" and weights.source != "imagenet" else args.weights  # the same
    args.size = args.size or (512 if device.type == "cuda" else 128)
    images = photos(args.count, args.size)
    overrides = {"weights": spec, "device": device.type, "size": args.size}
    if args.stylekit_steps:
        overrides["steps"] = args.stylekit_steps
    # The reference gets exactly what the preset gives stylekit: its style (blended styles: the
    # first), style scale and loss weights.
    request = preset_request(get_preset(args.preset), images[0], overrides)
    options = request.options
    weights_kw = {"content_weight": options.content_weight, "style_weight": options.style_weight,
                  "tv_weight": options.tv_weight}
    style = _fit_long_side(to_tensor(request.styles[0], device), round(args.size * options.style_scale))
    started = time.perf_counter()
    reference_images = [run_reference(to_tensor(image, device), style, weights.state_dict,
                                      steps=args.steps, **weights_kw).image for image in images]
    reference_seconds = time.perf_counter() - started
    # stylekit second: its malloc setting (stylekit/heap.py) is process-wide, the reference runs without.
    with tempfile.TemporaryDirectory(prefix="stylekit-bench-") as folder:
        hot_seconds, outputs = run_hotfolder(images, args.preset, overrides, Path(folder))

    def mean_loss(results: list[torch.Tensor]) -> float:
        pairs = zip(results, images, strict=True)
        return float(np.mean([score(out, to_tensor(image, device), style, weights.state_dict,
                                    **weights_kw)["total_loss"] for out, image in pairs]))

    row = {"count": args.count, "size": args.size, "preset": args.preset,
           "width": images[0].shape[1], "height": images[0].shape[0],
           "hotfolder": {"seconds": hot_seconds, "images_per_minute": 60 * args.count / hot_seconds,
                         "steps": options.steps,
                         "mean_total_loss": mean_loss([to_tensor(o, device) for o in outputs])},
           "reference": {"seconds": reference_seconds,
                         "images_per_minute": 60 * args.count / reference_seconds,
                         "steps": args.steps, "mean_total_loss": mean_loss(reference_images)}}
    results = {"environment": environment(device), "weights": weights.description, "row": row}
    record(results, markdown(results), f"hotfolder-{section_name(device)}", args.output, not args.no_doc)
    return results


def markdown(results: dict[str, object]) -> str:
    """The result as a docs/benchmarks.md section."""
    env, row = results["environment"], results["row"]
    hot, ref = row["hotfolder"], row["reference"]
    return "\n".join([
        f"### Hot-folder throughput, {env['kind'].upper()}: {env['device']}", "",
        f"{env['date']} · torch {env['torch']} · stylekit {env['stylekit']} · weights: "
        f"{results['weights']} · {row['count']} crops of the shared photos at {row['width']}×"
        f"{row['height']} · preset `{row['preset']}`", "",
        "| | seconds | images per minute | evaluations per image | mean total loss |",
        "|---|---|---|---|---|",
        f"| `stylekit watch` (warm, preset defaults) | {hot['seconds']:.1f} | "
        f"{hot['images_per_minute']:.2f} | {hot['steps']} at full size + coarse scales | "
        f"{hot['mean_total_loss']:.4g} |",
        f"| reference loop, one by one | {ref['seconds']:.1f} | {ref['images_per_minute']:.2f} | "
        f"{ref['steps']} at full size | {ref['mean_total_loss']:.4g} |",
        "", f"Throughput: {ref['seconds'] / hot['seconds']:.2f}× the reference's.", ""])


if __name__ == "__main__":
    main()
