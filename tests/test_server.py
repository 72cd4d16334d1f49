"""`stylekit serve`: every endpoint, cancelling, limits, the token off loopback, retries, fuzzing."""

import concurrent.futures
import gc
import http.client
import io
import json
import os
import socket
import stat
import threading
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import schemathesis
import tifffile
import uvicorn
from conftest import make_painting, make_photo, start_server
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from PIL import Image
from schemathesis.checks import allow_header_conformance, positive_data_acceptance

from stylekit import StylekitError
from stylekit.cli import main
from stylekit.engine import MIN_SIDE
from stylekit.image import encode_png, load_image, read_metadata
from stylekit.loopback import is_loopback
from stylekit.presets import get_preset
from stylekit.request import WARM_UP_SIDE
from stylekit.server import ServerSettings, create_app, listen
from stylekit.token_file import load_or_create_token

FAST = {"steps": 3, "targets": "torch"}
TOKEN = "s3cret-token-0123456789"
ENDLESS = {"steps": 100_000, "targets": "torch"}  # runs until cancelled


def png(pixels: np.ndarray) -> bytes:
    """Encode float RGB or RGBA pixels as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray((pixels * 255).round().astype(np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PHOTO_RGBA = np.dstack([make_photo(), np.linspace(0, 1, 48 * 40, dtype=np.float32).reshape(40, 48)])
PHOTO = png(PHOTO_RGBA)
PAINTING = png(make_painting())


def bit_depth(png_bytes: bytes) -> int:
    """A PNG's bits per channel, from its IHDR chunk (which always comes first)."""
    return png_bytes[24]


def post_job(client, params: dict, image: bytes = PHOTO, style: bytes | None = PAINTING):
    """POST /v1/jobs with an image, optional style upload and params JSON."""
    files = {"image": ("photo.png", image, "image/png")}
    if style is not None:
        files["style"] = ("painting.png", style, "image/png")
    return client.post("/v1/jobs", files=files, data={"params": json.dumps(params)})


