"""`stylekit serve`: a FastAPI app over a job queue whose one worker thread owns the device.

Clients upload pixels and name a preset (or upload a style image); the server never opens a path a
client names, and its weights and device are fixed when it starts.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import hashlib
import hmac
import json
import logging
import socket
import threading
import time
import typing
import uuid
from contextlib import asynccontextmanager, contextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Annotated

import numpy as np
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    File,
    Form,
    HTTPException,
    Request,
    Response,
    Security,
    UploadFile,
)
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, create_model
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import __version__
from .engine import output_long_side, pick_runtime, scale_sizes, stylize
from .errors import Cancelled, StylekitError
from .image import LoadedImage, encode_png, load_image
from .presets import get_preset, list_presets, preset_request
from .progress import progress_event
from .request import (
    MIN_SIDE,
    STYLE_SCALES,
    WARM_UP_SIDE,
    Progress,
    Result,
    StyleOptions,
    StyleRequest,
    check_request,
    warm_up_request,
)

log = logging.getLogger("stylekit.server")

SERVER_OWNED = ("weights", "device", "backbone")  # fixed by `stylekit serve` for every job
Status = typing.Literal["queued", "running", "done", "failed", "cancelled"]
FINISHED = ("done", "failed", "cancelled")
KEEP_FINISHED = 64  # finished jobs (and their PNGs) kept for clients to fetch; older ones are dropped
JOB_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
_OPTION_BOUNDS = {  # keep one job's compute finite; the CLI's own ranges where it has them
    "size": Field(None, ge=MIN_SIDE), "steps": Field(None, ge=1, le=100_000),
    "scales": Field(None, ge=1, le=8), "style_scale": Field(None, ge=STYLE_SCALES[0], le=STYLE_SCALES[1]),
    "min_scale": Field(None, ge=16, le=4096)}


@dataclass(frozen=True)
class ServerSettings:
    """What `stylekit serve` fixes for every job: network, weights, device, limits and the optional token."""

    weights: str = "auto"
    device: str = "auto"
    backbone: str = "vgg19"
    max_upload_bytes: int = 25 * 2**20
    max_pixels: int = 16_000_000
    max_queue: int = 8
    token: str | None = None
    upload_idle_seconds: float = 30.0  # an upload sending nothing this long is refused: it held a place


class JobParams(BaseModel):
    """The `params` JSON of a job: what to apply, plus engine options by StyleOptions name."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)
    id: str | None = Field(None, pattern=JOB_ID_PATTERN,
                           description="Client-chosen id: resubmitting the same job returns it.")
    preset: str | None = Field(None, description="Preset name from GET /v1/presets.")
    strength: float = Field(1.0, gt=0, le=1000, description="Multiplies the style weight.")
    abandon_after: float | None = Field(
        None, gt=0, le=86_400, description="Cancel when no client asks about the job for this long (s).")


_HINTS = typing.get_type_hints(StyleOptions)
CLIENT_OPTIONS = tuple(name for name in _HINTS if name not in SERVER_OWNED)
PARAMS_HELP = ("JSON object: `preset` (or upload `style`), optional `id`, `strength`, `abandon_after` "
               f"and engine options: {', '.join(CLIENT_OPTIONS)}.")


def _from_json(hint: object) -> object:
    """The field type a JSON value can validate as: JSON has lists where StyleOptions has tuples, and
    strict mode would refuse every list."""
    if not any(typing.get_origin(member) is tuple for member in typing.get_args(hint)):
        return hint
    return typing.Annotated[hint, BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)]


_Params = create_model("_Params", __base__=JobParams,
                       **{name: (_from_json(_HINTS[name]), _OPTION_BOUNDS.get(name))
                          for name in CLIENT_OPTIONS})


class JobView(BaseModel):
    """A job as clients see it."""

    id: str
    status: Status
    progress: float = Field(description="Share of the work done, 0–1.")
    message: str
    preset: str | None
    created: float = Field(description="Unix time of submission.")
    event: dict[str, object] | None = Field(None, description="Latest progress event (as `--progress json`).")
    report: dict[str, object] | None = Field(None, description="Run report once done.")


