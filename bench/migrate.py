"""Live-migration benchmark: downtime and total time, Xen's precopy policy against
pyxl's downtime-target policy, at several guest dirty rates and bandwidth caps.

    python bench/migrate.py [--quick] [--memory 128M] [--reps 2] [--target-ms 20]

Each run migrates a fresh simulated guest (sequential writer at the given
rate) from one fakexen state dir to another over TCP on localhost: the
receiver is a separate ``pyxl migrate-receive`` process, the sender
``pyxl.migrate.migrate`` in this process.  Both helpers are pyxl's.

* ``downtime_ms``: source suspended -> the receiver reports its copy running
  (MigrateResult.downtime).
* ``total_s``: connect -> source destroyed.
* ``iterations``: precopy rounds sent while the guest ran.
* policy ``xen``: libxc's built-in (<50 dirty pages or 5 rounds);
  ``downtime``: PYXL_PRECOPY=downtime with the target, PYXL_MAX_ITERATIONS
  (--max-iterations) and PYXL_PRECOPY_ON_FAIL=stop, so an infeasible target
  still completes (``outcome`` "forced") rather than aborting.

Merges key ``migrate`` into bench/results/latest.json (other keys are kept) and
draws bench/results/migrate.png.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402  (puts the repo root on sys.path)

from pyxl import migrate  # noqa: E402
from pyxl import sim  # noqa: E402
from pyxl.loop import default_loop  # noqa: E402

MB = 1 << 20
RESULTS = os.path.join(HERE, "results")


class _PolicyLines(logging.Handler):
    """Catches the helper's pyxl-precopy verdict lines."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.outcome: Optional[str] = None

    def emit(self, record: logging.LogRecord) -> None:
        msg = record.getMessage()
        if msg.startswith("pyxl-precopy: "):
            if "within the target" in msg:
                self.outcome = "met"
            elif "forcing stop and copy" in msg:
                self.outcome = "forced"
            elif "aborting" in msg:
                self.outcome = "aborted"


def one_run(memory: int, rate: int, cap: Optional[int], policy: str, target_ms: float,
            max_iterations: int, log: benchlib.Log) -> Dict[str, Any]:
    a = tempfile.mkdtemp(prefix="pyxl-bench-a-", dir="/dev/shm")
    b = tempfile.mkdtemp(prefix="pyxl-bench-b-", dir="/dev/shm")
    rx = None
    try:
        dom = sim.create(memory, dirty_rate=rate, sim_dir=a)
        time.sleep(0.2)   # the writer is up to speed
        rx = subprocess.Popen([sys.executable, "-m", "pyxl", "migrate-receive", "--listen",
                               "127.0.0.1:0", "--sim-dir", b], stderr=subprocess.PIPE, text=True,
                              cwd=benchlib.ROOT)
        assert rx.stderr is not None
        m = re.search(r":(\d+)$", rx.stderr.readline().strip())
        assert m, "receiver did not start"
        kw: Dict[str, Any] = {}
        if policy in ("downtime", "auto"):
            kw = {"downtime_ms": target_ms, "max_iterations": max_iterations, "on_fail": "stop"}
        if policy == "auto":   # target + auto-converge: pyxl's Python policy (issue 20)
            kw["auto_converge"] = True
        lines = _PolicyLines()
        domlog = logging.getLogger(f"pyxl.domain.{dom}")
        domlog.setLevel(logging.INFO)   # the verdict is an INFO line
        domlog.propagate = False
        domlog.addHandler(lines)
        t0 = time.monotonic()
        op = migrate.migrate(dom, ("127.0.0.1", int(m.group(1))), live=True, sim_dir=a,
                             max_bandwidth=cap, timeout=600, **kw)
        default_loop().run_until(op.done)
        total = time.monotonic() - t0
        domlog.removeHandler(lines)
        domlog.setLevel(logging.NOTSET)
        domlog.propagate = True
        rx.wait(timeout=60)
        exc = op.exception()
        row: Dict[str, Any] = {"rate_mib_s": rate / MB, "cap_mib_s": None if cap is None
                               else cap / MB, "policy": policy, "total_s": round(total, 4)}
        if exc is not None:
            row.update(outcome="failed", error=str(exc))
        else:
            res = op.result()
            # None only if the source was never suspended: a completed migration was
            assert res.downtime is not None
            row.update(downtime_ms=round(res.downtime * 1000, 2), iterations=res.iterations,
                       bytes_sent=res.bytes_sent, throttle=res.throttle,
                       outcome=lines.outcome or ("xen" if policy == "xen" else
                                                 "python" if policy == "auto" else "?"))
        log(f"  rate {rate // MB:4d} MiB/s cap {'-' if cap is None else cap // MB:>4} "
            f"{policy:8s} -> {row.get('downtime_ms', '-'):>8} ms down, {total:6.2f} s, "
            f"{row.get('iterations', '-')} rounds, {row['outcome']}")
        return row
    finally:
        if rx is not None and rx.poll() is None:
            rx.kill()
            rx.wait()
        for d in (a, b):
            sim.remove_dir(d)


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    cells: Dict[Any, List[Dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["rate_mib_s"], r["cap_mib_s"], r["policy"]), []).append(r)
    out = []
    for (rate, cap, policy), rs in sorted(cells.items(), key=lambda kv: (
            kv[0][1] is not None, -(kv[0][1] or 0), kv[0][0], kv[0][2])):
        ok = [r for r in rs if r["outcome"] != "failed"]
        out.append({
            "rate_mib_s": rate, "cap_mib_s": cap, "policy": policy, "n": len(rs),
            "downtime_ms": benchlib.median([r["downtime_ms"] for r in ok]),
            "total_s": benchlib.median([r["total_s"] for r in ok]),
            "iterations": benchlib.median([r["iterations"] for r in ok]),
            "outcomes": sorted({r["outcome"] for r in rs}),
        })
    return out


