"""fakexen's shared layout (mirrors ``fakexen/simctl.h``; tests compare it with
``pyxl-sim-vcpu layout``), size parsing, bitmap runs, and a new guest's default
state (CPU policy, HVM context, libxl config)."""


from __future__ import annotations

import os
import re
import struct

from pyxl._paths import package_file, unsafe_dir
from pyxl._units import format_size as format_size, parse_size as parse_size  # pyxl.sim.parse_size
from pyxl.sim.errors import UnsafeSimDir

# typing is for mypy only (3 ms of `pyxl sim list`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Dict, List, Optional, Tuple


#: The state directory unless told otherwise: per user (it used to be one shared,
#: world-writable /dev/shm/pyxl-sim, where anyone could plant files and
#: symlinks for root to write through), in memory like the guests it backs.
DEFAULT_SIM_DIR = f"/dev/shm/pyxl-sim-{os.geteuid()}"
PAGE_SIZE = 4096

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
    "cpu_cap": (0x304, "<I"),
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

def sim_dir_path(sim_dir: Optional[str] = None) -> str:
    """The state directory in effect: the argument, else $PYXL_SIM_DIR, else the
    default; checked (:func:`check_sim_dir`) if it exists."""
    path = os.path.abspath(sim_dir or os.environ.get("PYXL_SIM_DIR") or DEFAULT_SIM_DIR)
    check_sim_dir(path)
    return path


def check_sim_dir(path: str) -> None:
    """Refuse a state directory others could write into: it must be a directory
    (not a symlink to one), ours, and not group- or world-writable.  A missing
    one passes (:func:`make_sim_dir` creates it)."""
    try:
        problem = unsafe_dir(path, "sim state directory")
    except FileNotFoundError:
        return
    if problem:
        raise UnsafeSimDir(problem)

def nofollow(path: str, flags: int) -> int:
    """``open(..., opener=nofollow)``: files in the state directory are opened
    without following a symlink (ELOOP instead), so one planted there cannot
    make pyxl read or overwrite another file."""
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)


def make_sim_dir(path: str) -> None:
    """Create the state directory (mode 0700) if missing, then check it."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(path, 0o700, exist_ok=True)
    check_sim_dir(path)


def libfakexen_path() -> str:
    """The simulated hypervisor library to LD_PRELOAD into a helper."""
    return package_file("libfakexen.so")


def vcpu_path() -> str:
    return os.environ.get("PYXL_SIM_VCPU") or package_file("pyxl-sim-vcpu")


def helper_env(sim_dir: Optional[str] = None) -> Dict[str, str]:
    """Variables to add to a save/restore helper's environment so that it runs on fakexen."""
    return {"LD_PRELOAD": libfakexen_path(), "PYXL_SIM_DIR": sim_dir_path(sim_dir)}


def _domdir(sim_dir: str, domid: int) -> str:
    return os.path.join(sim_dir, f"d{domid}")


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


