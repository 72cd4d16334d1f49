"""Named style presets: TOML files pairing style images (with blend weights) and engine options.

Built-in presets ship in stylekit/builtin_presets; user presets live in the platform's config folder
and override built-ins by name. A preset file looks like this (image paths are relative to it):

    name = "ink-wash"
    title = "Ink wash"
    [[style]]
    image = "ink-wash.jpg"
    weight = 1.0
    [options]
    style_weight = 3e6
    preserve_color = "none"
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import platformdirs
import tomli_w

from . import builtin_presets
from .atomic import write_bytes
from .errors import StylekitError, printable
from .image import load_image
from .request import OPTION_KINDS, StyleOptions, StyleRequest, describe_kind, is_kind, validate
from .weights_cache import names_a_file

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

NAME_PATTERN = re.compile(r"[a-z0-9-]{1,64}")
TOP_KEYS = ("name", "title", "style", "options")
STYLE_KEYS = ("image", "weight")
BLEND_OPTION = "style_blend"  # set by each [[style]] weight, never under [options]
VERSION_PATTERN = re.compile(r"[0-9a-f]{16}")  # a version folder's name: secrets.token_hex(8)
SUPERSEDED_KEEP_S = 3600.0  # a replaced version's images stay this long for readers that loaded it

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Preset:
    """A validated preset: where it came from, its style images with blend weights, and options."""

    name: str
    title: str
    path: Path
    style_paths: tuple[Path, ...]
    blend: tuple[float, ...]
    options: dict[str, object]  # StyleOptions field names → values
    builtin: bool


def builtin_presets_dir() -> Path:
    """The package folder holding the built-in preset files and their style images."""
    return Path(builtin_presets.__file__).parent


def user_presets_dir() -> Path:
    """The user's preset folder (~/.config/stylekit/presets on Linux; XDG_CONFIG_HOME honoured)."""
    return Path(platformdirs.user_config_dir("stylekit")) / "presets"


def check_name(name: str) -> str:
    """Refuse names that are not [a-z0-9-]+, so a name can never escape the preset folder."""
    if not NAME_PATTERN.fullmatch(name):
        raise StylekitError(f"bad preset name '{printable(name)}' "
                            "(use 1–64 lowercase letters, digits and '-')")
    return name


def _scalar(value: object, kind: type) -> object | None:
    """The value as `kind` (ints accepted as floats), or None when it has another type."""
    if not is_kind(value, kind):
        return None
    return float(value) if kind is float else value


def _option(value: object, kind: type | tuple[type]) -> object | None:
    """A TOML value converted to what StyleOptions holds (lists become tuples), or None if wrong."""
    if isinstance(kind, tuple):
        if not isinstance(value, list) or not value:
            return None
        items = [_scalar(item, kind[0]) for item in value]
        return None if any(item is None for item in items) else tuple(items)
    return _scalar(value, kind)


def _fail(path: Path, key: str, problem: str) -> typing.NoReturn:
    """Every preset-file error names the file and the key."""
    raise StylekitError(f"preset file '{path}': key '{key}' {problem}")


def _styles(styles: object, path: Path) -> tuple[tuple[Path, ...], tuple[float, ...]]:
    """The [[style]] tables: image paths (relative to the file, which must exist) and blend weights."""
    if not isinstance(styles, list) or not styles or not all(isinstance(s, dict) for s in styles):
        _fail(path, "style", "must be one or more [[style]] tables with an image")
    style_paths, blend = [], []
    for index, style in enumerate(styles, start=1):
        where = f"style[{index}]"
        for key in style:
            if key not in STYLE_KEYS:
                _fail(path, f"{where}.{key}", f"is not a style key (use {', '.join(STYLE_KEYS)})")
        image, weight = style.get("image"), _scalar(style.get("weight", 1.0), float)
        if not isinstance(image, str) or not image:
            _fail(path, f"{where}.image", "must be the style image's path (relative to the preset file)")
        if weight is None or not 0 <= weight < float("inf"):
            _fail(path, f"{where}.weight", "must be a number ≥ 0")
        resolved = path.parent / image
        if not resolved.is_file():
            _fail(path, f"{where}.image", f"names style image '{resolved}', which is not found")
        style_paths.append(resolved)
        blend.append(weight)
    if sum(blend) <= 0:
        _fail(path, "style", "weights are all 0")
    return tuple(style_paths), tuple(blend)


