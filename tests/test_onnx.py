"""The ONNX feature extractor: its contract, parity with torch, its export cache, and its providers."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import make_painting, make_photo

from bench import onnx_vs_torch
from stylekit import StyleOptions, StyleRequest, engine, onnx_features, stylize
from stylekit.cli import main
from stylekit.engine import Runtime, _pick_targets, torch_targets
from stylekit.errors import StylekitError
from stylekit.features import FeatureExtractor, backbone_spec
from stylekit.onnx_features import (
    CPU_PROVIDER,
    CUDA_PROVIDER,
    cached_session,
    export_cache_path,
    export_onnx,
    onnx_targets,
    open_session,
)
from stylekit.weights import load_weights_file, resolve_weights, state_dict_sha256

SPEC = backbone_spec("vgg19")
LAYERS = tuple(dict.fromkeys(SPEC.content_layers + SPEC.style_layers))
SMALL = ("relu1_1", "relu2_1")  # a quick export for the cache tests


@pytest.fixture(scope="module")
def weights(weights_file):
    """The test VGG19 as the engine resolves it (a file, so it has a SHA-256)."""
    return load_weights_file(weights_file, "vgg19")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ over the whole tensor."""
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def file_identity(path) -> tuple[int, int]:
    """Inode and modification time: unchanged means the file was not rewritten."""
    info = os.stat(path)
    return info.st_ino, info.st_mtime_ns


@pytest.mark.parametrize("size", [(1, 3, 40, 48), (2, 3, 33, 17)])
def test_onnx_features_and_grams_match_torch_within_1e_4(weights, size):
    extractor = FeatureExtractor("vgg19", weights.state_dict, LAYERS)
    reference = torch_targets(extractor, Runtime(torch.device("cpu"), torch.float32))
    compute, _ = onnx_targets(weights, LAYERS, SPEC.style_layers, "max")
    image = torch.rand(size, generator=torch.Generator().manual_seed(0))
    expected = reference(image, LAYERS, SPEC.style_layers)
    actual = compute(image, LAYERS, SPEC.style_layers)
    assert set(actual) == set(expected) == {*LAYERS, *(f"gram_{n}" for n in SPEC.style_layers)}
    for name in expected:
        assert actual[name].dtype == torch.float32 and actual[name].shape == expected[name].shape
        assert relative_error(actual[name], expected[name]) < 1e-4, name


def test_exported_model_has_the_documented_inputs_and_outputs(weights, tmp_path):
    path = export_onnx(weights.state_dict, "vgg19", SMALL, ("relu2_1",), "avg", tmp_path / "f.onnx")
    model = onnx.load(path)
    (image,) = model.graph.input
    dims = [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim]
    assert image.name == "image" and image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert dims[1] == 3 and all(isinstance(d, str) for d in (dims[0], dims[2], dims[3]))
    assert [o.name for o in model.graph.output] == ["relu1_1", "relu2_1", "gram_relu2_1"]
    assert model.opset_import[0].version >= 17


def test_exported_model_normalises_inside_and_takes_any_batch_and_size(weights, tmp_path):
    path = export_onnx(weights.state_dict, "vgg19", SMALL, ("relu2_1",), "max", tmp_path / "f.onnx")
    session = ort.InferenceSession(path, providers=[CPU_PROVIDER])
    image = np.random.default_rng(0).random((3, 3, 21, 35), dtype=np.float32)  # [0, 1], unnormalised
    relu1, relu2, gram = session.run(None, {"image": image})
    expected = FeatureExtractor("vgg19", weights.state_dict, SMALL)(torch.from_numpy(image))
    assert relu1.shape == (3, 64, 21, 35) and relu2.shape == (3, 128, 10, 17) and gram.shape == (3, 128, 128)
    assert relative_error(torch.from_numpy(relu2), expected["relu2_1"]) < 1e-4


