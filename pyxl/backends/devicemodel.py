"""A guest's device model driven over QMP, as libxl 4.17 drives qemu-xen.

:class:`QmpDeviceModel` is one domain's device model, for any backend whose
guests have one: :class:`~pyxl.backends.sim.SimBackend` (fakexen's simulated
device model) and a real-Xen backend (Debian's ``qemu-system-xen``).  What
differs between them is given to it: the paths (QMP socket, the save and
restore files), how to start the process (``spawn``), how to tell it is ready
(``ready``: fakexen's state file, or XenStore's ``device-model/D/state``), and
how to kill it (``kill``).

* :meth:`~QmpDeviceModel.start_logdirty`: ``xen-set-global-dirty-log``.
* :meth:`~QmpDeviceModel.start_save`: ``stop``; an anonymous file (memfd)
  passed write-only with ``add-fd`` (SCM_RIGHTS); ``xen-save-devices-state``
  to ``/dev/fdset/N``; ``remove-fd``; the file read back through pyxl's own
  descriptor of it, at most ``max_state`` bytes -> the libxl records
  ``EMULATOR_XENSTORE_DATA`` (only if there are physmap keys) and
  ``EMULATOR_CONTEXT`` (u32 id 2 = QEMU upstream, u32 index 0, the file).
* :meth:`~QmpDeviceModel.start_restore`: the ``EMULATOR_CONTEXT`` blob written
  to an anonymous file; the device model spawned on it (``-incoming fd:N``,
  the fd inherited) as a :class:`pyxl.spawn.Child`, so the loop never waits
  for its fork and exec; its readiness polled on a timer, bounded (libxl:
  60 s); its early exit seen through the child's pidfd.

libxl names the two files in ``/var/lib/xen`` and QEMU opens the save file
by name.  pyxl's are nameless: a device model is the guest's first target,
and one that can write where the files are named (fakexen's, or a QEMU run
as another user) could otherwise swap a name for a symlink or a FIFO between
pyxl's looks -- and have pyxl (root) truncate any file and hand it over,
copy any file into the image, or wait forever on the loop.  The state is
bounded as a restore bounds it (:func:`state_bound`): a save never writes an
image no restore would take.
* :meth:`~QmpDeviceModel.start_resume` / :meth:`~QmpDeviceModel.resume`: ``cont``.
* :meth:`~QmpDeviceModel.teardown`: kill it, remove its socket and files.

Each QMP step opens its own connection (as libxl's ``libxl__ev_qmp`` does), so
steps may run on different loops.  Everything is asynchronous on the loop -- fd
watches and timers; the only synchronous work is reading and writing the
bounded state in memory-backed files, and :meth:`~QmpDeviceModel.resume` for
synchronous callers.
Failures are :class:`pyxl.errors.DeviceModelError`\\ s.

May import: pyxl.errors, pyxl.loop, pyxl.qmp, pyxl.spawn, pyxl.backends.base.
"""

from __future__ import annotations

import logging
import os
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Set

from pyxl._log import get_logger
from pyxl.backends.base import Cancellable, EmulatorRecord
from pyxl.errors import DeviceModelError, os_error_text
from pyxl.loop import Loop, Timer, run_private
from pyxl.qmp.client import QmpClient
from pyxl.qmp.codec import QmpTimeout
from pyxl.spawn import Child

__all__ = [
    "DEFAULT_MAX_EMULATOR_CONTEXT", "DeviceModelStartError", "DeviceModelTimeout", "DmDone",
    "DmSaved", "EMULATOR_CONTEXT", "EMULATOR_QEMU_UPSTREAM", "EMULATOR_XENSTORE_DATA",
    "QmpDeviceModel", "Readiness", "Spawn", "emulator_context", "emulator_records",
    "emulator_xenstore_data", "state_bound",
]

#: libxl's record types for the device model (libxl_sr_stream_format.h).
EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT = 2, 3
#: libxl's emulator id for qemu-xen (upstream QEMU).
EMULATOR_QEMU_UPSTREAM = 2
_EMU_HDR = struct.Struct("<II")
#: Largest device-model state (EMULATOR_CONTEXT) saved or restored, unless the
#: backend declares ``max_emulator_context`` (QEMU's for a Xen HVM guest: some KiB).
DEFAULT_MAX_EMULATOR_CONTEXT = 4 << 20
#: The longest a failed start waits for its killed device model to be reaped
#: before it is told (a process stuck in the kernel must not hold the restore).
REAP_WAIT = 5.0