class Health(BaseModel):
    """Server state for clients that wait for it to come up."""

    status: str
    version: str
    device: str
    weights: str
    queued: int
    arriving: int  # uploads being received, each holding a place in the queue
    running: str | None
    max_upload_bytes: int
    max_pixels: int
    max_queue: int


class PresetView(BaseModel):
    """A preset as clients see it (style file names only, never server paths)."""

    name: str
    title: str
    builtin: bool
    styles: list[str]
    options: dict[str, object]


@dataclass(eq=False)
class Job:
    """One submission, from queue to PNG; mutable fields change only under JobQueue's lock."""

    id: str
    fingerprint: str
    request: StyleRequest | None
    alpha: np.ndarray | None
    preset: str | None
    abandon_after: float | None
    bits: int = 8  # bits per channel of the upload: a 16-bit one gets a 16-bit result
    warnings: tuple[str, ...] = ()  # what decoding the uploads said (only the first frame used, …)
    created: float = field(default_factory=time.time)
    seen: float = field(default_factory=time.monotonic)
    status: str = "queued"
    progress: float = 0.0
    message: str = "waiting for the worker"
    event: dict[str, object] | None = None
    report: dict[str, object] | None = None
    png: bytes | None = None
    cancel: threading.Event = field(default_factory=threading.Event)

    def abandoned(self) -> bool:
        """True when the client asked to cancel the job once nobody polls it any more."""
        return self.abandon_after is not None and time.monotonic() - self.seen > self.abandon_after

    def view(self) -> JobView:
        """The client's view of this job."""
        return JobView(id=self.id, status=self.status, progress=round(self.progress, 4),
                       message=self.message, preset=self.preset, created=self.created,
                       event=self.event, report=self.report)