def test_export_refuses_an_unknown_layer_in_one_line(weights, tmp_path):
    with pytest.raises(StylekitError, match=r"^unknown layer 'relu9_9' for vgg19") as info:
        export_onnx(weights.state_dict, "vgg19", ("relu9_9",), (), "max", tmp_path / "f.onnx")
    assert "\n" not in str(info.value)


def test_automatic_export_is_cached_and_reused(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))  # no export of another test's to find
    path = export_cache_path(weights, SMALL, SMALL, "max")
    assert not path.exists()
    cached_session(weights, SMALL, SMALL, "max")
    assert path.is_file() and path.parent.parent.name == "onnx"
    before = file_identity(path)
    cached_session(weights, SMALL, SMALL, "max")
    assert file_identity(path) == before


def test_a_new_export_deletes_those_of_other_onnxruntime_or_graph_versions(weights):
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    root = path.parent.parent
    old_generation = root / "ort1.0.0-opset17-graph0" / "vgg19-max-0123.onnx"
    flat_layout = root / "vgg19-max-4567.onnx"
    kept = path.parent / "vgg19-avg-89ab.onnx"  # another layer set of this generation
    for stale in (old_generation, flat_layout, kept):
        stale.parent.mkdir(parents=True, exist_ok=True)
        stale.write_bytes(b"an export")
    path.unlink(missing_ok=True)
    cached_session(weights, SMALL, ("relu2_1",), "max")
    assert path.is_file() and kept.is_file()
    assert not old_generation.parent.exists() and not flat_layout.exists()


def test_a_new_export_deletes_half_written_ones_left_by_killed_processes(weights):
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    path.parent.mkdir(parents=True, exist_ok=True)
    left = path.parent / ".vgg19-max-dead.onnx.1a2b.tmp"
    writing = path.parent / ".vgg19-max-live.onnx.3c4d.tmp"
    for temp in (left, writing):
        temp.write_bytes(b"half an export")
    hours_ago = time.time() - 2 * onnx_features.STALE_TEMP_S
    os.utime(left, (hours_ago, hours_ago))
    path.unlink(missing_ok=True)
    cached_session(weights, SMALL, ("relu2_1",), "max")
    assert not left.exists() and writing.exists()  # another process may be writing that one now


def hours_ago(path, hours: float = 3.0) -> None:
    """Date a file's last write and read back, as if nobody had touched it for a while."""
    then = time.time() - hours * 3600
    os.utime(path, (then, then))


def fake_export(folder, name: str, megabytes: float = 1.0):
    """A file the size of an export, long unused, in the cache's version folder."""
    path = folder / name
    path.write_bytes(bytes(int(megabytes * (1 << 20))))
    hours_ago(path)
    return path


