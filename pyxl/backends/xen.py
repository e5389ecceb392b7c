"""The real-Xen backend: what libxl does around the helper, in pure Python.

ctypes over Debian's libxenctrl/libxenguest (:mod:`~pyxl.backends.xenctrl`) for
the hypervisor, :mod:`~pyxl.backends.xenstore` for XenStore.  Chosen by
:func:`pyxl.backends.default.default_backend` where ``/dev/xen/privcmd`` exists.
PV, PVH and HVM guests; an HVM guest's device model is Debian's QEMU.

* suspend (:mod:`~pyxl.backends.xensuspend`): control/shutdown, or Xen's
  shutdown for an HVM guest without PV drivers, then a ``@releaseDomain``
  watch on the operation's loop until D has shut down with reason suspend.
* resume: an HVM guest's QEMU gets ``cont``; then ``xc_domain_resume(fast=1)``
  (the cooperative resume) and XS_RESUME.  Unpause: ``cont``, then unpause.
* the device model of an HVM guest on save (:mod:`~pyxl.backends.hvm` over
  :class:`~pyxl.backends.devicemodel.QmpDeviceModel`): log-dirty tracking and
  its saved state through its QMP socket (``/var/run/xen/qmp-libxl-D``:
  domains of xl and of pyxl alike).
* destroy (:mod:`~pyxl.backends.xendestroy`): libxl's order (libxl__destroy_domid),
  every XenStore exchange a round on the loop, ``xc_domain_destroy`` in a short child.
* domain config (what ``xl save`` puts in the xl header): the JSON libxl
  stored at creation, ``/var/lib/xen/userdata-d.D.UUID.libxl-json``, with
  the current name and memory (libxl_retrieve_domain_configuration).
* restore (:mod:`~pyxl.backends.xenbuild`): the empty domain as
  libxl__domain_make/libxl__build_pre make it, after checking the saved
  config asks for nothing pyxl cannot rebuild (:mod:`~pyxl.backends.libxlcfg`),
  its hypercalls in a short child (:mod:`~pyxl.backends.xenmake`), its XenStore
  transactions on the loop (:mod:`~pyxl.backends.xsasync`);
  after the helper libxl__build_post, the console (and an HVM guest's vkb),
  XS_INTRODUCE; then, before the guest may run, its disks with their hotplug
  scripts, an HVM guest's QEMU (:mod:`~pyxl.backends.hvm`), its NICs
  (:mod:`~pyxl.backends.xendevices`).  Any failure destroys what was made.
"""

from __future__ import annotations

import errno
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl._log import get_logger
from pyxl.backends import (hvm, libxlcfg, qemu_args, xenbuild, xendestroy, xendevices, xenmake,
                           xsasync)
from pyxl.backends.base import (Cancellable, Configured, Created, Done, EmulatorRecord, Finished,
                                NoDeviceModel, RestorePorts, SavedState, Waits, owner_of,
                                run_steps, run_to_end, start_destroy)
from pyxl.backends.devicemodel import state_bound
from pyxl.backends.libxlcfg import defbool, to_int  # noqa: F401  (defbool: re-exported)
from pyxl.backends.xenctrl import DomInfo, Xc, XenError  # noqa: F401  (XenError: re-exported)
from pyxl.backends.xensuspend import HVM_PARAM_ACPI_S_STATE, HVM_PARAM_CALLBACK_IRQ, Suspend
from pyxl.backends.xenstore import (XS_DIRECTORY, XS_MKDIR, XS_READ, XS_RESUME, Batch,
                                    XenStore, open_default)
from pyxl.errors import DeviceModelError, StartupError
from pyxl.loop import Loop, run_private
from pyxl.spawn import Child

_log = get_logger("pyxl.xen")

USERDATA_DIR = "/var/lib/xen"

# Kept under their old names for callers of this module.
XEN_DOMCTL_CDF_hvm, XEN_DOMCTL_CDF_hap = xenbuild.XEN_DOMCTL_CDF_hvm, xenbuild.XEN_DOMCTL_CDF_hap
XEN_X86_EMU_LAPIC = xenbuild.XEN_X86_EMU_LAPIC
_Suspend = Suspend


def _config_unread(domid: int, exc: Exception) -> StartupError:
    return StartupError(f"cannot read domain {domid} from XenStore: {xsasync.reason(exc)}")