def wait_for(client, job_id: str, statuses: tuple[str, ...], timeout: float = 120.0) -> dict:
    """Poll a job until its status is one of statuses."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view = client.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in statuses:
            return view
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} stuck at {view}")


@pytest.fixture
def server(weights_file):
    """An app with a running worker (TestClient with lifespan), the test weights on the CPU."""
    app = create_app(ServerSettings(weights=str(weights_file), device="cpu", max_queue=2))
    with TestClient(app) as client:
        yield client


def test_health_and_openapi(server):
    health = server.get("/v1/health").json()
    assert health["status"] == "ok" and health["running"] is None
    assert (health["queued"], health["arriving"]) == (0, 0)
    assert health["max_queue"] == 2
    schema = server.get("/openapi.json").json()
    assert set(schema["paths"]) == {"/v1/health", "/v1/presets", "/v1/jobs", "/v1/jobs/{job_id}",
                                    "/v1/jobs/{job_id}/result"}


def test_presets_list_names_titles_and_file_names_only(server):
    presets = {p["name"]: p for p in server.get("/v1/presets").json()}
    ink = get_preset("ink-wash")
    assert presets["ink-wash"]["title"] == ink.title
    assert presets["ink-wash"]["styles"] == [path.name for path in ink.style_paths]
    assert presets["ink-wash"]["options"]["style_weight"] == ink.options["style_weight"]
    assert "/" not in json.dumps([p["styles"] for p in presets.values()])


def test_uploaded_style_job_returns_png_with_the_uploads_alpha(server):
    answer = post_job(server, {**FAST, "id": "upload-1"})
    assert answer.status_code == 202 and answer.json()["id"] == "upload-1"
    view = wait_for(server, "upload-1", ("done", "failed"))
    assert view["status"] == "done" and view["progress"] == 1.0, view
    assert view["report"]["iterations"] == 3 and view["event"]["stage"] == "done"
    result = server.get("/v1/jobs/upload-1/result")
    assert result.headers["content-type"] == "image/png"
    image = Image.open(io.BytesIO(result.content))
    assert image.mode == "RGBA" and image.size == (48, 40)
    expected_alpha = (PHOTO_RGBA[..., 3] * 255).round().astype(np.uint8)
    assert np.array_equal(np.asarray(image)[..., 3], expected_alpha)
    assert read_metadata(result.content)["job"] == "upload-1"


def test_a_16_bit_upload_gets_a_16_bit_result(server):
    deep = encode_png(PHOTO_RGBA[..., :3], PHOTO_RGBA[..., 3], bits=16)
    post_job(server, {**FAST, "id": "deep"}, image=deep)
    assert wait_for(server, "deep", ("done", "failed"))["status"] == "done"
    result = server.get("/v1/jobs/deep/result").content
    assert bit_depth(result) == 16
    loaded = load_image(result)
    assert np.abs(loaded.rgb * 255 - np.rint(loaded.rgb * 255)).max() > 0.1  # between 8-bit steps
    np.testing.assert_allclose(loaded.alpha, PHOTO_RGBA[..., 3], atol=0.5 / 65535)  # 16-bit alpha too


def test_an_8_bit_upload_gets_an_8_bit_result(server):
    post_job(server, {**FAST, "id": "shallow"})
    assert wait_for(server, "shallow", ("done", "failed"))["status"] == "done"
    assert bit_depth(server.get("/v1/jobs/shallow/result").content) == 8


def test_preset_job_uses_the_preset_and_strength(server):
    answer = post_job(server, {**FAST, "preset": "ink-wash", "strength": 2.0}, style=None)
    assert answer.status_code == 202
    view = wait_for(server, answer.json()["id"], ("done", "failed"))
    assert view["status"] == "done" and view["preset"] == "ink-wash", view
    options = view["report"]["options"]
    assert options["style_weight"] == 2.0 * get_preset("ink-wash").options["style_weight"]
    assert options["tv_weight"] == get_preset("ink-wash").options["tv_weight"]
    assert options["weights"] != "auto" and options["device"] == "cpu"  # the server's, not a client's


def test_a_presets_own_network_and_weights_give_way_to_the_servers(server, painting_path):
    assert main(["presets", "add", "own-network", "--style", str(painting_path), "--backbone", "vgg16",
                 "--weights", "random:7", "--steps", "3", "--targets", "torch"]) == 0
    try:
        listed = {p["name"]: p for p in server.get("/v1/presets").json()}["own-network"]
        assert listed["options"] == {"steps": 3, "targets": "torch"}  # no server path, nothing it overrides
        answer = post_job(server, {"preset": "own-network"}, style=None)
        view = wait_for(server, answer.json()["id"], ("done", "failed"))
        assert view["status"] == "done", view
        assert view["report"]["options"]["backbone"] == "vgg19"
        assert view["report"]["options"]["weights"] != "random:7"
    finally:
        main(["presets", "remove", "own-network"])


def test_cancel_queued_running_and_after_done(server):
    assert post_job(server, {**ENDLESS, "id": "long"}).status_code == 202
    queued = post_job(server, {**FAST, "id": "waiting"}).json()
    assert queued["status"] == "queued"
    view = wait_for(server, "long", ("running",))
    deadline = time.monotonic() + 60
    while not (view.get("event") or {}).get("iteration") and time.monotonic() < deadline:
        time.sleep(0.05)
        view = server.get("/v1/jobs/long").json()
    # queued: cancelled at once, and never run
    cancelled = server.delete("/v1/jobs/waiting").json()
    assert cancelled["status"] == "cancelled" and cancelled["progress"] == 0.0
    # running: stopped at the next optimiser step
    assert server.delete("/v1/jobs/long").json()["message"] == "cancelling"
    at = server.get("/v1/jobs/long").json()["event"]["iteration"]  # at or past the step it was asked at
    stopped = wait_for(server, "long", ("cancelled", "done", "failed"))
    assert stopped["status"] == "cancelled" and stopped["event"]["iteration"] <= at + 1
    assert server.get("/v1/jobs/long/result").status_code == 409
    assert server.get("/v1/jobs/waiting").json()["status"] == "cancelled"
    # done: deleting forgets the job and its result
    post_job(server, {**FAST, "id": "quick"})
    assert wait_for(server, "quick", ("done", "failed"))["status"] == "done"
    assert server.delete("/v1/jobs/quick").json()["status"] == "done"
    assert server.get("/v1/jobs/quick").status_code == 404
    assert server.get("/v1/jobs/quick/result").status_code == 404
    assert server.delete("/v1/jobs/quick").status_code == 404


def test_a_job_nobody_polls_is_cancelled(server):
    job = post_job(server, {**ENDLESS, "abandon_after": 0.5}).json()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the health answer asks about no job
        health = server.get("/v1/health").json()
        if health["queued"] == 0 and health["running"] is None:
            break
        time.sleep(0.1)
    view = server.get(f"/v1/jobs/{job['id']}").json()
    assert view["status"] == "cancelled" and "no client" in view["message"]


def test_resubmitting_the_same_id_returns_the_same_job(server):
    first = post_job(server, {**FAST, "id": "retry-me"})
    again = post_job(server, {**FAST, "id": "retry-me"})
    assert (first.status_code, again.status_code) == (202, 200)
    assert again.json()["created"] == first.json()["created"]
    other = post_job(server, {**FAST, "id": "retry-me"}, image=png(make_photo(seed=5)))
    assert other.status_code == 409 and "different job" in other.json()["detail"]
    wait_for(server, "retry-me", ("done",))
    assert post_job(server, {**FAST, "id": "retry-me"}).json()["status"] == "done"


@pytest.mark.parametrize(("params", "style", "message"), [
    ({"weights": "/etc/passwd"}, PAINTING, "fixed when the server starts"),
    ({"device": "cuda"}, PAINTING, "fixed when the server starts"),
    ({"backbone": "vgg16"}, PAINTING, "is fixed when the server starts (stylekit serve --backbone)"),
    ({"init": "/etc/passwd"}, PAINTING, "bad init"),
    ({"preset": "swirl", "style_blend": [1.0, 2.0]}, None, "style_blend has 2 weights for 1 style image"),
    ({"style_layers": []}, PAINTING, "bad style_layers: none given"),
    ({"preset": "../../etc/passwd"}, None, "bad preset name"),
    ({"preset": "no-such-preset"}, None, "unknown preset 'no-such-preset'"),
    ({"preset": "ink-wash"}, PAINTING, "not both or neither"),
    ({}, None, "not both or neither"),
    ({"colour": 1}, PAINTING, "unknown parameter 'colour'"),
    ({"steps": "many"}, PAINTING, "bad parameter 'steps'"),
    ({"steps": 2.5}, PAINTING, "bad parameter 'steps'"),
    ({"style_weight": -1}, PAINTING, "bad style_weight"),
    ({"optimizer": "sgd"}, PAINTING, "bad optimizer 'sgd'"),
    ({"id": "../x"}, PAINTING, "bad parameter 'id'"),
    ({"size": 100_000}, PAINTING, "over the server's limit"),
    ({"seed": 10**23}, PAINTING, "bad seed"),
    ({"optimizer": "adam", "learning_rate": 1e300}, PAINTING, "bad learning_rate"),
    ({"content_layers": "relu4_2"}, PAINTING, "bad parameter 'content_layers'"),
    ({"precision": "fp16"}, PAINTING, "precision fp16 needs a GPU"),  # the fixture's server runs on the CPU
])
def test_bad_params_get_a_one_line_422(server, params, style, message):
    answer = post_job(server, params, style=style)
    assert answer.status_code == 422
    assert message in answer.json()["detail"] and "\n" not in answer.json()["detail"]


def test_an_image_too_small_for_the_network_is_refused_at_submit():
    client = TestClient(create_app(ServerSettings()))  # no lifespan: a refusal must come at submit
    tiny = png(make_photo(MIN_SIDE + 4, MIN_SIDE - 1))
    answer = post_job(client, {**FAST, "preset": "ink-wash"}, image=tiny, style=None)
    assert answer.status_code == 422
    assert answer.json()["detail"] == (f"image too small: the output would be {MIN_SIDE + 4}×{MIN_SIDE - 1} "
                                       f"px, and at least {MIN_SIDE} px on each side are needed (a long "
                                       "side of 22 px makes it 22×16)")


def test_a_small_image_enlarged_by_size_is_accepted():
    client = TestClient(create_app(ServerSettings()))  # no lifespan: nothing runs
    tiny = png(make_photo(MIN_SIDE + 4, MIN_SIDE - 1))
    assert post_job(client, {**FAST, "size": 4 * MIN_SIDE}, image=tiny).status_code == 202


def test_tuple_options_are_taken_as_json_lists(server):
    params = {**FAST, "content_layers": ["relu2_1"], "style_layer_weights": [1, 1, 1, 1, 2]}
    job = post_job(server, params).json()
    assert wait_for(server, job["id"], ("done",))["report"]["options"]["content_layers"] == ["relu2_1"]


def test_params_nested_too_deep_for_the_parser_get_a_422(server):
    deep = "[" * 100_000 + "]" * 100_000
    answer = server.post("/v1/jobs", files={"image": ("a.png", PHOTO)}, data={"params": deep})
    assert answer.status_code == 422 and "not valid JSON" in answer.json()["detail"]


def test_bad_uploads_get_422(server):
    assert "not valid JSON" in server.post("/v1/jobs", files={"image": ("a.png", PHOTO)},
                                           data={"params": "{"}).json()["detail"]
    not_image = post_job(server, FAST, image=b"just text")
    assert not_image.status_code == 422 and "not an image" in not_image.json()["detail"]
    missing = server.post("/v1/jobs", data={"params": "{}"})
    assert missing.status_code == 422 and missing.json()["detail"] == "image: Field required"
    assert server.get("/v1/jobs/nope").status_code == 404


@pytest.mark.parametrize("field", ["image", "params"])
def test_a_form_repeating_a_field_gets_a_422(server, field):
    files = [("image", ("a.png", PHOTO, "image/png")), ("style", ("b.png", PAINTING, "image/png"))]
    if field == "image":
        files.append(("image", ("c.png", PAINTING, "image/png")))
    data = {"params": [json.dumps(FAST), json.dumps({**FAST, "id": "second"})] if field == "params"
            else json.dumps(FAST)}
    answer = server.post("/v1/jobs", files=files, data=data)
    assert answer.status_code == 422
    assert answer.json()["detail"] == f"the form has 2 '{field}' fields; send one"


def test_params_sent_as_a_file_get_a_422_saying_to_send_text(server):
    answer = server.post("/v1/jobs", files={"image": ("a.png", PHOTO), "params": ("p.json", b"{}")})
    assert answer.status_code == 422
    assert answer.json()["detail"] == "params: send it as a text field holding JSON, not a file"


def test_what_decoding_an_upload_said_is_in_its_jobs_report(server):
    frames = [Image.fromarray((make_photo(seed=seed) * 255).astype(np.uint8)) for seed in (1, 2)]
    buffer = io.BytesIO()
    frames[0].save(buffer, "GIF", save_all=True, append_images=frames[1:])
    files = {"image": ("anim.gif", buffer.getvalue()), "style": ("b.png", PAINTING)}
    answer = server.post("/v1/jobs", files=files, data={"params": json.dumps({**FAST, "id": "animated"})})
    assert answer.status_code == 202
    view = wait_for(server, "animated", ("done", "failed"))
    assert "image 'anim.gif' has 2 frames: only the first is used" in view["report"]["warnings"]


def test_a_damaged_compressed_16_bit_tiff_upload_gets_a_422_naming_it(server):
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, np.full((64, 64, 3), 30000, np.uint16), photometric="rgb", compression="zlib")
    answer = server.post("/v1/jobs", files={"image": ("scan.tif", buffer.getvalue()[:-20])},  # strip cut
                         data={"params": json.dumps(FAST)})
    assert answer.status_code == 422 and "'scan.tif' is truncated or corrupt" in answer.json()["detail"]


def test_an_unknown_job_is_not_said_to_have_finished(server):
    answer = server.get("/v1/jobs/never-sent")
    assert answer.status_code == 404
    assert answer.json()["detail"] == ("no job 'never-sent' (unknown here: finished jobs are kept for a "
                                       "while, and a restarted server knows none)")


def test_upload_and_pixel_limits(weights_file):
    app = create_app(ServerSettings(weights=str(weights_file), max_upload_bytes=3000, max_pixels=1000))
    client = TestClient(app)
    too_big = post_job(client, FAST, image=os.urandom(4000))
    assert too_big.status_code == 413 and "--max-upload-mb" in too_big.json()["detail"]

    def streamed():  # no Content-Length: counted while it arrives
        yield b"--x\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(10):
            yield os.urandom(1000)
    chunked = client.post("/v1/jobs", content=streamed(),
                          headers={"Content-Type": "multipart/form-data; boundary=x"})
    assert chunked.status_code == 413
    too_many = post_job(client, FAST, style=None)
    assert too_many.status_code == 422 and "over the limit of 1,000" in too_many.json()["detail"]


def test_queue_length_limit():
    client = TestClient(create_app(ServerSettings(max_queue=1)))  # no lifespan: nothing runs
    assert post_job(client, FAST).status_code == 202
    full = post_job(client, FAST)
    assert full.status_code == 429 and "queue is full" in full.json()["detail"]
    assert client.get("/v1/health").json()["queued"] == 1


def test_token_is_compared_and_required_when_set():
    client = TestClient(create_app(ServerSettings(token="s3cret-token-0123456789")))
    assert client.get("/v1/health").status_code == 401
    wrong = client.get("/v1/health", headers={"Authorization": "Bearer nope"})
    assert wrong.status_code == 401 and "bearer token" in wrong.json()["detail"]
    right = client.get("/v1/health", headers={"Authorization": "Bearer s3cret-token-0123456789"})
    assert right.status_code == 200
    assert client.get("/openapi.json").status_code == 200


def test_a_job_with_the_right_token_is_queued():
    client = TestClient(create_app(ServerSettings(token=TOKEN)))  # no lifespan: nothing runs
    client.headers["Authorization"] = f"Bearer {TOKEN}"
    assert post_job(client, FAST).status_code == 202


@pytest.fixture
def raw_server():
    """Serve create_app(settings) with uvicorn on loopback (in a thread, no worker: nothing runs);
    yields serve(settings) -> (host, port)."""
    servers = []

    def serve(settings: ServerSettings) -> tuple[str, int]:
        sock = listen("127.0.0.1", 0)
        server = uvicorn.Server(uvicorn.Config(create_app(settings), log_level="warning", lifespan="off"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        while not server.started:
            time.sleep(0.02)
        return sock.getsockname()[:2]

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def answer_to_a_partial_upload(address: tuple[str, int], headers: bytes = b"") -> tuple[int, str]:
    """POST /v1/jobs announcing 20 MB but sending 1 kB: a server that reads the body first never answers."""
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\n" + headers
            + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 20000000\r\n\r\n")
    part = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(head + part + bytes(1000))
        answer = http.client.HTTPResponse(client)
        answer.begin()
        return answer.status, json.loads(answer.read())["detail"]


def test_a_wrong_token_is_refused_before_the_upload_is_read(raw_server):
    address = raw_server(ServerSettings(token=TOKEN))
    status, detail = answer_to_a_partial_upload(address, b"Authorization: Bearer nope\r\n")
    assert status == 401 and "bearer token" in detail


def test_an_oversized_upload_without_the_token_gets_the_401_not_the_limit(raw_server):
    address = raw_server(ServerSettings(token=TOKEN, max_upload_bytes=SMALL_LIMIT))
    assert refused_then_closed(address, 2**40, UPLOAD_HEAD) == (401, b"")


def test_an_upload_that_stalls_is_answered_408_and_gives_its_place_back(raw_server):
    host, port = raw_server(ServerSettings(max_queue=1, upload_idle_seconds=0.5))
    status, detail = answer_to_a_partial_upload((host, port))
    assert status == 408 and detail == "the upload stalled: nothing arrived for 0.5 s"
    with httpx.Client(base_url=f"http://{host}:{port}") as client:
        assert client.get("/v1/health").json()["arriving"] == 0
        assert post_job(client, FAST).status_code == 202


def test_a_full_queue_is_refused_before_the_upload_is_read(raw_server):
    host, port = raw_server(ServerSettings(max_queue=1))
    with httpx.Client(base_url=f"http://{host}:{port}") as client:
        assert post_job(client, FAST).status_code == 202  # nothing runs: it stays queued
    status, detail = answer_to_a_partial_upload((host, port))
    assert status == 429 and "queue is full" in detail



def test_an_upload_on_its_way_in_holds_its_place_in_the_queue(raw_server):
    host, port = raw_server(ServerSettings(max_queue=1))
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 20000000\r\n\r\n--x\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n")
    with httpx.Client(base_url=f"http://{host}:{port}") as client:
        with socket.create_connection((host, port), timeout=10) as slow:
            slow.sendall(head + bytes(1000))  # admitted, and still being read
            deadline = time.monotonic() + 10
            while client.get("/v1/health").json()["arriving"] == 0:  # until the server has read its head
                assert time.monotonic() < deadline, "the slow upload was never admitted"
                time.sleep(0.05)
            refused = post_job(client, FAST)
            assert refused.status_code == 429 and "1 on their way in" in refused.json()["detail"]
        deadline = time.monotonic() + 10  # the slow client gone, its place is free again
        while (answer := post_job(client, FAST)).status_code == 429 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answer.status_code == 202

SMALL_LIMIT = 64 * 1024
OVER_THE_BUFFERS = 8 * 2**20  # more than loopback's socket buffers hold: a server that closes on it unread
# resets the client while it still sends, before it reads any answer
UPLOAD_HEAD = b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
MULTIPART = {"Content-Type": "multipart/form-data; boundary=x"}


def streamed_upload(size: int) -> Iterator[bytes]:
    """A multipart upload of `size` zero bytes in 64 kB pieces (sent chunked, with no Content-Length)."""
    yield UPLOAD_HEAD
    for _ in range(size // 65536):
        yield bytes(65536)


def send_with_urllib(url: str, body: bytes | Iterator[bytes]) -> tuple[int, dict]:
    """POST with the standard library (which asks the server to close after answering)."""
    request = urllib.request.Request(url, data=body, headers=MULTIPART, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def send_with_requests(url: str, body: bytes | Iterator[bytes]) -> tuple[int, dict]:
    """POST with requests (which keeps the connection open for the next request)."""
    requests = pytest.importorskip("requests")
    answer = requests.post(url, data=body, headers=MULTIPART, timeout=60)
    return answer.status_code, answer.json()


@pytest.mark.parametrize("send", [send_with_urllib, send_with_requests], ids=["urllib", "requests"])
@pytest.mark.parametrize("streamed", [False, True], ids=["announced", "streamed"])
def test_a_client_still_sending_an_upload_over_the_limit_gets_the_413(raw_server, send, streamed):
    host, port = raw_server(ServerSettings(max_upload_bytes=SMALL_LIMIT))
    body = streamed_upload(OVER_THE_BUFFERS) if streamed else UPLOAD_HEAD + bytes(OVER_THE_BUFFERS)
    status, answer = send(f"http://{host}:{port}/v1/jobs", body)
    assert status == 413 and "limit of 0.06 MB (stylekit serve --max-upload-mb)" in answer["detail"]
    with httpx.Client(base_url=f"http://{host}:{port}") as client:
        assert post_job(client, FAST).status_code == 202  # nothing runs: it stays queued


def refused_then_closed(address: tuple[str, int], length: int, sent: bytes,
                        headers: bytes = b"") -> tuple[int, bytes]:
    """Announce an upload of `length` bytes and send only `sent`; returns the answer's status and what
    the server sends after it (b"" once it closes, without waiting for the rest)."""
    head = (b"POST /v1/jobs HTTP/1.1\r\nHost: localhost\r\n" + headers
            + b"Content-Type: multipart/form-data; boundary=x\r\nContent-Length: %d\r\n\r\n" % length)
    with socket.create_connection(address, timeout=10) as client:
        client.sendall(head + sent)
        answer = http.client.HTTPResponse(client)
        answer.begin()
        answer.read()
        client.settimeout(3)  # under uvicorn's 5 s keep-alive: the close must come with the answer
        try:
            return answer.status, client.recv(1)
        except ConnectionResetError:  # closed with the sent part unread
            return answer.status, b""


def test_a_client_waiting_for_100_continue_is_answered_and_closed_without_sending_the_body(raw_server):
    address = raw_server(ServerSettings(max_upload_bytes=SMALL_LIMIT))
    assert refused_then_closed(address, OVER_THE_BUFFERS, b"", b"Expect: 100-continue\r\n") == (413, b"")


def test_an_upload_announced_far_over_the_limit_is_answered_and_closed_without_reading_it(raw_server):
    address = raw_server(ServerSettings(max_upload_bytes=SMALL_LIMIT))
    assert refused_then_closed(address, 2**40, UPLOAD_HEAD) == (413, b"")


def test_cancelling_a_queued_job_frees_its_pixels():
    app = create_app(ServerSettings())
    client = TestClient(app)  # no lifespan: nothing runs
    post_job(client, {**FAST, "id": "waiting"})
    request, alpha = app.state.jobs._jobs["waiting"].request, app.state.jobs._jobs["waiting"].alpha
    arrays = [weakref.ref(array) for array in (request.content, *request.styles, alpha)]
    del request, alpha
    assert client.delete("/v1/jobs/waiting").json()["status"] == "cancelled"
    gc.collect()
    assert [array() is None for array in arrays] == [True, True, True]


def test_token_file_is_private_and_reused(tmp_path):
    path = tmp_path / "config" / "server-token"
    token = load_or_create_token(path)
    assert len(token) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(path) == token
    path.chmod(0o644)
    with pytest.raises(Exception, match="chmod 600"):
        load_or_create_token(path)


def start_together(barrier: threading.Barrier, path: Path) -> str:
    """One server's first start, at the same moment as the others at the barrier."""
    barrier.wait()
    return load_or_create_token(path)


