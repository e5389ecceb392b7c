"""An HVM guest's device model on a Xen host, as libxl drives Debian's QEMU.

:func:`device_model` makes the domain's QEMU a
:class:`~pyxl.backends.devicemodel.QmpDeviceModel` (QMP steps: log-dirty,
save, ``cont``, start on a saved state) with libxl's paths: QMP socket
``/var/run/xen/qmp-libxl-D``, physmap keys under
``/local/domain/0/device-model/D``, and killed with SIGHUP by the pid in
``/local/domain/D/image/device-model-pid``.  Its state goes through anonymous
files, not libxl's ``/var/lib/xen/qemu-save.D`` (see the devicemodel module).
It works for a QEMU xl started as well as for pyxl's.

Restore (libxl_create.c domcreate_launch_dm, libxl_dm.c libxl__spawn_local_dm),
:class:`DeviceModelStart`:

1. ``hvmloader/bios``, ``hvmloader/allow-memory-relocate`` and the
   device-model directory are written; the stream's EMULATOR_XENSTORE_DATA
   keys go under it and its EMULATOR_CONTEXT to an anonymous file;
2. QEMU is started with :func:`pyxl.backends.qemu_args.device_model_command`
   and ``-incoming fd:N`` on that file, by :mod:`pyxl.spawn`'s spawner (the
   loop does not wait for the fork and exec) in a session of its own, stdin
   /dev/null, output to
   ``/var/log/xen/qemu-dm-NAME.log`` (rotated as libxl_create_logfile), its
   pid recorded in XenStore once the spawner has answered;
3. it is ready when it writes ``running`` to ``device-model/D/state``
   (within 60 s): a XenStore watch on the loop; its early exit fails the start
   at once (a pidfd);
4. :class:`ChardevPostconfig`: its serial ptys are published in XenStore.

Destroy (libxl__destroy_device_model, libxl__qmp_cleanup):
:func:`destroy_device_model` removes the device-model directory, sends QEMU
SIGHUP and unlinks both QMP sockets; :func:`remove_state_files` the
qemu-save/qemu-resume files libxl (an xl save of the domain) may have left.

May import: pyxl.backends.base, pyxl.backends.devicemodel, pyxl.backends.qemu_args,
pyxl.backends.xenstore, pyxl.backends.xsasync, pyxl.backends.xswatch, pyxl.errors, pyxl.loop,
pyxl.qmp, pyxl.spawn.
"""

from __future__ import annotations

import os
import signal
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pyxl._log import get_logger
from pyxl._text import shown
from pyxl.backends import qemu_args
from pyxl.backends.base import Cancellable, EmulatorRecord
from pyxl.backends.devicemodel import (DEFAULT_MAX_EMULATOR_CONTEXT, QmpDeviceModel,
                                       emulator_xenstore_data)
from pyxl.backends.xenstore import (XS_DIRECTORY, XS_MKDIR, XS_READ, XS_RM, XS_WRITE, XenStore,
                                    check_batch)
from pyxl.backends.xsasync import XsScript, XsTask, entries, missing, ok, reason
from pyxl.backends.xswatch import XsWait, node_is
from pyxl.errors import DeviceModelError
from pyxl.loop import Loop
from pyxl.qmp import QmpClient
from pyxl.spawn import Child

__all__ = ["ChardevPostconfig", "DeviceModelStart", "LIB_DIR", "LOG_DIR", "START_TIMEOUT",
           "start_timeout", "forget_device_model", "destroy_device_model", "device_model",
           "dm_path", "physmap", "writes", "remove_state_files"]

_log = get_logger("pyxl.xen")

LIB_DIR = "/var/lib/xen"
LOG_DIR = "/var/log/xen"
#: LIBXL_DEVICE_MODEL_START_TIMEOUT (libxl's is compiled in; ours can be raised
#: for slow hosts, e.g. Xen under emulation: $PYXL_DM_START_TIMEOUT seconds)
START_TIMEOUT = 60.0


def start_timeout() -> float:
    """Seconds QEMU gets to start: $PYXL_DM_START_TIMEOUT, else libxl's 60."""
    raw = os.environ.get("PYXL_DM_START_TIMEOUT", "")
    try:
        value = float(raw) if raw else START_TIMEOUT
    except ValueError:
        value = START_TIMEOUT
    return value if value > 0 else START_TIMEOUT


def dm_path(domid: int) -> str:
    """The device model's XenStore directory (DEVICE_MODEL_XS_PATH, dom0's QEMU)."""
    return f"/local/domain/0/device-model/{domid}"


