"""`stylekit watch`: a watchdog observer, a scan at start and now and then, settle, claim, style, repeat.

Everything runs in the main thread except the observer, which only queues paths. SIGINT/SIGTERM set
the stop event; the engine's progress callback then hands back the current image and the loop exits
(a second Ctrl-C stops the engine at once: see stopping.py).
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from stylekit.atomic import check_writable_folder
from stylekit.errors import StylekitError

from .config import WatchConfig
from .folders import Drop, Layout, inspect, is_candidate, locked, scan
from .jobs import Job, recover
from .log import EventLog
from .settle import Settler, Stamp, stamp
from .status import status_locked, write_status
from .stopping import Stopping
from .worker import Engine, Hotfolder, Worker, disk_error, open_engine, warm_up

TICK_S = 0.05  # how often the settle check runs while idle
STATUS_EVERY_S = 1.0  # the status file is rewritten at most this often (and at least every 30 s)
STATUS_IDLE_S = 30.0
EVENTS = [FileCreatedEvent, FileModifiedEvent, FileClosedEvent, FileMovedEvent, DirCreatedEvent,
          DirMovedEvent]


def _after_stop(record: logging.LogRecord) -> bool:
    """False for watchdog's log line about an event read after the observer stopped (see watch)."""
    return "called when the thread is inactive" not in record.getMessage()


class _Events(FileSystemEventHandler):
    """Queues every path the observer reports; the main loop decides what it is."""

    def __init__(self, paths: queue.SimpleQueue[Path]) -> None:
        super().__init__()
        self.paths = paths

    def on_any_event(self, event: FileSystemEvent) -> None:
        raw = event.dest_path if isinstance(event, (FileMovedEvent, DirMovedEvent)) else event.src_path
        self.paths.put(Path(os.fsdecode(raw)))