class ApiError(Exception):
    """An answer other than 2xx with a one-line message (mapped to {"detail": message})."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class JobQueue:
    """Jobs by id plus a FIFO of queued ones, run one at a time by a single worker thread."""

    def __init__(self, settings: ServerSettings) -> None:
        self.settings = settings
        self._jobs: dict[str, Job] = {}
        self._pending: collections.deque[Job] = collections.deque()
        self._running: Job | None = None
        self._admitting = 0  # uploads being read and decoded, each holding a place in the queue
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the worker thread (again after stop(): an app's lifespan may run more than once)."""
        with self._cond:
            self._stopping = False
        self._thread = threading.Thread(target=self._work, name="stylekit-worker", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel what runs and let the worker end (queued jobs stay queued for a restart)."""
        with self._cond:
            self._stopping = True
            if self._running:
                self._running.cancel.set()
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def counts(self) -> tuple[int, int, str | None]:
        """(queued jobs, uploads on their way in, id of the running job) for the health answer."""
        with self._cond:
            return len(self._pending), self._admitting, self._running.id if self._running else None

    def check_room(self, also: int = 0) -> None:
        """Refuse a new job (429) while the queue is full (counting `also` uploads on their way in)."""
        with self._cond:
            if len(self._pending) + also >= self.settings.max_queue:
                raise ApiError(429, f"the queue is full ({len(self._pending)} jobs waiting"
                                    f"{f', {also} on their way in' if also else ''}); try again later")

    @contextmanager
    def admitting(self) -> typing.Iterator[None]:
        """Hold a place in the queue while an upload is read, decoded and queued (429 when there is
        none), so that uploads arriving together are refused before they are read, not after."""
        with self._cond:
            self.check_room(also=self._admitting)
            self._admitting += 1
        try:
            yield
        finally:
            with self._cond:
                self._admitting -= 1

    def submit(self, job: Job) -> tuple[JobView, bool]:
        """Queue a job; an id already known returns that job (created=False) if it is the same job."""
        with self._cond:
            known = self._jobs.get(job.id)
            if known is not None:
                if known.fingerprint != job.fingerprint:
                    raise ApiError(409, f"job id '{job.id}' is already used by a different job")
                known.seen = time.monotonic()
                return known.view(), False
            self.check_room()
            self._jobs[job.id] = job
            self._pending.append(job)
            self._cond.notify_all()
            return job.view(), True

    def view(self, job_id: str) -> JobView:
        """A job's state; asking counts as the client still being there (see abandon_after)."""
        with self._cond:
            job = self._find(job_id)
            job.seen = time.monotonic()
            return job.view()

    def png(self, job_id: str) -> bytes:
        """A finished job's PNG, or a 409 saying why there is none."""
        with self._cond:
            job = self._find(job_id)
            job.seen = time.monotonic()
            if job.status != "done" or job.png is None:
                raise ApiError(409, f"job '{job_id}' is {job.status} ({job.message}); no result")
            return job.png

    def delete(self, job_id: str) -> JobView:
        """Cancel a queued or running job; a finished one is forgotten together with its result."""
        with self._cond:
            job = self._find(job_id)
            if job.status == "queued":
                self._pending.remove(job)
                self._finish(job, "cancelled", "cancelled before it started")
            elif job.status == "running":
                job.cancel.set()
                job.message = "cancelling"
            else:
                del self._jobs[job_id]
            return job.view()

    def _find(self, job_id: str) -> Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise ApiError(404, f"no job '{job_id}' (unknown here: finished jobs are kept for a while, "
                                "and a restarted server knows none)")
        return job

    def _next(self) -> Job | None:
        """Wait for the next job that is still wanted; None when stopping."""
        with self._cond:
            while True:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return None
                job = self._pending.popleft()
                if job.abandoned():
                    self._finish(job, "cancelled", "cancelled: no client asked about it any more")
                    continue
                job.status, job.message, self._running = "running", "starting", job
                return job

    def _work(self) -> None:
        """The worker thread: run jobs one after another until stopped."""
        while (job := self._next()) is not None:
            status, message, png, report = self._execute(job)
            with self._cond:
                self._running = None
                job.png, job.report = png, report
                self._finish(job, status, message)

    def _execute(self, job: Job) -> tuple[str, str, bytes | None, dict[str, object] | None]:
        """Run one job outside the lock; returns (status, message, png, report)."""
        def on_progress(progress: Progress) -> None:
            with self._cond:
                job.progress, job.event = progress.fraction, progress_event(progress)
                job.message = (f"scale {progress.scale}/{progress.scales}, "
                               f"step {progress.iteration}/{progress.total}")
            if job.cancel.is_set() or job.abandoned():
                raise Cancelled

        assert job.request is not None
        try:
            result = stylize(job.request, on_progress)
            report = {**result.report(), "warnings": [*job.warnings, *result.warnings]}
            png = encode_png(result.image, job.alpha, metadata=_metadata(job, report), bits=job.bits)
        except Cancelled:
            reason = "" if job.cancel.is_set() else ": no client asked about it any more"
            return "cancelled", f"cancelled{reason}", None, None
        except StylekitError as exc:
            return "failed", str(exc), None, None
        except Exception as exc:  # a job must never take the worker down with it
            log.exception("job %s failed", job.id)
            return "failed", f"internal error: {type(exc).__name__}: {exc}", None, None
        return "done", f"done in {result.seconds:.1f} s", png, report

    def _finish(self, job: Job, status: str, message: str) -> None:
        """Record a final state, free the inputs, and drop the oldest finished jobs over the limit."""
        job.status, job.message, job.request, job.alpha = status, message, None, None
        if status == "done":
            job.progress = 1.0
        finished = [j for j in self._jobs.values() if j.status in FINISHED]
        for old in finished[:max(0, len(finished) - KEEP_FINISHED)]:
            del self._jobs[old.id]


def _metadata(job: Job, report: dict[str, object]) -> dict[str, object]:
    """What the result PNG records about how it was made."""
    return {"software": f"stylekit {__version__}", "job": job.id, "preset": job.preset, **report}


def parse_params(text: str) -> _Params:
    """Validate the `params` JSON into known fields, with a one-line message for the first problem."""
    try:
        raw = json.loads(text or "{}")
    except (ValueError, RecursionError) as exc:
        raise ApiError(422, f"params is not valid JSON ({exc})") from None
    if isinstance(raw, dict):
        for name in SERVER_OWNED:
            if name in raw:
                raise ApiError(422, f"'{name}' is fixed when the server starts "
                                    f"(stylekit serve --{name}), not per job")
    try:
        return _Params.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"])
        if error["type"] == "extra_forbidden":
            raise ApiError(422, f"unknown parameter '{where}' (known: id, preset, strength, "
                                f"abandon_after, {', '.join(CLIENT_OPTIONS)})") from None
        raise ApiError(422, f"bad parameter{' ' + repr(where) if where else 's'}: {error['msg']}") \
            from None


def build_request(params: _Params, content: np.ndarray, style: np.ndarray | None,
                  settings: ServerSettings) -> StyleRequest:
    """Turn validated params and decoded pixels into the engine's request, with the server's weights."""
    overrides = {name: getattr(params, name) for name in params.model_fields_set
                 if name in CLIENT_OPTIONS}
    if (params.preset is None) == (style is None):
        raise ApiError(422, "give either a preset name in params or a style image, not both or neither")
    if params.preset is not None:
        try:
            request = preset_request(get_preset(params.preset), content, overrides)
        except StylekitError as exc:
            raise ApiError(422, str(exc)) from None
    else:
        assert style is not None
        request = StyleRequest(content=content, styles=[style], options=StyleOptions().replace(**overrides))
    options = request.options.replace(weights=settings.weights, device=settings.device,  # a preset's too
                                      backbone=settings.backbone,
                                      style_weight=request.options.style_weight * params.strength)
    height, width = content.shape[:2]
    long_side = output_long_side(width, height, options.size)
    try:
        check_request(replace(request, options=options))  # all the engine would refuse, refused now
        pick_runtime(options.device, options.precision)  # e.g. fp16 on a server without a GPU
        scale_sizes(width, height, long_side, options.scales, options.min_scale, options.steps)  # too small?
    except StylekitError as exc:
        raise ApiError(422, str(exc)) from None
    ratio = long_side / max(width, height)
    if round(width * ratio) * round(height * ratio) > settings.max_pixels:
        raise ApiError(422, f"size {long_side} would make a {round(width * ratio)}×{round(height * ratio)} "
                            f"image, over the server's limit of {settings.max_pixels:,} pixels")
    return replace(request, options=options)


def _decode(data: bytes, what: str, settings: ServerSettings) -> LoadedImage:
    """Decode an uploaded image within the pixel limit; every failure is a 422 naming the upload."""
    try:
        return load_image(data, max_pixels=settings.max_pixels, name=what)
    except StylekitError as exc:
        raise ApiError(422, str(exc)) from None


def _fingerprint(*parts: bytes) -> str:
    """Identify a submission so a retry with the same id can be told from a different job."""
    digest = hashlib.sha256()
    for part in parts:
        digest.update(len(part).to_bytes(8, "little") + part)
    return digest.hexdigest()


def _too_large(settings: ServerSettings) -> HTTPException:
    """The 413 answer (an HTTPException, which FastAPI passes through its body parsing untouched)."""
    limit = settings.max_upload_bytes / 2**20
    return HTTPException(413, f"upload is over the server's limit of {round(limit, 2):g} MB "
                              "(stylekit serve --max-upload-mb)")


REFUSED_BODY_TIMES, REFUSED_BODY_AT_LEAST = 4, 64 * 2**20  # how much of a refused body is read and dropped


class _Stalled(Exception):
    """The client stopped sending its body: nothing more is read, and the connection is closed."""


@dataclass
class _Body:
    """How much of a request's body has arrived, so an answer given before the end can read the rest."""

    receive: Receive
    pending: bool  # more body to come
    expecting: bool  # the client sends the body only after a "100 Continue"
    idle_seconds: float  # how long the body may pause before the client counts as gone
    received: int = 0
    read_any: bool = False
    stalled: bool = False

    async def next(self) -> Message:
        """Receive the next message, counting its bytes; _Stalled when the body pauses too long (a
        half-open connection would otherwise hold its place in the queue for ever)."""
        try:
            if self.pending:
                message = await asyncio.wait_for(self.receive(), self.idle_seconds)
            else:
                message = await self.receive()
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            self.pending, self.stalled = False, True
            raise _Stalled from None
        self.read_any = True
        self.received += len(message.get("body", b""))
        self.pending = message["type"] == "http.request" and message.get("more_body", False)
        return message


class _BodyLimit:
    """ASGI middleware: refuse request bodies over the upload limit, announced or streamed, and let
    every refusal given before the body is read (413, 401, 429) reach clients that are still sending."""

    def __init__(self, app: ASGIApp, settings: ServerSettings) -> None:
        self.app, self.settings = app, settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.settings.max_upload_bytes
        headers = dict(scope["headers"])
        length = headers.get(b"content-length", b"")
        declared = int(length) if length.isdigit() else None
        body = _Body(receive, pending=bool(declared) or b"transfer-encoding" in headers,
                     expecting=headers.get(b"expect", b"").lower() == b"100-continue",
                     idle_seconds=self.settings.upload_idle_seconds)
        cap = max(REFUSED_BODY_TIMES * limit, REFUSED_BODY_AT_LEAST)

        async def limited_receive() -> Message:
            try:
                message = await body.next()
            except _Stalled:
                raise HTTPException(408, f"the upload stalled: nothing arrived for "
                                         f"{self.settings.upload_idle_seconds:g} s") from None
            if body.received > limit:
                raise _too_large(self.settings)
            return message

        async def answer_then_drain(message: Message) -> None:
            if message["type"] == "http.response.start" and (body.pending or body.stalled):
                message = {**message, "headers": [*message.get("headers", []), (b"connection", b"close")]}
            if message["type"] != "http.response.body" or message.get("more_body") or not body.pending:
                await send(message)
                return
            # Ended after the body is dropped: uvicorn reads none after an end; unread bytes reset senders.
            await send({**message, "more_body": True})
            if not (body.expecting and not body.read_any) and (declared or 0) <= cap:
                with suppress(_Stalled):
                    while body.pending and body.received <= cap:
                        await body.next()
            await send({"type": "http.response.body", "body": b""})

        if declared is not None and declared > limit:  # refused unread, but a stranger learns no limits
            given = headers.get(b"authorization", b"").decode("latin-1")
            error = _token_refusal(given, self.settings.token) or _too_large(self.settings)
            await JSONResponse({"detail": error.detail}, error.status_code, error.headers)(
                scope, receive, answer_then_drain)
            return
        await self.app(scope, limited_receive, answer_then_drain)


def _token_refusal(authorization: str, token: str | None) -> HTTPException | None:
    """The 401 for a missing or wrong bearer token when the server has one; None when it may pass."""
    if token is None:
        return None
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode()):
        return None
    return HTTPException(401, "missing or wrong bearer token (Authorization: Bearer <the server's token "
                              "file>)", headers={"WWW-Authenticate": "Bearer"})


