"""zstd-compressed images and migrations against plain ones, per content profile.

    python bench/compress.py [--quick | --smoke] [--out FILE]

For each content profile of ``pyxl sim create --content`` (zero, text,
random, typical) one guest of the run's size is:

* saved (not live, ``leave="paused"``, fsync on) to a new file on tmpfs
  (/dev/shm) and on the ext4 disk (/var/tmp), plain and ``compress=True``
  alternately (paired, the order flipped every repetition): the file size
  ratio (compressed / plain bytes) and the time ratio (compressed / plain,
  median of the pairs);
* migrated live between two simulated hosts at a 100 MiB/s bandwidth cap,
  plain and ``compress=True`` alternately, with the guest dirtying 4 MiB/s
  and the helper's downtime target 300 ms (``on_fail="stop"``): total time
  and downtime of each, and the ratio compressed / plain of the total time.

Baselines are the plain runs of the same run.  Keys merged into
bench/results/latest.json: ``compress`` (every cell) and the headline
``compress_size_ratio_typical`` and ``compress_migrate_time_ratio_typical``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Dict, List

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib as B  # noqa: E402  (puts the repo root on sys.path)

import pyxl  # noqa: E402
from pyxl import migrate, sim  # noqa: E402
from pyxl.backends import SimBackend  # noqa: E402

PROFILES = ("zero", "text", "random", "typical")
CAP = 100 << 20                  # bytes/s: the migration's bandwidth cap
DIRTY = 4 << 20                  # bytes/s the guest keeps writing while it migrates
DOWNTIME_MS = 300.0
SIZES = {"full": (1 << 30, 3), "quick": (256 << 20, 2), "smoke": (32 << 20, 1)}


def _save_once(sim_dir: str, dom: int, directory: str, compress: bool) -> Dict[str, float]:
    path = os.path.join(directory, f"bench-{'z' if compress else 'p'}.save")
    t0 = time.perf_counter()
    pyxl.wait(pyxl.save(dom, path, backend=SimBackend(sim_dir), leave="paused",
                        compress=compress))
    seconds = time.perf_counter() - t0
    size = os.path.getsize(path)
    os.unlink(path)
    return {"seconds": seconds, "bytes": size}


def file_saves(sim_dir: str, dom: int, reps: int) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for sink, directory in (("tmpfs", "/dev/shm"), ("ext4", "/var/tmp")):
        with tempfile.TemporaryDirectory(dir=directory, prefix="pyxl-bench-z-") as d:
            plain: List[Dict[str, float]] = []
            comp: List[Dict[str, float]] = []
            for i in range(reps):
                os.sync()
                for compress in ((False, True) if i % 2 == 0 else (True, False)):
                    (comp if compress else plain).append(_save_once(sim_dir, dom, d, compress))
        pairs = [c["seconds"] / p["seconds"] for p, c in zip(plain, comp)]
        out[sink] = {
            "plain_s": B.median([r["seconds"] for r in plain]),
            "compressed_s": B.median([r["seconds"] for r in comp]),
            "plain_bytes": plain[0]["bytes"], "compressed_bytes": comp[0]["bytes"],
            "size_ratio": round(comp[0]["bytes"] / plain[0]["bytes"], 4),
            "time_ratio": round(statistics.median(pairs), 4),
            "plain_gib_s": round(plain[0]["bytes"] / (1 << 30)
                                 / B.median_of([r["seconds"] for r in plain]), 3),
        }
    return out


def _migrate_once(src: str, dst: str, dom: int, compress: bool) -> Dict[str, Any]:
    rx = migrate.receive("127.0.0.1:0", sim_dir=dst)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=src, compress=compress,
                         max_bandwidth=CAP, downtime_ms=DOWNTIME_MS, on_fail="stop",
                         timeout=600)
    sent, got = pyxl.wait(tx, rx, timeout=900)
    assert sent.compressed == compress, (sent.compressed, compress)
    return {"domid": got.domid, "seconds": round(sent.duration, 3),
            "downtime_ms": None if sent.downtime is None else round(sent.downtime * 1e3, 1),
            "bytes_sent": sent.bytes_sent, "iterations": sent.iterations}


def migrations(hosts: List[str], dom: int, reps: int) -> Dict[str, Any]:
    """Alternate plain and compressed; the guest goes back and forth."""
    plain: List[Dict[str, Any]] = []
    comp: List[Dict[str, Any]] = []
    where = 0
    for i in range(reps):
        for compress in ((False, True) if i % 2 == 0 else (True, False)):
            run = _migrate_once(hosts[where], hosts[1 - where], dom, compress)
            dom, where = run.pop("domid"), 1 - where
            (comp if compress else plain).append(run)
    pairs = [c["seconds"] / p["seconds"] for p, c in zip(plain, comp)]
    return {"plain": plain, "compressed": comp, "time_ratio": round(statistics.median(pairs), 4),
            "downtime_target_ms": DOWNTIME_MS,
            "downtime_met": all((r["downtime_ms"] or 0) <= DOWNTIME_MS for r in plain + comp),
            "final": {"host": where, "domid": dom}}


def run(mode: str) -> Dict[str, Any]:
    size, reps = SIZES[mode]
    t0 = time.monotonic()
    load0 = B.loadavg()
    res: Dict[str, Any] = {"mode": mode, "guest_bytes": size, "reps": reps,
                           "bandwidth_cap": CAP, "dirty_rate": DIRTY, "profiles": {}}
    hosts = [tempfile.mkdtemp(prefix=f"pyxl-bench-z{i}-", dir="/dev/shm") for i in (0, 1)]
    try:
        for profile in PROFILES:
            dom = sim.create(size, name=f"z-{profile}", content=profile, sim_dir=hosts[0],
                             paused=True)
            cell: Dict[str, Any] = {"file": file_saves(hosts[0], dom, reps)}
            sim.unpause(dom, sim_dir=hosts[0])
            sim.set_dirty_rate(dom, DIRTY, sim_dir=hosts[0])
            cell["migrate"] = migrations(hosts, dom, reps)
            final = cell["migrate"].pop("final")
            sim.destroy(final["domid"], sim_dir=hosts[final["host"]])
            res["profiles"][profile] = cell
            sys.stderr.write(f"{profile}: {json.dumps(cell)}\n")
    finally:
        for h in hosts:
            for info in sim.list_domains(sim_dir=h):
                sim.destroy(info.domid, sim_dir=h)
            shutil.rmtree(h, ignore_errors=True)
    typ = res["profiles"]["typical"]
    res["compress_size_ratio_typical"] = typ["file"]["tmpfs"]["size_ratio"]
    res["compress_migrate_time_ratio_typical"] = typ["migrate"]["time_ratio"]
    res["duration_s"] = round(time.monotonic() - t0, 1)
    res["loadavg"] = {"before": load0, "after": B.loadavg()}
    return res


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="256 MiB guests, 2 repetitions")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", default=os.path.join(HERE, "results", "latest.json"))
    args = p.parse_args()
    res = run("smoke" if args.smoke else "quick" if args.quick else "full")
    B.merge_json(args.out, {"compress": res, **{
        key: res[key] for key in ("compress_size_ratio_typical",
                                  "compress_migrate_time_ratio_typical")}})
    for name, cell in res["profiles"].items():
        f, m = cell["file"], cell["migrate"]
        sys.stdout.write(
            f"{name:8} size {f['tmpfs']['size_ratio']:.3f}  file time tmpfs "
            f"{f['tmpfs']['time_ratio']:.2f} ext4 {f['ext4']['time_ratio']:.2f}  migrate "
            f"{m['time_ratio']:.2f} (plain {B.median([r['seconds'] for r in m['plain']]):.1f} s, "
            f"zstd {B.median([r['seconds'] for r in m['compressed']]):.1f} s; downtime "
            f"{[r['downtime_ms'] for r in m['compressed']]} ms)\n")
    sys.stdout.write(f"merged into {args.out} in {res['duration_s']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
