"""XenStore exchanges written once, run on the loop or waited for.

A domain's build writes some 60 nodes in a transaction; on a busy host each of
xenstored's answers can take tens of milliseconds, so the exchange must not
run inside one loop callback.  An exchange is written as a *script*: a
generator that yields a round of requests ``[(type, payload, tx_id)]``,
receives that round's replies (each the payload, or the XenStoreError of an
XS_ERROR), and returns its result.  A transaction is three rounds (start, its
changes, end) however many nodes it writes.  The same script runs two ways:

* :func:`run` -- on a connection, waiting for each round (scripts, tests,
  the CLI's waited-for forms);
* :class:`XsTask` -- on an event loop, on a connection of its own: a round is
  sent at once and its replies are read when the socket says they are there,
  so the loop never waits on xenstored.  A script on the loop may also
  yield :data:`EVENT` to wait for a watch event on its connection
  (:class:`~pyxl.backends.xswatch.XsWait` is such a script).

May import: pyxl.backends.xenstore, pyxl.loop.
"""

from __future__ import annotations

import errno
import socket
from typing import Callable, Generator, Generic, List, Optional, Sequence, Tuple, TypeVar, Union

from pyxl.backends.xenstore import (XS_TRANSACTION_END, XS_TRANSACTION_START, Batch,
                                    XenStore, XenStoreError, check_batch, check_reply)
from pyxl.loop import Loop, Timer

__all__ = ["Request", "Reply", "XsScript", "EVENT", "run", "transaction", "ok", "missing", "entries",
           "reason", "XsTask"]

T = TypeVar("T")
Request = Tuple[int, bytes, int]
Reply = Union[bytes, XenStoreError]
XsScript = Generator[List[Request], List[Reply], T]



class _EventRound(List[Request]):
    """The type of :data:`EVENT`."""


#: The round a script on the loop yields to wait for a watch event: answered
#: with no replies once at least one event has come (the events themselves
#: are dropped: a waiter reads again what it watches).
EVENT: List[Request] = _EventRound()

#: xenstored answers a conflicting transaction's end with EAGAIN; libxl then
#: makes the transaction again.  Bounded here so that a store that always
#: conflicts is an error, not a loop.
TRANSACTION_ATTEMPTS = 10

#: How long one exchange on the loop may wait for xenstored, in all.
XS_TIMEOUT = 30.0


def ok(reply: Reply) -> bytes:
    """A reply's payload; its error raised."""
    if isinstance(reply, XenStoreError):
        raise reply
    return reply


def missing(reply: Reply) -> bool:
    """Whether a reply says the node does not exist (ENOENT)."""
    return isinstance(reply, XenStoreError) and reply.errno == errno.ENOENT


def entries(payload: bytes) -> List[str]:
    """An XS_DIRECTORY reply's names."""
    return [p.decode() for p in payload.split(b"\0") if p]


def reason(exc: Exception) -> str:
    """An exchange's failure in one line, without errno's number."""
    if isinstance(exc, OSError) and exc.strerror:
        return str(exc.strerror)
    return str(exc) or type(exc).__name__


def transaction(fill: Callable[[Batch, int], None]) -> XsScript[None]:
    """A transaction whose changes ``fill(batch, tx_id)`` queues (called
    again if xenstored asks for the transaction to be made again)."""
    for _ in range(TRANSACTION_ATTEMPTS):
        tx = int(ok((yield [(XS_TRANSACTION_START, b"\0", 0)])[0]).rstrip(b"\0"))
        batch = Batch()
        fill(batch, tx)
        replies = yield batch.requests
        try:
            check_batch(batch.requests, replies)
        except XenStoreError:
            yield [(XS_TRANSACTION_END, b"F\0", tx)]
            raise
        end = (yield [(XS_TRANSACTION_END, b"T\0", tx)])[0]
        if isinstance(end, XenStoreError) and end.errno == errno.EAGAIN:
            continue
        ok(end)
        return
    raise XenStoreError(errno.EAGAIN, f"xenstored: the transaction conflicted "
                        f"{TRANSACTION_ATTEMPTS} times")


def run(xs: XenStore, script: XsScript[T]) -> T:
    """Run ``script`` on ``xs``, waiting for each round's replies."""
    try:
        requests = next(script)
        while True:
            if requests is EVENT:
                raise ValueError("a script waiting for watch events runs on a loop (XsTask)")
            requests = script.send(xs.pipeline(requests) if requests else [])
    except StopIteration as stop:
        value: T = stop.value
        return value


