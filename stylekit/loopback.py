"""Whether a host is this machine, in a module light enough for `stylekit gimp install` to import."""

from __future__ import annotations

import ipaddress


def is_loopback(host: str | None) -> bool:
    """True for addresses only this machine can reach (all of 127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
