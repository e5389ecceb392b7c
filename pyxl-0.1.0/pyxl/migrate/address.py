"""The receiver's address as a user writes it: ``HOST:PORT`` or ``[V6ADDR]:PORT``.

This module owns :func:`parse_address` (text to ``(host, port)``, port 0
only to listen), :func:`format_address` (back) and :func:`is_loopback`;
looking the host up is :mod:`pyxl.migrate.resolve`'s job.  It imports
nothing but ipaddress and typing.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Tuple

__all__ = ["format_address", "is_loopback", "parse_address"]


def parse_address(text: str, *, listen: bool = False) -> Tuple[str, int]:
    """"HOST:PORT" (or "[V6ADDR]:PORT") -> (host, port).  Port 0 only to listen."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not (0 if listen else 1) <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def format_address(host: str, port: int) -> str:
    """(host, port) as a user writes it: an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(sockname: Tuple[Any, ...]) -> bool:
    """Is a socket address (``(host, port, ...)``, numeric) a loopback one (127/8, ::1)?"""
    try:
        return ipaddress.ip_address(str(sockname[0]).split("%")[0]).is_loopback
    except ValueError:
        return False
