"""One input's way through the hot folder, resumable after kill -9 at any point.

claim:   write processing/<id>.job.json (source, preset, chosen output name), then rename the input
         into processing/<id><ext>.
publish: the output was saved under a hidden temporary name in the outbox; hard-link it to its name
         (never replacing a file), then drop the temporary name. Its metadata carries the job id.
finish:  record the final place (done/… or failed/…) in the journal, write failed/<name>.error.json if
         it failed, rename the input there, then delete the journal.
A restart reads every journal (recover): what was published is finished, everything else runs again.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path

from stylekit.atomic import write_json
from stylekit.errors import StylekitError
from stylekit.image import read_metadata

from .folders import ERROR_SUFFIX, Drop, Layout, free_name, is_temporary, link_no_clobber

JOURNAL_SUFFIX = ".job.json"
ORPHAN_REASON = "found in processing/ without its job record"


@dataclass
class Job:
    """The journal of one claimed input: where it came from, where its output and the input go."""

    id: str
    source: str  # where it was dropped, relative to the inbox (posix)
    claimed: str  # its file name in processing/
    preset: str | None
    output: str | None  # relative to the outbox, chosen at claim time so a restart never makes a second
    # Attempts made. A crash counts against a job styled alone, so a poison image cannot loop forever;
    # a crash mid-group counts against none of its jobs, which then run again one by one.
    attempts: int = 0
    size: int | None = None  # the long side after an out-of-memory failure (None: the preset's)
    final: str | None = None  # relative to the inbox: done/… or failed/…, recorded before the move
    error: str | None = None

    @property
    def name(self) -> str:
        """The input's file name as dropped, for messages."""
        return Path(self.source).name

    @property
    def tried(self) -> str:
        """Its attempts, for messages: '1 attempt', '3 attempts'."""
        return f"{self.attempts} attempt{'' if self.attempts == 1 else 's'}"


def journal_path(layout: Layout, job: Job) -> Path:
    """processing/<id>.job.json."""
    return layout.processing / f"{job.id}{JOURNAL_SUFFIX}"


def claimed_path(layout: Layout, job: Job) -> Path:
    """Where the input sits while its job runs."""
    return layout.processing / job.claimed


def output_temp(layout: Layout, job: Job) -> Path:
    """The hidden name the output is saved under before it is published (same folder, same format)."""
    assert job.output is not None
    target = layout.outbox / job.output
    return target.with_name(f".stylekit-{job.id}{target.suffix}")


def save(layout: Layout, job: Job) -> None:
    """Record the job atomically; every later step can be redone from what is recorded."""
    write_json(journal_path(layout, job), asdict(job))


def claim(layout: Layout, drop: Drop, preset: str | None, output: str | None,
          problem: str | None = None) -> Job | None:
    """Take a dropped file: journal first, then an atomic rename; None if it vanished meanwhile.

    A refused file (problem given) is claimed too, so that its way to failed/ is just as crash-safe.
    """
    job_id = secrets.token_hex(6)
    job = Job(id=job_id, source=drop.rel.as_posix(), claimed=job_id + drop.path.suffix[:16],
              preset=preset, output=output, error=problem)
    layout.processing.mkdir(exist_ok=True)  # made again if someone removed it, empty, meanwhile
    save(layout, job)
    try:
        os.rename(drop.path, claimed_path(layout, job))
    except OSError as error:
        journal_path(layout, job).unlink()
        if isinstance(error, FileNotFoundError):
            return None
        raise StylekitError(f"cannot take '{drop.rel}': {error.strerror or error}") from None
    return job


def publish(layout: Layout, job: Job, taken: set[Path]) -> Path:
    """Give the saved temporary output its name in the outbox, with a suffix if that name is taken now."""
    temp = output_temp(layout, job)
    target = layout.outbox / str(job.output)
    while not link_no_clobber(temp, target):
        target = free_name(target.parent, target.name, taken)
        job.output = target.relative_to(layout.outbox).as_posix()
        save(layout, job)
    return target


def is_published(layout: Layout, job: Job) -> bool:
    """Whether the job's output is in the outbox: a file at its name whose metadata names this job."""
    if job.output is None:
        return False
    target = layout.outbox / job.output
    if not target.is_file():
        return False
    try:
        return read_metadata(target).get("job") == job.id
    except StylekitError:
        return False


