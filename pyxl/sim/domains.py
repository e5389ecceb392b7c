"""Control of fakexen, pyxl's simulated Xen hypervisor (x86 HVM save/restore).

A simulated domain lives in a state directory (``/dev/shm/pyxl-sim`` unless
``sim_dir`` or ``$PYXL_SIM_DIR`` says otherwise) as ``d<domid>/`` holding a
control block and a sparse guest-memory file (layout: ``fakexen/simctl.h``).
Three parties share it:

* this module (the toolstack's view: create, pause, suspend, destroy, ...);
* ``libfakexen.so``, preloaded into a save/restore helper (:func:`helper_env`),
  which answers the hypercalls of Debian's libxenctrl/libxenguest 4.17;
* ``pyxl-sim-vcpu``, one detached process per running domain, which writes
  guest memory at ``dirty_rate`` bytes/s and marks the pages it dirties.

Guests are built in the libxl HVM layout: RAM from pfn 0 with the VGA hole
0xa0-0xbf left out, RAM beyond 3.75 GiB above 4 GiB, and the 16 special
pages at 0xfeff0-0xfefff.

Only the standard library is used.  Every call is synchronous; the
non-blocking pair :func:`request_suspend` + :func:`state` lets an event loop
poll for suspension with a timer.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import mmap
import os
import platform
import re
import shutil
import signal
import struct
import subprocess
import time
import uuid as uuidlib
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

from pyxl._paths import package_file
from pyxl.errors import BackendError

__all__ = [
    "DEFAULT_SIM_DIR", "DomainInfo", "DomainStateError", "GuestCheck", "InsufficientResources",
    "NoSuchDomain", "SimError", "SimTimeout", "check_guest", "config", "counter", "create",
    "create_empty", "destroy", "digest", "format_size", "helper_env", "info",
    "libfakexen_path", "list_domains", "parse_size", "pause", "remove_dir", "rename", "request_suspend", "resume",
    "set_dirty_rate", "sim_dir_path", "state", "suspend", "unpause", "vcpu_path",
]

DEFAULT_SIM_DIR = "/dev/shm/pyxl-sim"
PAGE_SIZE = 4096

# ---- errors -------------------------------------------------------------------------------


class SimError(BackendError):
    """A simulator operation failed; the message says why."""


class NoSuchDomain(SimError, LookupError):
    """The domain does not exist (never created, or destroyed)."""

    def __init__(self, domid: int, sim_dir: str) -> None:
        super().__init__(f"domain {domid} does not exist in {sim_dir}")
        self.domid = domid
        self.sim_dir = sim_dir


class DomainStateError(SimError):
    """The operation is not valid in the domain's current state."""


class InsufficientResources(SimError):
    """The machine or the state directory cannot back the guest."""


class SimTimeout(SimError):
    """The simulated guest did not reach the requested state in time."""


# ---- shared layout (mirrors fakexen/simctl.h; tests compare with `pyxl-sim-vcpu layout`) ---

CTL_MAGIC = 0x314C544358594C50
CTL_VERSION = 1
GNT_OFF = 0x001000
LEAVES_OFF = 0x002000
MSRS_OFF = 0x002C00
CONFIG_OFF = 0x003000
CONFIG_MAX = 0x010000
HVMCTX_OFF = 0x013000
HVMCTX_MAX = 0x100000
BITMAPS_OFF = 0x113000
PFN_ALIGN = 32768
GUEST_MAGIC = 0x54534555474C5850
MAX_LEAVES = 120
MAX_MSRS = 2
NR_PARAMS = 39

#: struct fx_ctl: field -> (offset, struct format)
CTL_FIELDS: Dict[str, Tuple[int, str]] = {
    "magic": (0x000, "<Q"),
    "version": (0x008, "<I"),
    "domid": (0x00C, "<I"),
    "nr_pfns": (0x010, "<Q"),
    "max_pages": (0x018, "<Q"),
    "tot_pages": (0x020, "<Q"),
    "max_gpfn": (0x028, "<Q"),
    "state": (0x030, "<I"),
    "shutdown_reason": (0x034, "<I"),
    "req": (0x038, "<I"),
    "req_seq": (0x03C, "<I"),
    "ack_seq": (0x040, "<I"),
    "vcpu_pid": (0x044, "<i"),
    "dirty_rate": (0x048, "<Q"),
    "logdirty": (0x050, "<I"),
    "hvm": (0x054, "<I"),
    "mem_bytes": (0x058, "<Q"),
    "tsc": (0x060, "<IIIIQ"),
    "params": (0x078, "<64Q"),
    "hvmctx_len": (0x278, "<I"),
    "nr_leaves": (0x27C, "<I"),
    "nr_msrs": (0x280, "<I"),
    "config_len": (0x284, "<I"),
    "uuid": (0x288, "16s"),
    "name": (0x298, "64s"),
    "created_ns": (0x2D8, "<Q"),
    "populated_off": (0x2E0, "<Q"),
    "dirty_off": (0x2E8, "<Q"),
    "ctl_size": (0x2F0, "<Q"),
    "vcpu_starts": (0x2F8, "<Q"),
    "resume_paused": (0x300, "<I"),
}

# Run states (enum fx_state) and vCPU requests (enum fx_req).
RUNNING, PAUSED, SUSPENDED, DYING = 0, 1, 2, 3
STATE_NAMES = {RUNNING: "running", PAUSED: "paused", SUSPENDED: "suspended", DYING: "dying"}
REQ_RUN, REQ_PAUSE, REQ_SUSPEND, REQ_EXIT = 1, 2, 3, 4
SHUTDOWN_SUSPEND = 2

