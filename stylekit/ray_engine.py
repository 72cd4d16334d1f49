"""The Ray engine: long-lived actors (one per GPU or CPU slot) with warm networks, fed from one queue.

The driver (this process) reads every input and writes every output; actors only run stylize(), so a
cluster's nodes need stylekit and the weights but not the images' filesystem. A request whose worker
dies is tried again on another actor (the dead one is restarted), at most `Pool.max_attempts` times in
all, then it fails with the reason. Ray is imported only here, and only when asked for.
"""

from __future__ import annotations

import dataclasses
import os
import socket
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Generic, TypeVar

import torch

from .batch import Engine, Item, Outcome, Recipe, conclude, failure_reason, load
from .engine import stylize
from .errors import StylekitError
from .image import LoadedImage
from .request import Result, StyleRequest, warm_up_request

INSTALL_HINT = "--engine ray needs Ray: pip install 'stylekit[ray]'"
MAX_ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5.0
HEARTBEAT_S = 1.0

K = TypeVar("K")


class WorkerLost(StylekitError):
    """Every Ray worker given this request died while styling it."""


def import_ray() -> ModuleType:
    """Ray itself, or the one-line install hint when it is missing."""
    try:
        import ray
    except ImportError:
        raise StylekitError(INSTALL_HINT) from None
    return ray


def _lost_errors(ray: ModuleType) -> tuple[type[BaseException], ...]:
    """Ray's ways of saying a worker (not the image) failed: worth another try elsewhere."""
    errors = ray.exceptions
    return (errors.RayActorError, errors.WorkerCrashedError, errors.NodeDiedError,
            errors.ObjectLostError, errors.OutOfMemoryError)


class StyleWorker:
    """The actor: its process keeps the network (engine caches) and style Grams warm between images."""

    def __init__(self) -> None:
        torch.set_num_threads(1)  # each actor holds one Ray CPU

    def where(self) -> str:
        """host:pid, for logs and failure records."""
        return f"{socket.gethostname()}:{os.getpid()}"

    def stylize(self, request: StyleRequest, styles: list) -> tuple[str, Result | Exception]:
        """Style one request (its styles travel separately, once per batch); failures are returned."""
        try:
            return self.where(), stylize(dataclasses.replace(request, styles=styles))
        except Exception as error:  # the image's failure, reported to the driver like a result
            return self.where(), error


@dataclass
class Pool:
    """Running actors, their host:pid when started, and how often one request may be tried."""

    actors: list[Any]
    workers: list[str]
    max_attempts: int = MAX_ATTEMPTS


def connect(ray: ModuleType, address: str) -> bool:
    """Join the cluster at `address` (auto: the one `ray start` made here); True if this call joined."""
    if ray.is_initialized():
        return False
    if address != "auto":
        host, _, port = address.removeprefix("ray://").rpartition(":")
        try:
            socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                     timeout=CONNECT_TIMEOUT_S).close()
        except (OSError, ValueError) as error:
            reason = "not HOST:PORT" if isinstance(error, ValueError) else error.strerror or error
            raise StylekitError(f"no Ray cluster answers at '{address}' ({reason}); start one with "
                                "`ray start --head` or fix --ray-address") from None
    try:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    except (Exception, SystemExit) as error:  # Ray exits the process when a cluster stops answering
        if address == "auto" and isinstance(error, ConnectionError):
            raise StylekitError("no Ray cluster runs here: start one with `ray start --head`, or give "
                                "--ray-address (or set $RAY_ADDRESS)") from None
        reason = " ".join(str(error).split())[:300] or type(error).__name__
        raise StylekitError(f"cannot join the Ray cluster at '{address}': {reason}") from None
    return True