_BEARER = HTTPBearer(auto_error=False)


class _EarlyRoute(APIRoute):
    """A /v1 route whose refusals that need no body come before FastAPI reads it: dependencies run
    only after a whole upload is parsed, so a refused client could make the server buffer one."""

    def get_route_handler(self) -> typing.Callable[[Request], typing.Awaitable[Response]]:
        handler = super().get_route_handler()

        async def checked(request: Request) -> Response:
            async with self.admitted(request):
                return await handler(request)

        return checked

    @asynccontextmanager
    async def admitted(self, request: Request) -> typing.AsyncIterator[None]:
        """Raise the 401 for a missing or wrong bearer token, when the server has one."""
        if refusal := _token_refusal(request.headers.get("authorization", ""), request.app.state.token):
            raise refusal
        yield


class _SubmitRoute(_EarlyRoute):
    """POST /v1/jobs: a full queue is refused before the upload is read and decoded, so refused
    uploads cost no memory; an admitted one holds its place until it is queued or refused."""

    @asynccontextmanager
    async def admitted(self, request: Request) -> typing.AsyncIterator[None]:
        """The token's 401 first, then the full queue's 429."""
        async with super().admitted(request):
            with request.app.state.jobs.admitting():
                yield


async def _one_of_each(request: Request) -> None:
    """Refuse a form that repeats a field: which of two images, or two params, counts is anyone's guess.
    (FastAPI has parsed the form before any dependency runs; this reads the parsed one.)"""
    form = await request.form()
    for name in ("image", "style", "params"):
        if len(form.getlist(name)) > 1:
            raise ApiError(422, f"the form has {len(form.getlist(name))} '{name}' fields; send one")


