"""The plug-in in a real GIMP 3 (Debian trixie chroot, headless batch) against a real `stylekit serve`.

Needs root and the chroot built by plugins/gimp/tests/make-chroot.sh: `make gimp-test` does both.
Skipped otherwise, unless STYLEKIT_GIMP_REQUIRED=1 (then missing GIMP is a failure).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_painting, make_photo, save_png
from PIL import Image

GIMP_ROOT = Path(os.environ.get("STYLEKIT_GIMP_ROOT", "/var/cache/stylekit/gimp3-root"))
INSIDE = "/tmp/stylekit-gimp-test"  # the work folder as GIMP sees it inside the chroot
BATCH = Path(__file__).parents[1] / "plugins" / "gimp" / "tests" / "batch.py"
OFFSETS = (12, 9)
TOP_SIZE = (40, 32)
SELECTION = (0, 0, 30, 64)  # x, y, width, height in image coordinates

pytestmark = pytest.mark.gimp


@pytest.fixture(scope="module")
def gimp_root() -> Path:
    """The chroot with GIMP 3, or a skip (a failure under STYLEKIT_GIMP_REQUIRED) when there is none."""
    problem = ("needs root (chroot)" if os.geteuid() != 0
               else None if (GIMP_ROOT / "usr/bin/gimp-console-3.0").exists()
               else f"no GIMP 3 chroot at {GIMP_ROOT} (make gimp-test builds it)")
    if problem and os.environ.get("STYLEKIT_GIMP_REQUIRED"):
        pytest.fail(f"the GIMP test {problem}")
    if problem:
        pytest.skip(f"the GIMP test {problem}")
    return GIMP_ROOT


def top_layer_pixels() -> np.ndarray:
    """The second layer: a photo with an alpha ramp, fully transparent and fully opaque columns."""
    width, height = TOP_SIZE
    alpha = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    return np.dstack([make_photo(width, height, seed=3), alpha])


@pytest.fixture(scope="module")
def gimp_run(gimp_root: Path, live_server: str) -> dict:
    """Install the plug-in with `stylekit gimp install`, run batch.py in GIMP, return its report."""
    work = gimp_root / INSIDE.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    (work / "home").mkdir(parents=True)
    save_png(work / "base.png", make_photo(80, 64, seed=2))
    Image.fromarray((top_layer_pixels() * 255).round().astype(np.uint8), "RGBA").save(work / "top.png")
    save_png(work / "painting.png", make_painting(48, 48))
    preset = "ink-wash"
    (work / "spec.json").write_text(json.dumps({"preset": preset, "offsets": OFFSETS,
                                                "selection": SELECTION}))
    shutil.copy(BATCH, work / "batch.py")
    stylekit = Path(sys.executable).parent / "stylekit"
    installed = subprocess.run([str(stylekit), "gimp", "install", "--gimp-dir", str(work / "profile"),
                                "--url", live_server], capture_output=True, text=True, check=True)
    assert "installed the GIMP plug-in" in installed.stdout
    environment = {"PATH": "/usr/bin:/bin", "HOME": f"{INSIDE}/home", "GIMP3_DIRECTORY": f"{INSIDE}/profile",
                   "STYLEKIT_GIMP_WORK": INSIDE}
    gimp = subprocess.run(
        ["chroot", str(gimp_root), "env", "-i", *(f"{k}={v}" for k, v in environment.items()),
         "gimp-console-3.0", "-i", "--batch-interpreter=python-fu-eval",
         "-b", f"exec(open('{INSIDE}/batch.py').read())", "--quit"],
        capture_output=True, text=True, timeout=600)
    assert gimp.returncode == 0, gimp.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    report["work"] = work
    return report


def new_and_source(before: list[dict], after: list[dict]) -> tuple[dict, dict]:
    """The one layer a call added, and the layer just below it (the source it must sit above)."""
    names = [layer["name"] for layer in before]
    assert len(after) == len(before) + 1
    index = next(i for i, layer in enumerate(after) if i >= len(names) or layer["name"] != names[i])
    return after[index], after[index + 1]


def pixels(report: dict, layer: dict) -> np.ndarray:
    """A dumped layer's R'G'B'A bytes as an H×W×4 array."""
    width, height = layer["size"]
    return np.fromfile(report["work"] / layer["pixels"], np.uint8).reshape(height, width, 4)


def test_the_procedure_is_registered(gimp_run):
    assert gimp_run["registered"], "GIMP did not register plug-in-stylekit-style-transfer"


def test_preset_result_is_a_new_layer_above_with_the_sources_geometry_and_alpha(gimp_run):
    assert gimp_run["calls"][0] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["before"], gimp_run["after_preset"])
    assert new["name"] == "Ink wash"  # the preset's title
    assert source["name"] == "top.png"
    assert new["offsets"] == source["offsets"] == list(OFFSETS)
    assert new["size"] == source["size"] == list(TOP_SIZE)
    result, original = pixels(gimp_run, new), pixels(gimp_run, source)
    assert np.array_equal(result[..., 3], original[..., 3])  # the source's alpha, exactly
    visible = original[..., 3] > 0
    change = np.abs(result[..., :3].astype(int) - original[..., :3].astype(int))[visible]
    assert change.mean() > 2, "the stylised pixels barely differ from the source"
    assert new["mask"] is None


def test_selection_becomes_the_new_layers_mask(gimp_run):
    assert gimp_run["calls"][1] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_preset"], gimp_run["after_selection"])
    assert new["name"] == "painting" and source["name"] == "top.png"  # named after the style image
    assert new["offsets"] == source["offsets"] and new["size"] == source["size"]
    assert np.array_equal(pixels(gimp_run, new)[..., 3], pixels(gimp_run, source)[..., 3])
    width, height = TOP_SIZE
    mask = np.fromfile(gimp_run["work"] / new["mask"], np.uint8).reshape(height, width)
    x, y, w, h = SELECTION
    inside = np.zeros((height, width), bool)
    inside[max(0, y - OFFSETS[1]):y + h - OFFSETS[1], max(0, x - OFFSETS[0]):x + w - OFFSETS[0]] = True
    assert (mask[inside] == 255).all() and (mask[~inside] == 0).all()


def test_with_last_vals_runs_without_a_dialog(gimp_run):
    assert gimp_run["calls"][2] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_selection"], gimp_run["after_repeat"])
    assert new["name"] == "painting #1" and source["name"] == "top.png"  # GIMP numbers repeated names
    assert new["offsets"] == list(OFFSETS) and new["mask"] is None  # no selection this time


def test_failures_are_messages_saying_what_to_do(gimp_run):
    unknown, nothing, grey = gimp_run["calls"][3:]
    assert unknown["status"] == "calling-error" and "no preset 'no-such-preset'" in unknown["message"]
    assert "ink-wash" in unknown["message"]
    assert nothing["status"] == "calling-error" and "Choose a preset or a style image" in nothing["message"]
    assert grey["status"] == "calling-error" and "Image ▸ Mode ▸ RGB" in grey["message"]
    assert gimp_run["layers_at_end"] == len(gimp_run["after_repeat"])  # failures add nothing
