"""The receiver's door: which connection may hand it a migration.

This module owns :class:`Admission` -- one connection from its accept (or
the given fds) until the stream's head arrived: the TLS handshake and the
allow-list (:mod:`.tls`), the banner, the head read with exact reads, one
deadline over all of it -- and :class:`Link`, the admitted connection as
the receiver then uses it (``rfd``/``wfd``, half-close, close).  A listening
receiver runs several admissions at once and takes the first that delivers
a stream head; the others, and every connection that fails TLS, is not
allowed, sends garbage or stays silent, are dropped while it keeps
listening (what a failure may tell the peer is :mod:`.reasons`').  Plain
TCP on loopback takes only connections of the receiver's own user
(:mod:`.peeruid`).  It may import the
handshake, tls and peeruid modules of this package, pyxl.errors, pyxl.fdio
and pyxl.loop.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Dict, Optional, Sequence, Tuple

from pyxl.errors import MigrationAuthError, MigrationError, MigrationProtocolError, OperationError
from pyxl.fdio import FdWriter, close_quietly, set_nonblocking
from pyxl.loop import Loop, Timer
from pyxl.migrate.handshake import (NEED_DATA, Banner, ConnectionClosed, ReceiverFailed,
                                    ReceiverHandshake, StreamHead)
from pyxl.migrate.peeruid import peer_uid
from pyxl.migrate.tls import TlsBridge, TlsOptions, allowed

__all__ = ["Admission", "DropLog", "Link", "SILENT", "SECURING", "TALKING",
           "pick_evictee"]

# How far a pending connection got, for eviction: a peer that has sent nothing
# cost one connect(); one in its TLS handshake made us start a stage; one that
# is authenticated (or, on plain TCP, has sent part of a head) is likely the
# real sender.
SILENT, SECURING, TALKING = 0, 1, 2


def pick_evictee(pending: Sequence[Tuple[str, int]]) -> int:
    """Which pending connection goes when a newcomer finds the door full.

    ``pending``: (source address, progress) per connection, oldest first; the
    answer is an index into it.  Only the source address holding the most
    connections is a candidate (a flood from one place pushes out its own,
    not others'); among its connections the least advanced goes, the oldest
    among equals -- so while silent peers are pending, one that has started
    TLS or sent a head's first bytes is never pushed out by a cheap peer.
    """
    count: Dict[str, int] = {}
    for host, _ in pending:
        count[host] = count.get(host, 0) + 1
    most = max(count.values())
    return min((i for i, (host, _) in enumerate(pending) if count[host] == most),
               key=lambda i: (pending[i][1], i))


class DropLog:
    """Dropped connections in the log without a log flood: the first
    ``burst`` of each ``window`` seconds one WARNING each (with the reason),
    then, if there were more, one summary WARNING at the window's end:
    ``dropped N connections from M sources in the last 10s (5 shown above;
    most from HOST: K)``.  WARNINGs show without ``-v`` (the CLI's), so a flood
    is seen, and it never costs more than burst + 1 lines a window."""

    def __init__(self, loop: Loop, logger: logging.Logger, window: float = 10.0,
                 burst: int = 5) -> None:
        self.loop, self.logger, self.window, self.burst = loop, logger, window, burst
        self._logged = self._dropped = 0
        self._sources: Dict[str, int] = {}
        self._timer: Optional[Timer] = None

    def dropped(self, peer: str, why: object) -> None:
        if self._timer is None:
            self._timer = self.loop.call_later(self.window, self.flush)
        self._dropped += 1
        host = peer.rsplit(":", 1)[0]
        self._sources[host] = self._sources.get(host, 0) + 1
        if self._logged < self.burst:
            self._logged += 1
            self.logger.warning("dropped the connection from %s: %s", peer, why)

    def flush(self) -> None:
        """Sum up the window, if not all of it was logged one by one; start a new one."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._dropped > self._logged:
            top = max(self._sources, key=lambda h: self._sources[h])
            n = len(self._sources)
            self.logger.warning("dropped %d connections from %d source%s in the last %gs "
                                "(%d shown above; most from %s: %d)", self._dropped, n,
                                "" if n == 1 else "s", self.window, self._logged, top,
                                self._sources[top])
        self._logged = self._dropped = 0
        self._sources.clear()


def _not_our_user(sock: socket.socket) -> Optional[str]:
    """Why a plain loopback connection may not send us a domain: another user
    opened it (loopback is every local user's; see :mod:`.peeruid`)."""
    try:
        uid = peer_uid(sock)
    except OSError as exc:
        return f"cannot tell which user opened the connection ({exc.strerror or exc})"
    if uid != os.geteuid():
        return (f"the connection is user {uid}'s, not this receiver's ({os.geteuid()}): "
                "plain TCP takes only its own user's connections (use TLS, ssh or --insecure)")
    return None


class Link:
    """The connection to an admitted sender: ``rfd``/``wfd`` (one socket,
    given fds, or a TLS bridge's pipe ends), a half-close and a close."""

    def __init__(self, rfd: int, wfd: int, peer: str, *, sock: Optional[socket.socket] = None,
                 bridge: Optional[TlsBridge] = None) -> None:
        self.rfd, self.wfd, self.peer = rfd, wfd, peer
        self.sock, self.bridge = sock, bridge
        self.closed = False

    def shutdown_write(self) -> None:
        """No more bytes for the peer (it sees EOF after what was written)."""
        if self.bridge is not None:
            close_quietly(self.wfd)   # the bridge sends close_notify after the pipe's bytes
            self.wfd = -1
        elif self.sock is not None:
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def close(self, then: Optional[Callable[[], None]] = None, hard: bool = False) -> None:
        """Close it; ``then()`` once nothing of it is left (a TLS bridge first
        sends what was written, within its grace period, unless ``hard``)."""
        done = then or (lambda: None)
        if self.closed:
            done()
            return
        self.closed = True
        if self.bridge is not None:
            for fd in {self.rfd, self.wfd}:
                close_quietly(fd)
            self.rfd = self.wfd = -1
            self.bridge.close(done)
            if hard:
                self.bridge.abort()
            return
        if self.sock is not None:
            self.sock.close()
        else:   # given fds (stdio): not ours to close; leave them as we found them
            for fd in {self.rfd, self.wfd}:
                try:
                    set_nonblocking(fd, False)
                except OSError:
                    pass
        done()


class Admission:
    """One connection until its stream head: TLS and the allow-list (with
    ``tls``), the banner, the head.  ``on_head(self, head)`` once it came --
    the caller takes :attr:`link`, :attr:`handshake` and :attr:`outbox`;
    ``on_reject(self, exc)`` otherwise (a :class:`MigrationError`: bad
    certificate, not allowed, garbage, EOF, or nothing within ``timeout``).
    """

    def __init__(self, loop: Loop, *, sock: Optional[socket.socket] = None,
                 fds: Optional[Tuple[int, int]] = None, peer: str = "",
                 tls: Optional[TlsOptions] = None,
                 timeout: Optional[float],
                 on_head: Callable[["Admission", StreamHead], None],
                 on_reject: Callable[["Admission", OperationError], None],
                 logger: logging.Logger,
                 on_stage: Optional[Callable[["Admission"], None]] = None,
                 own_user_only: bool = False) -> None:
        self.loop, self.peer, self.logger = loop, peer, logger
        self.on_head, self.on_reject, self.on_stage = on_head, on_reject, on_stage
        self.allow = tls.allow if tls is not None else ()
        self.handshake = ReceiverHandshake()
        self.link: Optional[Link] = None
        self.outbox: Optional[FdWriter] = None
        self.bridge: Optional[TlsBridge] = None
        self.sock = sock
        self.host = peer.rsplit(":", 1)[0] if sock is not None else peer
        self.finished = False
        self._got = 0             # head bytes read so far
        self._watching = False
        self._timeout = timeout
        self._timer: Optional[Timer] = (loop.call_later(timeout, self._idle)
                                        if timeout is not None else None)
        self._tls = tls
        self._hello_watch = False
        if tls is not None:
            # The TLS stage (a child process, ~25 ms of CPU to start) only once
            # the peer has sent something: a port scan or a silent peer costs
            # nothing but its socket.
            assert sock is not None
            loop.add_reader(sock.fileno(), self._hello)
            self._hello_watch = True
        elif sock is not None:
            self.link = Link(sock.fileno(), sock.fileno(), peer, sock=sock)
            why = _not_our_user(sock) if own_user_only else None
            if why is not None:   # refused before the banner, as a peer not allowed
                set_nonblocking(sock.fileno(), True)
                self.outbox = FdWriter(self.loop, sock.fileno(), self._write_failed)
                self._reject(MigrationAuthError(why))
                return
            self._open()
        else:
            assert fds is not None
            self.link = Link(fds[0], fds[1], peer)
            self._open()

    @property
    def staged(self) -> bool:
        """Has it started a TLS stage (a process) that is not gone?"""
        return self._tls is not None and (self.bridge is not None or self.link is not None)

    def progress(self) -> int:
        """SILENT, SECURING or TALKING (see :func:`pick_evictee`).  A silent
        peer's socket is peeked (non-blocking): bytes that came but were not
        yet seen by the loop count, so a burst of accepts in one wake-up does
        not push out a sender whose first bytes wait to be read."""
        if self._got or (self._tls is not None and self.link is not None):
            return TALKING
        if self.bridge is not None:
            return SECURING
        sock = self.sock if self.sock is not None else (
            self.link.sock if self.link is not None else None)
        if sock is None:
            return SILENT
        try:
            return SECURING if sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) else SILENT
        except OSError:
            return SILENT

    def _hello(self) -> None:
        assert self.sock is not None and self._tls is not None
        try:
            first = self.sock.recv(1, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._reject(MigrationError(f"the connection failed before TLS: {exc.strerror}"))
            return
        self._unwatch_hello()
        if not first:
            self._reject(MigrationError("the peer closed the connection before TLS"))
            return
        if self.on_stage is not None:
            self.on_stage(self)   # the owner makes room: stages are bounded, sockets less so
        self.bridge = TlsBridge(self.loop, self.sock, self._tls, server=True,
                                on_ready=self._secured, on_failed=self._reject)
        self.sock = None          # the bridge's (its stage's) now

    def _unwatch_hello(self) -> None:
        if self._hello_watch:
            assert self.sock is not None
            self.loop.remove_reader(self.sock.fileno())
            self._hello_watch = False

    def _secured(self, rfd: int, wfd: int) -> None:
        assert self.bridge is not None
        names = ", ".join(self.bridge.peer) or "no name"
        self.logger.info("TLS peer %s authenticated as %s", self.peer, names)
        self.link = Link(rfd, wfd, f"{self.peer} ({names})", bridge=self.bridge)
        if not allowed(self.bridge.peer, self.allow):
            # Authenticated, but not one we take a domain from: say so inside TLS.
            self.outbox = FdWriter(self.loop, wfd, self._write_failed)
            self._reject(MigrationAuthError(f"the peer's certificate ({names}) is not on "
                                            "the allow-list"))
            return
        self._open()

    def _open(self) -> None:
        assert self.link is not None
        set_nonblocking(self.link.rfd, True)
        set_nonblocking(self.link.wfd, True)
        self.outbox = FdWriter(self.loop, self.link.wfd, self._write_failed)
        self.outbox.send(self.handshake.send(Banner()))
        if self.outbox.active:
            self.loop.add_reader(self.link.rfd, self._readable)
            self._watching = True

    def _readable(self) -> None:
        """Exact reads of the stream's head, so the rest stays for the relay."""
        assert self.link is not None
        try:
            data = os.read(self.link.rfd, self.handshake.wanted)
        except BlockingIOError:
            return
        except OSError as exc:
            self._reject(MigrationError(f"reading from the sender failed: {exc.strerror}"))
            return
        self._got += len(data)
        self.handshake.receive_data(data)
        try:
            event = self.handshake.next_event()
        except MigrationProtocolError as exc:
            self._reject(exc)
            return
        except Exception as exc:   # a peer's bytes must not escape the loop
            self._reject(MigrationProtocolError(f"not a migration stream: "
                                                f"{type(exc).__name__}"))
            return
        if event is NEED_DATA:
            return
        if isinstance(event, ConnectionClosed):
            self._reject(MigrationError("the sender closed the connection before the stream"))
            return
        assert isinstance(event, StreamHead)
        self._stop()
        self.on_head(self, event)

    def _idle(self) -> None:
        self._timer = None
        self._reject(MigrationError(f"no migration stream from {self.peer or 'the sender'} "
                                    f"within {self._timeout:g}s"))

    def _write_failed(self, exc: OSError) -> None:
        self._reject(MigrationError(f"writing to the sender failed: {exc.strerror}"))

    def _reject(self, exc: OperationError) -> None:
        if self.finished:
            return
        self._stop()
        self.on_reject(self, exc)

    def _stop(self) -> None:
        self.finished = True
        self._unwatch_hello()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._watching:
            assert self.link is not None
            self.loop.remove_reader(self.link.rfd)
            self._watching = False

    def refuse(self, reason: str, then: Optional[Callable[[], None]] = None,
               hard: bool = False) -> None:
        """Drop it: tell the peer ``reason`` if a word fits without waiting
        (a TLS bridge still sends it, within its grace), close, ``then()``."""
        self._stop()
        if (self.outbox is not None and self.outbox.active
                and self.handshake.state != ReceiverHandshake.FAILED):
            self.outbox.send(self.handshake.send(ReceiverFailed(reason)))
        self.close(then, hard=hard)

    def abort(self) -> None:
        """Cut a closing connection short (its TLS stage is killed; the
        ``then`` given to :meth:`close` or :meth:`refuse` still comes)."""
        bridge = self.link.bridge if self.link is not None else self.bridge
        if bridge is not None:
            bridge.abort()

    def close(self, then: Optional[Callable[[], None]] = None, hard: bool = False) -> None:
        self._stop()
        if self.outbox is not None:
            self.outbox.close()
        if self.link is not None:
            self.link.close(then, hard=hard)
        elif self.bridge is not None:   # still in its TLS handshake
            self.bridge.close(then)
            self.bridge.abort()
        else:
            if self.sock is not None:
                self.sock.close()
            if then is not None:
                then()
