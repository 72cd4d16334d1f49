"""Named presets: built-ins, user presets and their CLI, validation, and the style Gram cache."""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_painting, make_photo, save_png
from PIL import Image

from stylekit import disk_cache, gram_cache, presets, stylize
from stylekit.cli import main
from stylekit.engine import Runtime, torch_targets
from stylekit.errors import StylekitError
from stylekit.features import FeatureExtractor
from stylekit.gram_cache import cached_targets, grams_dir
from stylekit.image import load_image
from stylekit.presets import (
    add_preset,
    builtin_presets_dir,
    get_preset,
    list_presets,
    load_preset_file,
    preset_request,
    remove_preset,
    user_presets_dir,
)
from stylekit.weights import load_weights_file

BUILTINS = sorted(path.stem for path in builtin_presets_dir().glob("*.toml"))
BAD_NAMES = ["../x", "a b", "Swirl", "", "x/y", "dots.", "ünïcode", "a" * 65]


@pytest.fixture(autouse=True)
def config_home(tmp_path, monkeypatch) -> Path:
    """A fresh config folder per test, so user presets never leak between tests."""
    home = tmp_path / "config"
    monkeypatch.setenv("XDG_CONFIG_HOME", str(home))
    return home


@pytest.fixture
def tiny(weights_file) -> dict[str, object]:
    """Overrides that make any preset run in a moment on the test weights."""
    return {"weights": str(weights_file), "steps": 2, "size": 32, "scales": 1, "device": "cpu"}


@pytest.fixture
def empty_gram_cache() -> None:
    """Start without cached Grams (other tests apply the same presets to the same tiny image)."""
    shutil.rmtree(grams_dir(), ignore_errors=True)


def write_preset(folder: Path, name: str, body: str, image: str | None = "style.png") -> Path:
    """A preset file (and a style image beside it) written by hand, as a user would."""
    folder.mkdir(parents=True, exist_ok=True)
    if image:
        save_png(folder / image, make_painting())
    path = folder / f"{name}.toml"
    path.write_text(body)
    return path


def minimal(name: str, extra: str = "") -> str:
    """The smallest valid preset text, plus extra lines."""
    return f'name = "{name}"\ntitle = "T"\n[[style]]\nimage = "style.png"\n{extra}'


def age(folder: Path) -> None:
    """Make a version folder look superseded long enough ago for every reader to be done with it."""
    long_ago = time.time() - presets.SUPERSEDED_KEEP_S - 1
    os.utime(folder, (long_ago, long_ago))


def gram_cache_events(caplog) -> list[str]:
    """'hit' or 'miss' per style forward pass the Gram cache was asked for."""
    return [r.getMessage().split()[2] for r in caplog.records if r.name == "stylekit.gram_cache"]


# Built-in presets


def test_at_least_six_builtin_presets_ship_and_load():
    presets = list_presets()
    assert len(BUILTINS) >= 6 and [p.name for p in presets] == BUILTINS
    assert all(p.builtin and p.title and all(s.is_file() for s in p.style_paths) for p in presets)


def test_builtin_presets_differ_in_style_images_or_options():
    signatures = {(p.style_paths, p.blend, json.dumps(p.options, sort_keys=True)) for p in list_presets()}
    assert len(signatures) == len(BUILTINS)
    assert {p.options.get("preserve_color", "none") for p in list_presets()} == {"none", "luminance",
                                                                                  "histogram"}


def test_builtin_style_images_are_small_and_have_their_licence_noted():
    licences = (builtin_presets_dir() / "LICENSES.md").read_text()
    for style in {s for p in list_presets() for s in p.style_paths}:
        with Image.open(style) as image:
            assert 256 <= max(image.size) <= 512
        assert style.stat().st_size <= 200 * 1024
        assert f"`{style.name}`" in licences


@pytest.mark.parametrize("name", BUILTINS)
def test_every_builtin_preset_applies_to_a_tiny_image(name, tiny):
    result = stylize(preset_request(get_preset(name), make_photo(), tiny))
    assert result.image.shape == (27, 32, 3) and np.isfinite(result.image).all()
    assert result.options.steps == 2 and result.targets.startswith("onnx:")


