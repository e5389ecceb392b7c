"""The TLS stage: a child process that runs one TLS connection of a migration.

Why a child.  Encrypting a migration costs about a CPU-second per GiB at each
end, in 16 KiB records; run on the application's loop (pyxl 0.x's in-loop
bridge), that was 2 CPU-s per GiB of Python callbacks and a loop lag p99 of
7-9 ms.  Here the loop never sees a TLS byte: like an ssh transport
(``--command``), the stage gives its owner two pipes, and moves bytes between
them and the socket itself, with a poll loop of its own.  The owner's splice
relay, the handshake code and the restore feeding stay what they are for
plain TCP (bench/README.md has the figures).

This file is both a module (``context`` and ``peer_names`` are the one
place that builds a migration's :class:`ssl.SSLContext` and names a peer) and
the child's program, run by path as ``python -I -S tlsstage.py ROLE CERT KEY
CA SERVER_NAME CONTROL_FD CRL``: it imports nothing but the standard
library (nothing of pyxl: it starts in ~25 ms, which a receiver pays per
connection, authenticated or not).

The child's fds: 0 the owner's plaintext for the peer (a pipe; EOF: send
close_notify after it), 1 the peer's plaintext for the owner (a pipe; closed
after the peer's close), 2 errors (one line: ``auth<TAB>why`` for a refused or
failed authentication, ``error<TAB>why`` otherwise; then exit 1), CONTROL_FD a
socket to the owner, on which the connected TCP socket comes first (one byte
with the fd; the owner may start the stage before it has connected: EOF
instead means it gave up, exit 1 saying nothing); then the stage writes
``ready NAMES_JSON\\n`` once the handshake is done and ``eof\\n`` once it closed
fd 1 after the peer's close (the owner holds a copy of fd 1, and of fd 0, until
then or until the stage exited, so that a failure is reported before the owner
sees an EOF or EPIPE of its own); EOF from the owner means
"closing": send what fd 0 still holds and close_notify, discard what the
peer sends, and exit.  Exit 0 once both directions are done.
"""

from __future__ import annotations

import json
import os
import select
import socket
import ssl
import sys
from typing import Any, Dict, List, Optional

__all__ = ["SLICE", "context", "peer_names"]

SLICE = 256 << 10     # plaintext per read from the owner; ciphertext per recv
# Ciphertext waiting for the socket: the owner's pipe is read until this much
# waits, then not again until all of it has gone (a watermark pair: reading
# "while nothing waits" toggled the poll set per slice).
_QUEUE_HIGH = 1 << 20


