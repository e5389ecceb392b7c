"""Mutual TLS for migration connections: :class:`TlsOptions`,
:func:`make_context` (the files checked before anything starts) and
:class:`TlsBridge`, one TLS connection run by a child process.

Why a bridge.  The sender and the receiver speak to a peer through a pair of
fds: a socket for TCP, two pipes for a command (ssh).  A TLS connection is
made to look like the command: the bridge hands its owner two pipe ends
(``rfd``: the peer's plaintext; ``wfd``: plaintext for the peer), and a TLS
stage (:mod:`pyxl.migrate.tlsstage`, a short child started through
:mod:`pyxl.childproc`) moves bytes between them and the socket, so the
handshake code, the splice relay and the restore feeding stay what they are,
the plain path is untouched, and the loop never encrypts: it reads one line
from the stage (the peer's certificate names) and sees its exit.

It may import os, json, signal, socket, ssl, sys, dataclasses, pyxl.childproc,
pyxl.errors, pyxl.fdio, pyxl.loop and pyxl.migrate.tlsstage; it knows nothing
of the handshake, helpers or domains.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import sys
from dataclasses import dataclass, field
from typing import Callable, Iterable, List, Optional, Tuple

from pyxl.childproc import ShortChild
from pyxl.errors import MigrationAuthError, MigrationError, StartupError
from pyxl.fdio import close_quietly, make_pipe
from pyxl.loop import Loop, Timer
from pyxl.migrate import tlsstage
from pyxl.migrate.tlsstage import context, peer_names

__all__ = ["TlsBridge", "TlsOptions", "allowed", "make_context", "peer_names"]

_PIPE = 1 << 20          # the bridge's pipes: as large as the relay's
_CLOSE_GRACE = 5.0       # seconds a closing bridge gets to flush before it is cut


@dataclass(frozen=True)
class TlsOptions:
    """Mutual TLS for one end of a migration.

    ``cert``/``key``: this end's certificate chain and private key (PEM
    files); ``ca``: the CA file the peer's certificate must chain to.  Both
    ends always verify each other.  ``allow`` (receiver): if not empty, the
    peer certificate's subject CN or a DNS SAN must be one of these names.
    ``server_name`` (sender): the name the receiver's certificate must carry
    (default: the host of the target address).  ``crl``: a PEM CRL file from
    the peer certificate's issuer; a certificate it revokes is refused (a
    leaked key is otherwise shut out only by the allow-list or a new CA).
    """

    cert: str
    key: str
    ca: str
    allow: Tuple[str, ...] = field(default=())
    server_name: Optional[str] = None
    crl: Optional[str] = None

    def __post_init__(self) -> None:
        if isinstance(self.crl, os.PathLike):
            object.__setattr__(self, "crl", os.fspath(self.crl))
        if self.crl is not None and not (isinstance(self.crl, str) and self.crl):
            raise TypeError(f"TlsOptions.crl: a file name, not {self.crl!r}")
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
    """The context one end would use (:func:`pyxl.migrate.tlsstage.context`,
    built here to check the files before anything starts; the TLS stage
    builds its own).  Raises :class:`StartupError` for files that cannot be
    loaded (exit 2 in the CLI)."""
    try:
        return context(opts.cert, opts.key, opts.ca, server, opts.crl)
    except ValueError as exc:
        raise StartupError(str(exc)) from exc


def allowed(names: Iterable[str], allow: Tuple[str, ...]) -> bool:
    """Is a peer with these certificate names on the allow-list (empty: anyone
    the CA vouches for)?  DNS names: case does not matter."""
    wanted = {a.lower() for a in allow}
    return not allow or any(n.lower() in wanted for n in names)


class TlsBridge:
    """One TLS connection on ``sock``, run by a TLS stage child process
    (:mod:`pyxl.migrate.tlsstage`); the socket is the child's from now on.
    With ``sock=None`` the stage starts and waits: :meth:`attach` gives it
    the socket (a sender starts its stage while it connects, so that its
    connection is never silent for the ~25 ms a stage takes to start: a full
    receiver drops silent connections first).

    The handshake starts once the stage has the socket.  Then ``on_ready(rfd, wfd)``: the owner
    reads the peer's plaintext from ``rfd`` and writes its own to ``wfd``
    (both non-blocking pipe ends that the owner now holds and closes); EOF on
    ``rfd`` is the peer's close (close_notify or TCP FIN), and closing ``wfd``
    sends close_notify after what was written; :attr:`peer` has the names of
    the peer's certificate (an allow-list is the owner's matter:
    :func:`allowed`).  ``on_failed(exc)`` if the handshake fails or the peer
    refuses us later (an alert: :class:`MigrationAuthError`), or the
    connection breaks (:class:`MigrationError`); the bridge is then closed.
    ``close(then)``: stop, flushing what the owner wrote (at most
    :data:`_CLOSE_GRACE` seconds), then ``then()`` once the child is gone.
    """

    def __init__(self, loop: Loop, sock: Optional[socket.socket], opts: TlsOptions, *,
                 server: bool,
                 server_name: Optional[str] = None,
                 on_ready: Callable[[int, int], None],
                 on_failed: Callable[[MigrationError], None]) -> None:
        self.loop = loop
        self.on_ready, self.on_failed = on_ready, on_failed
        self.server = server
        self.state = "handshake"      # handshake, open, closed
        self.peer: List[str] = []
        self._closing: Optional[Callable[[], None]] = None
        self._grace: Optional[Timer] = None
        self._said = b""
        # The peer's plaintext (stage -> owner), and the owner's (owner -> stage).
        up_r, up_w = make_pipe(_PIPE, nonblocking=True)
        down_r, down_w = make_pipe(_PIPE, nonblocking=True)
        self._control, theirs = socket.socketpair()
        self._local_r, self._local_w = up_r, down_w   # the owner's, once ready
        argv = [sys.executable or "python3", "-I", "-S", tlsstage.__file__,
                "server" if server else "client", opts.cert, opts.key, opts.ca,
                server_name or "", str(theirs.fileno()), opts.crl or ""]
        try:
            self._child = ShortChild(loop, argv, self._exited, stdin_from=down_r,
                                     stdout_to=up_w, pass_fds=(theirs.fileno(),))
        except BaseException:
            for fd in (up_r, down_w, up_w, down_r):
                close_quietly(fd)
            self._control.close()
            if sock is not None:
                sock.close()
            raise
        finally:
            theirs.close()
        # The stage's ends of the pipes, kept until it said "eof" or exited:
        # so the owner never sees an EOF or an EPIPE before the bridge has
        # reported why the stage ended.
        self._stage_up_w, self._stage_down_r = up_w, down_r
        self._control.setblocking(False)
        loop.add_reader(self._control.fileno(), self._said_something)
        if sock is not None:
            self.attach(sock)

    def attach(self, sock: socket.socket) -> None:
        """Hand the stage its connected socket (once; ours is closed): one
        byte and the fd on the control socket, which is empty this early, so
        the send cannot block."""
        try:
            if self.state == "handshake" and self._closing is None:
                socket.send_fds(self._control, [b"s"], [sock.fileno()])
        except OSError:
            pass        # the stage is gone: its exit says why
        finally:
            sock.close()

    def _said_something(self) -> None:
        """The stage's lines (``ready NAMES``, ``eof``), or its control EOF."""
        try:
            data = self._control.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data or len(self._said) + len(data) > 65536:
            self.loop.remove_reader(self._control.fileno())
            return   # the stage is ending: its exit says how
        self._said += data
        while b"\n" in self._said and self.state != "closed":
            line, self._said = self._said.split(b"\n", 1)
            if line == b"eof" and self.state == "open":
                close_quietly(self._stage_up_w)   # the owner now sees the peer's close
                self._stage_up_w = -1
            elif line.startswith(b"ready ") and self.state == "handshake":
                self._ready(line[len(b"ready "):])
            else:
                self._child.kill()   # not our stage talking: its exit reports it
                return

    def _ready(self, names_json: bytes) -> None:
        if self._closing is not None:
            # The owner let go during the handshake (a receiver pushed this
            # peer out): the stage is being killed; its "ready", read in the
            # meantime, has no one to go to.
            return
        try:
            names = json.loads(names_json)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            self._child.kill()
            return
        self.peer = names
        self.state = "open"
        rfd, wfd = self._local_r, self._local_w
        self._local_r = self._local_w = -1     # the owner's from now on
        self.on_ready(rfd, wfd)

    def _exited(self, status: int, err: str) -> None:
        was = self.state
        self._end()
        closing, self._closing = self._closing, None
        try:
            if closing is not None:
                closing()
                return
            if was == "closed" or status == 0:
                return               # both directions ended: the owner sees the EOFs
            kind, _, why = err.rpartition("\n")[2].partition("\t")
            if not why:
                how = (f"killed by {signal.Signals(-status).name}" if status < 0
                       else f"exit status {status}")
                why = f"the TLS stage failed: {err or how}"
            self.on_failed(MigrationAuthError(why) if kind == "auth" else MigrationError(why))
        finally:
            self._release()

    def _end(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self._grace is not None:
            self._grace.cancel()
            self._grace = None
        if self._control.fileno() >= 0:
            self.loop.remove_reader(self._control.fileno())
            self._control.close()
        for fd in (self._local_r, self._local_w):
            close_quietly(fd)
        self._local_r = self._local_w = -1

    def _release(self) -> None:
        """Let go of the stage's pipe ends (it has exited)."""
        for fd in (self._stage_up_w, self._stage_down_r):
            close_quietly(fd)
        self._stage_up_w = self._stage_down_r = -1

    def close(self, then: Optional[Callable[[], None]] = None) -> None:
        """The owner is done (it closed, or will close, its pipe ends): the
        stage sends what it wrote and close_notify, then exits; ``then()``
        after that (or once the grace is over and the stage was killed)."""
        if self._child.finished:
            self._end()
            self._release()
            if then is not None:
                then()
            return
        self._closing = then or (lambda: None)
        for fd in (self._local_r, self._local_w):
            close_quietly(fd)
        self._local_r = self._local_w = -1
        if self.state == "handshake":
            self._child.kill()
            return
        try:
            self._control.shutdown(socket.SHUT_WR)   # "closing"
        except OSError:
            pass
        if self._grace is None:
            self._grace = self.loop.call_later(_CLOSE_GRACE, self._child.kill)

    def abort(self) -> None:
        """Close at once, dropping what is not sent yet."""
        if self._closing is None:
            self._closing = lambda: None
        self._child.kill()
