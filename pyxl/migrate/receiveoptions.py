"""A migration receive's defaults and its result: the deadlines and door sizes
:func:`pyxl.migrate.receive` takes by default, what it tells an API caller
who listens on plain TCP off loopback, and :class:`ReceiveResult`
(re-exported by :mod:`pyxl.migrate.receiver`, which runs the receive).

May import: pyxl.ops.restore (the result it holds).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pyxl.ops.restore import RestoreResult

__all__ = ["HEADER_TIMEOUT", "IDLE_MIN_BYTES", "IDLE_TIMEOUT", "MAX_PENDING", "PLAIN_TCP_ADVICE",
           "PROGRESS_EVERY", "ReceiveResult", "SILENT_SLOTS"]

PROGRESS_EVERY = 0.05   # s between a compressed stream's progress reports to the sender
HEADER_TIMEOUT = 60.0   # s from a connection to its stream head (TLS, banner, head)
IDLE_TIMEOUT = 60.0     # s without stream bytes, or waiting for "cleared to unpause"
IDLE_MIN_BYTES = 64 << 10   # fewer stream bytes than this in an idle_timeout: idle too
MAX_PENDING = 8         # connections in TLS (a stage each) at once while listening
SILENT_SLOTS = 8        # x max_pending: connections pending in all (silent ones cost a socket)


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
