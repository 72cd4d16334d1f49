"""`stylekit apply`: the main job, its options, and how it treats bad input."""

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import make_photo, save_png
from PIL import ExifTags, Image

from stylekit.cli import main
from stylekit.image import load_image, read_metadata


@pytest.fixture
def apply(tmp_path, photo_path, painting_path, weights_file, capsys):
    """Run `stylekit apply` in-process; returns (exit code, stdout, stderr, output path)."""
    def go(*extra, output="out.png", content=None):
        out = tmp_path / output
        args = ["apply", str(content or photo_path), "--style", str(painting_path), "-o", str(out),
                "--weights", str(weights_file), "--steps", "3", *extra]
        code = main(args)
        captured = capsys.readouterr()
        return code, captured.out, captured.err, out
    return go


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_apply_writes_a_stylised_image(apply, photo_path):
    code, _, err, out = apply()
    assert code == 0 and "wrote" in err
    assert pixels(out).shape == pixels(photo_path).shape
    assert np.abs(pixels(out) - pixels(photo_path)).mean() > 1


def test_apply_records_its_parameters_in_the_output(apply):
    _, _, _, out = apply("--style-weight", "5000")
    metadata = read_metadata(out)
    assert metadata["options"]["style_weight"] == 5000 and metadata["content"] == "photo.png"


def test_report_has_the_promised_fields(apply, tmp_path):
    report = tmp_path / "report.json"
    apply("--report", str(report))
    data = json.loads(report.read_text())
    for key in ("seconds", "iterations", "content_loss", "style_loss", "total_loss", "device", "size",
                "peak_memory_bytes"):
        assert key in data
    assert data["iterations"] == 3 and data["size"] == [48, 40]


def test_json_progress_prints_one_event_per_line(apply):
    _, out, _, _ = apply("--progress", "json")
    events = [json.loads(line) for line in out.splitlines()]
    steps = [e["iteration"] for e in events if e["event"] == "progress" and e["stage"] == "optimise"]
    assert steps == [1, 2, 3]
    assert events[-1]["event"] == "done" and events[-1]["iterations"] == 3


def apply_command(photo_path: Path, painting_path: Path, weights_file: Path, out: Path) -> list[str]:
    """`stylekit apply` as a process, with JSON progress (for the tests of a stdout nobody reads)."""
    return [str(Path(sys.executable).parent / "stylekit"), "apply", str(photo_path), "--style",
            str(painting_path), "-o", str(out), "--weights", str(weights_file), "--steps", "10",
            "--progress", "json"]


def test_json_progress_whose_reader_goes_away_still_writes_the_image(photo_path, painting_path, weights_file,
                                                                      tmp_path):
    out = tmp_path / "out.png"
    command = apply_command(photo_path, painting_path, weights_file, out)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        assert json.loads(process.stdout.readline())["event"] == "progress"
        process.stdout.close()  # as `| head -1` does
        err = process.stderr.read()
    assert process.returncode == 0 and out.exists(), err
    assert err.splitlines()[0] == ("warning: nothing reads the progress events any more (stdout is closed); "
                                   "styling goes on without them")
    assert "Traceback" not in err and "Exception ignored" not in err


def test_json_progress_without_any_stdout_still_writes_the_image(photo_path, painting_path, weights_file,
                                                                  tmp_path):
    out = tmp_path / "out.png"
    command = apply_command(photo_path, painting_path, weights_file, out)
    result = subprocess.run(command, stderr=subprocess.PIPE, text=True, timeout=300,
                            preexec_fn=lambda: os.close(1))  # as `>&-` does
    assert result.returncode == 0 and out.exists(), result.stderr
    assert "styling goes on without them" in result.stderr and "Error" not in result.stderr


