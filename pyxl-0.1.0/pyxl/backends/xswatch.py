"""Waiting on XenStore from an event loop: a watch on its own connection.

libxl waits for a device model or a backend with a XenStore watch
(libxl__ev_xswatch) and a timeout, never polling.  :class:`XsWait` does the
same on pyxl's loop, without waiting on xenstored in any callback: the wait
is one :class:`~pyxl.backends.xsasync.XsTask` on a connection of its own that
registers the watches, runs ``check`` once they are set (xenstored also
fires every new watch once) and again after every event, until ``check``
gives an outcome or the timer fires.

May import: pyxl.backends.xenstore, pyxl.backends.xsasync, pyxl.loop.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple, Union

from pyxl.backends.xenstore import XS_READ, XS_WATCH, XenStore
from pyxl.backends.xsasync import EVENT, XsScript, XsTask, missing, ok, reason
from pyxl.loop import Loop, Timer

__all__ = ["Outcome", "Check", "XsWait", "node_is"]

#: ``check``'s answer: None to go on waiting, else (ok, why).
Outcome = Optional[Tuple[bool, str]]
#: What a wait asks after each event: an outcome at once (from what needs no
#: XenStore, e.g. a hypercall), or a script that reads XenStore and returns one.
Check = Callable[[], Union[Outcome, XsScript[Outcome]]]

#: How long the last look after a timeout (``on_timeout``'s script) may take.
LAST_LOOK = 10.0


def node_is(path: str, wanted: bytes) -> Check:
    """A check: done once ``path`` holds ``wanted`` (surrounding blanks aside)."""
    def check() -> XsScript[Outcome]:
        [reply] = yield [(XS_READ, f"{path}\0".encode(), 0)]
        value = None if missing(reply) else ok(reply)
        return (True, "") if value is not None and value.strip() == wanted else None
    return check


class XsWait:
    """One wait in flight; ``done(ok, why)`` is called once, from the loop.

    ``check()`` may raise OSError (a failure), as may its script.  When the
    time is up, ``on_timeout()``'s script (on a new connection) may give a
    last outcome; else, or if it gives none, the wait fails with ``"<what>
    timed out after N s"``.
    """

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], paths: List[str],
                 check: Check, timeout: float, done: Callable[[bool, str], None], what: str,
                 on_timeout: Optional[Callable[[], XsScript[Outcome]]] = None) -> None:
        self.loop, self.what, self.timeout, self._opener = loop, what, timeout, opener
        self._check, self._done, self._on_timeout = check, done, on_timeout
        self.finished = False
        self.token = f"pyxl-{os.getpid()}-{id(self):x}"
        # The task's own bound only matters if the timer's last look hangs.
        self.task: Optional[XsTask[Outcome]] = XsTask(
            loop, opener, self._waiting(paths), self._ended, what, timeout + LAST_LOOK + 5)
        self.timer: Optional[Timer] = loop.call_later(timeout, self._timed_out)

    def _waiting(self, paths: List[str]) -> XsScript[Outcome]:
        token = self.token
        for reply in (yield [(XS_WATCH, f"{p}\0{token}\0".encode(), 0) for p in paths]):
            ok(reply)
        while True:
            outcome = yield from self._checked()
            if outcome is not None:
                return outcome
            yield EVENT

    def _checked(self) -> XsScript[Outcome]:
        result = self._check()
        if result is None or isinstance(result, tuple):
            return result
        outcome: Outcome = yield from result
        return outcome

    def _ended(self, exc: Optional[Exception]) -> None:
        task, self.task = self.task, None
        if exc is not None:
            self._finish((False, f"{self.what}: XenStore: {reason(exc)}"))
        elif task is not None:
            self._finish(task.result)

    def cancel(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None

    def _finish(self, outcome: Outcome) -> None:
        if self.finished or outcome is None:
            return
        self.cancel()
        self._done(*outcome)

    def _timed_out(self) -> None:
        self.timer = None
        if self.task is not None:
            self.task.cancel()
            self.task = None
        late = (False, f"{self.what} timed out after {self.timeout:g} s")
        if self._on_timeout is None:
            self._finish(late)
            return

        def looked(exc: Optional[Exception]) -> None:
            outcome = None if exc is not None or look is None else look.result
            self.task = None
            self._finish(outcome or late)
        look: Optional[XsTask[Outcome]] = None
        look = self.task = XsTask(self.loop, self._opener, self._on_timeout(), looked,
                                  self.what, LAST_LOOK)
