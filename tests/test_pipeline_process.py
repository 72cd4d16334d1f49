"""`stylekit watch` as a real process: kill -9 mid-batch then a restart, and clean SIGTERM/SIGINT exits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from pipeline_support import PRESET, drop, files, settled, wait_for

from stylekit.cli import main

pytestmark = pytest.mark.usefixtures("pipeline_preset")


def start(inbox: Path, outbox: Path, weights: Path, log: Path, steps: int) -> subprocess.Popen:
    """Start `stylekit watch` on tiny images (one torch thread), logging JSON lines to log."""
    command = [str(Path(sys.executable).parent / "stylekit"), "watch", str(inbox), "--preset", PRESET,
               "--out", str(outbox), "--weights", str(weights), "--device", "cpu", "--steps", str(steps),
               "--settle", "0.2", "--log-json"]
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
    names = [f"photo {i}.png" for i in range(3)]
    for i, name in enumerate(names):
        drop(inbox / name, seed=i, size=64)
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