@pytest.mark.parametrize("option", [
    ["--size", "32"], ["--steps", "6"], ["--optimizer", "adam"], ["--init", "content"],
    ["--content-weight", "1e5"], ["--style-weight", "10"], ["--tv-weight", "1000"],
    ["--content-layers", "relu2_2"], ["--style-layers", "relu1_1,relu3_1"],
    ["--style-layer-weights", "10,0,0,0,1"], ["--style-scale", "0.5"], ["--preserve-color", "luminance"],
    ["--preserve-color", "histogram"], ["--weights", "random"], ["--backbone", "vgg16"],
    ["--pooling", "avg"], ["--scales", "1"], ["--precision", "bf16"], ["--init", "style"],
], ids=lambda option: " ".join(option))
def test_each_option_changes_the_result(apply, option):
    """From a noise start, so that every loss term already pulls on the first step."""
    base = ["--init", "noise"]
    if option[0] == "--scales":  # a coarse scale needs room: at least 32 px on the short side
        base += ["--size", "96"]
    _, _, _, baseline = apply(*base, output="baseline.png")
    if option[0] == "--backbone":  # a vgg16 run needs vgg16 weights
        option = [*option, "--weights", "random"]
    code, _, err, out = apply(*base, *option, output="changed.png")
    assert code == 0, err
    a, b = pixels(baseline), pixels(out)
    assert a.shape != b.shape or np.abs(a - b).max() > 0


def test_seed_changes_a_noise_start(apply):
    _, _, _, first = apply("--init", "noise", "--seed", "1", output="a.png")
    _, _, _, second = apply("--init", "noise", "--seed", "2", output="b.png")
    assert np.abs(pixels(first) - pixels(second)).max() > 0


def test_same_seed_gives_identical_files(apply):
    _, _, _, first = apply("--init", "noise", "--seed", "3", output="a.png")
    _, _, _, second = apply("--init", "noise", "--seed", "3", output="b.png")
    assert np.array_equal(pixels(first), pixels(second))


def test_two_styles_with_blend(apply, tmp_path):
    second = save_png(tmp_path / "second.png", make_photo(40, 40, seed=5))
    results = []
    for blend in ("1,0", "0,1"):
        code, _, err, out = apply("--style", str(second), "--style-blend", blend, output=f"b{blend[0]}.png")
        assert code == 0, err
        results.append(pixels(out))
    assert np.abs(results[0] - results[1]).max() > 0


def test_init_from_an_image_file(apply, tmp_path):
    start = save_png(tmp_path / "start.png", np.full((40, 48, 3), 0.5, dtype=np.float32))
    _, _, _, baseline = apply("--steps", "1", output="baseline.png")
    code, _, err, out = apply("--steps", "1", "--init", str(start), output="changed.png")
    assert code == 0, err
    assert np.abs(pixels(baseline) - pixels(out)).max() > 0


def test_device_cpu_is_reported(apply, tmp_path):
    report = tmp_path / "r.json"
    apply("--device", "cpu", "--report", str(report))
    assert json.loads(report.read_text())["device"] == "cpu"


def test_alpha_is_kept(apply, tmp_path):
    rgba = np.dstack([make_photo(), np.linspace(0, 1, 48)[None, :].repeat(40, 0)])
    source = tmp_path / "alpha.png"
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(source)
    _, _, _, out = apply(content=source)
    loaded = load_image(out)
    assert loaded.alpha is not None
    assert np.abs(loaded.alpha - load_image(source).alpha).max() < 1 / 255 + 1e-6


def test_exif_orientation_is_honoured(apply, tmp_path):
    source = tmp_path / "rotated.jpg"
    image = Image.fromarray((make_photo() * 255).astype(np.uint8))  # 48 wide, 40 high
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when shown
    image.save(source, exif=exif.tobytes())
    _, _, _, out = apply(content=source)
    assert Image.open(out).size == (40, 48)


@pytest.mark.parametrize("extension", ["jpg", "webp", "tif"])
def test_output_format_follows_the_extension(apply, extension):
    _, _, _, out = apply(output=f"out.{extension}")
    assert Image.open(out).format == {"jpg": "JPEG", "webp": "WEBP", "tif": "TIFF"}[extension]


@pytest.mark.parametrize("extension", ["jpg", "webp"])
def test_quality_sets_how_close_a_jpeg_or_webp_output_stays_to_the_result(apply, extension):
    """The same run thrice (identical pixels on a CPU): lossless, at the default quality, at 10."""
    _, _, _, lossless = apply(output="lossless.png")
    _, _, _, default = apply(output=f"default.{extension}")
    code, _, err, low = apply("--quality", "10", output=f"low.{extension}")
    assert code == 0, err
    error = {path: np.abs(pixels(path) - pixels(lossless)).mean() for path in (default, low)}
    assert error[low] > 1.5 * error[default]


