"""One domain's control block: queries (:func:`info`, :func:`state`, ...) and its
run state (pause, unpause, suspend, resume, destroy), woken through futexes."""


from __future__ import annotations

import errno
import fcntl
import mmap
import os
import re
import time
from contextlib import contextmanager

from pyxl.sim.layout import (PAGE_SIZE, CONFIG_OFF, CTL_FIELDS, CTL_MAGIC, CTL_VERSION, DYING, MAXMEM_SLACK_PAGES, PAUSED, REQ_EXIT, REQ_PAUSE, REQ_RUN, REQ_SUSPEND, RUNNING, SHUTDOWN_SUSPEND, STATE_NAMES, SUSPENDED, _domdir, _field, _pack_field, sim_dir_path, vcpu_path)
from pyxl.errors import BackendError
from pyxl._record import Record
from pyxl.sim.errors import (DomainStateError, NoSuchDomain, SimError, SimTimeout)
from pyxl.sim import dmcontrol

# typing is for mypy only: importing it costs `pyxl sim list` 3 ms.
TYPE_CHECKING = False
if TYPE_CHECKING:
    import ctypes
    from typing import Any, Dict, Iterator, List, Optional



# ---- one domain ---------------------------------------------------------------------------


class _Dom:
    """An open domain: its directory, and its control page mapped for updates
    (``peek``: a copy of it read, for a look that changes nothing -- a save's
    start looks twice, and a read is half the cost of a map)."""

    page: Any    # an mmap, or bytes when peeking

    def __init__(self, domid: int, sim_dir: Optional[str], peek: bool = False) -> None:
        self.sim_dir = sim_dir_path(sim_dir)
        self.domid = domid
        self.path = _domdir(self.sim_dir, domid)
        mode = os.O_RDONLY if peek else os.O_RDWR
        try:
            self.fd = os.open(os.path.join(self.path, "ctl"), mode | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            raise NoSuchDomain(domid, self.sim_dir) from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:   # O_NOFOLLOW: someone planted a symlink
                raise SimError(f"{self.path}/ctl is a symlink: refusing it") from None
            raise
        try:
            if peek:
                self.page = os.pread(self.fd, PAGE_SIZE, 0)
                if len(self.page) < PAGE_SIZE:
                    raise ValueError("a short control page")
            else:
                self.page = mmap.mmap(self.fd, PAGE_SIZE)   # ValueError if short
        except (OSError, ValueError):
            os.close(self.fd)
            raise SimError(f"{self.path}: not a simulated domain") from None
        if self.get("magic") != CTL_MAGIC or self.get("version") != CTL_VERSION:
            self.close()
            raise SimError(f"{self.path}: not a simulated domain (bad magic or version)")

    def close(self) -> None:
        if not isinstance(self.page, bytes):
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
                         os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
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

    def needs_vcpu(self, timeout: float) -> bool:
        """Unpause what can be without a new vCPU (under :meth:`locked`): True if
        the guest needs one started."""
        st = self.state()
        if st == SUSPENDED:
            if self.get("resume_paused"):
                self.set("resume_paused", 0)   # drops the pause taken while suspended
                return False
            raise DomainStateError(
                f"domain {self.domid} is suspended: resume it (after a failed save) or destroy it")
        if self.vcpu_alive():
            if st == PAUSED:
                self.wait_ack(self.request(REQ_RUN), timeout)
            if self.vcpu_alive():
                return False
        return True

    def vcpu_argv(self) -> List[str]:
        """The command that starts this domain's vCPU (detached; exit 0 once it runs)."""
        exe = vcpu_path()
        if not os.access(exe, os.X_OK):
            raise SimError(f"{exe} is missing: build it with `setup.py build_ext --inplace`")
        return [exe, "run", self.path]

    def start_vcpu(self) -> None:
        import subprocess
        r = subprocess.run(self.vcpu_argv(), stdin=subprocess.DEVNULL,
                           capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            msg = r.stderr.strip().splitlines()[-1:] or [f"exit status {r.returncode}"]
            raise SimError(f"domain {self.domid}: cannot start its vCPU: {msg[0]}")


_SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(os.uname().machine)
_libc: "Optional[ctypes.CDLL]" = None


def load_futex() -> None:
    """Load what :func:`_futex_wake` needs (ctypes, libc): 2-3 ms once, which a
    backend spends when it is made rather than in the loop callback of its
    first suspend.  Not at the top: `pyxl sim list` and `import pyxl.sim` start faster."""
    global _libc
    import ctypes
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)


def _futex_wake(page: mmap.mmap, off: int) -> None:
    """Wake a vCPU sleeping on a control word (it also polls, so this is only latency)."""
    import ctypes   # see load_futex
    if _SYS_FUTEX is None:
        return
    load_futex()
    assert _libc is not None
    word = ctypes.c_uint32.from_buffer(page, off)
    try:
        _libc.syscall(ctypes.c_long(_SYS_FUTEX), ctypes.c_void_p(ctypes.addressof(word)),
                      ctypes.c_int(1), ctypes.c_int(0x7FFFFFFF), None, None, ctypes.c_int(0))
    finally:
        del word


# ---- queries --------------------------------------------------------------------------------


def _uuid_text(raw: bytes) -> str:
    """The 8-4-4-4-12 form of 16 bytes (uuid.UUID's str(), without importing uuid)."""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class DomainInfo(Record):
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
    #: scheduler cap, percent of one CPU (0: uncapped)
    cpu_cap: int = 0


def _info_from(hdr: bytes, vcpu_alive: bool) -> DomainInfo:
    st = _field(hdr, "state")
    pid = _field(hdr, "vcpu_pid")
    max_pages = _field(hdr, "max_pages")
    return DomainInfo(
        domid=_field(hdr, "domid"),
        name=_name_of(_field(hdr, "name")),
        uuid=_uuid_text(_field(hdr, "uuid")),
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
        cpu_cap=_field(hdr, "cpu_cap"),
    )


def info(domid: int, sim_dir: Optional[str] = None) -> DomainInfo:
    with _Dom(domid, sim_dir, peek=True) as d:
        d.state()
        return _info_from(bytes(d.page), d.vcpu_alive())


def _name_of(field: bytes) -> str:
    """The control page's name field as text (NUL-padded UTF-8)."""
    return field.split(b"\0", 1)[0].decode(errors="replace")


def _domids(sdir: str) -> List[int]:
    """The domids of the state directory's domain directories (``dN``)."""
    try:
        entries = os.listdir(sdir)
    except FileNotFoundError:
        return []
    return [int(m.group(1)) for m in map(re.compile(r"^d(\d+)$").match, entries) if m]


def names(sim_dir: Optional[str] = None) -> Dict[int, str]:
    """Every live domain's name, by domid: the control page's head, read
    (not mapped) -- a name check before each restore reads them all."""
    sdir = sim_dir_path(sim_dir)
    out: Dict[int, str] = {}
    for domid in _domids(sdir):
        try:
            fd = os.open(os.path.join(sdir, f"d{domid}", "ctl"),
                         os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except OSError:
            continue            # going, or not a domain
        try:
            head = os.pread(fd, PAGE_SIZE, 0)
        finally:
            os.close(fd)
        if len(head) < PAGE_SIZE or _field(head, "magic") != CTL_MAGIC \
                or _field(head, "version") != CTL_VERSION or _field(head, "state") == DYING:
            continue
        out[domid] = _name_of(_field(head, "name"))
    return out


def list_domains(sim_dir: Optional[str] = None) -> List[DomainInfo]:
    """Every live domain in the state directory, by domid."""
    sdir = sim_dir_path(sim_dir)
    out = []
    for domid in sorted(_domids(sdir)):
        try:
            out.append(info(domid, sdir))
        except (SimError, OSError):
            continue  # destroyed meanwhile, or not ours
    return out


def state(domid: int, sim_dir: Optional[str] = None) -> str:
    """'running', 'paused' or 'suspended'."""
    with _Dom(domid, sim_dir, peek=True) as d:
        return STATE_NAMES[d.state()]


def config(domid: int, sim_dir: Optional[str] = None) -> Dict[str, Any]:
    """The libxl-style JSON config the domain was created with."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        n = d.get("config_len")
        raw = os.pread(d.fd, n, CONFIG_OFF)
        name = _name_of(d.get("name"))
    import json   # here: `pyxl sim list` never reads a config
    cfg: Dict[str, Any] = json.loads(raw)
    # The name lives in the control page (rename() changes it there), as
    # libxl's current name lives in XenStore rather than in its stored config.
    # (The page holds 63 bytes: a longer name from an old state dir's config stays whole.)
    c_info = cfg.setdefault("c_info", {})
    if str(c_info.get("name", "")).encode()[:MAX_NAME_BYTES].decode(errors="replace") != name:
        c_info["name"] = name
    return cfg


#: The control page's name field: bytes of UTF-8 a domain's name may take.
MAX_NAME_BYTES = 63


def check_name_fits(name: str) -> None:
    """Refuse a name the control page cannot hold whole: cut, it would no
    longer be the name asked for (two such domains would share it, and
    neither could be found by it)."""
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > MAX_NAME_BYTES:
        raise SimError(f"domain name {name[:24]!r}... is {size} bytes of UTF-8; fakexen "
                       f"keeps at most {MAX_NAME_BYTES}")


def rename(domid: int, name: str, sim_dir: Optional[str] = None) -> None:
    """Give the domain a new name (at most MAX_NAME_BYTES of UTF-8, as at creation)."""
    check_name_fits(name)
    raw = name.encode()
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
        if d.needs_vcpu(timeout):
            d.run_from(d.state())


def start_unpause(domid: int, sim_dir: Optional[str] = None,
                  timeout: float = 10.0) -> Optional[List[str]]:
    """:func:`unpause` for a caller that must not wait for a new vCPU (pyxl's
    SimBackend, on an event loop): the domain is marked running and the
    command that starts its vCPU is returned, for the caller to run (it exits
    0 once the vCPU runs).  If it fails, call :func:`unpause_failed`.  None:
    the guest runs already (a paused vCPU was woken)."""
    with _Dom(domid, sim_dir) as d, d.locked():
        if not d.needs_vcpu(timeout):
            return None
        d.set("state", RUNNING)
        return d.vcpu_argv()


def unpause_failed(domid: int, sim_dir: Optional[str] = None) -> None:
    """The vCPU :func:`start_unpause` was to start did not: the domain is paused again."""
    with _Dom(domid, sim_dir) as d, d.locked():
        if d.state() == RUNNING and not d.vcpu_alive():
            d.set("state", PAUSED)


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


#: the largest cap: Xen allows up to 100 x the domain's vCPUs; the simulated guest has one
MAX_CPU_CAP = 100


def set_cpu_cap(domid: int, cap: int, sim_dir: Optional[str] = None) -> None:
    """Set the scheduler cap (percent of one CPU, 0: uncapped), as Xen's credit/credit2 ``cap``.

    The simulated vCPU then runs only ``cap`` % of the time: it dirties memory at
    ``dirty_rate * cap / 100``.  Takes effect at once; not carried by a migration.
    """
    if isinstance(cap, bool) or not isinstance(cap, int) or not 0 <= cap <= MAX_CPU_CAP:
        raise ValueError(f"cpu cap must be an integer from 0 to {MAX_CPU_CAP}, not {cap!r}")
    with _Dom(domid, sim_dir) as d:
        d.state()
        d.set("cpu_cap", cap)
        _futex_wake(d.page, CTL_FIELDS["req_seq"][0])


def cpu_cap(domid: int, sim_dir: Optional[str] = None) -> int:
    """The scheduler cap set by :func:`set_cpu_cap` (0: uncapped)."""
    with _Dom(domid, sim_dir) as d:
        d.state()
        return int(d.get("cpu_cap"))


def destroy(domid: int, sim_dir: Optional[str] = None) -> None:
    """Kill the guest's vCPU and remove the domain.  Helpers using it get ESRCH."""
    import shutil
    shutil.rmtree(bury(domid, sim_dir), ignore_errors=True)


def bury(domid: int, sim_dir: Optional[str] = None) -> str:
    """The quick part of :func:`destroy`: the vCPU and device model are gone and
    the domain no longer exists (ESRCH), but its files -- guest memory, the
    slow part to free -- are left in the returned directory for the caller to
    remove (``rm -rf``, from a short child while a loop goes on)."""
    import signal   # here, not at the top: `pyxl sim list` starts faster
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
        # Its device model goes with it (libxl: SIGHUP to QEMU, its sockets unlinked).
        try:
            dmcontrol.kill(d.path)
        except BackendError:
            pass     # unkillable: it exits by itself once its domain is gone
        grave = os.path.join(sdir, f".dead-{domid}-{os.getpid()}-{os.urandom(4).hex()}")
        try:
            os.rename(d.path, grave)
        except FileNotFoundError:
            raise NoSuchDomain(domid, sdir) from None
    return grave


def remove_dir(sim_dir: str) -> None:
    """Destroy every domain in a state directory, then delete the directory
    (what a test or a throwaway simulated host does when it is done)."""
    import shutil
    for i in list_domains(sim_dir=sim_dir):
        try:
            destroy(i.domid, sim_dir=sim_dir)
        except SimError:
            pass   # destroyed meanwhile
    shutil.rmtree(sim_dir, ignore_errors=True)


