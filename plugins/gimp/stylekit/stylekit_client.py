"""The GIMP plug-in's side of the stylekit server API, in the standard library only.

GIMP runs plug-ins in its own bundled Python, which has neither torch nor numpy: this module speaks
HTTP with urllib, writes PNG with zlib, and starts `stylekit serve` when no server answers.
"""

import array
import contextlib
import http.client
import ipaddress
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
import zlib
from dataclasses import dataclass, field
from urllib.parse import urlsplit

CONFIG_NAME = "stylekit-config.json"  # written beside the plug-in by `stylekit gimp install`
DEFAULT_URL = "http://127.0.0.1:8765"
QUALITY = {  # the dialog's quality choice → engine options (the engine picks the scales for the steps)
    "fast": {"steps": 50},
    "balanced": {"steps": 150},
    "best": {"steps": 300},
}
POLL_SECONDS = 0.25
START_SECONDS = 300  # a first start may download the ImageNet weights
ABANDON_AFTER = 15.0  # the server cancels a job nobody polls for this long (GIMP's cancel kills us)
HTTP_TIMEOUT = 60.0
OUTAGE_SECONDS = 12.0  # how long a job waits for a server that went away (a restart, a network blip);
# under ABANDON_AFTER: a server that stayed up behind a longer blip has given the job up by then
RESTART_AFTER = 10.0  # a local server still down this long is started again (unless it restarts itself)
RESUBMITS = 3  # times a job the server has lost (it restarted) is sent again, with the same id
MIN_SIDE = 16  # the engine's smallest side (VGG pools four times)


def is_loopback(host):
    """True for addresses only this machine can reach: stylekit/loopback.py's rule (no stylekit here)."""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ClientError(Exception):
    """A failure to show the GIMP user as is: one sentence saying what went wrong and what to do."""


@dataclass(frozen=True)
class Config:
    """Where the server is, how to start it, and the bearer token for a server on another machine."""

    url: str = DEFAULT_URL
    command: list = field(default_factory=lambda: ["stylekit", "serve"])
    token: str = ""
    path: str = ""  # the file it came from, for messages


def load_config(folder):
    """Read stylekit-config.json from the plug-in's folder (defaults when there is none)."""
    path = os.path.join(folder, CONFIG_NAME)
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        return Config(path=path)
    except (OSError, ValueError) as exc:
        raise ClientError(f"The plug-in's config file {path} cannot be read ({exc}); "
                          "run `stylekit gimp install` again.") from None
    if not isinstance(data, dict) or not isinstance(data.get("command", []), list):
        raise ClientError(f"The plug-in's config file {path} is not a stylekit config; "
                          "run `stylekit gimp install` again.")
    return Config(url=str(data.get("url") or DEFAULT_URL).rstrip("/"),
                  command=[str(part) for part in data.get("command") or Config().command],
                  token=str(data.get("token") or ""), path=path)


class ServerDown(ClientError):
    """No server answers at the configured URL."""


class NotFound(ClientError):
    """The server answers 404: it does not know the job (it restarted since, or dropped it)."""


