"""The state directory: locking, domid allocation, capacity checks, and building
a new domain's control block and memory file (:func:`create`, :func:`create_empty`)."""


from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import struct
import time
from contextlib import contextmanager

from pyxl.sim.layout import (PAGE_SIZE, BITMAPS_OFF, CONFIG_MAX, CONFIG_OFF, CTL_MAGIC, CTL_VERSION, HVMCTX_OFF, LEAVES_OFF, LIBXL_PARAMS, MAXMEM_SLACK_PAGES, MSRS_OFF, PAUSED, SPECIAL_END, SPECIAL_START, _cpu_policy, _default_config, _domdir, _hvm_context, _pack_field, _set_bits, _space_pfns, format_size, make_sim_dir, nofollow, ram_runs, sim_dir_path, vcpu_path)
from pyxl.sim.errors import (InsufficientResources, SimError)
from pyxl.sim.control import (MAX_NAME_BYTES, check_name_fits, destroy, unpause)
from pyxl.sim import dmcontrol

# typing is for mypy only (3 ms of `pyxl sim list`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple



# ---- the state directory -------------------------------------------------------------------


@contextmanager
def _flock(path: str, shared: bool = False) -> Iterator[int]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


#: What :func:`create`'s ``content`` may be (fakexen/vcpu.c fills the pages).
CONTENT_PROFILES = ("zero", "text", "random", "typical")

_TMP_RE = re.compile(r"^\.tmp-(\d+)-(\d+)-")


def _collect_garbage(sim_dir: str) -> None:
    """Remove what crashed creators and destroyers left behind (under the creation lock)."""
    import shutil
    for name in os.listdir(sim_dir):
        path = os.path.join(sim_dir, name)
        m = _TMP_RE.match(name)
        if (m and not _pid_alive(int(m.group(2)))) or name.startswith(".dead-"):
            shutil.rmtree(path, ignore_errors=True)


