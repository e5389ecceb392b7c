"""A domain's memory and context as a test sees them: digests, populated runs,
HVM parameters and context, grant entries, the guest's page-pattern check."""


from __future__ import annotations

import mmap
import os
import struct

from pyxl.sim.layout import (PAGE_SIZE, GNT_OFF, GUEST_MAGIC, HVMCTX_MAX, HVMCTX_OFF, NR_PARAMS, SAVED_PARAMS, bit_runs, nofollow, vcpu_path)
from pyxl.sim.errors import (SimError)
from pyxl._record import Record
from pyxl.sim.control import (_Dom)
from pyxl.sim import dmcontrol

# typing is for mypy only (3 ms of `pyxl sim list`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import List, Optional, Tuple



# ---- memory --------------------------------------------------------------------------------


def digest(domid: int, sim_dir: Optional[str] = None) -> str:
    """Hex sha256 of the domain: every populated page in pfn order (with its pfn), the HVM
    context, the HVM params a save transfers and, for a guest with a device model, its
    device state.  Stable only while the guest is stopped."""
    import hashlib
    with _Dom(domid, sim_dir) as d:
        d.state()
        nr_pfns = d.get("nr_pfns")
        bitmap = os.pread(d.fd, nr_pfns // 8, d.get("populated_off"))
        ctxlen = min(d.get("hvmctx_len"), HVMCTX_MAX)
        ctx = os.pread(d.fd, ctxlen, HVMCTX_OFF)
        params = d.get("params")
        h = hashlib.sha256(b"pyxl-sim-digest-v1\0")
        mem_fd = os.open(os.path.join(d.path, "mem"), os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
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
        # The device model's state, for a guest that has one (the same bytes its
        # xen-save-devices-state writes; stable while it or the guest is stopped).
        dm_state = dmcontrol.read_state(d.path)
        if dm_state is not None:
            h.update(b"device-model\0" + struct.pack("<I", len(dm_state)) + dm_state)
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
        with open(os.path.join(d.path, "mem"), "rb", opener=nofollow) as mem:
            raw = os.pread(mem.fileno(), GUEST_STATE_FMT.size, 0)
    magic, _lap, _cursor, written, _boots, _ram = GUEST_STATE_FMT.unpack(raw)
    return int(written) if magic == GUEST_MAGIC else 0


class GuestCheck(Record):
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
    import subprocess
    with _Dom(domid, sim_dir) as d:
        d.state()
        path = d.path
    r = subprocess.run([vcpu_path(), "check", path], stdin=subprocess.DEVNULL,
                       capture_output=True, text=True)
    if r.returncode != 0:
        raise SimError(f"domain {domid}: guest check failed: {r.stderr.strip()}")
    import json
    return GuestCheck(**json.loads(r.stdout))