def _options(options: object, blend: tuple[float, ...], path: Path) -> dict[str, object]:
    """The [options] table as StyleOptions values, type-checked per key, then checked by the engine."""
    if not isinstance(options, dict):
        _fail(path, "options", "must be an [options] table")
    converted: dict[str, object] = {}
    for key, value in options.items():
        if key == BLEND_OPTION:
            _fail(path, f"options.{key}", "is not allowed (give each [[style]] a weight instead)")
        if key not in OPTION_KINDS:
            _fail(path, f"options.{key}", "is not an engine option")
        converted[key] = _option(value, OPTION_KINDS[key])
        if converted[key] is None:
            _fail(path, f"options.{key}", f"must be {describe_kind(OPTION_KINDS[key])}")
    if names_a_file(converted.get("weights", "auto")):  # relative to the file, as its style images
        converted["weights"] = str(path.parent / converted["weights"])
    try:
        validate(StyleOptions().replace(**converted, style_blend=blend))
    except StylekitError as exc:
        _fail(path, "options", f"is invalid: {exc}")
    return converted


def _parse(data: dict, path: Path, builtin: bool) -> Preset:
    """Validate a preset's TOML data into a Preset."""
    for key in data:
        if key not in TOP_KEYS:
            _fail(path, key, f"is not a preset key (use {', '.join(TOP_KEYS)})")
    for key in ("name", "title", "style"):
        if key not in data:
            _fail(path, key, "is missing")
    name, title = data["name"], data["title"]
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        _fail(path, "name", "must be 1–64 lowercase letters, digits and '-'")
    if name != path.stem:
        _fail(path, "name", f"is '{name}' but the file is named '{path.name}' (they must match)")
    if not isinstance(title, str) or not title.strip() or not title.strip().isprintable():
        _fail(path, "title", "must be one line of printable text")  # presets list shows it on a line
    style_paths, blend = _styles(data["style"], path)
    options = _options(data.get("options", {}), blend, path)
    return Preset(name, title.strip(), path, style_paths, blend, options, builtin)


def load_preset_file(path: str | os.PathLike[str]) -> Preset:
    """Read and validate one preset file; StylekitError naming the file (and the key) if it is bad."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StylekitError(f"preset file '{path}' not found") from None
    except UnicodeDecodeError:
        raise StylekitError(f"preset file '{path}' is not UTF-8 text") from None
    except OSError as exc:
        raise StylekitError(f"cannot read preset file '{path}' ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise StylekitError(f"preset file '{path}' is not valid TOML ({exc})") from None
    builtin = path.resolve().parent == builtin_presets_dir().resolve()
    return _parse(data, path, builtin)


def _preset_files() -> dict[str, Path]:
    """Each preset name's file, a user file overriding the built-in one: the file get_preset reads."""
    files: dict[str, Path] = {}
    for folder in (builtin_presets_dir(), user_presets_dir()):
        files.update((file.stem, file) for file in folder.glob("*.toml") if file.is_file())
    return files


def list_presets() -> list[Preset]:
    """Every preset get_preset would give, user ones overriding built-ins by name; invalid files are
    logged and skipped (a broken user preset hides the built-in of its name, as it does for get_preset)."""
    presets = []
    for name, file in sorted(_preset_files().items()):
        try:
            presets.append(load_preset_file(file))
        except StylekitError as exc:
            overrides = file.parent != builtin_presets_dir() and (builtin_presets_dir() / file.name).is_file()
            log.warning("%s; skipped%s", exc,
                        f" (and the built-in '{name}' it overrides is not used either)" if overrides else "")
    return presets


