"""The empty domain a restore goes into, as libxl 4.17 builds it: PV, PVH, HVM.

* :func:`create_flags`: libxl__domain_make's xc_domain_create arguments
  (libxl_x86.c libxl__arch_domain_prepare_config: HVM emulates everything
  but vPCI, PVH only the local APIC);
* :func:`build_pre`: libxl__build_pre + libxl__arch_domain_create (max vCPUs,
  max memory, the store and console event channels, HVM params, TSC mode, RTC
  offset, paging pool) -- hypercalls only, run in a child by
  :mod:`pyxl.backends.xenmake`, with the store's and console's domains
  :func:`service_domains` read; viridian and CPUID are not set on restore,
  they come with the stream;
* :func:`make_xenstore`: libxl__domain_make's XenStore skeleton with its
  permissions, plus store_libxl_entry's ``/libxl/D/dm-version``;
* :func:`build_post`: libxl__build_post after the stream (memory, store nodes,
  the ``/vm`` entries of domcreate_stream_done), the primary console
  (libxl__device_console_add) and, for HVM, the vkb QEMU serves; then the
  domain is introduced to xenstored;
* :func:`device_generic_add`: libxl__device_generic_add, the frontend,
  backend and ``/libxl`` nodes of one device with libxl's permissions.

Functions of an ``Xc`` and a ``XenStore``; they raise OSError (XenError,
XenStoreError) or StartupError.

:func:`make_xenstore` and :func:`build_post` are XenStore scripts
(:mod:`pyxl.backends.xsasync`), as is :func:`service_domains`: run on the loop, or waited for with ``run``.

May import: pyxl.backends.libxlcfg, pyxl.backends.xenstore, pyxl.backends.xsasync,
pyxl.errors.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Dict, List, Optional, Protocol, Sequence, Tuple

from pyxl.backends import libxlcfg
from pyxl.backends.libxlcfg import b_hvm, defbool, to_int
from pyxl.backends.xenstore import XS_INTRODUCE, XS_READ, Batch, XenStore
from pyxl.backends.xsasync import XsScript, missing, ok, transaction
from pyxl.errors import StartupError

__all__ = ["Ports", "build_post", "build_pre", "create_flags", "device_generic_add",
           "make_xenstore", "service_domains", "userdata_path", "write_userdata"]

XEN_DOMCTL_CDF_hvm, XEN_DOMCTL_CDF_hap, XEN_DOMCTL_CDF_oos_off = 1 << 0, 1 << 1, 1 << 3
XEN_DOMCTL_CDF_nested_virt, XEN_DOMCTL_CDF_vpmu = 1 << 4, 1 << 7
XEN_X86_EMU_LAPIC = 1 << 0
#: XEN_X86_EMU_ALL of Xen 4.17: LAPIC .. USE_PIRQ (bits 0-9) and VPCI (bit 10)
XEN_X86_EMU_ALL, XEN_X86_EMU_VPCI = 0x7FF, 1 << 10
XEN_X86_MSR_RELAXED = 1 << 0
HVM_PARAM_TIMER_MODE, HVM_PARAM_HPET_ENABLED, HVM_PARAM_VPT_ALIGN = 10, 11, 16
HVM_PARAM_ALTP2M, HVM_PARAM_MCA_CAP = 35, 38
LIBXL_MAXMEM_CONSTANT = 1024  # kB, libxl__arch_extra_memory on x86
LIBXL_XENCONSOLE_LIMIT = 1048576
TSC_MODES = {"default": 0, "always_emulate": 1, "native": 2}
TIMER_MODES = {"delay_for_missed_ticks": 0, "no_delay_for_missed_ticks": 1,
               "no_missed_ticks_pending": 2, "one_missed_tick_pending": 3}
ALTP2M_MODES = {"disabled": 0, "mixed": 1, "external": 2, "limited": 3}
XENBUS_INITIALISING = 1

#: (store port, store's domain, console port, console's domain)
Ports = Tuple[int, int, int, int]


class XcCalls(Protocol):
    """What the builders ask of :class:`pyxl.backends.xenctrl.Xc`."""

    #: The Xen release ("4.17", "4.20"): where the altp2m mode goes.
    release: str

    def call(self, fn: str, *args: Any) -> int: ...

    def create(self, handle: bytes, flags: int, max_vcpus: int, max_evtchn_port: int,
               max_grant_frames: int, max_maptrack_frames: int, grant_opts: int,
               cpupool: int, emulation_flags: int, misc_flags: int, ssidref: int = 0,
               altp2m: int = 0) -> int: ...


def altp2m_mode(config: Dict[str, Any]) -> int:
    """The altp2m mode libxl gives the domain (0: disabled)."""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    altp2m = _enum(ALTP2M_MODES, b_info.get("altp2m"), "disabled", "altp2m")
    if (c_info.get("type") or "pv") == "hvm" and altp2m == 0 and \
            defbool(b_hvm(config).get("altp2m"), False):
        altp2m = 1      # the legacy altp2mhvm=1
    return altp2m


def create_flags(config: Dict[str, Any]) -> Tuple[int, int, int]:
    """(createdomain flags, x86 emulation flags, x86 misc flags) for the config."""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    dtype = c_info.get("type") or "pv"
    flags = emu = 0
    if dtype != "pv":
        flags |= XEN_DOMCTL_CDF_hvm
        if defbool(c_info.get("hap"), True):
            flags |= XEN_DOMCTL_CDF_hap
        if not defbool(c_info.get("oos"), True):
            flags |= XEN_DOMCTL_CDF_oos_off
        if defbool(b_info.get("nested_hvm"), False) or defbool(b_hvm(config).get("nested_hvm"),
                                                                False):
            flags |= XEN_DOMCTL_CDF_nested_virt
        emu = XEN_X86_EMU_LAPIC if dtype == "pvh" else XEN_X86_EMU_ALL & ~XEN_X86_EMU_VPCI
    if defbool(b_info.get("vpmu"), False):
        flags |= XEN_DOMCTL_CDF_vpmu
    misc = XEN_X86_MSR_RELAXED if defbool((b_info.get("arch_x86") or {}).get("msr_relaxed"),
                                          False) else 0
    return flags, emu, misc


def _enum(table: Dict[str, int], v: Any, default: str, what: str) -> int:
    key = str(v or default).lower()
    if key == "unknown":
        key = default
    if key not in table:
        raise StartupError(f"{what} {v!r} is not supported")
    return table[key]


def _rtc_offset(b_info: Dict[str, Any]) -> int:
    """libxl__arch_domain_create: rtc_timeoffset, plus the host's UTC offset
    with localtime=1."""
    offset = to_int(b_info.get("rtc_timeoffset"), 0)
    if defbool(b_info.get("localtime"), False):
        offset += time.localtime().tm_gmtoff
    return offset


def service_domains() -> XsScript[Tuple[int, int]]:
    """(xenstored's domain, xenconsoled's domain): 0 unless a stub domain runs them."""
    replies = yield [(XS_READ, b"/tool/xenstored/domid\0", 0),
                     (XS_READ, b"/tool/xenconsoled/domid\0", 0)]
    return tuple(0 if missing(r) else to_int(ok(r).rstrip(b"\0").decode(errors="replace"), 0)
                 for r in replies)   # type: ignore[return-value]


def build_pre(xc: XcCalls, domid: int, config: Dict[str, Any], store_dom: int,
              console_dom: int) -> Ports:
    """libxl__build_pre for a restore; returns the event channels it allocated.
    Hypercalls only: it runs in a child (:mod:`pyxl.backends.xenmake`)."""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    dtype = c_info.get("type") or "pv"
    hvm = b_hvm(config)
    max_memkb = to_int(b_info.get("max_memkb"), 0)
    target_memkb = to_int(b_info.get("target_memkb"), max_memkb)
    xc.call("xc_domain_max_vcpus", domid, to_int(b_info.get("max_vcpus"), 1))
    xc.call("xc_domain_setmaxmem", domid, target_memkb + LIBXL_MAXMEM_CONSTANT)
    store_port = xc.call("xc_evtchn_alloc_unbound", domid, store_dom)
    console_port = xc.call("xc_evtchn_alloc_unbound", domid, console_dom)
    # libxl__arch_domain_create (x86): hvm_set_conf_params first
    if dtype == "hvm":
        xc.call("xc_hvm_param_set", domid, HVM_PARAM_HPET_ENABLED,
                int(defbool(hvm.get("hpet"), True)))
        xc.call("xc_hvm_param_set", domid, HVM_PARAM_VPT_ALIGN,
                int(defbool(hvm.get("vpt_align"), True)))
        mca = to_int(hvm.get("mca_caps"), 0)
        if mca:
            xc.call("xc_hvm_param_set", domid, HVM_PARAM_MCA_CAP, mca)
    if dtype in ("hvm", "pvh"):
        mode = b_info.get("timer_mode") or hvm.get("timer_mode")
        xc.call("xc_hvm_param_set", domid, HVM_PARAM_TIMER_MODE,
                _enum(TIMER_MODES, mode, "no_delay_for_missed_ticks", "timer_mode"))
        if xc.release == "4.17":
            # 4.19 and later take the mode at creation (altp2m_opts) and
            # refuse the param (read-only: EEXIST).
            xc.call("xc_hvm_param_set", domid, HVM_PARAM_ALTP2M, altp2m_mode(config))
    else:
        pv = b_info.get("type.pv") or {}
        xc.call("xc_domain_set_memmap_limit", domid,
                max_memkb + (libxlcfg.memkb(pv.get("slack_memkb")) or 0))
    tsc = _enum(TSC_MODES, b_info.get("tsc_mode"), "default", "tsc_mode")
    xc.call("xc_domain_set_tsc_info", domid, tsc, 0, 0, 0)
    rtc = _rtc_offset(b_info)
    if rtc:
        xc.call("xc_domain_set_time_offset", domid, rtc)
    if dtype != "pv":
        xc.call("xc_set_paging_mempool_size", domid, libxlcfg.paging_memkb(config) << 10)
    return store_port, store_dom, console_port, console_dom


def make_xenstore(domid: int, config: Dict[str, Any], name: str, uuid: str) -> XsScript[None]:
    """The nodes libxl__domain_make writes, with its permissions, and
    ``/libxl/D/dm-version`` (store_libxl_entry: qemu_xen, libxl's default for
    every type): one transaction, as a script (:mod:`xsasync`)."""
    dtype = (config.get("c_info") or {}).get("type") or "pv"
    c_info = config.get("c_info") or {}
    dom, vm, lx = f"/local/domain/{domid}", f"/vm/{uuid}", f"/libxl/{domid}"
    ro, rw, no = ["n0", f"r{domid}"], [f"n{domid}"], ["n0"]

    def fill(b: Batch, tx: int) -> None:
        def mknod(path: str, perms: List[str]) -> None:
            b.write(path, b"", tx)
            b.set_perms(path, perms, tx)
        for path, perms in ((dom, ro), (vm, ro), (lx, no)):
            b.rm(path, tx)
            mknod(path, perms)
        mknod(f"{lx}/device", no)
        b.write(f"{dom}/vm", vm, tx)
        b.write(f"{dom}/name", name, tx)
        for sub in ("cpu", "memory", "device", "control"):
            mknod(f"{dom}/{sub}", ro)
        mknod(f"{dom}/device/suspend/event-channel", rw)
        if dtype == "hvm":
            mknod(f"{dom}/hvmloader", ro)
        features = ["poweroff", "reboot", "suspend"] + (["s3", "s4"] if dtype == "hvm" else [])
        for sub in (["control/shutdown"] + [f"control/feature-{f}" for f in features]
                    + ["control/sysrq", "data", "drivers", "feature", "attr", "error"]):
            mknod(f"{dom}/{sub}", rw)
        b.write(f"{vm}/uuid", uuid, tx)
        b.write(f"{vm}/name", name, tx)
        for base, kvs in ((dom, c_info.get("xsdata")), (f"{dom}/platform",
                                                         c_info.get("platformdata"))):
            if isinstance(kvs, dict):
                for k, v in kvs.items():
                    b.write(f"{base}/{k}", str(v), tx)
        b.write(f"{dom}/control/platform-feature-multiprocessor-suspend", "1", tx)
        b.write(f"{dom}/control/platform-feature-xs_reset_watches", "1", tx)
        b.write(f"{lx}/type", dtype, tx)
        b.write(f"{lx}/dm-version", "qemu_xen", tx)
    yield from transaction(fill)


def device_generic_add(xs: "XenStore | Batch", tx: int, domid: int, kind: str, devid: int,
                       backend_kind: str, backend_domid: int,
                       bents: Sequence[Tuple[str, Any]], fents: Sequence[Tuple[str, Any]],
                       ro_fents: Sequence[Tuple[str, Any]] = ()) -> Tuple[str, str]:
    """libxl__device_generic_add: the frontend (owned by the guest, readable by
    the backend; console 0's by the backend domain), the backend (owned by
    its domain, readable by the guest), each pointing at the other, and a copy
    of the backend's entries under ``/libxl/D/device``.  Returns (frontend,
    backend) paths."""
    console0 = kind == "console" and devid == 0
    front = f"/local/domain/{domid}/" + ("console" if console0 else f"device/{kind}/{devid}")
    back = f"/local/domain/{backend_domid}/backend/{backend_kind}/{domid}/{devid}"
    lx = f"/libxl/{domid}/device/{kind}/{devid}"
    fperms = [f"n{domid}", f"r{backend_domid}"]
    roperms = [f"n{backend_domid}", f"r{domid}"]
    xs.rm(lx, tx)
    xs.write(f"{lx}/frontend", front, tx)
    xs.write(f"{lx}/backend", back, tx)
    if fents or ro_fents:
        xs.rm(front, tx)
        xs.mkdir(front, tx)
        xs.set_perms(front, roperms if console0 else fperms, tx)
        xs.write(f"{front}/backend", back, tx)
        for entries, perms in ((fents, fperms), (ro_fents, roperms)):
            for k, v in entries:
                xs.write(f"{front}/{k}", str(v), tx)
                xs.set_perms(f"{front}/{k}", perms, tx)
    xs.rm(back, tx)
    xs.mkdir(back, tx)
    xs.set_perms(back, roperms, tx)
    xs.write(f"{back}/frontend", front, tx)
    for k, v in bents:
        xs.write(f"{back}/{k}", str(v), tx)
        xs.write(f"{lx}/{k}", str(v), tx)
    return front, back


def build_post(domid: int, config: Dict[str, Any], ports: Ports, store_mfn: int,
               console_mfn: int) -> XsScript[None]:
    """libxl__build_post and the devices libxl adds before the device model
    (the primary console; for HVM the vkb), then XS_INTRODUCE: a script
    (:mod:`xsasync`) of four rounds (the ``/vm`` path, the transaction's
    three)."""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    dtype = c_info.get("type") or "pv"
    store_port, _store_dom, console_port, console_dom = ports
    dom = f"/local/domain/{domid}"
    max_memkb = to_int(b_info.get("max_memkb"), 0)
    target_memkb = to_int(b_info.get("target_memkb"), max_memkb)
    video = libxlcfg.video_memkb(config)
    fudge = video + (LIBXL_MAXMEM_CONSTANT if dtype == "hvm" and max_memkb > target_memkb else 0)
    ents: Dict[str, Any] = {
        "memory/static-max": max_memkb,
        "memory/target": target_memkb - fudge,
        "memory/videoram": video,
        "domid": domid,
        "store/port": store_port,
        "store/ring-ref": store_mfn,
    }
    if dtype == "hvm":
        online = libxlcfg.avail_vcpus(b_info)
    else:
        avail = b_info.get("avail_vcpus")
        online = avail if isinstance(avail, list) else list(range(to_int(b_info.get("max_vcpus"),
                                                                             1)))
    for i in range(to_int(b_info.get("max_vcpus"), 1)):
        ents[f"cpu/{i}/availability"] = "online" if i in online else "offline"
    # domcreate_stream_done's /vm entries
    vments: List[Tuple[str, str]] = []
    if dtype == "hvm":
        vments = [("rtc/timeoffset", str(b_hvm(config).get("timeoffset") or "")),
                  ("image/ostype", "hvm")]
    vments.append(("start_time", f"{time.time():.2f}"))
    [vm_reply] = yield [(XS_READ, f"{dom}/vm\0".encode(), 0)]
    vm = b"" if missing(vm_reply) else ok(vm_reply)

    def fill(b: Batch, tx: int) -> None:
        for k, v in ents.items():
            b.write(f"{dom}/{k}", str(v), tx)
        if vm:
            for k, v in vments:
                b.write(f"{vm.decode()}/{k}", v, tx)
        # the primary console: xenconsoled's, the nodes `xl create` leaves
        device_generic_add(
            b, tx, domid, "console", 0, "console", console_dom,
            bents=[("frontend-id", domid), ("online", 1), ("state", XENBUS_INITIALISING),
                   ("protocol", "vt100")],
            fents=[("backend-id", console_dom)],
            ro_fents=[("limit", LIBXL_XENCONSOLE_LIMIT), ("type", "xenconsoled"),
                      ("output", "pty"), ("tty", ""), ("port", console_port),
                      ("ring-ref", console_mfn)])
        if dtype == "hvm" and defbool(b_hvm(config).get("vkb_device"), True):
            # libxl__device_add(vkb): QEMU's backend, in dom0
            device_generic_add(
                b, tx, domid, "vkbd", 0, "vkbd", 0,
                bents=[("frontend-id", domid), ("online", 1), ("state", XENBUS_INITIALISING)],
                fents=[("backend-id", 0), ("state", XENBUS_INITIALISING)])
    yield from transaction(fill)
    [introduced] = yield [(XS_INTRODUCE, f"{domid}\0{store_mfn}\0{store_port}\0".encode(), 0)]
    ok(introduced)


def userdata_path(userdata_dir: str, domid: int, uuid: str) -> str:
    return os.path.join(userdata_dir, f"userdata-d.{domid}.{uuid}.libxl-json")


def write_userdata(userdata_dir: str, domid: int, uuid: str, config: Dict[str, Any]) -> None:
    """libxl's stored config (JSON with its terminating NUL), so xl and pyxl can
    save the domain again."""
    cfg = json.loads(json.dumps(config))
    cfg.setdefault("c_info", {})["uuid"] = uuid
    path = userdata_path(userdata_dir, domid, uuid)
    tmp = path + ".pyxl-tmp"
    with open(tmp, "wb") as f:
        f.write(json.dumps(cfg, indent=4).encode() + b"\n\0")
    os.rename(tmp, path)


def read_userdata(userdata_dir: str, domid: int, uuid: str) -> Optional[Dict[str, Any]]:
    """The stored config, None when there is none; ValueError/OSError if unreadable."""
    try:
        with open(userdata_path(userdata_dir, domid, uuid), "rb") as f:
            cfg: Dict[str, Any] = json.loads(f.read().rstrip(b"\0").decode())
    except FileNotFoundError:
        return None
    return cfg
