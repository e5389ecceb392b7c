"""The future both migration roles are: :class:`MigrationFuture`.

This module owns what a migration adds to pyxl's future-like operation
surface (``done()``, ``result()``, ``add_done_callback()``, ``await``, so
``pyxl.wait`` works): the loop it runs on, its start time, its timers (the
overall timeout among them), ``cancel()`` and finishing exactly once with
every timer cancelled, and the live snapshot (``stats()``, as
``virsh domjobinfo``) built from the save or restore inside.  Subclasses say
how to fail (``_fail``) and what they measure (``stats``).  It may import
pyxl.errors, pyxl.loop, pyxl.ops.future and pyxl.ops.jobstats -- nothing of
the handshake, the relay or the transports.
"""

from __future__ import annotations

import time
from typing import Any, List, Optional, TypeVar

from pyxl.errors import Cancelled, OperationError, Timeout
from pyxl.loop import Loop, Timer, default_loop
from pyxl.ops.future import LoopFuture
from pyxl.ops.jobstats import JobStats, snapshot

__all__ = ["MigrationFuture"]

R_co = TypeVar("R_co", covariant=True)


class MigrationFuture(LoopFuture[R_co]):
    """A migration as a pyxl operation (``pyxl.wait`` works), with its own timers."""

    kind = "migration"

    def __init__(self, loop: Optional[Loop], timeout: Optional[float]) -> None:
        super().__init__()
        self.loop: Loop = loop if loop is not None else default_loop()
        self.started = time.monotonic()
        self._timers: List[Timer] = []
        self._timeout = timeout
        self._ended: Optional[float] = None     # stats()' clock stops here
        if timeout is not None:
            self._timers.append(self.loop.call_later(timeout, self._timed_out))

    def _job_stats(self, op: Any, sent: Optional[int], *, dirty_rate: Optional[float] = None,
                   predicted_downtime: Optional[float] = None) -> JobStats:
        """The snapshot: phase, round and pages from the save or restore inside
        (``op``; None before it starts), ``sent`` bytes on the connection (the
        ``bytes``, ``rate`` and ``eta`` figures), elapsed since the migration began."""
        base = op.stats() if op is not None else None
        return snapshot(base.phase if base else "", base.iteration if base else None,
                        base.pages_done if base else 0, base.pages_total if base else 0,
                        (self._ended or time.monotonic()) - self.started, sent,
                        base.memory if base else None, dirty_rate=dirty_rate,
                        predicted_downtime=predicted_downtime)

    def _timed_out(self) -> None:
        self._fail(Timeout(f"{self.kind} timed out after {self._timeout:g}s"))

    def cancel(self) -> bool:
        if self._done:
            return False
        self._fail(Cancelled(f"{self.kind} cancelled"))
        return True

    def _fail(self, exc: OperationError) -> None:
        raise NotImplementedError

    def _finish(self, result: Any = None, exc: Optional[OperationError] = None) -> None:
        if self._done:
            return
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        duration = getattr(result, "duration", None)
        self._ended = (self.started + duration if isinstance(duration, float)
                       else time.monotonic())
        self._set_outcome(result, exc)