class Client:
    """Calls to one stylekit server; every failure becomes a ClientError with advice."""

    def __init__(self, config):
        self.config = config
        # A proxy from the environment must not catch calls to this machine's own server.
        local = is_loopback(urlsplit(config.url).hostname)
        self._open = urllib.request.build_opener(urllib.request.ProxyHandler({}) if local
                                                 else urllib.request.ProxyHandler()).open

    def _call(self, method, path, body=None, content_type=None):
        """One HTTP exchange; returns the body of a 2xx answer."""
        request = urllib.request.Request(self.config.url + path, data=body, method=method)
        if content_type:
            request.add_header("Content-Type", content_type)
        if self.config.token:
            request.add_header("Authorization", "Bearer " + self.config.token)
        try:
            with self._open(request, timeout=HTTP_TIMEOUT) as answer:
                return answer.read()
        except urllib.error.HTTPError as exc:
            raise (NotFound if exc.code == 404 else ClientError)(self._explain(exc)) from None
        # Before HTTPException: a server that stops mid-exchange closes without an answer, and
        # RemoteDisconnected is both; that server is down (and may come back), not broken.
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise ServerDown(f"No stylekit server answers at {self.config.url} ({reason}). Start it with "
                             "`stylekit serve`, or check 'url' in " + (self.config.path or CONFIG_NAME)
                             + ".") from None
        except http.client.HTTPException as exc:  # an answer cut short, or not HTTP at all
            raise ClientError(f"The connection to the stylekit server at {self.config.url} broke "
                              f"({type(exc).__name__}). Try again.") from None

    def _explain(self, error):
        """The server's one-line reason for an HTTP error, with what to do about it."""
        try:
            detail = json.loads(error.read().decode("utf-8"))["detail"]
        except (ValueError, KeyError, TypeError, OSError):
            detail = error.reason
        if error.code == 401:
            return (f"The stylekit server at {self.config.url} wants its bearer token: copy it from the "
                    f"server's token file into 'token' in {self.config.path or CONFIG_NAME}.")
        if error.code == 429:
            return f"The stylekit server is busy ({detail}). Try again in a moment."
        return f"The stylekit server refused the request: {detail}"

    def _json(self, method, path, body=None, content_type=None):
        """One exchange whose answer is JSON."""
        try:
            return json.loads(self._call(method, path, body, content_type).decode("utf-8"))
        except ValueError:  # UnicodeDecodeError too
            raise self._not_stylekit() from None

    def _not_stylekit(self):
        return ClientError(f"What answers at {self.config.url} is not a stylekit server; check 'url' "
                           f"in {self.config.path or CONFIG_NAME}.")

    def health(self):
        """The server's health answer (raises ServerDown when nothing answers); a server without it
        (a 404: another web server on that port) is not stylekit's."""
        try:
            return self._json("GET", "/v1/health")
        except NotFound:
            raise self._not_stylekit() from None

    def presets(self):
        """The presets the server offers: [{name, title, ...}]."""
        return self._json("GET", "/v1/presets")

    def submit(self, image_png, params, style=None):
        """Queue a job; style is (file name, bytes) or None. Resubmitting the same id is safe.

        An upload over the server's limit is refused here, before it is sent: the server would read it
        only to drop it, and one far over the limit it drops unread, a reset connection for urllib."""
        files = [("image", "layer.png", image_png)] + ([("style", style[0], style[1])] if style else [])
        body, content_type = multipart({"params": json.dumps(params)}, files)
        limit = self.health().get("max_upload_bytes", len(body))
        if len(body) > limit:
            raise ClientError(f"The layer at this size{' with the style image' if style else ''} is "
                              f"{len(body) / 2**20:.3g} MB to send, over the stylekit server's upload limit "
                              f"of {limit / 2**20:.3g} MB: lower the size limit"
                              f"{', or use a smaller style image' if style else ''}.")
        return self._json("POST", "/v1/jobs", body, content_type)

    def status(self, job_id):
        """A job's state: status, progress 0–1, message."""
        return self._json("GET", f"/v1/jobs/{job_id}")

    def result(self, job_id):
        """A finished job's PNG bytes."""
        return self._call("GET", f"/v1/jobs/{job_id}/result")

    def forget(self, job_id):
        """Cancel a job, or drop a finished one and its result from the server."""
        self._call("DELETE", f"/v1/jobs/{job_id}")


def ensure_server(client, on_wait=lambda: None):
    """Return once the server answers, starting it with the configured command if it is local.

    Returns the server process it started, or None when one was already running.
    """
    try:
        client.health()
        return None
    except ServerDown:
        if not is_loopback(urlsplit(client.config.url).hostname):
            raise
    process, log_path = start_server(client.config)
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        on_wait()
        try:
            client.health()
            return process
        except ServerDown:
            pass
        if process.poll() is not None:
            raise ClientError("The stylekit server stopped while starting: " + _tail(log_path)
                              + f" (full log: {log_path}).")
        time.sleep(0.5)
    process.terminate()  # given up on: not left running (on another port, it would block the next try)
    raise ClientError(f"The stylekit server did not answer at {client.config.url} within {START_SECONDS} s "
                      f"(does 'command' in {client.config.path or CONFIG_NAME} serve that port?); see "
                      f"{log_path}.")


