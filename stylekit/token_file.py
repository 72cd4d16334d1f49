"""The server's bearer token file: made private and random when missing, refused when shared or unusable.

Stdlib and platformdirs only, so that `stylekit gimp install` reads a token without loading torch.
"""

from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

import platformdirs

from .atomic import write_bytes
from .errors import StylekitError


def default_token_file() -> Path:
    """Where the server's bearer token lives unless --token-file says otherwise."""
    return Path(platformdirs.user_config_dir("stylekit")) / "server-token"


def load_or_create_token(path: Path) -> str:
    """Read the token file, creating it (mode 0600, random secret) when missing; refuse a shared one.

    A new file appears whole: written under a temporary name, then linked to its own, which fails
    when another server starting at the same moment got there first (then its token is read).
    """
    if path.exists():
        return read_token(path)
    token = secrets.token_urlsafe(32)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(path, f"{token}\n".encode(), exclusive=True, mode=0o600)
    except FileExistsError:
        return read_token(path)
    except OSError as exc:
        raise StylekitError(f"cannot create token file '{path}': {exc.strerror or exc}") from None
    return token


def read_token(path: Path) -> str:
    """An existing token, refused when other users could read it, or when it is too short to be secret
    or not text a client can send in its Authorization header (printable ASCII)."""
    if path.is_dir():  # `--token-file ''` names the current folder
        raise StylekitError(f"token file '{path}' is a folder; name the file that holds the token")
    try:
        if os.name == "posix" and stat.S_IMODE(path.stat().st_mode) & 0o077:
            raise StylekitError(f"token file '{path}' can be read by other users; run: chmod 600 '{path}'")
        token = path.read_bytes().strip().decode("ascii", errors="replace")
    except OSError as exc:
        raise StylekitError(f"cannot read token file '{path}': {exc.strerror or exc}") from None
    if len(token) < 16 or not all(" " <= char <= "~" for char in token):
        raise StylekitError(f"token file '{path}' holds no usable token (16+ printable ASCII characters); "
                            "delete it to get a new one")
    return token
