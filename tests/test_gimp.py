"""The plug-in in a real GIMP 3 (Debian trixie chroot, headless batch) against a real `stylekit serve`.

Needs root and the chroot built by plugins/gimp/tests/make-chroot.sh: `make gimp-test` does both.
Skipped otherwise, unless STYLEKIT_GIMP_REQUIRED=1 (then missing GIMP is a failure).
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_painting, make_photo, save_png, start_server
from PIL import Image

from stylekit.image import encode_png

GIMP_ROOT = Path(os.environ.get("STYLEKIT_GIMP_ROOT", "/var/cache/stylekit/gimp3-root"))
INSIDE = "/tmp/stylekit-gimp-test"  # the work folder as GIMP sees it inside the chroot
SCRIPTS = Path(__file__).parents[1] / "plugins" / "gimp" / "tests"
OFFSETS = (12, 9)
TOP_SIZE = (40, 32)
SELECTION = (0, 0, 30, 64)  # x, y, width, height in image coordinates
MASK = (0, 20, 80, 64)  # the top layer's own mask, from this rectangle (image coordinates)
LIMITED_PIXELS = 4096  # the constrained server's --max-pixels: under the 80×64 background's
DEEP_PRECISIONS = ("U16_NON_LINEAR", "FLOAT_LINEAR")  # a 16-bit and a 32-bit float image (Gimp.Precision)

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


def prepare(gimp_root: Path, inside: str, live_server: str, script: str, **spec: object) -> Path:
    """A fresh work folder in the chroot: images, the script, and the plug-in installed by the CLI.

    `spec` adds to what the script reads from spec.json (batch.py: `first_call_only`,
    `first_on_background`, `first_arguments`, `precision`; with a precision, top.png has 16 bits).
    """
    work = gimp_root / inside.lstrip("/")
    shutil.rmtree(work, ignore_errors=True)
    (work / "home").mkdir(parents=True)
    (work / "profile").mkdir()  # `gimp install` refuses a profile folder that does not exist
    save_png(work / "base.png", make_photo(80, 64, seed=2))
    top = top_layer_pixels()
    if spec.get("precision"):
        (work / "top.png").write_bytes(encode_png(top[..., :3], top[..., 3], bits=16))
    else:
        Image.fromarray((top * 255).round().astype(np.uint8), "RGBA").save(work / "top.png")
    save_png(work / "painting.png", make_painting(48, 48))
    (work / "spec.json").write_text(json.dumps({"preset": "ink-wash", "offsets": OFFSETS,
                                                "selection": SELECTION, "mask": MASK, **spec}))
    shutil.copy(SCRIPTS / script, work / script)
    stylekit = Path(sys.executable).parent / "stylekit"
    installed = subprocess.run([str(stylekit), "gimp", "install", "--gimp-dir", str(work / "profile"),
                                "--url", live_server], capture_output=True, text=True, check=True)
    assert "installed the GIMP plug-in" in installed.stdout
    return work


def gimp_command(gimp_root: Path, inside: str, script: str, *program: str, display: str = "") -> list[str]:
    """Run a GIMP program in the chroot with a clean environment, executing script as its batch."""
    environment = {"PATH": "/usr/bin:/bin", "HOME": f"{inside}/home", "GIMP3_DIRECTORY": f"{inside}/profile",
                   "STYLEKIT_GIMP_WORK": inside, **({"DISPLAY": display} if display else {})}
    return ["chroot", str(gimp_root), "env", "-i", *(f"{k}={v}" for k, v in environment.items()), *program,
            "--batch-interpreter=python-fu-eval", "-b", f"exec(open('{inside}/{script}').read())", "--quit"]


def run_batch(gimp_root: Path, inside: str, server: str, **spec: object) -> dict:
    """Install the plug-in with `stylekit gimp install`, run batch.py in gimp-console, return its report
    with the work folder and GIMP's console output."""
    work = prepare(gimp_root, inside, server, "batch.py", **spec)
    gimp = subprocess.run(gimp_command(gimp_root, inside, "batch.py", "gimp-console-3.0", "-i"),
                          capture_output=True, text=True, timeout=600)
    assert gimp.returncode == 0, gimp.stderr[-3000:]
    report = json.loads((work / "report.json").read_text())
    return {"work": work, "output": gimp.stdout + gimp.stderr, **report}