def test_preset_request_applies_preset_options_then_overrides():
    request = preset_request(get_preset("woodcut"), make_photo(), {"preserve_color": "none"})
    assert request.options.style_weight == 2e6 and request.options.content_weight == 2.0
    assert request.options.preserve_color == "none" and request.style_key == "woodcut"
    assert len(request.styles) == 1 and request.styles[0].shape == (384, 384, 3)


def test_preset_request_blends_several_style_images_with_their_weights():
    request = preset_request(get_preset("cosmic"), make_photo())
    assert len(request.styles) == 2 and request.options.style_blend == (0.7, 0.3)


# User presets


def test_user_presets_live_in_the_config_folder(config_home):
    assert user_presets_dir() == config_home / "stylekit" / "presets"


def test_user_preset_overrides_a_builtin_of_the_same_name():
    write_preset(user_presets_dir(), "swirl", minimal("swirl", "[options]\nsteps = 7\n"))
    chosen = get_preset("swirl")
    assert not chosen.builtin and chosen.options == {"steps": 7}
    listed = [p for p in list_presets() if p.name == "swirl"]
    assert len(listed) == 1 and not listed[0].builtin
    assert len(list_presets()) == len(BUILTINS)


def test_an_invalid_user_preset_is_skipped_in_the_list_with_a_warning(caplog):
    write_preset(user_presets_dir(), "broken", minimal("broken", "[options]\nsteps = 'many'\n"))
    with caplog.at_level(logging.WARNING, logger="stylekit.presets"):
        names = [p.name for p in list_presets()]
    assert "broken" not in names and "broken.toml" in caplog.text


def test_a_broken_user_preset_hides_the_builtin_it_overrides_in_the_list_too(caplog):
    write_preset(user_presets_dir(), "swirl", minimal("swirl", "[options]\nsteps = 'many'\n"))
    with caplog.at_level(logging.WARNING, logger="stylekit.presets"):
        names = [p.name for p in list_presets()]
    assert "swirl" not in names and "swirl.toml" in caplog.text and "built-in 'swirl'" in caplog.text
    with pytest.raises(StylekitError, match=r"swirl\.toml': key 'options\.steps'"):
        get_preset("swirl")  # what `apply --preset swirl` would meet: the user's file, not the built-in


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_preset_names_are_refused(name, painting_path):
    for action in (lambda: get_preset(name), lambda: remove_preset(name),
                   lambda: add_preset(name, [painting_path], {})):
        with pytest.raises(StylekitError, match="bad preset name"):
            action()
    assert not user_presets_dir().exists()


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(StylekitError, match=r"unknown preset 'nope' \(available: .*ink-wash"):
        get_preset("nope")


def test_add_copies_the_style_image_and_keeps_only_the_given_options(painting_path):
    preset = add_preset("my-ink", [painting_path], {"style_weight": 3e6, "style_layers": ("relu1_1",)},
                        title="Mine")
    assert preset.path == user_presets_dir() / "my-ink.toml" and preset.title == "Mine"
    assert [(path.parent.parent, path.name) for path in preset.style_paths] == [
        (user_presets_dir() / "my-ink", "style-1.png")]  # in my-ink/<version>/
    assert preset.options == {"style_weight": 3e6, "style_layers": ("relu1_1",)}
    painting_path.unlink()
    assert load_preset_file(preset.path) == preset


def test_add_refuses_to_replace_a_user_preset_unless_forced(painting_path):
    add_preset("mine", [painting_path], {})
    with pytest.raises(StylekitError, match="already exists"):
        add_preset("mine", [painting_path], {"steps": 5})
    assert add_preset("mine", [painting_path], {"steps": 5}, replace=True).options == {"steps": 5}


def test_add_never_deletes_a_folder_it_did_not_write(painting_path):
    folder = user_presets_dir() / "mine"
    folder.mkdir(parents=True)
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StylekitError, match="is not a preset's; move it away"):
        add_preset("mine", [painting_path], {}, replace=True)
    assert (folder / "notes.txt").read_text() == "mine"