def table(summary: List[Dict[str, Any]]) -> str:
    lines = ["| dirty MiB/s | cap MiB/s | policy | downtime ms | total s | rounds | outcome |",
             "|---:|---:|---|---:|---:|---:|---|"]
    f = benchlib.cell
    for s in summary:
        lines.append(f"| {s['rate_mib_s']:g} | {f(s['cap_mib_s'], 'g')} | {s['policy']} | "
                     f"{f(s['downtime_ms'], '.1f')} | {f(s['total_s'], '.2f')} | "
                     f"{f(s['iterations'], 'g')} | {','.join(s['outcomes'])} |")
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], path: str, target_ms: float) -> Optional[str]:
    plt = benchlib.pyplot()
    if plt is None:
        return None
    import matplotlib.ticker
    caps = sorted({s["cap_mib_s"] for s in summary}, key=lambda c: (c is not None, -(c or 0)))
    fig, axes = plt.subplots(2, len(caps), figsize=(4.2 * len(caps), 7), squeeze=False,
                             sharex=True)
    for col, cap in enumerate(caps):
        for policy, style in (("xen", "o-"), ("downtime", "s--")):
            pts = [s for s in summary if s["cap_mib_s"] == cap and s["policy"] == policy
                   and s["downtime_ms"] is not None]
            xs = [s["rate_mib_s"] for s in pts]
            label = "Xen default" if policy == "xen" else f"downtime {target_ms:g} ms"
            axes[0][col].plot(xs, [s["downtime_ms"] for s in pts], style, label=label)
            axes[1][col].plot(xs, [s["total_s"] for s in pts], style, label=label)
        axes[0][col].axhline(target_ms, color="grey", lw=0.8, ls=":")
        axes[0][col].set_yscale("log")
        axes[0][col].yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axes[0][col].set_title("uncapped" if cap is None else f"cap {cap:g} MiB/s")
        axes[1][col].set_xlabel("guest dirty rate (MiB/s)")
    axes[0][0].set_ylabel("downtime (ms, log)")
    axes[1][0].set_ylabel("total migration time (s)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle("pyxl live migration on fakexen: Xen's precopy policy vs downtime target")
    return benchlib.save_figure(plt, fig, path)


def merge_latest(key: str, value: Any) -> str:
    """Set ``key`` in bench/results/latest.json, keeping every other key."""
    os.makedirs(RESULTS, exist_ok=True)
    path = os.path.join(RESULTS, "latest.json")
    dfd = os.open(RESULTS, os.O_RDONLY | os.O_DIRECTORY)   # lock the directory: the file is
    try:                                                    # replaced by rename
        fcntl.flock(dfd, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                data = json.load(f)
        except (FileNotFoundError, ValueError):
            data = {}
        data[key] = value
        benchlib.dump_json(path, data)
    finally:
        os.close(dfd)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer, smaller runs (~1 min)")
    p.add_argument("--memory", type=sim.parse_size, help="guest RAM (default 128M; quick 64M)")
    p.add_argument("--reps", type=int, help="runs per cell (default 2; quick 1)")
    p.add_argument("--target-ms", type=float, default=20.0, help="downtime target (default 20)")
    p.add_argument("--max-iterations", type=int, default=15,
                   help="the downtime policy's round limit (default 15)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    quick = args.quick or bool(os.environ.get("QUICK"))
    memory = args.memory or (64 * MB if quick else 128 * MB)
    reps = args.reps or (1 if quick else 2)
    rates = [0, 16, 48, 80] if not quick else [0, 48, 80]
    caps: List[Optional[int]] = [None, 200 * MB, 100 * MB] if not quick else [None, 100 * MB]
    log = benchlib.Log()
    log(f"migrate bench: {memory // MB} MiB guest, rates {rates} MiB/s, caps "
        f"{[c // MB if c else None for c in caps]}, {reps} rep(s), target {args.target_ms} ms")
    started = time.time()
    load_before = benchlib.loadavg()
    runs: List[Dict[str, Any]] = []
    for rep in range(reps):
        for cap in caps:
            for rate in rates:
                order = ("xen", "downtime") if rep % 2 == 0 else ("downtime", "xen")
                for policy in order:
                    runs.append(one_run(memory, rate * MB, cap, policy, args.target_ms,
                                        args.max_iterations, log))
    summary = summarize(runs)
    print(table(summary))
    result = {
        "schema": 1, "mode": "quick" if quick else "full", "started": started,
        "duration_s": round(time.time() - started, 1), "guest_mib": memory // MB,
        "target_ms": args.target_ms, "max_iterations": args.max_iterations,
        "machine": benchlib.machine_info(), "summary": summary, "runs": runs,
        # 1/5/15-min load averages: other jobs on the machine skew downtimes.
        "load_before": load_before, "load_after": benchlib.loadavg(),
        "definitions": {
            "downtime_ms": "source suspended -> receiver reports its copy running",
            "total_s": "migrate() call -> source destroyed",
            "iterations": "precopy rounds sent while the guest ran",
            "outcome": "xen: Xen's policy; met: predicted downtime fit the target; forced: "
                       "round limit, stop-and-copy anyway (PYXL_PRECOPY_ON_FAIL=stop)",
        },
    }
    if not args.no_write:
        png = plot(summary, os.path.join(RESULTS, "migrate.png"), args.target_ms)
        result["plot"] = os.path.relpath(png, benchlib.ROOT) if png else None
        log(f"wrote key 'migrate' of {merge_latest('migrate', result)}"
            + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
