"""The hot folder with a real watchdog observer on temporary folders, run in-process."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import fill, make_photo, save_png, small_disk
from PIL import ExifTags, Image
from pipeline_support import (
    PRESET,
    config_for,
    drop,
    files,
    photo_png,
    settled,
    wait_for,
    watching,
)

from stylekit.batch import JPEG_ALPHA_WARNING
from stylekit.cli import main
from stylekit.engine import LEAN_WARNING
from stylekit.errors import StylekitError
from stylekit.image import read_metadata
from stylekit.pipeline import watcher
from stylekit.pipeline.config import from_cli, load
from stylekit.pipeline.folders import Layout, inspect
from stylekit.pipeline.jobs import ORPHAN_REASON, claim
from stylekit.pipeline.status import count
from stylekit.weights import IMAGENET_URLS

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pipeline_preset")


def error_of(failed: Path) -> dict:
    return json.loads(failed.with_name(failed.name + ".error.json").read_text(encoding="utf-8"))


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares a huge size (decoding it would need gigabytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_a_file_written_slowly_is_taken_once_and_whole(boxes, weights_file):
    inbox, outbox = boxes
    buffer = Path(inbox.parent / "photo.png")
    save_png(buffer, make_photo(48, 40))
    data = buffer.read_bytes()
    target = inbox / "slow photo.png"
    with watching(config_for(inbox, outbox, weights_file, settle=0.6)):
        with open(target, "wb") as stream:
            for start in range(0, len(data), len(data) // 5 + 1):
                stream.write(data[start:start + len(data) // 5 + 1])
                stream.flush()
                time.sleep(0.2)
                assert target.exists(), "taken while still being written"
        wait_for(lambda: settled(inbox, 1), what="the image to be done")
    assert files(outbox) == ["slow photo.png"]
    assert (inbox / "done" / "slow photo.png").read_bytes() == data
    assert Image.open(outbox / "slow photo.png").size == (48, 40)


def test_a_queued_file_rewritten_before_its_turn_is_taken_only_once_settled_again(boxes, weights_file):
    inbox, outbox = boxes
    data = photo_png(seed=3)
    with watching(config_for(inbox, outbox, weights_file, settle=0.3, batch=1, overrides={"steps": 60})):
        drop(inbox / "a.png", seed=1)
        drop(inbox / "b.png", seed=2)  # both settle together; one runs, the other waits its turn
        wait_for(lambda: count(inbox).processing == 1, what="the first image to start")
        waiting = next(inbox.glob("?.png"))
        with open(waiting, "wb") as stream:  # rewritten in place, a byte every 0.2 s, across the first's end
            written = after_first = 0
            while after_first < 3:
                stream.write(data[written:written + 1])
                stream.flush()
                written += 1
                time.sleep(0.2)
                assert waiting.exists(), "taken while being rewritten"
                assert written < len(data), "the first image did not end"
                after_first += count(inbox).done
            stream.write(data[written:])
        wait_for(lambda: settled(inbox, 2), what="both images to be done")
    assert (inbox / "done" / waiting.name).read_bytes() == data
    assert files(outbox) == ["a.png", "b.png"]


def test_temporary_names_wait_until_renamed(boxes, weights_file):
    inbox, outbox = boxes
    names = ["photo.png.part", ".hidden.png", "~$photo.png", "photo.png.crdownload", "photo.tmp"]
    with watching(config_for(inbox, outbox, weights_file, settle=0.1)):
        for index, name in enumerate(names):
            (inbox / name).write_bytes(photo_png(seed=index))
        drop(inbox / "barrier.png")  # dropped after them: once it is done, they were seen and passed over
        wait_for(lambda: settled(inbox, 1), what="the barrier to be done")
        assert sorted(p.name for p in inbox.iterdir() if p.is_file() and p.name in names) == sorted(names)
        assert files(outbox) == ["barrier.png"]
        os.rename(inbox / "photo.png.part", inbox / "photo.png")
        wait_for(lambda: settled(inbox, 2), what="the renamed file to be done")
    assert files(outbox) == ["barrier.png", "photo.png"]


def test_bad_files_land_in_failed_with_their_reason(boxes, weights_file):
    inbox, outbox = boxes
    save_png(inbox / "good.png", make_photo())
    (inbox / "notes.jpg").write_bytes(b"this is not an image")
    (inbox / "cut.png").write_bytes((inbox / "good.png").read_bytes()[:200])
    (inbox / "huge.png").write_bytes(png_header(10_000, 6_000))
    (inbox / "empty.png").write_bytes(b"")
    config = dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)  # how long they wait
    with watching(config):  # all waiting before start: the scan takes them
        wait_for(lambda: settled(inbox, 5), what="every file to be done or failed")
    assert files(outbox) == ["good.png"]
    failed = inbox / "failed"
    reasons = {name: error_of(failed / name)["error"] for name in
               ("notes.jpg", "cut.png", "huge.png", "empty.png")}
    assert "not an image" in reasons["notes.jpg"]
    assert "truncated or corrupt" in reasons["cut.png"]
    assert "over the limit" in reasons["huge.png"]
    assert "empty" in reasons["empty.png"]
    record = error_of(failed / "notes.jpg")
    assert record["preset"] == PRESET and record["attempts"] == 1 and record["file"] == "notes.jpg"
    assert record["time"]


def test_a_file_whose_writer_paused_past_the_settle_time_waits_and_comes_out_once_finished(
        boxes, weights_file, capsys):
    inbox, outbox = boxes
    data = photo_png(seed=3, size=48)
    err: list[str] = []

    def logged(text: str) -> bool:
        err.append(capsys.readouterr().err)
        return text in "".join(err)

    with watching(dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)):
        with open(inbox / "slow.png", "wb") as writer:
            writer.write(data[:len(data) // 2])
            writer.flush()
            wait_for(lambda: logged("slow.png handed back as slow.png: image 'slow.png' is truncated"),
                     what="the half-written file to be taken and handed back")
            writer.write(data[len(data) // 2:])  # the writer goes on, into the file back in the inbox
        wait_for(lambda: settled(inbox, 1), what="the finished file to be done")
    assert files(inbox / "done") == ["slow.png"] and (inbox / "done" / "slow.png").read_bytes() == data
    assert files(outbox) == ["slow.png"] and files(inbox / "failed") == []


def test_a_cut_short_file_that_stays_unchanged_fails_after_waiting_once(boxes, weights_file, capsys):
    inbox, outbox = boxes
    (inbox / "cut.png").write_bytes(photo_png(size=48)[:300])
    with watching(dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)):
        wait_for(lambda: settled(inbox, 1), what="the cut file to fail")
    err = capsys.readouterr().err
    assert err.count("cut.png handed back as cut.png") == 1 and "fails if it is unchanged then" in err
    assert files(inbox / "failed") == ["cut.png", "cut.png.error.json"]
    assert "truncated or corrupt" in error_of(inbox / "failed" / "cut.png")["error"]


def test_fifty_files_dropped_at_once_come_out_exactly_once(boxes, weights_file):
    inbox, outbox = boxes
    names = [f"Straße {i:02d} 写真.png" for i in range(50)]
    with watching(config_for(inbox, outbox, weights_file, batch=8)):
        originals = {name: drop(inbox / name, seed=i) for i, name in enumerate(names)}
        wait_for(lambda: settled(inbox, 50), timeout=240, what="50 images to be done")
    assert files(outbox) == sorted(names)
    assert files(inbox / "done") == sorted(names)
    assert all((inbox / "done" / name).read_bytes() == data for name, data in originals.items())
    jobs = {read_metadata(outbox / name)["job"] for name in names}
    assert len(jobs) == 50
    assert files(inbox / "processing") == [] and files(inbox / "failed") == []


def test_a_file_name_that_is_not_utf8_is_styled_like_any_other(boxes, weights_file):
    inbox, outbox = boxes
    name = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes, as an old camera or a Windows share writes them
    with watching(config_for(inbox, outbox, weights_file)):
        drop(inbox / name)
        wait_for(lambda: settled(inbox, 1), what="the image to be done")
    assert os.listdir(outbox) == [name] and os.listdir(inbox / "done") == [name]


def test_a_name_too_long_for_its_error_record_fails_under_a_shortened_name(boxes, weights_file):
    inbox, outbox = boxes
    name = "a" * 247 + ".jpg"  # 251 bytes: with ".error.json" over the file system's 255
    with watching(dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)):
        (inbox / name).write_bytes(b"not an image")
        wait_for(lambda: settled(inbox, 1), what="the file to fail")
    kept = next(path for path in (inbox / "failed").iterdir() if path.suffix == ".jpg")
    assert kept.read_bytes() == b"not an image" and "not an image" in error_of(kept)["error"]
    assert error_of(kept)["file"] == name


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys (unwritable even as root)")
def test_an_outbox_that_cannot_be_written_stops_the_watcher_at_start(boxes, weights_file):
    inbox, _ = boxes
    drop(inbox / "photo.png")
    with pytest.raises(StylekitError, match="cannot write into output folder '/sys/kernel'"), \
            watching(config_for(inbox, Path("/sys/kernel"), weights_file)):
        pass
    assert (inbox / "photo.png").exists() and files(inbox / "failed") == []


def test_a_status_file_that_cannot_be_written_is_a_warning_not_a_failure(boxes, weights_file, capsys):
    inbox, outbox = boxes
    config = config_for(inbox, outbox, weights_file)
    assert config.status_file is not None
    with watching(config):
        config.status_file.unlink()
        config.status_file.mkdir()  # from now on every rewrite of the status file fails
        drop(inbox / "photo.png")
        wait_for(lambda: files(inbox / "done") == ["photo.png"], what="the image to be done")
    assert files(outbox) == ["photo.png"]
    assert "cannot write the status file" in capsys.readouterr().err


def test_with_presets_by_sub_folder_only_a_bad_setup_still_stops_the_watcher_at_start(boxes, tmp_path,
                                                                                      weights_file):
    inbox, outbox = boxes
    config = config_for(inbox, outbox, weights_file, preset=None,
                        overrides={"weights": str(tmp_path / "missing.pth")})
    with pytest.raises(StylekitError, match=r"missing\.pth' not found"), watching(config):
        pass


def test_a_stop_hands_back_recovered_jobs_that_had_not_started(boxes, weights_file):
    inbox, outbox = boxes
    layout = Layout(inbox, outbox)
    layout.create()
    for i in range(3):  # claimed, as a watcher killed with -9 leaves them
        drop(inbox / f"p{i}.png", seed=i)
        claim(layout, inspect(layout, inbox / f"p{i}.png"), PRESET, f"p{i}.png")
    assert len(files(inbox / "processing")) == 6  # the inputs and their job records
    with watching(config_for(inbox, outbox, weights_file, overrides={"steps": 100_000})):
        pass  # stopped while the first recovered job runs
    assert files(inbox / "processing") == []
    assert sorted(path.name for path in inbox.glob("*.png")) == ["p0.png", "p1.png", "p2.png"]


def test_an_input_found_in_processing_without_its_record_is_logged_with_its_reason(boxes, weights_file,
                                                                                 capsys):
    inbox, outbox = boxes
    Layout(inbox, outbox).create()
    drop(inbox / "processing" / "stray.png")  # put there by hand while the watcher was down
    with watching(config_for(inbox, outbox, weights_file)):
        pass
    assert re.search(rf"recovered +stray\.png: {ORPHAN_REASON} \(moved to failed/stray\.png\)$",
                     capsys.readouterr().err, re.M)


def test_name_collisions_get_suffixes_and_nothing_is_overwritten(boxes, weights_file):
    inbox, outbox = boxes
    (outbox / "photo.png").write_bytes(b"someone else's file")
    config = config_for(inbox, outbox, weights_file, format="png")
    with watching(config):
        drop(inbox / "photo.png", seed=1)
        drop(inbox / "photo.jpg.png", seed=2)
        wait_for(lambda: settled(inbox, 2), what="the first two")
        drop(inbox / "photo.png", seed=3)  # the same name again, after the first is done
        wait_for(lambda: settled(inbox, 3), what="the third")
    assert (outbox / "photo.png").read_bytes() == b"someone else's file"
    assert files(outbox) == ["photo-1.png", "photo-2.png", "photo.jpg.png", "photo.png"]
    assert files(inbox / "done") == ["photo-1.png", "photo.jpg.png", "photo.png"]


def test_two_inputs_wanting_one_output_name_get_two_names(boxes, weights_file):
    inbox, outbox = boxes
    save_png(inbox / "photo.png", make_photo(seed=1))
    Image.fromarray((make_photo(seed=2) * 255).astype(np.uint8)).save(inbox / "photo.jpg")
    with watching(config_for(inbox, outbox, weights_file, format="png")):
        wait_for(lambda: settled(inbox, 2), what="both images")
    assert files(outbox) == ["photo-1.png", "photo.png"]
    contents = sorted(read_metadata(outbox / name)["content"] for name in files(outbox))
    assert contents == ["photo.jpg", "photo.png"]


def test_an_output_keeps_its_inputs_camera_metadata_and_resolution(boxes, weights_file):
    inbox, outbox = boxes
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Canon", "EOS R5"
    Image.fromarray((make_photo() * 255).astype(np.uint8)).save(inbox / "photo.jpg", exif=exif.tobytes(),
                                                                dpi=(300, 300))
    with watching(config_for(inbox, outbox, weights_file, format="jpg")):
        wait_for(lambda: settled(inbox, 1), what="the image")
    with Image.open(outbox / "photo.jpg") as output:
        assert output.info["dpi"] == pytest.approx((300, 300), abs=0.01)
        exif = output.getexif()
    assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == ("Canon", "EOS R5")


def test_preset_sub_folders_symlinks_and_deep_nesting(boxes, weights_file, tmp_path):
    inbox, outbox = boxes
    outside = tmp_path / "outside"
    outside.mkdir()
    secret = save_png(outside / "secret.png", make_photo(seed=9))
    secret_bytes = secret.read_bytes()
    drop(inbox / PRESET / "sub photo.png", seed=1)
    drop(inbox / "no-such-preset" / "b.png", seed=2)
    drop(inbox / PRESET / "deeper" / "c.png", seed=3)
    (inbox / "link.png").symlink_to(secret)
    (inbox / "linked-folder").symlink_to(outside, target_is_directory=True)
    with watching(config_for(inbox, outbox, weights_file, preset=None)):
        drop(inbox / "top.png", seed=4)
        wait_for(lambda: settled(inbox, 6), what="every drop to be handled")
    assert files(outbox) == [f"{PRESET}/sub photo.png"]
    failed = inbox / "failed"
    assert "unknown preset 'no-such-preset'" in error_of(failed / "no-such-preset" / "b.png")["error"]
    assert "nested too deep" in error_of(failed / PRESET / "deeper" / "c.png")["error"]
    assert "symlinks are not accepted" in error_of(failed / "link.png")["error"]
    assert "symlinks are not accepted" in error_of(failed / "linked-folder")["error"]
    assert "no preset for the top" in error_of(failed / "top.png")["error"]
    assert (failed / "link.png").is_symlink() and (failed / "linked-folder").is_symlink()
    assert files(outside) == ["secret.png"] and secret.read_bytes() == secret_bytes


def test_out_of_memory_with_no_retries_left_fails_saying_what_fits(boxes, weights_file, capsys):
    inbox, outbox = boxes
    save_png(inbox / "photo.png", make_photo())
    config = dataclasses.replace(config_for(inbox, outbox, weights_file, overrides={"size": 10**8}),
                                 retries=0)
    with watching(config):
        wait_for(lambda: settled(inbox, 1), what="the image to fail")
    record = error_of(inbox / "failed" / "photo.png")
    assert record["attempts"] == 1 and "out of memory after 1 attempt, the last at size 100000000: " \
        "not enough memory for a 100000000×" in record["error"]
    assert re.search(r"a long side of \d+ px or less fits\)$", record["error"])
    assert " retry " not in capsys.readouterr().err and files(outbox) == []


def test_a_max_memory_that_fits_no_image_stops_the_watcher_at_start(boxes, weights_file):
    inbox, outbox = boxes
    refused = pytest.raises(StylekitError, match=r"max_memory allows 0\.1 GiB \(raise max_memory\)")
    with refused, watching(config_for(inbox, outbox, weights_file, overrides={"max_memory": 0.1})):
        pass


def test_a_refused_image_is_retried_once_at_the_size_the_refusal_names(boxes, weights_file, capsys):
    inbox, outbox = boxes
    save_png(inbox / "photo.png", make_photo())
    config = config_for(inbox, outbox, weights_file,
                        overrides={"size": 10**8, "scales": 1, "max_memory": 0.75})
    with watching(config):
        wait_for(lambda: settled(inbox, 1), what="the image to be styled")
    retries = [line for line in capsys.readouterr().err.splitlines() if " retry " in line]
    assert len(retries) == 1
    size = int(re.search(r"trying again at size (\d+)", retries[0])[1])
    assert 100 < size < 1000
    with Image.open(outbox / "photo.png") as styled:
        assert max(styled.size) == size
    assert files(inbox / "done") == ["photo.png"]


def test_a_run_warning_is_logged_once_naming_the_first_image(boxes, weights_file, capsys):
    inbox, outbox = boxes
    config = config_for(inbox, outbox, weights_file, overrides={"size": 256, "scales": 1,
                                                                 "max_memory": 0.78})  # only lean fits
    with watching(config):
        for name in ("a.png", "b.png"):
            save_png(inbox / name, make_photo())
        wait_for(lambda: settled(inbox, 2), what="both images to be styled")
    warnings = [line for line in capsys.readouterr().err.splitlines() if " warning " in line]
    assert len(warnings) == 1 and re.search(rf"warning  [ab]\.png: {re.escape(LEAN_WARNING)}$", warnings[0])


def test_a_transparent_image_made_a_jpeg_says_its_transparency_is_flattened(boxes, weights_file, capsys):
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file, format="jpg")):
        Image.fromarray(np.dstack([(make_photo() * 255).astype(np.uint8), np.full((40, 48), 128, np.uint8)])
                        ).save(inbox / "clear.png")
        wait_for(lambda: settled(inbox, 1), what="the image to be styled")
    assert files(outbox) == ["clear.jpg"]
    assert re.search(rf"warning  clear\.png: {re.escape(JPEG_ALPHA_WARNING)}$", capsys.readouterr().err, re.M)


def test_a_warning_of_the_set_up_is_logged_before_watching_starts(boxes, weights_file, capsys,
                                                                   monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ImageNet weights cached, and
    monkeypatch.setitem(IMAGENET_URLS, "vgg19", "http://127.0.0.1:9/vgg19-dcbb9e9d.pth")  # none to get
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file, overrides={"weights": "auto"})):
        pass
    events = [line.split()[2:4] for line in capsys.readouterr().err.splitlines()]
    assert events.index(["warning", "ImageNet"]) < next(i for i, e in enumerate(events) if e[0] == "watching")


def test_watchdogs_error_about_an_event_read_after_the_stop_is_dropped(boxes, weights_file, caplog):
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file)):
        pass
    inotify = logging.getLogger("watchdog.observers.inotify")  # what it logs in that shutdown race
    with caplog.at_level(logging.WARNING, logger="watchdog"):
        inotify.error("InotifyEmitter.queue_events() called when the thread is inactive")
        inotify.error("some other trouble")
    assert [record.getMessage() for record in caplog.records] == ["some other trouble"]


def test_several_folders_from_a_config_file(tmp_path, weights_file):
    boxes = {name: (tmp_path / name / "in", tmp_path / name / "out") for name in ("a", "b")}
    for inbox, outbox in boxes.values():
        inbox.mkdir(parents=True)
        outbox.mkdir(parents=True)
    config = tmp_path / "pipeline.toml"
    config.write_text(f"""
