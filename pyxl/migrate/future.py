"""The future both migration roles are: :class:`MigrationFuture`.

This module owns what a migration adds to pyxl's future-like operation
surface (``done()``, ``result()``, ``add_done_callback()``, ``await``, so
``pyxl.wait`` works): the loop it runs on, its start time, its timers (the
overall timeout among them), ``cancel()`` and finishing exactly once with
every timer cancelled.  Subclasses say how to fail (``_fail``).  It may
import pyxl.errors, pyxl.loop and pyxl.ops.future -- nothing of the
handshake, the relay or the transports.
"""

from __future__ import annotations

import time
from typing import List, Optional, TypeVar

from pyxl.errors import Cancelled, OperationError, Timeout
from pyxl.loop import Loop, Timer, default_loop
from pyxl.ops.future import LoopFuture

__all__ = ["MigrationFuture"]

R = TypeVar("R")


class MigrationFuture(LoopFuture[R]):
    """A migration as a pyxl operation (``pyxl.wait`` works), with its own timers."""

    kind = "migration"

    def __init__(self, loop: Optional[Loop], timeout: Optional[float]) -> None:
        super().__init__()
        self.loop: Loop = loop if loop is not None else default_loop()
        self.started = time.monotonic()
        self._timers: List[Timer] = []
        self._timeout = timeout
        if timeout is not None:
            self._timers.append(self.loop.call_later(timeout, self._timed_out))

    def _timed_out(self) -> None:
        self._fail(Timeout(f"{self.kind} timed out after {self._timeout:g}s"))

    def cancel(self) -> bool:
        if self._done:
            return False
        self._fail(Cancelled(f"{self.kind} cancelled"))
        return True

    def _fail(self, exc: OperationError) -> None:
        raise NotImplementedError

    def _finish(self, result: Optional[R] = None, exc: Optional[OperationError] = None) -> None:
        if self._done:
            return
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self._set_outcome(result, exc)
