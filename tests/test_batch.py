"""`stylekit batch` with the local engine: inputs, output names, exactly once, resuming, failures."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import numpy as np
import pytest
from batch_support import PRESET, make_inputs, once_each, output_name, stamps, tiny, tiny_flags
from conftest import make_photo, save_png
from PIL import ExifTags, Image

from stylekit.batch import (
    FAILED_FILE,
    JPEG_ALPHA_WARNING,
    Outcome,
    discover,
    make_recipe,
    plan,
    run_batch,
    run_local,
)
from stylekit.cli import main
from stylekit.engine import LEAN_WARNING
from stylekit.errors import StylekitError
from stylekit.image import read_metadata
from stylekit.presets import get_preset


@pytest.fixture
def batch(tmp_path, weights_file, capsys):
    """Run `stylekit batch` in-process with tiny options; returns (exit code, stderr)."""
    def go(inputs: Path | str, *extra: str, out: Path | None = None) -> tuple[int, str]:
        code = main(["batch", str(inputs), "--preset", PRESET, "--out", str(out or tmp_path / "out"),
                     *tiny_flags(weights_file), *extra])
        return code, capsys.readouterr().err
    return go


def test_discover_takes_images_only_in_sorted_order(tmp_path):
    folder = tmp_path / "in"
    make_inputs(folder, 3)
    (folder / "b.JPG").write_bytes(b"x")
    (folder / ".hidden.png").write_bytes(b"x")
    (folder / "notes.txt").write_text("x")
    make_inputs(folder / "sub", 1)
    names = [path.name for path in discover(str(folder))]
    assert names == ["b.JPG", "img0.png", "img1.png", "img2.png"]
    assert [p.name for p in discover(str(folder / "**" / "*.png"))] == ["img0.png", "img1.png", "img2.png",
                                                                       "img0.png"]
    assert discover(str(folder / "notes.txt")) == [folder / "notes.txt"]  # one file is taken as given
    with pytest.raises(StylekitError, match="no folder or file"):
        discover(str(tmp_path / "missing"))
    with pytest.raises(StylekitError, match="no images in"):
        discover(str(folder / "*.txt"))


def test_output_names_are_fixed_and_never_shared(tmp_path):
    sources = [tmp_path / "a.jpg", tmp_path / "a.png", tmp_path / "sub" / "A.png", tmp_path / "b.png"]
    items = plan(sources, tmp_path / "out", "ink", "png")
    names = [item.output.name for item in items]
    assert names[3] == "b.ink.png" and len(set(names)) == 4
    assert all(name.startswith(("a-", "A-")) and name.endswith(".ink.png") for name in names[:3])
    assert plan(sources, tmp_path / "out", "ink", "png") == items
    with pytest.raises(StylekitError, match="holds input images"):
        plan(sources, tmp_path, "ink")


def test_outputs_take_the_format_asked_for_else_the_inputs_where_stylekit_writes_it(tmp_path):
    sources = [tmp_path / name for name in ("a.jpg", "a.png", "b.tiff", "c.webp", "d.bmp", "e.gif")]
    same = [item.output.name for item in plan(sources, tmp_path / "out", "ink")]
    assert same == ["a.ink.jpg", "a.ink.png", "b.ink.tiff", "c.ink.webp", "d.ink.png", "e.ink.png"]
    webp = [item.output.name for item in plan(sources, tmp_path / "out", "ink", "webp")]
    assert webp[2:] == ["b.ink.webp", "c.ink.webp", "d.ink.webp", "e.ink.webp"]
    assert all(name.startswith("a-") and name.endswith(".ink.webp") for name in webp[:2])  # a clash


def test_an_image_whose_stem_gains_a_twin_keeps_its_earlier_output(batch, tmp_path):
    make_inputs(tmp_path / "in", 1)
    assert batch(tmp_path / "in")[0] == 0
    first = tmp_path / "out" / f"img0.{PRESET}.png"
    Image.open(tmp_path / "in" / "img0.png").save(tmp_path / "in" / "img0.jpg")  # the same stem
    code, err = batch(tmp_path / "in", "--format", "png")
    assert code == 0 and "batch: 1 done, 1 skipped (already there), 0 failed" in err, err
    assert read_metadata(first)["content"] == "img0.png"
    assert len(list((tmp_path / "out").glob("img0*.png"))) == 2


def test_an_earlier_output_made_from_another_input_is_not_taken_for_this_ones(batch, tmp_path):
    """img0.jpg's PNG is where img0.png's own output would go by default: img0.png gets another name."""
    jpeg = tmp_path / "in" / "img0.jpg"
    jpeg.parent.mkdir()
    Image.fromarray((make_photo(32, 32) * 255).astype(np.uint8)).save(jpeg)
    assert batch(tmp_path / "in", "--format", "png")[0] == 0
    before = stamps(tmp_path / "out")
    make_inputs(tmp_path / "in", 1)  # img0.png
    code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 2 done, 0 skipped (already there), 0 failed" in err, err
    after = stamps(tmp_path / "out")
    assert {name: after[name] for name in before} == before  # img0.jpg's PNG kept as it was
    made = {read_metadata(tmp_path / "out" / name)["content"]: name for name in after if name not in before}
    assert made["img0.jpg"] == f"img0.{PRESET}.jpg"
    assert made["img0.png"].startswith("img0-") and made["img0.png"].endswith(f".{PRESET}.png")


def test_a_rerun_in_another_format_makes_those_outputs_and_keeps_the_others(batch, tmp_path):
    sources = make_inputs(tmp_path / "in", 2)
    assert batch(tmp_path / "in")[0] == 0
    pngs = stamps(tmp_path / "out")
    code, err = batch(tmp_path / "in", "--format", "jpg")
    assert code == 0 and "batch: 2 done, 0 skipped (already there), 0 failed" in err, err
    outputs = stamps(tmp_path / "out")
    assert {name: outputs[name] for name in pngs} == pngs
    for source in sources:
        with Image.open(tmp_path / "out" / output_name(source, ".jpg")) as output:
            assert output.format == "JPEG"
    code, err = batch(tmp_path / "in", "--format", "jpg")
    assert code == 0 and "batch: 0 done, 2 skipped (already there), 0 failed" in err, err


def test_quality_sets_the_jpeg_compression_of_every_output(batch, tmp_path):
    """A JPEG's quantisation tables are its quality: libjpeg scales the standard ones by it."""
    sources = make_inputs(tmp_path / "in", 2)
    assert batch(tmp_path / "in", "--format", "jpg", out=tmp_path / "default")[0] == 0
    code, err = batch(tmp_path / "in", "--format", "jpg", "--quality", "10", out=tmp_path / "low")
    assert code == 0, err
    for source in sources:
        default, low = (Image.open(tmp_path / folder / output_name(source, ".jpg")).quantization
                        for folder in ("default", "low"))
        assert all(sum(low[table]) > 4 * sum(default[table]) for table in default)