def _allocate_domid(sim_dir: str) -> Tuple[int, str]:
    """A fresh domid and its private build directory, under the creation lock."""
    import uuid as uuidlib
    with _flock(os.path.join(sim_dir, ".lock")):
        _collect_garbage(sim_dir)
        used = set()
        for name in os.listdir(sim_dir):
            m = re.match(r"^d(\d+)$", name) or _TMP_RE.match(name)
            if m:
                used.add(int(m.group(1)))
        counter_path = os.path.join(sim_dir, ".next-domid")
        try:
            with open(counter_path, opener=nofollow) as f:
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
        try:    # a stale one, or a symlink planted there: never written through
            os.unlink(counter_path + ".new")
        except FileNotFoundError:
            pass
        with open(counter_path + ".new", "x", opener=nofollow) as f:
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
           ram: List[Tuple[int, int]], guest: bool,
           content: Optional[str] = None, seed: int = 0) -> None:
    """Write a domain's control block and memory file into its build directory."""
    import json
    import subprocess
    import uuid as uuidlib
    cfg_bytes = json.dumps(cfg, sort_keys=True).encode()
    if len(cfg_bytes) > CONFIG_MAX:
        raise SimError(f"config JSON of {len(cfg_bytes)} bytes exceeds {CONFIG_MAX}")
    ctl_size = BITMAPS_OFF + 2 * (nr_pfns // 8)
    populated = bytearray(nr_pfns // 8 if ram else 0)
    tot = 0
    for start, count in ram:
        _set_bits(populated, start, count)
        tot += count

    mem_fd = os.open(os.path.join(tmp, "mem"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
    try:
        os.ftruncate(mem_fd, nr_pfns * PAGE_SIZE)
        # Allocate now: a full tmpfs must fail here, not SIGBUS a writer later.
        for start, count in ram:
            os.posix_fallocate(mem_fd, start * PAGE_SIZE, count * PAGE_SIZE)
    finally:
        os.close(mem_fd)

    fd = os.open(os.path.join(tmp, "ctl"), os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
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
                ("uuid", uuidlib.UUID(uuid).bytes), ("name", name.encode()[:MAX_NAME_BYTES]),
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
            if ram:     # else all zero, as the new file is already
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
        argv = [exe, "init", tmp] + ([content, str(seed)] if content else [])
        r = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True, text=True)
        if r.returncode != 0:
            raise SimError(f"initialising guest memory failed: {r.stderr.strip()}")


class Creation:
    """A new domain, made in steps short enough for a loop callback each (a
    few tenths of a millisecond): :meth:`steps` reserves a domid (with the
    capacity check), writes the domain's files in its private build
    directory, and publishes it under its domid.  A step that fails removes
    what the earlier ones made and raises SimError; a creation left
    unfinished by a process that died is collected by the next creator."""

    def __init__(self, sim_dir: Optional[str], *, ram_pages: int, max_memkb: int,
                 name: Optional[str], cfg: Optional[Dict[str, Any]], mem_bytes: int, state: int,
                 dirty_rate: int, guest: bool, what: str, content: Optional[str] = None,
                 seed: int = 0) -> None:
        self.sdir = sim_dir_path(sim_dir)
        self.ram = ram_runs(ram_pages) if guest else []
        if guest:
            self.ram.append((SPECIAL_START, SPECIAL_END - SPECIAL_START))
        self.nr_pfns = _space_pfns(max(ram_pages, max_memkb // 4))
        self.need = (ram_pages if guest else max_memkb // 4) * PAGE_SIZE + BITMAPS_OFF + self.nr_pfns // 4
        self.max_memkb, self.name, self.cfg, self.mem_bytes = max_memkb, name, cfg, mem_bytes
        self.state, self.dirty_rate, self.guest, self.what = state, dirty_rate, guest, what
        self.content, self.seed = content, seed
        #: the domain's id, once reserved (it exists from the last step on)
        self.domid = -1
        self._tmp = ""

    def steps(self) -> List[Callable[[], None]]:
        return [self._reserve, self._write, self._publish]

    def run(self) -> int:
        """Every step, at once; the new domid."""
        for step in self.steps():
            step()
        return self.domid

    def _reserve(self) -> None:
        c_info = (self.cfg or {}).get("c_info")
        given = self.name if self.name is not None else (
            c_info.get("name") if isinstance(c_info, dict) else None)
        if given:   # before anything is made: refused whole, never cut
            check_name_fits(str(given))
        make_sim_dir(self.sdir)
        _check_capacity(self.sdir, self.need, self.what)
        self.domid, self._tmp = _allocate_domid(self.sdir)

    def _write(self) -> None:
        self._undoing(self._write_files)

    def _write_files(self) -> None:
        import json   # here, not at the top: `pyxl sim list` never writes a config
        import uuid as uuidlib
        cfg = json.loads(json.dumps(self.cfg)) if self.cfg is not None else {}
        c_info = cfg.setdefault("c_info", {})
        b_info = cfg.setdefault("b_info", {})
        name = self.name if self.name is not None else str(c_info.get("name") or f"sim{self.domid}")
        uuid = str(uuidlib.uuid4())
        defaults = _default_config(name, uuid, self.max_memkb, self.mem_bytes // 1024)
        c_info["name"] = name
        for key, val in defaults["c_info"].items():
            c_info.setdefault(key, val)
        for key, val in defaults["b_info"].items():
            b_info.setdefault(key, val)
        try:
            uuid = str(uuidlib.UUID(str(c_info["uuid"])))
        except ValueError:
            c_info["uuid"] = uuid
        _build(self._tmp, self.domid, name=name, uuid=uuid, nr_pfns=self.nr_pfns,
               max_pages=self.max_memkb // 4 + MAXMEM_SLACK_PAGES, mem_bytes=self.mem_bytes,
               state=self.state, dirty_rate=self.dirty_rate, cfg=cfg, ram=self.ram,
               guest=self.guest, content=self.content, seed=self.seed)

    def _publish(self) -> None:
        self._undoing(lambda: os.rename(self._tmp, _domdir(self.sdir, self.domid)))

    def _undoing(self, work: Callable[[], None]) -> None:
        """``work()``; if it fails, the build directory goes, and an OSError
        becomes the SimError (or InsufficientResources) that says what failed."""
        import shutil
        try:
            work()
        except BaseException as exc:
            if self._tmp:
                shutil.rmtree(self._tmp, ignore_errors=True)
            if isinstance(exc, OSError):
                raise _nospace(exc, self.sdir, f"creating domain {self.domid}") from None
            raise


def create(memory_bytes: int, dirty_rate: int = 0, name: Optional[str] = None,
           sim_dir: Optional[str] = None, paused: bool = False,
           config: Optional[Dict[str, Any]] = None,
           device_model: Optional[bool] = None, content: Optional[str] = None,
           seed: int = 0) -> int:
    """Create a simulated HVM guest with `memory_bytes` of RAM; return its domid.

    Every RAM page is stamped (pfn, generation 0), or with `content` filled from
    a profile (:data:`CONTENT_PROFILES`), deterministically from `seed`: "zero",
    "text" (words; about 3x compressible), "random" (incompressible) or
    "typical" (per page 50 % zero, 30 % text, 20 % random).  The vCPU dirties
    pages with its stamped pattern either way.  Unless `paused`, the guest's
    vCPU starts at once, writing `dirty_rate` bytes/s (0: idle).  With
    `device_model` (default: ``$PYXL_SIM_DEVICE_MODEL`` is 1) the guest also gets
    a device model speaking QMP, as an xl HVM guest has its QEMU
    (:mod:`pyxl.sim.devicemodel`).
    """
    if device_model is None:
        device_model = os.environ.get("PYXL_SIM_DEVICE_MODEL", "") in ("1", "yes", "true")
    if memory_bytes < 2 * PAGE_SIZE:
        raise ValueError(f"guest memory must be at least {2 * PAGE_SIZE} bytes")
    if dirty_rate < 0:
        raise ValueError("dirty_rate must be >= 0")
    if content is not None and content not in CONTENT_PROFILES:
        raise ValueError(f"unknown content profile {content!r} "
                         f"(one of {', '.join(CONTENT_PROFILES)})")
    if not 0 <= seed < 1 << 64:
        raise ValueError("seed must be in [0, 2**64)")
    ram_pages = -(-memory_bytes // PAGE_SIZE)
    memkb = ram_pages * 4
    domid = Creation(sim_dir, ram_pages=ram_pages, max_memkb=memkb, name=name, cfg=config,
                     mem_bytes=ram_pages * PAGE_SIZE, state=PAUSED, dirty_rate=dirty_rate,
                     guest=True, what=f"a {format_size(ram_pages * PAGE_SIZE)} guest",
                     content=content, seed=seed).run()
    try:
        if device_model:
            dmcontrol.start(domid, sim_dir)
        if not paused:
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
    return empty_creation(max_memkb, name, config, sim_dir).run()


def empty_creation(max_memkb: int, name: Optional[str] = None,
                   config: Optional[Dict[str, Any]] = None,
                   sim_dir: Optional[str] = None) -> Creation:
    """:func:`create_empty` as a :class:`Creation`, for a loop to run step by step."""
    if max_memkb <= 0:
        raise ValueError("max_memkb must be positive")
    return Creation(sim_dir, ram_pages=0, max_memkb=max_memkb, name=name, cfg=config,
                    mem_bytes=max_memkb * 1024, state=PAUSED, dirty_rate=0, guest=False,
                    what=f"a restore target of {format_size(max_memkb * 1024)}")