@pytest.mark.parametrize("extension", ["png", "tif"])
def test_quality_for_a_lossless_output_is_refused_before_work(apply, extension):
    code, _, err, out = apply("--quality", "80", output=f"out.{extension}")
    assert code == 2 and err.count("\n") == 1 and not out.exists()
    assert "--quality is for JPEG, WebP and AVIF outputs, not " in err


def wide_photo(tmp_path):
    """520 px wide, over the default long side of 512, yet quick to style at 32 px high."""
    return save_png(tmp_path / "wide.png", make_photo(520, 32))


def test_a_photo_over_the_default_size_is_said_to_come_out_smaller_before_the_work(apply, tmp_path):
    code, _, err, out = apply(content=wide_photo(tmp_path))
    assert code == 0, err
    lines = err.splitlines()
    assert lines[0] == ("note: the output will be 512 px on its long side, smaller than the 520×32 photo "
                        "(without --size, the photo's own, at most 512 px); --size 520 keeps its size")
    assert lines[-1].startswith("wrote ") and Image.open(out).size == (512, 32)


@pytest.mark.parametrize("case", ["small photo", "size given"])
def test_no_size_note_where_the_output_keeps_the_photos_size_or_size_is_given(apply, tmp_path, case):
    if case == "small photo":
        code, _, err, _ = apply()
    else:
        code, _, err, _ = apply("--size", "256", content=wide_photo(tmp_path))
    assert code == 0 and "note: " not in err, err


def test_the_size_note_leaves_json_progress_pure_json(apply, tmp_path):
    code, out, err, _ = apply("--progress", "json", content=wide_photo(tmp_path))
    assert code == 0 and err.startswith("note: the output will be 512 px"), err
    assert all(isinstance(json.loads(line), dict) for line in out.splitlines())


def test_a_photo_too_thin_at_any_size_gets_no_size_note_and_an_error_naming_a_size_that_works(apply,
                                                                                                 tmp_path):
    thin = save_png(tmp_path / "thin.png", make_photo(1000, 8))
    code, _, err, _ = apply(content=thin)
    assert code == 1 and err.splitlines() == [
        "stylekit: error: image too small: the output would be 512×4 px, and at least 16 px on each side "
        "are needed (a long side of 2000 px makes it 2000×16)"]


def bad_content(tmp_path, kind):
    path = tmp_path / f"bad-{kind}.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not an image\n")
    elif kind == "truncated":
        save_png(path, make_photo(64, 64))
        path.write_bytes(path.read_bytes()[:300])
    return path


@pytest.mark.parametrize("kind", ["missing", "empty", "text", "truncated"])
def test_bad_content_is_one_line_and_leaves_no_output(apply, tmp_path, kind):
    content = bad_content(tmp_path, kind)
    before = digest(content) if content.exists() else None
    code, _, err, out = apply(content=content)
    assert code != 0 and err.count("\n") == 1 and "Traceback" not in err
    assert content.name in err
    assert not out.exists()
    assert (digest(content) if content.exists() else None) == before


