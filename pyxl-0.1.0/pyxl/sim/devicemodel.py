"""fakexen's device model: a process per simulated guest that speaks real QMP.

Every xl HVM guest has a QEMU; a simulated guest may have this stand-in for it::

    python -I -S devicemodel.py --domid D --sim-dir DIR --qmp PATH [--incoming fd:N] [--daemonize]

It serves QMP on the UNIX socket ``PATH`` as QEMU does (greeting, capabilities
negotiation, ``query-status``, ``stop``, ``cont``, ``add-fd``/``remove-fd``/
``query-fdsets`` with descriptors received by SCM_RIGHTS,
``xen-set-global-dirty-log``, ``xen-save-devices-state`` to ``/dev/fdset/N`` or a
path, ``quit``; ``STOP``/``RESUME`` events) and holds some device state: a small
header and 4 KiB of "device registers" derived from the guest's uuid and domid,
and a counter that advances (changing a register) every few milliseconds while
both the device model and the guest run.  ``xen-save-devices-state`` writes that
state; started with ``--incoming fd:N`` the device model loads it from the
inherited fd (run state ``inmigrate``, then ``running``) and refuses a state that
is not whole.

QEMU on Xen reports that it runs by writing ``running`` to XenStore's
``/local/domain/0/device-model/D/state``; fakexen has no XenStore, so the same
value goes, atomically, to ``dD/device-model-state`` in the state directory.
The current state is kept in ``dD/device-model-regs`` (what ``pyxl sim digest``
hashes), the pid in ``dD/device-model.lock`` (held with flock while it runs),
its log in ``dD/device-model.log`` (one ``qmp: NAME ARGUMENTS`` line per
command).  It exits on SIGTERM/SIGHUP (libxl's destroy sends SIGHUP), on
``quit``, and once its domain is gone.

Fault injection for tests, ``$PYXL_SIM_DM_FAULT`` (comma-separated):
``die:CMD`` (exit when CMD arrives), ``hang:CMD`` (never answer CMD, nor
anything after it), ``garbage:CMD`` (answer CMD with bytes that are not JSON),
``error:CMD`` (answer CMD with a GenericError), ``silent`` (never greet),
``garbage-greeting``, ``never-ready`` (with ``--incoming``: stay ``inmigrate``).

Standard library only (no pyxl import: it starts in a few tens of ms with
``python -I -S``); :mod:`pyxl.sim.dmcontrol` is the toolstack's side.
"""

from __future__ import annotations

import array
import fcntl
import hashlib
import json
import mmap
import os
import selectors
import signal
import socket
import struct
import sys
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:       # not imported at run time: it starts faster without typing
    from typing import Any, Dict, List, NoReturn, Optional, Set

# fakexen's control block (pyxl/sim/layout.py CTL_FIELDS; a test checks they agree).
CTL_MAGIC = 0x314C544358594C50
CTL_MAGIC_OFF, CTL_DOMID_OFF, CTL_STATE_OFF, CTL_UUID_OFF = 0x000, 0x00C, 0x030, 0x288
STATE_RUNNING, STATE_DYING = 0, 3
PAGE_SIZE = 4096

QMP_SOCKET = "qmp.sock"
STATE_FILE = "device-model-state"
REGS_FILE = "device-model-regs"
LOCK_FILE = "device-model.lock"
LOG_FILE = "device-model.log"

# The device state: header, registers, sha256 of both.
STATE_MAGIC = b"PYXLDM01"
_HEADER = struct.Struct("<8sIIQ16sII")   # magic, version, nregs, counter, uuid, domid, 0
NREGS = 512
STATE_SIZE = _HEADER.size + 8 * NREGS + 32
#: How often the counter advances while guest and device model run.
TICK = 0.02
_MASK = (1 << 64) - 1

