"""What to watch: one inbox from the command line, or several from a pipeline.toml."""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from stylekit.errors import StylekitError, UsageError
from stylekit.request import OPTION_KINDS, StyleOptions, describe_kind, is_kind, validate

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 reads TOML with the tomli backport
    import tomli as tomllib

FORMATS = ("same", "png", "jpg", "webp", "avif", "tif")
_TOP_KEYS = {"settle", "retries", "batch", "rescan", "log_json", "status_file", "options", "folder"}
_FOLDER_KEYS = {"inbox", "out", "preset", "format", "quality", "options"}


@dataclass(frozen=True)
class FolderConfig:
    """One inbox: where images come in and go out, the preset for its top level, how outputs are saved."""

    inbox: Path
    out: Path
    preset: str | None = None  # None: only inbox/<preset>/ sub-folders are taken
    format: str = "same"  # output format; "same": the input's where stylekit writes it (see output_suffix)
    quality: int = 95  # JPEG/WebP/AVIF quality
    overrides: Mapping[str, object] = field(default_factory=dict)  # StyleOptions over the preset's


@dataclass(frozen=True)
class WatchConfig:
    """Everything `stylekit watch` runs with."""

    folders: tuple[FolderConfig, ...]
    settle: float = 2.0  # seconds a file's size and mtime must stay unchanged before it is taken
    retries: int = 2  # further attempts after running out of memory, at the size that fits, or 0.7× the last
    batch: int = 4  # images of one preset claimed and styled together
    rescan: float = 30.0  # seconds between full scans, in case the observer missed an event
    log_json: bool = False
    status_file: Path | None = None
    engine: str = "local"  # where images are styled: "local" (this process) or "ray" (a Ray pool)
    ray_address: str = "auto"  # the Ray cluster to join (auto: the one `ray start` runs here)
    gpus_per_task: float | None = None  # GPUs per Ray worker (None: 1 if the cluster has GPUs, else 0)


def from_cli(inbox: Path | None, config_file: Path | None, preset: str | None, out: Path | None,
             out_format: str | None, overrides: Mapping[str, object], settle: float | None,
             log_json: bool, status_file: Path | None, *, quality: int | None = None, engine: str = "local",
             ray_address: str = "auto", gpus_per_task: float | None = None) -> WatchConfig:
    """Build the configuration from `stylekit watch` arguments; command-line values win."""
    if config_file is not None:
        if inbox is not None or preset is not None or out is not None or out_format is not None:
            raise UsageError("give either --config or INBOX with --preset/--out/--format, not both")
        config = load(config_file)
        folders = tuple(replace(f, overrides={**f.overrides, **overrides}, quality=quality or f.quality)
                        for f in config.folders)
    else:
        if inbox is None or out is None:
            raise UsageError("give INBOX and --out OUTBOX (and usually --preset), or --config FILE")
        folders = (FolderConfig(inbox=inbox, out=out, preset=preset, format=out_format or "same",
                                quality=quality or FolderConfig.quality, overrides=dict(overrides)),)
        config = WatchConfig(folders=())
    config = checked(replace(config, folders=folders, log_json=log_json or config.log_json,
                             settle=config.settle if settle is None else settle,
                             status_file=status_file or config.status_file, engine=engine,
                             ray_address=ray_address, gpus_per_task=gpus_per_task))
    if config_file is not None:
        outside_inboxes(config_file, "config file", list(config.folders))
    return config


def asks_for_json(path: Path | None) -> bool:
    """Whether a config file says log_json = true, read before anything else in it is checked, so that
    its own errors are reported in the format it asks for."""
    try:
        return path is not None and tomllib.loads(path.read_text(encoding="utf-8")).get("log_json") is True
    except (OSError, ValueError):  # unreadable or not TOML: load() says so
        return False


