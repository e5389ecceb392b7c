"""Which user opened the other end of a loopback TCP connection.

Why: loopback is not a trust boundary.  Every local user (and every process
sharing the network namespace, such as a de-privileged device model) can
connect to 127.0.0.1, so a root receiver on plain TCP would create a domain
for any of them.  On loopback the peer's socket is on this host, and the
kernel knows its owner: a NETLINK_SOCK_DIAG query for exactly that socket
(its local address is the peer's, its remote address ours) returns its uid.
One request, answered in the kernel while it is sent: no table is read and
nothing waits.  Only a live socket has an owner: one its process has closed
already (TIME_WAIT, an orphaned FIN_WAIT) is reported as uid 0, inode 0, and
would pass for root's -- any user's corked connect, send, close does that
before the receiver accepts.  So the peer's socket must be ESTABLISHED, with
an inode, or its user is unknown (and the connection refused).  May import
the standard library only.
"""

from __future__ import annotations

import os
import socket
import struct

__all__ = ["peer_uid"]

_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLM_F_REQUEST = 1
_NLMSG_ERROR = 2
_NOCOOKIE = 0xFFFFFFFF
_HDR = struct.Struct("=IHHII")            # nlmsghdr
_TCP_ESTABLISHED = 1
_STATE_AT = _HDR.size + 1                 # inet_diag_msg: family, state, ...
_UID_AT = _HDR.size + 4 + 48 + 12         # ... timer, retrans, id, expires..wqueue, uid, inode


def _addr(family: int, host: str) -> bytes:
    raw = socket.inet_pton(family, host.split("%")[0])
    return raw + bytes(16 - len(raw))


def peer_uid(conn: socket.socket) -> int:
    """The uid owning the peer's socket of ``conn``, an accepted TCP connection
    whose peer is on this host.  OSError if the kernel does not know it."""
    ours, theirs = conn.getsockname(), conn.getpeername()
    family = conn.family
    ident = (struct.pack("!HH", theirs[1], ours[1]) + _addr(family, theirs[0])
             + _addr(family, ours[0]) + struct.pack("=III", 0, _NOCOOKIE, _NOCOOKIE))
    req = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0,
                      1 << _TCP_ESTABLISHED) + ident
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK,
                       _NETLINK_SOCK_DIAG) as nl:
        nl.send(_HDR.pack(_HDR.size + len(req), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0)
                + req)
        reply = nl.recv(4096)             # already queued: the kernel answers in send()
    if len(reply) < _HDR.size:
        raise OSError("sock_diag: short reply")
    kind = _HDR.unpack_from(reply)[1]
    if kind == _NLMSG_ERROR:
        err = -struct.unpack_from("=i", reply, _HDR.size)[0]
        raise OSError(err, f"sock_diag: {os.strerror(err)}")
    if kind != _SOCK_DIAG_BY_FAMILY or len(reply) < _UID_AT + 8:
        raise OSError("sock_diag: unexpected reply")
    uid, inode = struct.unpack_from("=II", reply, _UID_AT)
    if reply[_STATE_AT] != _TCP_ESTABLISHED or inode == 0:
        # The exact lookup ignores the state mask: a closed socket comes back too.
        raise OSError(f"its socket is closed already (TCP state {reply[_STATE_AT]})")
    return int(uid)
