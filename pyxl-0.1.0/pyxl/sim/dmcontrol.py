"""The toolstack's side of fakexen's device model (:mod:`pyxl.sim.devicemodel`):
where its files are, starting it (with a guest, or on a saved state for a
restore), telling whether it runs or is ready, reading its state for the
digest, and killing it when its domain is destroyed.

A domain has a device model when its directory holds the QMP socket
(``dD/qmp.sock``); it is ready once ``dD/device-model-state`` says ``running``
(QEMU's XenStore ``device-model/D/state``), and alive while it holds the flock
of ``dD/device-model.lock`` (which holds its pid).
"""

from __future__ import annotations

import fcntl
import os
import stat
import sys
import time

from pyxl._text import shown
from pyxl.errors import DeviceModelError
from pyxl.sim.layout import _domdir, sim_dir_path

# typing is for mypy only (3 ms of `pyxl sim list`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional

__all__ = [
    "LOG_FILE", "QMP_SOCKET", "REGS_FILE", "STATE_FILE",
    "argv", "domain_dir", "has_device_model", "kill", "log_tail", "pid", "qmp_path", "ready",
    "read_state", "start",
]

#: The device model's files in its domain's directory: the names
#: pyxl/sim/devicemodel.py uses (tests/integration/test_devicemodel.py checks
#: they agree).  Not imported from there: it is a 600-line program that
#: `pyxl sim list` has no need to load.
QMP_SOCKET, STATE_FILE, REGS_FILE = "qmp.sock", "device-model-state", "device-model-regs"
LOCK_FILE, LOG_FILE = "device-model.lock", "device-model.log"
#: The device model program, run as a script (``python -I -S``).
PROGRAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "devicemodel.py")


def domain_dir(domid: int, sim_dir: Optional[str] = None) -> str:
    return _domdir(sim_dir_path(sim_dir), domid)


def qmp_path(domid: int, sim_dir: Optional[str] = None) -> str:
    return os.path.join(domain_dir(domid, sim_dir), QMP_SOCKET)


def has_device_model(domid: int, sim_dir: Optional[str] = None) -> bool:
    """Was the domain given a device model (whether or not it still runs)?"""
    return os.path.exists(qmp_path(domid, sim_dir))


def argv(domid: int, sim_dir: Optional[str] = None, incoming_fd: Optional[int] = None,
         daemonize: bool = True) -> List[str]:
    """The command line that runs the device model of ``domid`` (``python -I -S``:
    it imports nothing of pyxl, so it starts in tens of milliseconds)."""
    out = [sys.executable, "-I", "-S", PROGRAM, "--domid", str(domid),
           "--sim-dir", sim_dir_path(sim_dir), "--qmp", qmp_path(domid, sim_dir)]
    if incoming_fd is not None:
        out += ["--incoming", f"fd:{incoming_fd}"]
    if daemonize:
        out.append("--daemonize")
    return out


def start(domid: int, sim_dir: Optional[str] = None, timeout: float = 30.0) -> None:
    """Start a fresh device model for ``domid`` and return once it runs (its launcher
    exits then; the device model lives on in a session of its own)."""
    import subprocess
    try:
        r = subprocess.run(argv(domid, sim_dir), stdin=subprocess.DEVNULL, capture_output=True,
                           text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        kill(domain_dir(domid, sim_dir))
        raise DeviceModelError(f"domain {domid}: its device model did not start within "
                               f"{timeout:g}s") from None
    if r.returncode != 0:
        msg = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
        raise DeviceModelError(f"domain {domid}: cannot start its device model: {msg[0]}")


def pid(domdir: str) -> Optional[int]:
    """The pid of the device model running in ``domdir``, None if none runs."""
    fd = _open_regular(os.path.join(domdir, LOCK_FILE))
    if fd is None:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 32, 0)
            try:
                found = int(raw.decode().strip())
            except ValueError:
                return -1           # between taking the lock and writing its pid
            return found if found > 1 else -1     # never our group (0) nor init
        return None
    finally:
        os.close(fd)


def _open_regular(path: str) -> "Optional[int]":
    """An fd of ``path`` (None: there is none), a regular file of the state
    directory, opened without following a symlink or waiting on a FIFO: the
    device model writes there, and its files are read from the loop."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise DeviceModelError(f"{path}: {exc.strerror}") from exc
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise DeviceModelError(f"{path} is not a regular file")
    return fd


def _read_small(path: str, limit: int) -> "Optional[bytes]":
    """At most ``limit`` bytes of a regular file of the state directory (None: none)."""
    fd = _open_regular(path)
    if fd is None:
        return None
    try:
        return os.pread(fd, limit, 0)
    finally:
        os.close(fd)


def kill(domdir: str, grace: float = 1.0) -> None:
    """Stop the device model of ``domdir`` (SIGTERM, SIGKILL after ``grace``) and wait,
    bounded, until it is gone.  Nothing to do if none runs."""
    import signal   # here, not at the top: `pyxl sim list` starts faster
    deadline = time.monotonic() + grace
    sig = signal.SIGTERM
    while True:
        p = pid(domdir)
        if p is None:
            return
        if p > 0:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass
        if time.monotonic() > deadline:
            if sig == signal.SIGKILL:
                raise DeviceModelError(f"{domdir}: the device model [{p}] would not die")
            sig, deadline = signal.SIGKILL, time.monotonic() + 5.0
        time.sleep(0.002)


def _says_running(domdir: str) -> bool:
    return _read_small(os.path.join(domdir, STATE_FILE), 64) == b"running"


def ready(domdir: str) -> bool:
    """Has the device model of ``domdir`` reported that it runs?  Raises
    :class:`~pyxl.errors.DeviceModelError` when no device model runs there (it
    exited, e.g. on a state it could not load), with its log's last line."""
    if _says_running(domdir):
        return True
    if pid(domdir) is None:
        # It may have become ready just before it exited: look once more.
        if _says_running(domdir):
            return True
        tail = log_tail(domdir)
        raise DeviceModelError("the device model is not running"
                               + (f": {tail}" if tail else ""))
    return False


def log_tail(domdir: str) -> str:
    """The last line of the device model's log ('' if none)."""
    try:
        fd = _open_regular(os.path.join(domdir, LOG_FILE))
        if fd is None:
            return ""
        try:
            size = os.fstat(fd).st_size
            tail = os.pread(fd, 4096, max(0, size - 4096))
        finally:
            os.close(fd)
    except (OSError, DeviceModelError):
        return ""
    lines = tail.decode(errors="replace").strip().splitlines()
    return shown(lines[-1], 300) if lines else ""     # the device model's words


def read_state(domdir: str) -> Optional[bytes]:
    """The device model's current state (what ``xen-save-devices-state`` would write),
    or None for a domain that never had one."""
    return _read_small(os.path.join(domdir, REGS_FILE), 1 << 20)
