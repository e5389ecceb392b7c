"""Waiting on XenStore from an event loop: a watch on its own connection.

libxl waits for a device model or a backend with a XenStore watch
(libxl__ev_xswatch) and a timeout, never polling.  :class:`XsWait` does the
same on pyxl's loop: it opens its own xenstored connection, registers the
watches, puts the connection's fd on the loop, and calls ``check(xs)`` once
at registration (xenstored fires every new watch once) and again on every
event, until ``check`` returns an outcome or the timer fires.  Extra fds (a
child's pidfd) may be watched alongside, so one wait ends on whichever comes
first.

May import: pyxl.backends.xenstore, pyxl.loop.
"""

from __future__ import annotations

import os
from typing import Callable, Dict, List, Optional, Tuple

from pyxl.backends.xenstore import XenStore
from pyxl.loop import Loop, Timer

__all__ = ["Outcome", "XsWait"]

#: ``check``'s answer: None to go on waiting, else (ok, why).
Outcome = Optional[Tuple[bool, str]]


class XsWait:
    """One wait in flight; ``done(ok, why)`` is called once, from the loop.

    ``check(xs)`` reads what it needs through ``xs`` (the wait's own
    connection) and may raise OSError (a failure).  ``fds`` maps extra fds to
    callbacks returning an outcome in the same way; they stay the caller's
    (not closed here).  ``on_timeout()`` may give a last outcome when the time
    is up (else the wait fails with ``"<what> timed out after N s"``).
    """

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], paths: List[str],
                 check: Callable[[XenStore], Outcome], timeout: float,
                 done: Callable[[bool, str], None], what: str,
                 fds: Optional[Dict[int, Callable[[], Outcome]]] = None,
                 on_timeout: Optional[Callable[[], Outcome]] = None) -> None:
        self.loop, self.what, self.timeout = loop, what, timeout
        self._check, self._done, self._on_timeout = check, done, on_timeout
        self._fds = dict(fds or {})
        self.finished = False
        self.xs: Optional[XenStore] = None
        self.token = f"pyxl-{os.getpid()}-{id(self):x}"
        self.timer: Optional[Timer] = None
        self._first: Optional[Timer] = None
        try:
            self.xs = opener()
            for p in paths:
                self.xs.watch(p, self.token)
        except OSError as exc:
            why = f"{what}: XenStore: {exc}"
            self._close()
            self.timer = loop.call_later(0, lambda: self._finish((False, why)))
            return
        loop.add_reader(self.xs.fileno(), self._readable)
        for fd, cb in self._fds.items():
            loop.add_reader(fd, lambda cb=cb: self._finish(cb()))   # type: ignore[misc]
        self.timer = loop.call_later(timeout, self._timed_out)
        # The registration's own event may have been read already, together
        # with the reply to XS_WATCH: the socket would then never wake us for
        # it.  Look once from the loop, whatever the socket says.
        self._first = loop.call_later(0, self._readable)

    def _close(self) -> None:
        for fd in self._fds:
            try:
                self.loop.remove_reader(fd)
            except Exception:
                pass
        self._fds = {}
        if self.xs is not None:
            try:
                self.loop.remove_reader(self.xs.fileno())
            except Exception:
                pass
            self.xs.close()
            self.xs = None

    def cancel(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        if self._first is not None:
            self._first.cancel()
        self._close()

    def _finish(self, outcome: Outcome) -> None:
        if self.finished or outcome is None:
            return
        self.cancel()
        self._done(*outcome)

    def _readable(self) -> None:
        if self.xs is None or self.finished:
            return
        try:
            self.xs.events()
            outcome = self._check(self.xs)
        except OSError as exc:
            outcome = (False, f"{self.what}: XenStore: {exc}")
        self._finish(outcome)

    def _timed_out(self) -> None:
        if self.finished:
            return
        outcome: Outcome = None
        if self._on_timeout is not None:
            outcome = self._on_timeout()
        self._finish(outcome or (False, f"{self.what} timed out after {self.timeout:g} s"))
