"""The hot folder on disk: its layout, which files count as dropped images, and writes that never clobber.

processing/, done/ and failed/ live inside the inbox, so every move of an input is a same-disk rename.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import stat
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

from stylekit.errors import StylekitError

RESERVED = ("processing", "done", "failed")
TEMPORARY_SUFFIXES = (".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart", "~")
LOCK_NAME = ".stylekit-watch.lock"
ERROR_SUFFIX = ".error.json"
NAME_MAX = 255  # bytes in one file name on the usual file systems
_NO_HARD_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EMLINK, errno.ENOSYS}


@dataclass(frozen=True)
class Layout:
    """One inbox (an absolute, resolved path) and the outbox its styled images go to."""

    inbox: Path
    outbox: Path

    @property
    def processing(self) -> Path:
        """Claimed inputs and their job records while they are being worked on."""
        return self.inbox / "processing"

    @property
    def done(self) -> Path:
        """Inputs whose output is in the outbox."""
        return self.inbox / "done"

    @property
    def failed(self) -> Path:
        """Inputs that could not be styled, each beside a <name>.error.json."""
        return self.inbox / "failed"

    def create(self) -> None:
        """Make the working folders and the outbox, so a fresh deployment just starts."""
        for folder in (self.processing, self.done, self.failed, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)


@dataclass(frozen=True)
class Drop:
    """A file found in the inbox that is ours to take: where it is and why it is refused, if it is."""

    path: Path
    rel: Path  # relative to the inbox
    folder: str | None  # the preset sub-folder it was dropped in; None at the top level
    problem: str | None


def is_temporary(name: str) -> bool:
    """Names writers use while a file is incomplete (and hidden ones): ignored until renamed."""
    return name.startswith((".", "~$")) or name.lower().endswith(TEMPORARY_SUFFIXES)


def is_candidate(layout: Layout, path: Path) -> bool:
    """Whether a path in the inbox may become a drop, judged by its name alone (cheap, for events)."""
    try:
        parts = path.relative_to(layout.inbox).parts
    except ValueError:
        return False
    return bool(parts) and parts[0] not in RESERVED and not any(is_temporary(p) for p in parts)


def inspect(layout: Layout, path: Path) -> Drop | None:
    """Classify a settled path; None when it is not ours (temporary, internal, gone, a folder)."""
    if not is_candidate(layout, path) or path.parent.resolve() != path.parent:
        return None  # a parent that resolves elsewhere is a symlinked folder: never touch what is behind it
    try:
        mode = os.lstat(path).st_mode
    except OSError:
        return None
    if stat.S_ISDIR(mode):
        return None
    rel = path.relative_to(layout.inbox)
    problem = None
    if stat.S_ISLNK(mode):
        problem = "symlinks are not accepted (they may point outside the inbox); copy the image in"
    elif not stat.S_ISREG(mode):
        problem = "not a regular file"
    elif len(rel.parts) > 2:
        problem = "nested too deep: put images in the inbox or in inbox/<preset>/"
    return Drop(path, rel, rel.parts[0] if len(rel.parts) == 2 else None, problem)


def scan(layout: Layout, folder: Path,
         unreadable: Callable[[OSError], None] | None = None) -> Iterator[Path]:
    """Every candidate below a folder of the inbox, without following symlinks (they are yielded);
    a folder that cannot be listed is left out, and handed to unreadable."""
    for root, dirs, files in os.walk(folder, onerror=unreadable):
        here = Path(root)
        kept = []
        for name in dirs:
            path = here / name
            if os.path.islink(path):
                yield path
            elif is_candidate(layout, path):
                kept.append(name)
        dirs[:] = kept
        yield from (here / name for name in files if is_candidate(layout, here / name))


def free_name(folder: Path, name: str, taken: Collection[Path] = (), companion: str = "") -> Path:
    """The first of name, stem-1.ext, stem-2.ext… that is neither on disk nor taken (nor its companion),
    the stem shortened where the name with its companion would be too long for the file system."""
    stem, suffix = Path(name).stem, Path(name).suffix
    tails = itertools.chain([suffix], (f"-{number}{suffix}" for number in itertools.count(1)))
    names = (_fitted(stem, tail + companion) + tail for tail in tails)
    return next(folder / n for n in names if _is_free(folder / n, taken, companion))


def _fitted(stem: str, tail: str) -> str:
    """stem, shortened by whole characters until stem + tail fits into NAME_MAX bytes."""
    room = NAME_MAX - len(os.fsencode(tail))
    while len(os.fsencode(stem)) > room:
        stem = stem[:-1]
    return stem


def _is_free(path: Path, taken: Collection[Path], companion: str) -> bool:
    """Nothing on disk or reserved has this name (nor the name with companion appended)."""
    if path in taken or os.path.lexists(path):
        return False
    return not (companion and os.path.lexists(path.with_name(path.name + companion)))


def link_no_clobber(source: Path, target: Path) -> bool:
    """Rename source to target only if target does not exist (hard link + unlink); False if it does."""
    try:
        os.link(source, target, follow_symlinks=False)
    except FileExistsError:
        return False
    except OSError as error:
        if error.errno not in _NO_HARD_LINKS:  # e.g. some network shares: check, then rename
            raise
        if os.path.lexists(target):
            return False
        os.rename(source, target)
        return True
    os.unlink(source)
    return True


@contextlib.contextmanager
def locked(layout: Layout) -> Iterator[None]:
    """Hold the inbox's lock for the watcher's lifetime so two watchers never take the same files:
    on the inbox folder itself, which cannot be deleted away meanwhile as the lock file can, and on
    the lock file, which names the watcher's pid (and is all some network file systems can lock).
    An inbox nested with another watcher's is refused under the lock (two watchers starting together
    both see it), and a refused start takes away the lock file it made."""
    refusal = f"another stylekit watch (pid {{pid}}) is already watching '{layout.inbox}'"
    lock = layout.inbox / LOCK_NAME
    made = not os.path.lexists(lock)
    with contextlib.ExitStack() as stack:
        try:
            stack.enter_context(_flocked(layout.inbox, os.O_RDONLY | os.O_DIRECTORY))
        except BlockingIOError:
            raise StylekitError(refusal.format(pid=_pid_in(lock))) from None
        except OSError:  # a file system that cannot lock folders: the lock file alone holds
            pass
        stack.enter_context(pid_locked(lock, refusal))
        try:
            check_not_nested(layout.inbox)
        except StylekitError:
            if made:
                lock.unlink(missing_ok=True)
            raise
        yield


@contextlib.contextmanager
def pid_locked(path: Path, refusal: str) -> Iterator[None]:
    """Hold a lock file (made if missing) naming this process's pid, so a second process is refused
    with refusal (its {pid} filled in) instead of doing the same work."""
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(_flocked(path, os.O_RDWR | os.O_CREAT))
        except BlockingIOError:
            raise StylekitError(refusal.format(pid=_pid_in(path))) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield


@contextlib.contextmanager
def _flocked(path: Path, flags: int) -> Iterator[int]:
    """path opened and locked exclusively until the block ends; BlockingIOError if another holds it."""
    fd = os.open(path, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield fd
    finally:
        os.close(fd)  # closing releases the lock; the kernel does the same after kill -9


def _pid_in(lock: Path) -> str:
    """The pid a lock file names; '?' when it names none or is gone."""
    try:
        return lock.read_text(encoding="utf-8", errors="replace").strip()[:32] or "?"
    except OSError:
        return "?"


def check_not_nested(inbox: Path) -> None:
    """Refuse an inbox inside another watcher's inbox, or holding one: each would take the other's
    files in processing/ for drops of its own."""
    for parent in inbox.parents:
        if holder := lock_holder(parent):
            raise StylekitError(f"inbox '{inbox}' is inside '{parent}', which another stylekit watch "
                                f"(pid {holder}) watches")
    for root, _, names in os.walk(inbox):
        if LOCK_NAME in names and Path(root) != inbox and (holder := lock_holder(Path(root))):
            raise StylekitError(f"inbox '{inbox}' holds '{root}', which another stylekit watch "
                                f"(pid {holder}) watches")


def lock_holder(inbox: Path) -> str | None:
    """The pid of the watcher holding an inbox's lock ('?' if its lock file was deleted), or None
    when no watcher is running there."""
    for path, flags in ((inbox / LOCK_NAME, os.O_RDONLY), (inbox, os.O_RDONLY | os.O_DIRECTORY)):
        try:
            fd = os.open(path, flags)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _pid_in(inbox / LOCK_NAME)
        except OSError:  # a file system that cannot lock it
            pass
        finally:
            os.close(fd)
    return None