def load(path: Path) -> WatchConfig:
    """Read a pipeline.toml (see pipeline.example.toml); relative paths are relative to the file."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StylekitError(f"config file '{path}' not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
        raise StylekitError(f"cannot read config '{path}': {error}") from None
    where = f"config '{path}'"
    _known_keys(data, _TOP_KEYS, where)
    base = path.parent
    shared = _options(data.get("options", {}), where)
    folders = data.get("folder", [])
    if not isinstance(folders, list) or not folders:
        raise StylekitError(f"{where} has no [[folder]] tables (each needs inbox, out, preset)")
    defaults = WatchConfig(folders=())
    status_file = data.get("status_file")
    return WatchConfig(
        folders=tuple(_folder(entry, base, shared, f"{where}, folder {index}")
                      for index, entry in enumerate(folders, start=1)),
        settle=_number(data, "settle", defaults.settle, where),
        retries=int(_number(data, "retries", defaults.retries, where, integer=True)),
        batch=int(_number(data, "batch", defaults.batch, where, integer=True, least=1)),
        rescan=_number(data, "rescan", defaults.rescan, where, least=0.1),
        log_json=_flag(data, "log_json", where),
        status_file=None if status_file is None else _path(status_file, base, "status_file", where))


def checked(config: WatchConfig) -> WatchConfig:
    """Resolve paths and refuse layouts that would lose or loop files, before anything is touched."""
    folders = []
    for folder in config.folders:
        inbox, out = folder.inbox.expanduser().resolve(), folder.out.expanduser().resolve()
        for name, place in (("inbox", inbox), ("output folder", out)):
            if not place.is_dir():
                raise StylekitError(f"{name} '{place}' does not exist or is not a folder")
        if folder.format not in FORMATS:
            raise StylekitError(f"bad format '{folder.format}' (choose from {', '.join(FORMATS)})")
        if not 1 <= folder.quality <= 100:
            raise StylekitError(f"bad quality {folder.quality} (1 to 100)")
        try:
            validate(StyleOptions().replace(**folder.overrides))
        except (TypeError, ValueError) as error:
            raise StylekitError(f"bad engine option for inbox '{inbox}': {error}") from None
        folders.append(replace(folder, inbox=inbox, out=out))
    for folder in folders:
        for other in folders:
            if other is not folder and folder.inbox.is_relative_to(other.inbox):
                raise StylekitError(f"inbox '{folder.inbox}' is inside (or is) inbox '{other.inbox}'")
        outside_inboxes(folder.out, "output folder", folders)
    if not 0 <= config.settle < math.inf:
        raise StylekitError(f"bad settle {config.settle} (seconds, a number ≥ 0)")
    status_file = config.status_file and config.status_file.expanduser().resolve()
    if status_file:
        outside_inboxes(status_file, "status file", folders)
        if not status_file.parent.is_dir():
            raise StylekitError(f"status file folder '{status_file.parent}' does not exist")
    return replace(config, folders=tuple(folders), status_file=status_file)


def outside_inboxes(path: Path, what: str, folders: list[FolderConfig]) -> None:
    """Refuse a file or folder of ours inside an inbox: it would be taken as a new drop."""
    for folder in folders:
        if path.resolve().is_relative_to(folder.inbox):
            raise StylekitError(f"{what} '{path}' is inside inbox '{folder.inbox}'; "
                                "it would be taken as a new drop")


def _folder(entry: object, base: Path, shared: dict[str, object], where: str) -> FolderConfig:
    """One [[folder]] table."""
    if not isinstance(entry, dict):
        raise StylekitError(f"{where} must be a table")
    _known_keys(entry, _FOLDER_KEYS, where)
    for key in ("inbox", "out"):
        if key not in entry:
            raise StylekitError(f"{where} needs '{key}'")
    preset, out_format = entry.get("preset"), entry.get("format", "same")
    if preset is not None and not isinstance(preset, str):
        raise StylekitError(f"{where}: preset must be a name")
    if not isinstance(out_format, str):
        raise StylekitError(f"{where}: format must be one of {', '.join(FORMATS)}")
    return FolderConfig(
        inbox=_path(entry["inbox"], base, "inbox", where), out=_path(entry["out"], base, "out", where),
        preset=preset, format=out_format.lower(),
        quality=int(_number(entry, "quality", 95, where, integer=True, least=1)),
        overrides={**shared, **_options(entry.get("options", {}), where)})


def _options(table: object, where: str) -> dict[str, object]:
    """An [options] table: StyleOptions names with values of the field's type (lists become tuples)."""
    if not isinstance(table, dict):
        raise StylekitError(f"{where}: options must be a table")
    values = {}
    for key, value in table.items():
        if key not in OPTION_KINDS:
            raise StylekitError(f"{where}: unknown option '{key}'")
        kind = OPTION_KINDS[key]
        items = value if isinstance(kind, tuple) and isinstance(value, list) else [value]
        wanted = kind[0] if isinstance(kind, tuple) else kind
        if not items or not all(is_kind(item, wanted) for item in items):
            raise StylekitError(f"{where}: option '{key}' must be {describe_kind(kind)}")
        values[key] = tuple(wanted(i) for i in items) if isinstance(kind, tuple) else wanted(value)
    return values


def _known_keys(table: dict, known: set[str], where: str) -> None:
    """Refuse a misspelt key instead of silently ignoring it."""
    for key in table:
        if key not in known:
            raise StylekitError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(known))})")


def _path(value: object, base: Path, key: str, where: str) -> Path:
    """A path from the config, relative to the config file's folder."""
    if not isinstance(value, str) or not value:
        raise StylekitError(f"{where}: {key} must be a path")
    return base / Path(value).expanduser()


def _number(table: dict, key: str, default: float, where: str, *, integer: bool = False,
            least: float = 0) -> float:
    """A number ≥ least (an integer where asked)."""
    value = table.get(key, default)
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not least <= value < math.inf:
        raise StylekitError(f"{where}: {key} must be {'an integer' if integer else 'a number'} ≥ {least}")
    return value


def _flag(table: dict, key: str, where: str) -> bool:
    """A true/false value."""
    value = table.get(key, False)
    if not isinstance(value, bool):
        raise StylekitError(f"{where}: {key} must be true or false")
    return value
