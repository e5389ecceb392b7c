"""Host-to-host migration: ``xl migrate`` / ``xl migrate-receive`` for pyxl.

The sender streams the same bytes ``pyxl save`` writes (xl header + libxl v2
stream) over TCP, or through a command's stdin/stdout (``ssh host pyxl
migrate-receive``, as xl does), and xl's handshake frames it::

    receiver                                          sender
    "xl migration receiver ready, send binary domain data.\\n"  ->
                                      <-  xl header + libxl stream (live save)
    restore (paused) as NAME--incoming
    "domain received, ready to unpause\\0"                       ->
                                      rename the source NAME--migratedaway
                            <-  "domain is yours, you are cleared to unpause\\0"
    rename NAME--incoming to NAME, unpause
    "my copy unpause results are as follows\\0" + status byte    ->
                                                  status 0: destroy the source

pyxl's one addition: a receiver that fails sends ``"domain receive failed:
REASON\\0"`` instead of the ready message (xl's receiver just exits; both
read as failure at either kind of sender).

The names are xl's, so that both copies can exist on one host (a migration
to localhost): the receiver's copy is ``NAME--incoming`` until it is cleared
to run, and the sender's is ``NAME--migratedaway`` from then until it is
destroyed -- or renamed back when the receiver reports a failure.

Who keeps the guest:

* The source is destroyed only after the destination reported that its copy
  runs (status 0).
* Any failure before the sender sent "cleared to unpause" leaves the source
  running: libxc's error path during precopy; the save's own resume after
  the suspend; an explicit unpause when the save had finished (the source is
  kept paused until the destination answers).  A status byte != 0 means the
  receiver has destroyed its copy, so the source runs again too.
* If the connection is lost after "cleared to unpause" and before the status,
  the destination may or may not be running the guest: the source is left
  paused (never two running copies) and :class:`MigrationInDoubt` says so.
* The receiver destroys its domain on every failure (restore, lost sender,
  failed unpause): no half-made domain stays behind.

Nothing blocks the event loop.  The helper writes the stream into a pipe;
:class:`_Relay` moves it to the connection from the loop, counting bytes and,
with ``max_bandwidth``, pacing them with a token bucket on loop timers (the
helper's precopy policy then sees the capped bandwidth, since the pipe fills).
The receiver's restore helper reads the connection directly, as xl's does;
pyxl reads the handshake and the libxl records after the libxc stream
non-blockingly, only while no helper uses the fd.

Checkpointed migration (``remus=True``, ``pyxl migrate --remus``; the
receiver needs ``remus=True`` / ``--remus`` too): the stream is libxl's Remus
stream (type 1).  With ``checkpoints=N`` the guest is checkpointed N times
(``checkpoint_interval`` apart) and then migrated with the handshake above,
the last checkpoint being the switch-over.  Without, it is replicated until the
sender stops.  If the stream ends after a complete checkpoint without its END
(the sender died or was stopped), the receiver fails over: it runs the guest
from that checkpoint without any handshake, and a sender that is still alive
pauses its source (:class:`MigrationInDoubt`) -- never two running copies.

``downtime`` is measured at the sender, from the guest's suspension to the
receiver's status message (its copy running).  ``iterations`` counts the
precopy rounds sent while the guest ran (Xen's default policy: at most 5);
the stop-and-copy pass comes on top.  ``digest`` (sim domains, on request)
is the backend's digest (:func:`pyxl.sim.digest`; None on a real Xen host) of the stopped source at switch-over, resp. of the
received domain before it is unpaused -- the latter adds the hashing time to
the downtime.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Set, Tuple, Union

from pyxl.stream import xl as stream_xl
from pyxl.stream.framing import REC_HEADER
from pyxl.stream.libxl import LIBXL_HEADER
from pyxl._paths import helper_path
from pyxl.backends import Backend, SimBackend, default_backend
from pyxl.errors import (Cancelled, MigrationError, MigrationInDoubt, OperationError,
                         StartupError, Timeout)
from pyxl.ops.future import LoopFuture
from pyxl.migrate.resolve import Address, Lookup, numeric
from pyxl.fdio import FdWriter, close_quietly, set_nonblocking
from pyxl.loop import Loop, Timer, default_loop
from pyxl.ops.operation import (STREAM_PLAIN, STREAM_REMUS, ProgressEvent, RestoreOperation,
                        RestoreResult, SaveOperation, SaveResult)

__all__ = ["BANNER", "READY", "GO", "REPORT", "FAILED", "MigrateOperation", "MigrateResult",
           "MigrationError", "MigrationInDoubt", "ReceiveOperation", "ReceiveResult",
           "migrate", "parse_address", "precopy_env", "receive"]

BANNER = b"xl migration receiver ready, send binary domain data.\n"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"
FAILED = b"domain receive failed: "       # pyxl: + reason + NUL, instead of READY
INCOMING = "--incoming"      # xl's name suffixes while two copies exist
AWAY = "--migratedaway"
_MESSAGE_MAX = 4096                       # longest handshake message we accept
_CHUNK = 1 << 20
# Under a bandwidth cap the helper should feel it soon: a small pipe (not the
# kernel's default 64 KiB, which our helper grows to 256 KiB).
_CAPPED_PIPE = 32 << 10
_PUMP_CALLS = 8                           # splices per wake-up of a relay
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032
_HEAD_MAX = 512 << 10                     # xl optional data (config) a receiver takes




def precopy_env(downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
                on_fail: str = "abort") -> Dict[str, str]:
    """The helper environment selecting a precopy policy (see pyxl-save-helper).

    ``downtime_ms`` None: Xen's default policy (an empty environment).
    """
    if downtime_ms is None:
        if max_iterations is not None:
            raise ValueError("max_iterations needs a downtime target (the downtime policy)")
        return {}
    if not 0.001 <= downtime_ms <= 3600000:
        raise ValueError(f"downtime must be from 0.001 to 3600000 ms, not {downtime_ms}")
    if on_fail not in ("abort", "stop"):
        raise ValueError(f"on_fail must be 'abort' or 'stop', not {on_fail!r}")
    env = {"PYXL_PRECOPY": "downtime", "PYXL_DOWNTIME_MS": repr(float(downtime_ms)),
           "PYXL_PRECOPY_ON_FAIL": on_fail}
    if max_iterations is not None:
        if not 1 <= max_iterations <= 1000000:
            raise ValueError(f"max_iterations must be from 1 to 1000000, not {max_iterations}")
        env["PYXL_MAX_ITERATIONS"] = str(max_iterations)
    return env


def parse_address(text: str, *, listen: bool = False) -> Tuple[str, int]:
    """"HOST:PORT" (or "[V6ADDR]:PORT") -> (host, port).  Port 0 only to listen."""
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    try:
        port = int(port_text, 10)
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not (0 if listen else 1) <= port <= 65535:
        raise ValueError(f"port out of range in {text!r}")
    return host, port


def _digest(backend: Any, logger: logging.Logger, domid: int) -> Optional[str]:
    try:
        digest: Optional[str] = backend.digest(domid)
        return digest
    except Exception as exc:  # a digest is an extra: report, go on
        logger.warning("no digest of domain %d: %s", domid, exc)
        return None


def _domain_name(config: Dict[str, Any]) -> Optional[str]:
    c_info = config.get("c_info") if isinstance(config, dict) else None
    name = c_info.get("name") if isinstance(c_info, dict) else None
    return name if isinstance(name, str) and name else None


def _expect(buf: bytearray, want: bytes) -> Optional[bool]:
    """Does ``buf`` start with the handshake text ``want``?  None: not enough bytes yet."""
    if len(buf) < len(want):
        return None if want.startswith(bytes(buf)) else False
    return buf[:len(want)] == want


class _Future(LoopFuture):
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

    def _finish(self, result: Any = None, exc: Optional[OperationError] = None) -> None:
        if self._done:
            return
        for t in self._timers:
            t.cancel()
        self._timers.clear()
        self._set_outcome(result, exc)


class _Relay:
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
        while not self.finished:
            if self.discarding:
                self._discard()
                return
            if not self.eof:
                n = _CHUNK
                if self.rate:
                    n = min(n, int(self._refill()))
                    if n < 4096:
                        self._watch(False, False)
                        if self._timer is None:
                            self._timer = self.loop.call_later(
                                max((4096 - self.tokens) / self.rate, 0.001), self._tick)
                        return
                if budget == 0:
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
                if not os.read(self.src, _CHUNK):
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


# ---------------------------------------------------------------------------
# Sender


@dataclass
class MigrateResult:
    domid: int
    downtime: Optional[float]   # seconds: source suspended -> destination's copy running
    iterations: int             # precopy rounds sent while the guest ran
    bytes_sent: int             # stream bytes written to the connection
    duration: float
    digest: Optional[str]       # sim digest of the source at switch-over (on request)
    save: SaveResult
    checkpoints: int = 0        # Remus: checkpoints sent before the switch-over


class MigrateOperation(_Future):
    """Migrate one domain to a receiver; see :func:`migrate`."""

    def __init__(self, domid: int, target: Optional[Union[str, Tuple[str, int]]] = None, *,
                 command: Optional[str] = None, live: bool = False,
                 downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
                 on_fail: str = "abort", max_bandwidth: Optional[int] = None,
                 helper: Optional[str] = None, timeout: Optional[float] = None,
                 loop: Optional[Loop] = None, sim_dir: Optional[str] = None,
                 backend: Optional[Backend] = None, digest: bool = False,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 handshake_timeout: float = 60.0, remus: bool = False,
                 checkpoints: Optional[int] = None, checkpoint_interval: float = 0.1) -> None:
        if (target is None) == (command is None):
            raise ValueError("give either a target HOST:PORT or a command, not both or neither")
        if remus and not live:
            raise ValueError("a checkpointed (Remus) migration is live")
        if checkpoints is not None and (not remus or checkpoints < 1):
            raise ValueError("checkpoints: a positive number, for a Remus migration")
        self.remus, self.checkpoints = remus, checkpoints
        self.checkpoint_interval = checkpoint_interval
        if downtime_ms is not None and not live:
            raise ValueError("a downtime target needs a live migration")
        if max_bandwidth is not None and max_bandwidth <= 0:
            raise ValueError("max_bandwidth must be positive")
        self.env = precopy_env(downtime_ms, max_iterations, on_fail)
        if self.env and os.path.basename(helper_path(helper)) != "pyxl-save-helper":
            logging.getLogger("pyxl.migrate").warning(
                "helper %s may not implement PYXL_PRECOPY: it may use Xen's default policy",
                helper_path(helper))
        self.domid = domid
        self.kind = f"migration of domain {domid}"
        self.logger = logging.getLogger(f"pyxl.migrate.{domid}")
        self.backend = backend or default_backend(sim_dir)
        self.backend.check_domain(domid)
        self.live, self.helper, self.max_bandwidth = live, helper, max_bandwidth
        self.want_digest = digest
        self.on_progress = on_progress
        super().__init__(loop, timeout)
        self.state = "connecting"
        self.save: Optional[SaveOperation] = None
        self.relay: Optional[_Relay] = None
        self.outbox: Optional[FdWriter] = None
        self._error: Optional[OperationError] = None
        self._inbuf = bytearray()
        self._rounds: Set[int] = set()
        self._pipe_w = -1
        self._pipe_r = -1
        self._sock: Optional[socket.socket] = None
        self._child: Optional["subprocess.Popen[bytes]"] = None
        self._child_pidfd = -1
        self._lookup: Optional[Lookup] = None
        self.rfd = self.wfd = -1
        self._stream_sent = False
        self._save_result: Optional[SaveResult] = None
        self._source_paused = False   # by us, after a finished save
        self._go_sent = False
        self._name: Optional[str] = None   # the source's while it is NAME--migratedaway
        self._reading = False
        self._done_pending: Optional[Tuple[Any, Optional[OperationError]]] = None
        self._handshake_timer: Optional[Timer] = self.loop.call_later(
            handshake_timeout, self._no_banner)
        self._timers.append(self._handshake_timer)
        try:
            if command is not None:
                self._spawn(command)
            else:
                assert target is not None
                host, port = parse_address(target) if isinstance(target, str) else target
                addr = numeric(host, port)
                if addr is not None:
                    self._connect(*addr)
                else:   # a name: looked up from the loop
                    self._lookup = Lookup(self.loop, host, port, self._resolved)
        except OSError as exc:
            self._close_transport()
            for t in self._timers:
                t.cancel()
            raise StartupError(f"cannot reach the receiver: {exc.strerror or exc}") from exc

    # -- transport --

    def _spawn(self, command: str) -> None:
        self._child = subprocess.Popen(command, shell=True, stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, close_fds=True)
        assert self._child.stdin is not None and self._child.stdout is not None
        self.wfd = self._child.stdin.fileno()
        self.rfd = self._child.stdout.fileno()
        self._child_pidfd = os.pidfd_open(self._child.pid)
        self.loop.add_reader(self._child_pidfd, self._child_exited)
        self._ready_transport()

    def _resolved(self, addr: Optional[Address], why: str) -> None:
        self._lookup = None
        if addr is None:
            self._fail(MigrationError(why))
            return
        try:
            self._connect(*addr)
        except OSError as exc:
            self._fail(MigrationError(f"cannot connect to the receiver: {exc.strerror or exc}"))

    def _connect(self, family: int, addr: Tuple[Any, ...]) -> None:
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        err = self._sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.rfd = self.wfd = self._sock.fileno()
        self.loop.add_writer(self.wfd, self._connected)

    def _connected(self) -> None:
        self.loop.remove_writer(self.wfd)
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(MigrationError(f"cannot connect to the receiver: {os.strerror(err)}"))
            return
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._ready_transport()

    def _ready_transport(self) -> None:
        set_nonblocking(self.rfd, True)
        set_nonblocking(self.wfd, True)
        self.outbox = FdWriter(self.loop, self.wfd, self._write_failed)
        self.state = "banner"
        self._reading = True
        self.loop.add_reader(self.rfd, self._readable)

    def _child_exited(self) -> None:
        assert self._child is not None
        self.loop.remove_reader(self._child_pidfd)
        close_quietly(self._child_pidfd)
        self._child_pidfd = -1
        self._child.wait()
        if self._done_pending is not None:
            self._really_finish()

    def _close_transport(self) -> None:
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None
        if self._reading:
            self.loop.remove_reader(self.rfd)
            self._reading = False
        if self.outbox is not None:
            self.outbox.close()
        if self.relay is not None:
            self.relay.close()
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._child is not None:
            for f in (self._child.stdin, self._child.stdout):
                if f is not None:
                    try:
                        f.close()
                    except OSError:
                        pass

    # -- receiver's messages --

    def _readable(self) -> None:
        try:
            data = os.read(self.rfd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            self._lost(f"reading from the receiver failed: {exc.strerror}")
            return
        if not data:
            self._lost("the receiver closed the connection")
            return
        self._inbuf += data
        self._process()

    def _process(self) -> None:
        while not self._done and self._error is None:
            if self.state == "banner":
                got = _expect(self._inbuf, BANNER)
                if got is not True:
                    if got is False:
                        self._fail(MigrationError(f"not a migration receiver: it said "
                                                  f"{bytes(self._inbuf[:len(BANNER)])[:80]!r}"))
                    return
                del self._inbuf[:len(BANNER)]
                self._start_save()
                continue
            if self.state == "report":
                if len(self._inbuf) < len(REPORT) + 1:
                    if not REPORT.startswith(bytes(self._inbuf[:len(REPORT)])):
                        self._in_doubt(f"unexpected reply {bytes(self._inbuf)[:80]!r}")
                    return
                if self._inbuf[:len(REPORT)] != REPORT:
                    self._in_doubt(f"unexpected reply {bytes(self._inbuf[:len(REPORT)])!r}")
                    return
                self._reported(self._inbuf[len(REPORT)])
                return
            # "stream" / "ready": one NUL-terminated message.
            nul = self._inbuf.find(b"\0")
            if nul < 0:
                if len(self._inbuf) > _MESSAGE_MAX:
                    self._fail(MigrationError("the receiver sent garbage"))
                return
            msg = bytes(self._inbuf[:nul + 1])
            del self._inbuf[:nul + 1]
            if msg.startswith(FAILED):
                reason = msg[len(FAILED):-1].decode("utf-8", "replace")
                self._fail(MigrationError(f"the receiver failed: {reason}"))
                return
            if msg != READY or self.state != "ready":
                self._fail(MigrationError(f"unexpected message from the receiver: {msg[:80]!r}"))
                return
            self._send_go()
            return

    # -- the save --

    def _no_banner(self) -> None:
        self._handshake_timer = None
        if self.state in ("connecting", "banner"):
            self._fail(MigrationError("no migration receiver answered within the handshake "
                                      "timeout"))

    def _start_save(self) -> None:
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        self.state = "stream"
        r, w = os.pipe2(os.O_CLOEXEC)
        self._pipe_r, self._pipe_w = r, w
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, _CAPPED_PIPE if self.max_bandwidth else _CHUNK)
        except OSError:
            pass
        self.relay = _Relay(self.loop, r, self.wfd, self.max_bandwidth, self._relayed,
                            self._write_failed)
        try:
            self.save = SaveOperation(self.domid, w, live=self.live, leave="paused",
                                      helper=self.helper, loop=self.loop, backend=self.backend,
                                      helper_env=self.env, write_trailer=self.relay.finish,
                                      on_progress=self._progress,
                                      stream_type=STREAM_REMUS if self.remus else STREAM_PLAIN,
                                      checkpoints=self.checkpoints,
                                      checkpoint_interval=self.checkpoint_interval)
        except OperationError as exc:
            self._fail(exc)
            return
        self.save.add_done_callback(self._saved)

    def _phase(self, what: str) -> None:
        """Debug timeline of the switch-over (ms since the suspend)."""
        t = self.save.suspended_at if self.save is not None else None
        if t is not None:
            self.logger.debug("+%.1f ms after suspend: %s", (time.monotonic() - t) * 1e3, what)
        else:
            self.logger.debug("%s", what)

    def _progress(self, ev: ProgressEvent) -> None:
        if ev.iteration is not None and self.save is not None and not self.save.suspended:
            self._rounds.add(ev.iteration)
        if self.on_progress is not None:
            self.on_progress(ev)

    def _saved(self, op: Any) -> None:
        close_quietly(self._pipe_w)
        self._pipe_w = -1
        exc = op.exception()
        if exc is not None:
            # The save put the source back (libxc's error path, or its resume).
            if self.relay is not None:
                self.relay.close()
            self._fail(self._error or exc)
            return
        self._save_result = op.result()
        self._source_paused = True
        self._phase("save done (helper exited)")
        if self._error is not None:
            self._teardown()

    def _relayed(self) -> None:
        self._phase(f"stream sent ({self.relay.sent if self.relay else 0} bytes)")
        self._stream_sent = True
        if self.state == "stream":
            self.state = "ready"
            self._process()

    def _send_go(self) -> None:
        self._phase("receiver ready; clearing it to unpause")
        assert self.outbox is not None and self.save is not None
        name = _domain_name(self.save.config)
        if name is not None:
            # Free the name for the receiver's copy (both may run on one host).
            try:
                self.backend.rename(self.domid, f"{name}{AWAY}")
            except Exception as exc:
                self._fail(MigrationError(f"cannot rename domain {self.domid} to "
                                          f"{name}{AWAY}: {exc}"))
                return
            self._name = name
        self.state = "report"
        self._go_sent = True
        self.outbox.send(GO)
        self._process()

    def _reported(self, status: int) -> None:
        end = time.monotonic()
        self._phase(f"receiver reports status {status}")
        save = self.save
        assert save is not None and self._save_result is not None
        if status != 0:
            self._restore_name()
            self._fail(MigrationError(f"the receiver could not start its copy (status {status});"
                                      " it destroyed it"), resume=True)
            return
        digest = _digest(self.backend, self.logger, self.domid) if self.want_digest else None
        try:
            self.backend.destroy(self.domid)
        except Exception as exc:  # the guest runs at the destination: report, go on
            self.logger.error("migrated domain %d, but could not destroy the source: %s",
                              self.domid, exc)
        self._source_paused = False
        downtime = None if save.suspended_at is None else end - save.suspended_at
        assert self.relay is not None
        result = MigrateResult(self.domid, downtime, len(self._rounds), self.relay.sent,
                               end - self.started, digest, self._save_result,
                               self._save_result.checkpoints)
        self._close_transport()
        self._done_pending = (result, None)
        self._maybe_finish()

    # -- failures --

    def _restore_name(self) -> None:
        if self._name is None:
            return
        try:
            self.backend.rename(self.domid, self._name)
            self._name = None
        except Exception as exc:
            self.logger.error("could not rename domain %d back to %s: %s", self.domid,
                              self._name, exc)

    def _write_failed(self, exc: OSError) -> None:
        self._lost(f"writing to the receiver failed: {exc.strerror}")

    def _lost(self, why: str) -> None:
        if self._go_sent:
            self._in_doubt(why)
        else:
            self._fail(MigrationError(why))

    def _in_doubt(self, why: str) -> None:
        self._fail(MigrationInDoubt(
            f"{why} after clearing the receiver to unpause: domain {self.domid} may run "
            "there; the source is left paused", source_state="paused"))

    def _fail(self, exc: OperationError, resume: bool = False) -> None:
        if self._done or self._done_pending is not None:
            return
        if self._error is None:
            self._error = exc
        self._teardown(resume=resume)

    def _teardown(self, resume: bool = False) -> None:
        if self._reading:
            self.loop.remove_reader(self.rfd)
            self._reading = False
        if self.relay is not None and not self.relay.finished:
            self.relay.abandon()
        if self.save is not None and not self.save.done():
            self.save.cancel(grace=5.0)   # _saved() comes back here
            return
        exc = self._error
        assert exc is not None
        state = None
        taken = self.save.checkpoints if self.save is not None else 0
        if self.remus and taken and self._save_result is None:
            # The stream broke after a complete checkpoint: the receiver fails
            # over to it and runs the guest.  The source must not run too.
            try:
                self.backend.pause(self.domid)
                state = "paused"
            except Exception as err:
                self.logger.error("could not pause domain %d: %s", self.domid, err)
            doubt = MigrationInDoubt(
                f"{exc.brief if isinstance(exc, OperationError) else exc}; the stream ended "
                f"after checkpoint {taken}: the receiver takes over from it (failover); "
                "the source is left paused", source_state=state)
            doubt.__cause__ = exc
            exc = self._error = doubt
        elif self._source_paused and (not self._go_sent or resume):
            try:
                self.backend.unpause(self.domid)
                self._source_paused = False
                state = "running"
            except Exception as err:
                self.logger.error("could not unpause domain %d after the failed migration: %s",
                                  self.domid, err)
        elif self._source_paused:
            state = "paused"
        else:
            state = self.backend.state(self.domid)
        if isinstance(exc, MigrationError):
            exc.source_state = exc.source_state or state
        self._close_transport()
        close_quietly(self._pipe_r)
        self._pipe_r = -1
        self.logger.error("%s", exc)
        self._done_pending = (None, exc)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        if self._child is not None and self._child_pidfd >= 0:
            # Wait for the command (ssh ...) to exit; it does once its pipes close.
            self._timers.append(self.loop.call_later(10.0, self._kill_child))
            return
        self._really_finish()

    def _kill_child(self) -> None:
        if self._child is not None and self._child_pidfd >= 0:
            try:
                self._child.send_signal(signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _really_finish(self) -> None:
        if self._done or self._done_pending is None:
            return
        close_quietly(self._pipe_r)
        self._pipe_r = -1
        result, exc = self._done_pending
        self._finish(result, exc)


def migrate(domid: int, target: Optional[Union[str, Tuple[str, int]]] = None, *,
            command: Optional[str] = None, live: bool = False, **kw: Any) -> MigrateOperation:
    """Start migrating ``domid`` to a receiver at ``target`` ("HOST:PORT") or
    through ``command`` (its stdin/stdout; e.g. "ssh host pyxl migrate-receive").

    Options: ``live``, ``downtime_ms`` (the helper's downtime-target precopy
    policy; with ``max_iterations`` and ``on_fail`` "abort"|"stop"),
    ``max_bandwidth`` (bytes/s), ``helper``, ``timeout``, ``loop``,
    ``sim_dir``, ``digest`` (sim digest at switch-over), ``on_progress``.
    Returns at once; ``pyxl.wait(op)`` or ``await op`` gives a :class:`MigrateResult`.
    """
    return MigrateOperation(domid, target, command=command, live=live, **kw)


# ---------------------------------------------------------------------------
# Receiver


@dataclass
class ReceiveResult:
    domid: int
    digest: Optional[str]       # sim digest of the received domain before it ran (on request)
    duration: float
    paused: bool
    restore: RestoreResult
    checkpoints: int = 0        # Remus: checkpoints received
    failover: bool = False      # Remus: the sender vanished; took over at the last checkpoint


class ReceiveOperation(_Future):
    """Receive one migrating domain; see :func:`receive`."""

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
        self.state = "listening"
        self.restore: Optional[RestoreOperation] = None
        self.domid: Optional[int] = None
        self.name: Optional[str] = None   # the domain's, once it runs here
        self.digest: Optional[str] = None
        self.outbox: Optional[FdWriter] = None
        self._listener: Optional[socket.socket] = None
        self._conn: Optional[socket.socket] = None
        self._inbuf = bytearray()
        self._want = 0
        self._watching = False
        self._pipe = [-1, -1]
        self.relay: Optional[_Relay] = None
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
        self.outbox.send(BANNER)
        self._want = stream_xl.XL_HEADER.size
        self._watch(self._header_readable)

    def _watch(self, fn: Optional[Callable[[], None]]) -> None:
        if self._watching:
            self.loop.remove_reader(self.rfd)
            self._watching = False
        if fn is not None:
            self.loop.add_reader(self.rfd, fn)
            self._watching = True

    def _header_readable(self) -> None:
        """Collect the xl header, the libxl header and the LIBXC_CONTEXT record
        header (exact reads), so that the restore can read them without waiting."""
        try:
            data = os.read(self.rfd, self._want - len(self._inbuf))
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(MigrationError(f"reading from the sender failed: {exc.strerror}"))
            return
        if not data:
            self._fail(MigrationError("the sender closed the connection before the stream"))
            return
        self._inbuf += data
        if len(self._inbuf) < self._want:
            return
        if self._want == stream_xl.XL_HEADER.size:
            try:
                fixed = stream_xl.parse_xl_header(bytes(self._inbuf),
                                                  max_optional_data=_HEAD_MAX)
            except ValueError as exc:
                self._fail(MigrationError(f"not a migration stream: {exc}"))
                return
            self._want += fixed.optional_data_len + LIBXL_HEADER.size + REC_HEADER.size
            return
        self._watch(None)
        self._begin_restore(bytes(self._inbuf))
        self._inbuf.clear()

    def _begin_restore(self, head: bytes) -> None:
        """Hand the stream to a restore through a pipe fed from the loop.

        Not the connection itself: a helper holding it would keep it open if
        this process died, and the sender would stream on into nowhere.  With
        the pipe, our death is the helper's EOF and the sender's reset.
        """
        self.state = "stream"
        r, w = os.pipe2(os.O_CLOEXEC)
        self._pipe = [r, w]
        try:
            fcntl.fcntl(w, _F_SETPIPE_SZ, _CHUNK)
        except OSError:
            pass
        if len(head) > fcntl.fcntl(w, _F_GETPIPE_SZ):
            self._fail(MigrationError(f"the stream's header ({len(head)} bytes) does not fit "
                                      "this host's pipes"))
            return
        os.write(w, head)   # an empty pipe takes it whole
        fixed = stream_xl.parse_xl_header(head, max_optional_data=_HEAD_MAX)
        end = stream_xl.XL_HEADER.size + fixed.optional_data_len
        try:
            config = stream_xl.parse_xl_optional_data(fixed, head[stream_xl.XL_HEADER.size:end])
        except ValueError:
            config = None   # the restore reports it
        self.name = _domain_name(config.config or {}) if config is not None else None
        try:
            self.restore = RestoreOperation(r, paused=True, helper=self.helper,
                                            loop=self.loop, backend=self.backend,
                                            stream_type=STREAM_REMUS if self.remus
                                            else STREAM_PLAIN,
                                            name=None if self.name is None
                                            else f"{self.name}{INCOMING}")
        except OperationError as exc:
            self._fail(exc)
            return
        self.domid = self.restore.domid
        set_nonblocking(w, True)
        self.relay = _Relay(self.loop, self.rfd, w, None, self._sender_done, self._relay_failed)
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
            self.digest = _digest(self.backend, self.logger, self.domid)
        if self._restored_result.failover:
            self._take_over()
            return
        self.state = "go"
        assert self.outbox is not None
        self.outbox.send(READY)
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
        if not data:
            self._fail(MigrationError("the sender went away before clearing the unpause"))
            return
        self._inbuf += data
        got = _expect(self._inbuf, GO)
        if got is not True:
            if got is False:
                self._fail(MigrationError(f"unexpected message from the sender: "
                                          f"{bytes(self._inbuf[:len(GO)])[:80]!r}"))
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
        self.outbox.send(REPORT + bytes([status]),
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
        reason = str(exc).replace("\0", " ")[:_MESSAGE_MAX - len(FAILED) - 1]
        self.outbox.send(FAILED + reason.encode("utf-8", "replace") + b"\0",
                         then=self._drain)

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
