"""The receiving side of a migration: :class:`ReceiveOperation` (:func:`pyxl.migrate.receive` starts one).

This module owns the receiver's decisions: listening for one connection
(or using given fds, as under ssh), handing the stream to a restore through
a pipe that a :class:`~pyxl.migrate.relay.SpliceRelay` feeds, restoring the
guest paused as ``NAME--incoming``, renaming and unpausing it once cleared,
failing over at a Remus stream's last checkpoint, and destroying what it
received on every failure (telling the sender why -- never local paths or
sizes -- then waiting briefly for it to hang up).  Who may send is
:mod:`.listener`'s matter (TLS, allow-list, banner, head, deadline): a
listening receiver drops bad peers and keeps listening until one delivers
a stream head; plain TCP is refused on a non-loopback address unless
``insecure``.  Bytes go through
:class:`~pyxl.migrate.handshake.ReceiverHandshake`.  It may import the
handshake, relay, listener, reasons, incoming, tls, domain, future and address modules of this package,
pyxl.ops (RestoreOperation), pyxl.backends, pyxl.errors, pyxl.fdio, pyxl.loop
and pyxl._units; the sender's modules never.  Its defaults and result type
are :mod:`.receiveoptions`'.
"""

from __future__ import annotations

import functools
import os
import socket
import time
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from pyxl._log import get_logger, log_failure
from pyxl.backends import Backend, default_backend
from pyxl.backends.base import start_destroy, start_rename, start_unpause
from pyxl.errors import MigrationError, MigrationProtocolError, OperationError, StartupError
from pyxl.fdio import FdWriter, check_channel, close_quietly, set_nonblocking
from pyxl.loop import Loop, Timer
from pyxl.migrate.address import format_address, is_loopback, parse_address
from pyxl.migrate.domain import INCOMING, digest_or_none, domain_name
from pyxl.migrate.future import MigrationFuture
from pyxl.migrate.handshake import (NEED_DATA, CompressionChosen, ConnectionClosed,
                                    DomainReceived, ReceiverFailed, ReceiverHandshake,
                                    ReceiverProgress, StreamHead, StreamStart, UnpauseResult)
from pyxl.migrate.incoming import config_checks, start_name_check, start_name_taken
from pyxl.migrate.listener import Admission, DropLog, Link, pick_evictee
from pyxl.migrate.reasons import blame_sender, peer_reason
from pyxl.migrate.receiveoptions import (HEADER_TIMEOUT, IDLE_MIN_BYTES, IDLE_TIMEOUT, MAX_PENDING,
                                         PLAIN_TCP_ADVICE, PROGRESS_EVERY, SILENT_SLOTS,
                                         ReceiveResult, check_receive_args)
from pyxl.migrate.relay import CHUNK, SpliceRelay, make_pipe, pipe_size
from pyxl.migrate.tls import TlsOptions, make_context
from pyxl.ops.jobstats import JobStats
from pyxl.ops.operation import STREAM_PLAIN, STREAM_REMUS
from pyxl.ops.restore import RestoreOperation, RestoreOptions, RestoreResult

__all__ = ["HEADER_TIMEOUT", "IDLE_TIMEOUT", "MAX_PENDING", "PLAIN_TCP_ADVICE", "ReceiveOperation",
           "ReceiveResult"]