def test_a_new_export_drops_the_least_recently_used_exports_beyond_the_limit(weights, tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STYLEKIT_ONNX_CACHE_MB", "1.9")  # the new export (0.5 MB) and one more
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    path.parent.mkdir(parents=True)
    unused = fake_export(path.parent, "vgg19-max-unused.onnx")
    read = fake_export(path.parent, "vgg19-max-read.onnx")
    os.utime(read, (time.time() - 3600, read.stat().st_mtime))  # written as long ago, read since
    cached_session(weights, SMALL, ("relu2_1",), "max")
    assert path.is_file() and read.is_file() and not unused.exists()


def test_reusing_an_export_marks_it_used_and_keeps_its_warm_session(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    first = cached_session(weights, SMALL, ("relu2_1",), "max")
    written = path.stat().st_mtime_ns
    os.utime(path, ns=(written - 3600 * 10**9, written))  # last read an hour before it was written
    second = cached_session(weights, SMALL, ("relu2_1",), "max")
    assert path.stat().st_atime_ns > written and path.stat().st_mtime_ns == written
    assert second is first  # the same file version: neither reopened nor probed again


def test_an_export_used_within_the_last_minute_is_never_pruned(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STYLEKIT_ONNX_CACHE_MB", "0")
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    path.parent.mkdir(parents=True)
    unused = fake_export(path.parent, "vgg19-max-unused.onnx")
    opening = fake_export(path.parent, "vgg19-max-opening.onnx")
    os.utime(opening)  # another process is opening it now
    cached_session(weights, SMALL, ("relu2_1",), "max")
    assert not unused.exists() and opening.is_file() and path.is_file()


def test_an_export_deleted_by_another_process_as_it_is_opened_is_a_plain_miss(weights, tmp_path,
                                                                             monkeypatch, caplog):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    cached_session(weights, SMALL, ("relu2_1",), "max")
    real = ort.InferenceSession
    pruned = []

    def pruned_first(path_or_bytes, sess_options=None, providers=None):
        if not pruned:  # another process's prune, between the look-up and onnxruntime's read
            pruned.append(path_or_bytes)
            os.unlink(path_or_bytes)
        return real(path_or_bytes, sess_options=sess_options, providers=providers)
    monkeypatch.setattr(ort, "InferenceSession", pruned_first)
    onnx_features._session.cache_clear()
    session = cached_session(weights, SMALL, ("relu2_1",), "max")
    assert pruned and path.is_file() and "gram_relu2_1" in [o.name for o in session.get_outputs()]
    assert "rebuilding" not in caplog.text  # a file gone is not a damaged file


def test_a_disk_too_full_for_the_export_skips_it_until_there_is_room(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    real_usage, real_export, exports = shutil.disk_usage, onnx_features.export_onnx, []
    free = 100_000

    def usage(folder):
        return real_usage(folder)._replace(free=free)

    def export(*args, **kwargs):
        exports.append(args)
        return real_export(*args, **kwargs)
    monkeypatch.setattr(shutil, "disk_usage", usage)
    monkeypatch.setattr(onnx_features, "export_onnx", export)
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    for _ in range(2):
        with pytest.raises(StylekitError, match=r"^no room for the ONNX export in .* 0 MB are free$"):
            cached_session(weights, SMALL, ("relu2_1",), "max")
    assert not exports and not path.exists()
    free = 1 << 30  # freed
    cached_session(weights, SMALL, ("relu2_1",), "max")
    assert len(exports) == 1 and path.is_file()


def test_a_read_only_cache_folder_skips_the_export(weights, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    path.parent.mkdir(parents=True)
    path.parent.chmod(0o555)
    try:
        (path.parent / "probe").touch()
    except PermissionError:
        pass
    else:
        pytest.skip("this user writes into read-only folders (root does)")
    monkeypatch.setattr(onnx_features, "export_onnx", lambda *a, **k: pytest.fail("exported for nothing"))
    with pytest.raises(StylekitError, match=r"^cannot write into the ONNX cache folder"):
        cached_session(weights, SMALL, ("relu2_1",), "max")


def test_corrupt_cache_file_is_rebuilt(weights):
    path = export_cache_path(weights, SMALL, ("relu1_1",), "max")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"not an onnx model")
    session = cached_session(weights, SMALL, ("relu1_1",), "max")
    assert [o.name for o in session.get_outputs()] == ["relu1_1", "relu2_1", "gram_relu1_1"]
    onnx.checker.check_model(str(path))


def test_stale_cache_file_with_other_outputs_is_rebuilt(weights, tmp_path):
    other = export_onnx(weights.state_dict, "vgg19", ("relu1_1",), (), "max", tmp_path / "other.onnx")
    path = export_cache_path(weights, SMALL, ("relu2_1",), "max")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(other, path)
    session = cached_session(weights, SMALL, ("relu2_1",), "max")
    assert [o.name for o in session.get_outputs()] == ["relu1_1", "relu2_1", "gram_relu2_1"]


def test_a_cached_model_that_loads_but_computes_other_numbers_is_rebuilt(weights, tmp_path):
    other = resolve_weights("random:5", "vgg19").state_dict  # as if its stored weights were damaged
    damaged = export_onnx(other, "vgg19", SMALL, ("relu1_1",), "avg", tmp_path / "damaged.onnx")
    path = export_cache_path(weights, SMALL, ("relu1_1",), "avg")
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(damaged, path)
    before = file_identity(path)
    session = cached_session(weights, SMALL, ("relu1_1",), "avg")
    assert file_identity(path) != before
    probe = torch.rand(1, 3, 32, 32)
    expected = FeatureExtractor("vgg19", weights.state_dict, SMALL, "avg")(probe)["relu2_1"]
    got = torch.from_numpy(session.run(["relu2_1"], {"image": probe.numpy()})[0])
    assert relative_error(got, expected) < 1e-4


def test_cache_key_covers_weights_layers_pooling_and_onnxruntime_version(weights, monkeypatch):
    base = export_cache_path(weights, SMALL, SMALL, "max")
    changed_weights = type(weights)("vgg19", weights.state_dict, "file", "other", "0" * 64)
    variants = [export_cache_path(changed_weights, SMALL, SMALL, "max"),
                export_cache_path(weights, ("relu1_1",), ("relu1_1",), "max"),
                export_cache_path(weights, SMALL, ("relu1_1",), "max"),
                export_cache_path(weights, SMALL, SMALL, "avg")]
    monkeypatch.setattr(ort, "__version__", "0.0.1")
    variants.append(export_cache_path(weights, SMALL, SMALL, "max"))
    assert base not in variants and len(set(variants)) == len(variants)


def test_random_weights_carry_a_checksum_of_their_tensors():
    weights = resolve_weights("random:3", "vgg19")
    assert weights.sha256 == state_dict_sha256(weights.state_dict)
    changed = dict(weights.state_dict, **{"features.0.bias": weights.state_dict["features.0.bias"] + 1})
    assert state_dict_sha256(changed) != weights.sha256


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_session_falls_back_to_cpu_quietly_when_cuda_is_unusable(weights, capfd):
    cached_session(weights, SMALL, SMALL, "max")
    capfd.readouterr()
    session = open_session(export_cache_path(weights, SMALL, SMALL, "max"), use_gpu=True)
    assert session.get_providers()[0] == CPU_PROVIDER
    assert "CUDA" not in capfd.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_session_uses_cuda_when_a_gpu_is_usable(weights):
    session = cached_session(weights, SMALL, SMALL, "max", use_gpu=True)
    assert session.get_providers()[0] == CUDA_PROVIDER


def test_stylize_computes_targets_with_onnx_by_default_and_reports_the_provider(weights_file):
    # fp32 gradients: bf16 rounding would magnify the two paths' 1e-6 differences in the targets.
    options = StyleOptions(weights=str(weights_file), steps=3, size=32, device="cpu", precision="fp32")
    request = StyleRequest(make_photo(), [make_painting()], options)
    by_onnx = stylize(request)
    by_torch = stylize(StyleRequest(make_photo(), [make_painting()], options.replace(targets="torch")))
    assert StyleOptions().targets == "onnx"
    assert by_onnx.targets == f"onnx:{CPU_PROVIDER}" and by_torch.targets == "torch"
    assert by_onnx.report()["targets"] == by_onnx.targets and not by_onnx.warnings
    assert np.abs(by_onnx.image - by_torch.image).max() < 1e-3


def test_stylize_falls_back_to_torch_with_a_warning_when_onnx_cannot_start(weights_file, tmp_path,
                                                                         monkeypatch):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("the cache folder cannot be created here")
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(blocked))
    options = StyleOptions(weights=str(weights_file), steps=2, size=32, device="cpu")
    result = stylize(StyleRequest(make_photo(), [make_painting()], options))
    assert result.targets == "torch"
    assert len(result.warnings) == 1 and result.warnings[0].startswith("ONNX feature extractor unavailable")


def test_export_onnx_command_writes_the_requested_outputs(weights_file, tmp_path, capsys):
    out = tmp_path / "features.onnx"
    code = main(["export-onnx", "--weights", str(weights_file), "--layers", "relu1_1,relu2_1,relu2_2",
                 "-o", str(out)])
    assert code == 0 and "wrote" in capsys.readouterr().err
    names = [o.name for o in onnx.load(out).graph.output]
    assert names == ["relu1_1", "relu2_1", "relu2_2", "gram_relu1_1", "gram_relu2_1"]


@pytest.mark.parametrize(("args", "message"), [
    (["--layers", "relu1_1,nope"], "unknown layer 'nope'"),
    (["--layers", "relu1_1", "--gram-layers", "relu2_1"], "Gram layer 'relu2_1' is not one of"),
])
def test_export_onnx_command_refuses_bad_layers_in_one_line(tmp_path, capsys, args, message):
    code = main(["export-onnx", "--weights", "random", *args, "-o", str(tmp_path / "f.onnx")])
    err = capsys.readouterr().err
    assert code == 1 and message in err and err.count("\n") == 1
    assert not (tmp_path / "f.onnx").exists()


def test_export_onnx_never_writes_over_its_own_weights_file(weights_file, tmp_path, capsys):
    weights = tmp_path / "weights.onnx"
    shutil.copyfile(weights_file, weights)
    before = weights.read_bytes()
    assert main(["export-onnx", "-o", str(weights), "--weights", str(weights)]) == 1
    assert "is the input" in capsys.readouterr().err and weights.read_bytes() == before


def test_onnx_vs_torch_benchmark_times_both_paths(tmp_path):
    results = onnx_vs_torch.main(["--sizes", "32", "--repeats", "1", "--no-doc", "--output", str(tmp_path)])
    (row,) = results["rows"]
    assert row["size"] == 32 and row["torch_seconds"] > 0 and row["onnx_seconds"] > 0
    assert results["provider"] == CPU_PROVIDER or torch.cuda.is_available()
    assert "| 32×32 |" in onnx_vs_torch.markdown(results) and list(tmp_path.glob("onnx-*.json"))


def test_a_session_asks_only_for_providers_onnxruntime_has(weights, monkeypatch):
    asked = []
    real = ort.InferenceSession

    def spy(path, sess_options=None, providers=None):
        asked.append(list(providers))
        return real(path, sess_options=sess_options, providers=providers)
    cached_session(weights, SMALL, SMALL, "max")
    monkeypatch.setattr(ort, "InferenceSession", spy)
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    onnx_features._session.cache_clear()
    open_session(export_cache_path(weights, SMALL, SMALL, "max"), use_gpu=True)
    assert asked == [[CPU_PROVIDER]]


def _targets_name(weights_file, device: str) -> str:
    """Which targets stylize would pick for a run on `device` (picking touches no GPU)."""
    weights = resolve_weights(str(weights_file), "vgg19")
    layers = ("relu4_2", "relu1_1")
    extractor = FeatureExtractor("vgg19", weights.state_dict, layers)
    request = StyleRequest(make_photo(), [make_painting(32, 32)], StyleOptions(weights=str(weights_file)))
    runtime = Runtime(torch.device(device), torch.float32)
    return _pick_targets(request, weights, layers, ("relu1_1",), extractor, runtime).name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a usable GPU")
def test_a_gpu_run_whose_onnxruntime_cannot_use_the_gpu_computes_targets_with_torch(weights_file):
    assert _targets_name(weights_file, "cuda") == "torch"


def test_a_gpu_run_without_onnxruntimes_cuda_provider_exports_nothing(weights_file, monkeypatch):
    monkeypatch.setattr(ort, "get_available_providers", lambda: [CPU_PROVIDER])
    monkeypatch.setattr(engine, "onnx_targets", lambda *a, **k: pytest.fail("exported for nothing"))
    assert _targets_name(weights_file, "cuda") == "torch"


def test_a_cpu_run_computes_targets_with_onnxruntime(weights_file):
    assert _targets_name(weights_file, "cpu") == f"onnx:{CPU_PROVIDER}"
