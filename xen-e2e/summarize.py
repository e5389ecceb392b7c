#!/usr/bin/env python3
"""Summarise xen-e2e results files (one per run): per-test status across runs,
helper timings (median over every sample: runs x rounds) and ours / Debian.
Exit 1 if any test failed or any run did not reach DONE."""
import statistics
import sys


def main(paths):
    order, status, detail, times = [], {}, {}, {}
    done = passes = fails = 0
    for run, path in enumerate(paths):
        try:
            lines = open(path).read().splitlines()
        except OSError:
            lines = []
        for line in lines:
            parts = line.split(" ", 3)
            if parts[0] == "RESULT" and len(parts) >= 3:
                name, st = parts[1], parts[2]
                if name not in status:
                    order.append(name)
                    status[name] = ["-"] * len(paths)
                status[name][run] = st
                detail[name] = parts[3] if len(parts) > 3 else ""
                passes += st == "PASS"
                fails += st == "FAIL"
            elif parts[0] == "TIME" and len(parts) == 4:
                times.setdefault(parts[1], {}).setdefault(parts[2], []).append(float(parts[3]))
            elif line == "DONE":
                done += 1
    print(f"\nper test ({len(paths)} run(s), one status per run):")
    for name in order:
        print(f"  {name:40s} {' '.join(status[name]):12s} {detail[name][:88]}")
    print("\nhelper timings, seconds: median [min-max] over all samples (runs x rounds)")
    print(f"  {'operation':22s} {'Debian':>22s} {'ours':>22s}   ours/Debian (medians)")
    for op, by in times.items():
        cols = []
        for h in ("debian", "ours"):
            v = by.get(h, [])
            cols.append(f"{statistics.median(v):6.2f} [{min(v):.2f}-{max(v):.2f}] n={len(v)}" if v else "n/a")
        d, o = by.get("debian"), by.get("ours")
        ratio = f"{statistics.median(o) / statistics.median(d):.2f}" if d and o else "n/a"
        print(f"  {op:22s} {cols[0]:>22s} {cols[1]:>22s}   {ratio}")
    print(f"\nruns finished: {done} of {len(paths)}")
    print(f"RESULTS: {passes} passed, {fails} failed")
    return 1 if fails or done < len(paths) or not paths else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