QEMU_VERSION = {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": "pyxl-sim"}


def initial_registers(uuid: bytes, domid: int) -> List[int]:
    return [int.from_bytes(hashlib.sha256(uuid + struct.pack("<II", domid, i)).digest()[:8],
                           "little") for i in range(NREGS)]


class DeviceState:
    """The registers and counter, and their serialisation (the "QEMU save file")."""

    def __init__(self, uuid: bytes, domid: int) -> None:
        self.uuid, self.domid = uuid, domid
        self.counter = 0
        self.logdirty = 0
        self.regs = initial_registers(uuid, domid)

    def tick(self) -> None:
        self.counter += 1
        i = self.counter % NREGS
        self.regs[i] = (self.regs[i] * 6364136223846793005 + self.counter) & _MASK

    def encode(self) -> bytes:
        # (log-dirty is a mode of the running device model, not migrated state)
        body = _HEADER.pack(STATE_MAGIC, 1, NREGS, self.counter, self.uuid, self.domid,
                            0) + struct.pack(f"<{NREGS}Q", *self.regs)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, blob: bytes) -> "DeviceState":
        if len(blob) != STATE_SIZE:
            raise ValueError(f"device state of {len(blob)} bytes, not {STATE_SIZE}")
        body, digest = blob[:-32], blob[-32:]
        if hashlib.sha256(body).digest() != digest:
            raise ValueError("device state checksum mismatch")
        magic, version, nregs, counter, uuid, domid, _ = _HEADER.unpack_from(body)
        if magic != STATE_MAGIC or version != 1 or nregs != NREGS:
            raise ValueError(f"not a device state: magic {magic!r}, version {version}")
        st = cls(uuid, domid)
        st.counter = counter
        st.regs = list(struct.unpack_from(f"<{NREGS}Q", body, _HEADER.size))
        return st


def write_atomically(path: str, data: bytes) -> None:
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def faults() -> Dict[str, str]:
    """``$PYXL_SIM_DM_FAULT`` as {kind: command}."""
    out: Dict[str, str] = {}
    for item in os.environ.get("PYXL_SIM_DM_FAULT", "").split(","):
        if item.strip():
            kind, _, cmd = item.strip().partition(":")
            out[kind] = cmd
    return out


def _ret(value: Any) -> Dict[str, Any]:
    return {"return": value}


def _err(cls: str, desc: str) -> Dict[str, Any]:
    return {"error": {"class": cls, "desc": desc}}


class _Conn:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.out = bytearray()
        self.fds: List[int] = []        # received with SCM_RIGHTS, not yet taken by add-fd
        self.negotiated = False
        self.hung = False
        self.fdsets: Set[int] = set()   # the fdsets this connection added


