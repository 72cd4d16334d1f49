"""`stylekit watch` as a real process: kill -9 mid-batch then a restart (and whom a crash counts
against), clean SIGTERM/SIGINT exits, a second Ctrl-C, and folders and files it may not read or move."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_support import PRESET, drop, drop_photos, files, settled, wait_for

from stylekit.cli import main

pytestmark = pytest.mark.usefixtures("pipeline_preset")


# root reads and moves anything; without these capabilities it meets permissions like any other user
UNPRIVILEGED = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"] \
    if os.geteuid() == 0 else []
needs_permissions = pytest.mark.skipif(os.geteuid() == 0 and not shutil.which("setpriv"),
                                       reason="root without setpriv (util-linux) ignores permissions")


def start(inbox: Path, outbox: Path, weights: Path, log: Path, steps: int, *flags: str,
          config: Path | None = None, unprivileged: bool = False) -> subprocess.Popen:
    """Start `stylekit watch` on tiny images (one torch thread), logging JSON lines to log; with a
    config file, its folders instead of INBOX and OUTBOX; unprivileged: bound by file permissions
    even when run by root."""
    folder = ["--config", str(config)] if config else [str(inbox), "--preset", PRESET, "--out", str(outbox)]
    command = [*(UNPRIVILEGED if unprivileged else []), str(Path(sys.executable).parent / "stylekit"),
               "watch", *folder, "--weights", str(weights),
               "--device", "cpu", "--steps", str(steps), "--settle", "0.2", "--log-json", *flags]
    with open(log, "a", encoding="utf-8") as stream:
        return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stream,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})


def events(log: Path, kind: str) -> list[dict]:
    """The JSON log events of one kind so far."""
    lines = log.read_text(encoding="utf-8").splitlines() if log.exists() else []
    return [event for line in lines if line.startswith("{")
            and (event := json.loads(line))["event"] == kind]


def test_kill_9_mid_batch_then_restart_accounts_for_every_input_exactly_once(boxes, weights_file,
                                                                              tmp_path):
    inbox, outbox = boxes
    names = [f"photo {i} é.png" for i in range(6)]
    originals = {name: drop(inbox / name, seed=i, size=48) for i, name in enumerate(names)}
    log = tmp_path / "watch.log"
    first = start(inbox, outbox, weights_file, log, steps=6)
    try:
        wait_for(lambda: events(log, "done") or first.poll() is not None, 180, "the first image")
    finally:
        first.kill()  # SIGKILL: no handler runs
    first.wait(30)
    assert first.returncode == -signal.SIGKILL
    in_flight = [name for name in files(inbox / "processing") if name.endswith(".job.json")]
    assert in_flight, "the kill was meant to land while a batch was in processing/"

    second = start(inbox, outbox, weights_file, log, steps=6)
    try:
        wait_for(lambda: settled(inbox, len(names)) or second.poll() is not None, 300, "every image")
    finally:
        second.send_signal(signal.SIGTERM)
    assert second.wait(60) == 0
    assert files(outbox) == sorted(names)
    assert files(inbox / "done") == sorted(names)
    assert all((inbox / "done" / name).read_bytes() == data for name, data in originals.items())
    assert files(inbox / "processing") == [] and files(inbox / "failed") == []
    assert events(log, "recovered")
    assert {event["iterations"] for event in events(log, "done")} == {6}  # --steps beat the preset's 1


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_hands_back_the_current_image_and_exits_0(signum, boxes, weights_file, tmp_path,
                                                                 capsys):
    inbox, outbox = boxes
    names = drop_photos(inbox, 3, size=64)
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, steps=200)
    try:
        wait_for(lambda: events(log, "start") or process.poll() is not None, 180, "an image to start")
    finally:
        process.send_signal(signum)
    assert process.wait(60) == 0, log.read_text()
    handed_back = {event["file"] for event in events(log, "back")}
    assert handed_back and events(log, "stopped")
    assert files(inbox / "processing") == []
    finished = files(inbox / "done")
    assert files(outbox) == finished
    assert sorted(finished + [p.name for p in inbox.glob("*.png")]) == sorted(names)
    assert main(["watch", "--status", str(inbox)]) == 0
    assert f"queued {len(names) - len(finished)}, processing 0" in capsys.readouterr().out


def handles(pid: int, signum: int) -> bool:
    """Whether a process has a handler of its own for a signal (its SigCgt mask in /proc)."""
    status = Path(f"/proc/{pid}/status").read_text(encoding="utf-8")
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt:")).split()[1], 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads signal masks from /proc")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_while_it_starts_up_is_a_clean_stop_before_any_engine_loads(signum, boxes,
                                                                                  weights_file, tmp_path):
    inbox, outbox = boxes
    drop_photos(inbox, 1, size=48)
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, steps=6)
    try:  # Python itself catches SIGINT from the start; SIGTERM is caught once stylekit takes both
        wait_for(lambda: process.poll() is not None or handles(process.pid, signal.SIGTERM), 60,
                 "the signal handlers")
    finally:
        process.send_signal(signum)
    assert process.wait(120) == 0, log.read_text()
    assert [event["message"] for event in events(log, "stopped")] == ["stopped while starting"]
    assert events(log, "engine") == [] and files(inbox / "done") == []


def test_a_kill_mid_group_counts_against_none_of_its_images_but_a_kill_while_alone_does(
        boxes, weights_file, tmp_path):
    inbox, outbox = boxes
    names = drop_photos(inbox, 3, size=48)
    config = tmp_path / "pipeline.toml"
    config.write_text(f"retries = 0\n[[folder]]\ninbox = '{inbox}'\nout = '{outbox}'\npreset = '{PRESET}'\n",
                      encoding="utf-8")  # no second attempt: a crash counted against an image fails it
    log = tmp_path / "watch.log"

    def kill_9_as_image_starts(number: int) -> None:
        process = start(inbox, outbox, weights_file, log, 200, config=config)
        try:
            wait_for(lambda: len(events(log, "start")) >= number or settled(inbox, len(names))
                     or process.poll() is not None, 180, f"image {number} to start")
        finally:
            process.kill()
        process.wait(30)
        assert len(files(inbox / "processing")) == 2 * len(names), "every image was meant to be in flight"

    kill_9_as_image_starts(1)  # while the three run as one group
    kill_9_as_image_starts(2)  # while the first of them to be recovered runs alone
    alone = events(log, "start")[-1]["file"]

    last = start(inbox, outbox, weights_file, log, 200, config=config)
    try:
        wait_for(lambda: settled(inbox, len(names)) or last.poll() is not None, 300, "every image")
    finally:
        last.send_signal(signal.SIGTERM)
    assert last.wait(60) == 0, log.read_text()
    assert files(inbox / "failed") == [alone, f"{alone}.error.json"]
    error = json.loads((inbox / "failed" / f"{alone}.error.json").read_text(encoding="utf-8"))["error"]
    assert "gave up after 1 attempt" in error
    assert files(inbox / "done") == sorted(set(names) - {alone}) == files(outbox)


def test_a_second_ctrl_c_stops_at_once_logging_only_json_and_handing_every_image_back(
        boxes, weights_file, tmp_path):
    inbox, outbox = boxes
    names = drop_photos(inbox, 3, size=64)
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, 200, "--size", "256", "--scales", "1")  # ~1 s a step
    try:
        wait_for(lambda: events(log, "progress") or process.poll() is not None, 180, "styling to begin")
    finally:
        process.send_signal(signal.SIGINT)
        time.sleep(0.3)  # the first stop waits for the step under way; the second comes meanwhile
        process.send_signal(signal.SIGINT)
    assert process.wait(60) == 0, log.read_text()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert all(line.startswith("{") for line in lines), lines
    assert json.loads(lines[-1])["event"] == "stopped"
    assert files(inbox / "processing") == [] and files(outbox) == []
    assert sorted(p.name for p in inbox.glob("*.png")) == names


def test_a_ctrl_c_while_the_stopped_watcher_exits_changes_nothing(boxes, weights_file, tmp_path):
    inbox, outbox = boxes
    drop(inbox / "photo.png")
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, 200)
    try:
        wait_for(lambda: events(log, "start") or process.poll() is not None, 180, "the image to start")
    finally:
        process.send_signal(signal.SIGINT)
    wait_for(lambda: events(log, "stopped") or process.poll() is not None, 60, "the clean stop")
    process.send_signal(signal.SIGINT)  # while the process winds down (it takes a moment with torch)
    assert process.wait(60) == 0, log.read_text()
    lines = log.read_text(encoding="utf-8").splitlines()
    assert all(line.startswith("{") for line in lines), lines
    assert [p.name for p in inbox.glob("*.png")] == ["photo.png"] and files(inbox / "processing") == []


def rescanning(tmp_path: Path, inbox: Path, outbox: Path) -> Path:
    """A config that rescans the inbox five times a second (where the log would repeat itself)."""
    config = tmp_path / "pipeline.toml"
    config.write_text(f"rescan = 0.2\n[[folder]]\ninbox = '{inbox}'\nout = '{outbox}'\npreset = '{PRESET}'\n",
                      encoding="utf-8")
    return config


@contextlib.contextmanager
def skipping(inbox: Path, outbox: Path, weights_file: Path,
             tmp_path: Path) -> Iterator[tuple[subprocess.Popen, Path]]:
    """A watcher without root's privileges, rescanning five times a second, from its first skip and ten
    rescans after it until the block ends; yields it and its log."""
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, 1, config=rescanning(tmp_path, inbox, outbox),
                    unprivileged=True)
    try:
        wait_for(lambda: events(log, "skipped") or process.poll() is not None, 180, "the skip")
        time.sleep(2.0)  # ten rescans
        yield process, log
    finally:
        stop(process, log)


def stop(process: subprocess.Popen, log: Path) -> None:
    """SIGTERM, and the clean exit it must bring."""
    process.send_signal(signal.SIGTERM)
    assert process.wait(60) == 0, log.read_text()


@needs_permissions
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to write where the watcher may not look")
def test_a_file_in_a_folder_it_may_not_read_is_skipped_and_the_watcher_goes_on(boxes, weights_file,
                                                                                tmp_path):
    inbox, outbox = boxes
    log = tmp_path / "watch.log"
    process = start(inbox, outbox, weights_file, log, 1, unprivileged=True)
    try:
        wait_for(lambda: events(log, "watching") or process.poll() is not None, 180, "the watcher")
        private = inbox / "cubist"
        private.mkdir()
        time.sleep(1.0)  # the observer watches the new folder before it turns private
        private.chmod(0o000)
        drop(private / "x.png")  # by root, as another user would drop into a folder of their own
        wait_for(lambda: events(log, "skipped") or process.poll() is not None, 60, "the skip")
        drop(inbox / "photo.png")
        wait_for(lambda: files(inbox / "done") or process.poll() is not None, 120, "the next image")
        assert process.poll() is None, log.read_text()
    finally:
        stop(process, log)
    skipped = [event["file"] for event in events(log, "skipped")]
    assert "cubist/x.png" in skipped and files(inbox / "done") == ["photo.png"]


@needs_permissions
def test_a_folder_it_may_not_read_is_logged_once_not_at_every_rescan(boxes, weights_file, tmp_path):
    inbox, outbox = boxes
    (inbox / "cubist").mkdir(mode=0o000)
    with skipping(inbox, outbox, weights_file, tmp_path) as (_, log):
        pass
    skipped = events(log, "skipped")
    assert [event["file"] for event in skipped] == ["cubist"]
    assert "cannot read the folder 'cubist': Permission denied" in skipped[0]["message"]


@needs_permissions
def test_a_file_it_cannot_take_is_logged_once_and_again_only_when_it_changes(boxes, weights_file,
                                                                             tmp_path):
    inbox, outbox = boxes
    drop(inbox / PRESET / "a.png")
    (inbox / PRESET).chmod(0o555)  # it may read the file, but not move it out of the folder
    with skipping(inbox, outbox, weights_file, tmp_path) as (process, log):
        assert len(events(log, "skipped")) == 1
        with open(inbox / PRESET / "a.png", "ab") as stream:
            stream.write(b"more")
        wait_for(lambda: len(events(log, "skipped")) > 1 or process.poll() is not None, 60, "a new skip")
        time.sleep(2.0)
    skipped = events(log, "skipped")
    assert [event["file"] for event in skipped] == [f"{PRESET}/a.png"] * 2
    assert "cannot take" in skipped[0]["message"] and (inbox / PRESET / "a.png").exists()