def test_a_transparent_image_in_a_jpeg_batch_warns_that_it_is_flattened_once(batch, tmp_path):
    for index in range(2):
        rgba = np.dstack([make_photo(32, 32, seed=index), np.full((32, 32), 0.5, np.float32)])
        (tmp_path / "in").mkdir(exist_ok=True)
        Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(tmp_path / "in" / f"a{index}.png")
    code, err = batch(tmp_path / "in", "--format", "jpg")
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {tmp_path / 'in' / 'a0.png'}: {JPEG_ALPHA_WARNING}"]


def test_a_batch_says_once_that_its_outputs_come_out_smaller_than_their_inputs(batch, tmp_path):
    """520 px is over the default long side (512) while a 520×32 strip stays quick to style."""
    make_inputs(tmp_path / "in", 1)
    for name in ("wide0.png", "wide1.png"):
        save_png(tmp_path / "in" / name, make_photo(520, 32))
    code, err = batch(tmp_path / "in")
    assert code == 0, err
    notes = [line for line in err.splitlines() if line.startswith("note: ")]
    assert notes == [f"note: outputs may be smaller than their inputs: {tmp_path / 'in' / 'wide0.png'} "
                     "came out 512×32 from 520×32 (without --size, the photo's own, at most 512 px); "
                     "--size PX sets every output's long side"]
    code, err = batch(tmp_path / "in", "--size", "300", out=tmp_path / "sized")
    assert code == 0 and "note: " not in err, err


def test_each_image_is_styled_exactly_once_and_a_rerun_does_no_work(batch, tmp_path):
    sources = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    code, err = batch(tmp_path / "in")
    assert code == 0, err
    assert "batch: 8 done, 0 skipped (already there), 0 failed" in err
    assert sorted(stamps(out)) == sorted(output_name(source) for source in sources)  # no temporaries
    metadata = read_metadata(out / "img3.woodcut.png")
    assert metadata["content"] == "img3.png" and metadata["preset"] == PRESET
    assert metadata["options"]["steps"] == 2
    before = stamps(out)
    code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 0 done, 8 skipped (already there), 0 failed" in err
    assert stamps(out) == before


def test_an_output_keeps_its_inputs_camera_metadata_and_resolution(batch, tmp_path):
    source = make_inputs(tmp_path / "in", 1)[0]
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Canon", "EOS R5"
    Image.open(source).save(source, exif=exif.tobytes(), dpi=(300, 300))
    code, err = batch(tmp_path / "in")
    assert code == 0, err
    with Image.open(tmp_path / "out" / output_name(source)) as output:
        assert output.info["dpi"] == pytest.approx((300, 300), abs=0.01)
        exif = output.getexif()
    assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == ("Canon", "EOS R5")


