"""The Ray engine on a real one-node Ray cluster on 127.0.0.1, started (and stopped) by this module."""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from batch_support import PRESET, make_inputs, once_each, output_name, pixels, stamps, tiny, tiny_flags
from conftest import WEIGHTS_SEED, make_photo
from pipeline_support import drop, files, settled, wait_for, watching

from stylekit import ray_engine
from stylekit.batch import Outcome, make_recipe, plan, run_batch, run_local
from stylekit.cli import main
from stylekit.errors import Cancelled, NotEnoughMemory, StylekitError
from stylekit.pipeline.config import from_cli
from stylekit.presets import get_preset
from stylekit.request import Result
from stylekit.weights import random_state_dict

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'stylekit[ray]')")

RAY = str(Path(sys.executable).parent / "ray")
START_TIMEOUT_S = 120


def free_ports(count: int) -> list[int]:
    """Ports nobody listens on right now."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@pytest.fixture(scope="module")
def cluster(isolated_environment) -> Iterator[str]:
    """`ray start --head --block` (2 CPUs, 200 MB object store, no dashboard), joined; yields its address.

    --block keeps every Ray process a child of the one started here, so stopping it stops them all
    (`ray stop` would stop every Ray on the machine). Workers inherit the isolated caches.
    """
    temp = Path(tempfile.mkdtemp(prefix="skray-", dir="/tmp"))  # Ray's socket paths must stay short
    port, agent_port = free_ports(2)
    log = temp / "ray-start.log"
    with log.open("w") as stream:
        process = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2", "--num-gpus=0",
             "--node-ip-address=127.0.0.1", "--include-dashboard=false",
             "--object-store-memory=200000000", f"--temp-dir={temp}", "--disable-usage-stats",
             f"--dashboard-agent-listen-port={agent_port}"],
            stdout=stream, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while "Ray runtime started" not in log.read_text():
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"ray start did not come up: {log.read_text()[-2000:]}")
            time.sleep(0.2)
        address = f"127.0.0.1:{port}"
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        yield address
    finally:
        ray.shutdown()
        process.terminate()
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory) -> Path:
    """Seeded random VGG19 features without the classifier: each worker process loads it quickly."""
    path = tmp_path_factory.mktemp("weights") / "vgg19-features.pth"
    torch.save(random_state_dict("vgg19", seed=WEIGHTS_SEED), path)
    return path


def test_eight_images_are_styled_once_each_and_a_rerun_does_no_work(cluster, tmp_path, weights_file,
                                                                   capsys):
    sources = make_inputs(tmp_path / "in")
    out = tmp_path / "out"
    args = ["batch", str(tmp_path / "in"), "--preset", PRESET, "--out", str(out), "--engine", "ray",
            "--ray-address", cluster, *tiny_flags(weights_file)]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "2 Ray worker(s) on 1 node(s)" in err
    assert "batch: 8 done, 0 skipped (already there), 0 failed" in err
    assert sorted(stamps(out)) == sorted(output_name(source) for source in sources)
    before = stamps(out)
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "batch: 0 done, 8 skipped (already there), 0 failed" in err
    assert "Ray worker" not in err  # nothing to do: no worker was even started
    assert stamps(out) == before


def test_the_hot_folder_hands_its_groups_to_the_pool_and_each_image_comes_out_once(cluster, tmp_path,
                                                                                  weights_file, capsys):
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    inbox.mkdir()
    outbox.mkdir()
    names = [f"photo {i}.png" for i in range(5)]  # a group of 4, then one more
    originals = {name: drop(inbox / name, seed=i) for i, name in enumerate(names)}
    config = from_cli(inbox, None, PRESET, outbox, None, tiny(weights_file), 0.2, False,
                      tmp_path / "status.json", engine="ray", ray_address=cluster, gpus_per_task=0)
    with watching(config):
        wait_for(lambda: settled(inbox, len(names)), 180, "every image")
    err = capsys.readouterr().err
    assert "styling on 2 Ray worker(s) on 1 node(s)" in err
    assert err.count(" done ") == len(names) and " failed " not in err
    assert files(outbox) == sorted(names)
    assert files(inbox / "done") == sorted(names)
    assert all((inbox / "done" / name).read_bytes() == data for name, data in originals.items())
    assert files(inbox / "processing") == [] and files(inbox / "failed") == []
    wait_for(lambda: ray.available_resources().get("CPU") == 2, 60, "the watcher's workers to end")


@pytest.fixture(scope="module")
def pool(cluster, weights_file) -> Iterator[ray_engine.Pool]:
    """Two warm workers shared by the tests below (the CLI tests above start and stop their own)."""
    with ray_engine.open_pool(cluster, 0) as pool:
        ray_engine.warm_up(pool, make_recipe(get_preset(PRESET), tiny(weights_file)).template)
        yield pool


def test_a_killed_worker_costs_a_retry_elsewhere_and_every_image_is_done_once(pool, tmp_path,
                                                                              weights_file):
    # img0 is tiny and img1 large, so when img0 is done the other worker is still busy with img1
    sources = make_inputs(tmp_path / "in", 8, sides=(24, 160))
    out = tmp_path / "out"
    out.mkdir()
    workers = ray.get([actor.where.remote() for actor in pool.actors])
    outcomes: list[Outcome] = []
    killed: list[str] = []

    def kill_the_busy_worker(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if not killed:
            busy = next(worker for worker in workers if worker != outcome.worker)
            os.kill(int(busy.rpartition(":")[2]), signal.SIGKILL)
            killed.append(busy)

    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    engine = functools.partial(ray_engine.run_items, pool)
    summary = run_batch(out, plan(sources, out, PRESET), recipe, engine, kill_the_busy_worker)
    assert (summary.done, summary.skipped, summary.failures) == (8, 0, [])
    assert set(once_each(outcomes).values()) == {1} and len(outcomes) == 8
    retried = [outcome for outcome in outcomes if outcome.attempts > 1]  # what the killed worker held:
    assert len(retried) == 1 and retried[0] is not outcomes[0]  # img1, unless img1 was done first
    assert retried[0].attempts == 2 and retried[0].worker != killed[0]
    assert sorted(stamps(out)) == sorted(output_name(source) for source in sources)


def test_local_and_ray_engines_give_the_same_pixels(pool, tmp_path, weights_file):
    sources = make_inputs(tmp_path / "in", 3, sides=(40,))
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    for folder, engine in (("local", run_local), ("ray", functools.partial(ray_engine.run_items, pool))):
        (tmp_path / folder).mkdir()
        summary = run_batch(tmp_path / folder, plan(sources, tmp_path / folder, PRESET), recipe, engine)
        assert summary.done == 3
    for source in sources:
        local, remote = (pixels(tmp_path / folder / output_name(source)) for folder in ("local", "ray"))
        assert local.shape == remote.shape and np.array_equal(local, remote)


def test_a_refusal_from_a_worker_still_names_the_size_that_fits(pool, weights_file):
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    request = recipe.request(make_photo(48, 40))
    huge = dataclasses.replace(request, options=request.options.replace(size=10**8))
    [refused] = ray_engine.stylize_group(pool, [huge])
    assert isinstance(refused, NotEnoughMemory) and refused.long_side is not None
    assert f"a long side of {refused.long_side} px or less fits" in str(refused)


def test_the_hot_folder_call_keeps_order_returns_failures_and_can_be_stopped(pool, weights_file):
    recipe = make_recipe(get_preset(PRESET), tiny(weights_file))
    large, small, other = (recipe.request(make_photo(side, side, seed=side)) for side in (160, 24, 32))
    no_styles = dataclasses.replace(other, styles=[])
    values = list(ray_engine.stylize_group(pool, [large, small, no_styles, other]))
    assert [v.width if isinstance(v, Result) else type(v) for v in values] == [160, 24, StylekitError, 32]
    assert "at least one style image" in str(values[2])

    def stop() -> None:
        raise Cancelled

    slow = dataclasses.replace(large, options=large.options.replace(steps=1000))  # far over a second
    with pytest.raises(Cancelled):  # the watcher's shutdown: its heartbeat stops a group mid-image
        list(ray_engine.stylize_group(pool, [slow], heartbeat=stop))