@pytest.fixture(scope="module")
def gimp_run(gimp_root: Path, live_server: str) -> dict:
    """batch.py's whole run: presets, a style image, a selection, a repeat and failures."""
    return run_batch(gimp_root, INSIDE, live_server)


@pytest.fixture(scope="module", params=DEEP_PRECISIONS)
def gimp_deep_run(request: pytest.FixtureRequest, gimp_root: Path, live_server: str) -> dict:
    """batch.py's first call on an image of a deeper precision with a 16-bit top layer (dumped as u16)."""
    return run_batch(gimp_root, f"{INSIDE}-{request.param.lower()}", live_server, first_call_only=True,
                     precision=request.param)


@pytest.fixture(scope="module")
def gimp_dialog_run(gimp_root: Path, live_server: str) -> list[dict]:
    """GUI GIMP under Xvfb runs interactive.py; the test presses Return in the real dialog."""
    inside = f"{INSIDE}-gui"
    work = prepare(gimp_root, inside, live_server, "interactive.py")
    xvfb = subprocess.Popen(["chroot", str(gimp_root), "Xvfb", "-displayfd", "1", "-screen", "0",
                             "1024x768x24", "-nolisten", "tcp"], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True)
    try:
        display = f":{xvfb.stdout.readline().strip()}"
        gimp = subprocess.Popen(gimp_command(gimp_root, inside, "interactive.py", "gimp-3.0", "--no-splash",
                                             display=display),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        xdotool = ["chroot", str(gimp_root), "env", f"DISPLAY={display}", "xdotool"]
        deadline = time.monotonic() + 180
        while (found := subprocess.run([*xdotool, "search", "--name", "^Style Transfer$"],
                                       capture_output=True, text=True)).returncode != 0:
            assert gimp.poll() is None and time.monotonic() < deadline, "the dialog never appeared"
            time.sleep(0.5)
        window = found.stdout.split()[0]
        time.sleep(1)  # let it finish drawing
        subprocess.run([*xdotool, "windowfocus", "--sync", window, "key", "Return"], check=True)
        _, errors = gimp.communicate(timeout=300)
        assert gimp.returncode == 0, errors[-3000:]
    finally:
        xvfb.terminate()
        xvfb.wait(30)
    return json.loads((work / "interactive.json").read_text())


@pytest.fixture(scope="module")
def gimp_constrained_run(gimp_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """batch.py's first call, on the 80×64 background with a size limit of 64 and "keep colours", against
    a server that fell back to random weights and takes images of at most LIMITED_PIXELS; its report
    and GIMP's console output.

    The server has weights `auto`, nothing cached (the test environment's own empty caches) and a proxy
    that refuses every connection, so ImageNet's download fails at once without depending on the net.
    """
    folder = tmp_path_factory.mktemp("offline-server")
    refused = "http://127.0.0.1:9"  # the discard port: nothing listens
    server, url = start_server(folder / "serve.log", "--weights", "auto", "--device", "cpu",
                               "--max-pixels", str(LIMITED_PIXELS),
                               environment={"https_proxy": refused, "HTTPS_PROXY": refused,
                                            "no_proxy": "", "NO_PROXY": ""})
    try:
        return run_batch(gimp_root, f"{INSIDE}-constrained", url, first_call_only=True,
                         first_on_background=True, first_arguments={"max_size": 64, "preserve_colors": True})
    finally:
        server.terminate()
        server.wait(30)


def new_and_source(before: list[dict], after: list[dict]) -> tuple[dict, dict]:
    """The one layer a call added, and the layer just below it (the source it must sit above)."""
    names = [layer["name"] for layer in before]
    assert len(after) == len(before) + 1
    index = next(i for i, layer in enumerate(after) if i >= len(names) or layer["name"] != names[i])
    return after[index], after[index + 1]


def pixels(report: dict, layer: dict) -> np.ndarray:
    """A dumped layer's R'G'B'A samples (8 or 16 bits, as the report says) as an H×W×4 array."""
    width, height = layer["size"]
    samples = np.uint16 if report["bits"] == 16 else np.uint8  # GEGL writes this machine's byte order
    return np.fromfile(report["work"] / layer["pixels"], samples).reshape(height, width, 4)


def covered(x: int, y: int, width: int, height: int) -> np.ndarray:
    """Which of the top layer's pixels (at OFFSETS) an image rectangle covers."""
    (left, top), inside = OFFSETS, np.zeros(TOP_SIZE[::-1], bool)
    inside[max(0, y - top):y + height - top, max(0, x - left):x + width - left] = True
    return inside


def mask_pixels(report: dict, layer: dict) -> np.ndarray:
    """A dumped layer mask as an H×W array of 8-bit values."""
    width, height = layer["size"]
    return np.fromfile(report["work"] / layer["mask"], np.uint8).reshape(height, width)


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


def test_a_deep_images_result_keeps_more_than_8_bits_and_the_sources_alpha(gimp_deep_run):
    assert gimp_deep_run["calls"][0] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_deep_run["before"], gimp_deep_run["after_preset"])
    result, original = pixels(gimp_deep_run, new), pixels(gimp_deep_run, source)
    assert (original[..., 3] % 257 != 0).any()  # the source's alpha itself lies between 8-bit steps
    assert np.array_equal(result[..., 3], original[..., 3])
    colours = result[..., :3][original[..., 3] > 0].astype(int)
    # an 8-bit result lands on multiples of 257 (give or take a float image's rounding); a 16-bit one
    # is mostly further away
    assert (np.abs(colours - np.rint(colours / 257) * 257) > 8).mean() > 0.5


def test_selection_becomes_the_new_layers_mask(gimp_run):
    assert gimp_run["calls"][1] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_preset"], gimp_run["after_selection"])
    assert new["name"] == "painting" and source["name"] == "top.png"  # named after the style image
    assert new["offsets"] == source["offsets"] and new["size"] == source["size"]
    assert np.array_equal(pixels(gimp_run, new)[..., 3], pixels(gimp_run, source)[..., 3])
    mask, inside = mask_pixels(gimp_run, new), covered(*SELECTION)
    assert (mask[inside] == 255).all() and (mask[~inside] == 0).all()


def test_what_the_sources_own_mask_hides_stays_hidden(gimp_run):
    assert gimp_run["calls"][6] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_repeat"], gimp_run["after_mask"])
    assert source["name"] == "top.png" and source["mask"] is not None
    mask, inside = mask_pixels(gimp_run, new), covered(*SELECTION) & covered(*MASK)
    assert inside.any() and (covered(*SELECTION) & ~inside).any()  # the source's mask hides part of it
    assert (mask[inside] == 255).all() and (mask[~inside] == 0).all()


def test_with_last_vals_runs_without_a_dialog(gimp_run):
    assert gimp_run["calls"][2] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_selection"], gimp_run["after_repeat"])
    assert new["name"] == "painting #1" and source["name"] == "top.png"  # GIMP numbers repeated names
    assert new["offsets"] == list(OFFSETS) and new["mask"] is None  # no selection this time


def test_a_chosen_style_image_wins_over_the_preset(gimp_run):
    assert gimp_run["calls"][7] == {"status": "success", "message": None}
    new, source = new_and_source(gimp_run["after_mask"], gimp_run["after_both"])
    assert new["name"] == "painting #2" and source["name"] == "top.png"  # named after the style image
    styled = pixels(gimp_run, new)[..., :3].astype(int)
    by_style = pixels(gimp_run, new_and_source(gimp_run["after_preset"], gimp_run["after_selection"])[0])
    by_preset = pixels(gimp_run, new_and_source(gimp_run["before"], gimp_run["after_preset"])[0])
    visible = pixels(gimp_run, source)[..., 3] > 0
    assert (np.abs(styled - by_style[..., :3])[visible].mean()
            < np.abs(styled - by_preset[..., :3])[visible].mean() / 2)  # painted like the style image


def test_failures_are_messages_saying_what_to_do(gimp_run):
    unknown, nothing, grey = gimp_run["calls"][3:6]
    assert unknown["status"] == "calling-error" and "no preset 'no-such-preset'" in unknown["message"]
    assert "ink-wash" in unknown["message"]
    assert nothing["status"] == "calling-error" and "Choose a preset or a style image" in nothing["message"]
    assert grey["status"] == "calling-error" and "Image ▸ Mode ▸ RGB" in grey["message"]
    assert gimp_run["layers_at_end"] == len(gimp_run["after_repeat"])  # failures add nothing


def test_a_layer_in_a_group_gets_its_result_in_that_group_right_above_it(gimp_run):
    assert gimp_run["calls"][8] == {"status": "success", "message": None}
    result, source = gimp_run["in_group"]
    assert result.startswith("Ink wash") and source == "inner"  # "Ink wash #2": GIMP keeps names unique


def test_a_selection_missing_the_layer_and_a_floating_selection_are_refused_adding_nothing(gimp_run):
    missed, floating = gimp_run["calls"][9:11]
    assert missed["status"] == "calling-error" and "does not touch this layer" in missed["message"]
    assert floating["status"] == "calling-error" and "Anchor the floating selection" in floating["message"]
    assert gimp_run["layers_after_refusals"][0] == "small"  # nothing added above it


def test_the_result_is_seen_the_way_its_source_is_with_its_opacity_and_blend_mode(gimp_run):
    assert gimp_run["calls"][11] == {"status": "success", "message": None}
    name, opacity, mode = gimp_run["result_look"]
    assert name != "small" and opacity == pytest.approx(40.0) and mode == "multiply"


def test_a_servers_warning_is_shown_as_a_gimp_message(gimp_constrained_run):
    # gimp-console prints a plug-in's messages headed with its name; the GUI shows them in a dialog
    assert "Style Transfer-Warning: ImageNet weights unavailable" in gimp_constrained_run["output"]
    assert "using seeded random weights" in gimp_constrained_run["output"]


def test_a_layer_over_the_servers_pixel_limit_is_sent_at_the_working_size(gimp_constrained_run):
    assert LIMITED_PIXELS < 80 * 64  # the background as it is would be refused
    assert gimp_constrained_run["calls"][0]["status"] == "success"
    new, source = new_and_source(gimp_constrained_run["before"], gimp_constrained_run["after_preset"])
    assert new["size"] == source["size"] == [80, 64]  # worked on at 64×51, scaled back to the layer


def test_a_layer_scaled_down_for_the_server_is_sent_with_its_pixels(gimp_constrained_run):
    # "keep colours" gives the result the colours it was sent: the layer's, not a blank layer's grey
    new, source = new_and_source(gimp_constrained_run["before"], gimp_constrained_run["after_preset"])
    result, original = (pixels(gimp_constrained_run, layer)[..., :3].astype(float) for layer in (new, source))

    def chroma(rgb: np.ndarray) -> np.ndarray:
        return np.stack([rgb[..., 0] - rgb[..., 1], rgb[..., 2] - rgb[..., 1]])

    assert np.abs(chroma(result) - chroma(original)).mean() < np.abs(chroma(original)).mean() / 3


def test_interactive_dialog_then_repeat_with_last_values(gimp_dialog_run, live_server):
    first_preset = httpx.get(f"{live_server}/v1/presets").json()[0]["title"]
    interactive, repeat = gimp_dialog_run
    assert interactive == {"status": "success", "layers": [first_preset, "Background"]}
    # WITH_LAST_VALS was given no preset: it reused the dialog's values
    assert repeat == {"status": "success", "layers": [first_preset, f"{first_preset} #1", "Background"]}
