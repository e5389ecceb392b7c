"""Stand-ins for a Xen host, for the real-Xen backend's tests: a tiny xenstored
(a thread on a socketpair, speaking xenstored's wire protocol) and a libxenctrl
that records what it is asked.  Shared by tests/integration/test_xenbackend*.py."""

from __future__ import annotations

import socket
import struct
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl.backends import xenmake, xenstore
from pyxl.backends.xen import XenBackend
from pyxl.backends.xenctrl import XEN_DOMINF_hvm_guest, DomInfo
from pyxl.backends.xenstore import XenStore

H = struct.Struct("=IIII")


class FakeXenstored:
    """Just enough xenstored: a flat dict of nodes (a node's parents exist as
    empty nodes, as in xenstored), their permissions, watches that fire on
    writes and removals under their path and once on registration.
    A transaction's writes and removals are applied as they come, but what
    they make others see -- watch events, the simulated kernel backends --
    waits for its end: to a watcher it is atomic, as in xenstored."""

    def __init__(self) -> None:
        self.client, self.server = socket.socketpair()
        self.nodes: Dict[str, bytes] = {}
        self.perms: Dict[str, List[str]] = {}
        self.watches: List[Tuple[str, str]] = []
        self.log: List[Tuple[int, int, List[bytes]]] = []
        self.after_write: Optional[Callable[[str, bytes], None]] = None
        self.after_rm: Optional[Callable[[str], None]] = None
        self._tx_events: Dict[int, List[Callable[[], None]]] = {}
        self._next_tx = 7
        #: seconds to sleep before answering a request of a type (a busy xenstored)
        self.delay: Dict[int, float] = {}
        #: transaction ends answered EAGAIN (a conflict) before one is committed
        self.conflicts = 0
        self.lock = threading.Lock()
        #: xenstored is one thread: one request (and what it sets off) at a time
        self.serial = threading.RLock()
        self.conns: List[socket.socket] = [self.server]
        self.t = threading.Thread(target=self._serve, args=(self.server,), daemon=True)
        self.t.start()

    def connect(self) -> XenStore:
        """Another client connection (a watch's own), served by its own thread."""
        a, b = socket.socketpair()
        self.conns.append(b)
        threading.Thread(target=self._serve, args=(b,), daemon=True).start()
        return XenStore(sock=a)

    def send(self, conn: socket.socket, mtype: int, req: int, tx: int, payload: bytes) -> None:
        with self.lock:
            conn.sendall(H.pack(mtype, req, tx, len(payload)) + payload)

    def fire(self, path: str) -> None:
        for conn, wpath, token in list(self._watches):
            if path == wpath or path.startswith(wpath.rstrip("/") + "/"):
                try:
                    self.send(conn, xenstore.XS_WATCH_EVENT, 0, 0,
                              path.encode() + b"\0" + token.encode() + b"\0")
                except OSError:
                    pass

    @property
    def _watches(self) -> List[Tuple[socket.socket, str, str]]:
        return getattr(self, "_w", [])

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        b = b""
        while len(b) < n:
            c = conn.recv(n - len(b))
            if not c:
                raise EOFError
            b += c
        return b

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                mtype, req, tx, ln = H.unpack(self._recv(conn, H.size))
                body = self._recv(conn, ln) if ln else b""
                with self.serial:
                    self._handle(conn, mtype, req, tx, body)
        except (EOFError, OSError):
            pass

    def _mkparents(self, path: str) -> None:
        parts = path.split("/")
        for i in range(2, len(parts)):
            self.nodes.setdefault("/".join(parts[:i]), b"")

    def kernel_backends(self) -> None:
        """Act as dom0's blkback/netback (Linux): a backend written in state 1
        (Initialising) moves to 2 (InitWait, waiting for its hotplug script);
        a backend whose frontend directory disappears moves to 6 (Closed), as
        the driver's watch on the other end sees state Unknown.  The driver
        does not watch its own state node: a toolstack writing 5 (Closing)
        there changes nothing by itself."""
        def driver(path: str, value: bytes) -> None:
            parts = path.split("/")
            if len(parts) == 9 and parts[4] == "backend" and parts[5] in ("vbd", "vif") \
                    and parts[8] == "state" and value.strip() == b"1":
                self.write(path, b"2")

        def frontend_gone(path: str) -> None:
            for node in list(self.nodes):
                parts = node.split("/")
                if len(parts) == 9 and parts[4] == "backend" and parts[5] in ("vbd", "vif") \
                        and parts[8] == "state" and self.nodes.get(node, b"").strip() != b"6":
                    front = f"/local/domain/{parts[6]}/device/{parts[5]}/{parts[7]}"
                    if front == path or front.startswith(path.rstrip("/") + "/"):
                        self.write(node, b"6")
        self.after_write = driver
        self.after_rm = frontend_gone

    def _event(self, tx: int, fn: Callable[[], None]) -> None:
        """Run ``fn`` now, or when transaction ``tx`` ends."""
        if tx and tx in self._tx_events:
            self._tx_events[tx].append(fn)
        else:
            fn()

    def write(self, path: str, value: bytes) -> None:
        """Write a node as a third party (the guest, QEMU) would."""
        with self.serial:
            self._mkparents(path)
            self.nodes[path] = value
            self.fire(path)

    def _handle(self, conn: socket.socket, mtype: int, req: int, tx: int, body: bytes) -> None:
        parts = body.split(b"\0")
        self.log.append((mtype, tx, parts))
        if self.delay.get(mtype):
            time.sleep(self.delay[mtype])
        ok = lambda: self.send(conn, mtype, req, tx, b"OK\0")  # noqa: E731
        err = lambda name: self.send(conn, xenstore.XS_ERROR, req, tx, name + b"\0")  # noqa: E731
        path = parts[0].decode()
        if mtype == xenstore.XS_READ:
            if path in self.nodes:
                self.send(conn, mtype, req, tx, self.nodes[path])
            else:
                err(b"ENOENT")
        elif mtype == xenstore.XS_WRITE:
            value = body[len(parts[0]) + 1:]
            self._mkparents(path)
            self.nodes[path] = value
            ok()

            def wrote() -> None:
                self.fire(path)
                if self.after_write is not None:
                    self.after_write(path, value)
            self._event(tx, wrote)
        elif mtype == xenstore.XS_MKDIR:
            self._mkparents(path)
            self.nodes.setdefault(path, b"")
            ok()
        elif mtype == xenstore.XS_RM:
            gone = [p for p in self.nodes if p == path or p.startswith(path + "/")]
            if not gone:
                err(b"ENOENT")
                return
            for p in gone:
                del self.nodes[p]
                self.perms.pop(p, None)
            ok()

            def removed() -> None:
                self.fire(path)
                if self.after_rm is not None:
                    self.after_rm(path)
            self._event(tx, removed)
        elif mtype == xenstore.XS_DIRECTORY:
            if path not in self.nodes and not any(p.startswith(path + "/") for p in self.nodes):
                err(b"ENOENT")
                return
            kids = sorted({p[len(path) + 1:].split("/")[0] for p in self.nodes
                           if p.startswith(path + "/")})
            self.send(conn, mtype, req, tx, b"".join(k.encode() + b"\0" for k in kids))
        elif mtype == xenstore.XS_SET_PERMS:
            if path not in self.nodes:
                err(b"ENOENT")
                return
            self.perms[path] = [p.decode() for p in parts[1:] if p]
            ok()
        elif mtype == xenstore.XS_WATCH:
            self._w = self._watches + [(conn, path, parts[1].decode())]
            self.watches.append((path, parts[1].decode()))
            ok()
            self.send(conn, xenstore.XS_WATCH_EVENT, 0, 0,
                      path.encode() + b"\0" + parts[1] + b"\0")   # fired once on registration
        elif mtype == xenstore.XS_UNWATCH:
            self._w = [w for w in self._watches if w[0] is not conn or w[1] != path]
            ok()
        elif mtype == xenstore.XS_TRANSACTION_START:
            new_tx, self._next_tx = self._next_tx, self._next_tx + 1
            self._tx_events[new_tx] = []
            self.send(conn, mtype, req, tx, f"{new_tx}\0".encode())
        elif mtype == xenstore.XS_TRANSACTION_END:
            if self.conflicts and parts[0] == b"T":
                self.conflicts -= 1
                self._tx_events.pop(tx, None)
                err(b"EAGAIN")
                return
            ok()
            for fn in self._tx_events.pop(tx, []):
                fn()
        elif mtype in (xenstore.XS_RESUME, xenstore.XS_INTRODUCE, xenstore.XS_RELEASE):
            ok()
        else:
            err(b"EINVAL")

    def subtree(self, prefix: str) -> Dict[str, bytes]:
        return {p: v for p, v in self.nodes.items() if p == prefix or p.startswith(prefix + "/")}

    def close(self) -> None:
        for c in self.conns:
            c.close()
        self.client.close()