# The libxl HVM guest-physical layout.
VGA_HOLE = (0xA0, 0xC0)
LOWMEM_END = 0xF0000
HIGHMEM_START = 0x100000
SPECIAL_START, SPECIAL_END = 0xFEFF0, 0xFF000
#: Xen's max_pages headroom over max_memkb (libxl's LIBXL_MAXMEM_CONSTANT, 1 MiB).
MAXMEM_SLACK_PAGES = 256
#: Guest-physical space beyond the layout, so a restore target takes other layouts too.
SPACE_HEADROOM_PFNS = 0x40000

# HVM params of a libxl-built guest (index -> value).
HVM_PARAM_STORE_PFN = 1
HVM_PARAM_CONSOLE_PFN = 17
LIBXL_PARAMS: Dict[int, int] = {
    1: 0xFEFFC,        # STORE_PFN
    2: 1,              # STORE_EVTCHN
    4: 1,              # PAE_ENABLED
    5: 0xFEFFD,        # IOREQ_PFN
    6: 0xFEFFB,        # BUFIOREQ_PFN
    10: 1,             # TIMER_MODE
    11: 1,             # HPET_ENABLED
    12: 0xFEFFE000,    # IDENT_PT (a byte address)
    17: 0xFEFFF,       # CONSOLE_PFN
    18: 2,             # CONSOLE_EVTCHN
    19: 1,             # ACPI_IOPORTS_LOCATION
    27: 0xFEFF8,       # PAGING_RING_PFN
    28: 0xFEFF9,       # MONITOR_RING_PFN
    29: 0xFEFFA,       # SHARING_RING_PFN
    32: 0xFEFF0,       # IOREQ_SERVER_PFN
    33: 8,             # NR_IOREQ_SERVER_PAGES
}
#: The params xc_domain_save transfers, in its order; the digest covers exactly these.
SAVED_PARAMS = (1, 5, 6, 27, 28, 29, 37, 17, 19, 9, 12, 34, 32, 33, 36, 38)

_HDR = struct.Struct("<HHI")  # HVM save descriptor: typecode, instance, length


# ---- small helpers -------------------------------------------------------------------------

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(?:I?B)?\s*$", re.IGNORECASE)


