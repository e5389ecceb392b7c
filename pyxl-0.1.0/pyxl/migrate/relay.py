"""The splice relay: a pipe's bytes to a connection, or a connection's into a
pipe, from the event loop, never through Python.

This module owns :class:`SpliceRelay` (``splice(2)`` between kernel buffers,
a few calls per wake-up, a token bucket on loop timers for a bandwidth cap,
the trailer written after the pipe's EOF, draining into nowhere once the far
end broke) and the pipes it reads or feeds (:func:`make_pipe` of pyxl.fdio: sized so that
a capped sender's helper feels the cap).  It knows nothing of the handshake,
of helpers or of domains.  It may import os, select, time,
pyxl.fdio and pyxl.loop.
"""

from __future__ import annotations

import os
import select
import time
from typing import Callable, Optional

from pyxl.fdio import make_pipe, pipe_size, set_nonblocking
from pyxl.loop import Loop, Timer

__all__ = ["CHUNK", "CAPPED_PIPE", "IDLE_MIN_BYTES", "SpliceRelay", "make_pipe", "pipe_size"]

CHUNK = 1 << 20             # the uncapped pipes' size
#: Fewer stream bytes than this through a relay in an idle timeout is no
#: progress, at either end (a peer that trickles must not hold a domain).
IDLE_MIN_BYTES = 64 << 10
# Most bytes one splice moves.  Into a loopback or local socket the kernel does
# the receiving side's work inside the sender's call: a pump of 1 MiB splices
# took up to 18 ms of the loop's CPU in bench/stall.py's migrate round.  At
# 256 KiB such callbacks are rarer (worst 13 ms against 23 ms in A/B runs), for
# 1.4x the loop's CPU per GiB (bench/README.md).
SPLICE = 256 << 10
# Under a bandwidth cap the helper should feel it soon: a small pipe (not the
# kernel's default 64 KiB, which our helper grows to 256 KiB).
CAPPED_PIPE = 32 << 10
_PUMP_CALLS = 8                           # splices per wake-up of a relay
# ...and at most this long: a splice can sleep on the pipe's lock while the
# helper, holding it mid-write, waits for a CPU (1-17 ms each, seen on 2 vCPUs),
# and eight such in a row held the loop for 50-90 ms.
_PUMP_SECONDS = 0.002


class SpliceRelay:
    """Move the save stream from the helper's pipe to the connection (or from
    the connection into the restore helper's pipe), then a trailer; at most
    ``rate`` bytes/s (token bucket, ~20 ms bursts).

    The bytes never enter this process: ``splice(2)`` moves them between the
    kernel's buffers (one end is always a pipe), as much as either end takes
    per wake-up -- a handful of syscalls per MiB instead of a read, a write and
    four selector changes per pipe-full, which is what a migration through
    Python cost before.

    ``on_done()`` once everything is written; ``on_error(exc)`` if an end
    broke -- the relay then keeps draining ``src`` into nowhere so the helper
    is never killed by SIGPIPE (the owner cancels the save).
    """

    _FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK

    def __init__(self, loop: Loop, src: int, dst: int, rate: Optional[int],
                 on_done: Callable[[], None], on_error: Callable[[OSError], None]) -> None:
        self.loop, self.src, self.dst, self.rate = loop, src, dst, rate
        self.on_done, self.on_error = on_done, on_error
        self.burst = max(64 << 10, (rate or 0) // 50)
        self.tokens = float(self.burst)
        self.stamp = time.monotonic()
        self.eof = False
        self.tail: Optional[memoryview] = None
        self.sent = 0
        self.finished = False
        self.discarding = False
        self._timer: Optional[Timer] = None
        self._reading = self._writing = False
        # which end blocked a splice: a zero-timeout poll of both
        self._probe = select.poll()
        self._probe.register(src, select.POLLIN)
        self._probe.register(dst, select.POLLOUT)
        set_nonblocking(src, True)
        set_nonblocking(dst, True)
        self._pump()

    # -- registrations --

    @property
    def waiting_on_peer(self) -> bool:
        """Bytes wait for the destination to take them (it is not writable)."""
        return self._writing

    def _watch(self, read: bool, write: bool) -> None:
        if read != self._reading:
            (self.loop.add_reader(self.src, self._pump) if read
             else self.loop.remove_reader(self.src))
            self._reading = read
        if write != self._writing:
            (self.loop.add_writer(self.dst, self._pump) if write
             else self.loop.remove_writer(self.dst))
            self._writing = write

    def _refill(self) -> float:
        now = time.monotonic()
        assert self.rate
        self.tokens = min(float(self.burst), self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return self.tokens

    def _tick(self) -> None:
        self._timer = None
        self._pump()

    def _blocked(self) -> None:
        """A splice would block: wait for the end that blocked it."""
        ready = dict(self._probe.poll(0))
        src_ready = ready.get(self.src, 0) & (select.POLLIN | select.POLLHUP | select.POLLERR)
        self._watch(not src_ready, bool(src_ready))

    # -- moving --

    def _pump(self) -> None:
        budget = _PUMP_CALLS   # then back to the loop, so other work is not starved
        until = time.monotonic() + _PUMP_SECONDS
        while not self.finished:
            if self.discarding:
                self._discard()
                return
            if not self.eof:
                n = SPLICE
                if self.rate:
                    n = min(n, int(self._refill()))
                    if n < 4096:
                        self._watch(False, False)
                        if self._timer is None:
                            self._timer = self.loop.call_later(
                                max((4096 - self.tokens) / self.rate, 0.001), self._tick)
                        return
                if budget == 0 or time.monotonic() > until:
                    self._watch(True, False)   # level-triggered: comes straight back
                    return
                budget -= 1
                try:
                    moved = os.splice(self.src, self.dst, n, flags=self._FLAGS)
                except BlockingIOError:
                    self._blocked()
                    return
                except OSError as exc:
                    self.fail(exc)
                    return
                if moved == 0:
                    self.eof = True
                    continue
                self.sent += moved
                if self.rate:
                    self.tokens -= moved
                continue
            if self.tail is None:
                self._watch(False, False)   # all relayed; waiting for finish(tail)
                return
            if self.tail:
                try:
                    written = os.write(self.dst, self.tail)
                except BlockingIOError:
                    self._watch(False, True)
                    return
                except OSError as exc:
                    self.fail(exc)
                    return
                self.sent += written
                self.tail = self.tail[written:]
                continue
            self.finished = True
            self._watch(False, False)
            self.on_done()

    def _discard(self) -> None:
        while not self.eof:
            try:
                if not os.read(self.src, CHUNK):
                    self.eof = True
            except BlockingIOError:
                self._watch(True, False)
                return
            except OSError:
                self.eof = True
        self._watch(False, False)

    # -- owner --

    def finish(self, tail: bytes) -> None:
        """Queue the bytes that follow the helper's stream (the libxl trailer)."""
        self.tail = memoryview(tail)
        self._pump()

    def fail(self, exc: OSError) -> None:
        if self.discarding or self.finished:
            return
        self.abandon()
        self.on_error(exc)

    def abandon(self) -> None:
        """Stop sending; drain the pipe into nowhere until its writers are gone."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.discarding = True
        self._watch(False, False)
        self._pump()

    def close(self) -> None:
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._watch(False, False)