class Watcher:
    """The loop over configured inboxes: recover, notice, settle, claim a group, style it."""

    def __init__(self, config: WatchConfig, hots: list[Hotfolder], log: EventLog,
                 stopping: Stopping, engine: Engine) -> None:
        self.config = config
        self.hots = hots
        self.log = log
        self.stop = stopping.event
        self.paths: queue.SimpleQueue[Path] = queue.SimpleQueue()
        self.settler = Settler(config.settle)
        self.ready: dict[Path, tuple[Hotfolder, Drop]] = {}
        self.again: list[tuple[Hotfolder, list[Job]]] = []
        self.skipped: dict[Path, tuple[Stamp | None, str]] = {}  # what was logged, so as not to repeat
        self.worker = Worker(log, stopping, config.retries, heartbeat=self.write_status, engine=engine,
                             pause=config.rescan)
        self._status_written = 0.0
        self._changed = True
        self._current_written: str | None = None

    def run(self) -> None:
        """Recover, take what is already waiting, then follow events until stopped."""
        for hot in self.hots:
            self._recover(hot)
            self._scan(hot)
        next_scan = time.monotonic() + self.config.rescan
        while not self.stop.is_set():
            self._drain()
            now = time.monotonic()
            if now >= next_scan:
                self.skipped = {path: seen for path, seen in self.skipped.items() if os.path.lexists(path)}
                for hot in self.hots:
                    self._scan(hot)
                next_scan = now + self.config.rescan
            for path in self.settler.ready(now):
                self._settled(path)
            if self._work():
                self._changed = True  # counts moved; the worker's heartbeat may have written mid-job
            else:
                self.write_status()
                self.stop.wait(TICK_S)
        for hot, jobs in self.again:  # recovered from the last run but not started: back too
            self.worker.hand_back(hot, jobs)
        self.write_status(state="stopped", force=True)
        self.log("stopped", "stopped cleanly")

    def write_status(self, state: str = "running", force: bool = False) -> None:
        """Refresh the status file when something changed (at most every second), and now and then."""
        if self.config.status_file is None:
            return
        now = time.monotonic()
        since = now - self._status_written
        changed = self._changed or self.worker.current != self._current_written  # the next of a group
        if force or (changed and since >= STATUS_EVERY_S) or since >= STATUS_IDLE_S:
            try:
                write_status(self.config.status_file, [hot.config for hot in self.hots], state,
                             self.worker.current)
            except OSError as error:  # a report, not the work: the images go on being styled
                self.worker.warn(f"cannot write the status file {self.config.status_file}: "
                                 f"{error.strerror or error}")
            self._status_written, self._changed = now, False
            self._current_written = self.worker.current

    def _recover(self, hot: Hotfolder) -> None:
        """Finish or requeue what the last run left in processing/ (after kill -9 or a crash)."""
        found = recover(hot.layout, max_attempts=self.config.retries + 1)
        for job, where in found.finished:
            how = job.error or "finished from the last run"  # failed: its reason, as in error.json
            self.log("recovered", f"{job.source}: {how} (moved to {where.relative_to(hot.layout.inbox)})",
                     file=job.source, moved_to=str(where), **({"error": job.error} if job.error else {}))
        for job in found.again:
            hot.live[job.id] = job
            self.again.append((hot, [job]))  # one at a time: a crash now counts against its one image
        if found.again:
            self.log("recovered", f"{len(found.again)} image(s) left in {hot.layout.processing} "
                                  "will run again", count=len(found.again))

    def _scan(self, hot: Hotfolder) -> None:
        """Notice every file already in the inbox (nothing dropped while stopped is missed)."""
        now = time.monotonic()
        for path in scan(hot.layout, hot.layout.inbox, self._unreadable(hot)):
            if path not in self.ready:
                self.settler.add(path, now)

    def _drain(self) -> None:
        """Move the observer's paths into the settle check; a new folder is scanned, being new. A path
        that had settled and waits its turn settles again: it is being rewritten or replaced."""
        now = time.monotonic()
        while True:
            try:
                path = self.paths.get_nowait()
            except queue.Empty:
                return
            self._changed = True
            hot = self._owner(path)
            if hot is None or not is_candidate(hot.layout, path):
                continue
            self.ready.pop(path, None)
            try:
                mode = os.lstat(path).st_mode
            except (FileNotFoundError, NotADirectoryError):
                continue  # gone already
            except OSError as error:  # e.g. in a folder of another user's that this one may not read
                self._skip(hot, path, f"cannot take '{path.relative_to(hot.layout.inbox)}': "
                                      f"{error.strerror or error}")
                continue
            if stat.S_ISDIR(mode):
                for found in scan(hot.layout, path, self._unreadable(hot)):
                    self.settler.add(found, now)
            else:
                self.settler.add(path, now)

    def _unreadable(self, hot: Hotfolder) -> Callable[[OSError], None]:
        """What scan does with a folder it cannot list: skip it, saying so."""
        def skip(error: OSError) -> None:
            path = Path(os.fsdecode(error.filename))
            self._skip(hot, path, f"cannot read the folder '{path.relative_to(hot.layout.inbox)}': "
                                  f"{error.strerror or error}")
        return skip

    def _skip(self, hot: Hotfolder, path: Path, reason: str) -> None:
        """Log a path it cannot take, but only once until the path or the reason changes (the next
        rescan tries it again, and would log it again every time)."""
        seen = (stamp(path), reason)
        if self.skipped.get(path) != seen:
            self.skipped[path] = seen
            self.log("skipped", reason, file=path.relative_to(hot.layout.inbox).as_posix())

    def _settled(self, path: Path) -> None:
        """A settled path becomes a drop waiting to be claimed, unless it is not ours, or it looked
        unfinished and has not changed since, for less than `rescan` seconds (a rescan brings it back)."""
        hot = self._owner(path)
        drop = inspect(hot.layout, path) if hot else None
        if not (hot and drop):
            return
        failed = hot.unfinished.get(drop.rel.as_posix())
        if failed and failed[0] == stamp(path) and time.monotonic() - failed[1] < self.config.rescan:
            return
        self.ready[path] = (hot, drop)

    def _owner(self, path: Path) -> Hotfolder | None:
        """The configured inbox a path lies in."""
        return next((hot for hot in self.hots if path.is_relative_to(hot.layout.inbox)), None)

    def _work(self) -> bool:
        """Run one recovered job or claim and run one group of drops; False when there is nothing
        (or only work for inboxes that wait for their outbox)."""
        now = time.monotonic()
        again = next((entry for entry in self.again if entry[0].paused_until <= now), None)
        ready = [(hot, drop) for hot, drop in self.ready.values() if hot.paused_until <= now]
        if again is None and not ready:
            return False
        self._changed = True  # so the first heartbeat of the job reports it as current
        if again is not None:
            self.again.remove(again)
            self.worker.run(*again)
            return True
        hot, first = ready[0]
        group = [first]
        preset = first.folder or hot.config.preset
        if first.problem is None and preset is not None:
            group = [drop for owner, drop in ready if owner is hot and drop.problem is None
                     and (drop.folder or hot.config.preset) == preset][:self.config.batch]
        jobs = []
        for drop in group:
            del self.ready[drop.path]
            try:
                job = hot.claim(drop)
            except StylekitError as error:
                self._skip(hot, drop.path, str(error))
                continue
            except OSError as error:  # its job record could not be written: it stays in the inbox
                self._skip(hot, drop.path, f"cannot take '{drop.rel}': {disk_error(error)}")
                continue
            if job is not None and job.error is not None:
                self.worker.fail(hot, job, job.error)
            elif job is not None:
                jobs.append(job)
        if jobs:
            self.worker.run(hot, jobs)
        return True


