#!/usr/bin/env python3
"""Summarise xen-e2e results files (one per run): per-test status across runs,
helper timings (median over every sample: runs x rounds) and ours / Debian,
per Xen release.  Arguments: results files, each optionally labelled with its
release as ``4.20=PATH``.  Prints ``RESULTS xen-REL: N passed, M failed`` per
release and the overall ``RESULTS: N passed, M failed``.
Exit 1 if any test failed or any run did not reach DONE."""
import statistics
import sys
from typing import Dict, List


def read(path: str) -> List[str]:
    try:
        return open(path).read().splitlines()
    except OSError:
        return []


def timing_table(times: Dict[str, Dict[str, List[float]]]) -> None:
    print(f"  {'operation':26s} {'Debian':>22s} {'ours':>22s} {'pyxl':>22s}   ours/Debian (medians)")
    for op, by in times.items():
        cols = []
        for h in ("debian", "ours", "pyxl"):
            v = by.get(h, [])
            cols.append(f"{statistics.median(v):6.2f} [{min(v):.2f}-{max(v):.2f}] n={len(v)}" if v else "n/a")
        d, o = by.get("debian"), by.get("ours")
        ratio = f"{statistics.median(o) / statistics.median(d):.2f}" if d and o else "n/a"
        print(f"  {op:26s} {cols[0]:>22s} {cols[1]:>22s} {cols[2]:>22s}   {ratio}")


def main(args: List[str]) -> int:
    runs = [(a.split("=", 1) if "=" in a else ["", a]) for a in args]
    releases = list(dict.fromkeys(rel for rel, _ in runs))
    order: List[str] = []
    status: Dict[str, List[str]] = {}
    detail: Dict[str, str] = {}
    times: Dict[str, Dict[str, Dict[str, List[float]]]] = {r: {} for r in releases}
    counts = {r: [0, 0] for r in releases}          # passed, failed
    done = 0
    for run, (rel, path) in enumerate(runs):
        for line in read(path):
            parts = line.split(" ", 3)
            if parts[0] == "RESULT" and len(parts) >= 3:
                name, st = parts[1], parts[2]
                if name not in status:
                    order.append(name)
                    status[name] = ["-"] * len(runs)
                status[name][run] = st
                detail[name] = parts[3] if len(parts) > 3 else ""
                counts[rel][0] += st == "PASS"
                counts[rel][1] += st == "FAIL"
            elif parts[0] == "TIME" and len(parts) == 4:
                times[rel].setdefault(parts[1], {}).setdefault(parts[2], []).append(float(parts[3]))
            elif line == "DONE":
                done += 1
    heads = " ".join(rel or "run" for rel, _ in runs)
    print(f"\nper test ({len(runs)} run(s), one status per run: {heads}):")
    for name in order:
        print(f"  {name:40s} {' '.join(status[name]):12s} {detail[name][:88]}")
    for rel in releases:
        print(f"\nhelper timings{' on Xen ' + rel if rel else ''}, seconds: "
              "median [min-max] over all samples (runs x rounds)")
        timing_table(times[rel])
    print(f"\nruns finished: {done} of {len(runs)}")
    for rel in releases:
        if rel:
            print(f"RESULTS xen-{rel}: {counts[rel][0]} passed, {counts[rel][1]} failed")
    passes = sum(c[0] for c in counts.values())
    fails = sum(c[1] for c in counts.values())
    print(f"RESULTS: {passes} passed, {fails} failed")
    return 1 if fails or done < len(runs) or not runs else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