def state_bound(backend: Any) -> int:
    """The backend's ``max_emulator_context`` (bytes) if it declares one, else
    :data:`DEFAULT_MAX_EMULATOR_CONTEXT`: the one bound of a save and a restore."""
    declared = getattr(backend, "max_emulator_context", None)
    if isinstance(declared, int) and not isinstance(declared, bool) and declared > 0:
        return declared
    return DEFAULT_MAX_EMULATOR_CONTEXT

#: ``done(err)``: None when the step succeeded.
DmDone = Callable[[Optional[DeviceModelError]], None]
#: ``done(records, err)``: the libxl records of the saved state, or None and why not.
DmSaved = Callable[[Optional[List[EmulatorRecord]], Optional[DeviceModelError]], None]
#: ``spawn(fd, exited)``: start the device model on the saved state readable at
#: ``fd`` (``-incoming fd:N``: the child gets it under that number), as a
#: :class:`~pyxl.spawn.Child` whose ``exited(status)`` is the one given.  The
#: process may stay a child (QEMU) or exit 0 once it has daemonized (fakexen's).
Spawn = Callable[[int, Callable[[Optional[int]], None]], Child]
#: ``ready()``: has the device model reported that it runs?  Raises
#: DeviceModelError when it can tell it never will.
Readiness = Callable[[], bool]


class DeviceModelStartError(DeviceModelError):
    """The device model did not start on the saved state (it exited, or its
    readiness check says it failed)."""


class DeviceModelTimeout(DeviceModelStartError):
    """The device model was not ready within the time allowed."""


# ---- libxl's emulator records -----------------------------------------------------------------


def emulator_records(blob: bytes, xenstore: Optional[Dict[str, str]] = None
                     ) -> List[EmulatorRecord]:
    """The libxl records for a saved device model: EMULATOR_XENSTORE_DATA (only for
    a non-empty ``xenstore``, keys relative to ``/local/domain/0/device-model/D/``)
    then EMULATOR_CONTEXT."""
    hdr = _EMU_HDR.pack(EMULATOR_QEMU_UPSTREAM, 0)
    out: List[EmulatorRecord] = []
    if xenstore:
        kv = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in xenstore.items())
        out.append((EMULATOR_XENSTORE_DATA, hdr + kv))
    out.append((EMULATOR_CONTEXT, hdr + blob))
    return out


def _emulator_body(rtype: int, body: bytes) -> bytes:
    what = "EMULATOR_CONTEXT" if rtype == EMULATOR_CONTEXT else "EMULATOR_XENSTORE_DATA"
    if len(body) < _EMU_HDR.size:
        raise DeviceModelError(f"{what} record of {len(body)} bytes has no emulator header")
    emu, index = _EMU_HDR.unpack_from(body)
    if emu != EMULATOR_QEMU_UPSTREAM or index != 0:
        raise DeviceModelError(f"{what} record for emulator {emu} index {index}, not "
                               f"qemu-xen ({EMULATOR_QEMU_UPSTREAM}) index 0")
    return body[_EMU_HDR.size:]


def _one(records: Sequence[EmulatorRecord], rtype: int) -> Optional[bytes]:
    found = [body for t, body in records if t == rtype]
    if len(found) > 1:
        raise DeviceModelError(f"{len(found)} emulator records of type {rtype}, not one")
    return _emulator_body(rtype, found[0]) if found else None


def emulator_context(records: Sequence[EmulatorRecord]) -> Optional[bytes]:
    """The device model's saved state in a stream's libxl records (None: there is
    none).  Raises DeviceModelError for a record that is not qemu-xen's."""
    return _one(records, EMULATOR_CONTEXT)


def emulator_xenstore_data(records: Sequence[EmulatorRecord]) -> Dict[str, str]:
    """The EMULATOR_XENSTORE_DATA keys (relative to ``device-model/D/``), checked as
    libxl checks them: NUL-terminated pairs, no empty or absolute key."""
    body = _one(records, EMULATOR_XENSTORE_DATA)
    if not body:
        return {}
    if not body.endswith(b"\0"):
        raise DeviceModelError("EMULATOR_XENSTORE_DATA is not NUL-terminated")
    parts = body[:-1].split(b"\0")
    if len(parts) % 2:
        raise DeviceModelError("EMULATOR_XENSTORE_DATA has a key without a value")
    out: Dict[str, str] = {}
    for k, v in zip(parts[::2], parts[1::2]):
        if not k or k.startswith(b"/"):
            raise DeviceModelError(f"EMULATOR_XENSTORE_DATA key {k!r} is empty or absolute")
        out[k.decode(errors="replace")] = v.decode(errors="replace")
    return out


