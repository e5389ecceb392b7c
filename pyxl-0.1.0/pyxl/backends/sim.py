"""The simulated backend: fakexen's domains in a state directory.

Implements :class:`pyxl.backends.base.Backend` over :mod:`pyxl.sim`.  The restore
helper gets the event channels fakexen's builder allocates.

A guest created with a device model (``sim.create(..., device_model=True)``, see
:mod:`pyxl.sim.devicemodel`) is driven as libxl drives qemu-xen, over QMP with
:class:`~pyxl.backends.devicemodel.QmpDeviceModel`: log-dirty switching, ``stop``
and ``xen-save-devices-state`` when the guest is suspended (its state goes into
the stream's EMULATOR_CONTEXT record), ``cont`` when a suspended guest resumes.
A stream with an EMULATOR_CONTEXT record is restored with a device model
started on that state (``--incoming fd:N``), ready when it says it runs.  Guests
without one get :class:`~pyxl.backends.base.NoDeviceModel`'s hooks, as PV guests.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl._log import get_logger
from pyxl import sim
from pyxl.backends.base import (Cancellable, Created, Done, EmulatorRecord, NoDeviceModel,
                                RestorePorts, SavedState, name_owner, owner_of, run_steps,
                                run_to_end)
from pyxl.backends.devicemodel import QmpDeviceModel, emulator_context, state_bound
from pyxl.childproc import ShortChild
from pyxl.errors import BackendError, DeviceModelError, StartupError
from pyxl.loop import Loop, Timer
from pyxl.sim import dmcontrol
from pyxl.sim.control import load_futex
from pyxl.spawn import Child

# How often to look at a simulated guest's run state while it suspends.  A
# timer on the loop, not a sleep: the loop keeps serving other operations.
_SUSPEND_POLL = 0.001


def _target_of(config: Dict[str, Any]) -> Tuple[str, int]:
    """A restore target's name and max_memkb, from its saved config."""
    b_info = config.get("b_info", {})
    c_info = config.get("c_info", {})
    try:
        max_memkb = int(b_info["max_memkb"])
    except (KeyError, TypeError, ValueError) as exc:
        raise StartupError("saved config has no usable b_info.max_memkb") from exc
    return c_info.get("name") or "restored", max_memkb


