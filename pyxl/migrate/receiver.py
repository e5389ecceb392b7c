"""The receiving side of a migration: :class:`ReceiveOperation` and :func:`receive`.

This module owns the receiver's decisions: listening for one connection
(or using given fds, as under ssh), handing the stream to a restore through
a pipe that a :class:`~pyxl.migrate.relay.SpliceRelay` feeds, restoring the
guest paused as ``NAME--incoming``, renaming and unpausing it once cleared,
failing over at a Remus stream's last checkpoint, and destroying what it
received on every failure (telling the sender why, then waiting briefly for
it to hang up).  Bytes go through
:class:`~pyxl.migrate.handshake.ReceiverHandshake`.  It may import the
handshake, relay, domain, future and address modules of this package,
pyxl.ops (RestoreOperation), pyxl.backends, pyxl.errors, pyxl.fdio and
pyxl.loop; the sender's modules never.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Tuple, Union

from pyxl.backends import Backend, default_backend
from pyxl.errors import MigrationError, MigrationProtocolError, OperationError, StartupError
from pyxl.fdio import FdWriter, close_quietly, set_nonblocking
from pyxl.loop import Loop
from pyxl.migrate.address import parse_address
from pyxl.migrate.domain import INCOMING, digest_or_none, domain_name
from pyxl.migrate.future import MigrationFuture
from pyxl.migrate.handshake import (NEED_DATA, Banner, ConnectionClosed, DomainReceived,
                                    ReceiverFailed, ReceiverHandshake, StreamHead,
                                    UnpauseResult)
from pyxl.migrate.relay import CHUNK, SpliceRelay, make_pipe, pipe_size
from pyxl.ops.api import restore
from pyxl.ops.operation import STREAM_PLAIN, STREAM_REMUS
from pyxl.ops.restore import RestoreOperation, RestoreResult

__all__ = ["ReceiveOperation", "ReceiveResult", "receive"]


@dataclass
class ReceiveResult:
    domid: int
    digest: Optional[str]       # sim digest of the received domain before it ran (on request)
    duration: float
    paused: bool
    restore: RestoreResult
    checkpoints: int = 0        # Remus: checkpoints received
    failover: bool = False      # Remus: the sender vanished; took over at the last checkpoint


class ReceiveOperation(MigrationFuture):
    """Receive one migrating domain; see :func:`receive`.

    The receiver destroys its domain on every failure (restore, lost sender,
    failed unpause, timeout, cancel): no half-made domain stays behind.  A
    Remus stream (``remus=True``) that ends after a complete checkpoint
    without its END (the sender died or was stopped) is a failover: the guest
    runs from that checkpoint, without any handshake.
    """

    kind = "migration receive"

    def __init__(self, listen: Optional[Union[str, Tuple[str, int], socket.socket]] = None, *,
                 fds: Optional[Tuple[int, int]] = None, paused: bool = False,
                 helper: Optional[str] = None, timeout: Optional[float] = None,
                 loop: Optional[Loop] = None, sim_dir: Optional[str] = None,
                 backend: Optional[Backend] = None, digest: bool = False,
                 remus: bool = False) -> None:
        self.remus = remus
        if (listen is None) == (fds is None):
            raise ValueError("give either listen (an address or a listening socket) or fds")
        self.backend = backend or default_backend(sim_dir)
        self.paused, self.helper, self.want_digest = paused, helper, digest
        self.logger = logging.getLogger("pyxl.migrate.receive")
        # listening, header, stream, go, reported; failed, draining
        self.state = "listening"
        self.handshake = ReceiverHandshake()
        self.restore: Optional[RestoreOperation] = None
        self.domid: Optional[int] = None
        self.name: Optional[str] = None   # the domain's, once it runs here
        self.digest: Optional[str] = None
        self.outbox: Optional[FdWriter] = None
        self._listener: Optional[socket.socket] = None
        self._conn: Optional[socket.socket] = None
        self._watching = False
        self._pipe: List[int] = [-1, -1]
        self.relay: Optional[SpliceRelay] = None
        self._restored_result: Optional[RestoreResult] = None
        self.rfd = self.wfd = -1
        self.address: Optional[Tuple[str, int]] = None
        self._pending_error: Optional[OperationError] = None
        self._error: Optional[OperationError] = None
        super().__init__(loop, timeout)
        if fds is not None:
            self.rfd, self.wfd = fds
            self._start()
            return
        if isinstance(listen, socket.socket):
            self._listener = listen
        else:
            assert listen is not None
            host, port = parse_address(listen, listen=True) if isinstance(listen, str) else listen
            try:
                infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                           flags=socket.AI_PASSIVE)
                family, stype, proto, _, addr = infos[0]
                self._listener = socket.socket(family, stype, proto)
                self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                self._listener.bind(addr)
                self._listener.listen(1)
            except OSError as exc:
                if self._listener is not None:
                    self._listener.close()
                for t in self._timers:
                    t.cancel()
                raise StartupError(f"cannot listen on {host}:{port}: "
                                   f"{exc.strerror or exc}") from exc
        self._listener.setblocking(False)
        self.address = self._listener.getsockname()[:2]
        self.loop.add_reader(self._listener.fileno(), self._accept)

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            conn, peer = self._listener.accept()
        except BlockingIOError:
            return
        self.loop.remove_reader(self._listener.fileno())
        self._listener.close()
        self._listener = None
        self.logger.info("migration from %s", peer)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._conn = conn
        self.rfd = self.wfd = conn.fileno()
        self._start()

    def _start(self) -> None:
        self.state = "header"
        set_nonblocking(self.rfd, True)
        set_nonblocking(self.wfd, True)
        self.outbox = FdWriter(self.loop, self.wfd, self._write_failed)
        self.outbox.send(self.handshake.send(Banner()))
        self._watch(self._header_readable)

    def _watch(self, fn: Optional[Callable[[], None]]) -> None:
        if self._watching:
            self.loop.remove_reader(self.rfd)
            self._watching = False
        if fn is not None:
            self.loop.add_reader(self.rfd, fn)
            self._watching = True

    def _feed(self, data: bytes, closed_why: str) -> Optional[object]:
        """Hand the sender's bytes to the handshake: its next event, or None when
        there is none yet or the receive failed (already reported)."""
        self.handshake.receive_data(data)
        try:
            event = self.handshake.next_event()
        except MigrationProtocolError as exc:
            self._fail(exc)
            return None
        if event is NEED_DATA:
            return None
        if isinstance(event, ConnectionClosed):
            self._fail(MigrationError(closed_why))
            return None
        return event

    def _header_readable(self) -> None:
        """Collect the stream's head -- the xl header, the libxl header and the
        LIBXC_CONTEXT record header -- with exact reads, so that the restore
        can read them without waiting and the rest stays for the relay."""
        try:
            data = os.read(self.rfd, self.handshake.wanted)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(MigrationError(f"reading from the sender failed: {exc.strerror}"))
            return
        event = self._feed(data, "the sender closed the connection before the stream")
        if event is None:
            return
        assert isinstance(event, StreamHead)
        self._watch(None)
        self._begin_restore(event)

    def _begin_restore(self, head: StreamHead) -> None:
        """Hand the stream to a restore through a pipe fed from the loop.

        Not the connection itself: a helper holding it would keep it open if
        this process died, and the sender would stream on into nowhere.  With
        the pipe, our death is the helper's EOF and the sender's reset.
        """
        self.state = "stream"
        r, w = make_pipe(CHUNK)
        self._pipe = [r, w]
        data = head.data + head.rest
        if len(data) > pipe_size(w):
            self._fail(MigrationError(f"the stream's header ({len(data)} bytes) does not fit "
                                      "this host's pipes"))
            return
        os.write(w, data)   # an empty pipe takes it whole
        self.name = domain_name(head.header.config or {}) if head.header is not None else None
        try:
            self.restore = restore(r, paused=True, helper=self.helper, loop=self.loop,
                                   backend=self.backend,
                                   stream_type=STREAM_REMUS if self.remus else STREAM_PLAIN,
                                   name=None if self.name is None else f"{self.name}{INCOMING}")
        except OperationError as exc:
            self._fail(exc)
            return
        self.domid = self.restore.domid
        set_nonblocking(w, True)
        self.relay = SpliceRelay(self.loop, self.rfd, w, None, self._sender_done,
                                 self._relay_failed)
        self.relay.finish(b"")
        self.restore.add_done_callback(self._restored)

    def _close_pipe(self, end: int) -> None:
        if self._pipe[end] >= 0:
            close_quietly(self._pipe[end])
            self._pipe[end] = -1

    def _sender_done(self) -> None:
        """EOF from the sender before the restore finished: pass it on to the helper."""
        self._close_pipe(1)

    def _relay_failed(self, exc: OSError) -> None:
        self.logger.error("reading the stream failed: %s", exc.strerror)
        self._close_pipe(1)

    def _restored(self, op: Any) -> None:
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        self._close_pipe(1)
        self._close_pipe(0)
        exc = op.exception()
        if exc is not None:
            self.domid = None   # the restore destroyed it
            self._fail(self._pending_error or exc)
            return
        self._restored_result = op.result()
        if self.want_digest:
            assert self.domid is not None
            self.digest = digest_or_none(self.backend, self.logger, self.domid)
        if self._restored_result.failover:
            self._take_over()
            return
        self.state = "go"
        assert self.outbox is not None
        self.outbox.send(self.handshake.send(DomainReceived()))
        self._watch(self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self.rfd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(MigrationError(f"reading from the sender failed: {exc.strerror}"))
            return
        if self.state == "draining":
            if not data:
                self._closed()
            return
        if self._feed(data, "the sender went away before clearing the unpause") is None:
            return
        self._watch(None)
        self._go()

    def _go(self) -> None:
        assert self.domid is not None and self.outbox is not None
        status = 0
        err: Optional[OperationError] = None
        try:
            if self.name is not None:
                self.backend.rename(self.domid, self.name)
            if not self.paused:
                self.backend.unpause(self.domid)
        except Exception as exc:
            status = 1
            err = MigrationError(f"received domain {self.domid} would not start: {exc}")
            self._destroy()
        self.state = "reported"
        result = None
        if err is None:
            assert self._restored_result is not None
            result = ReceiveResult(self.domid, self.digest, time.monotonic() - self.started,
                                   self.paused, self._restored_result,
                                   self._restored_result.checkpoints)
        self.outbox.send(self.handshake.send(UnpauseResult(status)),
                         then=lambda: self._close_and_finish(result, err))

    def _take_over(self) -> None:
        """Remus failover: the sender is gone after a complete checkpoint; run
        the guest from it (no handshake: nobody is left to clear us)."""
        assert self.domid is not None and self._restored_result is not None
        self.logger.warning("the sender vanished after checkpoint %d: taking over domain %d",
                            self._restored_result.checkpoints, self.domid)
        if self.name is not None:
            try:
                self.backend.rename(self.domid, self.name)
            except Exception as exc:   # e.g. the source still holds the name here
                self.logger.warning("failover domain %d keeps its name %s%s: %s", self.domid,
                                    self.name, INCOMING, exc)
        if not self.paused:
            try:
                self.backend.unpause(self.domid)
            except Exception as exc:
                self._fail(MigrationError(f"failover domain {self.domid} would not start: {exc}"))
                return
        self.state = "reported"
        result = ReceiveResult(self.domid, self.digest, time.monotonic() - self.started,
                               self.paused, self._restored_result,
                               self._restored_result.checkpoints, True)
        self._close_and_finish(result, None)

    def _destroy(self) -> None:
        if self.domid is None:
            return
        try:
            self.backend.destroy(self.domid)
        except Exception as exc:
            self.logger.error("could not destroy the half-received domain %d: %s",
                              self.domid, exc)
        self.domid = None

    def _write_failed(self, exc: OSError) -> None:
        if self.state in ("failed", "draining"):
            self._closed()   # the sender is gone: nobody to tell
            return
        if self.state == "reported":
            # The status did not get out: the sender keeps its copy paused (in doubt).
            self._close_and_finish(None, MigrationError(
                f"could not send the unpause status to the sender: {exc.strerror}"))
            return
        self._fail(MigrationError(f"writing to the sender failed: {exc.strerror}"))

    def _fail(self, exc: OperationError) -> None:
        if self._done or self.state in ("failed", "draining"):
            return
        if self.restore is not None and not self.restore.done():
            self.restore.cancel(grace=2.0)   # it destroys its domain; _restored comes back
            self._pending_error = exc
            return
        self.state = "failed"
        self._destroy()
        self.logger.error("%s", exc)
        self._error = exc
        if self.outbox is None or not self.outbox.active:
            self._close_and_finish(None, exc)
            return
        # Tell the sender why, then wait (briefly) for it to hang up, so that
        # our close does not reset the connection before it read the reason.
        self.outbox.send(self.handshake.send(ReceiverFailed(str(exc))), then=self._drain)

    def _drain(self) -> None:
        self.state = "draining"
        try:
            if self._conn is not None:
                self._conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        set_nonblocking(self.rfd, True)
        self._timers.append(self.loop.call_later(2.0, self._closed))
        self._watch(self._readable)

    def _closed(self) -> None:
        self._close_and_finish(None, self._error)

    def _close_and_finish(self, result: Any, exc: Optional[OperationError]) -> None:
        if self._done:
            return
        self._watch(None)
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        self._close_pipe(1)
        self._close_pipe(0)
        if self.outbox is not None:
            self.outbox.close()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            self._listener.close()
            self._listener = None
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        elif self.rfd >= 0:
            for fd in {self.rfd, self.wfd}:
                try:
                    set_nonblocking(fd, False)
                except OSError:
                    pass
        self._finish(result, exc)


def receive(listen: Optional[Union[str, Tuple[str, int], socket.socket]] = None, *,
            fds: Optional[Tuple[int, int]] = None, paused: bool = False,
            **kw: Any) -> ReceiveOperation:
    """Start receiving one migration: listen on ``listen`` ("ADDR:PORT", a tuple,
    or a listening socket; port 0 picks one, see ``op.address``) for one
    connection, or use ``fds=(read_fd, write_fd)`` (e.g. (0, 1) under ssh).

    The domain is restored paused and unpaused once the sender clears it
    (unless ``paused``).  Options: ``helper``, ``timeout``, ``loop``,
    ``sim_dir``, ``digest``.  ``pyxl.wait(op)`` gives a :class:`ReceiveResult`.
    """
    return ReceiveOperation(listen, fds=fds, paused=paused, **kw)