class ReceiveOperation(MigrationFuture[ReceiveResult]):
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
                 remus: bool = False, tls: Optional[TlsOptions] = None,
                 insecure: bool = False, header_timeout: Optional[float] = HEADER_TIMEOUT,
                 idle_timeout: Optional[float] = IDLE_TIMEOUT,
                 max_pending: int = MAX_PENDING, compress: bool = True,
                 config_check: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        self.remus = remus
        self.config_check = config_check
        self.compress = compress and not remus   # take a sender's compression offer
        self.compressed = False
        check_receive_args(listen, fds, tls, header_timeout, idle_timeout, max_pending)
        self.tls, self.insecure = tls, insecure
        self.header_timeout, self.idle_timeout = header_timeout, idle_timeout
        self.max_pending = max_pending
        self._given_fds = fds is not None
        if tls is not None:
            make_context(tls, server=True)   # its files load, or StartupError now
        if fds is not None:
            check_channel(fds)
        self.backend = backend or default_backend(sim_dir)
        self.paused, self.helper, self.want_digest = paused, helper, digest
        self.logger = get_logger("pyxl.migrate.receive")
        # listening, header, stream, go, reported; failed, draining
        self.state = "listening"
        self.handshake = ReceiverHandshake()
        self.restore: Optional[RestoreOperation] = None
        self.domid: Optional[int] = None
        self.name: Optional[str] = None   # the domain's, once it runs here
        self.digest: Optional[str] = None
        self.outbox: Optional[FdWriter] = None
        self._listener: Optional[socket.socket] = None
        # A listening socket the caller gave stays theirs: never closed, its
        # timeout (blocking mode) put back.  pyxl's own is closed at the end.
        self._own_listener = True
        self._given_timeout: Optional[float] = None
        self.link: Optional[Link] = None
        self._pending: Dict[Admission, None] = {}  # connections not admitted yet, oldest first
        self._closing: Set[Admission] = set()     # dropped, their TLS stage not gone yet
        self._destroying = 0   # domains of ours still being destroyed
        self._quiet: Optional[Callable[[], None]] = None   # once those and _closing are gone
        self.refused = 0                          # connections dropped while listening
        self._idle_timer: Optional[Timer] = None
        self._progress_timer: Optional[Timer] = None
        self._idle_mark = -1
        self._finishing = False
        self._watching = False
        self._pipe: List[int] = [-1, -1]
        self.relay: Optional[SpliceRelay] = None
        self._restored_result: Optional[RestoreResult] = None
        self.rfd = self.wfd = -1
        self.address: Optional[Tuple[str, int]] = None
        self._pending_error: Optional[OperationError] = None
        self._sender_eof_at: Optional[int] = None   # bytes relayed when the sender hung up
        self._received = 0                          # stream bytes, once the relay is gone
        self._head_bytes = 0                        # the stream's head, written before it
        self._error: Optional[OperationError] = None
        super().__init__(loop, timeout)
        self._drops = DropLog(self.loop, self.logger)
        if fds is not None:
            self.state = "header"
            self._admit(Admission(self.loop, fds=fds, peer="stdio", timeout=header_timeout,
                                  on_head=self._admitted, on_reject=self._rejected,
                                  logger=self.logger))
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
                self._listener.listen(16)
            except OSError as exc:
                if self._listener is not None:
                    self._listener.close()
                for t in self._timers:
                    t.cancel()
                raise StartupError(f"cannot listen on {host}:{port}: "
                                   f"{exc.strerror or exc}") from exc
        sockname = self._listener.getsockname()
        if tls is None and not insecure and not is_loopback(sockname):
            if not isinstance(listen, socket.socket):
                self._listener.close()
            self._listener = None
            for t in self._timers:
                t.cancel()
            raise StartupError(
                f"refusing plain TCP on non-loopback {format_address(*sockname[:2])}: anyone who "
                f"can connect could send a domain; {PLAIN_TCP_ADVICE}")
        if tls is None and not is_loopback(sockname):   # insecure=True said so; say it back
            # From the loop's first turn: after the caller's own "listening on"
            # line, which scripts read first.
            where = format_address(*sockname[:2])
            self._timers.append(self.loop.call_later(0, lambda: self.logger.warning(
                "plain TCP on %s: anyone who can connect can send a domain", where)))
        if isinstance(listen, socket.socket):
            self._own_listener, self._given_timeout = False, listen.gettimeout()
        self._listener.setblocking(False)
        self.address = sockname[:2]
        self.loop.add_reader(self._listener.fileno(), self._accept)

    # -- admission: who may send (pyxl.migrate.listener) --

    def _accept(self) -> None:
        for _ in range(self.max_pending):   # a few per wake-up: others' turn next
            assert self._listener is not None
            try:
                conn, peer = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:   # e.g. EMFILE: keep listening, say so
                self.logger.warning("accepting a connection failed: %s", exc.strerror)
                return
            where = format_address(peer[0], peer[1]) if isinstance(peer, tuple) else str(peer)
            if len(self._pending) >= SILENT_SLOTS * self.max_pending:
                # Full: one pending goes (not the newcomer, or a few stalled peers
                # would hold the door for a whole header_timeout): the least advanced
                # of the busiest source, so a silent flood pushes out its own.
                self._evict(list(self._pending), "connections pending")
            self.logger.debug("connection from %s", where)
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._admit(Admission(self.loop, sock=conn, peer=where, tls=self.tls,
                                  timeout=self.header_timeout, on_head=self._admitted,
                                  on_reject=self._rejected, logger=self.logger,
                                  on_stage=self._make_room,
                                  own_user_only=self.tls is None and not self.insecure))
            if self._listener is None:   # that one was admitted at once
                return

    def _evict(self, among: List[Admission], what: str) -> None:
        victim = among[pick_evictee([(a.host, a.progress()) for a in among])]
        exc = MigrationError(f"the receiver is full ({len(among)} {what}): dropped the least "
                             "advanced connection of the source with the most")
        exc.peer_text = ("the receiver is full: it dropped this connection, the least "
                         "advanced one of the source with the most connections")
        self._rejected(victim, exc)

    def _make_room(self, adm: Admission) -> None:
        """``adm`` starts a TLS stage (a process): at most max_pending run at once."""
        staged = [a for a in self._pending if a is not adm and a.staged]
        if len(staged) >= self.max_pending:
            self._evict(staged, "TLS handshakes under way")

    def _admit(self, adm: Admission) -> None:
        if not adm.finished:
            self._pending[adm] = None

    def _rejected(self, adm: Admission, exc: OperationError) -> None:
        self._pending.pop(adm, None)
        if self._given_fds:
            # Given fds (ssh): this was the one channel; fail on it as before.
            self._adopt(adm)
            self._fail(exc)
            return
        self.refused += 1
        self._drops.dropped(adm.peer, exc)
        self._closing.add(adm)
        adm.refuse(peer_reason(exc), then=lambda: self._gone(adm))

    def _gone(self, adm: Admission) -> None:
        self._closing.discard(adm)
        self._settled()

    def _settled(self) -> None:
        """Run what waits for the dropped peers' stages and the destroys to end."""
        if not self._closing and not self._destroying and self._quiet is not None:
            then, self._quiet = self._quiet, None
            then()

    def _adopt(self, adm: Admission) -> None:
        assert adm.link is not None and adm.outbox is not None
        self.link, self.handshake, self.outbox = adm.link, adm.handshake, adm.outbox
        self.outbox.on_error = self._write_failed
        self.rfd, self.wfd = adm.link.rfd, adm.link.wfd

    def _admitted(self, adm: Admission, head: StreamHead) -> None:
        """The first connection with a stream head: the one migration received."""
        self._pending.pop(adm, None)
        self.logger.info("migration from %s", adm.peer)
        self._adopt(adm)
        self._stop_listening()
        if self._done or self._finishing:
            return
        if head.offered and domain_name(head.header.config if head.header else None) is None:
            # An offer's outer header names the copy (NAME--incoming until cleared,
            # given to the restore as its name); without one the inner header's
            # name would be restored as it stands, the final name before the clear.
            self._fail(MigrationProtocolError("the compression offer's xl header names no "
                                              "domain (c_info.name)"))
            return
        start_name_check(self.backend, self.loop, head.header.config if head.header else None,
                         lambda exc: self._name_checked(head, exc))

    def _name_checked(self, head: StreamHead, exc: Optional[OperationError]) -> None:
        """NAME is free, or maybe held by the source itself (:mod:`.incoming`)."""
        if self._done or self._finishing:
            return
        if exc is not None:
            self._fail(exc)
        elif head.offered:
            self._choose(head)
        else:
            self._begin_restore(head)

    def _choose(self, head: StreamHead) -> None:
        """The sender offers compression (its xl header alone came): answer,
        then read the stream's first bytes, which say what it sent."""
        assert self.outbox is not None
        name = "zstd" if self.compress else "none"
        self.outbox.send(self.handshake.send(CompressionChosen(name)))

        def readable() -> None:
            try:
                data = os.read(self.rfd, self.handshake.wanted)
            except BlockingIOError:
                return
            except OSError as exc:
                self._fail(MigrationError(f"reading from the sender failed: {exc.strerror}"))
                return
            event = self._feed(data, "the sender went away after the compression answer")
            if event is None:
                return
            self._watch(None)
            assert isinstance(event, StreamStart)
            self._begin_restore(head, event)

        def no_start() -> None:
            if self.state == "header" and self.restore is None and not self._done:
                self._fail(MigrationError(f"the sender sent no stream within "
                                          f"{self.header_timeout:g}s of the compression answer"))

        self._watch(readable)
        if self.header_timeout is not None:
            self._timers.append(self.loop.call_later(self.header_timeout, no_start))

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

    def _begin_restore(self, head: StreamHead, start: Optional[StreamStart] = None) -> None:
        """Hand the stream to a restore through a pipe fed from the loop.

        Not the connection itself: a helper holding it would keep it open if
        this process died, and the sender would stream on into nowhere.  With
        the pipe, our death is the helper's EOF and the sender's reset.
        """
        self.state = "stream"
        r, w = make_pipe(CHUNK)
        self._pipe = [r, w]
        # A compressed stream is a whole image in one zstd frame (xl header
        # again included): the restore decompresses what the relay brings.
        self.compressed = start is not None and start.compressed
        data = head.data + head.rest + (start.data if start is not None else b"")
        if self.compressed:
            assert start is not None
            data = start.data
        if len(data) > pipe_size(w):
            self._fail(MigrationError(f"the stream's header ({len(data)} bytes) does not fit "
                                      "this host's pipes"))
            return
        os.write(w, data)   # an empty pipe takes it whole
        self._head_bytes = len(data)
        self.name = domain_name(head.header.config if head.header is not None else None)
        try:
            options = RestoreOptions(
                paused=True, helper=self.helper, compressed=self.compressed,
                stream_type=STREAM_REMUS if self.remus else STREAM_PLAIN,
                name=None if self.name is None else f"{self.name}{INCOMING}")
            self.restore = RestoreOperation(r, options, backend=self.backend, loop=self.loop,
                                            config_check=config_checks(
                                                self.name, self.compressed, self.config_check))
        except OperationError as exc:
            self._fail(exc)
            return
        except Exception as exc:   # untrusted input must not escape the loop
            # A stream whose config the restore did not expect: the receiver
            # fails like any restore that cannot start; the loop runs on.
            self._fail(StartupError(f"cannot restore the received stream: "
                                    f"{type(exc).__name__}: {exc}"))
            return
        set_nonblocking(w, True)
        self.relay = SpliceRelay(self.loop, self.rfd, w, None, self._sender_done,
                                 self._relay_failed)
        self.relay.finish(b"")
        self.restore.add_done_callback(self._restored)
        self._arm_idle()
        if self.compressed:
            self._report_progress(-1)

    def _report_progress(self, last: int) -> None:
        """A compressed stream: tell the sender, every PROGRESS_EVERY, how far
        the restore has got (it holds the switch-over until we catch up)."""
        if self.state != "stream" or self.restore is None or self.restore.done():
            return
        taken = self.restore.raw_taken
        if taken is not None and taken != last and self.outbox is not None:
            self.outbox.send(self.handshake.send(ReceiverProgress(taken)))
            last = taken
        self._progress_timer = self.loop.call_later(PROGRESS_EVERY,
                                                    lambda: self._report_progress(last))

    def stats(self) -> JobStats:
        """A live snapshot: the restore's phase and pages, the stream bytes received
        so far (0 until a sender's stream head was admitted), rate and time left."""
        relayed = self.relay.sent if self.relay is not None else self._received
        return self._job_stats(self.restore, self._head_bytes + relayed)

    def _arm_idle(self) -> None:
        """Stream inactivity: fail if the sender moves less than IDLE_MIN_BYTES
        in an ``idle_timeout`` (a byte now and then is not progress).
        Not for Remus: a checkpointed stream is quiet between checkpoints, for
        an interval only the sender knows (and its end is a failover anyway)."""
        if self.idle_timeout is None or self.remus:
            return
        self._idle_timer = self.loop.call_later(self.idle_timeout, self._idle_check)
        self._timers.append(self._idle_timer)

    def _idle_check(self) -> None:
        self._idle_timer = None
        if self.state != "stream" or self.relay is None or self.relay.finished:
            return
        moved = self.relay.sent - max(self._idle_mark, 0)
        if moved == 0:
            self._fail(MigrationError(f"the sender sent nothing for {self.idle_timeout:g}s"))
            return
        if moved < IDLE_MIN_BYTES:   # a trickle must not hold a half-made domain forever
            self._fail(MigrationError(f"the sender sent under {IDLE_MIN_BYTES >> 10} KiB in "
                                      f"{self.idle_timeout:g}s"))
            return
        self._idle_mark = self.relay.sent
        self._arm_idle()

    def _close_pipe(self, end: int) -> None:
        if self._pipe[end] >= 0:
            close_quietly(self._pipe[end])
            self._pipe[end] = -1

    def _sender_done(self) -> None:
        """EOF from the sender before the restore finished: pass it on to the helper."""
        assert self.relay is not None
        self._sender_eof_at = self.relay.sent
        self._close_pipe(1)

    def _relay_failed(self, exc: OSError) -> None:
        self.logger.error("reading the stream failed: %s", exc.strerror)
        self._close_pipe(1)

    def _restored(self, op: Any) -> None:
        if self._progress_timer is not None:
            self._progress_timer.cancel()
            self._progress_timer = None
        if self.relay is not None:
            self._received = self.relay.sent
            self.relay.close()
            self.relay = None
        self._close_pipe(1)
        self._close_pipe(0)
        exc = op.exception()
        if exc is not None:
            self.domid = None   # the restore destroyed it
            self._fail(self._pending_error or blame_sender(
                exc, None if self.remus else self._sender_eof_at, self.logger))
            return
        self._restored_result = op.result()
        self.domid = self._restored_result.domid
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
        if self.idle_timeout is not None:
            self._timers.append(self.loop.call_later(self.idle_timeout, self._no_go))

    def _no_go(self) -> None:
        if self.state == "go":
            self._fail(MigrationError(f"the sender did not clear the unpause within "
                                      f"{self.idle_timeout:g}s"))

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
        assert self.domid is not None
        self.state = "starting"
        if self.name is None:
            self._renamed(True, "")
            return
        handle = start_rename(self.backend, self.loop, self.domid, self.name, self._renamed)
        if handle is not None:
            self._timers.append(handle)

    def _renamed(self, ok: bool, why: str) -> None:
        assert self.domid is not None
        if self._done or self._finishing or self.state != "starting":
            return          # failed meanwhile (the sender went away): already reported
        if not ok:
            self._started(False, why)
            return
        self._config_named()
        if self.paused:
            self._started(True, "")
            return
        handle = start_unpause(self.backend, self.loop, self.domid, self._started)
        if handle is not None:
            self._timers.append(handle)

    def _config_named(self) -> None:
        """The result's config carries the name the domain has now, not NAME--incoming."""
        result = self._restored_result
        c_info = result.config.get("c_info") if result is not None else None
        if self.name is not None and isinstance(c_info, dict):
            c_info["name"] = self.name

    def _started(self, ok: bool, why: str) -> None:
        """The received domain runs (or would not start: a name collision?)."""
        if not ok and self.name and self.domid is not None:
            start_name_taken(self.backend, self.loop, self.domid, self.name,
                             lambda taken: self._report_start(taken, why))
            return
        self._report_start(None, "" if ok else why)

    def _report_start(self, taken: Optional[OperationError], why: str) -> None:
        """Tell the sender whether the domain runs (``why`` empty) or not."""
        if self._done or self._finishing or self.state != "starting":
            return          # failed meanwhile (the sender went away): already reported
        assert self.domid is not None and self.outbox is not None
        status = 0
        err: Optional[OperationError] = None
        if taken is not None or why:
            status = 1
            err = taken or MigrationError(f"received domain {self.domid} would not start: {why}")
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
        if self.name is None:
            self._run_taken_over()
            return
        name = self.name

        def renamed(ok: bool, why: str) -> None:
            if self.domid is None or self._done or self.state == "failed":
                return      # failed meanwhile: the copy is being destroyed
            if not ok:      # e.g. the source still holds the name here
                self.logger.warning("failover domain %d keeps its name %s%s: %s", self.domid,
                                    name, INCOMING, why)
            else:
                self._config_named()
            self._run_taken_over()
        start_rename(self.backend, self.loop, self.domid, name, renamed)

    def _run_taken_over(self) -> None:
        assert self.domid is not None
        if self.paused:
            self._taken_over(True, "")
        else:
            start_unpause(self.backend, self.loop, self.domid, self._taken_over)

    def _taken_over(self, ok: bool, why: str) -> None:
        assert self.domid is not None and self._restored_result is not None
        if not ok:
            self._fail(MigrationError(f"failover domain {self.domid} would not start: {why}"))
            return
        self.state = "reported"
        result = ReceiveResult(self.domid, self.digest, time.monotonic() - self.started,
                               self.paused, self._restored_result,
                               self._restored_result.checkpoints, True)
        self._close_and_finish(result, None)

    def _destroy(self) -> None:
        """The half-received domain goes, on the loop's terms (its devices'
        hotplug scripts, its memory); the operation finishes once it is gone."""
        if self.domid is None:
            return
        domid, self.domid = self.domid, None
        self._destroying += 1

        def destroyed(ok: bool, why: str) -> None:
            if not ok:
                self.logger.error("could not destroy the half-received domain %d: %s",
                                  domid, why)
            self._destroying -= 1
            self._settled()

        start_destroy(self.backend, self.loop, domid, destroyed)

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
        if self._done or self._finishing or self.state in ("failed", "draining"):
            return
        if self.restore is not None and not self.restore.done():
            self.restore.cancel(grace=2.0)   # it destroys its domain; _restored comes back
            self._pending_error = exc
            return
        self.state = "failed"
        self._destroy()
        log_failure(self.logger, exc)   # once: not again if it is its restore's
        self._error = exc
        if self.outbox is None or not self.outbox.active:
            self._close_and_finish(None, exc)
            return
        # Tell the sender why (what failed, not our paths or sizes), then wait
        # (briefly) for it to hang up, so that our close does not reset the
        # connection before it read the reason.
        self.outbox.send(self.handshake.send(ReceiverFailed(peer_reason(exc))),
                         then=self._drain)

    def _drain(self) -> None:
        self.state = "draining"
        assert self.link is not None
        self.link.shutdown_write()
        set_nonblocking(self.rfd, True)
        self._timers.append(self.loop.call_later(2.0, self._closed))
        self._watch(self._readable)

    def _closed(self) -> None:
        self._close_and_finish(None, self._error)

    def _stop_listening(self) -> None:
        self._drops.flush()
        if self._listener is not None:
            self.loop.remove_reader(self._listener.fileno())
            if self._own_listener:
                self._listener.close()
            else:
                self._listener.settimeout(self._given_timeout)
            self._listener = None
        # Other peers' connections go at once; the operation finishes only once
        # their TLS stages are gone too (a hard close kills them: milliseconds).
        for adm in list(self._closing):
            adm.abort()   # still flushing a refusal: its own then() reports it gone
        for adm in list(self._pending):
            self._closing.add(adm)
            adm.close(then=functools.partial(self._gone, adm), hard=True)
        self._pending.clear()

    def _close_and_finish(self, result: Any, exc: Optional[OperationError]) -> None:
        if self._done or self._finishing:
            return
        self._finishing = True
        self._watch(None)
        if self.relay is not None:
            self.relay.close()
            self.relay = None
        self._close_pipe(1)
        self._close_pipe(0)
        if self.outbox is not None:
            self.outbox.close()
        self._stop_listening()

        def finish() -> None:
            # A dropped peer's TLS stage may still be exiting, a domain still going.
            self._quiet = lambda: self._finish(result, exc)
            self._settled()

        if self.link is None:
            finish()
            return
        # A TLS link first sends what we wrote (the status), within its grace.
        self.link.close(then=finish)

