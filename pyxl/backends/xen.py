"""The real-Xen backend: what libxl does around the helper, in pure Python.

ctypes over Debian's libxenctrl/libxenguest (no compiled extension) for the
hypervisor, :mod:`pyxl.backends.xenstore` for XenStore.  Chosen by
:func:`pyxl.backends.default.default_backend` where ``/dev/xen/privcmd`` exists.

* suspend: "suspend" is written to ``/local/domain/D/control/shutdown``; a
  XenStore watch on ``@releaseDomain`` (its own xenstored connection, whose fd
  is registered with the operation's loop) wakes us on every domain state
  change, and ``xc_domain_getinfolist`` tells whether D has shut down with
  reason suspend (SHUTDOWN_suspend = 2).  A timer bounds the wait; on timeout
  the request is withdrawn (if the guest never picked it up) and the failure
  says so.
* resume: ``xc_domain_resume(fast=1)`` (the cooperative resume: the guest's
  suspend hypercall returns 1, "cancelled") then XS_RESUME, so xenstored
  reports the domain's next shutdown again.
* destroy: ``xc_domain_pause``, ``xc_domain_destroy``, then the XenStore nodes
  libxl would remove (``/local/domain/D``, its ``vm`` path, ``/libxl/D``,
  dom0's ``backend/*/D``) and libxl's userdata files for D.  xenstored drops
  its connection to D by itself once the domain is gone (@releaseDomain).
* domain config (what ``xl save`` puts in the xl header): the JSON libxl
  stored at creation, ``/var/lib/xen/userdata-d.D.UUID.libxl-json``.

* restore: the empty domain is made as libxl__domain_make/libxl__build_pre
  make it (xc_domain_create with the config's type, flags and limits,
  max vCPUs, max memory, the store and console event channels, TSC mode, and
  for PVH the timer mode, altp2m and paging pool), with libxl's XenStore
  skeleton and stored config; after the helper, the nodes of
  libxl__build_post and the primary console are written and the domain is
  introduced to xenstored with the restored store page (XS_INTRODUCE).
"""

from __future__ import annotations

import logging
import errno
import glob
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl.backends.base import NoDeviceModel, RestorePorts
from pyxl.errors import StartupError
from pyxl.loop import Loop, Timer
from pyxl.backends.xenctrl import DomInfo, Xc, XenError  # noqa: F401  (XenError: re-exported)
from pyxl.backends.xenstore import XenStore, XenStoreError, open_default

_log = logging.getLogger("pyxl.xen")

USERDATA_DIR = "/var/lib/xen"


XEN_DOMCTL_CDF_hvm, XEN_DOMCTL_CDF_hap, XEN_DOMCTL_CDF_oos_off = 1 << 0, 1 << 1, 1 << 3
XEN_DOMCTL_CDF_nested_virt, XEN_DOMCTL_CDF_vpmu = 1 << 4, 1 << 7
XEN_X86_EMU_LAPIC = 1 << 0
XEN_X86_MSR_RELAXED = 1 << 0
HVM_PARAM_TIMER_MODE, HVM_PARAM_ALTP2M = 10, 35
LIBXL_MAXMEM_CONSTANT = 1024  # kB, libxl__arch_extra_memory on x86
LIBXL_XENCONSOLE_LIMIT = 1048576
TSC_MODES = {"default": 0, "always_emulate": 1, "native": 2}
TIMER_MODES = {"delay_for_missed_ticks": 0, "no_delay_for_missed_ticks": 1,
               "no_missed_ticks_pending": 2, "one_missed_tick_pending": 3}
ALTP2M_MODES = {"disabled": 0, "mixed": 1, "external": 2, "limited": 3}


