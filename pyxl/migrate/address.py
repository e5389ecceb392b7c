"""The receiver's address as a user writes it: ``HOST:PORT`` or ``[V6ADDR]:PORT``.

This module owns :func:`parse_address` (text to ``(host, port)``, port 0
only to listen) and :func:`format_address` (back); looking the host up is :mod:`pyxl.migrate.resolve`'s job.
It imports nothing but typing.
"""

from __future__ import annotations

from typing import Tuple

__all__ = ["format_address", "parse_address"]


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
