"""`stylekit gimp install|uninstall`: put the GIMP 3 plug-in where GIMP looks for it, with its config."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import sys
import sysconfig
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from urllib.parse import urlsplit

import click

from .atomic import write_bytes
from .errors import StylekitError
from .loopback import is_loopback
from .token_file import read_token

PLUGIN = "stylekit"  # GIMP 3 runs plug-ins/NAME/NAME.py only: folder and file names must match
CONFIG_NAME = "stylekit-config.json"  # read by the plug-in from its own folder
DEFAULT_URL = "http://127.0.0.1:8765"
FLATPAK_ID = "org.gimp.GIMP"


def gimp_dirs(environ: Mapping[str, str] = os.environ, platform: str = sys.platform,
              home: Path | None = None) -> list[Path]:
    """GIMP 3 profile folders: $GIMP3_DIRECTORY, else existing native/Flatpak ones, else native 3.0."""
    if environ.get("GIMP3_DIRECTORY"):
        return [Path(environ["GIMP3_DIRECTORY"])]
    home = home or Path.home()
    if platform == "win32":
        roots = [Path(environ.get("APPDATA") or home / "AppData" / "Roaming") / "GIMP"]
    elif platform == "darwin":
        roots = [home / "Library" / "Application Support" / "GIMP"]
    else:
        config = Path(environ.get("XDG_CONFIG_HOME") or home / ".config")
        roots = [config / "GIMP", home / ".var" / "app" / FLATPAK_ID / "config" / "GIMP"]
    found = sorted(path for root in roots if root.is_dir() for path in root.glob("3.*")
                   if path.is_dir() and re.fullmatch(r"3\.\d+", path.name))  # not "3.0 (copy)"
    return found or [roots[0] / "3.0"]


def is_flatpak(gimp_dir: Path) -> bool:
    """True for the Flatpak GIMP's profile, whose plug-ins must leave the sandbox to start a server."""
    return f"/.var/app/{FLATPAK_ID}/" in gimp_dir.as_posix()


def stylekit_executable() -> str:
    """The `stylekit` script of this installation, so GIMP starts the server from the same environment."""
    name = "stylekit.exe" if sys.platform == "win32" else "stylekit"
    script = Path(sysconfig.get_path("scripts")) / name
    return str(script) if script.exists() else shutil.which("stylekit") or name


def server_command(url: str, gimp_dir: Path) -> list[str]:
    """The command the plug-in runs when no server answers at url."""
    parts = urlsplit(url)
    command = [stylekit_executable(), "serve", "--port", str(parts.port or 80)]  # http's own port
    if is_loopback(parts.hostname) and parts.hostname not in ("127.0.0.1", "localhost"):  # serve's default
        command += ["--host", parts.hostname]  # ::1, 127.0.0.2 …: where the plug-in will look
    return ["flatpak-spawn", "--host", *command] if is_flatpak(gimp_dir) else command


def plugin_files() -> dict[str, bytes]:
    """The plug-in's Python files as packaged (plugins/gimp/stylekit/*.py), by name."""
    folder = resources.files("stylekit.gimp_plugin") / PLUGIN
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.name.endswith(".py")}


def install(gimp_dir: Path, url: str, command: list[str], token: str | None) -> Path:
    """Copy the plug-in into gimp_dir/plug-ins/stylekit and write its config; returns that folder."""
    target = gimp_dir / "plug-ins" / PLUGIN
    try:
        target.mkdir(parents=True, exist_ok=True)
        for name, data in plugin_files().items():
            path = target / name
            path.write_bytes(data)
            path.chmod(0o755 if name == f"{PLUGIN}.py" else 0o644)
        config = {"url": url, "command": command, "token": token or ""}
        write_bytes(target / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode("utf-8"),
                    mode=0o600 if token else 0o644)  # the token never readable by others, even briefly
    except OSError as exc:
        raise StylekitError(f"cannot install the plug-in into '{target}': {exc.strerror or exc}") from None
    return target


def uninstall(gimp_dir: Path) -> Path | None:
    """Remove the plug-in folder from gimp_dir; returns it, or None when it was not there."""
    target = gimp_dir / "plug-ins" / PLUGIN
    if not (target / f"{PLUGIN}.py").is_file():
        return None
    try:
        shutil.rmtree(target)
    except OSError as exc:
        raise StylekitError(f"cannot remove '{target}': {exc.strerror or exc}") from None
    return target


