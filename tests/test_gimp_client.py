"""The GIMP plug-in's standard-library client (plugins/gimp/stylekit/stylekit_client.py), real servers."""

import importlib.util
import io
import json
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from conftest import make_painting, make_photo
from PIL import Image

from stylekit.image import load_image
from stylekit.server import ServerSettings, create_app
from stylekit.weights import IMAGENET_URLS

CLIENT_FILE = Path(__file__).parents[1] / "plugins" / "gimp" / "stylekit" / "stylekit_client.py"
spec = importlib.util.spec_from_file_location("stylekit_client", CLIENT_FILE)
client = importlib.util.module_from_spec(spec)
sys.modules["stylekit_client"] = client  # dataclasses look their module up by name
spec.loader.exec_module(client)


BLANK = client.encode_png(48, 40, bytes(48 * 40 * 4))  # a blank 48×40 layer, as the plug-in sends it


@pytest.fixture(autouse=True)
def own_temporary_folder(tmp_path, monkeypatch):
    """The server logs the plug-in starts go to a folder of the test's, not over the user's in /tmp."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))


def blank_params(steps: int) -> dict:
    """The dialog's parameters for BLANK with ink-wash, at `steps` steps (with a fresh job id)."""
    return {**client.job_params("ink-wash", 1.0, "fast", False, 48, 40), "steps": steps}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def start_app(settings: ServerSettings, port: int) -> tuple[uvicorn.Server, threading.Thread]:
    """Serve a fresh create_app(settings) with uvicorn in a thread on a loopback port."""
    server = uvicorn.Server(uvicorn.Config(create_app(settings), port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread


def stop_app(server: uvicorn.Server, thread: threading.Thread) -> None:
    """Stop a server from start_app (its worker cancels what runs) and wait until it has."""
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def app_server():
    """Serve create_app(settings) on a free loopback port; yields serve(settings) -> its URL."""
    servers = []

    def serve(settings: ServerSettings) -> str:
        port = free_port()
        servers.append(start_app(settings, port))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server in servers:
        stop_app(*server)


def test_encode_png_round_trips_through_pillow():
    rgba = (np.random.default_rng(0).random((7, 5, 4)) * 255).astype(np.uint8)
    decoded = Image.open(io.BytesIO(client.encode_png(5, 7, rgba.tobytes())))
    assert decoded.mode == "RGBA" and np.array_equal(np.asarray(decoded), rgba)
    with pytest.raises(ValueError, match="expected 140 bytes"):
        client.encode_png(5, 7, b"short")


def test_encode_png_at_16_bits_keeps_every_value():
    # GIMP's "R'G'B'A u16" buffers: this machine's byte order; alpha above 0, so no colour is hidden
    rgba = np.random.default_rng(0).integers(1, 65536, (7, 5, 4), dtype=np.uint16)
    loaded = load_image(client.encode_png(5, 7, rgba.tobytes(), bits=16))
    assert loaded.source_metadata.bits == 16
    assert np.array_equal(np.rint(loaded.rgb * 65535), rgba[..., :3])
    assert np.array_equal(np.rint(loaded.alpha * 65535), rgba[..., 3])


def test_job_params_map_the_dialog_to_engine_options():
    params = client.job_params("ink-wash", 2.0, "fast", True, 64, 32)
    assert params["preset"] == "ink-wash" and params["strength"] == 2.0
    assert params["steps"] == 50 and "scales" not in params  # the engine picks them for the steps
    assert params["size"] == 64 and params["preserve_color"] == "luminance"
    assert params["abandon_after"] == client.ABANDON_AFTER and len(params["id"]) == 32
    assert "preset" not in client.job_params("", 1.0, "best", False, 40, 30)
    with pytest.raises(client.ClientError, match="fast, balanced or best"):
        client.job_params("x", 1.0, "perfect", False, 10, 10)


def test_unticked_keep_colours_leaves_the_presets_own_colour_mode():
    assert "preserve_color" not in client.job_params("woodcut", 1.0, "fast", False, 48, 40)


def test_a_layer_is_sent_at_the_size_the_server_works_at():
    assert client.working_size(6000, 4000, 1024) == (1024, 683)
    assert client.working_size(40, 30, 1024) == (40, 30)


def test_a_layer_too_small_to_style_at_any_size_is_refused_saying_to_use_a_larger_one():
    with pytest.raises(client.ClientError) as refusal:
        client.working_size(200, 12, 1024)
    assert str(refusal.value) == ("The layer is 200×12 pixels: Style Transfer needs at least 16 on each "
                                  "side. Use a larger layer.")


def test_a_layer_too_thin_at_the_size_limit_is_refused_naming_a_limit_that_works():
    with pytest.raises(client.ClientError, match=r"at 64×3 pixels: .* so a size limit of at least 300\.$"):
        client.working_size(300, 16, 64)


def test_a_layer_over_the_servers_pixel_limit_is_sent_within_it():
    width, height = client.working_size(400, 300, 1024, max_pixels=10_000)
    assert width * height <= 10_000 and (width, height) == (115, 86)


def test_a_layer_too_thin_for_the_servers_pixel_limit_says_so():
    with pytest.raises(client.ClientError, match=r"a stylekit server allowing more than 1,000 pixels"):
        client.working_size(300, 20, 1024, max_pixels=1000)


@pytest.mark.parametrize(("host", "local"), [("127.0.0.2", True), ("::1", True), ("localhost", True),
                                             ("gpu-box", False), ("192.168.1.5", False), (None, False)])
def test_the_plugin_knows_every_loopback_address_as_this_machine(host, local):
    assert client.is_loopback(host) is local


def test_a_proxy_in_the_environment_does_not_catch_the_local_server(live_server, monkeypatch):
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")  # the discard port: nothing listens
    monkeypatch.setenv("no_proxy", "")
    assert client.Client(client.Config(url=live_server)).health()["status"] == "ok"


def serve_raw(answer: bytes) -> str:
    """A loopback server sending one fixed raw answer to every request; returns its URL."""
    listener = socket.create_server(("127.0.0.1", 0))

    def run() -> None:
        while True:
            connection, _ = listener.accept()
            with connection:
                connection.recv(65536)
                connection.sendall(answer)

    threading.Thread(target=run, daemon=True).start()
    return f"http://127.0.0.1:{listener.getsockname()[1]}"


def test_an_answer_cut_short_is_a_message_not_a_crash():
    url = serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"status\"")
    with pytest.raises(client.ClientError, match=r"connection to the stylekit server .* broke"):
        client.Client(client.Config(url=url)).health()


def test_a_server_closing_without_an_answer_is_down_not_broken():
    url = serve_raw(b"")  # as a server stopping mid-exchange does: it may come back
    with pytest.raises(client.ServerDown, match="No stylekit server answers"):
        client.Client(client.Config(url=url)).health()


def test_another_program_on_the_port_is_named_as_not_a_stylekit_server():
    url = serve_raw(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello")
    with pytest.raises(client.ClientError, match="is not a stylekit server"):
        client.Client(client.Config(url=url)).health()


def test_a_web_server_without_stylekits_health_call_is_named_as_not_a_stylekit_server():
    url = serve_raw(b"HTTP/1.1 404 File not found\r\nContent-Length: 0\r\n\r\n")
    with pytest.raises(client.ClientError, match="is not a stylekit server") as refusal:
        client.Client(client.Config(url=url)).health()
    assert not isinstance(refusal.value, client.NotFound)


def test_each_user_gets_a_server_log_of_their_own(tmp_path):
    process, log = client.start_server(client.Config(command=[sys.executable, "-c", "print('up')"]))
    process.wait(30)
    assert log == str(tmp_path / f"stylekit-server-{os.getuid()}.log") and "up" in Path(log).read_text()


def test_config_defaults_and_broken_file(tmp_path):
    assert client.load_config(str(tmp_path)).url == client.DEFAULT_URL
    (tmp_path / client.CONFIG_NAME).write_text(json.dumps({"url": "http://127.0.0.1:9/", "command": ["x"]}))
    config = client.load_config(str(tmp_path))
    assert (config.url, config.command, config.token) == ("http://127.0.0.1:9", ["x"], "")
    (tmp_path / client.CONFIG_NAME).write_text("{broken")
    with pytest.raises(client.ClientError, match="stylekit gimp install"):
        client.load_config(str(tmp_path))


def test_a_whole_job_against_the_real_server(live_server):
    server = client.Client(client.Config(url=live_server))
    assert client.ensure_server(server) is None  # already running: nothing started
    assert any(p["name"] == "ink-wash" for p in server.presets())
    rgba = np.dstack([make_photo(), np.linspace(0, 1, 40 * 48).reshape(40, 48)])
    pixels = (rgba * 255).round().astype(np.uint8)
    params = {**client.job_params("", 1.0, "fast", False, 48, 40), "steps": 3}
    seen = []
    result, warnings = client.run_job(server, client.encode_png(48, 40, pixels.tobytes()), params,
                                      ("painting.png", png_bytes(make_painting())),
                                      lambda fraction, message: seen.append(fraction))
    image = np.asarray(Image.open(io.BytesIO(result)))
    assert warnings == []
    assert image.shape == (40, 48, 4) and np.array_equal(image[..., 3], pixels[..., 3])
    assert seen[-1] == 1.0 and all(0 <= f <= 1 for f in seen)
    with pytest.raises(client.ClientError, match="no job"):  # run_job dropped it from the server
        server.status(params["id"])


def test_a_job_hands_back_the_servers_warnings(app_server, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # no ImageNet weights cached, and
    monkeypatch.setitem(IMAGENET_URLS, "vgg19", "http://127.0.0.1:9/vgg19-dcbb9e9d.pth")  # none to get
    server = client.Client(client.Config(url=app_server(ServerSettings(weights="auto", device="cpu"))))
    _, warnings = client.run_job(server, BLANK, blank_params(2), None, lambda fraction, message: None)
    assert any(message.startswith("ImageNet weights unavailable") for message in warnings)


def test_a_job_cancelled_on_the_server_is_reported(live_server):
    server = client.Client(client.Config(url=live_server))
    params = blank_params(100_000)
    asked = []

    def cancel_once_running(fraction, message):
        if message.startswith("scale") and not asked:
            asked.append(server.forget(params["id"]))

    with pytest.raises(client.ClientError, match="job was cancelled on the server"):
        client.run_job(server, BLANK, params, None, cancel_once_running)


def test_a_job_outlasts_a_server_restart(weights_file):
    settings, port = ServerSettings(weights=str(weights_file), device="cpu"), free_port()
    servers = [start_app(settings, port)]

    def restart() -> None:  # stopped mid-job, started again a second later, knowing no jobs
        stop_app(*servers[0])
        time.sleep(1.0)
        servers.append(start_app(settings, port))

    restarter = threading.Thread(target=restart)
    messages = []

    def restart_once_submitted(fraction, message):
        messages.append(message)
        if restarter.ident is None:  # at the first news of the job, however far it got
            restarter.start()

    never = [sys.executable, "-c", "raise SystemExit('this restart is not the plug-in's to do')"]
    server = client.Client(client.Config(url=f"http://127.0.0.1:{port}", command=never))
    try:
        result, _ = client.run_job(server, BLANK, blank_params(40), None, restart_once_submitted)
    finally:
        restarter.join(30)
        for running in servers[1:]:
            stop_app(*running)
    assert Image.open(io.BytesIO(result)).size == (48, 40)
    assert any("went away" in message for message in messages)


def test_a_local_server_that_stays_down_is_started_again(weights_file, monkeypatch):
    monkeypatch.setattr(client, "RESTART_AFTER", 0.5)
    port = free_port()
    first = start_app(ServerSettings(weights=str(weights_file), device="cpu"), port)
    command = [str(Path(sys.executable).parent / "stylekit"), "serve", "--port", str(port),
               "--weights", str(weights_file), "--device", "cpu"]
    started = []
    real_start = client.start_server

    def start_server(config):  # the real one, noting the process to end after the test
        started.append(real_start(config))
        return started[-1]

    monkeypatch.setattr(client, "start_server", start_server)

    def stop_once_submitted(fraction, message):  # at the first news of the job: a short one may be done
        if first[1].is_alive():                  # by the next poll
            stop_app(*first)

    server = client.Client(client.Config(url=f"http://127.0.0.1:{port}", command=command))
    try:
        result, _ = client.run_job(server, BLANK, blank_params(5), None, stop_once_submitted)
    finally:
        for process, _log in started:
            process.terminate()
            process.wait(30)
    assert Image.open(io.BytesIO(result)).size == (48, 40) and len(started) == 1


def test_a_job_waits_for_a_lost_server_less_long_than_the_server_keeps_an_unpolled_job():
    assert client.RESTART_AFTER < client.OUTAGE_SECONDS < client.ABANDON_AFTER


def test_tidying_up_after_the_download_never_fails_the_job():
    gone = client.Client(client.Config(url=f"http://127.0.0.1:{free_port()}"))  # nothing listens there
    with pytest.raises(client.ServerDown):
        gone.forget("photo-1")
    client.tidy(gone, "photo-1")  # the same call, as run_job makes it once the result is in hand


def test_a_job_the_server_keeps_losing_is_given_up(live_server):
    server = client.Client(client.Config(url=live_server))
    params = blank_params(2)
    runs = []

    def drop_it_once_done(fraction, message):  # as a restart between "done" and the download would
        if message.startswith("done"):
            runs.append(server.forget(params["id"]))

    with pytest.raises(client.ClientError, match="lost the job"):
        client.run_job(server, BLANK, params, None, drop_it_once_done)
    assert len(runs) == 1 + client.RESUBMITS


def test_refusals_become_advice(app_server, tmp_path, weights_file):
    url = app_server(ServerSettings(weights=str(weights_file), device="cpu", max_queue=1,
                                    token="a-long-enough-secret-token"))
    config_path = str(tmp_path / client.CONFIG_NAME)
    anonymous = client.Client(client.Config(url=url, path=config_path))
    with pytest.raises(client.ClientError, match=f"'token' in {config_path}"):
        anonymous.health()
    server = client.Client(client.Config(url=url, token="a-long-enough-secret-token"))
    assert server.health()["max_queue"] == 1
    with pytest.raises(client.ClientError, match="refused the request: unknown preset 'nope'"):
        server.submit(BLANK, {"preset": "nope"})
    running = server.submit(BLANK, {"preset": "ink-wash", "steps": 100_000})
    while server.status(running["id"])["status"] != "running":
        time.sleep(0.05)
    server.submit(BLANK, {"preset": "ink-wash"})  # waits behind it, filling the queue
    with pytest.raises(client.ClientError, match=r"busy \(the queue is full"):
        server.submit(BLANK, {"preset": "ink-wash"})


def test_an_upload_over_the_servers_limit_is_advice_not_a_server_gone_away(app_server, weights_file):
    # refused before sending: the server would only drop it (and resets one far over its limit)
    url = app_server(ServerSettings(weights=str(weights_file), device="cpu", max_upload_bytes=2**20))
    server = client.Client(client.Config(url=url))
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 4), dtype=np.uint8)  # 4 MB, incompressible
    params = {**client.job_params("ink-wash", 1.0, "fast", False, 1024, 1024), "steps": 1}
    with pytest.raises(client.ClientError, match=r"over the stylekit server's upload limit of 1 MB: lower "
                                                 "the size limit"):
        client.run_job(server, client.encode_png(1024, 1024, noise.tobytes()), params, None,
                       lambda fraction, message: None)


def test_ensure_server_starts_the_configured_command(tmp_path, weights_file):
    port = free_port()
    command = [str(Path(sys.executable).parent / "stylekit"), "serve", "--port", str(port),
               "--weights", str(weights_file), "--device", "cpu"]
    server = client.Client(client.Config(url=f"http://127.0.0.1:{port}", command=command))
    waits = []
    process = client.ensure_server(server, on_wait=lambda: waits.append(1))
    try:
        assert process is not None and waits
        assert server.health()["device"] == "cpu"
    finally:
        process.terminate()
        process.wait(30)


def test_ensure_server_explains_start_failures(tmp_path, monkeypatch):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    missing = client.Client(client.Config(url=url, command=[str(tmp_path / "no-such-stylekit")]))
    with pytest.raises(client.ClientError, match="Cannot start the stylekit server"):
        client.ensure_server(missing)
    crash = [sys.executable, "-c", "raise SystemExit('boom')"]
    crashing = client.Client(client.Config(url=url, command=crash))
    with pytest.raises(client.ClientError, match="stopped while starting: boom"):
        client.ensure_server(crashing)
    monkeypatch.setattr(client, "START_SECONDS", 1)
    asleep = [sys.executable, "-c", "import time; time.sleep(60)"]  # runs, but serves nothing there
    silent = client.Client(client.Config(url=url, command=asleep))
    started = []
    monkeypatch.setattr(client, "start_server", lambda config, start=client.start_server: started.append(
        start(config)) or started[-1])
    with pytest.raises(client.ClientError, match=r"did not answer at .* within 1 s \(does 'command'"):
        client.ensure_server(silent)
    assert started[0][0].wait(10) is not None  # given up on: not left running
    monkeypatch.setattr(client, "HTTP_TIMEOUT", 0.5)
    remote = client.Client(client.Config(url=f"http://192.0.2.1:{port}", command=["never-run"]))
    with pytest.raises(client.ServerDown, match="No stylekit server answers"):  # not started: not local
        client.ensure_server(remote)