def test_a_replacement_that_fails_to_write_leaves_the_old_preset_whole(painting_path, photo_path,
                                                                       monkeypatch):
    old = add_preset("mine", [painting_path], {"steps": 5})
    write_bytes = presets.write_bytes

    def disk_full_at_the_toml(target, data, exclusive=False):  # the last write: the images are in
        if Path(target).suffix == ".toml":
            raise OSError(28, "No space left on device")
        write_bytes(target, data, exclusive)

    monkeypatch.setattr(presets, "write_bytes", disk_full_at_the_toml)
    with pytest.raises(OSError, match="No space left"):
        add_preset("mine", [photo_path], {"steps": 9}, replace=True)
    assert load_preset_file(old.path) == old
    assert load_image(old.style_paths[0]).rgb.shape == load_image(painting_path).rgb.shape
    assert sorted(p.name for p in user_presets_dir().iterdir()) == ["mine", "mine.toml"]  # no leftovers
    assert [path.parent for path in old.style_paths] == list((user_presets_dir() / "mine").iterdir())


def _during_writes(monkeypatch, action) -> None:
    """Run action before each file add_preset writes: what another process could do meanwhile."""
    write_bytes = presets.write_bytes

    def write_after_action(target, data, exclusive=False):
        action()
        write_bytes(target, data, exclusive)

    monkeypatch.setattr(presets, "write_bytes", write_after_action)


def test_a_reader_during_a_replacement_sees_the_old_preset_or_the_new_one_whole(painting_path,
                                                                              photo_path, monkeypatch):
    add_preset("mine", [painting_path], {"steps": 5})
    shapes = {5: load_image(painting_path).rgb.shape, 9: load_image(photo_path).rgb.shape}
    seen = []

    def read():
        request = preset_request(get_preset("mine"), make_photo())
        seen.append((request.options.steps, request.styles[0].shape))

    _during_writes(monkeypatch, read)
    add_preset("mine", [photo_path], {"steps": 9}, replace=True)
    read()
    assert seen[0] == (5, shapes[5]) and seen[-1] == (9, shapes[9])
    assert all(shape == shapes[steps] for steps, shape in seen)


def test_a_preset_loaded_before_a_replacement_still_finds_its_style_images(painting_path, photo_path):
    loaded = add_preset("mine", [painting_path], {"steps": 5})
    add_preset("mine", [photo_path], {"steps": 9}, replace=True)
    request = preset_request(loaded, make_photo())
    assert request.styles[0].shape == load_image(painting_path).rgb.shape


def test_replaced_style_images_are_deleted_once_readers_had_their_time(painting_path, photo_path):
    first = add_preset("mine", [painting_path], {}).style_paths[0].parent
    second = add_preset("mine", [photo_path], {}, replace=True).style_paths[0].parent
    age(first)
    third = add_preset("mine", [painting_path], {}, replace=True).style_paths[0].parent
    assert sorted((user_presets_dir() / "mine").iterdir()) == sorted([second, third])


def test_of_two_adds_of_one_name_at_once_exactly_one_wins(painting_path, photo_path, monkeypatch):
    other = []

    def add_the_other_once():
        if not other:
            other.append(None)
            other[0] = add_preset("mine", [photo_path], {"steps": 9})

    _during_writes(monkeypatch, add_the_other_once)
    with pytest.raises(StylekitError, match=r"user preset 'mine' already exists .*use --force"):
        add_preset("mine", [painting_path], {"steps": 5})
    assert get_preset("mine") == other[0]
    assert [path.parent for path in other[0].style_paths] == list((user_presets_dir() / "mine").iterdir())


def test_add_refuses_bad_options_before_writing_anything(painting_path):
    with pytest.raises(StylekitError, match="bad steps 0"):
        add_preset("mine", [painting_path], {"steps": 0})
    assert not (user_presets_dir() / "mine.toml").exists()


@pytest.mark.parametrize(("options", "message"), [
    ({"content_layers": ("relu9_9",)}, "unknown layer 'relu9_9'"),
    ({"style_blend": (0.0,)}, "--style-blend weights are all 0"),
    ({"style_blend": (-1.0,)}, r"bad style_blend -1.0 \(must be a finite number ≥ 0\)"),
    ({"style_blend": (0.5, 0.5)}, r"--style-blend has 2 weights for 1 --style image \(one weight each\)"),
])
def test_add_names_a_bad_flag_in_its_own_words_not_as_a_file_error(painting_path, options, message):
    with pytest.raises(StylekitError, match=message) as error:
        add_preset("mine", [painting_path], options)
    assert "preset file" not in str(error.value)