def _defbool(v: Any, default: bool) -> bool:
    """libxl's JSON for a defbool: true/false, "True"/"False", or "<default>"."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return default


def _int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


class XenBackend(NoDeviceModel):
    """Domains of the Xen hypervisor this host runs on (dom0)."""

    name = "xen"
    sim_dir = None

    def __init__(self) -> None:
        self.xc = Xc()
        self._xs: Optional[XenStore] = None
        self._ports: Dict[int, Tuple[int, int, int, int]] = {}
        self._restoring: Dict[int, Dict[str, Any]] = {}

    @property
    def xs(self) -> XenStore:
        if self._xs is None:
            try:
                self._xs = open_default()
            except OSError as exc:
                raise StartupError(f"cannot talk to xenstored: {exc}") from exc
        return self._xs

    def helper_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.pop("PYXL_SIM_DIR", None)
        return env

    def _info(self, domid: int) -> DomInfo:
        info = self.xc.getinfo(domid)
        if info is None:
            raise StartupError(f"no such domain: {domid}")
        return info

    def check_domain(self, domid: int) -> None:
        if domid == 0:
            raise StartupError("domain 0 cannot be saved")
        self._info(domid)

    def domain_config(self, domid: int) -> Dict[str, Any]:
        info = self._info(domid)
        path = os.path.join(USERDATA_DIR, f"userdata-d.{domid}.{info.uuid}.libxl-json")
        try:
            with open(path, "rb") as f:
                # libxl writes the JSON string with its terminating NUL.
                cfg: Dict[str, Any] = json.loads(f.read().rstrip(b"\0").decode())
        except FileNotFoundError:
            raise StartupError(f"domain {domid} has no libxl config ({path}): pyxl saves "
                               "domains created by xl/libxl or by pyxl") from None
        except (OSError, ValueError) as exc:
            raise StartupError(f"cannot read domain {domid}'s config {path}: {exc}") from exc
        # As libxl_retrieve_domain_configuration (what `xl save` writes): the
        # current name and memory from XenStore, the uuid from Xen.  The
        # stored name is stale after a rename (xl migrate's NAME--incoming).
        c_info = cfg.setdefault("c_info", {})
        b_info = cfg.setdefault("b_info", {})
        c_info["uuid"] = info.uuid
        try:
            name = self.xs.read(f"/local/domain/{domid}/name")
            if name:
                c_info["name"] = name.decode()
            for node, key in (("memory/static-max", "max_memkb"),
                              ("memory/target", "target_memkb")):
                raw = self.xs.read(f"/local/domain/{domid}/{node}")
                if raw and raw.isdigit():
                    val = int(raw)
                    if key == "target_memkb":
                        val += max(0, _int(b_info.get("video_memkb"), 0))
                    b_info[key] = val
        except OSError as exc:
            raise StartupError(f"cannot read domain {domid} from XenStore: {exc}") from exc
        return cfg

    # -- suspend --------------------------------------------------------------
    def start_suspend(self, loop: Loop, domid: int, timeout: float,
                      done: Callable[[bool, str], None]) -> Timer:
        """Ask the guest to suspend; call ``done(ok, why)`` from the loop once Xen says it has."""
        return _Suspend(self, loop, domid, timeout, done)

    def resume(self, domid: int) -> None:
        self.xc.resume(domid, fast=True)
        self.xs.resume(domid)

    def pause(self, domid: int) -> None:
        self.xc.pause(domid)

    def unpause(self, domid: int) -> None:
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

    def destroy(self, domid: int) -> None:
        info = self.xc.getinfo(domid)
        dom_path = f"/local/domain/{domid}"
        vm = None
        try:
            raw = self.xs.read(f"{dom_path}/vm")
            vm = raw.decode() if raw else None
        except (OSError, XenStoreError):
            pass
        if info is not None:
            try:
                self.xc.pause(domid)
            except XenError:
                pass
            self.xc.destroy(domid)
        xs = self.xs
        for btype in xs.directory("/local/domain/0/backend"):
            xs.rm(f"/local/domain/0/backend/{btype}/{domid}")
        xs.rm(dom_path)
        # /vm/UUID is shared with the other copy after a migration on this
        # host (same uuid): it goes with the last domain that names it.
        if vm and vm.startswith("/vm/") and not any(
                (xs.read(f"/local/domain/{other}/vm") or b"").decode(errors="replace") == vm
                for other in self._domids() if other != domid):
            xs.rm(vm)
        xs.rm(f"/libxl/{domid}")
        uuid = info.uuid if info is not None else "*"
        for f in glob.glob(os.path.join(USERDATA_DIR, f"userdata-d.{domid}.{uuid}.*")):
            try:
                os.unlink(f)
            except OSError:
                pass

    # -- restore ---------------------------------------------------------------
    def create_restore_target(self, config: Dict[str, Any]) -> int:
        """The empty domain a restore goes into, as libxl__domain_make +
        libxl__build_pre make it for a PV or PVH guest (no devices but the
        console and XenStore).  Half-made domains are destroyed on failure."""
        c_info = config.get("c_info") or {}
        b_info = config.get("b_info") or {}
        dtype = c_info.get("type") or "pv"
        if dtype not in ("pv", "pvh"):
            raise StartupError(f"pyxl restores PV and PVH guests, not {dtype!r}")
        if not config.get("b_info"):
            raise StartupError("saved config has no b_info")
        try:
            max_memkb = int(b_info["max_memkb"])
            target_memkb = int(b_info.get("target_memkb", max_memkb))
        except (KeyError, TypeError, ValueError) as exc:
            raise StartupError("saved config has no usable b_info.max_memkb") from exc
        name = c_info.get("name") or "restored"
        for other in self._domids():
            raw = self.xs.read(f"/local/domain/{other}/name")
            if raw is not None and raw.decode(errors="replace") == name:
                raise StartupError(f"domain {name!r} already exists (domid {other})")
        uuid = c_info.get("uuid") or ""
        try:
            handle = bytes.fromhex(uuid.replace("-", ""))
            assert len(handle) == 16
        except (ValueError, AssertionError):
            handle = os.urandom(16)
            uuid = handle.hex()
            uuid = f"{uuid[:8]}-{uuid[8:12]}-{uuid[12:16]}-{uuid[16:20]}-{uuid[20:]}"
        flags = 0
        emu = 0
        if dtype == "pvh":
            flags |= XEN_DOMCTL_CDF_hvm
            if _defbool(c_info.get("hap"), True):
                flags |= XEN_DOMCTL_CDF_hap
            if not _defbool(c_info.get("oos"), True):
                flags |= XEN_DOMCTL_CDF_oos_off
            if _defbool(b_info.get("nested_hvm"), False):
                flags |= XEN_DOMCTL_CDF_nested_virt
            emu = XEN_X86_EMU_LAPIC
        if _defbool(b_info.get("vpmu"), False):
            flags |= XEN_DOMCTL_CDF_vpmu
        misc = XEN_X86_MSR_RELAXED if _defbool((b_info.get("arch_x86") or {})
                                               .get("msr_relaxed"), False) else 0
        max_vcpus = _int(b_info.get("max_vcpus"), 1)
        grant_version = _int(b_info.get("max_grant_version"), -1)
        if grant_version < 0:
            grant_version = 2
        try:
            domid = self.xc.create(handle, flags, max_vcpus,
                                   _int(b_info.get("event_channels"), 1023),
                                   _int(b_info.get("max_grant_frames"), -1),
                                   _int(b_info.get("max_maptrack_frames"), -1),
                                   grant_version & 0xF, _int(c_info.get("poolid"), 0),
                                   emu, misc, _int(c_info.get("ssidref"), 0))
        except OSError as exc:
            raise StartupError(f"cannot create the domain to restore into: {exc}") from exc
        try:
            self._build_pre(domid, dtype, c_info, b_info, max_memkb, target_memkb)
            self._make_xenstore(domid, dtype, name, uuid)
            self._write_userdata(domid, uuid, config)
        except BaseException as exc:
            try:
                self.destroy(domid)
            except Exception:
                pass
            if isinstance(exc, OSError):
                raise StartupError(f"cannot prepare domain {domid} for the restore: {exc}") from exc
            raise
        self._restoring[domid] = {"type": dtype, "b_info": b_info, "name": name,
                                  "max_memkb": max_memkb, "target_memkb": target_memkb}
        return domid

    def rename(self, domid: int, name: str) -> None:
        """Rename a domain (XenStore and libxl's stored config), as
        libxl__domain_rename does; for a migration receiver's
        ``NAME--incoming`` -> ``NAME`` once the source is gone."""
        for other in self._domids():
            raw = self.xs.read(f"/local/domain/{other}/name")
            if other != domid and raw is not None and raw.decode(errors="replace") == name:
                raise XenError(errno.EEXIST, f"domain {name!r} already exists (domid {other})")
        info = self._info(domid)
        dom = f"/local/domain/{domid}"
        vm = (self.xs.read(f"{dom}/vm") or b"").decode()
        tx = self.xs.transaction_start()
        try:
            self.xs.write(f"{dom}/name", name, tx)
            if vm:
                self.xs.write(f"{vm}/name", name, tx)
        except BaseException:
            self.xs.transaction_end(tx, commit=False)
            raise
        self.xs.transaction_end(tx)
        path = os.path.join(USERDATA_DIR, f"userdata-d.{domid}.{info.uuid}.libxl-json")
        try:
            with open(path, "rb") as f:
                cfg: Dict[str, Any] = json.loads(f.read().rstrip(b"\0").decode())
        except (OSError, ValueError):
            return
        cfg.setdefault("c_info", {})["name"] = name
        self._write_userdata(domid, info.uuid, cfg)

    def _domids(self) -> List[int]:
        return [int(d) for d in self.xs.directory("/local/domain") if d.isdigit()]

    def _build_pre(self, domid: int, dtype: str, c_info: Dict[str, Any],
                   b_info: Dict[str, Any], max_memkb: int, target_memkb: int) -> None:
        xc = self.xc
        xc.call("xc_domain_max_vcpus", domid, _int(b_info.get("max_vcpus"), 1))
        xc.call("xc_domain_setmaxmem", domid, target_memkb + LIBXL_MAXMEM_CONSTANT)
        store_dom = _int((self.xs.read("/tool/xenstored/domid") or b"0").decode(), 0)
        console_dom = _int((self.xs.read("/tool/xenconsoled/domid") or b"0").decode(), 0)
        store_port = xc.call("xc_evtchn_alloc_unbound", domid, store_dom)
        console_port = xc.call("xc_evtchn_alloc_unbound", domid, console_dom)
        self._ports[domid] = (store_port, store_dom, console_port, console_dom)
        # libxl__arch_domain_create (x86)
        if dtype == "pvh":
            xc.call("xc_hvm_param_set", domid, HVM_PARAM_TIMER_MODE,
                    TIMER_MODES.get(str(b_info.get("timer_mode")), 1))
            xc.call("xc_hvm_param_set", domid, HVM_PARAM_ALTP2M,
                    ALTP2M_MODES.get(str(b_info.get("altp2m")), 0))
        else:
            pv = (b_info.get("type.pv") or {})
            xc.call("xc_domain_set_memmap_limit", domid,
                    max_memkb + _int(pv.get("slack_memkb"), 0))
        tsc = str(b_info.get("tsc_mode") or "default")
        if tsc not in TSC_MODES:
            raise StartupError(f"tsc_mode {tsc!r} is not supported")
        xc.call("xc_domain_set_tsc_info", domid, TSC_MODES[tsc], 0, 0, 0)
        if dtype == "pvh":
            shadow_kb = _int(b_info.get("shadow_memkb"), -1)
            if shadow_kb <= 0:  # libxl_get_required_shadow_memory
                shadow_kb = 4 * (256 * _int(b_info.get("max_vcpus"), 1) + 2 * (max_memkb // 1024))
            xc.call("xc_set_paging_mempool_size", domid, shadow_kb << 10)

    def _make_xenstore(self, domid: int, dtype: str, name: str, uuid: str) -> None:
        """The nodes libxl__domain_make writes, with its permissions."""
        xs = self.xs
        dom, vm, lx = f"/local/domain/{domid}", f"/vm/{uuid}", f"/libxl/{domid}"
        ro, rw, no = ["n0", f"r{domid}"], [f"n{domid}"], ["n0"]
        tx = xs.transaction_start()
        try:
            def mknod(path: str, perms: List[Any]) -> None:
                xs.write(path, b"", tx)
                xs.set_perms(path, perms, tx)
            for path, perms in ((dom, ro), (vm, ro), (lx, no)):
                xs.rm(path, tx)
                mknod(path, perms)
            mknod(f"{lx}/device", no)
            xs.write(f"{dom}/vm", vm, tx)
            xs.write(f"{dom}/name", name, tx)
            for sub in ("cpu", "memory", "device", "control"):
                mknod(f"{dom}/{sub}", ro)
            mknod(f"{dom}/device/suspend/event-channel", rw)
            for sub in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                        "control/feature-suspend", "control/sysrq", "data", "drivers",
                        "feature", "attr", "error"):
                mknod(f"{dom}/{sub}", rw)
            xs.write(f"{vm}/uuid", uuid, tx)
            xs.write(f"{vm}/name", name, tx)
            xs.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1", tx)
            xs.write(f"{dom}/control/platform-feature-xs_reset_watches", "1", tx)
            xs.write(f"{lx}/type", dtype, tx)
        except BaseException:
            xs.transaction_end(tx, commit=False)
            raise
        xs.transaction_end(tx)

    def _write_userdata(self, domid: int, uuid: str, config: Dict[str, Any]) -> None:
        """libxl's stored config, so xl and pyxl can save the domain again."""
        cfg = json.loads(json.dumps(config))
        cfg.setdefault("c_info", {})["uuid"] = uuid
        path = os.path.join(USERDATA_DIR, f"userdata-d.{domid}.{uuid}.libxl-json")
        tmp = path + ".pyxl-tmp"
        with open(tmp, "wb") as f:
            f.write(json.dumps(cfg, indent=4).encode() + b"\n\0")
        os.rename(tmp, path)

    def restore_ports(self, domid: int) -> RestorePorts:
        """(store port, store domain, console port, console domain) for the helper's argv."""
        return self._ports[domid]

    def restore_done(self, domid: int, store_mfn: int, console_mfn: int) -> None:
        """libxl__build_post and the primary console's nodes, then XS_INTRODUCE."""
        st = self._restoring.pop(domid)
        store_port, store_dom, console_port, console_dom = self._ports.pop(domid)
        b_info = st["b_info"]
        dom = f"/local/domain/{domid}"
        video = max(0, _int(b_info.get("video_memkb"), 0))
        ents = {
            "memory/static-max": st["max_memkb"],
            "memory/target": st["target_memkb"] - video,
            "memory/videoram": _int(b_info.get("video_memkb"), -1),
            "domid": domid,
            "store/port": store_port,
            "store/ring-ref": store_mfn,
        }
        avail = b_info.get("avail_vcpus")
        for i in range(_int(b_info.get("max_vcpus"), 1)):
            online = (avail is None or i in avail) if isinstance(avail, list) else True
            ents[f"cpu/{i}/availability"] = "online" if online else "offline"
        xs = self.xs
        vm = (xs.read(f"{dom}/vm") or b"").decode()
        tx = xs.transaction_start()
        try:
            for k, v in ents.items():
                xs.write(f"{dom}/{k}", str(v), tx)
            if vm:
                xs.write(f"{vm}/start_time", f"{time.time():.2f}", tx)
            # the primary console (libxl__device_console_add, xenconsoled
            # backend): the nodes and permissions `xl create` leaves
            con = f"{dom}/console"
            back = f"/local/domain/{console_dom}/backend/console/{domid}/0"
            ro = ["n0", f"r{domid}"]
            xs.write(con, b"", tx)
            xs.set_perms(con, ro, tx)
            for k, v in (("backend", back), ("backend-id", console_dom),
                         ("limit", LIBXL_XENCONSOLE_LIMIT), ("type", "xenconsoled"),
                         ("output", "pty"), ("tty", ""), ("port", console_port),
                         ("ring-ref", console_mfn)):
                xs.write(f"{con}/{k}", str(v), tx)
                xs.set_perms(f"{con}/{k}", ro, tx)
            xs.set_perms(f"{con}/backend-id", [f"n{domid}", f"r{console_dom}"], tx)
            xs.write(back, b"", tx)
            xs.set_perms(back, ["n0", f"r{domid}"], tx)
            lx = f"/libxl/{domid}/device/console/0"
            for k, v in (("frontend", con), ("frontend-id", domid), ("online", 1),
                         ("state", 1), ("protocol", "vt100")):
                xs.write(f"{back}/{k}", str(v), tx)
                xs.write(f"{lx}/{k}", str(v), tx)
            xs.write(f"{lx}/backend", back, tx)
        except BaseException:
            xs.transaction_end(tx, commit=False)
            raise
        xs.transaction_end(tx)
        xs.introduce(domid, store_mfn, store_port)


class _Suspend:
    """One suspend in flight: a @releaseDomain watch on its own xenstored connection."""

    def __init__(self, be: XenBackend, loop: Loop, domid: int, timeout: float,
                 done: Callable[[bool, str], None]) -> None:
        self.be, self.loop, self.domid, self.timeout = be, loop, domid, timeout
        self._done_cb = done
        self.finished = False
        self.token = f"pyxl-suspend-{os.getpid()}-{domid}-{id(self):x}"
        self.xs: Optional[XenStore] = None
        self.timer: Optional[Timer] = None
        self.started = time.monotonic()
        self.events = 0
        try:
            self.xs = open_default()
            self.xs.watch("@releaseDomain", self.token)
            self.xs.write(f"/local/domain/{domid}/control/shutdown", "suspend")
        except OSError as exc:
            self._close()
            why = f"XenStore: {exc}"  # exc itself is unbound once the except block ends
            self.timer = loop.call_later(0, lambda: self._finish(False, why))
            return
        loop.add_reader(self.xs.fileno(), self._readable)
        self.timer = loop.call_later(timeout, self._timed_out)

    def _close(self) -> None:
        if self.xs is not None:
            try:
                self.loop.remove_reader(self.xs.fileno())
            except Exception:
                pass
            self.xs.close()
            self.xs = None

    def cancel(self) -> None:
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self._close()

    def _finish(self, ok: bool, why: str) -> None:
        if self.finished:
            return
        self.cancel()
        _log.info("domain %d %s after %.3f s (%d @releaseDomain events)", self.domid,
                  "suspended" if ok else f"did not suspend ({why})",
                  time.monotonic() - self.started, self.events)
        self._done_cb(ok, why)

    def _state(self) -> Optional[str]:
        """None while the guest is still on its way; "" once suspended; else why not."""
        info = self.be.xc.getinfo(self.domid)
        if info is None or info.dying:
            return f"domain {self.domid} disappeared while suspending"
        if info.suspended:
            return ""
        if info.shutdown:
            return f"domain {self.domid} shut down with reason {info.shutdown_reason}, not suspend"
        return None

    def _readable(self) -> None:
        if self.xs is None:
            return
        try:
            self.events += len(self.xs.events())
            why = self._state()
        except OSError as exc:
            self._finish(False, f"while waiting for the suspend: {exc}")
            return
        if why is not None:
            self._finish(why == "", why)

    def _timed_out(self) -> None:
        if self.finished:
            return
        # Withdraw the request if the guest never picked it up (libxl does the
        # same), so it cannot suspend later behind our back.
        try:
            xs = self.xs
            if xs is not None:
                path = f"/local/domain/{self.domid}/control/shutdown"
                if xs.read(path) == b"suspend":
                    xs.write(path, "")
            why = self._state()
        except OSError:
            why = None
        if why == "":
            self._finish(True, "")
            return
        self._finish(False, why or (f"guest did not suspend within {self.timeout:g}s "
                                    "(no PV drivers answering control/shutdown?)"))