def get_preset(name: str) -> Preset:
    """The user's preset of that name if there is one, else the built-in one."""
    files = _preset_files()
    if check_name(name) not in files:
        raise StylekitError(f"unknown preset '{name}' (available: {', '.join(sorted(files))})")
    return load_preset_file(files[name])


def preset_request(preset: Preset, content: np.ndarray,
                   overrides: dict[str, object] | None = None) -> StyleRequest:
    """A StyleRequest for the preset's styles and options, `overrides` (e.g. CLI flags) winning."""
    if not isinstance(preset, Preset):
        raise StylekitError(f"preset_request takes a Preset (see get_preset), not {type(preset).__name__}")
    styles = [load_image(path).rgb for path in preset.style_paths]
    options = StyleOptions().replace(**preset.options, style_blend=preset.blend)
    options = options.replace(**(overrides or {}))
    return StyleRequest(content=content, styles=styles, options=options, style_key=preset.name)


def _toml_value(value: object) -> object:
    """StyleOptions values as TOML can hold them (tuples become lists)."""
    return list(value) if isinstance(value, tuple) else value


def add_preset(name: str, style_files: Sequence[str | os.PathLike[str]], options: dict[str, object],
               title: str | None = None, replace: bool = False) -> Preset:
    """Save a user preset: copies the style images into NAME/<version>/, so moving the originals is safe.

    options["style_blend"], if given, becomes the [[style]] weights.
    """
    check_name(name)
    folder = user_presets_dir()
    file = folder / f"{name}.toml"
    taken = f"user preset '{name}' already exists ({file}); use --force to replace it"
    if file.exists() and not replace:
        raise StylekitError(taken)
    sources = [Path(source) for source in style_files]
    if not sources:
        raise StylekitError("a preset needs at least one --style image")
    for source in sources:
        load_image(source)  # refuse a missing or unreadable image before anything is written
    title = (title or "").strip() or name
    if not title.isprintable():
        raise StylekitError("--title must be one line of printable text")
    options = dict(options)
    blend = options.pop(BLEND_OPTION, None) or tuple(1.0 for _ in sources)
    if len(blend) != len(sources):
        weights, images = (f"{n} {what}{'s' if n != 1 else ''}"
                           for n, what in ((len(blend), "weight"), (len(sources), "--style image")))
        raise StylekitError(f"--style-blend has {weights} for {images} (one weight each)")
    validate(StyleOptions().replace(**options, style_blend=blend))  # in the flags' words, not a file's
    if sum(blend) <= 0:
        raise StylekitError("--style-blend weights are all 0")
    if names_a_file(options.get("weights", "auto")):  # saved whole: a run may start in any folder
        if not Path(options["weights"]).is_file():
            raise StylekitError(f"weights file '{options['weights']}' not found")
        options["weights"] = str(Path(options["weights"]).resolve())
    data = {"name": name, "title": title,
            "style": [{"image": str(source.resolve()), "weight": float(weight)}
                      for source, weight in zip(sources, blend, strict=True)],
            "options": {key: _toml_value(value) for key, value in options.items()}}
    _parse(data, file, builtin=False)
    copies = {f"style-{index}{source.suffix.lower()}": source.read_bytes()  # read first: a source
              for index, source in enumerate(sources, start=1)}  # may sit in a folder pruned below
    images = folder / name
    if not file.exists() and _foreign(images):
        raise StylekitError(f"'{images}' already exists and is not a preset's; move it away first")
    version = images / secrets.token_hex(8)
    for style, copy in zip(data["style"], copies, strict=True):
        style["image"] = f"{name}/{version.name}/{copy}"
    try:
        _publish(file, version, copies, tomli_w.dumps(data).encode("utf-8"), replace)
    except FileExistsError:  # another `presets add` of this name won the race
        raise StylekitError(taken) from None
    return _parse(data, file, builtin=False)