class XenBackend(NoDeviceModel):
    """Domains of the Xen hypervisor this host runs on (dom0)."""

    name = "xen"
    sim_dir = None

    def __init__(self) -> None:
        self.xc = Xc()
        self._xs: Optional[XenStore] = None
        self._ports: Dict[int, xenbuild.Ports] = {}
        self._restoring: Dict[int, Dict[str, Any]] = {}
        self._types: Dict[Tuple[int, str], str] = {}
        #: QEMU processes this backend started, kept to be reaped
        self._dm_procs: Dict[int, Child] = {}

    @property
    def xs(self) -> XenStore:
        if self._xs is None:
            try:
                self._xs = open_default()
            except OSError as exc:
                raise StartupError(f"cannot talk to xenstored: {exc}") from exc
        return self._xs

    def _open_xs(self) -> XenStore:
        """A connection of its own (for a watch on the loop)."""
        return open_default()

    def helper_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("PYXL_SIM_DIR", None)
        return env

    def _info(self, domid: int) -> DomInfo:
        info = self.xc.getinfo(domid)
        if info is None:
            raise StartupError(f"no such domain: {domid}")
        return info

    def _type(self, domid: int) -> str:
        """"pv", "pvh" or "hvm", as libxl__domain_type (waited for: the sync forms)."""
        info = self.xc.getinfo(domid)
        if info is None or not info.hvm:
            return "pv"
        return xsasync.run(self.xs, self._read_type(domid, info))

    def _read_type(self, domid: int, info: DomInfo) -> xsasync.XsScript[str]:
        """libxl's ``/libxl/D/type`` tells PVH from HVM (Xen says only "not
        PV"); remembered for the domain (its domid and uuid)."""
        key = (domid, info.uuid)
        if key not in self._types:
            [raw] = yield [(XS_READ, f"/libxl/{domid}/type\0".encode(), 0)]
            pvh = not xsasync.missing(raw) and xsasync.ok(raw) == b"pvh"
            self._types[key] = "pvh" if pvh else "hvm"
        return self._types[key]

    def _start_typed(self, loop: Loop, domid: int, then: Callable[[str], Cancellable]
                     ) -> Cancellable:
        """``then(kind)`` once the domain's type is known (a XenStore round on
        the loop, the first time); a XenStore failure leaves it "hvm", whose
        steps then fail on the device model with a reason of their own."""
        info = self.xc.getinfo(domid)
        if info is None or not info.hvm:
            return then("pv")
        chain = _Then()

        def known(exc: Optional[Exception]) -> None:
            if exc is not None:
                _log.error("domain %d: cannot read /libxl/%d/type: %s", domid, domid,
                           xsasync.reason(exc))
            if not chain.cancelled:
                chain.part = then(task.result or "hvm")
        task = chain.part = xsasync.XsTask(loop, self._open_xs, self._read_type(domid, info),
                                           known, f"domain {domid}'s type")
        return chain

    def check_domain(self, domid: int) -> None:
        if domid == 0:
            raise StartupError("domain 0 cannot be saved")
        self._info(domid)

    def domain_config(self, domid: int) -> Dict[str, Any]:
        try:
            return xsasync.run(self.xs, self._config_script(domid))
        except OSError as exc:
            raise _config_unread(domid, exc) from exc

    def start_domain_config(self, loop: Loop, domid: int, done: Configured) -> Cancellable:
        """:meth:`domain_config` with its XenStore round on the loop."""
        def finished(exc: Optional[Exception]) -> None:
            if exc is None:
                done(task.result, None)
            else:
                done(None, _config_unread(domid, exc) if isinstance(exc, OSError) else exc)
        task = xsasync.XsTask(loop, self._open_xs, self._config_script(domid), finished,
                              f"domain {domid}'s config")
        return task

    def _config_script(self, domid: int) -> xsasync.XsScript[Dict[str, Any]]:
        """As libxl_retrieve_domain_configuration (what `xl save` writes): the
        stored config with the uuid from Xen, and the current name and memory
        from XenStore (the stored name is stale after a rename: xl migrate's
        NAME--incoming), read in one round."""
        info = self._info(domid)
        path = xenbuild.userdata_path(USERDATA_DIR, domid, info.uuid)
        try:
            cfg = xenbuild.read_userdata(USERDATA_DIR, domid, info.uuid)
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read domain {domid}'s config {path}: {exc}") from exc
        if cfg is None:
            raise StartupError(f"domain {domid} has no libxl config ({path}): pyxl saves "
                               "domains created by xl/libxl or by pyxl")
        c_info = cfg.setdefault("c_info", {})
        b_info = cfg.setdefault("b_info", {})
        c_info["uuid"] = info.uuid
        dom = f"/local/domain/{domid}"
        replies = yield [(XS_READ, f"{dom}/{node}\0".encode(), 0)
                         for node in ("name", "memory/target", "memory/static-max")]
        name, target, static_max = (None if xsasync.missing(r) else xsasync.ok(r)
                                    for r in replies)
        if name:
            c_info["name"] = name.decode()
        # libxl__get_targetmem_fudge, from the stored config
        fudge = max(0, to_int(b_info.get("video_memkb"), 0))
        if c_info.get("type") == "hvm" and \
                to_int(b_info.get("max_memkb"), 0) > to_int(b_info.get("target_memkb"), 0):
            fudge += xenbuild.LIBXL_MAXMEM_CONSTANT
        if target and target.isdigit():
            b_info["target_memkb"] = int(target) + fudge
        if static_max and static_max.isdigit():
            b_info["max_memkb"] = int(static_max)
        return cfg

    # -- suspend, resume --------------------------------------------------------
    def start_suspend(self, loop: Loop, domid: int, timeout: float,
                      done: Callable[[bool, str], None]) -> Cancellable:
        """Ask the guest to suspend; call ``done(ok, why)`` from the loop once Xen says it has."""
        def typed(kind: str) -> Cancellable:
            via_shutdown = False
            if kind == "hvm":
                pvdrv = self.xc.hvm_param_get(domid, HVM_PARAM_CALLBACK_IRQ)
                s_state = self.xc.hvm_param_get(domid, HVM_PARAM_ACPI_S_STATE)
                via_shutdown = not pvdrv or bool(s_state)
            return Suspend(self, loop, domid, timeout, done, via_shutdown)
        return self._start_typed(loop, domid, typed)

    def _dm_cont(self, domid: int) -> None:
        """libxl__dm_resume for a qemu-xen device model: QMP ``cont`` (a short
        exchange on QEMU's local socket, bounded: these calls are synchronous)."""
        if self._type(domid) == "hvm":
            hvm.device_model(domid).resume()

    def resume(self, domid: int) -> None:
        """The guest runs again.  If its QEMU cannot be told (killed during the
        save), the vCPUs are resumed all the same: a guest on PV drivers runs
        on, and one that is left suspended is lost to its user.  Then
        DeviceModelError says so (as SimBackend does)."""
        try:
            self._dm_cont(domid)
        except DeviceModelError as exc:
            self.xc.resume(domid, fast=True)
            self.xs.resume(domid)
            raise DeviceModelError(f"domain {domid} was resumed, but its device model "
                                   f"was not: {exc}") from exc
        self.xc.resume(domid, fast=True)
        self.xs.resume(domid)

    def start_resume(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """:meth:`resume` from the loop: QMP ``cont`` and XS_RESUME are
        exchanges on the loop (xenstored may take a while to answer)."""
        chain = _Then()

        def cont(err: Optional[Exception]) -> None:
            try:
                self.xc.resume(domid, fast=True)
            except OSError as exc:
                done(False, f"resuming domain {domid}: {exc}")
                return

            def told(exc: Optional[Exception]) -> None:
                if exc is not None:
                    done(False, f"resuming domain {domid}: {xsasync.reason(exc)}")
                    return
                done(err is None, "" if err is None else
                     f"domain {domid} was resumed, but its device model was not: {err}")
            if not chain.cancelled:     # (called from the loop, never before this returns)
                chain.part = xsasync.XsTask(loop, self._open_xs, _xs_resume(domid), told,
                                            f"resume of domain {domid}")
        chain.part = self._start_dm_cont(loop, domid, cont)
        return chain

    def start_unpause(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """:meth:`unpause` from the loop: QMP ``cont`` is an exchange on the loop."""
        def cont(err: Optional[Exception]) -> None:
            if err is not None:   # as unpause: the vCPUs do not run without their QEMU
                done(False, f"domain {domid}'s device model would not run: {err}")
                return
            try:
                self.xc.unpause(domid)
            except OSError as exc:
                done(False, f"unpausing domain {domid}: {exc}")
                return
            done(True, "")
        return self._start_dm_cont(loop, domid, cont)

    def _start_dm_cont(self, loop: Loop, domid: int,
                       then: Callable[[Optional[Exception]], None]) -> Cancellable:
        def typed(kind: str) -> Cancellable:
            if kind != "hvm":
                return loop.call_later(0, lambda: then(None))
            return hvm.device_model(domid).start_resume(loop, then)
        return self._start_typed(loop, domid, typed)

    def pause(self, domid: int) -> None:
        self.xc.pause(domid)

    def cpu_cap(self, domid: int) -> int:
        """The scheduler cap of the domain's scheduler (credit2 or credit), percent of one CPU."""
        return self.xc.sched_cap(domid)[2]

    def set_cpu_cap(self, domid: int, cap: int) -> None:
        """As ``xl sched-credit2 -d DOM -c CAP`` (or sched-credit): the weight is kept."""
        self.xc.set_sched_cap(domid, cap)

    def unpause(self, domid: int) -> None:
        self._dm_cont(domid)
        self.xc.unpause(domid)

    def state(self, domid: int) -> Optional[str]:
        """'running', 'paused', 'suspended', 'shutdown', 'dying', or None (no such domain)."""
        try:
            info = self.xc.getinfo(domid)
        except OSError:
            return None
        if info is None:
            return None
        if info.dying:
            return "dying"
        if info.shutdown:
            return "suspended" if info.suspended else "shutdown"
        return "paused" if info.paused else "running"

    def digest(self, domid: int) -> Optional[str]:
        """None: a digest of guest memory is fakexen's (a test aid), not a real host's."""
        return None

    # -- the device model on save ----------------------------------------------
    def start_logdirty(self, loop: Loop, domid: int, enable: bool,
                       done: Callable[[bool, str], None]) -> Cancellable:
        def typed(kind: str) -> Cancellable:
            if kind != "hvm":      # PVH: libxc asks, nobody to tell
                return NoDeviceModel.start_logdirty(self, loop, domid, enable, done)
            return hvm.device_model(domid).start_logdirty(
                loop, enable, lambda err: done(err is None, "" if err is None else str(err)))
        return self._start_typed(loop, domid, typed)

    def start_save_device_model(self, loop: Loop, domid: int, live: bool,
                                done: SavedState) -> Cancellable:
        """QEMU's state, with its physmap keys (read first, on the loop)."""
        def typed(kind: str) -> Cancellable:
            if kind != "hvm":
                return NoDeviceModel.start_save_device_model(self, loop, domid, live, done)
            chain = _Then()

            def read(exc: Optional[Exception]) -> None:
                if exc is not None:
                    done(None, f"domain {domid}'s device model: {xsasync.reason(exc)}")
                elif not chain.cancelled:
                    chain.part = hvm.device_model(
                        domid, xenstore_data=task.result, max_state=state_bound(self)
                    ).start_save(loop, live,
                                 lambda recs, err: done(recs, "" if err is None else str(err)))
            task = chain.part = xsasync.XsTask(loop, self._open_xs, hvm.physmap(domid), read,
                                               f"domain {domid}'s physmap keys")
            return chain
        return self._start_typed(loop, domid, typed)

    # -- destroy ----------------------------------------------------------------
    def start_destroy(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """libxl__destroy_domid on ``loop`` (:mod:`~pyxl.backends.xendestroy`)."""
        return xendestroy.start_destroy(self, loop, domid, done, USERDATA_DIR)

    def _forget(self, domid: int) -> None:
        """What this backend kept of a domain, once it is destroyed."""
        for key in [k for k in self._types if k[0] == domid]:
            del self._types[key]
        self._restoring.pop(domid, None)
        self._ports.pop(domid, None)

    def destroy(self, domid: int) -> None:
        """:meth:`start_destroy`, waited for (a private loop): for scripts and the CLI."""
        run_to_end(lambda loop, done: self.start_destroy(loop, domid, done),
                   f"destroy of domain {domid}")

    # -- restore ---------------------------------------------------------------
    def create_restore_target(self, config: Dict[str, Any]) -> int:
        """:meth:`start_create_restore_target`, waited for (a private loop)."""
        def begin(loop: Loop, done: Callable[[Tuple[Optional[int], Optional[Exception]]], None]
                  ) -> None:
            self.start_create_restore_target(loop, config, lambda d, e: done((d, e)))
        domid, exc = run_private(begin)
        if exc is not None:
            raise exc
        assert domid is not None
        return domid

    def start_create_restore_target(self, loop: Loop, config: Dict[str, Any],
                                    done: Created) -> None:
        """The empty domain a restore goes into, as libxl__domain_make +
        libxl__build_pre make it.  A saved config asking for what pyxl does
        not rebuild is refused first (raised here); then the domain is made
        in steps -- the name check and the XenStore reads it needs (on the
        loop), the create and build hypercalls and libxl's stored config (a
        child: :mod:`xenmake`), the XenStore transaction (on the loop) -- and
        ``done(domid, None)``.  A half-made domain is destroyed (on the loop)
        before ``done(None, exc)``."""
        config = _copy(config)
        c_info = config.setdefault("c_info", {})
        b_info = config.get("b_info") or {}
        dtype = c_info.get("type") or "pv"
        if not config.get("b_info"):
            raise StartupError("saved config has no b_info")
        libxlcfg.check_restorable(config)
        try:
            max_memkb = int(b_info["max_memkb"])
            int(b_info.get("target_memkb", max_memkb))
        except (KeyError, TypeError, ValueError) as exc:
            raise StartupError("saved config has no usable b_info.max_memkb") from exc
        libxlcfg.prepare_nics(config)
        disks = libxlcfg.disks(config)      # the paths are looked at now, not later
        missing = xendevices.check_bridges(libxlcfg.nics(config))
        if missing:
            raise StartupError(missing)
        if dtype == "hvm":
            dm = str(b_info.get("device_model") or qemu_args.QEMU_XEN_PATH)
            if not os.access(dm, os.X_OK):
                raise StartupError(f"the device model {dm} is not executable (Debian: "
                                   "qemu-system-xen)")
            # the argv must build now, not once the domain exists
            qemu_args.device_model_command(config, 0, 0, dict(os.environ))
        elif any(d.backend == "qdisk" for d in disks):
            raise StartupError("pyxl cannot restore this domain on Xen: disk "
                               f"{[d.vdev for d in disks if d.backend == 'qdisk'][0]} needs "
                               "QEMU as its backend (qdisk), which pyxl starts for HVM only")
        name = c_info.get("name") or "restored"
        # libxl's form, lower case: the userdata file and /vm/UUID are found
        # again by Xen's handle, which is printed in lower case
        uuid = str(c_info.get("uuid") or "").lower()
        try:
            handle = bytes.fromhex(uuid.replace("-", ""))
            assert len(handle) == 16
        except (ValueError, AssertionError):
            handle = os.urandom(16)
            uuid = handle.hex()
            uuid = f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"
        c_info["uuid"] = uuid
        if dtype == "hvm":
            b_info["video_memkb"] = libxlcfg.video_memkb(config)   # libxl records it
        made: List[int] = []
        begun = time.monotonic()
        services: List[Tuple[int, int]] = []     # xenstored's and xenconsoled's domains

        def look() -> xsasync.XsScript[Dict[int, str]]:
            names = yield from self._names()
            services.append((yield from xenbuild.service_domains()))
            return names

        def name_free(finished: Finished) -> Cancellable:
            """Names are unique on a host (libxl refuses a name in use)."""
            def looked(exc: Optional[Exception]) -> None:
                other = owner_of(task.result or {}, name)
                if exc is None and other is not None:
                    exc = StartupError(f"domain {name!r} already exists (domid {other})")
                finished(exc)
            task = xsasync.XsTask(loop, self._open_xs, look(), looked, "the domains' names")
            return task

        def make(finished: Finished) -> Cancellable:
            """xc_domain_create and build_pre's hypercalls, in a child."""
            def made_it(domid: Optional[int], ports: Optional[xenbuild.Ports],
                        exc: Optional[Exception]) -> None:
                if domid is not None:
                    made.append(domid)
                    if ports is not None:
                        self._ports[domid] = ports
                finished(exc)

            def orphan(domid: int) -> None:
                _log.error("domain %d: made after its restore was called off; destroying it",
                           domid)
                start_destroy(self, loop, domid, lambda ok, why: None if ok else _log.error(
                    "could not destroy domain %d: %s", domid, why))
            spec = xenmake.spec(config, handle, *services[0], USERDATA_DIR)
            return xenmake.MakeChild(loop, self.xc.make_command(spec), made_it, orphan)

        def nodes() -> xsasync.XsScript[None]:
            yield from xenbuild.make_xenstore(made[0], config, name, uuid)
            if dtype == "hvm":
                [reply] = yield [(XS_MKDIR, f"{hvm.dm_path(made[0])}\0".encode(), 0)]
                xsasync.ok(reply)

        def store(finished: Finished) -> Cancellable:
            return xsasync.XsTask(loop, self._open_xs, nodes(), finished,
                                  f"domain {made[0]}'s XenStore nodes")

        took: List[str] = []     # each step's time, for -vv

        def waited(start: Callable[[Finished], Cancellable]) -> Waits:
            def begin(finished: Finished) -> Cancellable:
                t0 = time.monotonic()

                def end(exc: Optional[Exception]) -> None:
                    took.append(f"{start.__name__} {(time.monotonic() - t0) * 1e3:.1f} ms "
                                "waited")
                    finished(exc)
                return start(end)
            begin.__name__ = start.__name__
            return Waits(begin)

        def finished(exc: Optional[Exception]) -> None:
            if exc is None:
                _log.debug("domain %d: built for the restore in %.3f s (%s)", made[0],
                           time.monotonic() - begun, ", ".join(took))
                self._restoring[made[0]] = config
                done(made[0], None)
                return
            if not made:
                done(None, exc)
                return
            domid = made[0]
            if isinstance(exc, OSError):
                exc = StartupError(f"cannot prepare domain {domid} for the restore: {exc}")

            def destroyed(ok: bool, why: str) -> None:
                if not ok:
                    _log.error("could not destroy half-made domain %d: %s", domid, why)
                done(None, exc)
            start_destroy(self, loop, domid, destroyed)

        run_steps(loop, [waited(name_free), waited(make), waited(store)], finished)

    def rename(self, domid: int, name: str) -> None:
        """Rename a domain (XenStore and libxl's stored config), as
        libxl__domain_rename does; for a migration receiver's
        ``NAME--incoming`` -> ``NAME`` once the source is gone.  Waited for:
        :meth:`start_rename` is the loop's form."""
        info = self._info(domid)
        xsasync.run(self.xs, self._rename(domid, name))
        self._rename_userdata(domid, info, name)

    def start_rename(self, loop: Loop, domid: int, name: str, done: Done) -> Cancellable:
        """:meth:`rename` on ``loop``: the name check, the ``/vm`` look-up and
        the transaction as XenStore rounds on a connection of their own."""
        info = self._info(domid)

        def finished(exc: Optional[Exception]) -> None:
            if exc is None:
                try:
                    self._rename_userdata(domid, info, name)
                except OSError as err:
                    exc = err
            done(exc is None, "" if exc is None else xsasync.reason(exc))
        return xsasync.XsTask(loop, self._open_xs, self._rename(domid, name), finished,
                              f"rename of domain {domid}")

    def _rename(self, domid: int, name: str) -> xsasync.XsScript[None]:
        dom = f"/local/domain/{domid}"
        names = yield from self._names()
        other = owner_of(names, name, but=domid)
        if other is not None:
            raise XenError(errno.EEXIST, f"domain {name!r} already exists (domid {other})")
        [vm_reply] = yield [(XS_READ, f"{dom}/vm\0".encode(), 0)]
        vm = "" if xsasync.missing(vm_reply) else xsasync.ok(vm_reply).decode()

        def fill(b: Batch, tx: int) -> None:
            b.write(f"{dom}/name", name, tx)
            if vm:
                b.write(f"{vm}/name", name, tx)
        yield from xsasync.transaction(fill)

    @staticmethod
    def _rename_userdata(domid: int, info: DomInfo, name: str) -> None:
        try:
            cfg = xenbuild.read_userdata(USERDATA_DIR, domid, info.uuid)
        except (OSError, ValueError):
            return
        if cfg is not None:
            cfg.setdefault("c_info", {})["name"] = name
            xenbuild.write_userdata(USERDATA_DIR, domid, info.uuid, cfg)

    def domain_names(self) -> Dict[int, str]:
        """Each domain's /local/domain/D/name, as libxl_name_to_domid reads it."""
        return xsasync.run(self.xs, self._names())

    def start_domain_names(self, loop: Loop,
                           done: Callable[[Optional[Dict[int, str]], Optional[Exception]], None]
                           ) -> Cancellable:
        """:meth:`domain_names` on ``loop``: one XenStore round on a connection of its own."""
        def finished(exc: Optional[Exception]) -> None:
            done(task.result if exc is None else None, exc)
        task: xsasync.XsTask[Dict[int, str]] = xsasync.XsTask(loop, self._open_xs, self._names(),
                                                               finished, "the domains' names")
        return task

    @staticmethod
    def _names() -> xsasync.XsScript[Dict[int, str]]:
        """Every domain's name: its list, then each name, in one round."""
        [listing] = yield [(XS_DIRECTORY, b"/local/domain\0", 0)]
        domids = [] if xsasync.missing(listing) else \
            [int(d) for d in xsasync.entries(xsasync.ok(listing)) if d.isdigit()]
        names = yield [(XS_READ, f"/local/domain/{d}/name\0".encode(), 0) for d in domids]
        out: Dict[int, str] = {}
        for d, raw in zip(domids, names):
            if xsasync.missing(raw):
                continue        # a domain without a name (going, or not made by a toolstack)
            out[d] = xsasync.ok(raw).decode(errors="replace")
        return out

    def restore_ports(self, domid: int) -> RestorePorts:
        """(store port, store domain, console port, console domain) for the helper's argv."""
        return self._ports[domid]

    def restore_done(self, domid: int, store_mfn: int, console_mfn: int) -> None:
        """libxl__build_post and the devices before the device model, then
        XS_INTRODUCE (waited for: :meth:`start_restore_done` is the loop's form)."""
        config = self._restoring[domid]
        xsasync.run(self.xs, xenbuild.build_post(domid, config, self._ports[domid], store_mfn,
                                                 console_mfn))

    def start_restore_done(self, loop: Loop, domid: int, store_mfn: int, console_mfn: int,
                           done: Done) -> Cancellable:
        """:meth:`restore_done` on ``loop``: its XenStore rounds on a
        connection of their own, read as xenstored answers."""
        script = xenbuild.build_post(domid, self._restoring[domid], self._ports[domid],
                                     store_mfn, console_mfn)

        def finished(exc: Optional[Exception]) -> None:
            done(exc is None, "" if exc is None else f"XenStore: {xsasync.reason(exc)}")
        return xsasync.XsTask(loop, self._open_xs, script, finished,
                              f"domain {domid}'s build_post")

    def start_restore_device_model(self, loop: Loop, domid: int, records: List[EmulatorRecord],
                                   done: Callable[[bool, str], None]) -> Cancellable:
        """As libxl before the guest may run: the disks (with their hotplug
        scripts), an HVM guest's QEMU on the stream's saved state, the NICs."""
        config = self._restoring.pop(domid, None)
        self._ports.pop(domid, None)
        if config is None:
            return super().start_restore_device_model(loop, domid, records, done)
        opener = self._open_xs
        hvm_guest = (config.get("c_info") or {}).get("type") == "hvm"
        protocol = None
        if (config.get("c_info") or {}).get("type") == "pv":
            protocol = self.xc.native_protocol(domid)
        steps: List[xendevices.Step] = []
        for disk in libxlcfg.disks(config):
            steps += xendevices.add_disk(loop, opener, domid, disk, protocol)
        if hvm_guest:
            def start_dm(next_: Callable[[Optional[str]], None]) -> Cancellable:
                return hvm.DeviceModelStart(
                    loop, opener, domid, config, records,
                    lambda ok, why: next_(None if ok else why),
                    self._dm_procs)
            steps.append(start_dm)
            steps.append(lambda next_: hvm.ChardevPostconfig(
                loop, opener, domid, lambda ok, why: next_(None if ok else why)))
        for nic in libxlcfg.nics(config):
            steps += xendevices.add_nic(loop, opener, domid, nic)
        return xendevices.DeviceSteps(loop, steps, done)


def _xs_resume(domid: int) -> xsasync.XsScript[None]:
    """XS_RESUME: xenstored lets the resumed domain's frontends talk again."""
    [reply] = yield [(XS_RESUME, f"{domid}\0".encode(), 0)]
    xsasync.ok(reply)


class _Then:
    """A Cancellable whose part in flight changes as it goes (a read, then
    what it told)."""

    def __init__(self) -> None:
        self.part: Optional[Cancellable] = None
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        if self.part is not None:
            self.part.cancel()


def _copy(config: Dict[str, Any]) -> Dict[str, Any]:
    """A deep copy of a JSON config (the caller's stays as it was)."""
    out: Dict[str, Any] = json.loads(json.dumps(config))
    return out