class XsTask(Generic[T]):
    """``script`` run on ``loop`` over a connection ``opener()`` makes for it;
    ``done(exc)`` once, from the loop: None when the script returned (its
    value is :attr:`result`), else what failed (the script's exception, the
    connection's OSError, or a timeout after ``timeout`` s).  Cancelling, or
    the end, closes the connection, and xenstored forgets a transaction left
    open on it."""

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], script: XsScript[T],
                 done: Callable[[Optional[Exception]], None], what: str = "XenStore",
                 timeout: float = XS_TIMEOUT) -> None:
        self.loop, self.what, self._opener = loop, what, opener
        self.result: Optional[T] = None
        self._script: Optional[XsScript[T]] = script
        self._done: Optional[Callable[[Optional[Exception]], None]] = done
        self._xs: Optional[XenStore] = None
        self._expect: List[Tuple[int, int]] = []
        self._replies: List[Reply] = []
        self._unsent = b""
        self._writing = False
        self._waiting = False      # the script yielded EVENT
        self._timer: Optional[Timer] = loop.call_later(0, self._start)
        self._deadline: Optional[Timer] = loop.call_later(timeout, lambda: self._fail(
            OSError(errno.ETIMEDOUT, f"{what}: xenstored did not answer within {timeout:g} s")))

    # -- the loop's callbacks -------------------------------------------------
    def _start(self) -> None:
        self._timer = None
        try:
            self._xs = xs = self._opener()
            if isinstance(xs.sock, socket.socket):
                xs.sock.setblocking(False)
            self.loop.add_reader(xs.fileno(), self._readable)
            assert self._script is not None
            self._send(next(self._script))
        except StopIteration as stop:
            self._finish(stop.value)
        except Exception as exc:  # the script's or the connection's failure is the outcome
            self._fail(exc)

    def _send(self, requests: Sequence[Request]) -> None:
        assert self._xs is not None
        while not requests:     # a round of nothing is answered at once; EVENT by an event
            if requests is EVENT and not self._xs.events():
                self._waiting = True
                return
            assert self._script is not None
            requests = self._script.send([])
        frames, self._expect = self._xs.next_frames(requests)
        self._replies = []
        sock = self._xs.sock
        if not isinstance(sock, socket.socket):
            for frame in frames:    # the xenbus device takes one message per write
                sock.sendall(frame)
            return
        self._unsent += b"".join(frames)
        self._write()

    def _write(self) -> None:
        assert self._xs is not None
        try:
            sent = self._xs.sock.send(self._unsent)
        except BlockingIOError:
            sent = 0
        self._unsent = self._unsent[sent:]
        fd = self._xs.fileno()
        if self._unsent and not self._writing:
            self.loop.add_writer(fd, self._writable)
            self._writing = True
        elif not self._unsent and self._writing:
            self.loop.remove_writer(fd)
            self._writing = False

    def _writable(self) -> None:
        try:
            self._write()
        except OSError as exc:
            self._fail(OSError(exc.errno, f"{self.what}: XenStore: {exc.strerror or exc}"))

    def _readable(self) -> None:
        if self._xs is None:
            return
        try:
            if self._waiting:
                if self._xs.events():
                    self._waiting = False
                    assert self._script is not None
                    self._send(self._script.send([]))
                return
            for rtype, rid, body in self._xs.replies_ready():
                if not self._expect:
                    raise OSError(errno.EPROTO, f"XenStore reply {rid} to no request")
                mtype, req_id = self._expect.pop(0)
                try:
                    self._replies.append(check_reply(mtype, req_id, rtype, rid, body))
                except XenStoreError as exc:
                    self._replies.append(exc)
                if not self._expect:
                    assert self._script is not None
                    self._send(self._script.send(self._replies))
        except StopIteration as stop:
            self._finish(stop.value)
        except Exception as exc:  # the script's or the connection's failure is the outcome
            self._fail(exc)

    # -- the end ---------------------------------------------------------------
    def _finish(self, value: T) -> None:
        self.result = value
        self._end(None)

    def _fail(self, exc: Exception) -> None:
        self._end(exc)

    def _end(self, exc: Optional[Exception]) -> None:
        done = self._done
        self.cancel()
        if done is not None:
            done(exc)

    def cancel(self) -> None:
        self._done = None
        for timer in (self._timer, self._deadline):
            if timer is not None:
                timer.cancel()
        self._timer = self._deadline = None
        if self._script is not None:
            self._script.close()
            self._script = None
        if self._xs is not None:
            fd = self._xs.fileno()
            self.loop.remove_reader(fd)
            if self._writing:
                self.loop.remove_writer(fd)
            self._xs.close()
            self._xs = None