@pytest.mark.parametrize("title", ["two\nlines", "red \x1b[31mtext"])
def test_add_refuses_a_title_that_is_not_one_printable_line(painting_path, title):
    with pytest.raises(StylekitError, match="--title must be one line of printable text"):
        add_preset("mine", [painting_path], {}, title=title)


def test_add_keeps_a_weights_files_full_path_so_the_preset_works_from_any_folder(painting_path,
                                                                                weights_file, monkeypatch):
    monkeypatch.chdir(weights_file.parent)
    add_preset("mine", [painting_path], {"weights": weights_file.name})
    monkeypatch.chdir(painting_path.parent)
    assert preset_request(get_preset("mine"), make_photo()).options.weights == str(weights_file)


def test_add_refuses_a_weights_file_that_is_not_there(painting_path):
    with pytest.raises(StylekitError, match=r"weights file 'typo\.pth' not found"):
        add_preset("mine", [painting_path], {"weights": "typo.pth"})
    assert not user_presets_dir().exists()


def test_a_preset_files_weights_file_is_relative_to_it_as_its_images_are(tmp_path):
    file = write_preset(tmp_path / "mine", "sketch", minimal("sketch", '[options]\nweights = "net.pth"\n'))
    seeded = write_preset(tmp_path, "rand", minimal("rand", '[options]\nweights = "random:3"\n'))
    assert load_preset_file(file).options["weights"] == str(tmp_path / "mine" / "net.pth")
    assert load_preset_file(seeded).options["weights"] == "random:3"


def test_remove_deletes_a_user_preset_and_its_images_but_never_a_builtin(painting_path):
    add_preset("mine", [painting_path], {})
    remove_preset("mine")
    assert not (user_presets_dir() / "mine.toml").exists()
    with pytest.raises(StylekitError, match="unknown preset 'mine'"):
        get_preset("mine")
    with pytest.raises(StylekitError, match="'swirl' is a built-in preset"):
        remove_preset("swirl")


def test_a_preset_loaded_before_its_removal_still_finds_its_style_images(painting_path):
    loaded = add_preset("mine", [painting_path], {"steps": 5})
    remove_preset("mine")
    request = preset_request(loaded, make_photo())
    assert request.styles[0].shape == load_image(painting_path).rgb.shape


def test_removed_style_images_are_deleted_once_readers_had_their_time(painting_path):
    images = add_preset("mine", [painting_path], {}).style_paths[0].parent
    remove_preset("mine")
    age(images)
    add_preset("other", [painting_path], {})
    remove_preset("other")
    assert sorted(p.name for p in user_presets_dir().iterdir()) == ["other"]  # kept its hour


def test_remove_keeps_the_users_own_files_beside_a_hand_written_preset():
    folder = user_presets_dir()
    (folder / "sketch").mkdir(parents=True)  # the user's own image, in presets/sketch/
    write_preset(folder, "sketch", minimal("sketch").replace("style.png", "sketch/ink.png"), "sketch/ink.png")
    remove_preset("sketch")
    assert not (folder / "sketch.toml").exists() and (folder / "sketch" / "ink.png").is_file()