def start_server(config):
    """Start the configured server command detached from GIMP, logging to a temporary file (one per
    user: a file another user left in a shared /tmp must not stop this one's server)."""
    user = f"-{os.getuid()}" if hasattr(os, "getuid") else ""  # Windows' temporary folder is per user
    log_path = os.path.join(tempfile.gettempdir(), f"stylekit-server{user}.log")
    options = {"creationflags": 0x00000008 | 0x00000200 | 0x08000000} if sys.platform == "win32" \
        else {"start_new_session": True}  # DETACHED_PROCESS | NEW_PROCESS_GROUP | NO_WINDOW
    try:
        log = open(log_path, "wb")  # noqa: SIM115 (its own error message; closed just below)
    except OSError as exc:
        raise ClientError(f"Cannot write the stylekit server's log {log_path} ({exc.strerror or exc}).") \
            from None
    try:
        with log:
            process = subprocess.Popen(config.command, stdin=subprocess.DEVNULL, stdout=log,
                                       stderr=subprocess.STDOUT, **options)
    except OSError as exc:
        raise ClientError(f"Cannot start the stylekit server with {' '.join(config.command)!r} "
                          f"({exc.strerror or exc}). Run `stylekit gimp install` again, or fix "
                          f"'command' in {config.path or CONFIG_NAME}.") from None
    return process, log_path


def _tail(path, lines=3):
    """The last lines of a log, joined on one line."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            text = handle.read().strip().splitlines()
    except OSError:
        return "(no log)"
    return " / ".join(text[-lines:]) or "(empty log)"


def working_size(width, height, max_size, max_pixels=None):
    """The layer's size as the server works on it: long side at most max_size, and within the
    server's pixel limit. The layer is sent at that size, so a photo over either still goes and no
    upload is larger than needed."""
    if min(width, height) < MIN_SIDE:
        raise ClientError(f"The layer is {width}×{height} pixels: Style Transfer needs at least {MIN_SIDE} "
                          "on each side. Use a larger layer.")
    by_size = min(1.0, int(max_size) / max(width, height))
    by_pixels = (max_pixels / (width * height)) ** 0.5 if max_pixels else 1.0
    scale = min(by_size, by_pixels)
    size = max(1, round(width * scale)), max(1, round(height * scale))
    if max_pixels and size[0] * size[1] > max_pixels:  # rounded up past the limit
        size = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    if min(size) < MIN_SIDE:
        enough = math.ceil(MIN_SIDE * max(width, height) / min(width, height))
        needs = (f"a size limit of at least {enough}" if by_size <= by_pixels else
                 f"a stylekit server allowing more than {max_pixels:,} pixels (stylekit serve --max-pixels)")
        raise ClientError(f"The layer is too thin for Style Transfer at {size[0]}×{size[1]} pixels: it needs "
                          f"at least {MIN_SIDE} on each side, so {needs}.")
    return size


def job_params(preset, strength, quality, preserve_colors, width, height):
    """The server params for the plug-in's arguments and the size sent (a fresh id, so retries are
    idempotent). Unticked, "keep colours" leaves a preset's own colour mode alone."""
    if quality not in QUALITY:
        raise ClientError(f"Unknown quality '{quality}': use fast, balanced or best.")
    params = {"id": uuid.uuid4().hex, "strength": float(strength), "abandon_after": ABANDON_AFTER,
              "size": max(width, height), **QUALITY[quality]}
    if preserve_colors:
        params["preserve_color"] = "luminance"
    if preset:
        params["preset"] = preset
    return params


