"""A migration receive's defaults, its arguments' checks and its result: the
deadlines and door sizes :func:`pyxl.migrate.receive` takes by default,
:func:`check_receive_args`, what it tells an API caller who listens on plain
TCP off loopback, and :class:`ReceiveResult`
(re-exported by :mod:`pyxl.migrate.receiver`, which runs the receive).

May import: pyxl.ops.restore (the result it holds), pyxl.migrate.tls,
pyxl.migrate.relay (IDLE_MIN_BYTES).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pyxl.migrate.relay import IDLE_MIN_BYTES
from pyxl.migrate.tls import TlsOptions
from pyxl.ops.restore import RestoreResult

__all__ = ["check_receive_args", "HEADER_TIMEOUT", "IDLE_MIN_BYTES", "IDLE_TIMEOUT", "MAX_PENDING", "PLAIN_TCP_ADVICE",
           "PROGRESS_EVERY", "ReceiveResult", "SILENT_SLOTS"]

PROGRESS_EVERY = 0.05   # s between a compressed stream's progress reports to the sender
HEADER_TIMEOUT = 60.0   # s from a connection to its stream head (TLS, banner, head)
IDLE_TIMEOUT = 60.0     # s without stream bytes, or waiting for "cleared to unpause"
MAX_PENDING = 8         # connections in TLS (a stage each) at once while listening
SILENT_SLOTS = 8        # x max_pending: connections pending in all (silent ones cost a socket)


def check_receive_args(listen: Any, fds: Any, tls: Any, header_timeout: Optional[float], idle_timeout: Optional[float],
                       max_pending: int) -> None:
    """Refuse a receive's arguments that cannot go together or make no sense
    (ValueError, TypeError), before anything is opened."""
    if (listen is None) == (fds is None):
        raise ValueError("give either listen (an address or a listening socket) or fds")
    if tls is not None and not isinstance(tls, TlsOptions):
        raise TypeError(f"tls: a pyxl.migrate.TlsOptions, not {type(tls).__name__}")
    if tls is not None and fds is not None:
        raise ValueError("TLS is for a listening receiver (fds are already a channel: ssh)")
    for what, value in (("header_timeout", header_timeout), ("idle_timeout", idle_timeout)):
        if value is not None and not value > 0:
            raise ValueError(f"{what} must be positive (or None: no deadline)")
    if max_pending < 1:
        raise ValueError("max_pending must be at least 1")


#: How an API caller listens safely (the CLI says it in its own flags).
PLAIN_TCP_ADVICE = ("use mutual TLS (tls=TlsOptions(...)), ssh (fds=, the receiving end of "
                    "pyxl migrate --command \"ssh HOST pyxl migrate-receive\"), a loopback "
                    "address, or insecure=True on a trusted network")


@dataclass
class ReceiveResult:
    domid: int
    digest: Optional[str]       # sim digest of the received domain before it ran (on request)
    duration: float
    paused: bool
    restore: RestoreResult
    checkpoints: int = 0        # Remus: checkpoints received
    failover: bool = False      # Remus: the sender vanished; took over at the last checkpoint