def test_servers_starting_together_all_read_the_whole_token(tmp_path):
    for attempt in range(50):  # the race is narrow: many first starts, two servers each
        path, barrier = tmp_path / f"token-{attempt}", threading.Barrier(2)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            starts = [pool.submit(start_together, barrier, path) for _ in range(2)]
        tokens = [start.result() for start in starts]
        assert tokens[0] == tokens[1] == path.read_text().strip()
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(f"token-{n}" for n in range(50))


def test_loopback_detection():
    assert all(map(is_loopback, ["127.0.0.1", "127.0.0.2", "127.8.0.1", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.2", "::", "example.org"]))


def test_end_to_end_over_real_http(live_server):
    with httpx.Client(base_url=live_server, timeout=60) as client:
        health = client.get("/v1/health").json()
        assert health["device"] == "cpu" and "vgg19-random.pth" in health["weights"]
        assert any(p["name"] == "ink-wash" for p in client.get("/v1/presets").json())
        answer = post_job(client, {"steps": 3, "preset": "ink-wash", "id": "e2e"}, style=None)
        assert answer.status_code == 202
        assert wait_for(client, "e2e", ("done", "failed"))["status"] == "done"
        result = Image.open(io.BytesIO(client.get("/v1/jobs/e2e/result").content))
        assert result.size == (48, 40) and result.mode == "RGBA"


def test_a_host_it_cannot_listen_on_leaves_no_token_file_behind(tmp_path, capsys):
    token = tmp_path / "token"
    assert main(["serve", "--host", "999.1.1.1", "--port", "0", "--token-file", str(token)]) == 1
    assert "999.1.1.1" in capsys.readouterr().err and not token.exists()


def test_serve_refuses_off_loopback_without_a_usable_token(tmp_path, capsys):
    shared = tmp_path / "token"
    shared.write_text("x" * 40)
    shared.chmod(0o644)
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--token-file", str(shared)]) == 1
    assert "can be read by other users" in capsys.readouterr().err
    shared.chmod(0o600)
    shared.write_text("short")
    assert main(["serve", "--host", "0.0.0.0", "--port", "0", "--token-file", str(shared)]) == 1
    assert "no usable token" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"", b"\xff\xfe\x00\x81" * 8, b"\x00" * 32],
                         ids=["empty", "binary", "nul-bytes"])
def test_a_token_file_without_a_token_a_client_can_send_is_refused(tmp_path, content):
    token_file = tmp_path / "token"
    token_file.write_bytes(content)
    token_file.chmod(0o600)
    with pytest.raises(StylekitError, match="holds no usable token"):  # `serve` says it in one line
        load_or_create_token(token_file)


def test_a_token_file_that_is_a_folder_is_refused_as_such(tmp_path):
    with pytest.raises(StylekitError, match="is a folder; name the file"):
        load_or_create_token(tmp_path)


def test_serve_off_loopback_creates_and_requires_the_token(tmp_path, weights_file):
    token_file = tmp_path / "cfg" / "server-token"
    process, url = start_server(tmp_path / "serve.log", "--host", "0.0.0.0", "--token-file", str(token_file),
                                "--weights", str(weights_file), "--device", "cpu")
    try:
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        local = url.replace("0.0.0.0", "127.0.0.1")
        assert httpx.get(f"{local}/v1/health").status_code == 401
        token = token_file.read_text().strip()
        answer = httpx.get(f"{local}/v1/health", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200
    finally:
        process.terminate()
        process.wait(30)


FUZZ_APP = create_app(ServerSettings(weights="random", max_upload_bytes=50_000, max_queue=3))
fuzz_schema = schemathesis.openapi.from_asgi("/openapi.json", FUZZ_APP)
NOT_APPLICABLE = [
    positive_data_acceptance,  # a schema-valid binary upload is rarely a decodable image (422 is right)
    allow_header_conformance,  # Starlette's 405 lists the methods of the first route matching a path
]


@fuzz_schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzing_the_api_finds_no_server_error(case):
    case.call_and_validate(excluded_checks=NOT_APPLICABLE)  # not_a_server_error and schema conformance


def test_warm_up_keeps_torch_off_the_calling_thread(weights_file, monkeypatch):
    import threading

    from stylekit import server
    threads = []
    real = server.stylize
    monkeypatch.setattr(server, "stylize",
                        lambda request: threads.append(threading.current_thread()) or real(request))
    result = server.warm_up(ServerSettings(weights=str(weights_file), device="cpu"))
    assert result.width == WARM_UP_SIDE and threads and threading.current_thread() not in threads


def test_warm_up_reports_bad_weights_as_a_stylekit_error(tmp_path):
    from stylekit import server
    (tmp_path / "bad.pth").write_bytes(b"not weights")
    with pytest.raises(StylekitError, match="is not a torchvision weights file"):
        server.warm_up(ServerSettings(weights=str(tmp_path / "bad.pth"), device="cpu"))