def run_job(client, image_png, params, style, on_progress):
    """Submit, poll until finished (on_progress(fraction, message) each time), return the PNG and
    the run's warnings (e.g. random weights on a server without ImageNet's, which GIMP cannot see).

    A server that goes away is waited for, and one that comes back without the job (it restarted) is
    sent it again: the same id and upload make that safe, and a job still known is not run twice.
    """
    shown = 0.0  # the progress bar stays where it was while the server is away

    def show(fraction, message):
        nonlocal shown
        shown = fraction
        on_progress(fraction, message)

    def patiently(call):
        return _outlast(client, call, lambda: on_progress(shown, "the stylekit server went away; "
                                                                 "waiting for it to come back"))

    for _ in range(1 + RESUBMITS):
        job = patiently(lambda: client.submit(image_png, params, style))
        try:
            return _follow(client, job, show, patiently)
        except NotFound:
            pass
    raise ClientError(f"The stylekit server lost the job {1 + RESUBMITS} times (is it restarting over "
                      "and over?); see its log, then try again.")


def _follow(client, job, on_progress, patiently):
    """Poll a submitted job until it is done; return its PNG and warnings (NotFound: the server lost it)."""
    while True:
        on_progress(job["progress"], job["message"])
        if job["status"] == "done":
            break
        if job["status"] == "failed":
            raise ClientError(f"Style transfer failed on the server: {job['message']}")
        if job["status"] == "cancelled":
            raise ClientError(f"The job was cancelled on the server ({job['message']}).")
        time.sleep(POLL_SECONDS)
        job = patiently(lambda job_id=job["id"]: client.status(job_id))
    png = patiently(lambda: client.result(job["id"]))
    tidy(client, job["id"])
    return png, (job.get("report") or {}).get("warnings", [])


def tidy(client, job_id):
    """Drop a finished job from the server, if it still answers: the result is in hand already, and
    the server forgets finished jobs in time anyway, so a failure here must not cost the user it."""
    with contextlib.suppress(ClientError):
        client.forget(job_id)


def _outlast(client, call, on_wait):
    """call(), waiting up to OUTAGE_SECONDS for a server that went away; a local one still down after
    RESTART_AFTER seconds is started again, as before the job (ensure_server)."""
    down_since = time.monotonic()
    while True:
        try:
            return call()
        except ServerDown:
            down = time.monotonic() - down_since
            if down >= OUTAGE_SECONDS:
                raise
        on_wait()
        if down >= RESTART_AFTER and is_loopback(urlsplit(client.config.url).hostname):
            ensure_server(client, on_wait)
        else:
            time.sleep(POLL_SECONDS)


def multipart(fields, files):
    """Encode form fields and (name, filename, bytes) files as multipart/form-data."""
    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'.encode()
                     + value.encode("utf-8") + b"\r\n")
    for name, filename, data in files:
        safe = "".join(c if c.isalnum() or c in "._- " else "_" for c in filename) or "file"
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; '
                     f'filename="{safe}"\r\nContent-Type: application/octet-stream\r\n\r\n'.encode()
                     + data + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def encode_png(width, height, rgba, bits=8):
    """An RGBA PNG of 8 or 16 bits per channel from packed R'G'B'A samples as GIMP's buffers hold them
    ("R'G'B'A u8" bytes, or "R'G'B'A u16" in this machine's byte order), without Pillow."""
    stride = width * 4 * bits // 8
    if len(rgba) != stride * height:
        raise ValueError(f"expected {stride * height} bytes for {width}×{height} RGBA at {bits} bits, "
                         f"got {len(rgba)}")
    if bits == 16 and sys.byteorder == "little":  # PNG stores 16-bit samples big-endian
        samples = array.array("H", rgba)
        samples.byteswap()
        rgba = samples.tobytes()
    raw = b"".join(b"\x00" + rgba[row * stride:(row + 1) * stride] for row in range(height))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bits, 6, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6))
            + chunk(b"IEND", b""))
