"""A small XenStore client speaking xenstored's socket wire protocol.

Every message, request or reply, is a 16-byte header ``u32 type, u32 req_id,
u32 tx_id, u32 len`` (native byte order) followed by ``len`` bytes of payload
(NUL-separated strings; docs/misc/xenstore.txt in Xen's tree).  Replies carry
the request's type and req_id, or XS_ERROR with an errno name; watch events
(XS_WATCH_EVENT, payload ``path\\0token\\0``) may arrive at any time between
replies, so :meth:`XenStore.request` queues them for :meth:`XenStore.events`.

One connection per user keeps that simple: the backend's suspend opens its own
connection for its ``@releaseDomain`` watch and registers the socket's fd with
the operation's event loop.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import List, Optional, Sequence, Tuple, Union

from pyxl.errors import BackendError

XS_CONTROL, XS_DIRECTORY, XS_READ, XS_GET_PERMS, XS_WATCH, XS_UNWATCH = range(6)
XS_TRANSACTION_START, XS_TRANSACTION_END, XS_INTRODUCE, XS_RELEASE = range(6, 10)
XS_GET_DOMAIN_PATH, XS_WRITE, XS_MKDIR, XS_RM, XS_SET_PERMS = range(10, 15)
XS_WATCH_EVENT, XS_ERROR, XS_IS_DOMAIN_INTRODUCED, XS_RESUME, XS_SET_TARGET = range(15, 20)
XS_RESET_WATCHES, XS_DIRECTORY_PART = 21, 22

HEADER = struct.Struct("=IIII")
PAYLOAD_MAX = 4096

SOCKET_PATHS = ("/run/xenstored/socket", "/var/run/xenstored/socket")


class XenStoreError(BackendError, OSError):
    """xenstored answered XS_ERROR (``errno`` holds the error's number)."""


def _errno_of(name: str) -> int:
    return getattr(errno, name, errno.EIO)


def encode(mtype: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    if len(payload) > PAYLOAD_MAX:
        raise ValueError(f"XenStore payload of {len(payload)} bytes exceeds {PAYLOAD_MAX}")
    return HEADER.pack(mtype, req_id, tx_id, len(payload)) + payload


def check_reply(mtype: int, req_id: int, rtype: int, rid: int, body: bytes) -> bytes:
    """The payload of the reply (``rtype``, ``rid``, ``body``) to request
    (``mtype``, ``req_id``); XenStoreError for XS_ERROR, OSError(EPROTO) for
    a reply that is not this request's."""
    if rid != req_id:
        raise OSError(errno.EPROTO, f"XenStore reply for request {rid}, expected {req_id}")
    if rtype == XS_ERROR:
        name = body.rstrip(b"\0").decode(errors="replace")
        raise XenStoreError(_errno_of(name), f"xenstored: {name}")
    if rtype != mtype:
        raise OSError(errno.EPROTO, f"XenStore reply of type {rtype} to request {mtype}")
    return body


class XenStore:
    """One connection to xenstored (a Unix socket, or any connected stream socket)."""

    def __init__(self, path: Optional[str] = None, sock: Optional[socket.socket] = None) -> None:
        if sock is None:
            paths = (path,) if path else SOCKET_PATHS
            last: Optional[OSError] = None
            for p in paths:
                s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
                try:
                    s.connect(p)
                except OSError as exc:
                    s.close()
                    last = exc
                    continue
                sock = s
                break
            if sock is None:
                raise OSError(last.errno if last else errno.ENOENT,
                              f"cannot connect to xenstored ({', '.join(paths)}): "
                              f"{last.strerror if last else 'no socket'}")
        self.sock = sock
        self._buf = b""
        self._events: List[Tuple[str, str]] = []
        self._req = 0

    # -- framing -------------------------------------------------------------
    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "XenStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _take(self) -> Optional[Tuple[int, int, int, bytes]]:
        if len(self._buf) < HEADER.size:
            return None
        mtype, req_id, tx_id, length = HEADER.unpack_from(self._buf)
        if length > PAYLOAD_MAX:
            raise OSError(errno.EPROTO, f"XenStore message of {length} bytes")
        if len(self._buf) < HEADER.size + length:
            return None
        payload = self._buf[HEADER.size:HEADER.size + length]
        self._buf = self._buf[HEADER.size + length:]
        return mtype, req_id, tx_id, payload

    def _fill(self, block: bool) -> bool:
        """Read what the socket has; False if it would block (non-blocking read)."""
        try:
            data = self.sock.recv(65536) if block else self.sock.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return False
        if not data:
            raise OSError(errno.ECONNRESET, "xenstored closed the connection")
        self._buf += data
        return True

    def _queue_event(self, payload: bytes) -> None:
        parts = payload.split(b"\0")
        if len(parts) >= 2:
            self._events.append((parts[0].decode(errors="replace"),
                                 parts[1].decode(errors="replace")))

    def request(self, mtype: int, payload: bytes, tx_id: int = 0) -> bytes:
        """Send one request and return its reply's payload (blocking, briefly)."""
        self._req = (self._req + 1) & 0xFFFFFFFF
        req_id = self._req
        self.sock.sendall(encode(mtype, req_id, tx_id, payload))
        return self._reply(mtype, req_id)

    def pipeline(self, requests: Sequence[Tuple[int, bytes, int]]
                 ) -> List[Union[bytes, XenStoreError]]:
        """Send ``requests`` [(type, payload, tx_id)] before reading any reply,
        then read the replies, in order: one wait on xenstored for them all,
        not one per request (a domain's build writes some 60 nodes).  Each
        entry is the reply's payload or, for XS_ERROR, the XenStoreError (not
        raised: every reply is read, so the connection stays in step)."""
        frames, sent = self.next_frames(requests)
        if isinstance(self.sock, socket.socket):
            self.sock.sendall(b"".join(frames))
        else:   # the xenbus device takes one message per write
            for frame in frames:
                self.sock.sendall(frame)
        out: List[Union[bytes, XenStoreError]] = []
        for mtype, req_id in sent:
            try:
                out.append(self._reply(mtype, req_id))
            except XenStoreError as exc:
                out.append(exc)
        return out

    def read_many(self, paths: Sequence[str], tx: int = 0) -> List[Optional[bytes]]:
        """:meth:`read` of each path, pipelined (None for a missing node)."""
        out: List[Optional[bytes]] = []
        for reply in self.pipeline([(XS_READ, self._z(p), tx) for p in paths]):
            if isinstance(reply, XenStoreError):
                if reply.errno != errno.ENOENT:
                    raise reply
                out.append(None)
            else:
                out.append(reply)
        return out

    def batch(self) -> "Batch":
        """Writes, mkdirs, rms and set_perms queued, and sent with :meth:`pipeline`
        by :meth:`Batch.send`."""
        return Batch(self)

    def _reply(self, mtype: int, req_id: int) -> bytes:
        while True:
            msg = self._take()
            if msg is None:
                self._fill(block=True)
                continue
            rtype, rid, _tx, body = msg
            if rtype == XS_WATCH_EVENT:
                self._queue_event(body)
                continue
            return check_reply(mtype, req_id, rtype, rid, body)

    def next_frames(self, requests: Sequence[Tuple[int, bytes, int]]
                    ) -> Tuple[List[bytes], List[Tuple[int, int]]]:
        """``requests`` [(type, payload, tx_id)] as frames with this
        connection's next request ids, and the (type, req_id) each reply
        must carry: for a caller that sends and reads itself (on a loop)."""
        sent: List[Tuple[int, int]] = []
        frames = []
        for mtype, payload, tx_id in requests:
            self._req = (self._req + 1) & 0xFFFFFFFF
            sent.append((mtype, self._req))
            frames.append(encode(mtype, self._req, tx_id, payload))
        return frames, sent

    def replies_ready(self) -> List[Tuple[int, int, bytes]]:
        """The replies the socket holds now, without blocking: [(type,
        req_id, payload)] (watch events are kept for :meth:`events`).
        Raises OSError if xenstored closed the connection."""
        out: List[Tuple[int, int, bytes]] = []
        more = True
        while True:
            msg = self._take()
            if msg is None:
                if not more:
                    return out
                more = self._fill(block=False)
                continue
            if msg[0] == XS_WATCH_EVENT:
                self._queue_event(msg[3])
            else:
                out.append((msg[0], msg[1], msg[3]))

    def events(self) -> List[Tuple[str, str]]:
        """Watch events received so far, without blocking: [(path, token)]."""
        while True:
            msg = self._take()
            if msg is not None:
                if msg[0] == XS_WATCH_EVENT:
                    self._queue_event(msg[3])
                continue
            if not self._fill(block=False):
                break
        out, self._events = self._events, []
        return out

    # -- operations ----------------------------------------------------------
    @staticmethod
    def _z(*parts: str) -> bytes:
        return b"".join(p.encode() + b"\0" for p in parts)

    def read(self, path: str, tx: int = 0) -> Optional[bytes]:
        try:
            return self.request(XS_READ, self._z(path), tx)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return None
            raise

    def write(self, path: str, value: "bytes | str", tx: int = 0) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.request(XS_WRITE, path.encode() + b"\0" + value, tx)

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.request(XS_MKDIR, self._z(path), tx)

    def rm(self, path: str, tx: int = 0) -> None:
        try:
            self.request(XS_RM, self._z(path), tx)
        except XenStoreError as exc:
            if exc.errno != errno.ENOENT:
                raise

    def directory(self, path: str, tx: int = 0) -> List[str]:
        try:
            body = self.request(XS_DIRECTORY, self._z(path), tx)
        except XenStoreError as exc:
            if exc.errno == errno.ENOENT:
                return []
            raise
        return [p.decode() for p in body.split(b"\0") if p]

    def set_perms(self, path: str, perms: List[str], tx: int = 0) -> None:
        """``perms`` as on the wire: e.g. ``["n0", "r5"]`` (owner 0, domain 5 may read)."""
        self.request(XS_SET_PERMS, self._z(path, *perms), tx)

    def watch(self, path: str, token: str) -> None:
        self.request(XS_WATCH, self._z(path, token))

    def unwatch(self, path: str, token: str) -> None:
        self.request(XS_UNWATCH, self._z(path, token))

    def transaction_start(self) -> int:
        return int(self.request(XS_TRANSACTION_START, b"\0").rstrip(b"\0"))

    def transaction_end(self, tx: int, commit: bool = True) -> None:
        self.request(XS_TRANSACTION_END, self._z("T" if commit else "F"), tx)

    def introduce(self, domid: int, store_mfn: int, store_port: int) -> None:
        self.request(XS_INTRODUCE, self._z(str(domid), str(store_mfn), str(store_port)))

    def release(self, domid: int) -> None:
        self.request(XS_RELEASE, self._z(str(domid)))

    def resume(self, domid: int) -> None:
        self.request(XS_RESUME, self._z(str(domid)))

    def get_domain_path(self, domid: int) -> str:
        return self.request(XS_GET_DOMAIN_PATH, self._z(str(domid))).rstrip(b"\0").decode()

    def is_domain_introduced(self, domid: int) -> bool:
        return self.request(XS_IS_DOMAIN_INTRODUCED, self._z(str(domid))).rstrip(b"\0") == b"T"


class Batch:
    """XenStore changes (usually of one transaction) queued, then sent at once.

    ``write``, ``mkdir``, ``rm`` (a missing node is fine, as
    :meth:`XenStore.rm`) and ``set_perms`` take the same arguments as
    XenStore's; nothing is sent until :meth:`send`, which raises the first
    request's error, if any (the rest were sent and answered all the same,
    so end the transaction without committing, as after any failure)."""

    def __init__(self, xs: Optional[XenStore] = None) -> None:
        self.xs = xs
        #: what is queued: [(type, payload, tx_id)]
        self.requests: List[Tuple[int, bytes, int]] = []

    def write(self, path: str, value: "bytes | str", tx: int = 0) -> None:
        if isinstance(value, str):
            value = value.encode()
        self.requests.append((XS_WRITE, path.encode() + b"\0" + value, tx))

    def mkdir(self, path: str, tx: int = 0) -> None:
        self.requests.append((XS_MKDIR, XenStore._z(path), tx))

    def rm(self, path: str, tx: int = 0) -> None:
        self.requests.append((XS_RM, XenStore._z(path), tx))

    def set_perms(self, path: str, perms: List[str], tx: int = 0) -> None:
        self.requests.append((XS_SET_PERMS, XenStore._z(path, *perms), tx))

    def send(self) -> None:
        """Send what is queued on the batch's connection, and :meth:`check` the replies."""
        assert self.xs is not None, "a Batch without a connection is sent by its caller"
        requests, self.requests = self.requests, []
        check_batch(requests, self.xs.pipeline(requests))


def check_batch(requests: Sequence[Tuple[int, bytes, int]],
                replies: Sequence[Union[bytes, XenStoreError]]) -> None:
    """Raise the first of ``replies`` that is an error (not a missing node's
    XS_RM), as XenStoreError naming the request's path."""
    for (mtype, payload, _tx), reply in zip(requests, replies):
        if isinstance(reply, XenStoreError) and not (
                mtype == XS_RM and reply.errno == errno.ENOENT):
            path = payload.split(b"\0", 1)[0].decode(errors="replace")
            raise XenStoreError(reply.errno, f"{reply.strerror}: {path}")


def open_default() -> XenStore:
    """xenstored's socket, or the kernel's xenbus device (same wire protocol) as a fallback."""
    try:
        return XenStore()
    except OSError:
        if not os.path.exists("/dev/xen/xenbus"):
            raise
    # /dev/xen/xenbus is a character device, not a socket; wrap it.
    return XenStore(sock=_DevSock(os.open("/dev/xen/xenbus", os.O_RDWR | os.O_CLOEXEC)))  # type: ignore[arg-type]


class _DevSock:
    """Just enough of a socket over the xenbus character device."""

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def fileno(self) -> int:
        return self.fd

    def sendall(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view):]

    def recv(self, n: int, flags: int = 0) -> bytes:
        if flags & socket.MSG_DONTWAIT:
            import select
            r, _, _ = select.select([self.fd], [], [], 0)
            if not r:
                raise BlockingIOError()
        return os.read(self.fd, n)

    def close(self) -> None:
        os.close(self.fd)
