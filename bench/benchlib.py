"""Shared machinery of pyxl's benchmarks: placement, sinks, load probes, statistics.

Nothing here measures anything by itself; ``bench/run.py`` composes it into
the figures.  Conventions used everywhere:

* GiB/s is always *guest RAM* (the size the guest was created with, 2^30 B per
  GiB) divided by wall time, as in /work/shared/reference/baseline-debian-helper.md.
* A run's wall time starts just before the writer starts (``pyxl.save`` /
  ``pyxl.restore`` call, or ``Popen`` of ``cat``) and ends when the writer *and*
  the reader have finished (helper reaped and operation done; reader reaped).
* Placement is explicit: :func:`pinned` sets this process's CPU affinity, which
  every child started inside it (helper, reader, ``cat``) inherits.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from typing import Any, Dict, Iterator, List, Optional, Sequence, Set, Tuple

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GIB = 1 << 30
MIB = 1 << 20
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- statistics ------------------------------------------------------------------------------


def median(xs: Sequence[Optional[float]]) -> Optional[float]:
    """The median of the figures that are there (None: missing), or None if none are."""
    got = [x for x in xs if x is not None]
    return statistics.median(got) if got else None


def median_of(xs: Sequence[Optional[float]]) -> float:
    """:func:`median` for a sample that is never empty (e.g. one figure per repetition).

    An empty one is a bug in the bench: ValueError, rather than None in arithmetic.
    """
    m = median(xs)
    if m is None:
        raise ValueError("median of an empty sample")
    return m


def quantile(xs: Sequence[Optional[float]], q: float) -> Optional[float]:
    """Nearest-rank quantile (q in [0, 1]); exact for the small samples used here."""
    got = sorted(x for x in xs if x is not None)
    if not got:
        return None
    k = max(0, min(len(got) - 1, int(-(-q * len(got) // 1)) - 1))
    return got[k]


def quantile_of(xs: Sequence[Optional[float]], q: float) -> float:
    """:func:`quantile` for a sample that is never empty (ValueError if it is)."""
    v = quantile(xs, q)
    if v is None:
        raise ValueError("quantile of an empty sample")
    return v


def spread(xs: Sequence[float]) -> Dict[str, Any]:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def geomean(xs: Sequence[Optional[float]]) -> Optional[float]:
    xs2 = [x for x in xs if x]
    if not xs2:
        return None
    p = 1.0
    for x in xs2:
        p *= x
    # float ** float is typed Any (a negative base gives a complex); these are
    # ratios, so p > 0 and the root is a float
    root: float = p ** (1.0 / len(xs2))
    return root


def rotate(seq: Sequence[Any], k: int) -> List[Any]:
    k %= len(seq)
    return list(seq[k:]) + list(seq[:k])


# ---- placement -------------------------------------------------------------------------------


@contextmanager
def pinned(cpus: Optional[Set[int]]) -> Iterator[None]:
    """Run the block with this thread on ``cpus`` (None: leave as is).

    Children forked inside inherit the mask: that is how the helper (spawned by
    pyxl inside ``pyxl.save``), the reader and ``cat`` are placed.
    """
    if cpus is None:
        yield
        return
    old = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, old)


def all_cpus() -> Set[int]:
    return set(os.sched_getaffinity(0))


# ---- machine and load ------------------------------------------------------------------------


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def machine_info() -> Dict[str, Any]:
    model = ""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    try:
        commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip() != ""
    except (OSError, subprocess.SubprocessError):
        commit, dirty = "", False
    return {
        "nproc": os.cpu_count(),
        "cpus_allowed": sorted(os.sched_getaffinity(0)),
        "cpu_model": model,
        "kernel": platform.release(),
        "mem_total_gib": round(mem / GIB, 1),
        "python": platform.python_version(),
        "cpuidle_driver": _read("/sys/devices/system/cpu/cpuidle/current_driver").strip(),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def loadavg() -> List[float]:
    parts = _read("/proc/loadavg").split()
    return [float(x) for x in parts[:3]] if len(parts) >= 3 else []


def qemu_pids() -> List[int]:
    """Other tenants' QEMU processes (the known noisy neighbour on these VMs)."""
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _read(f"/proc/{name}/comm").startswith("qemu-system"):
            out.append(int(name))
    return out


