"""A migration's arguments' checks and its result: :func:`check_send_args`
and :class:`MigrateResult` (re-exported by :mod:`pyxl.migrate.sender`, which
runs the migration), as :mod:`.receiveoptions` is for the receiving side.

May import: pyxl.ops.save (the result it holds), pyxl.migrate.tls.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from pyxl.migrate.tls import TlsOptions
from pyxl.ops.save import SaveResult

__all__ = ["MigrateResult", "check_send_args"]


@dataclass
class MigrateResult:
    domid: int
    downtime: Optional[float]   # seconds: source suspended -> destination's copy running
    iterations: int             # precopy rounds sent while the guest ran
    bytes_sent: int             # stream bytes written to the connection
    duration: float
    digest: Optional[str]       # sim digest of the source at switch-over (on request)
    save: SaveResult
    checkpoints: int = 0        # Remus: checkpoints sent before the switch-over
    throttle: int = 0           # the lowest CPU cap (percent) auto-converge/a policy set; 0: none
    compressed: bool = False    # the receiver took the offer: bytes_sent are zstd's


def check_send_args(target: Any, command: Optional[str], tls: Any, insecure: bool,
                    handshake_timeout: float, idle_timeout: Optional[float], live: bool,
                    remus: bool, compress: bool, checkpoints: Optional[int],
                    downtime_ms: Optional[float], max_bandwidth: Optional[int]) -> None:
    """Refuse a migration's arguments that cannot go together or make no sense
    (ValueError, TypeError), before anything is started."""
    if (target is None) == (command is None):
        raise ValueError("give either a target HOST:PORT or a command, not both or neither")
    if command is not None and not command.strip():
        raise ValueError("command is empty")
    if tls is not None and not isinstance(tls, TlsOptions):
        raise TypeError(f"tls: a pyxl.migrate.TlsOptions, not {type(tls).__name__}")
    if tls is not None and command is not None:
        raise ValueError("TLS is for a HOST:PORT target (a command is its own channel: ssh)")
    if insecure and (tls is not None or command is not None):
        raise ValueError("insecure is for plain TCP to a HOST:PORT target (TLS "
                         "authenticates the receiver; a command is its own channel)")
    if not handshake_timeout > 0:
        raise ValueError("handshake_timeout must be positive")
    if idle_timeout is not None and not idle_timeout > 0:
        raise ValueError("idle_timeout must be positive (or None: no deadline)")
    if remus and not live:
        raise ValueError("a checkpointed (Remus) migration is live")
    if remus and compress:
        raise ValueError("compression is for a plain migration, not a checkpointed one "
                         "(a Remus stream's end is a failover, not a whole frame)")
    if checkpoints is not None and (not remus or checkpoints < 1):
        raise ValueError("checkpoints: a positive number, for a Remus migration")
    if downtime_ms is not None and not live:
        raise ValueError("a downtime target needs a live migration")
    if max_bandwidth is not None and max_bandwidth <= 0:
        raise ValueError("max_bandwidth must be positive")
