"""Where weights come from: seeded random, a user's file, torchvision's cache, `weights import`."""

import functools
import http.server
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
import torchvision

from stylekit import weights as w
from stylekit import weights_cache
from stylekit.errors import StylekitError
from stylekit.features import FeatureExtractor


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """Point the ImageNet download at a closed loopback port and an empty cache."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(w.IMAGENET_URLS, "vgg19", "http://127.0.0.1:9/vgg19-dcbb9e9d.pth")


@pytest.fixture
def weights_server(tmp_path):
    """A real HTTP server on loopback serving the files of a folder: (folder, base URL)."""
    root = tmp_path / "served"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    server.server_close()


def serve_as_torchvision_file(weights_server, monkeypatch, source, digest: str) -> None:
    """Serve `source` under a torchvision-style name (vgg19-<sha256 prefix>.pth) as the ImageNet URL."""
    root, base = weights_server
    name = f"vgg19-{digest[:8]}.pth"
    shutil.copy(source, root / name)
    monkeypatch.setitem(w.IMAGENET_URLS, "vgg19", f"{base}/{name}")


def test_random_weights_are_deterministic_for_a_seed():
    first, second = w.random_state_dict("vgg19", seed=5), w.random_state_dict("vgg19", seed=5)
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_random_weights_differ_between_seeds():
    first, second = w.random_state_dict("vgg19", seed=5), w.random_state_dict("vgg19", seed=6)
    assert not torch.equal(first["features.0.weight"], second["features.0.weight"])


def test_random_weights_have_torchvision_keys():
    assert set(w.random_state_dict("vgg19")) == set(w.network_state_keys("vgg19"))


def test_random_vgg_channels_are_rescaled_to_mean_activation_one():
    state = w.random_state_dict("vgg19", seed=0)
    extractor = FeatureExtractor("vgg19", state, ["relu1_1", "relu3_1", "relu5_1"])
    with torch.no_grad():
        features = extractor(w.calibration_images(seed=0))
    for name, value in features.items():
        means = value.mean(dim=(0, 2, 3))
        assert means.median().item() == pytest.approx(1.0, rel=1e-3), name


def test_weights_file_is_used_exactly_as_given(weights_file):
    loaded = w.resolve_weights(str(weights_file), "vgg19")
    saved = torch.load(weights_file, weights_only=True)
    assert loaded.source == "file"
    assert torch.equal(loaded.state_dict["features.0.weight"], saved["features.0.weight"])


def test_weights_file_without_classifier_is_accepted(tmp_path):
    path = tmp_path / "features-only.pth"
    torch.save(w.random_state_dict("vgg19", seed=2), path)
    assert w.resolve_weights(str(path), "vgg19").source == "file"


def test_file_that_is_not_weights_is_refused(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello")
    with pytest.raises(StylekitError, match=r"not a torchvision weights file \(not a PyTorch checkpoint\)"):
        w.resolve_weights(str(path), "vgg19")


def test_a_folder_given_as_weights_is_named_as_one(tmp_path):
    with pytest.raises(StylekitError, match=r"^weights file '.*' is a folder$"):
        w.resolve_weights(str(tmp_path), "vgg19")


def test_weights_of_the_wrong_shape_are_refused(tmp_path):
    state = w.random_state_dict("vgg19", seed=2)
    state["features.0.weight"] = torch.zeros(8, 3, 3, 3)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(StylekitError, match=r"features\.0\.weight"):
        w.resolve_weights(str(path), "vgg19")


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_weights_with_a_nan_or_infinite_value_are_refused(tmp_path, value):
    state = w.random_state_dict("vgg19", seed=2)
    state["features.2.bias"][5] = value
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(StylekitError, match=r"'features\.2\.bias' has NaN or infinite values"):
        w.resolve_weights(str(path), "vgg19")


def test_import_refuses_weights_with_a_nan_value(offline, tmp_path):
    state = w.random_state_dict("vgg19", seed=2)
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "diverged.pth"
    torch.save(state, path)
    with pytest.raises(StylekitError, match="NaN or infinite"):
        w.import_weights(path)
    assert {row["backbone"]: row["state"] for row in weights_cache.weights_status()}["vgg19"] == "missing"


def test_vgg16_file_is_refused_for_vgg19(tmp_path):
    path = tmp_path / "vgg16.pth"
    torch.save(w.random_state_dict("vgg16", seed=2), path)
    with pytest.raises(StylekitError, match="not a vgg19 weights file"):
        w.resolve_weights(str(path), "vgg19")


def test_imagenet_offline_and_uncached_names_the_ways_out(offline):
    with pytest.raises(StylekitError) as error:
        w.resolve_weights("imagenet", "vgg19")
    message = str(error.value)
    assert "stylekit weights import FILE" in message and "--weights random" in message
    assert "\n" not in message


def test_auto_falls_back_to_random_with_a_warning_when_offline(offline):
    resolved = w.resolve_weights("auto", "vgg19")
    assert resolved.source == "random"
    assert "random" in resolved.warning and "weights import" in resolved.warning


def test_a_quiet_download_attempt_writes_nothing_to_stderr(offline, capsys):
    resolved = w.resolve_weights("auto", "vgg19", progress=False)
    assert resolved.source == "random" and capsys.readouterr().err == ""


def test_a_download_with_the_named_checksum_lands_in_the_cache(offline, weights_server, monkeypatch,
                                                              weights_file):
    digest = weights_cache.sha256_of(weights_file)
    serve_as_torchvision_file(weights_server, monkeypatch, weights_file, digest)
    resolved = w.resolve_weights("imagenet", "vgg19", progress=False)
    assert resolved.source == "imagenet" and w.imagenet_cache_path("vgg19").is_file()
    assert resolved.sha256 == weights_cache.sha256_of(weights_file)


def test_a_download_with_the_wrong_checksum_is_refused_and_not_cached(offline, weights_server,
                                                                      monkeypatch, weights_file):
    serve_as_torchvision_file(weights_server, monkeypatch, weights_file, "0" * 8)
    with pytest.raises(StylekitError, match="could not be downloaded"):
        w.resolve_weights("imagenet", "vgg19", progress=False)
    assert not w.imagenet_cache_path("vgg19").exists()


def test_import_makes_the_file_the_cached_imagenet_weights(offline, weights_file):
    backbone, target = w.import_weights(weights_file)
    assert backbone == "vgg19" and target.is_file()
    resolved = w.resolve_weights("imagenet", "vgg19")
    direct = w.resolve_weights(str(weights_file), "vgg19")
    assert resolved.source == "imagenet"
    assert all(torch.equal(resolved.state_dict[k], direct.state_dict[k]) for k in direct.state_dict)
    assert {row["backbone"]: row["state"] for row in weights_cache.weights_status()}["vgg19"] == "cached"


def test_corrupted_imported_file_is_detected(offline, weights_file):
    _, target = w.import_weights(weights_file)
    with open(target, "r+b") as handle:
        handle.seek(2000)
        handle.write(b"\x00corrupt\x00")
    with pytest.raises(StylekitError, match="corrupt"):
        w.resolve_weights("imagenet", "vgg19")


def test_status_calls_a_damaged_cached_file_corrupt(offline, weights_file):
    _, target = w.import_weights(weights_file)
    with open(target, "r+b") as handle:
        handle.truncate(4000)
    assert {row["backbone"]: row["state"] for row in weights_cache.weights_status()}["vgg19"] == "corrupt"


@pytest.fixture
def other_weights_file(weights_file, tmp_path) -> Path:
    """The test weights with one value changed: a second file for the same backbone."""
    state = torch.load(weights_file, weights_only=True)
    state["features.0.bias"] = state["features.0.bias"] + 1
    torch.save(state, tmp_path / "other.pth")
    return tmp_path / "other.pth"


def _after_each_rename(monkeypatch, action) -> None:
    """Run action right after each file an import renames into place: what another process could do."""
    replace = os.replace

    def replace_then_act(*args, **kwargs):
        replace(*args, **kwargs)
        action()

    monkeypatch.setattr(os, "replace", replace_then_act)


def test_a_run_during_an_import_uses_the_old_weights_or_the_new_ones_whole(offline, weights_file,
                                                                           other_weights_file, monkeypatch):
    w.import_weights(weights_file)
    seen = []
    _after_each_rename(monkeypatch, lambda: seen.append(w.resolve_weights("imagenet", "vgg19").sha256))
    w.import_weights(other_weights_file)
    assert seen == [weights_cache.sha256_of(other_weights_file)]


def test_an_import_caches_the_bytes_it_checked_though_the_file_grows_meanwhile(offline, weights_file,
                                                                              tmp_path, monkeypatch):
    source = tmp_path / "arriving.pth"
    source.write_bytes(original := weights_file.read_bytes())
    detect = w.detect_backbone

    def still_downloading(state, origin):  # a writer appends between the check and the copy
        with open(source, "ab") as more:
            more.write(b"the rest of a download")
        return detect(state, origin)

    monkeypatch.setattr(w, "detect_backbone", still_downloading)
    _, target = w.import_weights(source)
    assert target.read_bytes() == original
    assert w.resolve_weights("imagenet", "vgg19").sha256 == weights_cache.sha256_of(weights_file)


def test_of_two_imports_at_once_one_wins_whole(offline, weights_file, other_weights_file, monkeypatch):
    started = []

    def import_the_other_once():
        if not started:
            started.append(True)
            w.import_weights(other_weights_file)

    _after_each_rename(monkeypatch, import_the_other_once)
    w.import_weights(weights_file)
    assert w.resolve_weights("imagenet", "vgg19").sha256 == weights_cache.sha256_of(other_weights_file)
    assert {row["backbone"]: row["state"] for row in weights_cache.weights_status()}["vgg19"] == "cached"


def test_import_refuses_a_file_that_is_not_weights(offline, tmp_path):
    path = tmp_path / "photo.jpg"
    path.write_bytes(b"\xff\xd8\xff not really")
    with pytest.raises(StylekitError, match=r"photo\.jpg"):
        w.import_weights(path)


def test_imagenet_urls_are_torchvisions_own():
    models = torchvision.models
    torchvisions = {"vgg19": models.VGG19_Weights.IMAGENET1K_V1.url,
                    "vgg16": models.VGG16_Weights.IMAGENET1K_V1.url,
                    "resnet50": models.ResNet50_Weights.IMAGENET1K_V1.url}
    assert torchvisions == weights_cache.IMAGENET_URLS


@pytest.mark.parametrize("environment", [{"TORCH_HOME": "{tmp}/torch"}, {"XDG_CACHE_HOME": "{tmp}/xdg"},
                                         {"HOME": "{tmp}/home"}], ids=lambda env: next(iter(env)))
def test_the_hub_folder_is_the_one_torch_uses(environment, monkeypatch, tmp_path):
    for name in ("TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    assert weights_cache.torch_hub_dir() == Path(torch.hub.get_dir())