class DeviceModel:
    def __init__(self, domid: int, sim_dir: str, qmp: str) -> None:
        self.domid = domid
        self.domdir = os.path.join(sim_dir, f"d{domid}")
        self.qmp = qmp
        self.faults = faults()
        self.status = "running"
        self.sel = selectors.DefaultSelector()
        self.conns: Dict[int, _Conn] = {}
        self.fdsets: Dict[int, List[int]] = {}
        self.quit = False
        ctl = os.open(os.path.join(self.domdir, "ctl"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            self.ctl = mmap.mmap(ctl, PAGE_SIZE, prot=mmap.PROT_READ)
            self.ctl_ino = os.fstat(ctl).st_ino
        finally:
            os.close(ctl)
        if struct.unpack_from("<Q", self.ctl, CTL_MAGIC_OFF)[0] != CTL_MAGIC:
            raise SystemExit(f"{self.domdir}: not a simulated domain")
        uuid = bytes(self.ctl[CTL_UUID_OFF:CTL_UUID_OFF + 16])
        self.state = DeviceState(uuid, domid)
        self.listener: Optional[socket.socket] = None
        self.qmp_ino = -1
        self.lock_fd = -1

    # -- start-up --------------------------------------------------------------------------

    def lock(self) -> None:
        fd = os.open(os.path.join(self.domdir, LOCK_FILE), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(f"domain {self.domid} has a device model already") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.lock_fd = fd

    def listen(self) -> None:
        try:
            os.unlink(self.qmp)     # as QEMU does with a stale socket
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(self.qmp)
        self.qmp_ino = os.stat(self.qmp).st_ino
        sock.listen(16)
        sock.setblocking(False)
        self.listener = sock
        self.sel.register(sock, selectors.EVENT_READ, None)

    def load(self, fd: int) -> None:
        """``-incoming fd:N``: the saved state, all of it, from the inherited fd."""
        self.status = "inmigrate"
        parts, size = [], 0
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            parts.append(chunk)
            size += len(chunk)
            if size > STATE_SIZE:
                break
        os.close(fd)
        try:
            self.state = DeviceState.decode(b"".join(parts))
        except ValueError as exc:
            raise SystemExit(f"load of migration failed: {exc}") from None

    def running(self) -> None:
        """The run state becomes running: report it as QEMU reports it to XenStore."""
        self.status = "running"
        self.save_regs()
        write_atomically(os.path.join(self.domdir, STATE_FILE), b"running")

    def save_regs(self) -> None:
        write_atomically(os.path.join(self.domdir, REGS_FILE), self.state.encode())

    # -- the loop ----------------------------------------------------------------------------

    def domain_gone(self) -> bool:
        try:
            st = os.stat(os.path.join(self.domdir, "ctl"))
        except FileNotFoundError:
            return True
        state = struct.unpack_from("<I", self.ctl, CTL_STATE_OFF)[0]
        return st.st_ino != self.ctl_ino or state == STATE_DYING

    def serve(self) -> None:
        next_tick = time.monotonic() + TICK
        while not self.quit:
            for key, events in self.sel.select(max(0.0, next_tick - time.monotonic())):
                if key.data is None:
                    self.accept()
                else:
                    self.io(key.data, events)
            now = time.monotonic()
            if now >= next_tick:
                next_tick = now + TICK
                if self.domain_gone():
                    return
                guest = struct.unpack_from("<I", self.ctl, CTL_STATE_OFF)[0]
                if self.status == "running" and guest == STATE_RUNNING:
                    self.state.tick()
                    self.save_regs()

    def accept(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = _Conn(sock)
        self.conns[sock.fileno()] = conn
        self.sel.register(sock, selectors.EVENT_READ, conn)
        if "silent" in self.faults:
            return
        if "garbage-greeting" in self.faults:
            self.send_raw(conn, b"\x00\xffthis is not QMP\r\n")
            return
        self.send(conn, {"QMP": {"version": QEMU_VERSION, "capabilities": ["oob"]}})

    def io(self, conn: _Conn, events: int) -> None:
        if events & selectors.EVENT_WRITE:
            self.flush(conn)
        if not events & selectors.EVENT_READ or conn.sock.fileno() < 0:
            return
        try:
            data, anc, flags, _ = conn.sock.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        except BlockingIOError:
            return
        except OSError:
            data, anc = b"", []
        for level, kind, raw in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds = array.array("i")
                fds.frombytes(raw[:len(raw) - len(raw) % fds.itemsize])
                conn.fds.extend(fds)
        conn.buf += data
        while not conn.hung and b"\n" in conn.buf:
            nl = conn.buf.index(b"\n")
            line = bytes(conn.buf[:nl])
            del conn.buf[:nl + 1]
            if line.strip():
                self.request(conn, line)
        if not data or len(conn.buf) > 1 << 20:     # gone, or a line QEMU would refuse too
            self.drop(conn)

    def drop(self, conn: _Conn) -> None:
        """The client went away: its unused descriptors and fdsets go too (as in QEMU)."""
        self.conns.pop(conn.sock.fileno(), None)
        self.sel.unregister(conn.sock)
        conn.sock.close()
        for fd in conn.fds:
            os.close(fd)
        for fdset in conn.fdsets:
            for fd in self.fdsets.pop(fdset, []):
                os.close(fd)

    def send(self, conn: _Conn, msg: Dict[str, Any]) -> None:
        self.send_raw(conn, json.dumps(msg).encode() + b"\r\n")

    def send_raw(self, conn: _Conn, data: bytes) -> None:
        conn.out += data
        self.flush(conn)

    def flush(self, conn: _Conn) -> None:
        if conn.sock.fileno() < 0:
            return
        try:
            while conn.out:
                n = conn.sock.send(conn.out)
                del conn.out[:n]
        except BlockingIOError:
            pass
        except OSError:
            conn.out.clear()
        mask = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.out else 0)
        self.sel.modify(conn.sock, mask, conn)

    def event(self, name: str) -> None:
        now = time.time()
        msg = {"event": name, "data": {}, "timestamp": {"seconds": int(now),
                                                      "microseconds": int(now % 1 * 1e6)}}
        for conn in list(self.conns.values()):
            if conn.negotiated:
                self.send(conn, msg)

    # -- QMP commands ------------------------------------------------------------------------

    def request(self, conn: _Conn, line: bytes) -> None:
        try:
            msg = json.loads(line)
        except ValueError as exc:
            self.send(conn, _err("GenericError", f"JSON parse error, {exc}"))
            return
        if not isinstance(msg, dict) or not isinstance(msg.get("execute"), str):
            self.send(conn, _err("GenericError", "QMP input member 'execute' is missing"))
            return
        name, args, cid = msg["execute"], msg.get("arguments", {}), msg.get("id")
        # One line per command in the log: what a toolstack asked, in order.
        sys.stderr.write(f"qmp: {name} {json.dumps(args, sort_keys=True)}\n")
        sys.stderr.flush()
        if self.faults.get("die") == name:
            os._exit(3)
        if self.faults.get("hang") == name:
            conn.hung = True
            return
        if self.faults.get("garbage") == name:
            self.send_raw(conn, b"{\"return\": {}, \"id\": ]]] garbage\r\n")
            return
        if self.faults.get("error") == name:
            reply = _err("GenericError", f"injected failure of {name}")
        elif not isinstance(args, dict):
            reply = _err("GenericError", "QMP input member 'arguments' must be an object")
        elif not conn.negotiated and name != "qmp_capabilities":
            reply = _err("CommandNotFound",
                         "Expecting capabilities negotiation with 'qmp_capabilities'")
        else:
            try:
                reply = self.execute(conn, name, args)
            except (KeyError, TypeError, ValueError) as exc:
                reply = _err("GenericError", f"{name}: bad arguments: {exc}")
        if cid is not None:
            reply["id"] = cid
        self.send(conn, reply)

    def execute(self, conn: _Conn, name: str, args: Dict[str, Any]) -> Dict[str, Any]:
        if name == "qmp_capabilities":
            if conn.negotiated:
                return _err("CommandNotFound",
                            "Capabilities negotiation is already complete, command ignored")
            conn.negotiated = True
            return _ret({})
        if name == "query-status":
            return _ret({"status": self.status, "singlestep": False,
                         "running": self.status == "running"})
        if name == "stop":
            if self.status == "running":
                self.status = "paused"
                self.event("STOP")
            return _ret({})
        if name == "cont":
            if self.status != "running":
                self.running()
                self.event("RESUME")
            return _ret({})
        if name == "quit":
            self.quit = True
            return _ret({})
        if name == "xen-set-global-dirty-log":
            if not isinstance(args["enable"], bool):
                raise TypeError("'enable' is a bool")
            self.state.logdirty = int(args["enable"])
            return _ret({})
        if name == "add-fd":
            return self.add_fd(conn, args)
        if name == "remove-fd":
            fdset = int(args["fdset-id"])
            if fdset not in self.fdsets:
                return _err("GenericError", f"File descriptor named 'fdset-id:{fdset}' not found")
            for fd in self.fdsets.pop(fdset):
                os.close(fd)
            conn.fdsets.discard(fdset)
            return _ret({})
        if name == "query-fdsets":
            return _ret([{"fdset-id": n, "fds": [{"fd": fd} for fd in fds]}
                         for n, fds in sorted(self.fdsets.items())])
        if name == "xen-save-devices-state":
            return self.save_devices_state(str(args["filename"]), args.get("live", True))
        return _err("CommandNotFound", f"The command {name} has not been found")

    def add_fd(self, conn: _Conn, args: Dict[str, Any]) -> Dict[str, Any]:
        if not conn.fds:
            return _err("GenericError", "No file descriptor supplied via SCM_RIGHTS")
        fd = conn.fds.pop()
        for extra in conn.fds:
            os.close(extra)
        conn.fds.clear()
        if "fdset-id" in args:
            fdset = int(args["fdset-id"])
        else:
            fdset = next(n for n in range(len(self.fdsets) + 1) if n not in self.fdsets)
        self.fdsets.setdefault(fdset, []).append(fd)
        conn.fdsets.add(fdset)
        return _ret({"fdset-id": fdset, "fd": fd})

    def save_devices_state(self, filename: str, live: Any) -> Dict[str, Any]:
        if not isinstance(live, bool):
            raise TypeError("'live' is a bool")
        blob = self.state.encode()
        if filename.startswith("/dev/fdset/"):
            try:
                fds = self.fdsets[int(filename[len("/dev/fdset/"):])]
            except (KeyError, ValueError):
                return _err("GenericError", f"Could not open '{filename}': No such file or "
                                            "directory")
            fd = os.dup(fds[0])
        else:
            try:
                fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                             0o660)
            except OSError as exc:
                return _err("GenericError", f"Could not open '{filename}': {exc.strerror}")
        try:
            view = memoryview(blob)
            while view:
                view = view[os.write(fd, view):]
        except OSError as exc:
            return _err("GenericError", f"{filename}: {exc.strerror}")
        finally:
            os.close(fd)
        return _ret({})


def _daemonize() -> int:
    """Fork: the parent waits for the child's word (b"ok" or why not) and exits 0 or
    1 with it; the child, in a session of its own, gets the pipe's write end."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(w)
        msg = b""
        while True:
            chunk = os.read(r, 4096)
            if not chunk:
                break
            msg += chunk
        if msg == b"ok":
            os._exit(0)
        sys.stderr.write((msg.decode(errors="replace") or "device model died during start-up")
                         + "\n")
        os._exit(1)
    os.close(r)
    os.setsid()
    return w


USAGE = ("usage: devicemodel.py --domid D --sim-dir DIR --qmp PATH [--incoming fd:N] "
         "[--daemonize]")


class _Args:
    domid = -1
    sim_dir = ""
    qmp = ""
    incoming: "Optional[str]" = None
    daemonize = False


def _parse(argv: "List[str]") -> _Args:
    """The command line (no argparse: it would double the start-up time)."""
    args = _Args()
    it = iter(argv)
    try:
        for opt in it:
            if opt == "--domid":
                args.domid = int(next(it))
            elif opt == "--sim-dir":
                args.sim_dir = next(it)
            elif opt == "--qmp":
                args.qmp = next(it)
            elif opt == "--incoming":
                args.incoming = next(it)
            elif opt == "--daemonize":
                args.daemonize = True
            elif opt in ("-h", "--help"):
                print(USAGE)
                sys.exit(0)
            else:
                raise ValueError(f"unknown option {opt}")
    except (StopIteration, ValueError) as exc:
        sys.exit(f"{USAGE}\n{str(exc) or 'missing value'}")
    if args.domid < 0 or not args.sim_dir or not args.qmp:
        sys.exit(f"{USAGE}\n--domid, --sim-dir and --qmp are required")
    return args


def main(argv: "Optional[List[str]]" = None) -> "NoReturn":
    args = _parse(sys.argv[1:] if argv is None else argv)
    incoming = -1
    if args.incoming is not None:
        if not args.incoming.startswith("fd:") or not args.incoming[3:].isdigit():
            sys.exit(f"--incoming {args.incoming}: only fd:N is supported")
        incoming = int(args.incoming[3:])
    word = _daemonize() if args.daemonize else -1
    parent = os.getppid()

    def tell(msg: bytes) -> None:
        nonlocal word
        if word >= 0:
            os.write(word, msg)
            os.close(word)
            word = -1

    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(sig, lambda *_: sys.exit(0))
    dm: Optional[DeviceModel] = None
    status = 0
    try:
        dm = DeviceModel(args.domid, os.path.abspath(args.sim_dir), os.path.abspath(args.qmp))
        if word >= 0:
            log = os.open(os.path.join(dm.domdir, LOG_FILE),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.close(log)
        dm.lock()
        dm.listen()
        if incoming >= 0:
            tell(b"ok")
            if args.daemonize:
                # The launcher exits on our word; wait until it has, so that whoever
                # started it can reap it before this device model says it runs.
                deadline = time.monotonic() + 5
                while os.getppid() == parent and time.monotonic() < deadline:
                    time.sleep(0.0005)
            dm.load(incoming)
            if "never-ready" not in dm.faults:
                dm.running()
        else:
            dm.running()
            tell(b"ok")
        dm.serve()
    except SystemExit as exc:
        if exc.code not in (0, None):
            status = 1
            tell(str(exc.code).encode())
            sys.stderr.write(f"device model of domain {args.domid}: {exc.code}\n")
    except OSError as exc:
        status = 1
        tell(f"{exc}".encode())
        sys.stderr.write(f"device model of domain {args.domid}: {exc}\n")
    if dm is not None and dm.listener is not None:
        try:
            if os.stat(dm.qmp).st_ino == dm.qmp_ino:
                os.unlink(dm.qmp)       # ours still, not a successor's
        except OSError:
            pass
    sys.stderr.flush()
    os._exit(status)


if __name__ == "__main__":
    main()
