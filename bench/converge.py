"""Convergence benchmark (issue 20): Xen's policy, the downtime-target policy and
target + auto-converge, across guest dirty rates of 0-120 % of a capped link.

    python bench/converge.py [--quick] [--memory 128M] [--reps 2] [--target-ms 20]

Every run is bench/migrate.py's ``one_run`` (a fresh simulated guest migrated
over TCP on localhost to a separate ``pyxl migrate-receive``), at a 100 MiB/s
bandwidth cap (``--cap``), in one process, interleaving the three policies so
machine load hits them alike:

* ``xen``: libxc's built-in policy (<50 dirty pages or 5 rounds);
* ``downtime``: pyxl's helper's downtime-target policy (C, PYXL_PRECOPY=downtime,
  on_fail=stop so an infeasible target still completes, "forced");
* ``auto``: the same target as a Python policy with auto-converge
  (PYXL_PRECOPY=host; pyxl.migrate.converge.target_policy): the guest's CPU is
  capped while it dirties too fast to converge; ``throttle`` is the lowest cap.

The goals checked (``goals`` in the JSON): at 80 % of the link, auto-converge
meets a 20 ms target (measured downtime <= 30 ms) in <= 1.5x the total time of
Xen's policy; guests dirtying at <= 40 % of the link are never throttled.

Merges key ``converge`` into bench/results/latest.json and draws
bench/results/converge.png.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402
from migrate import MB, RESULTS, merge_latest, one_run  # noqa: E402

from pyxl import sim  # noqa: E402

POLICIES = ("xen", "downtime", "auto")


def summarize(runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    cells: Dict[Any, List[Dict[str, Any]]] = {}
    for r in runs:
        cells.setdefault((r["link_pct"], r["policy"]), []).append(r)
    out = []
    for (pct, policy), rs in sorted(cells.items(), key=lambda kv: (kv[0][0], POLICIES.index(kv[0][1]))):
        ok = [r for r in rs if r["outcome"] != "failed"]
        out.append({
            "link_pct": pct, "rate_mib_s": rs[0]["rate_mib_s"], "policy": policy, "n": len(rs),
            "downtime_ms": benchlib.median([r["downtime_ms"] for r in ok]),
            "downtime_ms_max": max((r["downtime_ms"] for r in ok), default=None),
            "total_s": benchlib.median([r["total_s"] for r in ok]),
            "iterations": benchlib.median([r["iterations"] for r in ok]),
            "throttle": min((r.get("throttle") or 100 for r in ok), default=None),
            "outcomes": sorted({r["outcome"] for r in rs}),
        })
    return out


def goals(summary: List[Dict[str, Any]], target_ms: float) -> Dict[str, Any]:
    cell = {(s["link_pct"], s["policy"]): s for s in summary}
    auto, xen = cell.get((80, "auto")), cell.get((80, "xen"))
    g: Dict[str, Any] = {}
    if auto and xen and auto["downtime_ms"] is not None and xen["total_s"]:
        g["auto_80pct_downtime_ms"] = auto["downtime_ms"]
        g["auto_80pct_downtime_ms_worst"] = auto["downtime_ms_max"]
        g["auto_80pct_target_met"] = auto["downtime_ms_max"] <= target_ms * 1.5
        g["auto_80pct_total_vs_xen"] = round(auto["total_s"] / xen["total_s"], 3)
        g["auto_80pct_total_within_1_5x"] = auto["total_s"] <= 1.5 * xen["total_s"]
    slow = [s for s in summary if s["policy"] == "auto" and s["link_pct"] <= 40]
    g["slow_guests_never_throttled"] = all(s["throttle"] == 100 for s in slow)
    return g


def table(summary: List[Dict[str, Any]]) -> str:
    lines = ["| dirty % of link | policy | downtime ms (median / worst) | total s | rounds | "
             "lowest CPU cap % | outcome |", "|---:|---|---:|---:|---:|---:|---|"]
    f = benchlib.cell
    for s in summary:
        lines.append(f"| {s['link_pct']} | {s['policy']} | {f(s['downtime_ms'], '.1f')} / "
                     f"{f(s['downtime_ms_max'], '.1f')} | {f(s['total_s'], '.2f')} | "
                     f"{f(s['iterations'], 'g')} | {f(s['throttle'], 'd')} | "
                     f"{','.join(s['outcomes'])} |")
    return "\n".join(lines)


def plot(summary: List[Dict[str, Any]], path: str, target_ms: float) -> Optional[str]:
    plt = benchlib.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    labels = {"xen": "Xen's policy", "downtime": f"target {target_ms:g} ms",
              "auto": f"target {target_ms:g} ms + auto-converge"}
    for policy, style in zip(POLICIES, ("o-", "s--", "^-")):
        pts = [s for s in summary if s["policy"] == policy and s["downtime_ms"] is not None]
        xs = [s["link_pct"] for s in pts]
        axes[0].plot(xs, [s["downtime_ms"] for s in pts], style, label=labels[policy])
        axes[1].plot(xs, [s["total_s"] for s in pts], style, label=labels[policy])
    axes[0].axhline(target_ms, color="grey", lw=0.8, ls=":")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("downtime (ms, log)")
    axes[1].set_ylabel("total migration time (s)")
    for ax in axes:
        ax.set_xlabel("guest dirty rate (% of the 100 MiB/s link)")
    axes[0].legend(fontsize=8)
    fig.suptitle("pyxl live migration on fakexen: convergence with auto-converge")
    return benchlib.save_figure(plt, fig, path)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="64 MiB guest, 4 rates, 1 rep (~2 min)")
    p.add_argument("--memory", type=sim.parse_size, help="guest RAM (default 128M; quick 64M)")
    p.add_argument("--reps", type=int, help="runs per cell (default 2; quick 1)")
    p.add_argument("--cap", type=sim.parse_size, default=100 * MB, help="link cap (100M)")
    p.add_argument("--target-ms", type=float, default=20.0, help="downtime target (default 20)")
    p.add_argument("--max-iterations", type=int, default=15,
                   help="the target policies' round limit (default 15)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    quick = args.quick or bool(os.environ.get("QUICK"))
    memory = args.memory or (64 * MB if quick else 128 * MB)
    reps = args.reps or (1 if quick else 2)
    pcts = [0, 40, 80, 120] if quick else [0, 20, 40, 60, 80, 100, 120]
    log = benchlib.Log()
    log(f"converge bench: {memory // MB} MiB guest, link {args.cap // MB} MiB/s, dirty "
        f"{pcts} % of it, {reps} rep(s), target {args.target_ms} ms")
    started = time.time()
    load_before = benchlib.loadavg()
    runs: List[Dict[str, Any]] = []
    for rep in range(reps):
        for pct in pcts:
            order = POLICIES if rep % 2 == 0 else POLICIES[::-1]
            for policy in order:
                row = one_run(memory, args.cap * pct // 100, args.cap, policy, args.target_ms,
                              args.max_iterations, log)
                row["link_pct"] = pct
                runs.append(row)
    summary = summarize(runs)
    print(table(summary))
    result = {
        "schema": 1, "mode": "quick" if quick else "full", "started": started,
        "duration_s": round(time.time() - started, 1), "guest_mib": memory // MB,
        "cap_mib_s": args.cap // MB, "target_ms": args.target_ms,
        "max_iterations": args.max_iterations, "machine": benchlib.machine_info(),
        "summary": summary, "goals": goals(summary, args.target_ms), "runs": runs,
        "load_before": load_before, "load_after": benchlib.loadavg(),
        "definitions": {
            "downtime_ms": "source suspended -> receiver reports its copy running",
            "total_s": "migrate() call -> source destroyed",
            "throttle": "lowest CPU cap auto-converge set, percent of one CPU (100: none)",
            "outcome": "xen: Xen's policy; met/forced: the C target policy; python: the "
                       "Python target policy (auto-converge)",
        },
    }
    print(result["goals"])
    if not args.no_write:
        png = plot(summary, os.path.join(RESULTS, "converge.png"), args.target_ms)
        result["plot"] = os.path.relpath(png, benchlib.ROOT) if png else None
        log(f"wrote key 'converge' of {merge_latest('converge', result)}"
            + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