def context(cert: str, key: str, ca: str, server: bool,
            crl: Optional[str] = None) -> ssl.SSLContext:
    """TLS 1.3 only, the peer's certificate required and verified against
    ``ca`` at both ends, the receiver's name checked by the sender; with
    ``crl``, the peer's certificate checked against it (the leaf only: the
    CRL must come from its issuer).  Files that cannot be loaded raise
    ValueError with a one-line reason."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = not server
    # Session tickets buy nothing for one long connection; without them the
    # receiver sends nothing after its handshake that the sender must read.
    if server:
        ctx.num_tickets = 0
    try:
        ctx.load_verify_locations(cafile=ca)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"cannot load the TLS CA file {ca}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from exc
    if crl:
        try:
            ctx.load_verify_locations(cafile=crl)
        except (OSError, ssl.SSLError, ValueError) as exc:
            raise ValueError(f"cannot load the TLS CRL file {crl}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    try:
        ctx.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError, ValueError) as exc:
        raise ValueError(f"cannot load the TLS certificate {cert} with key {key}: "
                         f"{getattr(exc, 'strerror', None) or exc}") from exc
    return ctx


def peer_names(cert: Optional[Dict[str, Any]]) -> List[str]:
    """The names a peer certificate (``getpeercert()``) stands for: its DNS
    subjectAltNames, or its subject CNs if it has none (RFC 6125, as the
    sender's hostname check: one certificate names the same host to both
    ends), lower-cased (DNS names are case-insensitive)."""
    if not cert:
        return []
    names = [v for k, v in cert.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v for rdn in cert.get("subject", ()) for k, v in rdn if k == "commonName"]
    return list(dict.fromkeys(n.lower() for n in names))


def describe(exc: BaseException, peer: str, handshake: bool, heard: bool = False) -> str:
    """``auth<TAB>why`` or ``error<TAB>why``: what the owner raises (``heard``:
    the peer's first plaintext came, e.g. a receiver's banner)."""
    auth = handshake   # later: an alert (a refused certificate) or a break
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = f"TLS with the {peer} failed: certificate verify failed: {exc.verify_message}"
        auth = True
    elif isinstance(exc, ssl.SSLError):
        what = (exc.reason or "").lower().replace("_", " ") or exc.strerror or str(exc)
        why = f"TLS with the {peer} failed: {what}"
        auth = auth or "alert" in what or "certificate" in what
    elif isinstance(exc, OSError):
        why = f"TLS with the {peer} failed: {exc.strerror or exc}"
    else:
        why = f"TLS with the {peer} failed: {exc}"
    if peer == "receiver" and not heard and _hung_up(exc):
        # Not a refused certificate (that is an alert): a receiver that drops
        # connections it has no room for, or from hosts it does not take; in
        # or after our handshake (TLS 1.3's client is done a flight before
        # the server, which may still drop the connection as pending).
        why += f" ({CLOSED_EARLY})"
        auth = False
    return ("auth" if auth else "error") + "\t" + why


#: The sender's hint when the receiver hangs up before it is ready (the
#: receiver's log says which: full, or this host refused).
CLOSED_EARLY = ("the receiver closed the connection before it was ready: it may be full, or "
                "refuse this host; see its log")


def _hung_up(exc: BaseException) -> bool:
    """A reset or an EOF without an alert: the peer just closed."""
    if isinstance(exc, (ssl.SSLEOFError, ssl.SSLZeroReturnError, ConnectionResetError,
                        BrokenPipeError)):
        return True
    return isinstance(exc, ssl.SSLError) and "eof" in (exc.reason or str(exc)).lower()


class Stage:
    """One connection, from the handshake to both closes (see the module)."""

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket, control: socket.socket,
                 server: bool, server_name: Optional[str]) -> None:
        self.sock, self.control = sock, control
        self.bio_in, self.bio_out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = ctx.wrap_bio(self.bio_in, self.bio_out, server_side=server,
                                server_hostname=server_name)
        self.cipher: List[memoryview] = []     # for the socket, as the BIO gave it
        self.queued = 0
        self.paused = False                    # queued reached _QUEUE_HIGH
        self.buf = bytearray(SLICE)            # owner reads and socket reads
        self.pview = memoryview(bytearray(SLICE))
        self.plain = self.pview[:0]            # decrypted, not yet in the owner's pipe
        self.owner_eof = False                 # fd 0 ended: close_notify queued
        self.shut = False                      # our write side is shut
        self.peer_eof = False                  # the peer closed: fd 1 is closed
        self.closing = False                   # the owner closed the control socket
        self.opened = False                    # the handshake is done
        self.heard = False                     # the peer's first plaintext came
        self.poller = select.poll()
        self.watched: Dict[int, int] = {}

    # -- waiting --

    def wait(self, want: Dict[int, int]) -> bool:
        """Poll ``want`` (fd: events); True if the control socket woke us."""
        for fd in list(self.watched):
            if fd not in want:
                self.poller.unregister(fd)
                del self.watched[fd]
        for fd, mask in want.items():
            if self.watched.get(fd) != mask:
                self.poller.register(fd, mask)
                self.watched[fd] = mask
        cfd = self.control.fileno()
        return any(fd == cfd for fd, _ in self.poller.poll())

    def control_closed(self) -> bool:
        """Has the owner closed the control socket (non-blocking check)?"""
        try:
            return self.control.recv(64, socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False
        except OSError:
            return True

    # -- the socket --

    def flush(self) -> bool:
        """Send queued ciphertext until the socket is full; True if any went."""
        if self.bio_out.pending:
            chunk = self.bio_out.read()
            self.queued += len(chunk)
            self.cipher.append(memoryview(chunk))
        sent = False
        while self.cipher:
            try:
                n = self.sock.send(self.cipher[0])
            except (BlockingIOError, InterruptedError):
                break
            sent = True
            self.queued -= n
            if n == len(self.cipher[0]):
                self.cipher.pop(0)
            else:
                self.cipher[0] = self.cipher[0][n:]
        if not self.cipher:
            if self.owner_eof and not self.shut:
                self.shut = True
                try:
                    self.sock.shutdown(socket.SHUT_WR)
                except OSError:
                    pass
            self.paused = False
        elif self.queued >= _QUEUE_HIGH:
            self.paused = True
        return sent

    def receive(self) -> bool:
        """One recv into the TLS object; True if anything (or EOF) came."""
        try:
            n = self.sock.recv_into(self.buf, SLICE)
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            self.bio_in.write_eof()
        else:
            self.bio_in.write(memoryview(self.buf)[:n])
        return True

    def handshake(self) -> None:
        while True:
            try:
                self.tls.do_handshake()
                self.flush()
                break
            except ssl.SSLWantReadError:
                pass
            self.flush()
            if self.bio_in.eof:
                raise ssl.SSLEOFError("the peer closed the connection during the TLS handshake")
            if self.receive():
                continue
            want = {self.sock.fileno(): select.POLLIN | (select.POLLOUT if self.cipher else 0),
                    self.control.fileno(): select.POLLIN}
            if self.wait(want) and self.control_closed():
                sys.exit(1)        # the owner gave up on us: nothing to say
        while self.cipher:         # our last flight (a client's Finished)
            self.wait({self.sock.fileno(): select.POLLOUT})
            self.flush()
        self.opened = True

    # -- the two directions --

    def from_owner(self) -> bool:
        if self.owner_eof or self.paused:
            return False
        try:
            n = os.readv(0, [self.buf])
        except (BlockingIOError, InterruptedError):
            return False
        if n == 0:
            self.owner_eof = True
            os.close(0)
            try:
                self.tls.unwrap()          # close_notify; the peer's may never come
            except (ssl.SSLWantReadError, ssl.SSLError):
                pass
        else:
            self.tls.write(memoryview(self.buf)[:n])
        self.flush()
        return True

    def decrypt(self) -> bool:
        """Up to a slice of plaintext from what the TLS object holds."""
        got, eof = 0, False
        read, view = self.tls.read, self.pview     # a call per 16 KiB record: kept lean
        try:
            while got < SLICE:
                # with a buffer, read() gives a count (typeshed says bytes)
                n: int = read(SLICE - got, view[got:])  # type: ignore[assignment]
                if n == 0:
                    eof = True
                    break
                got += n
        except ssl.SSLWantReadError:
            eof = self.bio_in.eof     # TCP FIN without close_notify: EOF all the same
        except ssl.SSLZeroReturnError:
            eof = True
        if self.bio_out.pending:       # e.g. a KeyUpdate's answer
            self.flush()
        if got:
            self.heard = True
        if got and not self.closing:
            self.plain = self.pview[:got]
        if eof:
            self.peer_eof = True
        return bool(got) or eof

    def to_owner(self) -> bool:
        moved = False
        while self.plain:
            try:
                n = os.write(1, self.plain)
            except (BlockingIOError, InterruptedError):
                break
            except BrokenPipeError:      # the owner stopped reading: drop it
                self.plain = self.pview[:0]
                break
            self.plain = self.plain[n:]
            moved = True
        return moved

    def from_peer(self) -> bool:
        if self.plain or self.peer_eof:
            return False
        if self.decrypt():
            return True
        if not self.receive():
            return False
        self.decrypt()
        return True

    def done(self) -> bool:
        sent = self.owner_eof and not self.cipher and self.shut
        return sent and (self.closing or (self.peer_eof and not self.plain))

    def relay(self) -> None:
        fd1_open = True
        while not self.done():
            progress = self.from_owner()
            progress = self.flush() or progress
            progress = self.from_peer() or progress
            progress = self.to_owner() or progress
            if self.closing:
                self.plain = self.pview[:0]
            if fd1_open and self.peer_eof and not self.plain:
                os.close(1)            # the owner sees the peer's close ...
                fd1_open = False
                try:                   # ... once the bridge lets go of its copy
                    self.control.sendall(b"eof\n")
                except OSError:
                    pass
            if progress or self.done():
                continue
            want: Dict[int, int] = {}
            sock = 0
            if self.cipher:
                sock |= select.POLLOUT
            if not self.peer_eof and not self.plain:
                sock |= select.POLLIN
            if sock:
                want[self.sock.fileno()] = sock
            if not self.owner_eof and not self.paused:
                want[0] = select.POLLIN
            if self.plain:
                want[1] = select.POLLOUT
            if not self.closing:
                want[self.control.fileno()] = select.POLLIN
            if not want:
                return
            if self.wait(want) and self.control_closed():
                self.closing = True


def main(argv: List[str]) -> int:
    role, cert, key, ca, server_name, control_fd, crl = argv[1:8]
    server = role == "server"
    peer = "sender" if server else "receiver"
    control = socket.socket(fileno=int(control_fd))
    stage: Optional[Stage] = None
    try:
        ctx = context(cert, key, ca, server, crl or None)
    except ValueError as exc:       # the files changed since the owner loaded them
        sys.stderr.write("error\t" + str(exc) + "\n")
        return 1
    try:
        _, fds, _, _ = socket.recv_fds(control, 1, 1)   # the owner's connected socket
        if not fds:
            return 1                # the owner gave up before it connected
        sock = socket.socket(fileno=fds[0])
        for fd in (0, 1, sock.fileno()):
            os.set_blocking(fd, False)
        stage = Stage(ctx, sock, control, server, None if server else server_name)
        stage.handshake()
        names = peer_names(stage.tls.getpeercert())
        control.sendall(b"ready " + json.dumps(names).encode() + b"\n")
        stage.relay()
    except (ssl.SSLError, OSError) as exc:
        sys.stderr.write(describe(exc, peer, stage is None or not stage.opened,
                                  stage is not None and stage.heard) + "\n")
        if stage is not None:          # our alert, if any, so the peer learns why
            try:
                stage.flush()
            except OSError:
                pass
        return 1
    except ValueError as exc:         # e.g. a bad server name: the owner's bug
        sys.stderr.write("error\tTLS with the " + peer + " failed: " + str(exc) + "\n")
        return 1
    sys.stderr.write("\nok\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