class SimBackend:
    """fakexen domains in a state directory (``PYXL_SIM_DIR`` or /dev/shm).

    ``qmp_timeout``: bound of each QMP exchange with a device model (libxl's 10 s);
    ``dm_ready_timeout``: how long a device model started on a saved state may
    take to run (libxl's 60 s); ``dm_command(domid, fd)``: the command line of that
    device model (default fakexen's, :func:`pyxl.sim.dmcontrol.argv`).
    """

    name = "sim"

    def __init__(self, sim_dir: Optional[str] = None, *, qmp_timeout: float = 10.0,
                 dm_ready_timeout: float = 60.0,
                 dm_command: Optional[Callable[[int, int], List[str]]] = None) -> None:
        self.sim_dir = sim_dir
        # An unsafe state directory is refused now (UnsafeSimDir), not first
        # met in a loop callback halfway through an operation.
        sim.sim_dir_path(sim_dir)
        self.qmp_timeout = qmp_timeout
        self.dm_ready_timeout = dm_ready_timeout
        self.dm_command = dm_command
        self._no_dm = NoDeviceModel()
        load_futex()    # now, not inside the first suspend's loop callback

    def helper_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(sim.helper_env(self.sim_dir))
        return env

    def check_domain(self, domid: int) -> None:
        try:
            sim.state(domid, sim_dir=self.sim_dir)     # exists (info() also reads the rest)
        except sim.NoSuchDomain as exc:
            where = sim.sim_dir_path(self.sim_dir)
            if not os.path.isdir(where):    # a mistyped sim_dir, not a missing domain
                raise StartupError(f"no such domain: {domid}: the sim state directory {where} "
                                   "does not exist") from exc
            raise StartupError(f"no such domain: {domid}") from exc

    def lock_dir(self) -> str:
        """The simulated host's directory (pyxl.backends.domainlock), where a
        save holds its domain's lock and names are held: ``.locks`` in its
        state directory.  A directory of its own, because fakexen's creators
        and destroyers (helpers, ``rm``) keep the state directory's inode lock
        busy, and one preempted while holding it made the loop's unlink of a
        lock file wait for it (11-35 ms in bench/stall.py)."""
        return os.path.join(sim.sim_dir_path(self.sim_dir), ".locks")

    def domain_names(self) -> Dict[int, str]:
        return sim.names(self.sim_dir)

    def domain_config(self, domid: int) -> Dict[str, Any]:
        return sim.config(domid, sim_dir=self.sim_dir)

    def start_suspend(self, loop: Loop, domid: int, timeout: float,
                      done: Callable[[bool, str], None]) -> Cancellable:
        """Ask the guest to suspend; call ``done(ok, why)`` from the loop when it has."""
        sim.request_suspend(domid, sim_dir=self.sim_dir)
        return _SuspendWatch(loop, self.sim_dir, domid, timeout, done)

    def resume(self, domid: int) -> None:
        """The guest runs again, and its device model too (QMP ``cont``, as libxl's
        ``libxl__dm_resume``).  A device model that cannot be told raises
        DeviceModelError after the guest itself was resumed."""
        sim.resume(domid, sim_dir=self.sim_dir)
        dm = self._device_model(domid)
        if dm is not None:
            try:
                dm.resume()
            except DeviceModelError as exc:
                raise DeviceModelError(f"domain {domid} was resumed, but its device model "
                                       f"was not: {exc}") from exc

    def start_resume(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """:meth:`resume` from the loop: the device model's ``cont`` is an
        exchange on the loop."""
        sim.resume(domid, sim_dir=self.sim_dir)
        dm = self._device_model(domid)
        if dm is None:
            return loop.call_later(0, lambda: done(True, ""))
        return dm.start_resume(loop, lambda err: done(
            err is None, "" if err is None else
            f"domain {domid} was resumed, but its device model was not: {err}"))

    def pause(self, domid: int) -> None:
        sim.pause(domid, sim_dir=self.sim_dir)

    def start_destroy(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """The domain is gone at once, its device model killed with it
        (:func:`pyxl.sim.bury`); its memory files, which take tens of ms per
        GiB to free, are removed by ``rm -rf`` in a short child."""
        grave = sim.bury(domid, sim_dir=self.sim_dir)
        return ShortChild(loop, ["rm", "-rf", "--", grave],
                          lambda status, err: done(status == 0, err))

    def destroy(self, domid: int) -> None:
        """:meth:`start_destroy`, waited for."""
        run_to_end(lambda loop, done: self.start_destroy(loop, domid, done),
                   f"destroy of domain {domid}")

    def create_restore_target(self, config: Dict[str, Any]) -> int:
        name, max_memkb = _target_of(config)
        self._name_free(name)
        return self._create_empty(max_memkb, name, config)

    def start_create_restore_target(self, loop: Loop, config: Dict[str, Any],
                                    done: Created) -> None:
        """:meth:`create_restore_target` in a few loop callbacks: the name
        check (every domain's control page), then the domain's creation, a
        step at a time (:class:`pyxl.sim.Creation`)."""
        name, max_memkb = _target_of(config)
        made = sim.empty_creation(max_memkb, name, config, sim_dir=self.sim_dir)

        def finished(exc: Optional[Exception]) -> None:
            if exc is None:
                done(made.domid, None)
            elif isinstance(exc, sim.SimError):
                done(None, _not_created(exc))
            else:
                done(None, exc)
        run_steps(loop, [lambda: self._name_free(name), *made.steps()], finished)

    def _name_free(self, name: str) -> None:
        other = owner_of(self.domain_names(), name)
        if other is not None:   # as libxl (and XenBackend) refuse it
            raise StartupError(f"domain {name!r} already exists (domid {other})")

    def _create_empty(self, max_memkb: int, name: str, config: Dict[str, Any]) -> int:
        try:
            return sim.create_empty(max_memkb, name, config, sim_dir=self.sim_dir)
        except sim.SimError as exc:
            raise _not_created(exc) from exc

    def cpu_cap(self, domid: int) -> int:
        """The scheduler cap, percent of one CPU (0: uncapped): fakexen's vCPU honours it."""
        return sim.cpu_cap(domid, sim_dir=self.sim_dir)

    def set_cpu_cap(self, domid: int, cap: int) -> None:
        sim.set_cpu_cap(domid, cap, sim_dir=self.sim_dir)

    def unpause(self, domid: int) -> None:
        sim.unpause(domid, sim_dir=self.sim_dir)

    def start_unpause(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """:meth:`unpause`, without waiting for a new vCPU process to start
        (a restored guest's): its launcher runs as a short child."""
        argv = sim.start_unpause(domid, sim_dir=self.sim_dir)
        if argv is None:
            return loop.call_later(0, lambda: done(True, ""))

        def started(status: int, err: str) -> None:
            if status == 0:
                done(True, "")
                return
            try:
                sim.unpause_failed(domid, sim_dir=self.sim_dir)
            except sim.SimError:
                pass                    # destroyed meanwhile
            done(False, err or f"its vCPU did not start (status {status})")

        return ShortChild(loop, argv, started)

    def rename(self, domid: int, name: str) -> None:
        other = name_owner(self, name, but=domid)
        if other is not None:
            raise BackendError(f"domain {name!r} already exists (domid {other})")
        sim.rename(domid, name, sim_dir=self.sim_dir)

    def state(self, domid: int) -> Optional[str]:
        """'running', 'paused', 'suspended', or None when it cannot be told."""
        try:
            return sim.state(domid, sim_dir=self.sim_dir)
        except sim.SimError:
            return None

    def digest(self, domid: int) -> Optional[str]:
        """sha256 of the stopped guest's memory and context (:func:`pyxl.sim.digest`)."""
        return sim.digest(domid, sim_dir=self.sim_dir)

    def restore_ports(self, domid: int) -> RestorePorts:
        # store 1 and console 2 on backend domain 0, as the simulated domain's
        # builder allocates them
        return (1, 0, 2, 0)

    def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
        """Nothing to finish: fakexen has no XenStore."""

    # -- the device model ---------------------------------------------------------------------

    def _device_model(self, domid: int) -> Optional[QmpDeviceModel]:
        """The domain's device model, None for a guest without one."""
        if not dmcontrol.has_device_model(domid, self.sim_dir):
            return None
        return self._qmp_device_model(domid)

    def _qmp_device_model(self, domid: int) -> QmpDeviceModel:
        domdir = dmcontrol.domain_dir(domid, self.sim_dir)
        return QmpDeviceModel(
            domid, dmcontrol.qmp_path(domid, self.sim_dir), max_state=state_bound(self),
            kill=lambda: dmcontrol.kill(domdir), qmp_timeout=self.qmp_timeout,
            save_timeout=self.qmp_timeout, ready_timeout=self.dm_ready_timeout,
            logger=get_logger(f"pyxl.domain.{domid}"))

    def start_logdirty(self, loop: Loop, domid: int, enable: bool, done: Done) -> Cancellable:
        dm = self._device_model(domid)
        if dm is None:
            return self._no_dm.start_logdirty(loop, domid, enable, done)
        return dm.start_logdirty(loop, enable, lambda err: done(err is None, _why(err)))

    def start_save_device_model(self, loop: Loop, domid: int, live: bool,
                                done: SavedState) -> Cancellable:
        dm = self._device_model(domid)
        if dm is None:
            return self._no_dm.start_save_device_model(loop, domid, live, done)

        def saved(records: Optional[List[EmulatorRecord]], err: Optional[DeviceModelError]) -> None:
            done(records, _why(err))

        return dm.start_save(loop, live, saved)

    def start_restore_device_model(self, loop: Loop, domid: int, records: List[EmulatorRecord],
                                   done: Done) -> Cancellable:
        """Start a device model on the stream's EMULATOR_CONTEXT, if it has one (a
        stream without it restores a guest without a device model)."""
        if emulator_context(records) is None:
            return self._no_dm.start_restore_device_model(loop, domid, records, done)
        domdir = dmcontrol.domain_dir(domid, self.sim_dir)
        launched: List[Child] = []

        def spawn(fd: int, exited: Callable[[Optional[int]], None]) -> Child:
            argv = (self.dm_command(domid, fd) if self.dm_command is not None
                    else dmcontrol.argv(domid, self.sim_dir, incoming_fd=fd))
            log = os.open(os.path.join(domdir, dmcontrol.LOG_FILE),
                          os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:    # by the spawner: the loop does not wait for the fork and exec
                child = Child(loop, argv, exited, fds={fd: fd, 1: log, 2: log}, new_session=True)
            finally:
                os.close(log)
            launched.append(child)
            return child

        def ready() -> bool:
            # Until its launcher has exited, the device model may not hold its lock yet.
            if launched and launched[0].running:
                return dmcontrol.ready(domdir) if dmcontrol.pid(domdir) else False
            return dmcontrol.ready(domdir)

        dm = self._qmp_device_model(domid)
        dm.ready = ready
        return dm.start_restore(loop, records, spawn, lambda err: done(err is None, _why(err)))


class _SuspendWatch:
    """Polls a guest asked to suspend, from the loop, until it has (or the
    deadline passed); cancellable."""

    def __init__(self, loop: Loop, sim_dir: Optional[str], domid: int, timeout: float,
                 done: Callable[[bool, str], None]) -> None:
        self._loop, self._sim_dir, self._domid, self._done = loop, sim_dir, domid, done
        self._deadline, self._timeout = time.monotonic() + timeout, timeout
        self._timer: Optional[Timer] = loop.call_later(0, self._poll)

    def _poll(self) -> None:
        self._timer = None
        try:
            state = sim.state(self._domid, sim_dir=self._sim_dir)
        except sim.SimError as exc:
            self._done(False, str(exc))
            return
        if state == "suspended":
            self._done(True, "")
        elif time.monotonic() >= self._deadline:
            self._done(False, f"guest did not suspend within {self._timeout:g}s")
        else:
            self._timer = self._loop.call_later(_SUSPEND_POLL, self._poll)

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _why(err: Optional[DeviceModelError]) -> str:
    """A device model's failure for ``done(ok, why)``: its type (the typed error) and message."""
    return "" if err is None else f"{type(err).__name__}: {err}"


def _not_created(exc: Exception) -> StartupError:
    err = StartupError(f"cannot create the domain to restore into: {exc}")
    err.__cause__ = exc
    return err