settle = 0.1
status_file = "status.json"
[options]
weights = "{weights_file}"
device = "cpu"
[[folder]]
inbox = "a/in"
out = "a/out"
preset = "{PRESET}"
format = "jpg"
quality = 80
[[folder]]
inbox = "b/in"
out = "b/out"
preset = "{PRESET}"
[folder.options]
size = 24
""", encoding="utf-8")
    watch_config = from_cli(None, config, None, None, None, {}, None, False, None)
    assert watch_config.status_file == tmp_path / "status.json"
    drop(boxes["a"][0] / "x.png", seed=1)
    drop(boxes["b"][0] / "y.png", seed=2)
    with watching(watch_config):
        wait_for(lambda: settled(boxes["a"][0], 1) and settled(boxes["b"][0], 1), what="both folders")
        status = json.loads(watch_config.status_file.read_text())
    assert files(boxes["a"][1]) == ["x.jpg"] and files(boxes["b"][1]) == ["y.png"]
    assert Image.open(boxes["b"][1] / "y.png").size == (24, 18)
    assert [f["inbox"] for f in status["folders"]] == [str(b[0]) for b in boxes.values()]


def test_status_counts_and_the_status_command(boxes, weights_file, capsys):
    inbox, outbox = boxes
    save_png(inbox / "a.png", make_photo())
    (inbox / "b.jpg").write_bytes(b"junk")
    config = dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)
    with watching(config):
        wait_for(lambda: settled(inbox, 2), what="both files")
        assert main(["watch", "--status", str(inbox)]) == 0
        running = capsys.readouterr().out
        data = wait_for(lambda: (d := json.loads(config.status_file.read_text()))["folders"][0]["done"] == 1
                        and d["folders"][0]["failed"] == 1 and d, what="the status file to catch up")
    assert "queued 0, processing 0, done 1, failed 1; watcher running (pid" in running
    assert data["folders"][0]["failed"] == 1 and data["state"] == "running"
    assert json.loads(config.status_file.read_text())["state"] == "stopped"
    assert main(["watch", "--status", str(inbox)]) == 0
    assert "no watcher running" in capsys.readouterr().out
    assert count(inbox).done == 1


def test_the_status_file_names_each_image_of_a_group_while_it_runs(boxes, weights_file, monkeypatch):
    monkeypatch.setattr(watcher, "STATUS_EVERY_S", 0.0)  # every change written at once, however fast
    inbox, outbox = boxes
    config = config_for(inbox, outbox, weights_file, settle=0.5, overrides={"steps": 40})
    seen = set()
    with watching(config):
        for i in range(3):
            drop(inbox / f"p{i}.png", seed=i, size=48)
        while not settled(inbox, 3):
            with contextlib.suppress(ValueError):  # read between two rewrites
                seen.add(json.loads(config.status_file.read_text())["current"])
            time.sleep(0.05)
    assert {"p0.png", "p1.png", "p2.png"} <= seen


def test_the_status_of_a_config_names_an_inbox_that_does_not_exist_and_exits_1(tmp_path, capsys):
    (tmp_path / "here").mkdir()
    (tmp_path / "pipeline.toml").write_text("[[folder]]\ninbox = 'here'\nout = 'out'\n"
                                            "[[folder]]\ninbox = 'gone'\nout = 'out'\n", encoding="utf-8")
    assert main(["watch", "--status", str(tmp_path / "pipeline.toml")]) == 1
    out, err = capsys.readouterr()
    assert f"{tmp_path / 'here'} (preset - → {tmp_path / 'out'}): queued 0" in out
    assert f"{tmp_path / 'gone'} (preset - → {tmp_path / 'out'}): the inbox does not exist" in out
    assert err == f"stylekit: error: inbox '{tmp_path / 'gone'}' does not exist\n"


def test_a_second_watcher_on_the_same_inbox_is_refused(boxes, weights_file):
    inbox, outbox = boxes
    config = config_for(inbox, outbox, weights_file)
    with watching(config), pytest.raises(StylekitError, match="already watching"), \
            watching(config_for(inbox, outbox, weights_file)):
        pass


def test_a_second_watcher_is_refused_even_after_the_lock_file_was_deleted(boxes, weights_file):
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file)):
        (inbox / ".stylekit-watch.lock").unlink()
        with pytest.raises(StylekitError, match="already watching"), \
                watching(config_for(inbox, outbox, weights_file)):
            pass


def test_a_second_watcher_writing_the_same_status_file_is_refused(boxes, weights_file, tmp_path_factory):
    inbox, outbox = boxes
    other = tmp_path_factory.mktemp("other")
    (other / "inbox").mkdir()
    second = dataclasses.replace(config_for(other / "inbox", other, weights_file),
                                 status_file=inbox.parent / "status.json")
    refused = pytest.raises(StylekitError, match=r"another stylekit watch \(pid \d+\) writes the status file")
    with watching(config_for(inbox, outbox, weights_file)), refused, watching(second):
        pass


def test_a_removed_processing_folder_is_made_again(boxes, weights_file):
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file)):
        (inbox / "processing").rmdir()
        drop(inbox / "photo.png")
        wait_for(lambda: settled(inbox, 1), what="the image to be done")
    assert files(outbox) == ["photo.png"] and files(inbox / "done") == ["photo.png"]


def test_an_image_it_cannot_move_is_left_in_processing_and_the_watcher_goes_on(boxes, weights_file, capsys):
    inbox, outbox = boxes
    with watching(dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)):
        (inbox / "failed").rmdir()
        (inbox / "failed").write_bytes(b"")  # a file where the folder should be: nothing moves in
        (inbox / "notes.jpg").write_bytes(b"this is not an image")
        wait_for(lambda: "cannot move it" in capsys.readouterr().err, what="the failure to be logged")
        drop(inbox / "photo.png")
        wait_for(lambda: files(inbox / "done") == ["photo.png"], what="the next image")
    assert len(files(inbox / "processing")) == 2  # notes.jpg and its job record, for the next start
    assert files(outbox) == ["photo.png"]


def test_a_styled_image_it_cannot_move_to_done_is_left_in_processing_and_the_watcher_goes_on(
        boxes, weights_file, capsys):
    inbox, outbox = boxes
    with watching(config_for(inbox, outbox, weights_file)):
        (inbox / "done").rmdir()
        (inbox / "done").write_bytes(b"")  # a file where the folder should be
        drop(inbox / "first.png")
        wait_for(lambda: "cannot finish it" in capsys.readouterr().err, what="the failure to be logged")
        (inbox / "done").unlink()
        drop(inbox / "second.png", seed=1)
        wait_for(lambda: files(inbox / "done") == ["second.png"], what="the next image")
    assert files(outbox) == ["first.png", "second.png"]
    assert len(files(inbox / "processing")) == 2  # first.png and its job record, for the next start


@pytest.fixture
def full_outbox(tmp_path_factory) -> Iterator[tuple[Path, Path]]:
    """An output folder on a small disk of its own (a real tmpfs, so root only) and the file that fills
    that disk to the last byte."""
    with small_disk(tmp_path_factory.mktemp("full")) as folder:
        yield folder, fill(folder)


def test_a_full_outbox_hands_the_image_back_and_styles_it_once_there_is_room(boxes, full_outbox, weights_file,
                                                                            capsys):
    inbox, _ = boxes
    outbox, filler = full_outbox
    with watching(dataclasses.replace(config_for(inbox, outbox, weights_file), rescan=0.5)):
        drop(inbox / "photo.png")
        wait_for(lambda: "No space left on device" in capsys.readouterr().err, what="the refusal")
        assert files(inbox / "failed") == []
        filler.unlink()
        wait_for(lambda: files(inbox / "done") == ["photo.png"], 30, "the image once there is room")
    assert files(outbox) == ["photo.png"] and files(inbox / "failed") == []


def test_a_watcher_inside_another_watchers_inbox_is_refused(boxes, weights_file, tmp_path_factory):
    inbox, outbox = boxes
    (inbox / "swirl").mkdir()
    other_out = tmp_path_factory.mktemp("other-out")
    with watching(config_for(inbox, outbox, weights_file)), \
            pytest.raises(StylekitError, match=r"is inside .* which another stylekit watch"), \
            watching(config_for(inbox / "swirl", other_out, weights_file)):
        pass
    assert files(inbox / "swirl") == []  # the refused watcher leaves no lock file of its own there


def test_a_watcher_around_another_watchers_inbox_is_refused(boxes, weights_file, tmp_path_factory):
    inbox, outbox = boxes
    other_out = tmp_path_factory.mktemp("other-out")
    with watching(config_for(inbox, outbox, weights_file)), \
            pytest.raises(StylekitError, match=r"holds .* which another stylekit watch"), \
            watching(config_for(inbox.parent, other_out, weights_file)):
        pass


@pytest.mark.parametrize(("args", "message"), [
    (["watch"], "give INBOX and --out"),
    (["watch", "{inbox}", "--out", "{missing}"], "does not exist"),
    (["watch", "{inbox}", "--out", "{inbox}/out"], "inside inbox"),
    (["watch", "{inbox}", "--out", "{outbox}", "--status-file", "{inbox}/status.json"],
     "status file"),
    (["watch", "{inbox}", "--out", "{outbox}", "--preset", "nope"], "unknown preset 'nope'"),
    (["watch", "{inbox}", "--out", "{outbox}", "--init", "x.png"], "--init FILE"),
    (["watch", "--config", "{missing}"], "not found"),
    (["watch", "--status", "{missing}"], "neither an inbox folder nor a config file"),
    (["watch", "--status"], "--status needs the INBOX"),
    (["watch", "{inbox}", "--out", "{outbox}", "--settle", "nan"], "bad settle nan"),
    (["watch", "{inbox}", "--out", "{outbox}", "--status-file", "{missing}/status.json"],
     "status file folder"),
    # a Ray flag without --engine ray is refused before anything else (here: the missing outbox)
    (["watch", "{inbox}", "--out", "{missing}", "--ray-address", "10.0.0.10:6379"],
     "--ray-address is for --engine ray only"),
    (["watch", "{inbox}", "--out", "{missing}", "--engine", "local", "--gpus-per-task", "0"],
     "--gpus-per-task is for --engine ray only"),
    (["watch", "{inbox}", "--out", "{outbox}", "--format", "png", "--quality", "80"],
     "--quality is for JPEG, WebP and AVIF outputs"),
])
def test_bad_arguments_are_one_line_errors(args, message, boxes, tmp_path, capsys):
    inbox, outbox = boxes
    (inbox / "out").mkdir()
    places = {"inbox": inbox, "outbox": outbox, "missing": tmp_path / "missing"}
    assert main([arg.format(**places) for arg in args]) != 0
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["watch"], ["watch", "--status"], ["watch", "in", "--config", "c.toml"]])
def test_arguments_that_cannot_go_together_exit_2_as_other_usage_errors(args, capsys):
    assert main(args) == 2
    assert capsys.readouterr().err.startswith("stylekit: error: ")


def test_quality_on_the_command_line_wins_over_the_configs_and_its_default(tmp_path):
    config = tmp_path / "pipeline.toml"
    config.write_text('[[folder]]\ninbox = "a"\nout = "a-out"\nquality = 80\n'
                      '[[folder]]\ninbox = "b"\nout = "b-out"\n', encoding="utf-8")
    for name in ("a", "b", "a-out", "b-out"):
        (tmp_path / name).mkdir()
    kept = from_cli(None, config, None, None, None, {}, None, False, None)
    assert [f.quality for f in kept.folders] == [80, 95]
    given = from_cli(None, config, None, None, None, {}, None, False, None, quality=60)
    assert [f.quality for f in given.folders] == [60, 60]
    alone = from_cli(tmp_path / "a", None, None, tmp_path / "a-out", None, {}, None, False, None, quality=70)
    assert [f.quality for f in alone.folders] == [70]


def test_watch_on_ray_without_a_reachable_cluster_is_a_one_line_error(boxes, capsys):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'stylekit[ray]')")
    inbox, outbox = boxes
    drop(inbox / "photo.png")
    assert main(["watch", str(inbox), "--preset", PRESET, "--out", str(outbox), "--engine", "ray",
                 "--ray-address", "127.0.0.1:1"]) == 1  # nothing listens on port 1
    err = capsys.readouterr().err
    assert "no Ray cluster answers at '127.0.0.1:1'" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert (inbox / "photo.png").exists() and files(inbox / "processing") == []  # nothing was claimed


@pytest.mark.parametrize(("text", "message"), [
    ("settle = 1\n", "no [[folder]] tables"),
    ("speed = 1\n[[folder]]\ninbox = 'i'\nout = 'o'\n", "unknown key 'speed'"),
    ("[[folder]]\ninbox = 'i'\n", "needs 'out'"),
    ("[[folder]]\ninbox = 'i'\nout = 'o'\n[folder.options]\nsteps = 'many'\n",
     "'steps' must be a whole number"),
    ("[[folder]]\ninbox = 'i'\nout = 'o'\n[folder.options]\nwarp = 9\n", "unknown option 'warp'"),
    ("[[folder]]\ninbox = 'i'\nout = 'o'\nformat = 'gif'\n", "bad format 'gif'"),
    ("[[folder]]\ninbox = 'i'\nout = 'o'\n[[folder]]\ninbox = 'i'\nout = 'o'\n", "is inside (or is)"),
    ("[[folder]\n", "cannot read config"),
])
def test_bad_config_files_are_one_line_errors(text, message, tmp_path, capsys):
    (tmp_path / "i").mkdir()
    (tmp_path / "o").mkdir()
    (tmp_path / "pipeline.toml").write_text(text, encoding="utf-8")
    assert main(["watch", "--config", str(tmp_path / "pipeline.toml")]) == 1
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_the_example_config_parses():
    config = load(Path(__file__).parent.parent / "pipeline" / "pipeline.example.toml")
    assert len(config.folders) >= 2 and config.settle > 0
