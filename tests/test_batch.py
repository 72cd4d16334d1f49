"""`stylekit batch` with the local engine: inputs, output names, exactly once, resuming, failures."""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from batch_support import (
    PRESET,
    at_outcome,
    batch_process,
    claimed_elsewhere,
    make_inputs,
    once_each,
    output_name,
    stamps,
    tiny,
    tiny_flags,
)
from conftest import fill, make_photo, make_read_only, save_png, small_disk
from PIL import ExifTags, Image

from stylekit.batch import (
    FAILED_FILE,
    GONE,
    JPEG_ALPHA_WARNING,
    TAKEN,
    Item,
    Outcome,
    OutputRefused,
    Recipe,
    discover,
    make_recipe,
    plan,
    run_batch,
    run_local,
    source_id,
)
from stylekit.cli import main
from stylekit.engine import LEAN_WARNING
from stylekit.errors import StylekitError
from stylekit.image import read_metadata, save_image
from stylekit.pipeline.folders import Layout, locked
from stylekit.presets import get_preset


@pytest.fixture
def batch(tmp_path, weights_file, capsys):
    """Run `stylekit batch` in-process with tiny options; returns (exit code, stderr)."""
    def go(inputs: Path | str, *extra: str, out: Path | None = None) -> tuple[int, str]:
        code = main(["batch", str(inputs), "--preset", PRESET, "--out", str(out or tmp_path / "out"),
                     *tiny_flags(weights_file), *extra])
        return code, capsys.readouterr().err
    return go


@pytest.fixture
def disk(tmp_path_factory) -> Iterator[Path]:
    """An empty folder on a real 256 KiB disk of its own (skipped where it cannot be mounted)."""
    with small_disk(tmp_path_factory.mktemp("disk")) as folder:
        yield folder


def timeless(line: str) -> str:
    """A summary line with its seconds as X (they differ from run to run)."""
    return re.sub(r" in \d+\.\d s;", " in X s;", line.strip())


def test_discover_takes_phone_and_avif_photos(tmp_path):
    for name in ("a.HEIC", "b.heif", "c.avif"):
        (tmp_path / name).write_bytes(b"x")
    assert [path.name for path in discover(str(tmp_path))] == ["a.HEIC", "b.heif", "c.avif"]


def test_discover_takes_a_file_named_twice_through_a_symlink_once(tmp_path):
    make_inputs(tmp_path / "day1", 1)
    (tmp_path / "best").mkdir()
    (tmp_path / "best" / "img0.png").symlink_to(tmp_path / "day1" / "img0.png")
    assert discover(str(tmp_path / "**" / "*.png")) == [tmp_path / "best" / "img0.png"]


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


def test_a_hashed_output_name_is_the_same_for_a_relative_and_an_absolute_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    relative = [Path("a.jpg"), Path("a.png")]
    absolute = [tmp_path / path for path in relative]
    assert plan(relative, tmp_path / "out", "ink", "png") == [
        replace(item, source=path) for item, path in
        zip(plan(absolute, tmp_path / "out", "ink", "png"), relative, strict=True)]


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

    def interrupt() -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(out, items, recipe, run_local, at_outcome(2, interrupt, seen))
    assert sorted(stamps(out)) == ["img0.woodcut.png", "img1.woodcut.png"]
    summary = run_batch(out, items, recipe, run_local, seen.append)
    assert (summary.done, summary.skipped, summary.failures) == (3, 2, [])
    assert set(once_each([o for o in seen if o.status == "done"]).values()) == {1}
    assert len(seen) == 2 + 5


def test_a_rerun_of_a_glob_that_reaches_its_own_out_folder_skips_its_outputs(batch, tmp_path):
    shoot = tmp_path / "shoot"
    make_inputs(shoot / "day1", 2)
    spec, out = str(shoot / "**" / "*.png"), shoot / "styled"
    assert batch(spec, out=out)[0] == 0
    before = stamps(out)
    code, err = batch(spec, out=out)
    assert code == 0 and "0 done, 2 skipped" in err
    assert stamps(out) == before


