"""ctypes over Debian's libxenctrl/libxenguest: the hypercalls the Xen backend makes.

Only what :mod:`pyxl.backends.xen` needs (domain info, pause/unpause/destroy,
create, resume, HVM params, shutdown; the argv of the short children that make
the slow ones: destroy, create and build), with the struct layouts of the domctl
interface written out where libxenctrl takes or returns them.  Loaded only on
a Xen host.

Xen 4.17 and 4.20 both: the library is found by its soname
(``libxenctrl.so.4.NN``, :func:`pyxl._paths.xen_release`), and the one layout
that differs between them on pyxl's path, ``struct xen_domctl_createdomain``
(4.19 inserted ``altp2m_opts``), is picked by that release.  Any other release
is refused with a one-line :class:`~pyxl.StartupError`: its layouts are unknown.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import struct
import sys
from typing import Any, Dict, List, Optional, Tuple

from pyxl._paths import XEN_RELEASES, xen_release, xenctrl_releases
from pyxl.errors import BackendError, StartupError

SHUTDOWN_poweroff, SHUTDOWN_reboot, SHUTDOWN_suspend, SHUTDOWN_crash = 0, 1, 2, 3

XEN_DOMINF_dying = 1 << 0
XEN_DOMINF_hvm_guest = 1 << 1
XEN_DOMINF_shutdown = 1 << 2
XEN_DOMINF_paused = 1 << 3
XEN_DOMINF_shutdownshift = 16
XEN_DOMINF_shutdownmask = 255

# struct xen_domctl_getdomaininfo (xen/domctl.h, 4.17): we read only the
# fields up to the handle; the buffer is generous and one entry is asked for.
_INFO_BUF = 1024
_OFF_DOMAIN, _OFF_FLAGS, _OFF_TOT_PAGES, _OFF_MAX_PAGES = 0, 4, 8, 16
_OFF_NR_ONLINE_VCPUS, _OFF_MAX_VCPU_ID, _OFF_HANDLE = 64, 68, 76



# struct xen_domctl_createdomain: ssidref, handle[16], flags, iommu_opts,
# max_vcpus, max_evtchn_port, max_grant_frames, max_maptrack_frames,
# grant_opts, [altp2m_opts: 4.19 and later], vmtrace_size, cpupool_id,
# arch.{emulation_flags, misc_flags}.
#: struct xen_domctl_sched_credit and xen_domctl_sched_credit2 (xen/domctl.h): both
#: {uint16 weight; uint16 cap}; cap is percent of one CPU, 0 = uncapped.
SCHED_PARAMS = struct.Struct("=HH")
#: the schedulers whose per-domain ``cap`` pyxl sets, credit2 (Xen's default) first
SCHED_CAP_FUNCS = (("credit2", "xc_sched_credit2_domain_get", "xc_sched_credit2_domain_set"),
                   ("credit", "xc_sched_credit_domain_get", "xc_sched_credit_domain_set"))

CREATEDOMAIN = {"4.17": struct.Struct("=I16sIIIIiiIIIII"),
                "4.20": struct.Struct("=I16sIIIIiiIIIIII")}
assert CREATEDOMAIN["4.17"].size == 64 and CREATEDOMAIN["4.20"].size == 68
assert set(CREATEDOMAIN) == set(XEN_RELEASES)


def host_release() -> str:
    """This host's Xen release, or a StartupError saying why pyxl cannot drive it."""
    rel = xen_release()
    if rel is not None:
        return rel
    found = xenctrl_releases()
    if found:
        return _unsupported(found[0])
    raise StartupError("cannot find libxenctrl.so.4.NN (Debian: libxenmisc4.17 or libxenmisc4.20)")


def _unsupported(rel: str) -> str:
    raise StartupError(f"this host's libxenctrl is Xen {rel}'s; pyxl drives Xen "
                       f"{' and '.join(XEN_RELEASES)} (other releases' domctl layouts are unknown)")


class XenError(BackendError, OSError):
    pass