def remove_temporaries(layout: Layout, job: Job) -> None:
    """Delete a half-written or unpublished output of this job (only hidden names carrying its id)."""
    if job.output is None:
        return
    folder = (layout.outbox / job.output).parent
    for leftover in folder.glob(f".*stylekit-{job.id}*"):
        with contextlib.suppress(OSError):
            leftover.unlink()


def finish(layout: Layout, job: Job, error: str | None = None) -> Path:
    """Move the input to done/, or to failed/ beside <name>.error.json, and drop the journal."""
    source = claimed_path(layout, job)
    if job.final is None:
        job.error = error
        target = _choose_final(layout, job)
    else:
        target = layout.inbox / job.final
        if os.path.lexists(source) and os.path.lexists(target):
            target = _choose_final(layout, job)  # another file took the recorded name meanwhile
    if os.path.lexists(source):
        target.parent.mkdir(parents=True, exist_ok=True)
        if job.error is not None:
            write_json(target.with_name(target.name + ERROR_SUFFIX), {
                "file": job.source, "error": job.error, "preset": job.preset,
                "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "attempts": job.attempts})
        os.rename(source, target)
    journal_path(layout, job).unlink(missing_ok=True)
    return target


def _choose_final(layout: Layout, job: Job) -> Path:
    """Pick and record a free place in done/ or failed/ (mirroring the inbox) before moving there."""
    failed = job.error is not None
    rel = Path(job.source)
    folder = (layout.failed if failed else layout.done) / rel.parent
    final = free_name(folder, rel.name, companion=ERROR_SUFFIX if failed else "")
    job.final = final.relative_to(layout.inbox).as_posix()
    save(layout, job)
    return final


def hand_back(layout: Layout, job: Job) -> Path:
    """Put a claimed input back where it was dropped (on shutdown) so the next start takes it again."""
    rel = Path(job.source)
    folder = layout.inbox / rel.parent
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / rel.name
    while not link_no_clobber(claimed_path(layout, job), target):  # never over a file dropped meanwhile
        target = free_name(folder, rel.name)
    journal_path(layout, job).unlink()
    return target


@dataclass(frozen=True)
class Recovery:
    """What a restart found in processing/: jobs to run again and jobs it could finish at once."""

    again: list[Job]
    finished: list[tuple[Job, Path]]


def recover(layout: Layout, max_attempts: int) -> Recovery:
    """Settle what a previous run left in processing/, so every input ends exactly once."""
    again: list[Job] = []
    finished: list[tuple[Job, Path]] = []
    jobs = [_load(path) for path in journals(layout)]
    claimed = {job.claimed for job in jobs}
    for job in jobs:
        remove_temporaries(layout, job)
        if job.final is None and not os.path.lexists(claimed_path(layout, job)):
            journal_path(layout, job).unlink()  # never renamed in (a refused one too), or handed back
        elif job.final is not None or job.error is not None:
            finished.append((job, finish(layout, job, job.error)))
        elif is_published(layout, job):
            finished.append((job, finish(layout, job)))
        elif job.attempts >= max_attempts:
            reason = (f"gave up after {job.tried}: the watcher stopped while styling it alone "
                      "(out of memory?)")
            finished.append((job, finish(layout, job, reason)))
        else:
            again.append(job)
    for path in sorted(layout.processing.iterdir()):
        if path.name in claimed:  # an input, even one whose cut suffix looks temporary ('….abc~')
            continue
        if is_temporary(path.name):
            if not path.is_dir():  # a folder (a Mac's .AppleDouble) is not ours: left alone
                path.unlink()  # a journal cut short while being written (or a Mac's ._ or .DS_Store)
        elif not path.name.endswith(JOURNAL_SUFFIX):
            job = Job(id=secrets.token_hex(6), source=path.name, claimed=path.name, preset=None,
                      output=None)
            finished.append((job, finish(layout, job, ORPHAN_REASON)))
    return Recovery(again, finished)


def journals(layout: Layout) -> list[Path]:
    """The job records in processing/, sorted; a hidden one is not ours (a Mac's ._<id>.job.json)."""
    found = layout.processing.glob(f"*{JOURNAL_SUFFIX}")
    return sorted(path for path in found if not is_temporary(path.name))


def _load(path: Path) -> Job:
    """Read a journal, refusing to guess about one that is unreadable."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        known = {f.name for f in fields(Job)}  # a field of another version's journal is left behind
        return Job(**{key: value for key, value in record.items() if key in known})
    except (OSError, ValueError, TypeError) as error:
        raise StylekitError(f"job record '{path}' is unreadable ({error}); move it and its input "
                            "out of processing/ and restart") from None
