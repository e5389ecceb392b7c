"""Event-loop integration: how pyxl watches fds and timers without owning the loop.

pyxl needs exactly four things from a loop -- watch an fd for readability or
writability, stop watching it, and call something after a delay -- the same
small surface as libxl's "osevent hooks".  Three implementations:

* :class:`SelectorLoop`: pyxl's own loop over :mod:`selectors`, used by
  :func:`pyxl.wait` and the CLI.  Add your own fds to it with ``add_reader``.
* :class:`HookLoop`: the toolstack's own loop, through registration hooks it
  supplies (register/modify/deregister an fd, add/cancel a timeout).  The
  toolstack calls the callback it was given when the fd is ready or the
  timeout fires.
* :class:`AsyncioLoop`: an asyncio loop, through ``add_reader``/``call_later``.

Child exit is watched through a pidfd like any other fd: no SIGCHLD handler,
no waitpid polling, no threads.
"""

from __future__ import annotations

import heapq
import itertools
import selectors
import time
from typing import Any, Callable, Dict, List, Optional, Protocol, Set, Tuple, TypeVar

Callback = Callable[[], None]

READ = selectors.EVENT_READ
WRITE = selectors.EVENT_WRITE


class Timer(Protocol):
    def cancel(self) -> None: ...


class Loop(Protocol):
    """What pyxl asks of an event loop."""

    def add_reader(self, fd: int, callback: Callback) -> None: ...
    def remove_reader(self, fd: int) -> None: ...
    def add_writer(self, fd: int, callback: Callback) -> None: ...
    def remove_writer(self, fd: int) -> None: ...
    def call_later(self, delay: float, callback: Callback) -> Timer: ...


class _Watches:
    """Per-fd reader/writer bookkeeping shared by the loops that speak in event masks."""

    def __init__(self) -> None:
        self.readers: Dict[int, Callback] = {}
        self.writers: Dict[int, Callback] = {}

    def mask(self, fd: int) -> int:
        return (READ if fd in self.readers else 0) | (WRITE if fd in self.writers else 0)

    def dispatch(self, fd: int, events: int) -> None:
        # Look callbacks up at dispatch time: an earlier callback in the same
        # round may have removed this watch.
        if events & READ:
            cb = self.readers.get(fd)
            if cb is not None:
                cb()
        if events & WRITE:
            cb = self.writers.get(fd)
            if cb is not None:
                cb()


def ignore(*_: object) -> None:
    """What a callback slot holds once its owner has been told, or called off:
    the slot no longer keeps its owner (often the slot's own holder) alive."""


class _SelectorTimer:
    __slots__ = ("deadline", "callback", "cancelled")

    def __init__(self, deadline: float, callback: Callback) -> None:
        self.deadline = deadline
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        # Its callback is let go: whoever keeps the handle (often the
        # callback's own owner) does not keep a cycle alive with it.
        self.cancelled = True
        self.callback = ignore


