"""Claimed jobs through the engine: a preset's images together, bounded retries at a smaller size.

The engine work is `stylize(preset_request(...))` then `save_image`; nothing here re-implements either.
Where stylize() runs, this process or a Ray pool, is the Engine chosen once at start (open_engine).
"""

from __future__ import annotations

import dataclasses
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from stylekit import __version__, ray_engine
from stylekit.batch import JPEG_ALPHA_WARNING, failure_reason
from stylekit.engine import MIN_SIDE, output_long_side, pick_runtime, stylize, stylize_batch
from stylekit.errors import Cancelled, NotEnoughMemory, StylekitError, disk_refusal
from stylekit.image import IncompleteImage, LoadedImage, load_image, output_format, output_suffix, save_image
from stylekit.presets import Preset, get_preset, preset_request
from stylekit.request import Progress, ProgressCallback, Result, StyleOptions, StyleRequest, warm_up_request

from .config import FolderConfig, WatchConfig
from .folders import Drop, Layout, free_name
from .jobs import Job, claim, claimed_path, finish, hand_back, output_temp, publish, save
from .log import EventLog
from .settle import Stamp, stamp
from .stopping import Stopping

SHRINK = 0.7  # each out-of-memory retry makes the long side this much smaller
PROGRESS_EVERY_S = 10.0


class OutboxRefused(Exception):
    """The outbox cannot take any output now (a full disk, a quota, a read-only mount): no image's fault."""


@dataclass
class Hotfolder:
    """A configured inbox at run time: its layout and the jobs it has in processing/."""

    config: FolderConfig
    layout: Layout
    live: dict[str, Job] = field(default_factory=dict)
    paused_until: float = 0.0  # time.monotonic() before which nothing is claimed (its outbox refused)
    # Inputs empty, cut short or unrecognisable, by where they were dropped: their file's stamp then, and
    # when. One may still be written by a writer that paused longer than --settle: it waits, and fails
    # if it is unchanged then.
    unfinished: dict[str, tuple[Stamp | None, float]] = field(default_factory=dict)

    def taken(self) -> set[Path]:
        """Output names reserved by jobs still running, so two inputs never get the same one."""
        return {self.layout.outbox / job.output for job in self.live.values() if job.output}

    def output_name(self, drop: Drop) -> str:
        """The output's place in the outbox: the input's name (in its preset sub-folder), free now."""
        suffix = output_suffix(drop.path, self.config.format)
        folder = self.layout.outbox / drop.rel.parent
        target = free_name(folder, drop.path.stem + suffix, self.taken())
        return target.relative_to(self.layout.outbox).as_posix()

    def claim(self, drop: Drop) -> Job | None:
        """Take a dropped file for the preset of its folder; a refused one is taken to be failed."""
        preset = drop.folder or self.config.preset
        problem = drop.problem or (None if preset else
                                   "no preset for the top of this inbox: drop it into inbox/<preset>/")
        job = claim(self.layout, drop, preset, None if problem else self.output_name(drop), problem)
        if job is not None:
            self.live[job.id] = job
        return job


def disk_error(error: OSError) -> str:
    """An OSError for the log: what went wrong, and where."""
    where = f" ('{error.filename}')" if error.filename else ""
    return f"{error.strerror or error}{where}"