def test_a_first_add_that_fails_to_write_leaves_nothing_behind(painting_path, monkeypatch):
    def disk_full(target, data, exclusive=False):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(presets, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        add_preset("mine", [painting_path], {})
    assert list(user_presets_dir().iterdir()) == []


# Invalid files


@pytest.mark.parametrize(("extra", "key"), [
    ("[options]\nsteps = 'many'\n", "options.steps"),
    ("[options]\nstyle_layers = 'relu1_1'\n", "options.style_layers"),
    ("[options]\nsharpness = 2\n", "options.sharpness"),
    ("[options]\nstyle_blend = [1.0]\n", "options.style_blend"),
    ("[options]\nsteps = 0\n", "options"),
    ("[options]\npreserve_color = 'sepia'\n", "options"),
    ("weight = -1\n", "style[1].weight"),
    ("wieght = 1\n", "style[1].wieght"),
])
def test_invalid_preset_file_error_names_the_file_and_the_key(tmp_path, extra, key):
    path = write_preset(tmp_path, "p", minimal("p", extra))
    with pytest.raises(StylekitError) as info:
        load_preset_file(path)
    assert f"preset file '{path}'" in str(info.value) and f"key '{key}'" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("body", "key"), [
    ('title = "T"\n[[style]]\nimage = "style.png"\n', "name"),
    ('name = "other"\ntitle = "T"\n[[style]]\nimage = "style.png"\n', "name"),
    ('name = "p"\ntitle = "T"\n', "style"),
    ('name = "p"\ntitle = ""\n[[style]]\nimage = "style.png"\n', "title"),
    ('name = "p"\ntitle = """two\nlines"""\n[[style]]\nimage = "style.png"\n', "title"),
    ('name = "p"\ntitle = "T"\ncolour = "red"\n[[style]]\nimage = "style.png"\n', "colour"),
])
def test_preset_file_needs_name_title_style_and_no_unknown_keys(tmp_path, body, key):
    path = write_preset(tmp_path, "p", body)
    with pytest.raises(StylekitError, match=rf"^preset file '.*p\.toml': key '{key}'"):
        load_preset_file(path)


def test_preset_file_that_is_not_toml_is_refused_naming_it(tmp_path):
    path = write_preset(tmp_path, "p", "name = = 'p'\n")
    with pytest.raises(StylekitError, match=rf"^preset file '{path}' is not valid TOML"):
        load_preset_file(path)


def test_missing_style_image_error_names_the_image(tmp_path):
    path = write_preset(tmp_path, "p", minimal("p").replace("style.png", "gone.jpg"), image=None)
    with pytest.raises(StylekitError, match=rf"style image '{tmp_path / 'gone.jpg'}', which is not found"):
        load_preset_file(path)


# CLI