def _is_version(entry: Path) -> bool:
    """Whether a NAME/ entry is one version's folder of style copies, as add_preset makes them."""
    return bool(VERSION_PATTERN.fullmatch(entry.name)) and entry.is_dir()


def _foreign(images: Path) -> bool:
    """A NAME/ folder (with no NAME.toml) holding anything but version folders is the user's own."""
    if not images.is_dir():
        return images.exists()
    return not all(_is_version(entry) for entry in images.iterdir())


def _publish(file: Path, version: Path, copies: dict[str, bytes], toml: bytes, replace: bool) -> None:
    """Write the style copies into the version's own folder, then swap the TOML that names them in
    (or create it, failing with FileExistsError if it exists): a reader sees the old preset or the
    new one whole, and a failure (a full disk) leaves the old one as it was."""
    version.mkdir(parents=True)
    try:
        for copy, payload in copies.items():
            write_bytes(version / copy, payload)
        if replace:
            _mark_superseded(file)
        write_bytes(file, toml, exclusive=not replace)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)
        with contextlib.suppress(OSError):  # a first add's NAME/, now empty
            version.parent.rmdir()
        raise
    _prune_superseded(file.parent, added=version)


def _mark_superseded(file: Path) -> None:
    """Date the version folders the preset file names now: from now on they count as superseded,
    kept SUPERSEDED_KEEP_S for the runs that loaded the preset before it was replaced or removed."""
    for entry in _in_use(file):
        with contextlib.suppress(OSError):
            os.utime(entry)


def _prune_superseded(folder: Path, added: Path | None = None) -> None:
    """Delete the version folders superseded over SUPERSEDED_KEEP_S ago: those of the preset whose new
    version was just `added`, and of removed presets (NAME.toml gone), whose NAME/ goes too once
    empty. Never another preset's (the version it names may be old, yet in use), nor a user's file."""
    stale, replaced = time.time() - SUPERSEDED_KEEP_S, added.parent if added else None
    for images in folder.iterdir():
        removed = not (folder / f"{images.name}.toml").exists()
        if not removed and images != replaced:
            continue
        versions = _versions(images)
        for entry in versions:
            with contextlib.suppress(OSError):
                if entry != added and entry.stat().st_mtime < stale:
                    shutil.rmtree(entry)
        if removed and versions:
            with contextlib.suppress(OSError):  # not empty: images still kept, or the user's own files
                images.rmdir()


def _in_use(file: Path) -> set[Path]:
    """The version folders whose images the preset file names now (none if it is missing or broken)."""
    try:
        return {path.parent for path in load_preset_file(file).style_paths if _is_version(path.parent)}
    except StylekitError:
        return set()


def _versions(images: Path) -> list[Path]:
    """The version folders in a preset's NAME/ folder (none if it is missing)."""
    try:
        return [entry for entry in images.iterdir() if _is_version(entry)]
    except OSError:
        return []


def remove_preset(name: str) -> Path:
    """Delete a user preset: its file at once, so no new run finds it, and the style images that
    `presets add` copied once they are SUPERSEDED_KEEP_S old, so a run that loaded it still finds them
    (as after a replacement). Other files in NAME/ are the user's and stay; built-ins cannot go."""
    check_name(name)
    folder = user_presets_dir()
    file = folder / f"{name}.toml"
    if not file.is_file():
        if (builtin_presets_dir() / f"{name}.toml").is_file():
            raise StylekitError(f"'{name}' is a built-in preset; only user presets can be removed")
        raise StylekitError(f"no user preset named '{name}' in {folder}")
    _mark_superseded(file)  # before the unlink: a prune meanwhile must not take what runs still read
    file.unlink()
    _prune_superseded(folder)
    return file