def is_transient(error: BaseException) -> bool:
    """Out of memory, on the GPU or the host: worth another try at a smaller size."""
    return isinstance(error, (torch.cuda.OutOfMemoryError, MemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def smaller_size(request: StyleRequest, failure: Exception) -> int:
    """The long side to retry an out-of-memory failure at: the size a refusal named as fitting, else
    SHRINK times the size that failed (a failure mid-run does not say what would have fitted)."""
    if isinstance(failure, NotEnoughMemory) and failure.long_side is not None:
        return failure.long_side
    height, width = request.content.shape[:2]
    return max(MIN_SIDE, round(output_long_side(width, height, request.options.size) * SHRINK))


def stylize_together(requests: Sequence[StyleRequest],
                     progress: ProgressCallback) -> Sequence[Result | Exception]:
    """One batch's results or failures; a batch out of memory runs again image by image at full size
    (only the batch was too large), leaving a single image's failure to the caller's smaller retry."""
    try:
        return stylize_batch(requests, progress)
    except Cancelled:
        raise
    except Exception as error:  # the caller sorts failures into retries and failed/
        if len(requests) == 1 or not is_transient(error):
            return [error] * len(requests)
    return [outcome for request in requests for outcome in stylize_together([request], progress)]


def stylize_group(requests: Sequence[StyleRequest],
                  progress: ProgressCallback) -> Iterator[Result | Exception]:
    """Style requests that share a preset and options, yielding each result (or failure) in order.

    On a GPU, images of the same size are optimised together in one batch (stylize_batch); on a CPU
    batching gains nothing, so each image runs alone. Style targets are shared either way, through the
    engine's warm caches keyed by the preset.
    """
    options = requests[0].options
    on_gpu = pick_runtime(options.device, options.precision).device.type == "cuda"
    batches: list[list[int]] = []
    for index, request in enumerate(requests):
        batch = next((b for b in batches if on_gpu
                      and requests[b[0]].content.shape == request.content.shape), None)
        if batch is None:
            batches.append([index])
        else:
            batch.append(index)
    outcomes: dict[int, Result | Exception] = {}
    ready = 0
    for batch in batches:
        results = stylize_together([requests[i] for i in batch], progress)
        outcomes.update(zip(batch, results, strict=True))
        while ready in outcomes:  # hand results back in request order as soon as they exist
            yield outcomes.pop(ready)
            ready += 1


class Engine(Protocol):
    """Where groups of requests are styled: LocalEngine or RayEngine, chosen once by open_engine."""

    where: str  # for the log: "in this process", "on 2 Ray worker(s) on 1 node(s)"

    def warm_up(self, request: StyleRequest) -> tuple[str, ...]:
        """Load the network with a tiny run of the request, so a bad setup fails at start; its warnings."""

    def stylize_group(self, requests: Sequence[StyleRequest], progress: ProgressCallback,
                      heartbeat: Callable[[], None]) -> Iterator[Result | Exception]:
        """One Result or exception per request, in order; progress or heartbeat may raise Cancelled."""


class LocalEngine:
    """This process: the engine's caches keep the network and style targets warm between groups."""

    where = "in this process"

    def warm_up(self, request: StyleRequest) -> tuple[str, ...]:
        """A one-step run on a small grey image."""
        return stylize(warm_up_request(request)).warnings

    def stylize_group(self, requests: Sequence[StyleRequest], progress: ProgressCallback,
                      heartbeat: Callable[[], None]) -> Iterator[Result | Exception]:
        """The local stylize_group, which calls progress at every loss evaluation."""
        return stylize_group(requests, progress)


class RayEngine:
    """A Ray pool's actors, the same pool as `stylekit batch --engine ray`."""

    def __init__(self, pool: ray_engine.Pool) -> None:
        self.pool = pool
        hosts = {worker.rpartition(":")[0] for worker in pool.workers}
        self.where = f"on {len(pool.actors)} Ray worker(s) on {len(hosts)} node(s)"

    def warm_up(self, request: StyleRequest) -> tuple[str, ...]:
        """A one-step run on every actor."""
        return ray_engine.warm_up(self.pool, request)

    def stylize_group(self, requests: Sequence[StyleRequest], progress: ProgressCallback,
                      heartbeat: Callable[[], None]) -> Iterator[Result | Exception]:
        """The requests spread over the pool; heartbeat is called every second while waiting."""
        return ray_engine.stylize_group(self.pool, requests, heartbeat)


@contextmanager
def open_engine(config: WatchConfig) -> Iterator[Engine]:
    """The engine for the whole watch: this process, or a Ray pool whose actors end with the block."""
    if config.engine == "ray":
        with ray_engine.open_pool(config.ray_address, config.gpus_per_task) as pool:
            yield RayEngine(pool)
    else:
        yield LocalEngine()


def warm_up(folder: FolderConfig, engine: Engine) -> tuple[str, ...]:
    """Load the preset (if the inbox has one for its top), weights and network once before watching,
    so a bad setup fails at start (and what it warns about, e.g. random weights for lack of
    ImageNet's, is said before any image)."""
    blank = np.full((32, 32, 3), 0.5, dtype=np.float32)
    if folder.preset is None:  # presets by sub-folder: the folder's options on a blank style
        options = StyleOptions().replace(**folder.overrides)
        return engine.warm_up(StyleRequest(blank, [blank], options))
    return engine.warm_up(preset_request(get_preset(folder.preset), blank, dict(folder.overrides)))


class Worker:
    """Runs groups of claimed jobs to their end: published and done, failed with a reason, or handed back."""

    def __init__(self, log: EventLog, stopping: Stopping, retries: int,
                 heartbeat: Callable[[], None], engine: Engine, pause: float) -> None:
        self.log = log
        self.stopping = stopping
        self.retries = retries
        self.pause = pause  # seconds an inbox waits after its outbox refused an output
        self.heartbeat = heartbeat
        self.engine = engine
        self.current: str | None = None
        self._logged = 0.0
        self._warned: set[str] = set()

    def warn(self, message: str, job: Job | None = None) -> None:
        """Log a run's warning the first time it comes up (random weights would repeat per image)."""
        if message not in self._warned:
            self._warned.add(message)
            self.log("warning", f"{job.name}: {message}" if job else message,
                     **({"file": job.source} if job else {}))

    def run(self, hot: Hotfolder, jobs: list[Job]) -> None:
        """Style jobs of one preset; on shutdown, hand back every one not finished yet."""
        try:
            self._run(hot, jobs)
        except (Cancelled, KeyboardInterrupt):  # a stop, or a second Ctrl-C while the engine worked
            self.hand_back(hot, jobs)
        except OutboxRefused as refusal:  # failing them would empty the inbox into failed/: they wait
            hot.paused_until = time.monotonic() + self.pause
            self.hand_back(hot, jobs, f"{refusal}; trying again in {self.pause:g} s")
        except OSError as error:  # the disk refused a step before any image was loaded (a folder
            for job in jobs:      # removed, a permission): they fail, the watcher goes on
                if job.id in hot.live:
                    self.fail(hot, job, f"cannot handle it: {disk_error(error)}")
        finally:
            self.current = None

    def hand_back(self, hot: Hotfolder, jobs: list[Job], reason: str | None = None) -> None:
        """Put every job not finished yet back into the inbox (on shutdown, or saying why)."""
        for job in jobs:
            if job.id in hot.live:
                try:
                    where = hand_back(hot.layout, hot.live.pop(job.id))
                except OSError as error:
                    self._stuck(job, f"cannot hand it back: {disk_error(error)}")
                    continue
                why = f": {reason}" if reason else ""
                self.log("back", f"{job.source} handed back as {where.relative_to(hot.layout.inbox)}{why}",
                         file=job.source, moved_to=str(where), **({"error": reason} if reason else {}))

    def fail(self, hot: Hotfolder, job: Job, reason: str) -> None:
        """Move a job's input to failed/ with its reason."""
        hot.live.pop(job.id, None)
        try:
            where = finish(hot.layout, job, reason)
        except OSError as error:
            self._stuck(job, f"{reason}; cannot move it: {disk_error(error)}")
            return
        self.log("failed", f"{job.source}: {reason} (moved to {where.relative_to(hot.layout.inbox)})",
                 file=job.source, preset=job.preset, error=reason, moved_to=str(where), attempts=job.attempts)

    def _stuck(self, job: Job, reason: str) -> None:
        """Log an input that must stay in processing/ with its job record: the next start settles it."""
        self.log("failed", f"{job.source}: {reason} (left in processing/ for the next start)",
                 file=job.source, preset=job.preset, error=reason, attempts=job.attempts)

    def _run(self, hot: Hotfolder, jobs: list[Job]) -> None:
        """Count the attempt, load every image, then style them as one group.

        A job styled alone has its attempt recorded first, so a crash counts against it. A group's
        attempts are recorded only with each outcome: a crash mid-group, whichever image caused it,
        counts against none of them, and the restart runs each alone (see Watcher._recover).
        """
        for job in jobs:
            job.attempts += 1
            if len(jobs) == 1:
                save(hot.layout, job)
        try:
            preset = get_preset(str(jobs[0].preset))
        except StylekitError as error:
            for job in jobs:
                self.fail(hot, job, str(error))
            return
        work: list[tuple[Job, LoadedImage, StyleRequest]] = []
        for job in jobs:
            try:
                picture = self._load(hot, job)
                work.append((job, picture, self._request(preset, hot, job, picture)))
            except IncompleteImage as error:
                self._unfinished(hot, job, str(error))
            except StylekitError as error:
                self.fail(hot, job, str(error))
            except OSError as error:
                self.fail(hot, job, f"cannot read it: {disk_error(error)}")
        outcomes = self._stylize([request for _, _, request in work])
        for job, picture, request in work:
            self.current = job.source
            self.log("start", f"{job.source} with preset {preset.name}", file=job.source,
                     preset=preset.name)
            try:
                self._conclude(hot, preset, job, picture, request, next(outcomes))
            except OSError as error:  # e.g. done/ cannot be made: this image fails, the others go on
                self.fail(hot, job, f"cannot finish it: {disk_error(error)}")

    def _load(self, hot: Hotfolder, job: Job) -> LoadedImage:
        """Decode the claimed input, refusing anything but a regular file (it may have been swapped)."""
        path = claimed_path(hot.layout, job)
        if not stat.S_ISREG(os.lstat(path).st_mode):
            raise StylekitError("not a regular file (symlinks are not accepted)")
        picture = load_image(path, name=job.name)
        hot.unfinished.pop(job.source, None)
        return picture

    def _unfinished(self, hot: Hotfolder, job: Job, reason: str) -> None:
        """Fail an input that is empty, cut short or unrecognisable, unless this is news: a writer that
        paused longer than --settle leaves such a file, so it goes back to wait in the inbox, and fails
        only once it failed again unchanged (the watcher holds it back for `rescan` seconds meanwhile)."""
        now = stamp(claimed_path(hot.layout, job))
        before = hot.unfinished.pop(job.source, None)
        if before is not None and before[0] == now:
            self.fail(hot, job, reason)
            return
        hot.unfinished[job.source] = (now, time.monotonic())
        self.hand_back(hot, [job], f"{reason}; it waits {self.pause:g} s in case it is still being written, "
                                   "and fails if it is unchanged then")

    def _request(self, preset: Preset, hot: Hotfolder, job: Job, picture: LoadedImage) -> StyleRequest:
        """The preset's request with the folder's options, at the smaller size of an out-of-memory retry."""
        request = preset_request(preset, picture.rgb, dict(hot.config.overrides))
        if job.size is None:
            return request
        return dataclasses.replace(request, options=request.options.replace(size=job.size))

    def _conclude(self, hot: Hotfolder, preset: Preset, job: Job, picture: LoadedImage,
                  request: StyleRequest, outcome: Result | Exception) -> None:
        """Publish a result, retry out-of-memory at a smaller size while attempts last, else fail."""
        while is_transient(outcome) and job.attempts <= self.retries:
            job.size = smaller_size(request, outcome)
            job.attempts += 1
            save(hot.layout, job)
            request = self._request(preset, hot, job, picture)
            self.log("retry", f"{job.name}: out of memory, trying again at size {request.options.size}",
                     file=job.source, size=request.options.size, attempts=job.attempts)
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            outcome = next(self._stylize([request]))
        if isinstance(outcome, Result):
            self._deliver(hot, preset, job, picture, outcome)
        elif is_transient(outcome):
            size = request.options.size or "full"
            why = f": {outcome}" if isinstance(outcome, StylekitError) else ""  # a refusal says what fits
            self.fail(hot, job, f"out of memory after {job.tried}, the last at size {size}{why}")
        else:
            self.fail(hot, job, failure_reason(outcome))

    def _deliver(self, hot: Hotfolder, preset: Preset, job: Job, picture: LoadedImage,
                 result: Result) -> None:
        """Save under a hidden name, publish into the outbox without replacing anything, then done/."""
        temp = output_temp(hot.layout, job)
        metadata = {"software": f"stylekit {__version__}", "content": job.name, "preset": preset.name,
                    "styles": [p.name for p in preset.style_paths], "job": job.id, **result.report()}
        try:
            temp.parent.mkdir(parents=True, exist_ok=True)
            save_image(temp, result.image, picture.alpha, metadata=metadata, quality=hot.config.quality,
                       source_metadata=picture.source_metadata)
            output = publish(hot.layout, job, hot.taken())
        except (StylekitError, OSError) as error:
            temp.unlink(missing_ok=True)
            if refusal := disk_refusal(error):
                raise OutboxRefused(f"cannot write into the output folder '{hot.layout.outbox}': "
                                    f"{refusal.strerror or refusal}") from None
            self.fail(hot, job, str(error) if isinstance(error, StylekitError)
                      else f"cannot write the output: {error.strerror or error}")
            return
        flattened = picture.alpha is not None and output_format(temp) == "JPEG"
        for message in result.warnings + ((JPEG_ALPHA_WARNING,) if flattened else ()):
            self.warn(message, job)
        where = finish(hot.layout, hot.live.pop(job.id))
        self.log("done", f"{job.source} → {output} ({result.width}×{result.height}, "
                         f"{result.iterations} it, {result.seconds:.1f} s on {result.device})",
                 file=job.source, preset=preset.name, output=str(output), moved_to=str(where),
                 **{k: v for k, v in result.report().items() if k != "options"})

    def _stylize(self, requests: Sequence[StyleRequest]) -> Iterator[Result | Exception]:
        """The requests through the engine, stopping on shutdown (at once on a second Ctrl-C)."""
        outcomes = self.engine.stylize_group(requests, self._progress, self._tick)
        while True:
            with self.stopping.abortable():
                outcome = next(outcomes, None)
            if outcome is None:
                return
            yield outcome

    def _tick(self) -> None:
        """Stop on shutdown (the jobs are handed back); refresh the status file now and then."""
        with self.stopping.abortable(False):  # a status file is never cut short
            if self.stopping.event.is_set():
                raise Cancelled
            self.heartbeat()

    def _progress(self, progress: Progress) -> None:
        """Stop at the next loss evaluation on shutdown; log and refresh the status file now and then."""
        with self.stopping.abortable(False):  # nor is a log line
            self._tick()
            now = time.monotonic()
            if progress.stage == "optimise" and now - self._logged >= PROGRESS_EVERY_S:
                self._logged = now
                self.log("progress", f"{self.current}: {progress.fraction:.0%} (scale {progress.scale}/"
                                     f"{progress.scales}, {progress.width}×{progress.height})",
                         file=self.current, fraction=round(progress.fraction, 4))