def _slots(ray: ModuleType, gpus_per_task: float) -> int:
    """How many actors fit the cluster's live nodes: one CPU each, plus gpus_per_task GPUs when > 0."""
    count = 0
    for node in ray.nodes():
        if node.get("Alive"):
            resources = node.get("Resources", {})
            fits = int(resources.get("CPU", 0))
            if gpus_per_task > 0:
                fits = min(fits, int(resources.get("GPU", 0) / gpus_per_task + 1e-9))
            count += fits
    return count


@contextmanager
def open_pool(address: str = "auto", gpus_per_task: float | None = None, most: int | None = None,
              max_attempts: int = MAX_ATTEMPTS) -> Iterator[Pool]:
    """Start one actor per GPU (gpus_per_task each; default 1 when the cluster has GPUs) or per CPU
    slot, at most `most`; they are killed on exit (and Ray left if this call joined it)."""
    ray = import_ray()
    joined = connect(ray, address)
    actors: list[Any] = []
    try:
        if gpus_per_task is None:
            gpus_per_task = 1.0 if ray.cluster_resources().get("GPU", 0) else 0.0
        count = _slots(ray, gpus_per_task)
        if count == 0:
            raise StylekitError(f"the Ray cluster has no node with a CPU"
                                f"{f' and {gpus_per_task:g} GPU' if gpus_per_task else ''} free for a "
                                "worker" + (" (try --gpus-per-task 0)" if gpus_per_task else ""))
        actor_class = ray.remote(StyleWorker).options(num_cpus=1, num_gpus=gpus_per_task,
                                                      max_restarts=-1, max_task_retries=0)
        actors = [actor_class.remote() for _ in range(min(count, most or count))]
        try:
            workers = ray.get([actor.where.remote() for actor in actors])
        except _lost_errors(ray) as error:
            raise StylekitError(f"Ray workers cannot start: {failure_reason(error)}") from None
        yield Pool(actors, workers, max_attempts)
    finally:
        for actor in actors:
            ray.kill(actor)
        if joined:
            ray.shutdown()


def warm_up(pool: Pool, request: StyleRequest) -> tuple[str, ...]:
    """Load the network on every actor with a tiny run of the request; a setup error stops here.
    Returns what the actors warned about (each warning once)."""
    ray = import_ray()
    small = warm_up_request(request)
    styles = ray.put(list(small.styles))
    job = dataclasses.replace(small, styles=())
    try:
        answers = ray.get([actor.stylize.remote(job, styles) for actor in pool.actors])
    except _lost_errors(ray) as error:
        raise StylekitError(f"a Ray worker died while loading the network: {failure_reason(error)}") \
            from None
    for where, value in answers:
        if isinstance(value, Exception):
            raise StylekitError(f"Ray worker {where} cannot style: {failure_reason(value)}")
    return tuple(dict.fromkeys(message for _, value in answers for message in value.warnings))


@dataclass(frozen=True)
class Finished(Generic[K]):
    """One request's end: its key, the Result or the exception, tries made, and who did it."""

    key: K
    value: Result | Exception
    attempts: int
    worker: str


@dataclass
class _Task(Generic[K]):
    key: K
    request: StyleRequest
    tried: set[int] = field(default_factory=set)  # actors (by index) it was lost on
    attempts: int = 0


