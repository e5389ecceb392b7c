"""Mutual TLS for migration connections: :class:`TlsOptions`, the one place
that builds an :class:`ssl.SSLContext` (:func:`make_context`), and
:class:`TlsBridge`, which runs one TLS connection from the loop.

Why a bridge.  The sender and the receiver speak to a peer through a pair of
fds: a socket for TCP, two pipes for a command (ssh).  A TLS connection is
made to look like the command: the bridge hands its owner two pipe ends
(``rfd``: the peer's plaintext; ``wfd``: plaintext for the peer), and moves
bytes between them and the socket through an :class:`ssl.SSLObject` over two
:class:`ssl.MemoryBIO` (sans-I/O: bytes in, bytes out), so the handshake
code, the splice relay (pipe to pipe: the kernel moves pages, nothing is
copied) and the restore feeding stay what they are, and the plain path is
untouched.  Each callback moves at most :data:`SLICE` bytes one way, so the
loop stays responsive; backpressure is the pipes' and the socket's: the
bridge reads one side only while the other has taken what it had.

It may import os, fcntl, socket, ssl, dataclasses, pyxl.errors, pyxl.fdio
and pyxl.loop; it knows nothing of the handshake, helpers or domains.
"""

from __future__ import annotations

import fcntl
import os
import socket
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, cast

from pyxl.errors import MigrationAuthError, MigrationError, StartupError
from pyxl.fdio import close_quietly
from pyxl.loop import Loop, Timer

__all__ = ["SLICE", "TlsBridge", "TlsOptions", "allowed", "make_context", "peer_names"]

SLICE = 256 << 10        # most plaintext bytes one callback moves one way
_PIPE = 1 << 20          # the bridge's pipes: as large as the relay's
_F_SETPIPE_SZ = 1031
_CLOSE_GRACE = 5.0       # seconds a closing bridge gets to flush before it is cut
# Ciphertext queued for the socket: the owner's pipe is read until this much
# waits, then not again until it has all gone.  A watermark pair, not "read
# while nothing waits": that toggled two watches per slice whenever the socket
# was the bottleneck (an epoll_ctl each), a measurable part of the CPU.
_QUEUE_HIGH = 1 << 20


@dataclass(frozen=True)
class TlsOptions:
    """Mutual TLS for one end of a migration.

    ``cert``/``key``: this end's certificate chain and private key (PEM
    files); ``ca``: the CA file the peer's certificate must chain to.  Both
    ends always verify each other.  ``allow`` (receiver): if not empty, the
    peer certificate's subject CN or a DNS SAN must be one of these names.
    ``server_name`` (sender): the name the receiver's certificate must carry
    (default: the host of the target address).
    """

    cert: str
    key: str
    ca: str
    allow: Tuple[str, ...] = field(default=())
    server_name: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("cert", "key", "ca"):
            value = getattr(self, name)
            if isinstance(value, os.PathLike):
                value = os.fspath(value)
                object.__setattr__(self, name, value)
            if not isinstance(value, str) or not value:
                raise TypeError(f"TlsOptions.{name}: a file name, not {value!r}")
        if isinstance(self.allow, str):
            raise TypeError("TlsOptions.allow: a sequence of names, not one string")
        allow = tuple(self.allow)
        if not all(isinstance(n, str) and n for n in allow):
            raise TypeError(f"TlsOptions.allow: non-empty names, not {allow!r}")
        object.__setattr__(self, "allow", allow)
        if self.server_name is not None and not (isinstance(self.server_name, str)
                                                 and self.server_name):
            raise TypeError(f"TlsOptions.server_name: a name, not {self.server_name!r}")