def _open_log(name: str) -> int:
    """libxl_create_logfile + libxl__create_qemu_logfile: ``NAME.log`` in
    LOG_DIR, the old ones rotated to .1 ... .10; opened for appending."""
    path = os.path.join(LOG_DIR, f"{name}.log")
    if os.path.exists(path):
        for i in range(9, 0, -1):
            try:
                os.rename(f"{path}.{i}", f"{path}.{i + 1}")
            except FileNotFoundError:
                pass
        os.rename(path, f"{path}.1")
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)


def _log_tail(name: str, lines: int = 5) -> str:
    try:
        with open(os.path.join(LOG_DIR, f"{name}.log"), "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            tail = f.read().decode(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    # QEMU's own words (its guest's first target): escaped for logs and terminals
    return "; its log ends: " + shown(" | ".join(tail), 600) if tail else ""


def physmap(domid: int) -> XsScript[Dict[str, str]]:
    """The ``physmap/<id>/{start_addr,size,name}`` keys QEMU keeps under its
    XenStore directory (only with Xen < 4.10's interface), for the
    EMULATOR_XENSTORE_DATA record (libxl__save_emulator_xenstore_data); a
    missing subkey is an error, as in libxl.  Two rounds."""
    base = dm_path(domid)
    [listing] = yield [(XS_DIRECTORY, f"{base}/physmap\0".encode(), 0)]
    names = [] if missing(listing) else entries(ok(listing))
    keys = [f"physmap/{e}/{sub}" for e in names for sub in ("start_addr", "size", "name")]
    replies = yield [(XS_READ, f"{base}/{k}\0".encode(), 0) for k in keys]
    out: Dict[str, str] = {}
    for key, reply in zip(keys, replies):
        if missing(reply):
            raise DeviceModelError(f"{base}/{key} is missing")
        out[key] = ok(reply).decode(errors="replace")
    return out


def writes(values: Sequence[Tuple[str, str]]) -> XsScript[None]:
    """One round writing ``values`` [(path, value)] (the first refusal raised)."""
    requests = [(XS_WRITE, f"{path}\0{value}".encode(), 0) for path, value in values]
    check_batch(requests, (yield requests))


#: Serial ports of a device model whose ptys pyxl publishes, at most (QEMU has 4).
MAX_SERIAL_PORTS = 32


def device_model(domid: int, ready: Optional[Callable[[], bool]] = None,
                 ready_timeout: Optional[float] = None,
                 kill: Optional[Callable[[], None]] = None,
                 xenstore_data: Optional[Dict[str, str]] = None,
                 max_state: int = DEFAULT_MAX_EMULATOR_CONTEXT) -> QmpDeviceModel:
    """The domain's QEMU as a :class:`QmpDeviceModel`: libxl's QMP socket;
    ``xenstore_data``: its physmap keys, read beforehand (a save); ``max_state``:
    the backend's bound (:func:`~pyxl.backends.devicemodel.state_bound`)."""
    return QmpDeviceModel(domid, qemu_args.qmp_path(domid), max_state=max_state,
                          ready=ready, kill=kill,
                          xenstore_data=None if xenstore_data is None else lambda: xenstore_data,
                          ready_timeout=start_timeout() if ready_timeout is None else ready_timeout,
                          logger=get_logger(f"pyxl.domain.{domid}"))


def _prepare(domid: int, bios: str, records: Sequence[EmulatorRecord]) -> XsScript[None]:
    """What QEMU reads at its start, in one round: hvmloader's two keys, its
    own directory and the stream's physmap keys in it."""
    dom = f"/local/domain/{domid}"
    requests = [(XS_WRITE, f"{dom}/hvmloader/bios\0{bios}".encode(), 0),
                # qemu-xen: no memory relocation by hvmloader (a larger MMIO hole instead)
                (XS_WRITE, f"{dom}/hvmloader/allow-memory-relocate\0" "0".encode(), 0),
                (XS_MKDIR, f"{dm_path(domid)}\0".encode(), 0)]
    requests += [(XS_WRITE, f"{dm_path(domid)}/{k}\0{v}".encode(), 0)
                 for k, v in emulator_xenstore_data(records).items()]
    check_batch(requests, (yield requests))


class DeviceModelStart:
    """Start QEMU on a restored HVM domain's saved state; ``done(ok, why)`` once
    it runs (or not), from the loop.

    :meth:`QmpDeviceModel.start_restore` writes the state file, spawns QEMU on
    it (here: libxl's argv, log and session) and checks readiness; readiness
    here is a flag set by a XenStore watch on ``device-model/D/state`` (its
    own connection, on the loop), so the check reads no XenStore itself.
    ``procs`` gets the QEMU :class:`~pyxl.spawn.Child` (for a destroy whose
    pid is not on record)."""

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], domid: int,
                 config: Dict[str, Any], records: List[Tuple[int, bytes]],
                 done: Callable[[bool, str], None], procs: Dict[int, Child],
                 timeout: Optional[float] = None) -> None:
        self.domid, self.config = domid, config
        self.done_cb, self.procs = done, procs
        self.name = f"qemu-dm-{(config.get('c_info') or {}).get('name') or domid}"
        self.running = self.spawned = self.pid_recorded = False
        self.watch_failed: Optional[str] = None
        self.finished = False
        self.wait: Optional[XsWait] = None
        timeout = start_timeout() if timeout is None else timeout
        self.loop, self.opener, self.records = loop, opener, records
        self.pid_write: Optional[XsTask[None]] = None
        self.ended: Optional[Tuple[Optional[DeviceModelError]]] = None
        self.dm = device_model(domid, self._ready, timeout, kill=self._kill)
        state = f"{dm_path(domid)}/state"

        def watched(ok: bool, why: str) -> None:
            self.running, self.watch_failed = ok, None if ok else why

        # The device model's own timeout ends the start; the watch outlives it a little.
        self.wait = XsWait(loop, opener, [state], node_is(state, b"running"), timeout + 5,
                           watched,
                           f"domain {domid}'s device model (waiting for {state} = running)")
        bios = str(((config.get("b_info") or {}).get("type.hvm") or {}).get("bios")
                   or "seabios")
        self.step: Cancellable = XsTask(loop, opener, _prepare(domid, bios.lower(), records),
                                        self._prepared, f"domain {domid}'s device model nodes")

    def _prepared(self, exc: Optional[Exception]) -> None:
        if exc is not None:
            self._finish(DeviceModelError(f"cannot start the device model: {reason(exc)}"))
            return
        self.step = self.dm.start_restore(self.loop, self.records, self._spawn, self._finish)

    def _kill(self) -> None:
        """libxl__kill_xs_path's SIGHUP, to the pid we recorded (if it is still ours)."""
        proc = self.procs.get(self.domid)
        if proc is not None:
            proc.signal(signal.SIGHUP)      # a no-op once it has gone

    def _ready(self) -> bool:
        if self.watch_failed is not None:
            raise DeviceModelError(self.watch_failed)
        return self.running

    def _spawn(self, state_fd: int, exited: Callable[[Optional[int]], None]) -> Child:
        domid = self.domid
        cmd = qemu_args.device_model_command(self.config, domid, state_fd, dict(os.environ))
        log_fd = _open_log(self.name)
        try:
            _log.info("domain %d: starting its device model: %s", domid, " ".join(cmd.argv))
            proc = Child(self.loop, cmd.argv, exited, env=dict(os.environ, **cmd.env),
                         fds={state_fd: state_fd, 1: log_fd, 2: log_fd}, new_session=True,
                         started=lambda: self._started(proc))
        finally:
            os.close(log_fd)
        self.procs[domid] = proc
        self.spawned = True
        return proc

    def _started(self, proc: Child) -> None:
        """The spawner has answered: QEMU's pid goes on record (xl's destroy reads it)."""
        if self.finished:
            return
        self.pid_write = XsTask(self.loop, self.opener,
                                writes([(f"/local/domain/{self.domid}/image/device-model-pid",
                                         str(proc.pid))]),
                                self._pid_written, f"domain {self.domid}'s device-model-pid")

    def _pid_written(self, exc: Optional[Exception]) -> None:
        self.pid_write = None
        if exc is not None:     # xl's destroy would not find QEMU: the start fails
            self.step.cancel()
            self._finish(DeviceModelError(f"cannot record the device model's pid: "
                                          f"{reason(exc)}"))
            return
        self.pid_recorded = True
        if self.ended is not None:
            self._finish(*self.ended)

    def cancel(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.wait is not None:
            self.wait.cancel()
        if self.pid_write is not None:
            self.pid_write.cancel()
        self.step.cancel()

    def _finish(self, err: Optional[DeviceModelError]) -> None:
        if self.finished:
            return
        if err is None and not self.pid_recorded:
            self.ended = (err,)     # running once its pid is on record
            return
        self.finished = True
        if self.pid_write is not None:
            self.pid_write.cancel()
        if self.wait is not None:
            self.wait.cancel()
        if err is None:
            _log.info("domain %d: device model running", self.domid)
            self.done_cb(True, "")
            return
        self.done_cb(False, f"{err}{_log_tail(self.name) if self.spawned else ''}")


class ChardevPostconfig:
    """libxl's device_model_postconfig_chardev, once QEMU runs: QMP
    ``query-chardev``, and each ``serialN`` on a pty published as
    ``/local/domain/D/serial/N/tty`` (for ``xl console -t serial``, one round
    on the loop).  ``done(ok, why)`` from the loop."""

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], domid: int,
                 done: Callable[[bool, str], None], timeout: float = 10.0) -> None:
        self.loop, self.opener, self.domid, self._done = loop, opener, domid, done
        self.finished = False
        self.publish: Optional[XsTask[None]] = None
        self.client = QmpClient(loop, qemu_args.qmp_path(domid), timeout=timeout)
        self.client.connect(lambda err: None)      # a failure reaches the command
        self.client.command("query-chardev", None, self._answered)

    def _answered(self, value: Any, err: Optional[DeviceModelError]) -> None:
        if self.finished:
            return
        self.client.close()
        if err is not None:
            self._end(False, f"QMP query-chardev: {err}")
            return
        ttys: List[Tuple[str, str]] = []
        try:
            for item in value if isinstance(value, list) else []:
                label, filename = str(item.get("label", "")), str(item.get("filename", ""))
                port = label[len("serial"):]
                if not label.startswith("serial"):
                    continue
                # The device model's words: ASCII digits only (str.isdigit takes
                # "²" and "١"), and a bounded number of ports to publish.
                if not (port.isascii() and port.isdigit() and len(port) <= 4) \
                        or len(ttys) >= MAX_SERIAL_PORTS or len(filename) > 4096:
                    self._end(False, f"QMP query-chardev: invalid serial port {label[:40]!r}")
                    return
                if filename.startswith("pty:"):
                    ttys.append((f"/local/domain/{self.domid}/serial/{int(port)}/tty",
                                 filename[len("pty:"):]))
        except AttributeError as exc:
            self._end(False, f"QMP query-chardev: {exc}")
            return

        def published(exc: Optional[Exception]) -> None:
            self.publish = None
            self._end(exc is None, "" if exc is None else
                      f"publishing the serial ptys: {reason(exc)}")
        self.publish = XsTask(self.loop, self.opener, writes(ttys), published,
                              f"domain {self.domid}'s serial ptys")

    def _end(self, ok: bool, why: str) -> None:
        self.cancel()
        self._done(ok, why)

    def cancel(self) -> None:
        self.finished = True
        self.client.close()
        if self.publish is not None:
            self.publish.cancel()
            self.publish = None