def watch(config: WatchConfig, stopping: Stopping | None = None) -> None:
    """Run the hot folders until stopping's event is set (by SIGINT/SIGTERM when running in the main
    thread; the CLI takes them earlier, while this module loads, through the same Stopping)."""
    stopping = stopping or Stopping(threading.Event())
    signals = threading.current_thread() is threading.main_thread()
    log = EventLog(config.log_json)
    with contextlib.ExitStack() as stack:
        if signals:
            stack.enter_context(stopping.on_signals())
        hots = []
        for folder in config.folders:
            layout = Layout(folder.inbox, folder.out)
            stack.enter_context(locked(layout))
            layout.create()
            for place, what in ((layout.outbox, "output folder"), (layout.processing, "folder"),
                                (layout.done, "folder"), (layout.failed, "folder")):
                check_writable_folder(place, what)  # else every image would be styled, then lost
            hots.append(Hotfolder(folder, layout))
        if config.status_file is not None:
            check_writable_folder(config.status_file.parent, "status file folder")
            stack.enter_context(status_locked(config.status_file))
        if stopping.event.is_set():  # asked while the command loaded: no engine to load for nothing
            log("stopped", "stopped while starting")
            return
        try:
            with stopping.abortable():  # nothing is claimed yet: a second Ctrl-C may stop at once
                engine = stack.enter_context(open_engine(config))
                said = [message for hot in hots for message in warm_up(hot.config, engine)]
        except KeyboardInterrupt:
            log("stopped", "stopped while starting")
            return
        if signals:
            stopping.install()  # ray.init put in a SIGTERM handler of its own
        log("engine", f"styling {engine.where}", engine=config.engine)
        watcher = Watcher(config, hots, log, stopping, engine)
        for message in said:
            watcher.worker.warn(message)
        # watchdog's inotify can add a folder's watch twice when nested folders appear at once
        # (failed/<preset>/deeper/ made in one go) and warns that it replaced its own callback; the
        # watch works, so stay quiet (set here, not at import: a caller's catch_warnings may undo that).
        warnings.filterwarnings("ignore", message="Callback with id .* already exists",
                                category=RuntimeWarning)
        # Its inotify reader also logs an error when it reads an event after the observer has stopped:
        # a harmless race at shutdown, which would end a clean stop with an error line.
        logging.getLogger("watchdog.observers.inotify").addFilter(_after_stop)
        observer = Observer()
        for hot in hots:
            observer.schedule(_Events(watcher.paths), str(hot.layout.inbox), recursive=True,
                              event_filter=EVENTS)
        observer.start()
        stack.callback(observer.join)
        stack.callback(observer.stop)
        for hot in hots:
            preset = f"preset {hot.config.preset}" if hot.config.preset else "presets by sub-folder"
            log("watching", f"{hot.layout.inbox} → {hot.layout.outbox} ({preset})",
                inbox=str(hot.layout.inbox), out=str(hot.layout.outbox), preset=hot.config.preset)
        watcher.run()