class _MaskLoop:
    """add/remove reader/writer in terms of one per-fd event mask; subclasses apply it."""

    def __init__(self) -> None:
        self._w = _Watches()

    def _update(self, fd: int) -> None:
        raise NotImplementedError

    def add_reader(self, fd: int, callback: Callback) -> None:
        self._w.readers[fd] = callback
        self._update(fd)

    def remove_reader(self, fd: int) -> None:
        if self._w.readers.pop(fd, None) is not None:
            self._update(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self._w.writers[fd] = callback
        self._update(fd)

    def remove_writer(self, fd: int) -> None:
        if self._w.writers.pop(fd, None) is not None:
            self._update(fd)


class SelectorLoop(_MaskLoop):
    """pyxl's default loop: a selector plus a timer heap, single-threaded."""

    def __init__(self) -> None:
        super().__init__()
        self._sel = selectors.DefaultSelector()
        self._timers: List[Tuple[float, int, _SelectorTimer]] = []
        self._seq = itertools.count()
        self._holds: Set[object] = set()

    def hold(self, token: object) -> None:
        """Ask :func:`run_private` to run this loop on, once its step is done,
        until ``token`` is :meth:`release`-d (a child pyxl killed must still
        be answered for and reaped on this loop; at most ``LINGER`` s)."""
        self._holds.add(token)

    def release(self, token: object) -> None:
        self._holds.discard(token)

    @property
    def held(self) -> bool:
        return bool(self._holds)

    def _update(self, fd: int) -> None:
        mask = self._w.mask(fd)
        try:
            self._sel.get_key(fd)
            registered = True
        except KeyError:
            registered = False
        if mask and registered:
            self._sel.modify(fd, mask)
        elif mask:
            self._sel.register(fd, mask)
        elif registered:
            self._sel.unregister(fd)

    def call_later(self, delay: float, callback: Callback) -> _SelectorTimer:
        t = _SelectorTimer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (t.deadline, next(self._seq), t))
        return t

    def run_once(self, timeout: Optional[float] = None) -> None:
        """Wait for one round of events (at most ``timeout`` seconds) and dispatch them."""
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            until = max(0.0, self._timers[0][0] - time.monotonic())
            timeout = until if timeout is None else min(timeout, until)
        if self._sel.get_map():
            ready = self._sel.select(timeout)
        else:
            if timeout is None:
                raise RuntimeError("SelectorLoop.run_once: nothing to wait for")
            time.sleep(timeout)
            ready = []
        for key, events in ready:
            self._w.dispatch(key.fd, events)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, t = heapq.heappop(self._timers)
            if not t.cancelled:
                callback = t.callback
                t.cancel()
                callback()

    def run_until(self, done: Callable[[], bool], timeout: Optional[float] = None) -> bool:
        """Run until ``done()`` is true; False if ``timeout`` ran out first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            self.run_once(left)
        return True

    def close(self) -> None:
        self._sel.close()


class HookLoop(_MaskLoop):
    """Adapter to a toolstack's own loop, given as hooks (libxl's osevent idea).

    ``fd_register(fd, events, ready)`` must start watching ``fd`` for the
    ``selectors.EVENT_READ``/``EVENT_WRITE`` bits in ``events`` and call
    ``ready(events_that_fired)`` when it is ready; it returns a token.
    ``fd_modify(token, events)`` changes the mask, ``fd_deregister(token)``
    stops watching.  ``timeout_register(delay, fire)`` calls ``fire()`` after
    ``delay`` seconds and returns a token for ``timeout_cancel(token)``.
    """

    def __init__(self, fd_register: Callable[[int, int, Callable[[int], None]], Any],
                 fd_modify: Callable[[Any, int], None],
                 fd_deregister: Callable[[Any], None],
                 timeout_register: Callable[[float, Callback], Any],
                 timeout_cancel: Callable[[Any], None]) -> None:
        self._reg, self._mod, self._dereg = fd_register, fd_modify, fd_deregister
        super().__init__()
        self._treg, self._tcancel = timeout_register, timeout_cancel
        self._tokens: Dict[int, Any] = {}

    def _update(self, fd: int) -> None:
        mask = self._w.mask(fd)
        token = self._tokens.get(fd)
        if mask and token is not None:
            self._mod(token, mask)
        elif mask:
            def ready(events: int, fd: int = fd) -> None:
                self._w.dispatch(fd, events)

            self._tokens[fd] = self._reg(fd, mask, ready)
        elif token is not None:
            del self._tokens[fd]
            self._dereg(token)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        return _HookTimer(self, delay, callback)


class _HookTimer:
    """A :class:`HookLoop` timer: fires once, unless cancelled first.  (One
    class for all: a class made per call costs 10-20 us and leaves cyclic
    garbage for the collector, which then runs inside some loop callback.)"""

    __slots__ = ("fired", "token", "_callback", "_hook")

    def __init__(self, hook: HookLoop, delay: float, callback: Callback) -> None:
        self.fired = False
        self._hook, self._callback = hook, callback
        self.token = hook._treg(delay, self._fire)

    def _fire(self) -> None:
        if not self.fired:
            self.fired = True
            callback, self._callback = self._callback, ignore
            callback()

    def cancel(self) -> None:
        if not self.fired:
            self.fired = True
            self._callback = ignore
            self._hook._tcancel(self.token)


class AsyncioLoop:
    """Adapter to an asyncio event loop (``add_reader``, ``call_later``)."""

    def __init__(self, loop: Any) -> None:
        self.loop = loop

    def add_reader(self, fd: int, callback: Callback) -> None:
        self.loop.add_reader(fd, callback)

    def remove_reader(self, fd: int) -> None:
        self.loop.remove_reader(fd)

    def add_writer(self, fd: int, callback: Callback) -> None:
        self.loop.add_writer(fd, callback)

    def remove_writer(self, fd: int) -> None:
        self.loop.remove_writer(fd)

    def call_later(self, delay: float, callback: Callback) -> Timer:
        handle: Timer = self.loop.call_later(delay, callback)
        return handle


T = TypeVar("T")


def run_private(start: Callable[[Loop, Callable[[T], None]], Optional[Timer]],
                timeout: Optional[float] = None) -> T:
    """The waited-for form of an asynchronous step, for scripts and command
    lines (never from a loop's callback): ``start(loop, done)`` on a private
    :class:`SelectorLoop`, run until ``done(value)``; returns ``value``.  If
    ``timeout`` runs out first, what ``start`` returned is cancelled and
    TimeoutError is raised."""
    loop = SelectorLoop()
    out: List[T] = []
    try:
        handle = start(loop, out.append)
        if not loop.run_until(lambda: bool(out), timeout):
            if handle is not None:
                handle.cancel()
            raise TimeoutError(f"not done within {timeout:g} s")
    finally:
        # A step may end while a child it killed is not yet answered for or
        # reaped (a hotplug script past its time): closed now, nothing would
        # ever deliver the kill.
        if loop.held:
            loop.run_until(lambda: not loop.held, LINGER)
        loop.close()
    return out[0]


#: The longest :func:`run_private` runs on for what its loop holds.
LINGER = 5.0


_default: Optional[SelectorLoop] = None


def default_loop() -> SelectorLoop:
    """The process-wide default :class:`SelectorLoop` used by :func:`pyxl.wait`."""
    global _default
    if _default is None:
        _default = SelectorLoop()
    return _default