def forget_device_model(domid: int) -> XsScript[Optional[int]]:
    """libxl__destroy_device_model's XenStore part, in one round: the
    device-model directory goes, and the pid QEMU's spawner recorded is read
    (None if there is none)."""
    replies = yield [(XS_RM, f"{dm_path(domid)}\0".encode(), 0),
                     (XS_READ, f"/local/domain/{domid}/image/device-model-pid\0".encode(), 0)]
    if not missing(replies[0]):
        ok(replies[0])
    raw = None if missing(replies[1]) else ok(replies[1]).strip()
    pid = int(raw) if raw and raw.isdigit() and len(raw) <= 10 else None
    # 0 would signal our own process group, 1 init: never a device model's
    return pid if pid is not None and pid > 1 else None


def destroy_device_model(domid: int, pid: Optional[int],
                         procs: Optional[Dict[int, Child]] = None) -> None:
    """The rest of libxl__destroy_device_model + libxl__qmp_cleanup for a
    dom0 QEMU, once :func:`forget_device_model` gave its ``pid``: SIGHUP,
    the QMP sockets unlinked, our exited QEMUs forgotten (the loop reaped them)."""
    proc = (procs or {}).get(domid)
    if proc is not None and proc.running and pid in (None, proc.pid):
        proc.signal(signal.SIGHUP)     # ours: through its pidfd, never a reused pid
    elif pid is not None:
        try:
            os.kill(pid, signal.SIGHUP)
        except ProcessLookupError:
            _log.info("domain %d: its device model had exited already", domid)
    for path in qemu_args.qmp_paths(domid):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.error("domain %d: cannot remove QMP socket %s: %s", domid, path, exc.strerror)
    if procs:
        for d, other in list(procs.items()):
            if not other.poll():        # reaped now, if its loop no longer runs
                del procs[d]


def remove_state_files(domid: int) -> None:
    """devices_destroy_cb: the device model's save and restore files that libxl
    (an xl save or restore of the domain) may have left.  pyxl's own never have
    a name: they are anonymous files (see the module's docstring)."""
    for name in (f"qemu-save.{domid}", f"qemu-resume.{domid}"):
        path = os.path.join(LIB_DIR, name)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            _log.error("domain %d: cannot remove %s: %s", domid, path, exc.strerror)