def parse_size(text: str) -> int:
    """'1G' -> 1073741824.  Suffixes K, M, G, T are binary; no suffix means bytes."""
    m = _SIZE_RE.match(text)
    if not m:
        raise ValueError(f"not a size: {text!r} (expected e.g. 512M, 1G, 65536)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}[m.group(2).upper()]
    return int(float(m.group(1)) * scale)


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def sim_dir_path(sim_dir: Optional[str] = None) -> str:
    """The state directory in effect: the argument, else $PYXL_SIM_DIR, else the default."""
    return os.path.abspath(sim_dir or os.environ.get("PYXL_SIM_DIR") or DEFAULT_SIM_DIR)


def libfakexen_path() -> str:
    """The simulated hypervisor library to LD_PRELOAD into a helper."""
    return package_file("libfakexen.so")


def vcpu_path() -> str:
    return os.environ.get("PYXL_SIM_VCPU") or package_file("pyxl-sim-vcpu")


def helper_env(sim_dir: Optional[str] = None) -> Dict[str, str]:
    """Variables to add to a save/restore helper's environment so that it runs on fakexen."""
    return {"LD_PRELOAD": libfakexen_path(), "PYXL_SIM_DIR": sim_dir_path(sim_dir)}


def _pack_field(buf: Any, name: str, value: Any) -> None:
    off, fmt = CTL_FIELDS[name]
    if isinstance(value, (tuple, list)):
        struct.pack_into(fmt, buf, off, *value)
    else:
        struct.pack_into(fmt, buf, off, value)


def _field(buf: Any, name: str) -> Any:
    off, fmt = CTL_FIELDS[name]
    vals = struct.unpack_from(fmt, buf, off)
    return vals[0] if len(vals) == 1 else vals


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def ram_runs(ram_pages: int) -> List[Tuple[int, int]]:
    """(first pfn, count) runs of guest RAM in the libxl HVM layout."""
    runs: List[Tuple[int, int]] = []
    left = ram_pages
    for start, end in ((0, VGA_HOLE[0]), (VGA_HOLE[1], LOWMEM_END), (HIGHMEM_START, 1 << 40)):
        if left <= 0:
            break
        take = min(left, end - start)
        runs.append((start, take))
        left -= take
    return runs


def _space_pfns(ram_pages: int) -> int:
    runs = ram_runs(ram_pages)
    end = max([SPECIAL_END] + [s + n for s, n in runs])
    return _round_up(end, PFN_ALIGN) + SPACE_HEADROOM_PFNS


def _set_bits(bm: bytearray, start: int, count: int) -> None:
    end = start + count
    while start < end and start % 8:
        bm[start // 8] |= 1 << (start % 8)
        start += 1
    full = (end - start) // 8
    if full:
        bm[start // 8:start // 8 + full] = b"\xff" * full
        start += full * 8
    while start < end:
        bm[start // 8] |= 1 << (start % 8)
        start += 1


_NONZERO = re.compile(rb"[^\x00]+")
_ALLONES = re.compile(rb"\xff+")


def bit_runs(bm: bytes) -> List[Tuple[int, int]]:
    """Maximal (start, count) runs of set bits (bit p%8 of byte p//8)."""
    runs: List[List[int]] = []

    def add(start: int, n: int) -> None:
        if runs and runs[-1][0] + runs[-1][1] == start:
            runs[-1][1] += n
        else:
            runs.append([start, n])

    for m in _NONZERO.finditer(bm):
        i, end = m.span()
        while i < end:
            byte = bm[i]
            if byte == 0xFF:
                j = _ALLONES.match(bm, i)
                assert j is not None
                add(i * 8, (j.end() - i) * 8)
                i = j.end()
                continue
            for bit in range(8):
                if byte >> bit & 1:
                    add(i * 8 + bit, 1)
            i += 1
    return [(s, n) for s, n in runs]


# ---- default guest state -------------------------------------------------------------------


def _cpu_policy() -> Tuple[List[Tuple[int, int, int, int, int, int]], List[Tuple[int, int, int]]]:
    """A small Intel-like CPUID/MSR policy that libxc's deserialiser accepts."""
    none = 0xFFFFFFFF
    vendor = b"GenuineIntel"
    ebx, edx, ecx = struct.unpack("<III", vendor)
    leaves = [
        (0x0, none, 0xD, ebx, ecx, edx),
        (0x1, none, 0x000306C3, 0x00010800, 0xF6FA3203, 0x178BFBFF),
        (0x7, 0, 0, 0x000027AB, 0, 0),
        (0xD, 0, 0x7, 0x240, 0x340, 0),
        (0xD, 1, 0x1, 0, 0, 0),
        (0x80000000, none, 0x80000008, 0, 0, 0),
        (0x80000001, none, 0, 0, 0x21, 0x2C100800),
        (0x80000008, none, 0x3027, 0, 0, 0),
    ]
    msrs = [(0xCE, 0, 0), (0x10A, 0, 0)]
    return leaves, msrs


def _hvm_context(gtsc_khz: int) -> bytes:
    """An HVM context blob with Xen's framing: HEADER, one vCPU's records, END.

    Record sizes are those of Xen 4.17's public save structures; contents are a
    freshly reset x86 machine with a few registers set.  The simulated vCPU
    stores its page-write count in the CPU record's rip when it suspends.
    """
    def rec(code: int, inst: int, payload: bytes) -> bytes:
        return _HDR.pack(code, inst, len(payload)) + payload

    header = struct.pack("<IIQII", 0x54381286, 1, 0, 0x000306C3, gtsc_khz)
    cpu = bytearray(1032)
    struct.pack_into("<Q", cpu, 648, 0x2)            # rflags
    struct.pack_into("<Q", cpu, 656, 0x60000010)     # cr0
    lapic = bytearray(24)
    struct.pack_into("<Q", lapic, 0, 0xFEE00900)     # apic_base_msr: enabled, BSP
    mtrr = bytearray(240)
    struct.pack_into("<Q", mtrr, 232, 0xC06)         # MTRRs enabled, default WB
    parts = [
        rec(1, 0, header),
        rec(2, 0, bytes(cpu)),
        rec(3, 0, bytes(8)), rec(3, 1, bytes(8)),    # PIC master, slave
        rec(4, 0, bytes(400)),                       # IOAPIC
        rec(5, 0, bytes(lapic)),
        rec(6, 0, bytes(1024)),                      # LAPIC_REGS
        rec(7, 0, bytes(16)), rec(8, 0, bytes(8)), rec(9, 0, bytes(8)),  # PCI/ISA IRQ, links
        rec(10, 0, bytes(56)),                       # PIT
        rec(11, 0, bytes(24)),                       # RTC
        rec(12, 0, bytes(1048)),                     # HPET
        rec(13, 0, bytes(8)),                        # PMTIMER
        rec(14, 0, bytes(mtrr)),
        rec(0, 0, b""),                              # END
    ]
    return b"".join(parts)


def _default_config(name: str, uuid: str, max_memkb: int, target_memkb: int) -> Dict[str, Any]:
    return {
        "c_info": {"type": "hvm", "name": name, "uuid": uuid},
        "b_info": {"max_memkb": max_memkb, "target_memkb": target_memkb, "max_vcpus": 1},
    }


# ---- the state directory -------------------------------------------------------------------


@contextmanager
def _flock(path: str, shared: bool = False) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _domdir(sim_dir: str, domid: int) -> str:
    return os.path.join(sim_dir, f"d{domid}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


_TMP_RE = re.compile(r"^\.tmp-(\d+)-(\d+)-")


def _collect_garbage(sim_dir: str) -> None:
    """Remove what crashed creators and destroyers left behind (under the creation lock)."""
    for name in os.listdir(sim_dir):
        path = os.path.join(sim_dir, name)
        m = _TMP_RE.match(name)
        if (m and not _pid_alive(int(m.group(2)))) or name.startswith(".dead-"):
            shutil.rmtree(path, ignore_errors=True)


def _allocate_domid(sim_dir: str) -> Tuple[int, str]:
    """A fresh domid and its private build directory, under the creation lock."""
    with _flock(os.path.join(sim_dir, ".lock")):
        _collect_garbage(sim_dir)
        used = set()
        for name in os.listdir(sim_dir):
            m = re.match(r"^d(\d+)$", name) or _TMP_RE.match(name)
            if m:
                used.add(int(m.group(1)))
        counter_path = os.path.join(sim_dir, ".next-domid")
        try:
            with open(counter_path) as f:
                nxt = int(f.read().strip() or "1")
        except (FileNotFoundError, ValueError):
            nxt = 1
        domid = max([nxt] + [u + 1 for u in used])
        if domid >= 0x7FF0:  # DOMID_FIRST_RESERVED: wrap to the lowest free id
            domid = next((i for i in range(1, 0x7FF0) if i not in used), 0)
            if not domid:
                raise SimError(f"no free domain id in {sim_dir}")
        tmp = os.path.join(sim_dir, f".tmp-{domid}-{os.getpid()}-{uuidlib.uuid4().hex[:8]}")
        os.mkdir(tmp)
        with open(counter_path + ".new", "w") as f:
            f.write(f"{domid + 1}\n")
        os.replace(counter_path + ".new", counter_path)
        return domid, tmp


def _meminfo() -> Dict[str, int]:
    out: Dict[str, int] = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts:
                    out[key] = int(parts[0]) * 1024
    except OSError:
        pass
    return out


def _fs_type(path: str) -> str:
    best, fstype = "", ""
    real = os.path.realpath(path)
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) < 3:
                    continue
                mnt = fields[1].replace("\\040", " ")
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, fields[2]
    except OSError:
        pass
    return fstype


def _check_capacity(sim_dir: str, need: int, what: str) -> None:
    """Refuse up front a guest the state directory or the machine cannot back."""
    st = os.statvfs(sim_dir)
    free = st.f_bavail * st.f_frsize
    if need > free:
        raise InsufficientResources(
            f"{what} needs {format_size(need)} but {sim_dir} has only {format_size(free)} free")
    if _fs_type(sim_dir) in ("tmpfs", "ramfs"):
        mi = _meminfo()
        avail = mi.get("MemAvailable", 0) + mi.get("SwapFree", 0)
        if mi and need > avail:
            raise InsufficientResources(
                f"{what} needs {format_size(need)} of memory-backed storage, larger than this "
                f"machine can back (MemAvailable + SwapFree = {format_size(avail)})")


def _nospace(exc: OSError, sim_dir: str, what: str) -> SimError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.ENOMEM):
        return InsufficientResources(f"{what}: no space left in {sim_dir} ({exc.strerror})")
    return SimError(f"{what}: {exc}")


def _build(tmp: str, domid: int, *, name: str, uuid: str, nr_pfns: int, max_pages: int,
           mem_bytes: int, state: int, dirty_rate: int, cfg: Dict[str, Any],
           ram: List[Tuple[int, int]], guest: bool) -> None:
    """Write a domain's control block and memory file into its build directory."""
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    if len(cfg_bytes) > CONFIG_MAX:
        raise SimError(f"config JSON of {len(cfg_bytes)} bytes exceeds {CONFIG_MAX}")
    ctl_size = BITMAPS_OFF + 2 * (nr_pfns // 8)
    populated = bytearray(nr_pfns // 8)
    tot = 0
    for start, count in ram:
        _set_bits(populated, start, count)
        tot += count

    mem_fd = os.open(os.path.join(tmp, "mem"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                     0o600)
    try:
        os.ftruncate(mem_fd, nr_pfns * PAGE_SIZE)
        # Allocate now: a full tmpfs must fail here, not SIGBUS a writer later.
        for start, count in ram:
            os.posix_fallocate(mem_fd, start * PAGE_SIZE, count * PAGE_SIZE)
    finally:
        os.close(mem_fd)

    fd = os.open(os.path.join(tmp, "ctl"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                 0o600)
    try:
        os.ftruncate(fd, ctl_size)
        os.posix_fallocate(fd, 0, ctl_size)
        with mmap.mmap(fd, ctl_size) as m:
            hdr = bytearray(PAGE_SIZE)
            params = [0] * 64
            hvmctx = b""
            leaves: List[Tuple[int, int, int, int, int, int]] = []
            msrs: List[Tuple[int, int, int]] = []
            gtsc_khz = 0
            if guest:
                for idx, val in LIBXL_PARAMS.items():
                    params[idx] = val
                gtsc_khz = 2400000
                hvmctx = _hvm_context(gtsc_khz)
                leaves, msrs = _cpu_policy()
            now = time.time_ns()
            fields: List[Tuple[str, Any]] = [
                ("version", CTL_VERSION), ("domid", domid), ("nr_pfns", nr_pfns),
                ("max_pages", max_pages), ("tot_pages", tot),
                ("max_gpfn", max((s + n - 1 for s, n in ram), default=0)),
                ("state", state), ("dirty_rate", dirty_rate), ("hvm", 1),
                ("mem_bytes", mem_bytes),
                ("tsc", (0, gtsc_khz, 0, 0, now % (1 << 40) if guest else 0)),
                ("params", params), ("hvmctx_len", len(hvmctx)), ("nr_leaves", len(leaves)),
                ("nr_msrs", len(msrs)), ("config_len", len(cfg_bytes)),
                ("uuid", uuidlib.UUID(uuid).bytes), ("name", name.encode()[:63]),
                ("created_ns", now), ("populated_off", BITMAPS_OFF),
                ("dirty_off", BITMAPS_OFF + nr_pfns // 8), ("ctl_size", ctl_size),
            ]
            for key, fval in fields:
                _pack_field(hdr, key, fval)
            for i, leaf in enumerate(leaves):
                struct.pack_into("<6I", m, LEAVES_OFF + 24 * i, *leaf)
            for i, (idx, flags, val) in enumerate(msrs):
                struct.pack_into("<IIQ", m, MSRS_OFF + 16 * i, idx, flags, val)
            m[CONFIG_OFF:CONFIG_OFF + len(cfg_bytes)] = cfg_bytes
            m[HVMCTX_OFF:HVMCTX_OFF + len(hvmctx)] = hvmctx
            m[BITMAPS_OFF:BITMAPS_OFF + len(populated)] = populated
            # The magic goes in last: a reader never sees a half-written block.
            _pack_field(hdr, "magic", CTL_MAGIC)
            m[0:PAGE_SIZE] = bytes(hdr)
            m.flush()
    finally:
        os.close(fd)

    if guest:
        exe = vcpu_path()
        if not os.access(exe, os.X_OK):
            raise SimError(f"{exe} is missing: build it with `setup.py build_ext --inplace`")
        r = subprocess.run([exe, "init", tmp], stdin=subprocess.DEVNULL, capture_output=True,
                           text=True)
        if r.returncode != 0:
            raise SimError(f"initialising guest memory failed: {r.stderr.strip()}")


def _create(sim_dir: Optional[str], *, ram_pages: int, max_memkb: int, name: Optional[str],
            cfg: Optional[Dict[str, Any]], mem_bytes: int, state: int, dirty_rate: int,
            guest: bool, what: str) -> int:
    sdir = sim_dir_path(sim_dir)
    os.makedirs(sdir, exist_ok=True)
    ram = ram_runs(ram_pages) if guest else []
    if guest:
        ram.append((SPECIAL_START, SPECIAL_END - SPECIAL_START))
    nr_pfns = _space_pfns(max(ram_pages, max_memkb // 4))
    need = (ram_pages if guest else max_memkb // 4) * PAGE_SIZE + BITMAPS_OFF + nr_pfns // 4
    _check_capacity(sdir, need, what)

    domid, tmp = _allocate_domid(sdir)
    try:
        cfg = json.loads(json.dumps(cfg)) if cfg is not None else {}
        c_info = cfg.setdefault("c_info", {})
        b_info = cfg.setdefault("b_info", {})
        if name is None:
            name = str(c_info.get("name") or f"sim{domid}")
        uuid = str(uuidlib.uuid4())
        defaults = _default_config(name, uuid, max_memkb, mem_bytes // 1024)
        c_info["name"] = name
        for key, val in defaults["c_info"].items():
            c_info.setdefault(key, val)
        for key, val in defaults["b_info"].items():
            b_info.setdefault(key, val)
        try:
            uuid = str(uuidlib.UUID(str(c_info["uuid"])))
        except ValueError:
            c_info["uuid"] = uuid
        _build(tmp, domid, name=name, uuid=uuid, nr_pfns=nr_pfns,
               max_pages=max_memkb // 4 + MAXMEM_SLACK_PAGES, mem_bytes=mem_bytes,
               state=state, dirty_rate=dirty_rate, cfg=cfg, ram=ram, guest=guest)
        os.rename(tmp, _domdir(sdir, domid))
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _nospace(exc, sdir, f"creating domain {domid}") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return domid


def create(memory_bytes: int, dirty_rate: int = 0, name: Optional[str] = None,
           sim_dir: Optional[str] = None, paused: bool = False,
           config: Optional[Dict[str, Any]] = None) -> int:
    """Create a simulated HVM guest with `memory_bytes` of RAM; return its domid.

    Every RAM page is stamped (pfn, generation 0).  Unless `paused`, the guest's
    vCPU starts at once, writing `dirty_rate` bytes/s (0: idle).
    """
    if memory_bytes < 2 * PAGE_SIZE:
        raise ValueError(f"guest memory must be at least {2 * PAGE_SIZE} bytes")
    if dirty_rate < 0:
        raise ValueError("dirty_rate must be >= 0")
    ram_pages = -(-memory_bytes // PAGE_SIZE)
    memkb = ram_pages * 4
    domid = _create(sim_dir, ram_pages=ram_pages, max_memkb=memkb, name=name, cfg=config,
                    mem_bytes=ram_pages * PAGE_SIZE, state=PAUSED, dirty_rate=dirty_rate,
                    guest=True, what=f"a {format_size(ram_pages * PAGE_SIZE)} guest")
    if not paused:
        try:
            unpause(domid, sim_dir)
        except BaseException:
            destroy(domid, sim_dir)
            raise
    return domid


def create_empty(max_memkb: int, name: Optional[str] = None,
                 config: Optional[Dict[str, Any]] = None, sim_dir: Optional[str] = None) -> int:
    """Create the empty, paused HVM domain a restore helper fills; return its domid.

    Nothing is populated; the restore's populate_physmap calls allocate memory,
    up to max_memkb (plus libxl's 1 MiB of slack).
    """
    if max_memkb <= 0:
        raise ValueError("max_memkb must be positive")
    return _create(sim_dir, ram_pages=0, max_memkb=max_memkb, name=name, cfg=config,
                   mem_bytes=max_memkb * 1024, state=PAUSED, dirty_rate=0, guest=False,
                   what=f"a restore target of {format_size(max_memkb * 1024)}")


# ---- one domain ---------------------------------------------------------------------------


class _Dom:
    """An open domain: its directory, and its control page mapped for updates."""

    def __init__(self, domid: int, sim_dir: Optional[str]) -> None:
        self.sim_dir = sim_dir_path(sim_dir)
        self.domid = domid
        self.path = _domdir(self.sim_dir, domid)
        try:
            self.fd = os.open(os.path.join(self.path, "ctl"), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NoSuchDomain(domid, self.sim_dir) from None
        try:
            self.page = mmap.mmap(self.fd, PAGE_SIZE)
        except (OSError, ValueError):
            os.close(self.fd)
            raise SimError(f"{self.path}: not a simulated domain") from None
        if self.get("magic") != CTL_MAGIC or self.get("version") != CTL_VERSION:
            self.close()
            raise SimError(f"{self.path}: not a simulated domain (bad magic or version)")

    def close(self) -> None:
        self.page.close()
        os.close(self.fd)

    def __enter__(self) -> "_Dom":
        return self

    def __exit__(self, exc_type: Optional[type], exc: Optional[BaseException],
                 tb: object) -> None:
        self.close()
        if isinstance(exc, FileNotFoundError):
            # The directory went away under us: destroyed meanwhile.
            raise NoSuchDomain(self.domid, self.sim_dir) from None

    def get(self, name: str) -> Any:
        return _field(self.page, name)

    def set(self, name: str, value: Any) -> None:
        _pack_field(self.page, name, value)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Serialise controllers of this domain (the vCPU and libfakexen do not take it)."""
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self.fd, fcntl.LOCK_UN)

    def state(self) -> int:
        st: int = self.get("state")
        if st == DYING:
            raise NoSuchDomain(self.domid, self.sim_dir)
        return st

    def vcpu_alive(self) -> bool:
        try:
            fd = os.open(os.path.join(self.path, "vcpu.lock"),
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except FileNotFoundError:
            return False   # directory gone: destroyed
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        finally:
            os.close(fd)
        return False

    def request(self, req: int) -> int:
        """Post a request to the vCPU; return its sequence number."""
        seq: int = (self.get("req_seq") + 1) & 0xFFFFFFFF
        self.set("req", req)
        self.set("req_seq", seq)
        _futex_wake(self.page, CTL_FIELDS["req_seq"][0])
        return seq

    def wait_ack(self, seq: int, timeout: float) -> bool:
        """Wait until the vCPU acknowledged `seq`; False if it is gone instead."""
        deadline = time.monotonic() + timeout
        delay = 0.0002
        while self.get("ack_seq") != seq:
            if not self.vcpu_alive():
                return bool(self.get("ack_seq") == seq)
            if time.monotonic() > deadline:
                raise SimTimeout(f"domain {self.domid}: the vCPU did not answer within {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)
        return True

    def run_from(self, st: int) -> None:
        """Mark the domain running and start its vCPU; back to ``st`` if that fails."""
        self.set("state", RUNNING)
        try:
            self.start_vcpu()
        except BaseException:
            self.set("state", st)
            raise

    def start_vcpu(self) -> None:
        exe = vcpu_path()
        if not os.access(exe, os.X_OK):
            raise SimError(f"{exe} is missing: build it with `setup.py build_ext --inplace`")
        r = subprocess.run([exe, "run", self.path], stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            msg = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
            raise SimError(f"domain {self.domid}: cannot start its vCPU: {msg[0]}")


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine())
_libc: Optional[ctypes.CDLL] = None


def _futex_wake(page: mmap.mmap, off: int) -> None:
    """Wake a vCPU sleeping on a control word (it also polls, so this is only latency)."""
    global _libc
    if _SYS_FUTEX is None:
        return
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    word = ctypes.c_uint32.from_buffer(page, off)
    try:
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(ctypes.addressof(word)),
                      ctypes.c_int(1), ctypes.c_int(0x7FFFFFFF), None, None, ctypes.c_int(0))
    finally:
        del word


# ---- queries --------------------------------------------------------------------------------


@dataclass(frozen=True)
class DomainInfo:
    domid: int
    name: str
    uuid: str
    #: running | paused | suspended
    state: str
    #: RAM the domain was created with (bytes); for a restore target, its max_memkb
    memory: int
    max_memkb: int
    #: populated pages (RAM + special pages)
    tot_pages: int
    max_gpfn: int
    dirty_rate: int
    logdirty: bool
    #: pid of the running vCPU process, None when none runs
    vcpu_pid: Optional[int]
    shutdown_reason: Optional[str]
    created: float

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)


def _info_from(hdr: bytes, vcpu_alive: bool) -> DomainInfo:
    st = _field(hdr, "state")
    pid = _field(hdr, "vcpu_pid")
    max_pages = _field(hdr, "max_pages")
    return DomainInfo(
        domid=_field(hdr, "domid"),
        name=_field(hdr, "name").split(b"\0", 1)[0].decode(errors="replace"),
        uuid=str(uuidlib.UUID(bytes=_field(hdr, "uuid"))),
        state=STATE_NAMES.get(st, f"unknown({st})"),
        memory=_field(hdr, "mem_bytes"),
        max_memkb=max(0, max_pages - MAXMEM_SLACK_PAGES) * 4,
        tot_pages=_field(hdr, "tot_pages"),
        max_gpfn=_field(hdr, "max_gpfn"),
        dirty_rate=_field(hdr, "dirty_rate"),
        logdirty=bool(_field(hdr, "logdirty")),
        vcpu_pid=pid if (vcpu_alive and pid > 0) else None,
        shutdown_reason="suspend" if st == SUSPENDED else None,
        created=_field(hdr, "created_ns") / 1e9,
    )


def info(domid: int, sim_dir: Optional[str] = None) -> DomainInfo:
    with _Dom(domid, sim_dir) as d:
        d.state()
        return _info_from(bytes(d.page), d.vcpu_alive())


def list_domains(sim_dir: Optional[str] = None) -> List[DomainInfo]:
    """Every live domain in the state directory, by domid."""
    sdir = sim_dir_path(sim_dir)
    try:
        names = os.listdir(sdir)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        m = re.match(r"^d(\d+)$", name)
        if not m:
            continue
        try:
            out.append(info(int(m.group(1)), sdir))
        except (SimError, OSError):
            continue  # destroyed meanwhile, or not ours
    return sorted(out, key=lambda i: i.domid)


def state(domid: int, sim_dir: Optional[str] = None) -> str:
    """'running', 'paused' or 'suspended'."""
    with _Dom(domid, sim_dir) as d:
        return STATE_NAMES[d.state()]


def config(domid: int, sim_dir: Optional[str] = None) -> Dict[str, Any]:
    """The libxl-style JSON config the domain was created with."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        n = d.get("config_len")
        raw = os.pread(d.fd, n, CONFIG_OFF)
        name = d.get("name").split(b"\0", 1)[0].decode(errors="replace")
    cfg: Dict[str, Any] = json.loads(raw)
    # The name lives in the control page (rename() changes it there), as
    # libxl's current name lives in XenStore rather than in its stored config.
    # (The page holds 63 bytes: a longer name from the config stays whole.)
    c_info = cfg.setdefault("c_info", {})
    if str(c_info.get("name", "")).encode()[:63].decode(errors="replace") != name:
        c_info["name"] = name
    return cfg


def rename(domid: int, name: str, sim_dir: Optional[str] = None) -> None:
    """Give the domain a new name (kept to 63 bytes of UTF-8, as at creation)."""
    raw = name.encode()[:63]
    if not raw or b"\0" in raw:
        raise ValueError(f"a domain name is not empty and has no NUL: {name!r}")
    with _Dom(domid, sim_dir) as d:
        d.state()
        with d.locked():
            d.set("name", raw)


# ---- run-state control ----------------------------------------------------------------------


def pause(domid: int, sim_dir: Optional[str] = None, timeout: float = 10.0) -> None:
    """Stop the guest's vCPU (between two page writes).  No-op if already paused.

    Pausing a suspended domain (xl save -p: pause, then resume) makes a later
    :func:`resume` leave it paused instead of running, as Xen's pause count does.
    """
    with _Dom(domid, sim_dir) as d, d.locked():
        st = d.state()
        if st == SUSPENDED:
            d.set("resume_paused", 1)
            return
        if st == PAUSED:
            return
        if d.vcpu_alive() and d.wait_ack(d.request(REQ_PAUSE), timeout):
            return
        d.set("state", PAUSED)


def unpause(domid: int, sim_dir: Optional[str] = None, timeout: float = 10.0) -> None:
    """Run the guest: wake its vCPU, or start one on the domain's memory (e.g. after a restore)."""
    with _Dom(domid, sim_dir) as d, d.locked():
        st = d.state()
        if st == SUSPENDED:
            if d.get("resume_paused"):
                d.set("resume_paused", 0)   # drops the pause taken while suspended
                return
            raise DomainStateError(
                f"domain {domid} is suspended: resume it (after a failed save) or destroy it")
        if d.vcpu_alive():
            if st == PAUSED:
                d.wait_ack(d.request(REQ_RUN), timeout)
            if d.vcpu_alive():
                return
        d.run_from(st)


def request_suspend(domid: int, sim_dir: Optional[str] = None) -> None:
    """Ask the guest to suspend, without waiting; poll :func:`state` for 'suspended'.

    A running vCPU finishes the page in hand, records shutdown reason suspend
    and stops.  A domain without a running vCPU is suspended at once.
    """
    with _Dom(domid, sim_dir) as d, d.locked():
        st = d.state()
        if st == SUSPENDED:
            return
        if d.vcpu_alive():
            d.request(REQ_SUSPEND)
            return
        d.set("shutdown_reason", SHUTDOWN_SUSPEND)
        d.set("state", SUSPENDED)


def suspend(domid: int, sim_dir: Optional[str] = None, timeout: float = 10.0) -> None:
    """Suspend the guest and wait until it has stopped (what libxl's suspend callback does)."""
    request_suspend(domid, sim_dir)
    deadline = time.monotonic() + timeout
    delay = 0.0002
    with _Dom(domid, sim_dir) as d:
        while d.state() != SUSPENDED:
            if not d.vcpu_alive():
                # The vCPU died without suspending: the domain is stopped anyway.
                with d.locked():
                    if d.state() != SUSPENDED:
                        d.set("shutdown_reason", SHUTDOWN_SUSPEND)
                        d.set("state", SUSPENDED)
                break
            if time.monotonic() > deadline:
                raise SimTimeout(f"domain {domid} did not suspend within {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.005)


def resume(domid: int, sim_dir: Optional[str] = None) -> None:
    """Bring a suspended guest back to running (after a failed save, or xl save -c).

    No-op if running.  A suspended domain that was also paused (:func:`pause`)
    comes back paused; :func:`unpause` then runs it.
    """
    with _Dom(domid, sim_dir) as d, d.locked():
        st = d.state()
        if st == RUNNING and d.vcpu_alive():
            return
        if st == PAUSED:
            raise DomainStateError(f"domain {domid} is paused, not suspended: unpause it")
        d.set("shutdown_reason", 0)
        if st == SUSPENDED and d.get("resume_paused"):
            d.set("resume_paused", 0)
            d.set("state", PAUSED)
            return
        d.run_from(st)


def set_dirty_rate(domid: int, rate: int, sim_dir: Optional[str] = None) -> None:
    """Change how many bytes/s the guest writes (0: idle); takes effect at once."""
    if rate < 0:
        raise ValueError("dirty rate must be >= 0")
    with _Dom(domid, sim_dir) as d:
        d.state()
        d.set("dirty_rate", rate)
        _futex_wake(d.page, CTL_FIELDS["req_seq"][0])


def destroy(domid: int, sim_dir: Optional[str] = None) -> None:
    """Kill the guest's vCPU and remove the domain.  Helpers using it get ESRCH."""
    sdir = sim_dir_path(sim_dir)
    with _Dom(domid, sdir) as d, d.locked():
        if d.get("state") == DYING and not os.path.exists(d.path):
            raise NoSuchDomain(domid, sdir)
        d.set("state", DYING)
        if d.vcpu_alive():
            d.request(REQ_EXIT)
            deadline = time.monotonic() + 2.0
            while d.vcpu_alive() and time.monotonic() < deadline:
                time.sleep(0.002)
            if d.vcpu_alive():
                pid = d.get("vcpu_pid")
                if pid > 0:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                deadline = time.monotonic() + 5.0
                while d.vcpu_alive() and time.monotonic() < deadline:
                    time.sleep(0.002)
        grave = os.path.join(sdir, f".dead-{domid}-{os.getpid()}-{uuidlib.uuid4().hex[:8]}")
        try:
            os.rename(d.path, grave)
        except FileNotFoundError:
            raise NoSuchDomain(domid, sdir) from None
    shutil.rmtree(grave, ignore_errors=True)


def remove_dir(sim_dir: str) -> None:
    """Destroy every domain in a state directory, then delete the directory
    (what a test or a throwaway simulated host does when it is done)."""
    for i in list_domains(sim_dir=sim_dir):
        try:
            destroy(i.domid, sim_dir=sim_dir)
        except SimError:
            pass   # destroyed meanwhile
    shutil.rmtree(sim_dir, ignore_errors=True)


# ---- memory --------------------------------------------------------------------------------


def digest(domid: int, sim_dir: Optional[str] = None) -> str:
    """Hex sha256 of the domain: every populated page in pfn order (with its pfn), the HVM
    context and the HVM params a save transfers.  Stable only while the guest is stopped."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        nr_pfns = d.get("nr_pfns")
        bitmap = os.pread(d.fd, nr_pfns // 8, d.get("populated_off"))
        ctxlen = min(d.get("hvmctx_len"), HVMCTX_MAX)
        ctx = os.pread(d.fd, ctxlen, HVMCTX_OFF)
        params = d.get("params")
        h = hashlib.sha256(b"pyxl-sim-digest-v1\0")
        mem_fd = os.open(os.path.join(d.path, "mem"), os.O_RDONLY | os.O_CLOEXEC)
        try:
            with mmap.mmap(mem_fd, nr_pfns * PAGE_SIZE, prot=mmap.PROT_READ) as mem, \
                    memoryview(mem) as view:
                for start, count in bit_runs(bitmap):
                    h.update(struct.pack("<QQ", start, count))
                    h.update(view[start * PAGE_SIZE:(start + count) * PAGE_SIZE])
        finally:
            os.close(mem_fd)
        h.update(struct.pack("<I", ctxlen))
        h.update(ctx)
        for idx in SAVED_PARAMS:
            h.update(struct.pack("<IQ", idx, params[idx]))
        return h.hexdigest()


def populated_runs(domid: int, sim_dir: Optional[str] = None) -> List[Tuple[int, int]]:
    """(first pfn, count) runs of populated guest-physical memory."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        return bit_runs(os.pread(d.fd, d.get("nr_pfns") // 8, d.get("populated_off")))


def hvm_params(domid: int, sim_dir: Optional[str] = None) -> List[int]:
    with _Dom(domid, sim_dir) as d:
        d.state()
        return list(d.get("params")[:NR_PARAMS])


def hvm_context(domid: int, sim_dir: Optional[str] = None) -> bytes:
    with _Dom(domid, sim_dir) as d:
        d.state()
        return os.pread(d.fd, min(d.get("hvmctx_len"), HVMCTX_MAX), HVMCTX_OFF)


def grant_entries(domid: int, count: int = 2,
                  sim_dir: Optional[str] = None) -> List[Tuple[int, int, int]]:
    """The first grant-table v1 entries as (flags, domid, frame)."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        raw = os.pread(d.fd, 8 * count, GNT_OFF)
    return [struct.unpack_from("<HHI", raw, 8 * i) for i in range(count)]


GUEST_STATE_FMT = struct.Struct("<6Q")  # struct fx_guest_state at pfn 0


def counter(domid: int, sim_dir: Optional[str] = None) -> int:
    """How many pages the guest has written since it was created, across migrations.

    Read from the guest's own state page, so it continues on a restored domain.
    """
    with _Dom(domid, sim_dir) as d:
        d.state()
        with open(os.path.join(d.path, "mem"), "rb") as mem:
            raw = os.pread(mem.fileno(), GUEST_STATE_FMT.size, 0)
    magic, _lap, _cursor, written, _boots, _ram = GUEST_STATE_FMT.unpack(raw)
    return int(written) if magic == GUEST_MAGIC else 0


@dataclass(frozen=True)
class GuestCheck:
    """The simulated guest's view of its memory (see ``pyxl-sim-vcpu check``)."""

    state_valid: bool
    lap: int
    cursor: int
    pages_written: int
    boots: int
    ram_pages: int
    checked: int
    ok: int
    torn: int
    stale: int
    foreign: int
    unstamped: int
    special_nonzero: int
    first_bad: int
    min_gen: int
    max_gen: int
    ctx_rip: int

    @property
    def consistent(self) -> bool:
        """Every RAM page intact and of the generation the guest's cursor implies."""
        return (self.state_valid and self.checked == self.ok == self.ram_pages
                and not (self.torn or self.stale or self.foreign or self.unstamped))


def check_guest(domid: int, sim_dir: Optional[str] = None) -> GuestCheck:
    """Verify the guest's page pattern (meaningful while it is paused or suspended)."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        path = d.path
    r = subprocess.run([vcpu_path(), "check", path], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SimError(f"domain {domid}: guest check failed: {r.stderr.strip()}")
    return GuestCheck(**json.loads(r.stdout))