@pytest.mark.parametrize(("args", "needle"), [
    (["--steps", "0"], "--steps"), (["--optimizer", "sgd"], "--optimizer"),
    (["--style-blend", "abc"], "--style-blend"), (["--size", "-3"], "--size"),
    (["--style-layers", "relu9_9"], "relu9_9"), (["--device", "toaster"], "--device"),
    (["--style-layer-weights", "nan,1,1,1,1"], "bad style_layer_weights nan"),
    (["--style-layer-weights", "-5,1,1,1,1"], "bad style_layer_weights -5"),
    (["--seed", str(2**70)], "bad seed"),
    (["--quality", "0"], "--quality"), (["--quality", "101"], "--quality"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_bad_option_values_are_one_line_errors(apply, args, needle):
    code, _, err, out = apply(*args)
    assert code != 0 and err.count("\n") == 1 and needle in err and not out.exists()


def test_bad_weights_file_is_one_line_error(apply, tmp_path):
    bogus = tmp_path / "weights.pth"
    bogus.write_bytes(b"not a checkpoint")
    code, _, err, out = apply("--weights", str(bogus))
    assert code == 1 and "not a torchvision weights file" in err and err.count("\n") == 1
    assert not out.exists()


def test_unknown_output_extension_is_refused_before_work(apply):
    code, _, err, out = apply(output="out.xyz")
    assert code == 1 and ".xyz" in err and not out.exists()


def test_a_size_too_large_for_free_memory_is_a_one_line_error_before_work(apply):
    code, _, err, out = apply("--size", "1000000")
    assert code == 1 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "not enough memory for a 1000000×" in err
    assert "px or less fits" in err


def test_max_memory_refuses_a_run_that_would_take_more(apply):
    code, _, err, out = apply("--size", "1024", "--max-memory", "0.5")
    assert code == 1 and not out.exists()
    assert len(err.strip().splitlines()) == 1 and "max_memory allows 0.5 GiB" in err


def test_output_that_is_the_input_is_refused(apply, photo_path):
    before = digest(photo_path)
    code, _, err, _ = apply(output=photo_path.name)
    assert code == 1 and "is the input" in err and digest(photo_path) == before


def test_a_report_naming_the_input_is_refused_and_the_input_kept(apply, photo_path):
    before = digest(photo_path)
    code, _, err, out = apply("--report", str(photo_path))
    assert code == 1 and "report" in err and "is the input" in err
    assert digest(photo_path) == before and not out.exists()


def test_a_report_naming_the_output_is_refused(apply, tmp_path):
    code, _, err, out = apply("--report", str(tmp_path / "out.png"))
    assert code == 1 and "is the output image too" in err and not out.exists()


def test_a_report_the_disk_refuses_after_the_work_names_it_and_the_image_written(apply, tmp_path,
                                                                                 monkeypatch):
    def full_disk(path, data):  # the disk filled up while the image was styled
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr("stylekit.cli.write_json", full_disk)
    report = tmp_path / "report.json"
    code, _, err, out = apply("--report", str(report))
    assert code == 1 and out.exists() and err.splitlines()[-1] == (
        f"stylekit: error: cannot write the report '{report}' (No space left on device); the image is "
        f"written: '{out}'")


def test_an_output_under_a_file_is_refused_naming_it_not_a_folder(apply, photo_path):
    code, _, err, _ = apply(output="photo.png/out.png")
    assert code == 1
    assert err.splitlines() == [f"stylekit: error: output folder '{photo_path}' is not a folder"]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux's /sys (unwritable even as root)")
def test_an_unwritable_output_folder_is_refused_before_any_work(apply):
    code, out, err, _ = apply("--progress", "json", output="/sys/kernel/out.png")
    assert code == 1 and "cannot write into output folder '/sys/kernel'" in err
    assert err.count("\n") == 1 and out == ""  # no progress: it stopped before the first step


def test_apply_keeps_the_photos_camera_metadata_and_resolution(apply, tmp_path):
    exif = Image.Exif()
    exif[ExifTags.Base.Make], exif[ExifTags.Base.Model] = "Canon", "EOS R5"
    content = tmp_path / "camera.jpg"
    Image.fromarray((make_photo() * 255).astype(np.uint8)).save(content, exif=exif.tobytes(), dpi=(300, 300))
    code, _, err, out = apply(content=content, output="out.jpg")
    assert code == 0, err
    with Image.open(out) as output:
        assert output.info["dpi"] == pytest.approx((300, 300), abs=0.01)
        exif = output.getexif()
    assert (exif[ExifTags.Base.Make], exif[ExifTags.Base.Model]) == ("Canon", "EOS R5")


def test_apply_styles_a_phones_heic_photo_into_an_avif(apply):
    code, _, err, out = apply("--quality", "80", content=Path(__file__).parent / "data" / "phone-p3.heic",
                              output="out.avif")
    assert code == 0, err
    with Image.open(out) as output:
        assert (output.format, output.size) == ("AVIF", (40, 48))
        assert output.getexif()[ExifTags.Base.Make] == "TestCam"


def test_apply_keeps_a_16_bit_photo_16_bit(apply, tmp_path):
    content = tmp_path / "deep.tif"
    tifffile.imwrite(content, (make_photo() * 65535).astype(np.uint16), photometric="rgb")
    code, _, err, out = apply(content=content, output="out.tif")
    assert code == 0, err
    styled = tifffile.imread(out)
    assert styled.dtype == np.uint16 and np.any(styled % 257)  # not 8-bit values scaled up


def test_a_jpeg_output_of_a_transparent_image_warns_that_the_alpha_is_dropped(apply, tmp_path):
    rgba = np.dstack([make_photo(), np.full((40, 48), 0.5, np.float32)])
    content = tmp_path / "clear.png"
    Image.fromarray((rgba * 255).round().astype(np.uint8), "RGBA").save(content)
    code, _, err, out = apply(content=content, output="out.jpg")
    assert code == 0 and "JPEG has no transparency" in err and out.exists()


def test_a_control_character_in_a_path_stays_on_the_error_line(apply, tmp_path):
    code, _, err, _ = apply(output="no\nsuch/out.png")
    assert code == 1 and err.count("\n") == 1 and "no\\nsuch" in err


def test_installed_command_prints_no_traceback(tmp_path, painting_path):
    result = subprocess.run(
        [sys.executable, "-m", "stylekit.cli", "apply", str(tmp_path / "nope.jpg"), "--style",
         str(painting_path), "-o", str(tmp_path / "o.png")], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    missing = tmp_path / "nope.jpg"
    assert result.stderr.strip().splitlines() == [f"stylekit: error: image '{missing}' not found"]


def test_debug_shows_the_traceback(tmp_path, painting_path):
    result = subprocess.run(
        [sys.executable, "-m", "stylekit.cli", "apply", str(tmp_path / "nope.jpg"), "--style",
         str(painting_path), "-o", str(tmp_path / "o.png"), "--debug"], capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1 and "Traceback" in result.stderr


@pytest.mark.parametrize("value", ["", "0"])
def test_stylekit_debug_off_or_0_shows_no_traceback(monkeypatch, capsys, value):
    monkeypatch.setenv("STYLEKIT_DEBUG", value)
    assert main(["presets", "show", "no-such-preset"]) == 1
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("args", [[], ["presets"], ["weights"]])
def test_a_command_group_alone_prints_its_help_as_it_is(capsys, args):
    assert main(args) == 2  # as click does: no command chosen is a usage error
    err = capsys.readouterr().err
    assert err.startswith(f"Usage: stylekit{''.join(' ' + a for a in args)} [OPTIONS] COMMAND")
    assert "\nCommands:\n" in err and "error" not in err


def test_weights_import_then_imagenet_gives_the_same_pixels(apply, weights_file, capsys, monkeypatch,
                                                            tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["weights", "import", str(weights_file)]) == 0
    assert "imported vgg19" in capsys.readouterr().out
    _, _, _, by_path = apply(output="by-path.png")
    code, _, err, by_name = apply("--weights", "imagenet", output="by-name.png")
    assert code == 0, err
    assert np.array_equal(pixels(by_path), pixels(by_name))
    main(["weights", "status"])
    assert "vgg19     cached" in capsys.readouterr().out


def _without_torch(*commands: list[str]) -> subprocess.CompletedProcess:
    """Run CLI commands in a fresh interpreter; its last line says whether torch got loaded."""
    calls = "".join(f"try:\n    main({command!r})\nexcept SystemExit:\n    pass\n" for command in commands)
    script = f"import sys\nfrom stylekit.cli import main\n{calls}print('torch' in sys.modules)"
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)


def test_help_and_usage_errors_answer_without_loading_torch():
    # Importing torch takes seconds; only commands that run the network should pay for it.
    done = _without_torch(["--help"], ["apply", "photo.jpg", "-o", "out.png"])
    assert done.stdout.strip().splitlines()[-1] == "False"
    assert "give either --preset NAME or at least one --style image" in done.stderr


def test_listing_presets_does_not_load_torch():
    done = _without_torch(["presets", "list"])
    assert "ink-wash" in done.stdout
    assert done.stdout.strip().splitlines()[-1] == "False"


def test_weights_status_checks_the_cached_file_without_loading_torch(weights_file, monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "cache"))
    assert main(["weights", "import", str(weights_file)]) == 0
    done = _without_torch(["weights", "status"])
    lines = done.stdout.strip().splitlines()
    assert lines[0].startswith("vgg19     cached ") and lines[-1] == "False"


@pytest.mark.parametrize(("command", "offered"), [
    (["apply"], "content|noise|style|FILE"), (["watch"], "content|noise|style"),
    (["batch"], "content|noise|style"), (["presets", "add"], "content|noise|style"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else v)
def test_init_help_offers_a_file_only_where_the_command_takes_one(command, offered, capsys):
    assert main([*command, "--help"]) == 0
    init_line = next(line for line in capsys.readouterr().out.splitlines() if "--init" in line)
    assert init_line.split()[1] == offered


def test_every_option_of_every_command_says_what_it_does():
    import click

    from stylekit.cli import cli

    def commands(group: click.Group, path: str):
        for name, command in group.commands.items():
            yield from (commands(command, f"{path} {name}") if isinstance(command, click.Group)
                        else [(f"{path} {name}", command)])
    silent = [f"{where} {param.opts[0]}" for where, command in commands(cli, "stylekit")
              for param in command.params if isinstance(param, click.Option) and not param.help]
    assert silent == []


def test_watch_log_json_reports_a_failure_to_start_as_a_json_event(tmp_path, capsys):
    code = main(["watch", str(tmp_path / "missing"), "--preset", "ink-wash", "--out", str(tmp_path),
                 "--log-json"])
    event = json.loads(capsys.readouterr().err)
    assert code == 1 and event["event"] == "error" and "missing" in event["message"]


def test_a_config_with_log_json_reports_its_error_as_a_json_event(tmp_path, capsys):
    (tmp_path / "pipeline.toml").write_text(f'log_json = true\n[[folder]]\ninbox = "{tmp_path}"\n'
                                            f'out = "{tmp_path}"\npreset = "ink-wash"\n')
    code = main(["watch", "--config", str(tmp_path / "pipeline.toml")])
    event = json.loads(capsys.readouterr().err)
    assert code == 1 and event["event"] == "error" and "is inside inbox" in event["message"]


def _watch_events(tmp_path: Path, weights_file: Path, env: dict[str, str],
                  python: tuple[str, ...] = ("-m", "stylekit.cli")) -> list[dict]:
    """The JSON events of a real `stylekit watch --log-json` stopped by Ctrl-C once it is watching."""
    inbox, outbox = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    outbox.mkdir()
    command = [sys.executable, *python, "watch", str(inbox), "--preset", "ink-wash", "--out", str(outbox),
               "--weights", str(weights_file), "--size", "32", "--steps", "1", "--log-json"]
    env = {**os.environ, "STYLEKIT_CACHE_DIR": str(tmp_path / "cache"), **env}
    with subprocess.Popen(command, stderr=subprocess.PIPE, text=True, env=env) as watcher:
        deadline = threading.Timer(120, watcher.kill)
        deadline.start()
        lines = []
        for line in watcher.stderr:
            lines.append(line)
            if '"event": "watching"' in line:
                watcher.send_signal(signal.SIGINT)
        deadline.cancel()
    events = [json.loads(line) for line in lines]
    assert events[-1]["event"] == "stopped"
    return events


def test_watch_logs_a_warning_of_its_file_watcher_as_an_event(tmp_path, weights_file):
    # watchdog warns rarely (an inotify limit reached): here its observer warns as it starts.
    warns_on_start = ("import logging, runpy, sys; from watchdog.observers import Observer; "
                      "start = Observer.start; Observer.start = lambda self: (logging.getLogger("
                      "'watchdog.observers').warning('inotify watch limit reached'), start(self))[1]; "
                      "sys.argv[0] = 'stylekit'; runpy.run_module('stylekit.cli', run_name='__main__')")
    events = _watch_events(tmp_path, weights_file, {}, ("-c", warns_on_start))
    assert {"event": "warning", "message": "inotify watch limit reached"}.items() <= next(
        event for event in events if event["event"] == "warning").items()


def test_watch_log_json_logs_a_library_warning_as_a_json_event(tmp_path, weights_file):
    # The Gram cache warns of the limit while the watcher warms up.
    events = _watch_events(tmp_path, weights_file, {"STYLEKIT_GRAM_CACHE_MB": "lots"})
    assert any(event["event"] == "warning" and "STYLEKIT_GRAM_CACHE_MB='lots'" in event["message"]
               for event in events)
