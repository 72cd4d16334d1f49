"""Crash safety step by step: the disk state kill -9 leaves after each step of a job, then a restart.

Each state is made with the same calls the watcher makes, stopped where a kill would stop them; the
restart is a real watcher. Also the small pieces: temporary names, free names, no-clobber links, settling.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import make_painting, make_photo
from pipeline_support import PRESET, config_for, drop, files, settled, wait_for, watching

from stylekit import StyleOptions, StyleRequest
from stylekit.engine import stylize_batch
from stylekit.errors import NotEnoughMemory
from stylekit.image import read_metadata, save_image
from stylekit.pipeline.folders import Layout, free_name, inspect, is_temporary, link_no_clobber
from stylekit.pipeline.jobs import ORPHAN_REASON, Job, claim, claimed_path, output_temp, recover, save
from stylekit.pipeline.settle import Settler
from stylekit.pipeline.worker import SHRINK, smaller_size, stylize_together

pytestmark = pytest.mark.usefixtures("one_torch_thread", "pipeline_preset")

JOB_ID = "0123456789ab"


@pytest.fixture
def layout(tmp_path: Path) -> Layout:
    layout = Layout(tmp_path / "inbox", tmp_path / "outbox")
    layout.inbox.mkdir()
    layout.outbox.mkdir()
    layout.create()
    return layout


def lifecycle(layout: Layout, job: Job) -> list[tuple[str, Callable[[], object]]]:
    """A successful job's disk steps in the watcher's order (claim, save, publish, finish)."""
    claimed, output = claimed_path(layout, job), layout.outbox / "photo.png"

    def record_final() -> None:
        job.final = "done/photo.png"
        save(layout, job)

    return [
        ("journal written", lambda: save(layout, job)),
        ("input claimed", lambda: os.rename(layout.inbox / "photo.png", claimed)),
        ("output saved under its temporary name", lambda: save_image(
            output_temp(layout, job), make_photo(32, 24), metadata={"job": job.id})),
        ("output linked into the outbox", lambda: os.link(output_temp(layout, job), output)),
        ("temporary name removed", lambda: os.unlink(output_temp(layout, job))),
        ("final place recorded", record_final),
        ("input moved to done/", lambda: os.rename(claimed, layout.inbox / "done" / "photo.png")),
    ]


@pytest.mark.parametrize("steps", range(1, 8))
def test_a_restart_after_kill_9_at_any_step_ends_with_exactly_one_output(steps, layout, weights_file):
    original = drop(layout.inbox / "photo.png")
    job = Job(id=JOB_ID, source="photo.png", claimed=f"{JOB_ID}.png", preset=PRESET, output="photo.png")
    for _, step in lifecycle(layout, job)[:steps]:
        step()
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the restart to finish the job")
    assert files(layout.outbox) == ["photo.png"]
    assert files(layout.inbox / "done") == ["photo.png"]
    assert (layout.inbox / "done" / "photo.png").read_bytes() == original
    assert files(layout.processing) == [] and files(layout.inbox / "failed") == []
    metadata = read_metadata(layout.outbox / "photo.png")
    if steps >= 4:  # published before the kill: the restart must keep that output, not style it again
        assert metadata == {"job": JOB_ID}
    else:
        assert metadata["preset"] == PRESET


def test_a_restart_finishes_a_failure_that_was_being_recorded(layout, weights_file):
    drop(layout.inbox / "photo.png")
    job = Job(id=JOB_ID, source="photo.png", claimed=f"{JOB_ID}.png", preset=PRESET, output="photo.png",
              attempts=1, final="failed/photo.png", error="it was broken")
    save(layout, job)
    os.rename(layout.inbox / "photo.png", claimed_path(layout, job))
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the failure to be finished")
    error = json.loads((layout.inbox / "failed" / "photo.png.error.json").read_text())
    assert error["error"] == "it was broken" and error["attempts"] == 1
    assert files(layout.outbox) == [] and files(layout.processing) == []


def test_an_image_that_keeps_killing_the_watcher_is_given_up(layout, weights_file):
    drop(layout.inbox / "photo.png")
    job = Job(id=JOB_ID, source="photo.png", claimed=f"{JOB_ID}.png", preset=PRESET, output="photo.png",
              attempts=3)
    save(layout, job)
    os.rename(layout.inbox / "photo.png", claimed_path(layout, job))
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the job to be given up")
    error = json.loads((layout.inbox / "failed" / "photo.png.error.json").read_text())
    assert "gave up after 3 attempts" in error["error"]


def test_a_journal_with_a_field_this_version_does_not_know_still_runs(layout, weights_file):
    drop(layout.inbox / "photo.png")
    job = Job(id=JOB_ID, source="photo.png", claimed=f"{JOB_ID}.png", preset=PRESET, output="photo.png",
              attempts=1)
    save(layout, job)
    journal = layout.processing / f"{JOB_ID}.job.json"
    journal.write_text(json.dumps({**json.loads(journal.read_text()), "shrink": 1}))  # an older field
    os.rename(layout.inbox / "photo.png", claimed_path(layout, job))
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the restart to finish the job")
    assert files(layout.outbox) == ["photo.png"] and files(layout.inbox / "done") == ["photo.png"]


def test_a_batch_too_large_for_memory_runs_image_by_image_at_full_size(weights_file):
    options = StyleOptions(weights=str(weights_file), device="cpu", targets="torch", steps=1, scales=1,
                           size=256, max_memory=0.85)  # one 256×213 run fits into 0.85 GiB, two do not
    requests = [StyleRequest(make_photo(seed=seed), [make_painting()], options) for seed in (1, 2)]
    with pytest.raises(NotEnoughMemory):
        stylize_batch(requests)
    results = stylize_together(requests, lambda progress: None)
    assert [(r.width, r.height) for r in results] == [(256, 213), (256, 213)]


def test_an_out_of_memory_retry_takes_the_size_a_refusal_names():
    request = StyleRequest(make_photo(), [make_painting()], StyleOptions(size=4000))
    assert smaller_size(request, NotEnoughMemory("not enough memory", long_side=2313)) == 2313


def test_an_out_of_memory_retry_without_a_named_size_shrinks_the_long_side():
    request = StyleRequest(make_photo(), [make_painting()], StyleOptions(size=4000))
    assert smaller_size(request, MemoryError()) == round(4000 * SHRINK)
    unsized = StyleRequest(make_photo(48, 40), [make_painting()])
    assert smaller_size(unsized, RuntimeError("can't allocate memory")) == round(48 * SHRINK)


def test_a_claimed_name_that_looks_temporary_survives_a_restart(layout, weights_file):
    original = drop(layout.inbox / "scan.abcdefghijklmn~2")  # its suffix cut to 16 ends in "~"
    job = claim(layout, inspect(layout, layout.inbox / "scan.abcdefghijklmn~2"), PRESET, "scan.png")
    assert job is not None and job.claimed.endswith("~")
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the restart to finish the job")
    assert (layout.inbox / "done" / "scan.abcdefghijklmn~2").read_bytes() == original
    assert files(layout.outbox) == ["scan.png"]


def test_a_refused_drop_killed_before_its_move_is_not_reported_as_moved(layout):
    drop(layout.inbox / "a" / "b" / "photo.png")
    save(layout, Job(id=JOB_ID, source="a/b/photo.png", claimed=f"{JOB_ID}.png", preset=None, output=None,
                     error="nested too deep"))  # claim's journal, written before its rename
    found = recover(layout, max_attempts=3)
    assert found.finished == [] and found.again == []
    assert files(layout.processing) == [] and files(layout.inbox / "failed") == []
    assert (layout.inbox / "a" / "b" / "photo.png").is_file()  # the next scan refuses it afresh


def test_a_file_left_in_processing_without_its_record_goes_to_failed(layout, weights_file):
    (layout.processing / "stray.png").write_bytes(b"left here by hand")
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the stray file to be moved")
    error = json.loads((layout.inbox / "failed" / "stray.png.error.json").read_text())
    assert error["error"] == ORPHAN_REASON
    assert (layout.inbox / "failed" / "stray.png").read_bytes() == b"left here by hand"


def test_a_macs_hidden_files_and_folders_in_processing_do_not_stop_a_restart(layout, weights_file):
    (layout.processing / ".AppleDouble").mkdir()  # made in every folder a Mac browses on some shares
    (layout.processing / f"._{JOB_ID}.job.json").write_bytes(b"\0\5\26\7 a resource fork")
    drop(layout.inbox / "photo.png")
    with watching(config_for(layout.inbox, layout.outbox, weights_file)):
        wait_for(lambda: settled(layout.inbox, 1), what="the image to be done")
    assert files(layout.outbox) == ["photo.png"] and files(layout.inbox / "failed") == []
    assert (layout.processing / ".AppleDouble").is_dir()


@pytest.mark.parametrize(("name", "temporary"), [
    ("photo.jpg", False), ("Foto Straße 1.png", False), (".photo.jpg", True), ("photo.jpg.part", True),
    ("photo.PART", True), ("photo.tmp", True), ("photo.jpg.crdownload", True), ("~$photo.jpg", True),
    ("photo.jpg~", True), ("photo.partial", True), ("photo.jpg.filepart", True),
])
def test_temporary_names(name, temporary):
    assert is_temporary(name) is temporary


def test_free_names_skip_files_reservations_and_companions(tmp_path):
    (tmp_path / "photo.png").write_bytes(b"x")
    (tmp_path / "photo-1.png.error.json").write_bytes(b"x")
    assert free_name(tmp_path, "other.png") == tmp_path / "other.png"
    assert free_name(tmp_path, "photo.png") == tmp_path / "photo-1.png"
    assert free_name(tmp_path, "photo.png", companion=".error.json") == tmp_path / "photo-2.png"
    assert free_name(tmp_path, "photo.png", taken={tmp_path / "photo-1.png"}) == tmp_path / "photo-2.png"


def test_a_no_clobber_link_never_replaces_a_file(tmp_path):
    source, target = tmp_path / "a", tmp_path / "b"
    source.write_bytes(b"new")
    target.write_bytes(b"old")
    assert link_no_clobber(source, target) is False
    assert target.read_bytes() == b"old" and source.exists()
    target.unlink()
    assert link_no_clobber(source, target) is True
    assert target.read_bytes() == b"new" and not source.exists()


def test_a_file_settles_only_after_it_stops_changing(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(b"a")
    settler = Settler(settle=1.0)
    settler.add(path, now=0.0)
    assert settler.ready(now=0.5) == []
    with open(path, "ab") as stream:
        stream.write(b"b")
    assert settler.ready(now=1.2) == []  # changed: the clock starts again
    assert settler.ready(now=2.0) == []
    assert settler.ready(now=2.3) == [path] and len(settler) == 0
    settler.add(path, now=3.0)
    path.unlink()
    assert settler.ready(now=9.0) == [] and len(settler) == 0