def test_a_warning_is_shown_once_naming_the_first_image_it_came_with(batch, tmp_path):
    make_inputs(tmp_path / "in", 2)
    code, err = batch(tmp_path / "in", "--size=240", "--max-memory=0.78")  # fits only lean: slower
    assert code == 0, err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert warnings == [f"warning: {tmp_path / 'in' / 'img0.png'}: {LEAN_WARNING}"]


def test_a_stopped_batch_resumes_where_it_stopped(tmp_path, weights_file):
    sources = make_inputs(tmp_path / "in", 5)
    out = tmp_path / "out"
    out.mkdir()
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    items = plan(sources, out, PRESET)
    seen: list[Outcome] = []

    def stop_after_two(outcome: Outcome) -> None:
        seen.append(outcome)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(out, items, recipe, run_local, stop_after_two)
    assert sorted(stamps(out)) == ["img0.woodcut.png", "img1.woodcut.png"]
    summary = run_batch(out, items, recipe, run_local, seen.append)
    assert (summary.done, summary.skipped, summary.failures) == (3, 2, [])
    assert set(once_each([o for o in seen if o.status == "done"]).values()) == {1}
    assert len(seen) == 2 + 5


def test_a_failed_image_is_recorded_with_its_reason_and_retried_next_time(batch, tmp_path):
    sources = make_inputs(tmp_path / "in", 3)
    broken = tmp_path / "in" / "img1.png"
    broken.write_bytes(b"not a png")
    code, err = batch(tmp_path / "in")
    assert code == 1
    assert "batch: 2 done, 0 skipped (already there), 1 failed" in err
    assert err.strip().splitlines()[-1] == (f"stylekit: error: 1 of 3 images failed (reasons in "
                                            f"{tmp_path / 'out' / FAILED_FILE})")
    record = json.loads((tmp_path / "out" / FAILED_FILE).read_text())["failed"]
    assert len(record) == 1 and record[0]["input"] == str(broken)
    assert "is not an image stylekit can read" in record[0]["reason"] and record[0]["attempts"] == 1
    make_inputs(tmp_path / "in", 3)  # the broken one replaced by a good image
    code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 1 done, 2 skipped" in err
    assert sorted(stamps(tmp_path / "out")) == sorted(output_name(source) for source in sources)


@pytest.mark.parametrize(("args", "message"), [
    (["missing-folder"], "no folder or file"),
    (["IN", "--preset", "no-such-preset"], "unknown preset 'no-such-preset'"),
    (["IN", "--init", "photo.png"], "batch cannot use an --init FILE"),
    (["IN", "--out", "IN"], "holds input images"),
    (["IN", "--weights", "missing.pth"], "weights file 'missing.pth' not found"),
    (["IN", "--style-layers", "relu9_9"], "unknown layer 'relu9_9'"),
    (["IN", "--ray-address", "10.0.0.10:6379"], "--ray-address is for --engine ray only"),
    (["IN", "--gpus-per-task", "0.5"], "--gpus-per-task is for --engine ray only"),
    (["IN", "--format", "gif"], "Invalid value for '--format'"),
    (["IN", "--quality", "80"], "--quality is for JPEG and WebP outputs, not PNG (lossless)"),
    (["IN", "--format", "tif", "--quality", "80"], "--quality is for JPEG and WebP outputs, not TIFF"),
    (["IN", "--format", "jpg", "--quality", "0"], "Invalid value for '--quality'"),
])
def test_bad_input_is_one_line(batch, tmp_path, args, message):
    make_inputs(tmp_path / "IN", 1)
    args = [str(tmp_path / arg) if arg in ("IN", "missing-folder") else arg for arg in args]
    code, err = batch(*args)
    assert code != 0 and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_engine_ray_without_ray_says_how_to_install(batch, tmp_path, monkeypatch):
    make_inputs(tmp_path / "in", 1)
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` meets where it is not installed
    code, err = batch(tmp_path / "in", "--engine", "ray")
    assert code == 1
    assert err.strip() == "stylekit: error: --engine ray needs Ray: pip install 'stylekit[ray]'"


def test_a_ray_cluster_that_does_not_answer_is_one_line(batch, tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'stylekit[ray]')")
    make_inputs(tmp_path / "in", 1)
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    code, err = batch(tmp_path / "in", "--engine", "ray", "--ray-address", address)
    assert code == 1
    assert err.strip() == (f"stylekit: error: no Ray cluster answers at '{address}' (Connection refused); "
                           "start one with `ray start --head` or fix --ray-address")