def _proc_ticks(pid: int) -> Optional[int]:
    raw = _read(f"/proc/{pid}/stat")
    if not raw:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _cpu_ticks() -> Dict[str, int]:
    line = _read("/proc/stat").splitlines()[0].split()
    vals = [int(x) for x in line[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (vals + [0] * 8)[:8]
    return {"busy": user + nice + system + irq + softirq, "idle": idle + iowait,
            "steal": steal}


def _own_cpu() -> float:
    s = resource.getrusage(resource.RUSAGE_SELF)
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class LoadProbe:
    """What else ran on the machine during one run.

    ``foreign_cores``: CPUs busy with anything but this benchmark (its own CPU
    time plus that of its reaped children is subtracted from the machine's busy
    time), averaged over the run.  ``qemu_cores``: the share of that which was
    other tenants' QEMU.  ``steal_cores``: time the hypervisor took away.
    Tick resolution is 1/CLK_TCK (10 ms), so short runs are coarse.
    """

    def __init__(self, qemu: Optional[List[int]] = None) -> None:
        self.qemu = qemu_pids() if qemu is None else qemu
        self.t0 = time.perf_counter()
        self.q0 = {p: _proc_ticks(p) for p in self.qemu}
        self.c0 = _cpu_ticks()
        self.own0 = _own_cpu()

    def stop(self) -> Dict[str, float]:
        wall = time.perf_counter() - self.t0
        c1 = _cpu_ticks()
        own = _own_cpu() - self.own0
        q = 0
        for p, t0 in self.q0.items():
            t1 = _proc_ticks(p)
            if t0 is not None and t1 is not None and t1 >= t0:
                q += t1 - t0
        busy = (c1["busy"] - self.c0["busy"]) / CLK_TCK
        steal = (c1["steal"] - self.c0["steal"]) / CLK_TCK
        wall = max(wall, 1e-9)
        return {"foreign_cores": round(max(0.0, busy - own) / wall, 3),
                "qemu_cores": round(q / CLK_TCK / wall, 3),
                "steal_cores": round(steal / wall, 3)}


# ---- sinks and raw copies --------------------------------------------------------------------


def start_reader(argv: Sequence[str] = ("cat",), count: bool = False,
                 pipe_size: int = 0) -> Tuple[int, subprocess.Popen[bytes]]:
    """A pipe whose read end feeds ``argv`` (discarding): returns (write_fd, process).

    The reader is started in the caller's placement.  With ``count`` the reader
    is ``wc -c`` and its stdout (the byte count) is captured.  ``pipe_size``:
    F_SETPIPE_SZ before anything is written (0: the default 64 KiB).
    """
    r, w = os.pipe()
    if pipe_size:
        fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, pipe_size)
        if fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) < pipe_size:
            raise OSError(f"F_SETPIPE_SZ {pipe_size} refused")
    try:
        if count:
            proc = subprocess.Popen(["wc", "-c"], stdin=r, stdout=subprocess.PIPE)
        else:
            proc = subprocess.Popen(list(argv), stdin=r, stdout=subprocess.DEVNULL)
    finally:
        os.close(r)
    return w, proc


def write_raw_copy(mem_path: str, runs: Sequence[Sequence[int]], dest: str) -> int:
    """The guest's populated pages, in pfn order, into ``dest``: what ``cat`` copies."""
    n = 0
    src = os.open(mem_path, os.O_RDONLY)
    try:
        dst = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            for start, count in runs:
                off, left = start * 4096, count * 4096
                while left:
                    got = os.copy_file_range(src, dst, left, off)
                    if got <= 0:
                        raise OSError(f"copy_file_range returned {got}")
                    off += got
                    left -= got
                    n += got
        finally:
            os.close(dst)
    finally:
        os.close(src)
    return n


def schedstat_ms(pid: int) -> Optional[float]:
    """CPU time a process has run so far, in ms (/proc/PID/schedstat, ns resolution)."""
    raw = _read(f"/proc/{pid}/schedstat").split()
    return int(raw[0]) / 1e6 if raw else None


def proc_status(pid: int) -> Dict[str, int]:
    """The memory lines of /proc/PID/status, in KiB."""
    out: Dict[str, int] = {}
    for line in _read(f"/proc/{pid}/status").splitlines():
        key, _, rest = line.partition(":")
        if key.startswith(("Vm", "Rss")) and rest.strip().endswith("kB"):
            out[key] = int(rest.split()[0])
    return out


class Log:
    """Progress lines on stderr, with the time since the bench started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()

    def __call__(self, msg: str) -> None:
        sys.stderr.write(f"[{time.monotonic() - self.t0:6.1f}s] {msg}\n")
        sys.stderr.flush()


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib
    is not installed (a bench then writes its tables without the plot)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(plt: Any, fig: Any, path: str) -> str:
    """Lay out, write (PNG at the size the README shows) and free one figure."""
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def cell(x: Any, fmt: str) -> str:
    """A table cell: ``x`` formatted, or "-" for a missing figure."""
    return "-" if x is None else format(x, fmt)


def dump_json(path: str, obj: Any) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def merge_json(path: str, keys: Dict[str, Any]) -> None:
    """Set ``keys`` in the JSON object at ``path`` (created if missing or
    unreadable), keeping every other key: each bench script owns its keys."""
    try:
        with open(path) as f:
            merged = json.load(f)
    except (OSError, ValueError):
        merged = {}
    merged.update(keys)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    dump_json(path, merged)