_ERRORS = {status: {"description": text, "content": {"application/json": {"example": {"detail": text}}}}
           for status, text in ((400, "malformed multipart body"), (401, "missing or wrong bearer token"),
                                (404, "no such job"),
                                (409, "job id reused, or no result yet"), (413, "upload too large"),
                                (422, "bad parameters or image"), (429, "queue full"))}


def create_app(settings: ServerSettings) -> FastAPI:
    """The FastAPI application; its lifespan starts and stops the worker thread."""
    jobs = JobQueue(settings)
    warm: dict[str, str] = {"device": settings.device, "weights": settings.weights}

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        jobs.start()
        yield
        jobs.stop()

    app = FastAPI(title="stylekit", version=__version__, lifespan=lifespan, docs_url=None,
                  redoc_url=None, description="Neural style transfer jobs for the GIMP plug-in and "
                                              "other local clients.")
    app.state.jobs, app.state.warm = jobs, warm
    app.add_middleware(_BodyLimit, settings=settings)

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, exc.status)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"][1:]) or "request"
        if where == "params" and error["type"] == "string_type":  # sent as a file part
            return JSONResponse({"detail": "params: send it as a text field holding JSON, not a file"}, 422)
        return JSONResponse({"detail": f"{where}: {error['msg']}"}, 422)

    guarded = settings.token is not None  # the schema declares the token only when it is asked for
    app.state.token = settings.token
    api = APIRouter(prefix="/v1", route_class=_EarlyRoute,
                    dependencies=[Security(_BEARER)] if guarded else [],  # declares it in the schema
                    responses={401: _ERRORS[401]} if guarded else {})

    @api.get("/health", response_model=Health)
    def health() -> Health:
        """Whether the server is up, what it runs on, and how busy it is."""
        queued, arriving, running = jobs.counts()
        return Health(status="ok", version=__version__, device=warm["device"], weights=warm["weights"],
                      queued=queued, arriving=arriving, running=running,
                      max_upload_bytes=settings.max_upload_bytes, max_pixels=settings.max_pixels,
                      max_queue=settings.max_queue)

    @api.get("/presets", response_model=list[PresetView])
    def presets() -> list[PresetView]:
        """The presets a job can name, with the options a job of theirs keeps (the server's own left out)."""
        return [PresetView(name=p.name, title=p.title, builtin=p.builtin,
                           styles=[path.name for path in p.style_paths],
                           options=json.loads(json.dumps({name: value for name, value in p.options.items()
                                                          if name not in SERVER_OWNED}, default=str)))
                for p in list_presets()]

    def submit(response: Response,
               image: Annotated[UploadFile, File(description="The picture to stylise.")],
               params: Annotated[str, Form(description=PARAMS_HELP)] = "{}",
               style: Annotated[UploadFile | None, File(description="A style image, not a preset.")] = None,
               ) -> JobView:
        """Queue a job; 202 with its id (200 when the same id and upload were submitted before)."""
        parsed = parse_params(params)
        content_bytes = image.file.read()
        style_bytes = style.file.read() if style is not None else b""
        content = _decode(content_bytes, image.filename or "image", settings)
        style_image = _decode(style_bytes, style.filename or "style", settings) if style else None
        request = build_request(parsed, content.rgb, style_image.rgb if style_image else None, settings)
        job = Job(id=parsed.id or uuid.uuid4().hex, request=request, alpha=content.alpha,
                  preset=parsed.preset, abandon_after=parsed.abandon_after,
                  fingerprint=_fingerprint(content_bytes, style_bytes, params.encode()),
                  bits=content.source_metadata.bits,
                  warnings=content.warnings + (style_image.warnings if style_image else ()))
        view, created = jobs.submit(job)
        if not created:
            response.status_code = 200
        return view

    api.add_api_route("/jobs", submit, methods=["POST"], route_class_override=_SubmitRoute,
                      dependencies=[Depends(_one_of_each)],
                      response_model=JobView, status_code=202,
                      responses={200: {"description": "the same job was submitted before", "model": JobView},
                                 **{s: _ERRORS[s] for s in (400, 409, 413, 422, 429)}})

    @api.get("/jobs/{job_id}", response_model=JobView, responses={404: _ERRORS[404]})
    def job_status(job_id: str) -> JobView:
        """A job's status, progress (0–1) and message."""
        return jobs.view(job_id)

    @api.get("/jobs/{job_id}/result", response_class=Response,
             responses={200: {"content": {"image/png": {}}, "description": "the stylised PNG"},
                        404: _ERRORS[404], 409: _ERRORS[409]})
    def job_result(job_id: str) -> Response:
        """The finished picture as PNG (with the upload's transparency)."""
        return Response(jobs.png(job_id), media_type="image/png")

    @api.delete("/jobs/{job_id}", response_model=JobView, responses={404: _ERRORS[404]})
    def cancel(job_id: str) -> JobView:
        """Cancel a queued or running job (checked every optimiser step); forget a finished one."""
        return jobs.delete(job_id)

    app.include_router(api)
    return app