def _check_url(url: str) -> str:
    """Accept only http(s)://host[:port] so the plug-in never gets a URL it cannot use."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise click.BadParameter(f"'{url}' is not an http:// URL", param_hint="--url")
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise click.BadParameter(f"'{url}' has a bad port", param_hint="--url") from None
    if parts.scheme == "https" and is_loopback(parts.hostname):
        raise click.BadParameter(f"'{url}': `stylekit serve` speaks plain HTTP on this machine; "
                                 "use http://", param_hint="--url")
    return url.rstrip("/")


def _split_command(text: str, url: str) -> list[str]:
    """--command as the argument list the plug-in will run; a `stylekit serve` on another port than
    the local --url is refused (the plug-in would wait for it at the URL, then fail to start another)."""
    try:
        command = shlex.split(text)
    except ValueError as exc:
        raise click.BadParameter(f"{text!r}: {exc}", param_hint="--command") from None
    parts = urlsplit(url)
    serves = next((index for index, word in enumerate(command[:-1])
                   if Path(word).name.startswith("stylekit") and command[index + 1] == "serve"), None)
    if serves is None or not is_loopback(parts.hostname):
        return command
    port = str(urlsplit(DEFAULT_URL).port)
    for index, word in enumerate(command[serves + 2:], start=serves + 2):
        if word == "--port" and index + 1 < len(command):
            port = command[index + 1]
        elif word.startswith("--port="):
            port = word.partition("=")[2]
    wanted = str(parts.port or 80)
    if port != wanted:
        raise click.BadParameter(f"{text!r} serves on port {port}, but the plug-in looks for the server at "
                                 f"{url}: give both the same port (e.g. --port {wanted})",
                                 param_hint="--command")
    return command


@click.group()
def gimp() -> None:
    """Install the GIMP 3 plug-in (Filters ▸ Artistic ▸ Style Transfer…)."""


@gimp.command("install")
@click.option("--gimp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="GIMP 3 profile folder (default: found for this system, Flatpak included).")
@click.option("--url", default=DEFAULT_URL, show_default=True, help="Where the plug-in finds the server.")
@click.option("--command", "command_text", metavar="COMMAND",
              help="How the plug-in starts the server when none answers (default: this "
                   "installation's `stylekit serve --port PORT`).")
@click.option("--token-file", type=click.Path(dir_okay=False, exists=True, path_type=Path),
              help="Bearer token for a server that is not on this machine (see `stylekit serve`).")
def install_command(gimp_dir: Path | None, url: str, command_text: str | None,
                    token_file: Path | None) -> None:
    """Copy the plug-in into GIMP's plug-ins folder and write its config.

    Example: stylekit gimp install
    """
    url = _check_url(url)
    token = read_token(token_file) if token_file else None
    for folder in [gimp_dir] if gimp_dir else gimp_dirs():
        if not folder.is_dir():  # GIMP imports 2.10's settings only into a profile folder it creates
            raise StylekitError(f"no GIMP 3 profile folder at '{folder}': start GIMP 3 once (it creates "
                                "the folder, importing GIMP 2.10's settings), then install again")
        command = _split_command(command_text, url) if command_text else server_command(url, folder)
        target = install(folder, url, command, token)
        click.echo(f"installed the GIMP plug-in in {target}")
        click.echo(f"  server: {url}" + (" (with bearer token)" if token else ""))
        click.echo(f"  started when needed with: {shlex.join(command)}")
        if is_flatpak(folder):
            click.echo("  Flatpak GIMP: allow it to start the server with "
                       f"`flatpak override --user --talk-name=org.freedesktop.Flatpak {FLATPAK_ID}`, "
                       "or keep `stylekit serve` running yourself")
    click.echo("Restart GIMP, then use Filters ▸ Artistic ▸ Style Transfer…")


@gimp.command("uninstall")
@click.option("--gimp-dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="GIMP 3 profile folder (default: found for this system, Flatpak included).")
def uninstall_command(gimp_dir: Path | None) -> None:
    """Remove the plug-in from GIMP's plug-ins folder."""
    removed = [path for folder in ([gimp_dir] if gimp_dir else gimp_dirs())
               if (path := uninstall(folder)) is not None]
    for path in removed:
        click.echo(f"removed {path}")
    if not removed:
        click.echo("the GIMP plug-in was not installed; nothing removed")