# ---- one step in flight -----------------------------------------------------------------------


class _Step:
    """A started step: its QMP client, timers and files, undone by :meth:`cancel`."""

    def __init__(self, owner: "QmpDeviceModel", loop: Loop) -> None:
        self.owner, self.loop = owner, loop
        self.client: Optional[QmpClient] = None
        self.timers: List[Timer] = []
        self.fds: List[int] = []         # closed by release()
        self.finished = False
        self.child: Optional[Child] = None
        owner._steps.add(self)

    def qmp(self, on_lost: Callable[[DeviceModelError], None]) -> QmpClient:
        o = self.owner
        self.client = QmpClient(self.loop, o.qmp_path, timeout=o.qmp_timeout, on_lost=on_lost)
        self.client.connect(lambda err: None)   # a failure reaches the queued commands
        return self.client

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        def fire() -> None:
            self.timers.remove(timer)
            fn()
        timer = self.loop.call_later(delay, fire)
        self.timers.append(timer)

    def release(self) -> None:
        """Everything but the child: client, timers, fds."""
        self.finished = True
        self.owner._steps.discard(self)
        if self.client is not None:
            self.client.close()
            self.client = None
        for t in self.timers:
            t.cancel()
        self.timers.clear()
        for fd in self.fds:
            os.close(fd)
        self.fds.clear()

    def take(self, fd: int) -> None:
        """Close ``fd`` now (it is no longer this step's)."""
        self.fds.remove(fd)
        os.close(fd)

    def kill_child(self) -> None:
        """SIGKILL through its pidfd (delivered once the spawner has answered,
        if it has not yet); the child is reaped from the loop when it goes."""
        if self.child is not None:
            self.child.forget()
            self.child.kill()

    def cancel(self) -> None:
        if self.finished:
            return
        self.release()
        self.kill_child()
        self.owner._kill_quietly()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