def listen(host: str, port: int) -> socket.socket:
    """Bind and listen before loading anything, so a busy port fails at once with a clear message."""
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
        # Rebind at once after a restart (a closed port lingers in TIME_WAIT); Windows' SO_REUSEADDR
        # would instead let another process bind the same port and take the requests meant for us.
        exclusive = getattr(socket, "SO_EXCLUSIVEADDRUSE", None)
        sock.setsockopt(socket.SOL_SOCKET, exclusive or socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
    except OSError as exc:
        raise StylekitError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.listen(128)
    return sock


def warm_up(settings: ServerSettings) -> Result:
    """Load the weights and build the network once: the first job starts warm, bad weights fail now.

    It runs on a short-lived thread: torch used on the main thread keeps an OpenMP pool there beside
    the worker thread's, and two pools on a small CPU slow every job (at 128 px on two cores, 0.139
    s per evaluation against 0.111–0.123 s with the warm-up off the main thread).
    """
    grey = np.full((WARM_UP_SIDE, WARM_UP_SIDE, 3), 0.5, dtype=np.float32)
    options = StyleOptions(weights=settings.weights, device=settings.device, backbone=settings.backbone)
    request = warm_up_request(StyleRequest(content=grey, styles=[grey], options=options))
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(stylize, request).result()


def serve(settings: ServerSettings, sock: socket.socket, warm: Result) -> None:
    """Answer HTTP on an already listening socket until interrupted (after warm_up)."""
    import uvicorn

    app = create_app(settings)
    app.state.warm.update(device=warm.device, weights=warm.weights)
    # The multipart parser logs what it made of a malformed body, which the client gets as a 400 anyway.
    logging.getLogger("python_multipart").setLevel(logging.ERROR)
    uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5)).run(sockets=[sock])
