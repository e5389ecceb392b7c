"""The sender's channel to a receiver: a TCP connection or a command's pipes.

This module owns :class:`ReceiverChannel`: connecting without blocking the
loop (a numeric address at once, a host name looked up by
:mod:`pyxl.migrate.resolve` from the loop, then a non-blocking connect), or
running a command through the shell (``ssh host pyxl migrate-receive``, as
xl does) and talking to its stdin/stdout; closing it all; and, for a
command, waiting for its exit (SIGKILL after a grace period) so that no
child outlives the migration.  It knows nothing of the handshake or the
save.  With TLS (:mod:`.tls`) the connection's plaintext is a bridge's
pipe pair, as for a command.

Plain TCP authenticates nobody, so without ``insecure`` it goes only to a
loopback address, and there only to a receiver of our own user (or root's):
any local user can listen on a free port -- where an ssh tunnel failed to
bind, say -- and would get the guest, then say "status 0" and have the source
destroyed.  The receiver's socket is on this host, and the kernel says whose
it is (:mod:`.peeruid`), once the receiver has accepted it: at its banner
(:meth:`ReceiverChannel.unauthenticated_receiver`).  It may import os, errno,
socket, pyxl.errors, pyxl.fdio, pyxl.loop, pyxl.spawn and
pyxl.migrate.{address,peeruid,resolve,tls}.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
from typing import Any, Callable, List, Optional, Tuple, Union

from pyxl.errors import MigrationError, OperationError, StartupError
from pyxl.fdio import close_quietly
from pyxl.loop import Loop, Timer
from pyxl.migrate.address import format_address, is_loopback, parse_address
from pyxl.migrate.peeruid import peer_uid
from pyxl.migrate.resolve import Address, Lookup, numeric
from pyxl.migrate.tls import TlsBridge, TlsOptions, make_context
from pyxl.spawn import Child, inherited_stderr

__all__ = ["PLAIN_TCP_ADVICE", "ReceiverChannel"]

#: How an API caller migrates safely (the CLI says it in its own flags).
PLAIN_TCP_ADVICE = ("use mutual TLS (tls=TlsOptions(...)), ssh (command=\"ssh HOST pyxl "
                    "migrate-receive\"), or insecure=True on a trusted network")

_EXIT_GRACE = 10.0    # seconds a command gets to exit once its pipes are closed


class ReceiverChannel:
    """Bytes to and from a receiver at ``target`` ("HOST:PORT" or (host,
    port)) or through ``command``'s stdin/stdout.

    ``on_ready(rfd, wfd)`` once they can be used (both are the socket for
    TCP; a TLS bridge's pipe ends with ``tls``; maybe before the
    constructor returns); ``on_failed(exc)`` if the name does not resolve,
    the connection is refused, or TLS fails (at any time: a
    MigrationAuthError when refused, a MigrationError when broken), or a
    name is not a loopback address for plain TCP (StartupError).  Raises
    OSError at once if it cannot even start, StartupError for TLS files that
    do not load and for plain TCP to a numeric address that is not loopback
    (without ``insecure``).
    """

    def __init__(self, loop: Loop, target: Optional[Union[str, Tuple[str, int]]],
                 command: Optional[str], on_ready: Callable[[int, int], None],
                 on_failed: Callable[[OperationError], None],
                 tls: Optional[TlsOptions] = None, insecure: bool = False) -> None:
        self.loop, self.on_ready, self.on_failed = loop, on_ready, on_failed
        self._checks_peer = command is None and tls is None and not insecure
        if tls is not None:
            make_context(tls, server=False)   # its files load, or StartupError now
        self._bridge: Optional[TlsBridge] = None
        self.rfd = self.wfd = -1
        self._sock: Optional[socket.socket] = None
        self._connecting = False
        self._child: Optional[Child] = None
        self._command_status: Optional[int] = None   # its exit code, once it exited
        self._lookup: Optional[Lookup] = None
        self._untried: List[Address] = []    # a name's other addresses, tried in turn
        self._exited: Optional[Callable[[], None]] = None
        self._kill_timer: Optional[Timer] = None
        self._bridge_closing = False
        try:
            if command is not None:
                self._spawn(command)
            else:
                assert target is not None
                host, port = parse_address(target) if isinstance(target, str) else target
                if tls is not None:
                    # Started now, given the socket once connected: the
                    # connection is silent for a round trip, not for the
                    # stage's start as well (a full receiver drops silent
                    # connections first).
                    self._bridge = TlsBridge(self.loop, None, tls, server=False,
                                             server_name=tls.server_name or host,
                                             on_ready=self._secured, on_failed=self.on_failed)
                addr = numeric(host, port)
                if addr is not None:
                    why = self._refused(addr)
                    if why:
                        raise StartupError(why)
                    self._connect(*addr)
                else:   # a name: looked up from the loop
                    self._lookup = Lookup(self.loop, host, port, self._resolved)
        except OSError:
            self.close()
            raise

    # -- opening --

    def _spawn(self, command: str) -> None:
        # Started here, not by pyxl-spawner: it stays in our process group and
        # session, with our terminal (ssh may ask for a password or a host
        # key, and a terminal's Ctrl-C reaches it too).  One wait for its
        # exec, at the start, before any helper runs.
        in_r, self.wfd = os.pipe2(os.O_CLOEXEC)
        try:
            self.rfd, out_w = os.pipe2(os.O_CLOEXEC)
        except OSError:
            os.close(in_r)
            raise
        try:
            self._child = Child(self.loop, ["/bin/sh", "-c", command], self._child_exited,
                                fds={0: in_r, 1: out_w, **inherited_stderr()}, new_group=False)
        finally:
            os.close(in_r)
            os.close(out_w)
        self.on_ready(self.rfd, self.wfd)

    def _resolved(self, addr: Optional[Address], why: str) -> None:
        lookup, self._lookup = self._lookup, None
        if addr is None:
            self.on_failed(MigrationError(why))
            return
        self._untried = list(lookup.addresses[1:]) if lookup is not None else []
        why = next(filter(None, map(self._refused, [addr] + self._untried)), "")
        if why:
            self.on_failed(StartupError(why))
            return
        self._try(addr)

    def _refused(self, addr: Address) -> str:
        """Why plain TCP may not go to ``addr`` ("" if it may)."""
        if not self._checks_peer or is_loopback(addr[1]):
            return ""
        return (f"refusing plain TCP to {format_address(*addr[1][:2])}, not a loopback address: "
                "the guest's memory would cross the network unencrypted, to whoever answers; "
                f"{PLAIN_TCP_ADVICE}")

    def unauthenticated_receiver(self) -> Optional[str]:
        """Why the receiver that sent its banner may not have the guest (None:
        it may).  Plain TCP without ``insecure`` is on loopback (see
        :meth:`_refused`): the receiver's socket must be our user's, or root's."""
        if not self._checks_peer or self._sock is None:
            return None
        try:
            uid = peer_uid(self._sock)
        except OSError as exc:
            return f"cannot tell which user's receiver answered ({exc.strerror or exc})"
        if uid not in (os.geteuid(), 0):
            where = format_address(*self._sock.getpeername()[:2])
            return (f"the receiver at {where} is user {uid}'s, not this sender's "
                    f"({os.geteuid()}) or root's: plain TCP sends a domain only to its own "
                    f"user's receiver; {PLAIN_TCP_ADVICE}")
        return None

    def _try(self, addr: Address) -> None:
        """Connect to ``addr``; if that fails at once, the next of the name's addresses."""
        while True:
            try:
                self._connect(*addr)
                return
            except OSError as exc:
                self._drop_socket()
                if not self._untried:
                    self.on_failed(MigrationError(f"cannot connect to the receiver: "
                                                  f"{exc.strerror or exc}"))
                    return
                addr = self._untried.pop(0)

    def _drop_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self.rfd = self.wfd = -1

    def _connect(self, family: int, addr: Tuple[Any, ...]) -> None:
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        err = self._sock.connect_ex(addr)
        if err not in (0, errno.EINPROGRESS):
            raise OSError(err, os.strerror(err))
        self.rfd = self.wfd = self._sock.fileno()
        self._connecting = True
        self.loop.add_writer(self.wfd, self._connected)

    def _connected(self) -> None:
        self.loop.remove_writer(self.wfd)
        self._connecting = False
        assert self._sock is not None
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err and self._untried:     # refused here: the name's next address
            self._drop_socket()
            self._try(self._untried.pop(0))
            return
        if err:
            self.on_failed(MigrationError(f"cannot connect to the receiver: "
                                          f"{os.strerror(err)}"))
            return
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self._bridge is not None:
            # The socket is the bridge's now; we get its plaintext pipes.
            sock, self._sock = self._sock, None
            self.rfd = self.wfd = -1
            self._bridge.attach(sock)
            return
        self.on_ready(self.rfd, self.wfd)

    def _secured(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        self.on_ready(rfd, wfd)

    # -- closing --

    def close(self) -> None:
        """Stop any lookup or connect, close the socket or the command's pipes
        (the command then sees EOF and should exit)."""
        if self._lookup is not None:
            self._lookup.cancel()
            self._lookup = None
        if self._connecting:
            self.loop.remove_writer(self.wfd)
            self._connecting = False
        if self._sock is not None:
            self._drop_socket()
        if self._bridge is not None:
            # Our pipe ends first: the bridge then sends what is in them and
            # close_notify (within its grace), and lets go.
            for fd in {self.rfd, self.wfd}:
                if fd >= 0:
                    close_quietly(fd)
            self.rfd = self.wfd = -1
            bridge, self._bridge = self._bridge, None
            self._bridge_closing = True
            bridge.close(self._bridge_closed)
        if self._child is not None:
            for fd in {self.rfd, self.wfd}:
                if fd >= 0:
                    close_quietly(fd)
            self.rfd = self.wfd = -1

    def _bridge_closed(self) -> None:
        self._bridge_closing = False
        if self._exited is not None:
            then, self._exited = self._exited, None
            then()

    def when_gone(self, then: Callable[[], None]) -> None:
        """``then()`` once no child of ours runs and no TLS bridge flushes: at
        once for TCP; for a command once it exited (SIGKILLed if it has not
        after a grace period); for TLS once close_notify went out (or its grace
        ran out)."""
        if self._bridge_closing:
            self._exited = then
            return
        if self._child is None or self._child.finished:
            then()
            return
        self._exited = then
        if self._kill_timer is None:
            self._kill_timer = self.loop.call_later(_EXIT_GRACE, self._kill_child)

    def _kill_child(self) -> None:
        self._kill_timer = None
        if self._child is not None:
            self._child.kill()

    def command_ended(self) -> str:
        """How the command ended, if it failed ("the receiving command exited
        with status 3"), for a failed migration's error; else ""."""
        status = self._command_status
        if status is None or status == 0:
            return ""
        if status < 0:
            try:
                name = signal.Signals(-status).name
            except ValueError:
                name = f"signal {-status}"
            return f"the receiving command was killed by {name}"
        return f"the receiving command exited with status {status}"

    def _child_exited(self, status: Optional[int]) -> None:
        self._command_status = status
        if self._kill_timer is not None:
            self._kill_timer.cancel()
            self._kill_timer = None
        if self._exited is not None:
            then, self._exited = self._exited, None
            then()