class QmpDeviceModel:
    """One domain's device model, over QMP.

    ``qmp_path``: its QMP socket.  ``max_state``: the most device state a save
    takes (:func:`state_bound`).  ``ready``: the readiness check polled after a restore
    spawn.  ``kill``: stop the device model however it runs (a daemon's pid file,
    XenStore's ``image/device-model-pid``); called by :meth:`teardown` and after a
    failed restore.  ``xenstore_data()``: the physmap keys to save (none: no
    EMULATOR_XENSTORE_DATA record); ``write_xenstore_data(keys)``: where a
    restore puts them.  ``qmp_timeout`` bounds connecting and each command (libxl:
    10 s), ``save_timeout`` ``xen-save-devices-state``, ``ready_timeout`` the
    start on a saved state (libxl: 60 s).
    """

    def __init__(self, domid: int, qmp_path: str, *, max_state: int = DEFAULT_MAX_EMULATOR_CONTEXT,
                 ready: Optional[Readiness] = None, kill: Optional[Callable[[], None]] = None,
                 xenstore_data: Optional[Callable[[], Dict[str, str]]] = None,
                 write_xenstore_data: Optional[Callable[[Dict[str, str]], None]] = None,
                 qmp_timeout: float = 10.0, save_timeout: float = 60.0,
                 ready_timeout: float = 60.0, logger: Optional[logging.Logger] = None) -> None:
        self.domid = domid
        self.qmp_path, self.max_state = qmp_path, max_state
        self.ready, self.kill = ready, kill
        self.xenstore_data, self.write_xenstore_data = xenstore_data, write_xenstore_data
        self.qmp_timeout, self.save_timeout = qmp_timeout, save_timeout
        self.ready_timeout = ready_timeout
        self.logger = logger or get_logger(f"pyxl.domain.{domid}")
        #: The device model process, while it is this object's child (a spawned QEMU).
        self.child: Optional[Child] = None
        self._steps: Set[_Step] = set()

    # -- log-dirty ----------------------------------------------------------------------------

    def start_logdirty(self, loop: Loop, enable: bool, done: DmDone) -> Cancellable:
        """``xen-set-global-dirty-log {"enable": enable}``; then ``done(err)``."""
        return self._one_command(loop, "xen-set-global-dirty-log", {"enable": bool(enable)}, done)

    def start_resume(self, loop: Loop, done: DmDone) -> Cancellable:
        """``cont``: the device model runs again (after a failed save, or xl's unpause)."""
        return self._one_command(loop, "cont", None, done)

    def _one_command(self, loop: Loop, name: str, args: Optional[Dict[str, Any]],
                     done: DmDone) -> _Step:
        step = _Step(self, loop)

        def reply(value: Any, err: Optional[DeviceModelError]) -> None:
            if step.finished:
                return
            step.release()
            done(err)

        step.qmp(lambda err: None).command(name, args, reply)
        return step

    def resume(self, timeout: Optional[float] = None) -> None:
        """``cont``, for a synchronous caller (``Backend.resume``): run on a private
        loop, bounded by ``timeout`` (default ``qmp_timeout``).  Raises DeviceModelError."""
        limit = self.qmp_timeout if timeout is None else timeout
        try:
            err: Optional[DeviceModelError] = run_private(self.start_resume, limit + 1.0)
        except TimeoutError:
            raise QmpTimeout(f"domain {self.domid}: QMP cont not answered in {limit:g}s") \
                from None
        if err is not None:
            raise err

    # -- save ---------------------------------------------------------------------------------

    def start_save(self, loop: Loop, live: bool, done: DmSaved) -> Cancellable:
        """Stop the device model and save its state (see the module docstring); then
        ``done(records, None)`` or ``done(None, err)``.  It stays stopped either way:
        a failed save is followed by :meth:`resume`, a successful one by the domain's
        destruction or resumption."""
        step = _Step(self, loop)

        def fail(err: DeviceModelError) -> None:
            if step.finished:
                return
            step.release()
            done(None, err)

        client = step.qmp(fail)

        def check(then: Callable[[Any], None]) -> Callable[[Any, Optional[DeviceModelError]], None]:
            def reply(value: Any, err: Optional[DeviceModelError]) -> None:
                if step.finished:
                    return
                if err is not None:
                    fail(err)
                    return
                try:
                    then(value)
                except DeviceModelError as exc:
                    fail(exc)
                except OSError as exc:
                    fail(DeviceModelError(f"domain {self.domid}'s device-model state file: "
                                          f"{exc.strerror or exc}"))
            return reply

        def stopped(_: Any) -> None:
            state = _anonymous_file(f"qemu-save.{self.domid}")
            step.fds.append(state)
            # QEMU matches an fdset's descriptor by its access mode (it opens
            # /dev/fdset/N write-only): a write-only one of the same file.
            writer = os.open(f"/proc/self/fd/{state}", os.O_WRONLY | os.O_CLOEXEC)
            step.fds.append(writer)
            client.command("add-fd", {}, check(lambda value: added(value, writer)),
                           fds=[writer])

        def added(value: Any, writer: int) -> None:
            step.take(writer)       # the device model has its own now
            fdset = value.get("fdset-id") if isinstance(value, dict) else None
            if type(fdset) is not int:
                raise DeviceModelError(f"QMP add-fd answered {value!r}, without an fdset-id")
            client.command("xen-save-devices-state",
                           {"filename": f"/dev/fdset/{fdset}", "live": bool(live)},
                           check(lambda _: saved(fdset)), timeout=self.save_timeout)

        def saved(fdset: int) -> None:
            def removed(value: Any, err: Optional[DeviceModelError]) -> None:
                if step.finished:
                    return
                if err is not None:     # the state is in the file whatever this answer
                    self.logger.warning("domain %d's device model: remove-fd %d: %s",
                                        self.domid, fdset, err)
                check(lambda _: finish())(None, None)

            client.command("remove-fd", {"fdset-id": fdset}, removed)

        def finish() -> None:
            blob = _read_state(step.fds[0], self.max_state)
            xs = self.xenstore_data() if self.xenstore_data is not None else {}
            step.release()
            done(emulator_records(blob, xs), None)

        client.command("stop", None, check(stopped))
        return step

    # -- restore ------------------------------------------------------------------------------

    def start_restore(self, loop: Loop, records: Sequence[EmulatorRecord], spawn: Spawn,
                      done: DmDone) -> Cancellable:
        """Start the device model on the state in ``records`` (see the module
        docstring); ``done(None)`` once it is ready, ``done(err)`` otherwise -- after a
        failure nothing of it is left (process killed, files removed)."""
        step = _Step(self, loop)
        started = time.monotonic()
        ready = self.ready

        #: a failure told once its killed child is reaped (at most REAP_WAIT s):
        #: nothing of the failed start is left when the caller hears of it
        held: List[DeviceModelError] = []
        deadline: List[Timer] = []

        def fail(err: DeviceModelError) -> None:
            if step.finished:
                return
            step.release()
            self._kill_quietly()
            self._remove(self.qmp_path)
            child = step.child
            if child is None or not child.running:
                done(err)
                return
            held.append(err)
            child.kill()
            deadline.append(loop.call_later(REAP_WAIT, tell_held))

        def tell_held() -> None:
            for timer in deadline:
                timer.cancel()
            deadline.clear()
            if held:
                done(held.pop())

        def succeed() -> None:
            step.release()
            child = step.child
            if child is not None and child.running:
                self.child = child      # it stays our child (QEMU): teardown kills it
            self.logger.debug("device model of domain %d ready after %.3fs", self.domid,
                              time.monotonic() - started)
            done(None)

        def exited(status: Optional[int]) -> None:
            child = step.child
            if held:
                tell_held()
                return
            if step.finished or child is None:
                return
            if child.start_error is not None:
                fail(DeviceModelStartError(f"cannot start domain {self.domid}'s device model: "
                                           f"{os_error_text(child.start_error)}"))
            elif status not in (0, None):   # None: its status was lost (SIGCHLD ignored)
                fail(DeviceModelStartError(f"domain {self.domid}'s device model exited with "
                                           f"status {status} before it was ready"))

        delay = [0.002]

        def poll() -> None:
            if step.finished:
                return
            try:
                ok = ready() if ready is not None else True
            except DeviceModelError as exc:
                fail(exc if isinstance(exc, DeviceModelStartError) else DeviceModelStartError(
                    f"domain {self.domid}'s device model did not start: {exc}"))
                return
            if ok:
                succeed()
                return
            delay[0] = min(delay[0] * 2, 0.05)
            step.later(delay[0], poll)

        def timed_out() -> None:
            fail(DeviceModelTimeout(f"domain {self.domid}'s device model was not ready after "
                                    f"{self.ready_timeout:g}s"))

        try:
            blob = emulator_context(records)
            if blob is None:
                raise DeviceModelError("the stream has no EMULATOR_CONTEXT record")
            xs = emulator_xenstore_data(records)
            if xs and self.write_xenstore_data is not None:
                self.write_xenstore_data(xs)
            state = _anonymous_file(f"qemu-resume.{self.domid}")
            step.fds.append(state)
            _write_all(state, blob)
            os.lseek(state, 0, os.SEEK_SET)     # QEMU reads it from where it stands
            step.child = spawn(state, exited)
            step.take(state)        # the spawner has it, or a copy waits for it there
        except (DeviceModelError, OSError) as exc:
            err = exc if isinstance(exc, DeviceModelError) else DeviceModelStartError(
                f"cannot start domain {self.domid}'s device model: {os_error_text(exc)}")
            step.later(0, lambda: fail(err))
            return step
        step.later(self.ready_timeout, timed_out)
        step.later(0, poll)
        return step

    # -- teardown -----------------------------------------------------------------------------

    def teardown(self) -> None:
        """Call off every step in flight, kill the device model, remove its socket."""
        for step in list(self._steps):
            step.cancel()
        if self.child is not None:
            self.child.kill()       # reaped from the loop once it has gone
            self.child = None
        self._kill_quietly()
        self._remove(self.qmp_path)

    def _kill_quietly(self) -> None:
        if self.kill is not None:
            try:
                self.kill()
            except Exception as exc:   # the backend's code; teardown goes on
                self.logger.error("could not kill domain %d's device model: %s",
                                  self.domid, exc)

    def _remove(self, path: str) -> None:
        try:
            _unlink(path)
        except OSError as exc:
            self.logger.warning("could not remove %s: %s", path, exc.strerror)


def _anonymous_file(name: str) -> int:
    """A memory-backed file with no name in any directory (``memfd_create``)."""
    return os.memfd_create(name, os.MFD_CLOEXEC)


def _read_state(fd: int, bound: int) -> bytes:
    """The device model's saved state, from pyxl's own descriptor of the file
    it wrote: at most ``bound`` bytes, or DeviceModelError."""
    size = os.fstat(fd).st_size
    if size > bound:
        raise DeviceModelError(f"device-model state of {size} bytes (more than {bound}, the "
                               "most a restore takes)")
    parts, got = [], 0
    while got < size:
        chunk = os.pread(fd, size - got, got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