def test_an_image_that_is_no_output_in_out_is_refused(batch, tmp_path):
    make_inputs(tmp_path / "shoot", 1)
    make_inputs(tmp_path / "shoot" / "styled", 1)
    code, err = batch(str(tmp_path / "shoot" / "**" / "*.png"), out=tmp_path / "shoot" / "styled")
    assert code == 1 and "holds input images ('img0.png')" in err


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


def test_a_full_output_disk_stops_the_batch_at_the_first_output_it_refuses(tmp_path, weights_file, disk):
    sources = make_inputs(tmp_path / "in", 4)
    out = disk / "out"
    out.mkdir()
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    styled: list[Path] = []

    def local(recipe: Recipe, items: Sequence[Item]) -> Iterator[Outcome]:
        for outcome in run_local(recipe, items):
            styled.append(outcome.item.source)
            yield outcome

    with pytest.raises(OutputRefused) as stop:
        run_batch(out, plan(sources, out, PRESET), recipe, local, lambda outcome: fill(disk))
    assert "1 done, 0 skipped (already there), 0 failed in " in str(stop.value)
    assert "; stopped with 3 images to go, because the output folder's disk is full" in str(stop.value)
    assert styled == sources[:2]  # the one its output was refused for, and none after it
    assert sorted(os.listdir(out)) == [output_name(sources[0])]  # no temporaries, claims or record


