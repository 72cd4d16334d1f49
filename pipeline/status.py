"""How far each inbox has got (queued, processing, done, failed), counted from the folders themselves."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from stylekit.atomic import write_json
from stylekit.errors import StylekitError, UsageError

from .config import FolderConfig, load
from .folders import ERROR_SUFFIX, Layout, is_temporary, lock_holder, pid_locked, scan
from .jobs import journals


@dataclass(frozen=True)
class Counts:
    """Files waiting in the inbox, being worked on, finished, and refused or failed."""

    queued: int
    processing: int
    done: int
    failed: int


def count(inbox: Path) -> Counts:
    """Count an inbox's files by where they are now, so the numbers hold whether a watcher runs or not."""
    layout = Layout(inbox, outbox=inbox)  # counting never looks at the outbox
    processing = len(journals(layout)) if layout.processing.is_dir() else 0
    return Counts(queued=sum(1 for _ in scan(layout, inbox)), processing=processing,
                  done=_files(layout.done), failed=_files(layout.failed, skip=ERROR_SUFFIX))


def write_status(path: Path, folders: list[FolderConfig], state: str, current: str | None) -> None:
    """The status file for monitoring: counts per inbox plus what the watcher is doing, written atomically."""
    write_json(path, {
        "updated": datetime.now(timezone.utc).isoformat(timespec="seconds"), "pid": os.getpid(),
        "state": state, "current": current,
        "folders": [{"inbox": str(f.inbox), "out": str(f.out), "preset": f.preset,
                     **asdict(count(f.inbox))} for f in folders]})


@contextlib.contextmanager
def status_locked(path: Path) -> Iterator[None]:
    """Hold .<name>.lock beside the status file (which is replaced at every write, so not itself
    lockable) so that two watchers never report over each other."""
    with pid_locked(path.with_name(f".{path.name}.lock"),
                    f"another stylekit watch (pid {{pid}}) writes the status file '{path}'"):
        yield


def report(target: Path | None) -> tuple[str, str | None]:
    """`stylekit watch --status INBOX_OR_CONFIG`: one line per inbox, and what is wrong if an inbox
    does not exist (None if all do: the command fails otherwise, so that a monitoring check notices)."""
    if target is None:
        raise UsageError("--status needs the INBOX folder or a pipeline.toml to report on")
    if target.is_dir():
        inboxes = [(target, "")]
    elif target.is_file():
        inboxes = [(f.inbox, f" (preset {f.preset or '-'} → {f.out})") for f in load(target).folders]
    else:
        raise StylekitError(f"'{target}' is neither an inbox folder nor a config file")
    lines = []
    missing = []
    for inbox, about in inboxes:
        if not inbox.is_dir():
            lines.append(f"{inbox}{about}: the inbox does not exist")
            missing.append(f"'{inbox}'")
            continue
        counts = count(inbox)
        holder = lock_holder(inbox)
        watcher = f"watcher running (pid {holder})" if holder else "no watcher running"
        lines.append(f"{inbox}{about}: queued {counts.queued}, processing {counts.processing}, "
                     f"done {counts.done}, failed {counts.failed}; {watcher}")
    problem = None
    if missing:
        problem = f"inbox {missing[0]} does not exist" if len(missing) == 1 else \
            f"inboxes {', '.join(missing)} do not exist"
    return "\n".join(lines), problem


def _files(folder: Path, skip: str = "") -> int:
    """Entries below a folder that are not folders (symlinks to folders count), less temporaries and skip."""
    total = 0
    for root, dirs, names in os.walk(folder):
        links = [name for name in dirs if os.path.islink(os.path.join(root, name))]
        total += sum(1 for name in names + links
                     if not is_temporary(name) and not (skip and name.endswith(skip)))
    return total