def run(capsys, *args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; returns (exit code, stdout, stderr)."""
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_presets_list_and_show(capsys):
    code, out, _ = run(capsys, "presets", "list")
    assert code == 0 and [line.split()[0] for line in out.splitlines()] == BUILTINS
    code, out, _ = run(capsys, "presets", "show", "ink-wash")
    assert code == 0 and "ink-wash.jpg (weight 1)" in out and "style_weight = 3000000.0" in out


def test_presets_list_prints_a_skipped_file_as_a_warning_like_the_clis_own(capsys):
    write_preset(user_presets_dir(), "broken", minimal("broken", "[options]\nsteps = 'many'\n"))
    code, out, err = run(capsys, "presets", "list")
    assert code == 0 and "broken" not in out
    assert err.startswith("warning: preset file '") and "broken.toml" in err and err.endswith("; skipped\n")


def test_presets_add_then_remove_from_the_command_line(capsys, painting_path):
    code, out, _ = run(capsys, "presets", "add", "my-ink", "--style", str(painting_path),
                       "--style-weight", "3e6", "--preserve-color", "luminance", "--title", "My ink")
    assert code == 0 and "saved preset 'my-ink'" in out
    assert get_preset("my-ink").options == {"style_weight": 3e6, "preserve_color": "luminance"}
    assert "my-ink           user     My ink" in run(capsys, "presets", "list")[1]
    assert run(capsys, "presets", "remove", "my-ink")[0] == 0
    assert "my-ink" not in run(capsys, "presets", "list")[1]


@pytest.mark.parametrize("command", [["show"], ["remove"], ["add", "--style", "x.png"]])
def test_presets_commands_refuse_a_path_as_a_name_in_one_line(capsys, command):
    code, _, err = run(capsys, "presets", command[0], "../x", *command[1:])
    assert code == 1 and "bad preset name '../x'" in err and err.count("\n") == 1


def test_apply_refuses_a_path_as_a_preset_name_in_one_line(capsys, tmp_path, photo_path):
    code, _, err = run(capsys, "apply", str(photo_path), "--preset", "../x", "-o", str(tmp_path / "o.png"))
    assert code == 1 and err == "stylekit: error: bad preset name '../x' (use 1–64 lowercase letters, " \
                               "digits and '-')\n"


def test_preset_request_given_a_name_instead_of_a_preset_says_so():
    with pytest.raises(StylekitError, match=r"^preset_request takes a Preset \(see get_preset\), not str$"):
        preset_request("ink-wash", np.zeros((32, 32, 3), np.float32))


def test_a_preset_file_with_a_size_under_the_smallest_output_is_refused(painting_path):
    path = painting_path.parent / "tiny.toml"
    path.write_text(f'name = "tiny"\ntitle = "Tiny"\n[[style]]\nimage = "{painting_path.name}"\n'
                    '[options]\nsize = 15\n', encoding="utf-8")
    with pytest.raises(StylekitError, match=r"bad size 15 \(the output's long side in pixels: at least 16\)"):
        load_preset_file(path)


def test_presets_validate_reports_ok_or_the_problem(capsys, tmp_path):
    good = write_preset(tmp_path, "good", minimal("good"))
    code, out, _ = run(capsys, "presets", "validate", str(good))
    assert code == 0 and "ok" in out
    bad = write_preset(tmp_path, "bad", minimal("bad", "[options]\nsteps = -3\n"))
    code, _, err = run(capsys, "presets", "validate", str(bad))
    assert code == 1 and str(bad) in err and "key 'options'" in err and err.count("\n") == 1


def test_presets_validate_decodes_the_style_images(capsys, tmp_path):
    preset = write_preset(tmp_path, "fake", minimal("fake"))
    (tmp_path / "style.png").write_text("not an image")
    code, _, err = run(capsys, "presets", "validate", str(preset))
    assert code == 1 and "style.png" in err and err.count("\n") == 1


def test_presets_validate_refuses_a_weights_file_that_is_not_there(capsys, tmp_path):
    preset = write_preset(tmp_path, "gone", minimal("gone", '[options]\nweights = "missing.pth"\n'))
    code, _, err = run(capsys, "presets", "validate", str(preset))
    assert code == 1 and "'options.weights' names" in err and "missing.pth" in err and err.count("\n") == 1


def test_apply_with_a_preset_lets_flags_override_its_options(capsys, tmp_path, photo_path, weights_file):
    out, report = tmp_path / "out.png", tmp_path / "report.json"
    code, _, err = run(capsys, "apply", str(photo_path), "--preset", "woodcut", "-o", str(out),
                       "--weights", str(weights_file), "--steps", "2", "--size", "32",
                       "--preserve-color", "none", "--report", str(report))
    assert code == 0, err
    data = json.loads(report.read_text())
    assert data["options"]["preserve_color"] == "none" and data["options"]["style_weight"] == 2e6
    assert data["targets"] == "onnx:CPUExecutionProvider" and load_image(out).rgb.shape == (27, 32, 3)


@pytest.mark.parametrize(("choice", "message"), [
    ([], "give either --preset NAME or at least one --style image"),
    (["--style", "painting.png", "--preset", "swirl"], "give --preset NAME or --style images, not both"),
], ids=["neither", "both"])
def test_apply_needs_either_a_preset_or_style_images(capsys, tmp_path, photo_path, choice, message):
    code, _, err = run(capsys, "apply", str(photo_path), "-o", str(tmp_path / "o.png"), *choice)
    assert code == 2 and message in err


# The style Gram cache


@pytest.fixture(scope="module")
def relu1_targets(weights_file):
    """A real torch TargetFn for relu1_1 only: the cheapest forward pass to cache."""
    extractor = FeatureExtractor("vgg19", load_weights_file(weights_file, "vgg19").state_dict, ("relu1_1",))
    return torch_targets(extractor, Runtime(torch.device("cpu"), torch.float32))


def _counting(targets, calls: list):
    """The TargetFn, noting each image it really computes."""
    def compute(image, feature_layers, gram_layers):
        calls.append(image)
        return targets(image, feature_layers, gram_layers)
    return compute


def test_gram_cache_skips_the_style_forward_pass_on_a_repeat(relu1_targets):
    calls: list[torch.Tensor] = []
    counted = _counting(relu1_targets, calls)
    compute = cached_targets(counted, "context", "test")
    style = torch.rand(1, 3, 24, 24)
    first, second = compute(style, (), ("relu1_1",)), compute(style.clone(), (), ("relu1_1",))
    assert len(calls) == 1 and torch.equal(first["gram_relu1_1"], second["gram_relu1_1"])
    compute(style + 0.01, (), ("relu1_1",))
    cached_targets(counted, "other weights", "test")(style, (), ("relu1_1",))
    assert len(calls) == 3


def test_gram_cache_recomputes_an_unreadable_entry(relu1_targets):
    compute = cached_targets(relu1_targets, "context", "corrupt")
    style = torch.rand(1, 3, 20, 20)
    expected = compute(style, (), ("relu1_1",))
    for entry in grams_dir().glob("corrupt-*.pt"):
        entry.write_bytes(b"truncated")
    assert torch.equal(compute(style, (), ("relu1_1",))["gram_relu1_1"], expected["gram_relu1_1"])


def test_gram_cache_recomputes_an_entry_whose_values_were_damaged(relu1_targets):
    compute = cached_targets(relu1_targets, "context", "damaged")
    style = torch.rand(1, 3, 20, 20)
    expected = compute(style, (), ("relu1_1",))
    for entry in grams_dir().glob("damaged-*.pt"):  # still a valid file, with other numbers inside
        data = torch.load(entry, weights_only=True)
        data["tensors"]["gram_relu1_1"] = data["tensors"]["gram_relu1_1"] * 1000
        torch.save(data, entry)
    assert torch.equal(compute(style, (), ("relu1_1",))["gram_relu1_1"], expected["gram_relu1_1"])


def test_a_gram_cache_that_cannot_be_written_only_costs_speed(relu1_targets, monkeypatch, caplog):
    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(torch, "save", disk_full)  # how torch.save reports a full disk
    compute = cached_targets(relu1_targets, "context", "full-disk")
    assert "gram_relu1_1" in compute(torch.rand(1, 3, 20, 20), (), ("relu1_1",))
    assert "cannot write Gram cache file" in caplog.text


def test_a_cache_folder_that_is_a_file_is_reported_once_per_run(relu1_targets, monkeypatch, tmp_path,
                                                                 caplog):
    (tmp_path / "not-a-folder").write_text("")
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path / "not-a-folder"))
    with caplog.at_level(logging.WARNING, logger="stylekit.gram_cache"):
        cached_targets(relu1_targets, "context", "file")(torch.rand(1, 3, 20, 20), (), ("relu1_1",))
    assert [r.getMessage().split()[:4] for r in caplog.records] == [["cannot", "write", "Gram", "cache"]]


def test_a_gram_cache_write_cut_short_is_reported_without_torchs_internals(relu1_targets, monkeypatch,
                                                                          caplog):
    def disk_full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")

    monkeypatch.setattr(torch, "save", disk_full)
    cached_targets(relu1_targets, "context", "cut-short")(torch.rand(1, 3, 20, 20), (), ("relu1_1",))
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert message.endswith("(the write was cut short: is the disk full?)") and "enforce" not in message


def test_a_gram_cache_entry_pruned_by_another_process_is_a_quiet_miss(relu1_targets, monkeypatch, caplog):
    compute = cached_targets(relu1_targets, "context", "pruned")
    style = torch.rand(1, 3, 20, 20)
    expected = compute(style, (), ("relu1_1",))
    load = torch.load

    def pruned_just_before(path, *args, **kwargs):  # another process's prune, between look and read
        Path(path).unlink()
        return load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", pruned_just_before)
    assert torch.equal(compute(style, (), ("relu1_1",))["gram_relu1_1"], expected["gram_relu1_1"])
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_gram_cache_drops_the_least_recently_used_entry_beyond_its_limit(relu1_targets, tmp_path,
                                                                         monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    calls: list[torch.Tensor] = []
    compute = cached_targets(_counting(relu1_targets, calls), "context", "lru")
    old, unused, new = (torch.rand(1, 3, 20, 20) for _ in range(3))
    compute(old, (), ("relu1_1",))
    entry_bytes = next(grams_dir().glob("lru-*.pt")).stat().st_size
    monkeypatch.setenv("STYLEKIT_GRAM_CACHE_MB", str(2.5 * entry_bytes / (1 << 20)))
    for image in (unused, old, new):  # `old` is read back, so `unused` is now the least recent
        time.sleep(0.05)  # distinct modification times even on coarse-clock file systems
        compute(image, (), ("relu1_1",))
    assert len(list(grams_dir().glob("lru-*.pt"))) == 2
    calls.clear()
    for image in (old, new, unused):
        compute(image, (), ("relu1_1",))
    assert len(calls) == 1 and calls[0] is unused


def test_gram_cache_limit_of_zero_keeps_nothing_on_disk(relu1_targets, tmp_path, monkeypatch):
    monkeypatch.setenv("STYLEKIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("STYLEKIT_GRAM_CACHE_MB", "0")
    targets = cached_targets(relu1_targets, "context", "none")(torch.rand(1, 3, 20, 20), (), ("relu1_1",))
    assert "gram_relu1_1" in targets and not list(grams_dir().glob("*.pt"))


@pytest.mark.parametrize("value", ["lots", "-1", "inf"])
def test_gram_cache_limit_that_is_no_size_falls_back_to_the_default(value, monkeypatch, caplog):
    disk_cache._warn_unusable_limit.cache_clear()  # said once per process: this test must see it said
    monkeypatch.setenv("STYLEKIT_GRAM_CACHE_MB", value)
    assert gram_cache.limit_bytes() == gram_cache.DEFAULT_LIMIT_MB * (1 << 20)
    assert "STYLEKIT_GRAM_CACHE_MB" in caplog.text


def test_an_unusable_gram_cache_limit_is_reported_once_not_per_image(monkeypatch, caplog):
    disk_cache._warn_unusable_limit.cache_clear()
    monkeypatch.setenv("STYLEKIT_GRAM_CACHE_MB", "plenty")
    gram_cache.limit_bytes()
    gram_cache.limit_bytes()
    assert caplog.text.count("STYLEKIT_GRAM_CACHE_MB") == 1


def test_applying_a_preset_again_reads_its_grams_from_the_cache(tiny, caplog, empty_gram_cache):
    caplog.set_level(logging.DEBUG, logger="stylekit.gram_cache")
    preset = get_preset("swirl")
    first = stylize(preset_request(preset, make_photo(seed=5), tiny))
    assert gram_cache_events(caplog) == ["miss"]
    caplog.clear()
    second = stylize(preset_request(preset, make_photo(seed=6), tiny))
    assert gram_cache_events(caplog) == ["hit"]
    assert first.targets == second.targets


def test_gram_cache_is_invalidated_when_the_style_image_changes(tiny, caplog, empty_gram_cache,
                                                                painting_path):
    caplog.set_level(logging.DEBUG, logger="stylekit.gram_cache")
    preset = add_preset("changing", [painting_path], {})
    stylize(preset_request(preset, make_photo(), tiny))
    stylize(preset_request(preset, make_photo(), tiny))
    save_png(preset.style_paths[0], make_painting(seed=9))
    stylize(preset_request(get_preset("changing"), make_photo(), tiny))
    assert gram_cache_events(caplog) == ["miss", "hit", "miss"]


def test_gram_cache_is_invalidated_when_style_options_or_weights_change(tiny, caplog, empty_gram_cache):
    caplog.set_level(logging.DEBUG, logger="stylekit.gram_cache")
    preset = get_preset("pointillism")
    stylize(preset_request(preset, make_photo(), tiny))
    stylize(preset_request(preset, make_photo(), {**tiny, "style_scale": 0.75}))
    stylize(preset_request(preset, make_photo(), {**tiny, "weights": "random:11"}))
    assert gram_cache_events(caplog) == ["miss", "miss", "miss"]


def test_histogram_colour_presets_are_not_cached(tiny, caplog, empty_gram_cache):
    caplog.set_level(logging.DEBUG, logger="stylekit.gram_cache")
    stylize(preset_request(get_preset("cubist"), make_photo(), tiny))
    assert gram_cache_events(caplog) == []