def test_a_batch_stopped_by_a_full_disk_ends_with_one_line_and_a_rerun_resumes(batch, tmp_path, disk):
    make_inputs(tmp_path / "in", 1)
    assert batch(tmp_path / "in", out=disk / "out")[0] == 0
    sources = make_inputs(tmp_path / "in", 3)
    filler = fill(disk)
    code, err = batch(tmp_path / "in", out=disk / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert timeless(err) == (
        "stylekit: error: 0 done, 1 skipped (already there), 0 failed in X s; stopped with 2 images to go, "
        f"because the output folder's disk is full ('{disk / 'out'}': No space left on device): run the same "
        "command again to resume once there is room")
    filler.unlink()
    code, err = batch(tmp_path / "in", out=disk / "out")
    assert code == 0 and "batch: 2 done, 1 skipped (already there), 0 failed" in err, err
    assert sorted(os.listdir(disk / "out")) == sorted(output_name(source) for source in sources)


def test_a_read_only_output_disk_stops_the_batch_saying_so(batch, tmp_path, disk):
    make_inputs(tmp_path / "in", 1)
    assert batch(tmp_path / "in", out=disk / "out")[0] == 0
    make_inputs(tmp_path / "in", 2)
    make_read_only(disk)
    code, err = batch(tmp_path / "in", out=disk / "out")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert timeless(err) == (
        "stylekit: error: 0 done, 1 skipped (already there), 0 failed in X s; stopped with 1 image to go, "
        f"because the output folder's disk is read-only ('{disk / 'out'}': Read-only file system): run the "
        "same command again to resume once it is writable")


def test_a_finished_batch_reruns_on_a_read_only_disk_as_all_skipped(batch, tmp_path, disk):
    make_inputs(tmp_path / "in", 2)
    assert batch(tmp_path / "in", out=disk / "out")[0] == 0
    make_read_only(disk)
    code, err = batch(tmp_path / "in", out=disk / "out")
    assert code == 0 and err.strip().startswith("batch: 0 done, 2 skipped (already there), 0 failed"), err


def test_a_failure_record_the_full_disk_refuses_still_ends_with_the_counts(tmp_path, weights_file, disk):
    sources = make_inputs(tmp_path / "in", 2)
    sources[1].write_bytes(b"not a png")
    out = disk / "out"
    out.mkdir()
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    fill_after_the_last = at_outcome(len(sources), lambda: fill(disk))
    with pytest.raises(OutputRefused) as stop:
        run_batch(out, plan(sources, out, PRESET), recipe, run_local, fill_after_the_last)
    assert timeless(str(stop.value)).startswith(
        "1 done, 0 skipped (already there), 1 failed in X s; the failure record could not be written, "
        "because the output folder's disk is full")
    assert sorted(os.listdir(out)) == [output_name(sources[0])]


def test_two_batches_at_once_on_the_same_folders_style_each_image_once(tmp_path, weights_file):
    sources = make_inputs(tmp_path / "in", 8)
    runs = [batch_process(tmp_path / "in", tmp_path / "out", weights_file) for _ in range(2)]
    errs = [run.communicate(timeout=300)[1] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], errs
    done = [int(err.split("batch: ")[1].split(" done")[0]) for err in errs]
    assert sum(done) == len(sources), errs
    assert sorted(stamps(tmp_path / "out")) == sorted(output_name(source) for source in sources)


def test_an_image_another_batch_is_styling_is_left_to_it(batch, tmp_path):
    sources = make_inputs(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    with claimed_elsewhere(Item(sources[0], tmp_path / "out" / output_name(sources[0]))):
        code, err = batch(tmp_path / "in")
    summary = "batch: 1 done, 0 skipped (already there), 1 left alone (another batch's, or gone), 0 failed"
    assert code == 0 and summary in err, err
    assert f"skipped: {sources[0]}: {TAKEN}" in err.splitlines()
    assert [(tmp_path / "out" / output_name(source)).exists() for source in sources] == [False, True]


def test_an_image_another_batch_is_styling_keeps_its_failure_record(batch, tmp_path):
    sources = make_inputs(tmp_path / "in", 2)
    sources[0].write_bytes(b"not a png")
    assert batch(tmp_path / "in")[0] == 1  # its failure recorded, as the batch styling it now would
    with claimed_elsewhere(Item(sources[0], tmp_path / "out" / output_name(sources[0]))):
        code, err = batch(tmp_path / "in")
    assert code == 0 and f"skipped: {sources[0]}: {TAKEN}" in err.splitlines(), err
    record = json.loads((tmp_path / "out" / FAILED_FILE).read_text())["failed"]
    assert [row["input"] for row in record] == [str(sources[0])]


def test_an_image_whose_output_name_only_just_fits_is_styled(batch, tmp_path):
    source = make_inputs(tmp_path / "in", 1)[0]
    long_name = source.with_name("x" * (255 - len(output_name(source)) + len("img0")) + ".png")
    source.rename(long_name)  # its output's name is 255 bytes, the most a name may have here
    code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 1 done" in err, err
    assert (tmp_path / "out" / output_name(long_name)).exists()


def test_a_killed_batch_leaves_no_image_claimed(batch, tmp_path):
    sources = make_inputs(tmp_path / "in", 2)
    (tmp_path / "out").mkdir()
    with claimed_elsewhere(Item(sources[0], tmp_path / "out" / output_name(sources[0]))) as other:
        other.kill()
        other.wait()
        code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 2 done, 0 skipped (already there), 0 failed" in err, err
    assert sorted(stamps(tmp_path / "out")) == sorted(output_name(source) for source in sources)


def test_inputs_of_the_same_name_from_two_folders_into_one_output_folder_each_get_styled(batch, tmp_path):
    first, second = make_inputs(tmp_path / "in1", 1)[0], make_inputs(tmp_path / "in2", 1)[0]
    assert batch(tmp_path / "in1")[0] == 0
    code, err = batch(tmp_path / "in2")
    assert code == 0 and "batch: 1 done, 0 skipped (already there), 0 failed" in err, err
    made = {read_metadata(tmp_path / "out" / name)["content_id"]: name for name in stamps(tmp_path / "out")}
    assert made[source_id(first)] == output_name(first)
    assert made[source_id(second)].startswith("img0-")  # the hashed name: the plain one is taken
    for folder in ("in1", "in2"):
        code, err = batch(tmp_path / folder)
        assert code == 0 and "batch: 0 done, 1 skipped (already there), 0 failed" in err, err


def test_an_output_recording_only_its_inputs_name_still_counts_as_that_inputs(batch, tmp_path):
    """Outputs of versions before content_id: the name is all there is; a re-run must not redo them."""
    source = make_inputs(tmp_path / "in", 1)[0]
    (tmp_path / "out").mkdir()
    old = tmp_path / "out" / output_name(source)
    save_image(old, np.full((32, 32, 3), 0.5, np.float32), metadata={"content": source.name})
    code, err = batch(tmp_path / "in")
    assert code == 0 and "batch: 0 done, 1 skipped (already there), 0 failed" in err, err
    assert sorted(stamps(tmp_path / "out")) == [old.name]


def test_a_run_keeps_the_failure_records_of_other_inputs(batch, tmp_path):
    make_inputs(tmp_path / "in1", 2)
    broken = tmp_path / "in1" / "img1.png"
    broken.write_bytes(b"not a png")
    assert batch(tmp_path / "in1")[0] == 1
    make_inputs(tmp_path / "in2", 2)
    code, err = batch(tmp_path / "in2")
    assert code == 0, err
    record = json.loads((tmp_path / "out" / FAILED_FILE).read_text())["failed"]
    assert [row["input"] for row in record] == [str(broken)]
    make_inputs(tmp_path / "in1", 2)  # repaired
    assert batch(tmp_path / "in1")[0] == 0
    assert not (tmp_path / "out" / FAILED_FILE).exists()


def test_a_run_drops_the_failure_records_of_inputs_that_are_gone(batch, tmp_path):
    make_inputs(tmp_path / "in1", 2)
    (tmp_path / "in1" / "img1.png").write_bytes(b"not a png")
    assert batch(tmp_path / "in1")[0] == 1
    (tmp_path / "in1" / "img1.png").unlink()  # the user deleted the broken input
    make_inputs(tmp_path / "in2", 1)
    assert batch(tmp_path / "in2")[0] == 0
    assert not (tmp_path / "out" / FAILED_FILE).exists()


def test_a_running_watchers_done_folder_can_be_batched(batch, tmp_path):
    make_inputs(tmp_path / "inbox" / "done", 1)
    with locked(Layout(tmp_path / "inbox", tmp_path / "outbox")):  # what a running watcher holds
        code, err = batch(tmp_path / "inbox" / "done")
    assert code == 0 and "batch: 1 done" in err, err


@pytest.mark.parametrize("spec", ["inbox", "inbox/woodcut", "**/*.png"])
def test_inputs_a_running_watcher_takes_images_from_are_refused(batch, tmp_path, spec):
    make_inputs(tmp_path / "inbox", 1)
    make_inputs(tmp_path / "inbox" / "woodcut", 1)
    with locked(Layout(tmp_path / "inbox", tmp_path / "outbox")):  # what a running watcher holds
        code, err = batch(f"{tmp_path}/{spec}")
    assert code == 1 and len(err.strip().splitlines()) == 1, err
    assert f"is in '{tmp_path / 'inbox'}', which a running stylekit watch (pid " in err
    assert not (tmp_path / "out").exists()


def test_an_input_that_disappears_during_the_run_is_skipped_not_failed(tmp_path, weights_file):
    sources = make_inputs(tmp_path / "in", 3)
    out = tmp_path / "out"
    out.mkdir()
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    seen: list[Outcome] = []
    move_the_last_away = at_outcome(1, lambda: sources[2].replace(tmp_path / "elsewhere.png"), seen)
    summary = run_batch(out, plan(sources, out, PRESET), recipe, run_local, move_the_last_away)
    assert (summary.done, summary.skipped, summary.left, summary.failures) == (2, 0, 1, [])
    assert (seen[2].item.source, seen[2].status, seen[2].reason) == (sources[2], "skipped", GONE)
    assert not (out / FAILED_FILE).exists()


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
    (["IN", "--quality", "80"], "--quality is for JPEG, WebP and AVIF outputs, not PNG (lossless)"),
    (["IN", "--format", "tif", "--quality", "80"], "--quality is for JPEG, WebP and AVIF outputs, not TIFF"),
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