def dominfo(domid: int, flags: int, handle: bytes = bytes(range(16))) -> DomInfo:
    buf = bytearray(1024)
    struct.pack_into("=HHI", buf, 0, domid, 0, flags)
    buf[76:92] = handle
    return DomInfo(bytes(buf))


class FakeXc:
    def __init__(self) -> None:
        self.flags = 0
        self.calls: List[str] = []

    def getinfo(self, domid: int) -> Optional[DomInfo]:
        self.calls.append("getinfo")
        return dominfo(domid, self.flags)


class RecordingXc(FakeXc):
    """libxenctrl stand-in recording what the backend asks of it."""

    def __init__(self, domid: int = 7, release: str = "4.17") -> None:
        super().__init__()
        self.release = release
        self.created: List[tuple] = []
        self.created_kw: List[Dict[str, Any]] = []
        self.log: List[tuple] = []
        self.domains: Dict[int, int] = {}
        self.handles: Dict[int, bytes] = {}
        self.params: Dict[Tuple[int, int], int] = {}
        self.next_port = 1
        self.next_domid = domid

    def create(self, *args: Any, **kw: Any) -> int:
        self.created.append(args)
        self.created_kw.append(kw)
        flags = args[1]
        self.domains[self.next_domid] = XEN_DOMINF_hvm_guest if flags & 1 else 0
        self.handles[self.next_domid] = args[0]
        return self.next_domid

    def call(self, fn: str, *args: Any) -> int:
        self.log.append((fn,) + args)
        if fn == "xc_evtchn_alloc_unbound":
            self.next_port += 1
            return self.next_port - 1
        return 0

    def getinfo(self, domid: int) -> Optional[DomInfo]:
        if domid not in self.domains:
            return None
        return dominfo(domid, self.domains[domid], self.handles.get(domid, bytes(range(16))))

    def hvm_param_get(self, domid: int, param: int) -> int:
        return self.params.get((domid, param), 0)

    def native_protocol(self, domid: int) -> Optional[str]:
        return "x86_64-abi"

    def shutdown(self, domid: int, reason: int) -> None:
        self.log.append(("shutdown", domid, reason))

    def pause(self, domid: int) -> None:
        self.log.append(("pause", domid))

    def unpause(self, domid: int) -> None:
        self.log.append(("unpause", domid))

    def resume(self, domid: int, fast: bool = True) -> None:
        self.log.append(("resume", domid, fast))

    def destroy(self, domid: int) -> None:
        self.log.append(("destroy", domid))
        self.domains.pop(domid, None)

    def make_command(self, spec: Dict[str, Any]) -> List[str]:
        """The backend runs this child where Xen's hypercalls would run: they
        are made here, now (recorded), and the child tells what they gave."""
        lines: List[str] = []
        try:
            xenmake.make_domain(self, spec, lines.append)
        except Exception as exc:
            return ["sh", "-c", 'printf "$1"; echo "$2" >&2; exit 1', "sh",
                    "".join(f"{line}\n" for line in lines), str(exc)]
        return ["sh", "-c", 'printf "$1"', "sh", "".join(f"{line}\n" for line in lines)]

    def destroy_command(self, domid: int) -> List[str]:
        """The backend runs this child where Xen's hypercall would run (noted as made)."""
        self.destroy(domid)
        return ["true"]


def backend(xsd: FakeXenstored, xc: Any) -> XenBackend:
    """A XenBackend over the fakes (no libxenctrl loaded)."""
    be = XenBackend.__new__(XenBackend)
    be.xc = xc
    be._xs = XenStore(sock=xsd.client)
    be._ports, be._restoring, be._dm_procs, be._types = {}, {}, {}, {}
    be._open_xs = xsd.connect      # type: ignore[method-assign]
    return be


def reaped(proc: Any, timeout: float = 5.0) -> int:
    """The exit code of a :class:`pyxl.spawn.Child` whose loop has closed
    (``poll()`` reaps it), once it has gone."""
    import os
    deadline = time.monotonic() + timeout
    while proc.poll():
        assert time.monotonic() < deadline, f"{proc.argv[0]} still runs after {timeout:g} s"
        time.sleep(0.01)
    return os.waitstatus_to_exitcode(proc.wait_status)