def stream(pool: Pool, work: Iterable[tuple[K, StyleRequest | Exception]],
           heartbeat: Callable[[], None] | None = None) -> Iterator[Finished[K]]:
    """Run keyed requests on the pool, in completion order, pulling `work` only as actors come free.

    A work item that is already an exception (an unreadable input) is passed straight through.
    `heartbeat`, if given, is called every second while waiting; what it raises stops the stream.
    """
    ray = import_ray()
    lost = _lost_errors(ray)
    source = iter(work)
    idle = list(range(len(pool.actors)))
    retry: list[_Task[K]] = []
    pending: dict[Any, tuple[_Task[K] | None, int]] = {}  # None: probing a worker that died
    shipped: dict[int, tuple[object, Any]] = {}  # id(styles) → (styles kept alive, object ref)
    exhausted = False

    def styles_ref(request: StyleRequest) -> Any:
        kept = shipped.get(id(request.styles))
        if kept is None:
            kept = shipped[id(request.styles)] = (request.styles, ray.put(list(request.styles)))
        return kept[1]

    def next_task(actor: int) -> _Task[K] | Finished[K] | None:
        nonlocal exhausted
        for task in retry:
            if actor not in task.tried or len(task.tried) >= len(pool.actors):
                retry.remove(task)
                return task
        if exhausted:
            return None
        try:
            key, request = next(source)
        except StopIteration:
            exhausted = True
            return None
        if isinstance(request, Exception):
            return Finished(key, request, 1, "")
        return _Task(key, request)

    while True:
        for actor in list(idle):
            while (task := next_task(actor)) is not None and isinstance(task, Finished):
                yield task
            if task is None:
                continue
            task.attempts += 1
            job = dataclasses.replace(task.request, styles=())
            pending[pool.actors[actor].stylize.remote(job, styles_ref(task.request))] = (task, actor)
            idle.remove(actor)
        working = any(task is not None for task, _ in pending.values())
        if not pending or (not working and not retry and exhausted):
            return
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=HEARTBEAT_S if heartbeat else None)
        if not ready:
            assert heartbeat is not None
            heartbeat()
            continue
        task, actor = pending.pop(ready[0])
        if task is None:  # a dead worker's probe: it takes images again once Ray has restarted it
            try:
                ray.get(ready[0])
                idle.append(actor)
            except lost:
                pending[pool.actors[actor].where.remote()] = (None, actor)
            continue
        try:
            worker, value = ray.get(ready[0])
            idle.append(actor)
        except lost as error:
            pending[pool.actors[actor].where.remote()] = (None, actor)
            task.tried.add(actor)
            if task.attempts < pool.max_attempts:
                retry.append(task)
                continue
            worker, value = "", WorkerLost(f"its Ray worker died {task.attempts} times "
                                           f"(last: {failure_reason(error)})")
        yield Finished(task.key, value, task.attempts, worker)


def stylize_group(pool: Pool, requests: Sequence[StyleRequest],
                  heartbeat: Callable[[], None] | None = None) -> Iterator[Result | Exception]:
    """The Ray twin of the hot folder's local stylize_group: a Result or the exception per request,
    in the requests' order, each as soon as it and those before it are done."""
    ready: dict[int, Result | Exception] = {}
    following = 0
    for finished in stream(pool, enumerate(requests), heartbeat):
        ready[finished.key] = finished.value
        while following in ready:
            yield ready.pop(following)
            following += 1


def run_items(pool: Pool, recipe: Recipe, items: Sequence[Item]) -> Iterator[Outcome]:
    """Batch items on the pool: inputs are decoded and outputs written here, as actors come free."""
    pictures: dict[int, LoadedImage] = {}

    def work() -> Iterator[tuple[int, StyleRequest | Exception]]:
        for index, item in enumerate(items):
            try:
                pictures[index], request = load(item, recipe)
            except Exception as error:  # as run_local: one unreadable image must not stop the batch
                yield index, error
                continue
            yield index, request

    for finished in stream(pool, work()):
        yield conclude(items[finished.key], recipe, pictures.pop(finished.key, None), finished.value,
                       finished.attempts, finished.worker)


def engine(address: str = "auto", gpus_per_task: float | None = None,
           on_start: Callable[[Pool], None] = lambda pool: None) -> Engine:
    """A batch Engine on a Ray cluster: a pool sized to the work, warmed with the preset, then fed."""
    import_ray()

    def run(recipe: Recipe, items: Sequence[Item]) -> Iterator[Outcome]:
        with open_pool(address, gpus_per_task, most=len(items)) as pool:
            on_start(pool)
            warm_up(pool, recipe.template)
            yield from run_items(pool, recipe, items)

    return run