def _load(soname: str, release: str) -> ctypes.CDLL:
    try:
        return ctypes.CDLL(soname, use_errno=True)
    except OSError as exc:
        raise StartupError(f"cannot load {soname} (Debian: libxenmisc{release}): {exc}") from None


class DomInfo:
    def __init__(self, buf: bytes) -> None:
        self.domid, = struct.unpack_from("=H", buf, _OFF_DOMAIN)
        self.flags, = struct.unpack_from("=I", buf, _OFF_FLAGS)
        self.tot_pages, self.max_pages = struct.unpack_from("=QQ", buf, _OFF_TOT_PAGES)
        self.nr_online_vcpus, self.max_vcpu_id = struct.unpack_from("=II", buf,
                                                                    _OFF_NR_ONLINE_VCPUS)
        h = buf[_OFF_HANDLE:_OFF_HANDLE + 16].hex()
        self.uuid = f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"

    @property
    def dying(self) -> bool:
        return bool(self.flags & XEN_DOMINF_dying)

    @property
    def shutdown(self) -> bool:
        return bool(self.flags & XEN_DOMINF_shutdown)

    @property
    def shutdown_reason(self) -> int:
        return int((self.flags >> XEN_DOMINF_shutdownshift) & XEN_DOMINF_shutdownmask)

    @property
    def suspended(self) -> bool:
        return self.shutdown and self.shutdown_reason == SHUTDOWN_suspend

    @property
    def paused(self) -> bool:
        return bool(self.flags & XEN_DOMINF_paused)

    @property
    def hvm(self) -> bool:
        return bool(self.flags & XEN_DOMINF_hvm_guest)


# xc_domain_destroy in a short child of its own: Xen frees the domain's memory
# inside that call, which libxenctrl repeats until it is done -- seconds for a
# large guest, which must not be spent on the caller's event loop.  Standard
# library only (ctypes), so the child starts in milliseconds.
_DESTROY = r"""
import ctypes, os, sys
try:
    lib = ctypes.CDLL(sys.argv[1], use_errno=True)
except OSError as exc:
    sys.exit("cannot load %s" % exc)
lib.xc_interface_open.restype = ctypes.c_void_p
lib.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
lib.xc_domain_destroy.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
xch = lib.xc_interface_open(None, None, 0)
if not xch:
    sys.exit("xc_interface_open: " + os.strerror(ctypes.get_errno()))
if lib.xc_domain_destroy(xch, int(sys.argv[2])) < 0:
    sys.exit("xc_domain_destroy(%s): %s" % (sys.argv[2], os.strerror(ctypes.get_errno())))
"""


#: A make child's spec is one argument: at most 128 KiB (MAX_ARG_STRLEN).
MAX_SPEC = 100 << 10