def make_context(opts: TlsOptions, server: bool) -> ssl.SSLContext:
    """The one SSLContext builder: TLS 1.3 only, the peer's certificate
    required and verified against ``opts.ca`` at both ends, the receiver's
    name checked by the sender.  Raises :class:`StartupError` for files that
    cannot be loaded (exit 2 in the CLI)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not server
    # Session tickets buy nothing for one long connection; without them the
    # receiver sends nothing after its handshake that the sender must read.
    if server:
        ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cafile=opts.ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise StartupError(f"cannot load the TLS CA file {opts.ca}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from exc
    try:
        ctx.load_cert_chain(opts.cert, opts.key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise StartupError(f"cannot load the TLS certificate {opts.cert} with key {opts.key}: "
                           f"{getattr(exc, 'strerror', None) or exc}") from exc
    return ctx


def peer_names(cert: Optional[Dict[str, Any]]) -> List[str]:
    """The names a peer certificate (``SSLObject.getpeercert()``) stands for:
    its subject CNs and DNS subjectAltNames."""
    if not cert:
        return []
    names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    names += [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    return list(dict.fromkeys(names))


def allowed(names: Iterable[str], allow: Tuple[str, ...]) -> bool:
    """Is a peer with these certificate names on the allow-list (empty: anyone
    the CA vouches for)?"""
    return not allow or any(n in allow for n in names)


def _pipe() -> Tuple[int, int]:
    r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, _PIPE)
    except OSError:
        pass
    return r, w


class TlsBridge:
    """One TLS connection on ``sock``, run from ``loop``.

    It starts the handshake at once.  Then ``on_ready(rfd, wfd)``: the
    owner reads the peer's plaintext from ``rfd`` and writes its own to
    ``wfd`` (both non-blocking pipe ends that the owner now holds and closes);
    EOF on ``rfd`` is the peer's close (close_notify or TCP FIN), and closing
    ``wfd`` sends close_notify after what was written; :attr:`peer` has the
    names of the peer's certificate (an allow-list is the owner's
    matter: :func:`allowed`).  ``on_failed(exc)`` if the handshake fails or
    the peer refuses us later (an alert: :class:`MigrationAuthError`), or the
    connection breaks (:class:`MigrationError`); the bridge is then
    closed.  ``close(then)``: stop, flushing what the owner wrote (at most
    :data:`_CLOSE_GRACE` seconds), then ``then()``.
    """

    def __init__(self, loop: Loop, sock: socket.socket, ctx: ssl.SSLContext, *,
                 server: bool, server_name: Optional[str] = None,
                 on_ready: Callable[[int, int], None],
                 on_failed: Callable[[MigrationError], None]) -> None:
        self.loop, self.sock = loop, sock
        self.on_ready, self.on_failed = on_ready, on_failed
        self.server = server
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self._in, self._out, server_side=server,
                                server_hostname=None if server else server_name)
        self.fd = sock.fileno()
        sock.setblocking(False)
        self.state = "handshake"      # handshake, open, closed
        self.peer: List[str] = []
        # Ciphertext for the socket: the BIO's chunks as they came (no joining).
        self._cipher: List[memoryview] = []
        self._queued = 0                      # bytes in _cipher
        self._owner_paused = False            # _queued reached _QUEUE_HIGH
        self._buf = bytearray(SLICE)          # socket reads, owner reads: copied at once
        self._pview = memoryview(bytearray(SLICE))   # decrypted, for the owner's rfd
        self._plain = self._pview[:0]         # what of it is still to write
        self._eof_after = False               # the peer's close, after _plain
        # our pipe ends: plaintext to the owner (up_w), from the owner (down_r)
        self._up_w = self._down_r = -1
        self._local_r = self._local_w = -1   # the owner's, until handed over
        self._peer_eof = False        # the peer's close reached us (and the owner)
        self._local_eof = False       # the owner closed wfd; close_notify queued
        self._shut = False            # the socket's write side is shut
        self._closing: Optional[Callable[[], None]] = None
        self._grace: Optional[Timer] = None
        self._watched: Dict[int, Tuple[bool, bool]] = {}
        try:
            self._step()
        except (ssl.SSLError, OSError) as exc:   # reported from the loop, not the constructor
            err: BaseException = exc
            self.loop.call_later(0, lambda: self._failed(err))

    # -- watches --

    def _watch(self, fd: int, read: bool, write: bool) -> None:
        if fd < 0:
            return
        was = self._watched.get(fd, (False, False))
        if was[0] != read:
            (self.loop.add_reader(fd, lambda: self._ready(fd, True)) if read
             else self.loop.remove_reader(fd))
        if was[1] != write:
            (self.loop.add_writer(fd, lambda: self._ready(fd, False)) if write
             else self.loop.remove_writer(fd))
        self._watched[fd] = (read, write)

    def _drop(self, fd: int) -> None:
        """Stop watching one of our pipe ends, then close it (in that order: a
        closed fd's number may come back at once for another watch)."""
        self._watch(fd, False, False)
        self._watched.pop(fd, None)
        close_quietly(fd)

    def _unwatch_all(self) -> None:
        for fd in list(self._watched):
            self._watch(fd, False, False)
        self._watched.clear()

    def _rewatch(self) -> None:
        """Watch what can make progress now (level-triggered)."""
        if self.state == "closed":
            return
        want_sock_read = (not self._peer_eof and not self._plain and not self._in.eof
                          and (self.state == "handshake" or self._up_w >= 0
                               or self._closing is not None))
        self._watch(self.fd, want_sock_read, bool(self._cipher))
        if self.state == "open":
            if self._queued >= _QUEUE_HIGH:
                self._owner_paused = True
            elif not self._queued:
                self._owner_paused = False
            self._watch(self._down_r, self._down_r >= 0 and not self._owner_paused, False)
            self._watch(self._up_w, False, bool(self._plain))

    def _ready(self, fd: int, readable: bool) -> None:
        if self.state == "closed":
            return
        try:
            if fd == self.fd:
                self._socket_ready(readable)
            elif fd == self._down_r:
                self._from_owner()
            elif fd == self._up_w:
                self._to_owner()
                self._decrypt()   # more may wait in the TLS object, not the socket
        except (ssl.SSLError, OSError) as exc:
            self._failed(exc)
            return
        self._rewatch()

    # -- socket side --

    def _socket_ready(self, readable: bool) -> None:
        if not readable:
            self._send()
            self._maybe_done()
            return
        try:
            n = self.sock.recv_into(self._buf, SLICE)
        except (BlockingIOError, InterruptedError):
            return
        if n == 0:
            self._in.write_eof()
        else:
            self._in.write(memoryview(self._buf)[:n])
        self._step()

    def _send(self) -> None:
        while self._cipher:
            try:
                n = self.sock.send(self._cipher[0])
            except (BlockingIOError, InterruptedError):
                return
            self._queued -= n
            if n == len(self._cipher[0]):
                self._cipher.pop(0)
            else:
                self._cipher[0] = self._cipher[0][n:]
        if self._local_eof and not self._shut and self.state == "open":
            self._shut = True
            try:
                self.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    def _flush_out(self) -> None:
        if self._out.pending:
            chunk = self._out.read()
            self._queued += len(chunk)
            self._cipher.append(memoryview(chunk))
        self._send()

    def _step(self) -> None:
        """Advance TLS with what arrived: finish the handshake, or decrypt."""
        if self.state == "handshake":
            try:
                self.tls.do_handshake()
            except ssl.SSLWantReadError:
                self._flush_out()
                if self._in.eof:
                    raise ssl.SSLEOFError("the peer closed the connection during the "
                                          "TLS handshake")
                self._rewatch()
                return
            finally:
                if self.state == "handshake":
                    self._flush_out()
            self._handshake_done()
            return
        if self.state != "open":
            return
        self._decrypt()
        self._flush_out()

    def _decrypt(self) -> None:
        """Decrypt what arrived, up to a slice at a time, and pass it on; until
        the owner's pipe is full or nothing whole is left (what one recv of at
        most a slice brought in: bounded work per callback)."""
        while not self._plain and not self._peer_eof:
            got, eof = 0, False
            try:
                while got < SLICE:
                    # with a buffer, read() gives a count (typeshed says bytes)
                    n = cast(int, self.tls.read(SLICE - got, self._pview[got:]))
                    if n == 0:
                        eof = True
                        break
                    got += n
            except ssl.SSLWantReadError:
                eof = self._in.eof   # TCP FIN without close_notify: EOF all the same
            except ssl.SSLZeroReturnError:
                eof = True
            if got:
                self._plain, self._eof_after = self._pview[:got], eof
                self._to_owner()
            elif eof:
                self._peer_closed()
            else:
                return

    def _peer_closed(self) -> None:
        self._peer_eof = True
        self._drop(self._up_w)
        self._up_w = -1
        self._maybe_done()

    # -- the owner's side --

    def _handshake_done(self) -> None:
        self.peer = peer_names(self.tls.getpeercert())
        self.state = "open"
        up_r, self._up_w = _pipe()
        self._down_r, down_w = _pipe()
        self._local_r, self._local_w = up_r, down_w
        self._decrypt()      # what came with the handshake's last flight
        self._flush_out()
        self._rewatch()
        self._local_r = self._local_w = -1   # the owner's from now on
        self.on_ready(up_r, down_w)

    def _to_owner(self) -> None:
        while self._plain:
            try:
                n = os.write(self._up_w, self._plain)
            except BlockingIOError:
                return
            except BrokenPipeError:   # the owner stopped reading: drop the rest
                self._plain = self._pview[:0]
                break
            self._plain = self._plain[n:]
        if self._eof_after:
            self._eof_after = False
            self._peer_closed()

    def _from_owner(self) -> None:
        try:
            n = os.readv(self._down_r, [self._buf])
        except BlockingIOError:
            return
        if n == 0:
            self._drop(self._down_r)
            self._down_r = -1
            self._local_eof = True
            try:
                self.tls.unwrap()
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass   # our close_notify is queued; the peer's may never come
        else:
            self.tls.write(memoryview(self._buf)[:n])
        self._flush_out()
        self._maybe_done()

    # -- ending --

    def _maybe_done(self) -> None:
        """A closing bridge ends once what the owner wrote is sent."""
        if self._closing is not None and self._down_r < 0 and not self._cipher:
            self._close_now()

    def close(self, then: Optional[Callable[[], None]] = None) -> None:
        """The owner is done (it closed, or will close, its pipe ends): send
        what it wrote and close_notify, then close; ``then()`` after."""
        if self.state == "closed":
            if then is not None:
                then()
            return
        self._closing = then or (lambda: None)
        for fd in (self._local_r, self._local_w):
            close_quietly(fd)
        self._local_r = self._local_w = -1
        if self.state == "handshake":
            self._close_now()
            return
        self._grace = self.loop.call_later(_CLOSE_GRACE, self._close_now)
        self._rewatch()
        self._maybe_done()

    def abort(self) -> None:
        """Close at once, dropping what is not sent yet."""
        self._close_now()

    def _close_now(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        self._unwatch_all()
        for fd in (self._up_w, self._down_r, self._local_r, self._local_w):
            close_quietly(fd)
        self._up_w = self._down_r = self._local_r = self._local_w = -1
        self.sock.close()
        then, self._closing = self._closing, None
        if then is not None:
            then()

    def _failed(self, exc: BaseException) -> None:
        if self.state == "closed":   # e.g. a deferred failure of a bridge closed since
            return
        peer = "sender" if self.server else "receiver"
        auth = self.state == "handshake"   # else: an alert (a refused certificate) or a break
        if isinstance(exc, ssl.SSLCertVerificationError):
            why = (f"TLS with the {peer} failed: certificate verify failed: "
                   f"{exc.verify_message}")
            auth = True
        elif isinstance(exc, ssl.SSLError):
            what = (exc.reason or "").lower().replace("_", " ") or exc.strerror or str(exc)
            why = f"TLS with the {peer} failed: {what}"
            auth = auth or "alert" in what or "certificate" in what
        else:
            why = (f"TLS with the {peer} failed: {exc.strerror or exc}"
                   if isinstance(exc, OSError) else f"TLS with the {peer} failed: {exc}")
        try:   # our alert, if any, so the peer learns why
            self._flush_out()
        except OSError:
            pass
        closing = self._closing
        self._closing = None
        self._close_now()
        if closing is not None:
            closing()
        else:
            self.on_failed(MigrationAuthError(why) if auth else MigrationError(why))