class Xc:
    """The few libxenctrl/libxenguest calls pyxl needs."""

    def __init__(self, release: Optional[str] = None) -> None:
        #: The Xen release whose layouts this instance uses ("4.17", "4.20").
        self.release = release or host_release()
        if self.release not in CREATEDOMAIN:
            _unsupported(self.release)
        self.ctrl = _load(f"libxenctrl.so.{self.release}", self.release)
        self.guest = _load(f"libxenguest.so.{self.release}", self.release)
        self.ctrl.xc_interface_open.restype = ctypes.c_void_p
        self.ctrl.xc_interface_open.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint]
        self.ctrl.xc_interface_close.argtypes = [ctypes.c_void_p]
        for fn in ("xc_domain_pause", "xc_domain_unpause", "xc_domain_destroy"):
            getattr(self.ctrl, fn).argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        self.ctrl.xc_domain_getinfolist.argtypes = [ctypes.c_void_p, ctypes.c_uint32,
                                                    ctypes.c_uint, ctypes.c_void_p]
        self.guest.xc_domain_resume.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        c = self.ctrl
        c.xc_domain_create.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32),
                                       ctypes.c_void_p]
        c.xc_domain_max_vcpus.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint]
        c.xc_domain_setmaxmem.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64]
        c.xc_domain_set_memmap_limit.argtypes = [ctypes.c_void_p, ctypes.c_uint32,
                                                 ctypes.c_ulong]
        c.xc_domain_set_tsc_info.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                             ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint32]
        c.xc_evtchn_alloc_unbound.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32]
        c.xc_hvm_param_set.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.c_uint64]
        c.xc_set_paging_mempool_size.argtypes = [ctypes.c_void_p, ctypes.c_uint32,
                                                 ctypes.c_uint64]
        c.xc_domain_set_time_offset.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int32]
        c.xc_domain_shutdown.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int]
        # libxenguest's (xg_dom_x86.c), not libxenctrl's, although xenctrl.h declares it
        self.guest.xc_domain_get_native_protocol.restype = ctypes.c_char_p
        self.guest.xc_domain_get_native_protocol.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
        c.xc_hvm_param_get.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32,
                                       ctypes.POINTER(ctypes.c_uint64)]
        for _sched, get, set_ in SCHED_CAP_FUNCS:
            for fn in (get, set_):
                getattr(c, fn).argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_char_p]
        self.xch = self.ctrl.xc_interface_open(None, None, 0)
        if not self.xch:
            e = ctypes.get_errno()
            raise StartupError(f"xc_interface_open failed: {os.strerror(e) if e else 'unknown'}")

    def close(self) -> None:
        if self.xch:
            self.ctrl.xc_interface_close(self.xch)
            self.xch = None

    def _check(self, what: str, rc: int) -> None:
        if rc < 0:
            e = ctypes.get_errno() or errno.EIO
            raise XenError(e, f"{what}: {os.strerror(e)}")

    def getinfo(self, domid: int) -> Optional[DomInfo]:
        buf = ctypes.create_string_buffer(_INFO_BUF)
        n = self.ctrl.xc_domain_getinfolist(self.xch, domid, 1, buf)
        self._check("xc_domain_getinfolist", n)
        if n < 1:
            return None
        info = DomInfo(buf.raw)
        return info if info.domid == domid else None

    def pause(self, domid: int) -> None:
        self._check(f"xc_domain_pause({domid})", self.ctrl.xc_domain_pause(self.xch, domid))

    def unpause(self, domid: int) -> None:
        self._check(f"xc_domain_unpause({domid})", self.ctrl.xc_domain_unpause(self.xch, domid))

    def destroy(self, domid: int) -> None:
        self._check(f"xc_domain_destroy({domid})", self.ctrl.xc_domain_destroy(self.xch, domid))

    def destroy_command(self, domid: int) -> List[str]:
        """The argv of a child that makes :meth:`destroy`'s call (exit 0, or 1
        with the reason on stderr), for a caller that must not wait for it."""
        return [sys.executable or "python3", "-I", "-S", "-c", _DESTROY,
                f"libxenctrl.so.{self.release}", str(domid)]

    def make_command(self, spec: Dict[str, Any]) -> List[str]:
        """The argv of a child that creates and builds a restore target
        (:func:`pyxl.backends.xenmake.main`), for a caller that must not wait
        for it: this interpreter, isolated (``-I -S``: no site, no user paths),
        importing pyxl from where this copy is."""
        text = json.dumps(spec, separators=(",", ":"))
        if len(text) > MAX_SPEC:
            raise StartupError(f"the saved config is too large to build from ({len(text)} bytes)")
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        # Its start is the restore's wait (seconds under an emulated CPU), and
        # it needs Xen's modules only: an empty stand-in for the pyxl.backends
        # package skips that package's __init__, which imports every backend
        # (the simulator's, QEMU's).
        boot = ("import sys, types; sys.path.insert(0, sys.argv[1]); "
                "p = types.ModuleType('pyxl.backends'); "
                "p.__path__ = [sys.argv[1] + '/pyxl/backends']; sys.modules[p.__name__] = p; "
                "from pyxl.backends.xenmake import main; sys.exit(main(sys.argv[2:]))")
        return [sys.executable or "python3", "-I", "-S", "-c", boot, root, self.release, text]

    def create(self, handle: bytes, flags: int, max_vcpus: int, max_evtchn_port: int,
               max_grant_frames: int, max_maptrack_frames: int, grant_opts: int,
               cpupool: int, emulation_flags: int, misc_flags: int, ssidref: int = 0,
               altp2m: int = 0) -> int:
        """xc_domain_create with a struct xen_domctl_createdomain built by hand
        in this release's layout (xen/domctl.h).  ``altp2m``: the mode, which
        4.20 takes here; 4.17 takes it as an HVM param after creation (see
        :func:`pyxl.backends.xenbuild.build_pre`)."""
        layout = CREATEDOMAIN[self.release]
        head = (ssidref, handle, flags, 0, max_vcpus, max_evtchn_port, max_grant_frames,
                max_maptrack_frames, grant_opts)
        tail = (0, cpupool, emulation_flags, misc_flags)      # vmtrace_size, cpupool, arch
        fields = head + ((altp2m,) if self.release != "4.17" else ()) + tail
        buf = ctypes.create_string_buffer(layout.size)
        layout.pack_into(buf, 0, *fields)
        domid = ctypes.c_uint32(0)  # 0: Xen picks a free domid
        self._check("xc_domain_create",
                    self.ctrl.xc_domain_create(self.xch, ctypes.byref(domid), buf))
        return domid.value

    def call(self, fn: str, *args: Any) -> int:
        rc = int(getattr(self.ctrl, fn)(self.xch, *args))
        self._check(f"{fn}{args}", rc)
        return rc

    def hvm_param_get(self, domid: int, param: int) -> int:
        value = ctypes.c_uint64(0)
        self._check(f"xc_hvm_param_get({domid}, {param})",
                    self.ctrl.xc_hvm_param_get(self.xch, domid, param, ctypes.byref(value)))
        return int(value.value)

    def native_protocol(self, domid: int) -> Optional[str]:
        """The guest's ring ABI ("x86_64-abi", "x86_32-abi"), None if Xen cannot say."""
        raw = self.guest.xc_domain_get_native_protocol(self.xch, domid)
        return raw.decode() if raw else None

    def sched_cap(self, domid: int) -> Tuple[str, int, int]:
        """(scheduler, weight, cap) of the domain: credit2 is tried first; Xen
        refuses (EINVAL) the domctl of a scheduler that is not the domain's."""
        last: Optional[XenError] = None
        for sched, get, _set in SCHED_CAP_FUNCS:
            buf = ctypes.create_string_buffer(SCHED_PARAMS.size)
            try:
                self._check(f"{get}({domid})", getattr(self.ctrl, get)(self.xch, domid, buf))
            except XenError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                last = exc
                continue
            weight, cap = SCHED_PARAMS.unpack(buf.raw)
            return sched, weight, cap
        assert last is not None
        raise XenError(errno.EINVAL, f"domain {domid}: its scheduler has no cap "
                                     f"(neither credit2 nor credit): {last}")

    def set_sched_cap(self, domid: int, cap: int) -> None:
        """Set the cap (percent of one CPU, 0 = uncapped) keeping the weight, through
        the domain's own scheduler's domctl."""
        sched, weight, _old = self.sched_cap(domid)
        set_ = dict((s, st) for s, _g, st in SCHED_CAP_FUNCS)[sched]
        buf = ctypes.create_string_buffer(SCHED_PARAMS.pack(weight, cap), SCHED_PARAMS.size)
        self._check(f"{set_}({domid}, cap={cap})", getattr(self.ctrl, set_)(self.xch, domid, buf))

    def shutdown(self, domid: int, reason: int) -> None:
        self._check(f"xc_domain_shutdown({domid}, {reason})",
                    self.ctrl.xc_domain_shutdown(self.xch, domid, reason))

    def resume(self, domid: int, fast: bool = True) -> None:
        self._check(f"xc_domain_resume({domid})",
                    self.guest.xc_domain_resume(self.xch, domid, 1 if fast else 0))
