#!/usr/bin/env python3
"""pyxl benchmarks: ``make bench`` (full, < 10 min on 2 cores) and ``make bench QUICK=1`` (< 3 min).

Every headline figure is a ratio to a baseline measured in the same run, with
the two sides alternated, because the machines this runs on are noisy (another
tenant's QEMU may hold a vCPU; the load seen during every run is recorded).

1. save: idle guest, ours vs Debian's libxl-save-helper (both driven by pyxl on
   the same fakexen domain) vs ``cat`` of the same guest pages into the same
   sink.  Sinks: a pipe read by ``cat >/dev/null``, and a file on ext4.
2. restore: ours vs Debian's (and ``cat`` of the stream into tmpfs).
3. spawn: exec -> first message, as pyxl's HelperProcess sees it.
4. concurrency: 1, 4, 16 saves at once on pyxl's loop, one thread.
5. live save of a guest dirtying 0, 20, 100 MB/s.
6. helper peak RSS (VmHWM when ``complete`` arrives) against guest size.

Writes bench/results/latest.json, latest.md and latest.png (``--out``), and
prints the table.  See benchlib.py for the conventions (GiB/s of guest RAM,
where wall time starts and ends, placement).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import benchlib as B
from benchlib import GIB, MIB, median, median_of, pinned, ratio, rotate

import pyxl
from pyxl import sim
from pyxl.ops.helper_process import HelperProcess, save_argv
from pyxl.loop import SelectorLoop
from pyxl.ops.operation import SAVE_CALLBACKS
from pyxl.wire.codec import Complete, cbflags_for

HERE = os.path.dirname(os.path.abspath(__file__))

MODES: Dict[str, Dict[str, Any]] = {
    # A few seconds: for tests/integration/test_bench.py, which checks the machinery, not the numbers.
    "smoke": {
        "save_sizes": [32 * MIB],
        "save_reps": {32 * MIB: 1},
        "file_reps": {32 * MIB: 1},
        "placement_reps": 1,
        "restore_reps": {32 * MIB: 1},
        "spawn_reps": 3,
        "conc_size": 8 * MIB,
        "conc_levels": [1, 4, 16],
        "conc_reps": 1,
        "nice_reps": 1,
        "live_size": 32 * MIB,
        "live_rates": [0, 20_000_000],
        "live_reps": 1,
        "rss_sizes": [16 * MIB, 32 * MIB],
        "rss_reps": 1,
    },
    "quick": {
        "save_sizes": [256 * MIB],
        "save_reps": {256 * MIB: 9},
        "file_reps": {256 * MIB: 5},
        "placement_reps": 3,
        "restore_reps": {256 * MIB: 7},
        "spawn_reps": 60,
        "conc_size": 128 * MIB,
        "conc_levels": [1, 4, 16],
        "conc_reps": 3,
        "nice_reps": 2,
        "live_size": 256 * MIB,
        "live_rates": [0, 20_000_000, 100_000_000],
        "live_reps": 1,
        "rss_sizes": [64 * MIB, 256 * MIB, 1 * GIB],
        "rss_reps": 1,
    },
    "full": {
        "save_sizes": [1 * GIB, 4 * GIB],
        "save_reps": {1 * GIB: 9, 4 * GIB: 5},
        "file_reps": {1 * GIB: 5, 4 * GIB: 3},
        "placement_reps": 3,
        "restore_reps": {1 * GIB: 7, 4 * GIB: 3},
        "spawn_reps": 100,
        "conc_size": 256 * MIB,
        "conc_levels": [1, 4, 16],
        "conc_reps": 5,
        "nice_reps": 3,
        "live_size": 1 * GIB,
        "live_rates": [0, 20_000_000, 100_000_000],
        "live_reps": 2,
        "rss_sizes": [1 * GIB, 4 * GIB, 8 * GIB],
        "rss_reps": 1,
    },
}

TARGETS = [
    # key, comparison, threshold, text
    ("save_ratio_vs_debian", ">=", 1.00, "≥ 1.00"),
    ("restore_ratio_vs_debian", ">=", 1.00, "≥ 1.00"),
    ("save_ratio_vs_raw", ">=", 0.90, "≥ 0.90 (pipe)"),
    ("spawn_ms_extra_vs_debian", "<=", 8.0, "≤ 8 ms"),
    ("concurrency_efficiency", ">=", 0.90, "≥ 0.90"),
    ("loop_lag_p99_ms", "<=", 5.0, "≤ 5 ms"),
]


# The raw reference for file sinks: sh -c _RAW_FILE_SAVE sh RAW TMP DEST DIR.
_RAW_FILE_SAVE = 'cat "$1" > "$2" && sync "$2" && mv "$2" "$3" && sync "$4"'

FILE_SINK_DEFINITION = (
    "pyxl.save(path, fsync=True) against `cat` of the guest's pages into a new file in the same "
    "directory + fsync + rename + directory fsync (coreutils sync, mv); file = tmpfs (/dev/shm), "
    "file_ext4 = the ext4 disk (/var/tmp); os.sync() before each run (untimed), file unlinked after")

#: Keys a --file-save run recomputes (and merges into an existing result file).
FILE_SAVE_KEYS = ("save_file_ratio_vs_debian", "save_file_ratio_vs_raw",
                  "save_file_ratio_vs_debian_ext4", "save_file_ratio_vs_raw_ext4")


def gib(n: int) -> str:
    """Guest size as a key: '1', '4', '0.25'."""
    return f"{n / GIB:g}"


class Bench:
    def __init__(self, mode: str, cpu: int, out: str, file_only: bool = False) -> None:
        self.mode = mode
        self.file_only = file_only
        self.cfg = MODES[mode]
        self.out = out
        self.log = B.Log()
        cpus = sorted(B.all_cpus())
        self.cpus = cpus
        self.cpu = cpu if cpu in cpus else cpus[-1]
        others = [c for c in cpus if c != self.cpu]
        self.guest_cpu = others[0] if others else self.cpu
        self.same = {self.cpu}
        self.helpers = {"ours": pyxl.helper_path(), "debian": pyxl.DEBIAN_HELPER}
        for name, path in self.helpers.items():
            if not os.access(path, os.X_OK):
                raise SystemExit(f"bench: {name} helper {path} is missing (run `make setup`)")
        self.sim_dir = tempfile.mkdtemp(prefix="pyxl-bench-", dir="/dev/shm")
        # The file sink and restore streams live on a real disk, not tmpfs.
        self.work = tempfile.mkdtemp(prefix="pyxl-bench-", dir="/var/tmp")
        self.runs: List[Dict[str, Any]] = []
        self.lag_pool: Dict[Any, Dict[str, List[float]]] = {}
        self.raw_files: Dict[int, str] = {}
        self.results: Dict[str, Any] = {}
        self.figure_time: Dict[str, float] = {}

    # ---- guests ---------------------------------------------------------------------------

    def create(self, size: int, dirty_rate: int = 0) -> int:
        t = time.monotonic()
        for attempt in range(25):
            try:
                dom = sim.create(size, dirty_rate=dirty_rate, sim_dir=self.sim_dir, paused=True)
                break
            except sim.InsufficientResources as exc:
                # Other tenants' jobs come and go: wait for the memory rather
                # than fail a long run (up to 2 minutes).
                if attempt == 24:
                    raise
                self.log(f"waiting for memory: {exc}")
                time.sleep(5)
        self.log(f"created {gib(size)} GiB guest d{dom} in {time.monotonic() - t:.1f}s")
        return dom

    def destroy(self, dom: int) -> None:
        try:
            sim.destroy(dom, sim_dir=self.sim_dir)
        except sim.SimError:
            pass

    def mem_path(self, dom: int) -> str:
        return os.path.join(self.sim_dir, f"d{dom}", "mem")

    def write_raw_copy(self, dom: int) -> int:
        """The guest's pages as one tmpfs file for `cat` (self.raw_files[dom]); its size."""
        self.raw_files[dom] = os.path.join(self.sim_dir, f"raw-{dom}.bin")
        return B.write_raw_copy(self.mem_path(dom), sim.populated_runs(dom, sim_dir=self.sim_dir),
                                self.raw_files[dom])

    def cleanup(self) -> None:
        try:
            for info in sim.list_domains(sim_dir=self.sim_dir):
                self.destroy(info.domid)
        finally:
            shutil.rmtree(self.sim_dir, ignore_errors=True)
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- one timed run --------------------------------------------------------------------

    def _record(self, **rec: Any) -> Dict[str, Any]:
        self.runs.append(rec)
        return rec

    def placement(self, name: str) -> Dict[str, int]:
        """CPUs of (writer, reader, driver) for a placement name.

        pair:  writer (helper or cat) and reader on one vCPU, pyxl's loop on the other
        same:  all three on one vCPU
        split: writer on one vCPU, reader and pyxl's loop on the other
        """
        s, d = self.cpu, self.guest_cpu
        return {"pair": {"writer": s, "reader": s, "driver": d},
                "same": {"writer": s, "reader": s, "driver": s},
                "split": {"writer": s, "reader": d, "driver": d}}[name]

    def save_once(self, figure: str, dom: int, size: int, who: str, sink: str, rep: int,
                  *, live: bool = False, count: bool = False,
                  placement: str = "pair") -> Dict[str, Any]:
        """One save by a helper (``who`` in ours/debian) or by ``cat`` (``raw``).

        Sinks: ``pipe`` (64 KiB default pipe -> cat), ``pipe1m`` (the same pipe
        grown to 1 MiB with F_SETPIPE_SZ before the writer starts), ``file``.
        """
        mem: Dict[str, int] = {}
        marks: Dict[str, float] = {}
        qemu = B.qemu_pids()
        nbytes = None
        pl = self.placement(placement)
        filesink = sink.startswith("file")
        # file: tmpfs (/dev/shm); file_ext4: the ext4 disk.  A new file each run.
        fdir = self.work if sink == "file_ext4" else self.sim_dir
        path = os.path.join(fdir, "sink.bin")
        if filesink:
            os.sync()  # not timed: start every file run with no dirty pages
        w = -1
        reader = None
        if sink.startswith("pipe"):
            with pinned({pl["reader"]}):
                w, reader = B.start_reader(count=count, pipe_size=MIB if sink == "pipe1m" else 0)
        probe = B.LoadProbe(qemu)
        t0 = time.perf_counter()
        result = None
        if who == "raw":
            raw = self.raw_files[dom]
            with pinned({pl["writer"]}):
                if filesink:
                    # Like for like with pyxl.save(fsync=True): the same bytes into a
                    # new file in the same directory, fsync, rename, directory fsync.
                    cat = subprocess.Popen(["sh", "-c", _RAW_FILE_SAVE, "sh", raw,
                                            path + ".tmp", path, fdir])
                else:
                    cat = subprocess.Popen(["cat", raw], stdout=w)
                    os.close(w)
            with pinned({pl["driver"]}):
                cat.wait()
            if cat.returncode:
                raise RuntimeError(f"cat {raw} failed: {cat.returncode}")
        else:
            target = w if not filesink else path
            try:
                with pinned({pl["writer"]}):  # the helper inherits this at spawn
                    op = pyxl.save(dom, target, live=live, leave="paused",
                                   helper=self.helpers[who], sim_dir=self.sim_dir,
                                   fsync=filesink, timeout=600)
                    # a save's helper starts from the loop: let it start here
                    pyxl.default_loop().run_until(
                        lambda: (op.helper is not None and op.helper.pid > 0) or op.done(), 60)
                spy_helper(op, mem, marks)
                with pinned({pl["driver"]}):
                    result = pyxl.wait(op)[0]
            finally:
                if not filesink:
                    os.close(w)
        if reader is not None:
            out, _ = reader.communicate()
            if count:
                nbytes = int(out.split()[0])
        t1 = time.perf_counter()
        load = probe.stop()
        if filesink:
            os.unlink(path)
        wall = t1 - t0
        rec = self._record(figure=figure, who=who, sink=sink, size_gib=size / GIB, rep=rep,
                           wall_s=round(wall, 5), gib_per_s=round(size / GIB / wall, 4),
                           placement=placement, **load)
        if result is not None:
            rec.update(iterations=result.iterations,
                       downtime_s=None if result.downtime is None else round(result.downtime, 5))
        if nbytes is not None:
            rec["bytes"] = nbytes
        if mem:
            rec["helper_mem_kib"] = mem
        if {"first", "complete", "exit"} <= set(marks):
            # start: save() call -> first message; stream: first message ->
            # complete (libxc's work); exit: complete -> helper reaped.
            rec.update(start_ms=round((marks["first"] - t0) * 1000, 3),
                       stream_s=round(marks["complete"] - marks["first"], 5),
                       exit_ms=round((marks["exit"] - marks["complete"]) * 1000, 3),
                       helper_cpu_ms=_r(marks.get("cpu_ms")))
        return rec

    # ---- figures --------------------------------------------------------------------------

    def fig_spawn(self) -> None:
        """exec -> first message: HelperProcess (pyxl's spawn) to the first decoded frame."""
        n = self.cfg["spawn_reps"]
        dom = self.create(64 * MIB)
        env = dict(os.environ, **sim.helper_env(self.sim_dir))
        cbflags = cbflags_for(SAVE_CALLBACKS)
        devnull = os.open("/dev/null", os.O_WRONLY)
        times: Dict[str, List[float]] = {"ours": [], "debian": []}
        cpu_ms: Dict[str, List[float]] = {"ours": [], "debian": []}
        loop = SelectorLoop()
        try:
            with pinned(self.same):
                for i in range(n):
                    for who in rotate(["ours", "debian"], i):
                        first: List[float] = []
                        oncpu: List[Optional[float]] = []
                        gone: List[bool] = []
                        holder: List[HelperProcess] = []

                        def on_msg(_m: Any) -> None:
                            if not first:
                                first.append(time.perf_counter())
                                # CPU the helper has used so far (ns, schedstat field 1)
                                oncpu.append(B.schedstat_ms(holder[0].pid))

                        argv = save_argv(self.helpers[who], devnull, -1, dom, 0, cbflags)
                        t0 = time.perf_counter()
                        h = HelperProcess(loop, argv, "save", cbflags, [devnull], on_msg,
                                          lambda hp: gone.append(True), env=env)
                        holder.append(h)
                        loop.run_until(lambda: bool(first) or bool(gone), 30)
                        if not first:
                            raise RuntimeError(f"{who} helper exited without a message")
                        times[who].append((first[0] - t0) * 1000)
                        if oncpu[0] is not None:
                            cpu_ms[who].append(oncpu[0])
                        h.kill()
                        loop.run_until(lambda: bool(gone), 30)
        finally:
            os.close(devnull)
            loop.close()
            self.destroy(dom)
        res = {who: {"median_ms": round(median_of(v), 3), "p10_ms": round(B.quantile_of(v, 0.1), 3),
                     "p90_ms": round(B.quantile_of(v, 0.9), 3), "n": len(v),
                     "helper_cpu_ms_median": _r(median(cpu_ms[who]))}
               for who, v in times.items()}
        self.results["spawn"] = dict(res, placement=f"same:cpu{self.cpu}",
                                     how="perf_counter before HelperProcess() (Popen) -> first frame "
                                         "decoded by pyxl; save argv, stream fd /dev/null, fakexen")
        self.log(f"spawn: ours {res['ours']['median_ms']:.2f} ms, debian "
                 f"{res['debian']['median_ms']:.2f} ms")

    def fig_save(self, dom: int, size: int) -> None:
        reps = self.cfg["save_reps"][size]
        freps = self.cfg["file_reps"][size]
        nbytes = self.write_raw_copy(dom)
        try:
            # Warm-up (not recorded): the first run after creation pays for
            # first-touch effects in both the fake's mapping and the page cache.
            self.save_once("warmup", dom, size, "ours", "pipe", -1)
            self.runs.pop()
            for rep in range(freps if self.file_only else max(reps, freps)):
                sinks = ((["pipe", "pipe1m"] if rep < reps and not self.file_only else [])
                         + (["file", "file_ext4"] if rep < freps else []))
                for sink in rotate(sinks, rep):
                    for who in rotate(["ours", "debian", "raw"], rep):
                        r = self.save_once("save", dom, size, who, sink, rep)
                        self.log(f"save {gib(size)} GiB {sink:6} {who:6} rep {rep}: "
                                 f"{r['gib_per_s']:.2f} GiB/s (foreign {r['foreign_cores']:.2f} cores)")
            if size == min(self.cfg["save_sizes"]) and not self.file_only:
                # The same pipe save under the two other placements (see placement()).
                for rep in range(self.cfg["placement_reps"]):
                    for plc in rotate(["same", "split"], rep):
                        for who in rotate(["ours", "debian", "raw"], rep):
                            r = self.save_once("placement", dom, size, who, "pipe", rep,
                                               placement=plc)
                            self.log(f"save {gib(size)} GiB pipe {plc:5} {who:6} rep {rep}: "
                                     f"{r['gib_per_s']:.2f} GiB/s")
        finally:
            os.unlink(self.raw_files[dom])
        self.results.setdefault("raw_bytes", {})[gib(size)] = nbytes

    def fig_restore(self, dom: int, size: int, verify: bool) -> None:
        reps = self.cfg["restore_reps"][size]
        stream = os.path.join(self.work, "stream.xl")
        pyxl.wait(pyxl.save(dom, stream, leave="paused", sim_dir=self.sim_dir, fsync=False))
        os.sync()
        want = sim.digest(dom, sim_dir=self.sim_dir) if verify else None
        rawdst = os.path.join(self.sim_dir, "rawrestore.bin")
        try:
            # Warm-up (not recorded): the first restore after the stream was
            # written runs up to 2x slower, whichever helper does it.
            self.destroy(pyxl.wait(pyxl.restore(stream, paused=True, sim_dir=self.sim_dir,
                                                  name="restored"))[0].domid)
            for rep in range(reps):
                for who in rotate(["ours", "debian", "raw"], rep):
                    qemu = B.qemu_pids()
                    mem: Dict[str, int] = {}
                    marks: Dict[str, float] = {}
                    pl = self.placement("pair")
                    probe = B.LoadProbe(qemu)
                    t0 = time.perf_counter()
                    if who == "raw":
                        with open(rawdst, "wb") as f, pinned({pl["writer"]}):
                            subprocess.run(["cat", stream], stdout=f, check=True)
                        newdom = None
                    else:
                        with pinned({pl["writer"]}):
                            op = pyxl.restore(stream, paused=True, helper=self.helpers[who],
                                              sim_dir=self.sim_dir, timeout=600,
                                              name="restored")   # the source stays
                            # its helper starts from the loop: let it start here
                            pyxl.default_loop().run_until(
                                lambda: (op.helper is not None and op.helper.pid > 0)
                                or op.done(), 60)
                        spy_helper(op, mem, marks)
                        with pinned({pl["driver"]}):
                            newdom = pyxl.wait(op)[0].domid
                    t1 = time.perf_counter()
                    load = probe.stop()
                    if newdom is not None:
                        if want is not None and rep == 0:
                            got = sim.digest(newdom, sim_dir=self.sim_dir)
                            if got != want:
                                raise RuntimeError(f"{who} restore of d{dom} differs from the source")
                        self.destroy(newdom)
                    else:
                        os.unlink(rawdst)
                    wall = t1 - t0
                    rec = self._record(figure="restore", who=who, sink="file", size_gib=size / GIB,
                                       rep=rep, wall_s=round(wall, 5),
                                       gib_per_s=round(size / GIB / wall, 4), placement="pair", **load)
                    if {"first", "complete", "exit"} <= set(marks):
                        rec.update(start_ms=round((marks["first"] - t0) * 1000, 3),
                                   stream_s=round(marks["complete"] - marks["first"], 5),
                                   exit_ms=round((marks["exit"] - marks["complete"]) * 1000, 3),
                                   helper_cpu_ms=_r(marks.get("cpu_ms")), helper_mem_kib=mem)
                    self.log(f"restore {gib(size)} GiB {who:6} rep {rep}: {size / GIB / wall:.2f} GiB/s")
        finally:
            os.unlink(stream)

    def fig_live(self, dom: int, size: int) -> None:
        out = []
        for rate in self.cfg["live_rates"]:
            for rep in range(self.cfg["live_reps"]):
                for who in rotate(["ours", "debian"], rep):
                    sim.set_dirty_rate(dom, rate, sim_dir=self.sim_dir)
                    with pinned({self.guest_cpu}):
                        sim.unpause(dom, sim_dir=self.sim_dir)
                    c0, t0 = sim.counter(dom, sim_dir=self.sim_dir), time.monotonic()
                    time.sleep(0.5)
                    achieved = ((sim.counter(dom, sim_dir=self.sim_dir) - c0) * 4096
                                / (time.monotonic() - t0))
                    r = self.save_once("live", dom, size, who, "pipe", rep, live=True, count=True)
                    r.update(dirty_rate_mbps=rate / 1e6, dirty_rate_achieved_mbps=round(achieved / 1e6, 1),
                             guest_cpu=self.guest_cpu)
                    out.append(r)
                    self.log(f"live {rate / 1e6:.0f} MB/s {who:6}: {r['iterations']} rounds, "
                             f"{r['bytes'] / MIB:.0f} MiB, downtime {r['downtime_s'] * 1000:.1f} ms")
        sim.set_dirty_rate(dom, 0, sim_dir=self.sim_dir)
        live = []
        for rate in self.cfg["live_rates"]:
            for who in ("ours", "debian"):
                rs = [r for r in out if r["dirty_rate_mbps"] == rate / 1e6 and r["who"] == who]
                live.append({
                    "helper": who, "dirty_rate_mbps": rate / 1e6, "guest_gib": size / GIB,
                    "dirty_rate_achieved_mbps": median([r["dirty_rate_achieved_mbps"] for r in rs]),
                    "rounds": median([r["iterations"] for r in rs]),
                    "bytes_sent": median([r["bytes"] for r in rs]),
                    "bytes_vs_guest": round(median_of([r["bytes"] for r in rs]) / size, 3),
                    "downtime_ms": round(median_of([r["downtime_s"] for r in rs]) * 1000, 2),
                    # part of the downtime spent after `complete`: the helper's exit
                    "exit_ms": _r(median([r.get("exit_ms") for r in rs])),
                    "wall_s": round(median_of([r["wall_s"] for r in rs]), 3),
                    "n": len(rs),
                })
        self.results["live"] = live

    def fig_rss(self, dom: int, size: int) -> None:
        for rep in range(self.cfg["rss_reps"]):
            for who in rotate(["ours", "debian"], rep):
                r = self.save_once("rss", dom, size, who, "pipe", rep)
                m = r["helper_mem_kib"]
                self.log(f"rss {gib(size)} GiB {who:6}: VmHWM {m.get('VmHWM', 0) / 1024:.1f} MiB")

    def fig_concurrency(self) -> None:
        size = self.cfg["conc_size"]
        levels = self.cfg["conc_levels"]
        doms = [self.create(size) for _ in range(max(levels))]
        loop = pyxl.default_loop()
        # Idle reference: the 1 ms timer alone on pyxl's loop (and what it costs).
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        idle = Ticker(loop)
        loop.run_until(lambda: False, 0.5)
        idle.stop()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        self.ticker_cpu_frac = _cpu(ru0, ru1) / (time.perf_counter() - t0)
        self.results["loop_lag_idle"] = dict(lag_summary(idle.lags),
                                             ticker_cpu_fraction=round(self.ticker_cpu_frac, 4))
        out: List[Dict[str, Any]] = []
        # References run after each of ours: Debian's helper on the same fake, and
        # `cat` into the same pipes (see raw_concurrency_once).
        raw: Dict[int, List[float]] = {n: [] for n in levels}
        debian: Dict[int, List[float]] = {n: [] for n in levels}
        try:
            for d in doms:
                self.write_raw_copy(d)
            for rep in range(self.cfg["conc_reps"]):
                for n in (levels if rep % 2 == 0 else levels[::-1]):
                    r = self.concurrency_once(loop, doms[:n], size, rep)
                    out.append(r)
                    self._log_conc(r)
                    r = self.concurrency_once(loop, doms[:n], size, rep, who="debian")
                    debian[n].append(r["aggregate_gib_per_s"])
                    raw[n].append(self.raw_concurrency_once(doms[:n], size, rep))
                    self.log(f"concurrency {n:2}: Debian's helper {debian[n][-1]:.2f} GiB/s, "
                             f"cat {raw[n][-1]:.2f} GiB/s")
                if rep < self.cfg["nice_reps"]:
                    # Information: the same 16 saves with helpers and readers at nice +5.
                    r = self.concurrency_once(loop, doms[:max(levels)], size, rep, nice=5)
                    out.append(r)
                    self._log_conc(r)
        finally:
            for d in doms:
                self.destroy(d)
                if d in self.raw_files:
                    os.unlink(self.raw_files.pop(d))
        summary = {}
        for n in levels + ["nice5"]:
            rs = [r for r in out if (r["n"], r["nice"]) == ((max(levels), 5) if n == "nice5" else (n, 0))
                  and r["who"] == "ours"]
            if not rs:
                continue

            def med(key: str, nd: int = 3) -> Optional[float]:
                v = median([r[key] for r in rs])
                return None if v is None else round(v, nd)

            pool = self.lag_pool[(max(levels), 5, "ours") if n == "nice5" else (n, 0, "ours")]
            pl_lag, pl_own, pl_ref = (lag_summary(pool[k]) for k in ("lag", "own", "ref"))
            summary[str(n) if n != "nice5" else f"{max(levels)}@nice5"] = {
                "aggregate_gib_per_s": med("aggregate_gib_per_s", 4),
                "aggregate_gib_per_s_best": round(max(r["aggregate_gib_per_s"] for r in rs), 4),
                "pyxl_cpu_s_per_gib": med("pyxl_cpu_s_per_gib", 5),
                "pyxl_cpu_s_per_gib_without_ticker": med("pyxl_cpu_s_per_gib_without_ticker", 5),
                # pooled over the repetitions' firings
                "lag_p50_ms": pl_lag["p50_ms"],
                "lag_p99_ms": pl_lag["p99_ms"],
                "lag_max_ms": pl_lag["max_ms"],
                "lag_samples": pl_lag["n"],
                "lag_p99_ms_worst_rep": round(max(r["lag_p99_ms"] for r in rs), 3),
                "lag_own_cpu_p99_ms": pl_own["p99_ms"],
                "ref_lag_p50_ms": pl_ref["p50_ms"],
                "ref_lag_p99_ms": pl_ref["p99_ms"],
                "ref_lag_samples": pl_ref["n"],
                "start_ms_per_save_median": med("start_ms_median"),
                "start_ms_per_save_max": round(max(r["start_ms_max"] for r in rs), 3),
                "start_total_ms": med("start_total_ms"),
                "foreign_cores": med("foreign_cores"),
                "reps": len(rs),
            }
            if n in raw:
                summary[str(n)].update(raw_aggregate_gib_per_s=round(median_of(raw[n]), 4),
                                       raw_aggregate_gib_per_s_best=round(max(raw[n]), 4),
                                       debian_aggregate_gib_per_s=round(median_of(debian[n]), 4),
                                       debian_aggregate_gib_per_s_best=round(max(debian[n]), 4))
        nice_key = f"{max(levels)}@nice5"
        self.results["concurrency"] = {
            "guest_gib": size / GIB,
            "levels": {k: v for k, v in summary.items() if k != nice_key},
            "niced_helpers": summary.get(nice_key),
            "placement": f"pair i (helper + its cat) pinned to cpu[(i + {self.cpu}) % nproc]; "
                         "pyxl's loop and the reference lag probe unpinned",
        }

    def _log_conc(self, r: Dict[str, Any]) -> None:
        n = r["n"]
        self.log(f"concurrency {n:2}{' nice ' + str(r['nice']) if r['nice'] else ''}: "
                 f"{r['aggregate_gib_per_s']:.2f} GiB/s, pyxl "
                 f"{r['pyxl_cpu_s_per_gib']:.4f} CPU s/GiB, lag p99 {r['lag_p99_ms']:.2f} ms "
                 f"(reference process {r['ref_lag_p99_ms']:.2f} ms), starting took "
                 f"{r['start_total_ms']:.1f} ms (foreign {r['foreign_cores']:.2f} cores)")

    def _conc_readers(self, n: int, nice: int = 0) -> Tuple[List[int], List[Tuple[int, Any]]]:
        """The concurrency figure's N pipes to `cat` readers: pair i on cpu[(i + cpu) % nproc]."""
        ncpu = len(self.cpus)
        place = [self.cpus[(self.cpus.index(self.cpu) + i) % ncpu] for i in range(n)]
        pipes = []
        for i in range(n):
            with pinned({place[i]}):
                pipes.append(B.start_reader())
            if nice:
                os.setpriority(os.PRIO_PROCESS, pipes[-1][1].pid, nice)
        return place, pipes

    def raw_concurrency_once(self, doms: Sequence[int], size: int, rep: int) -> float:
        """The same N pipes and readers, placed alike, fed by `cat` of each guest's pages.

        The machine's own scaling of that data path (its memory and caches, the
        kernel's pipes and page cache), with no helper, fake hypervisor or pyxl.
        """
        n = len(doms)
        place, pipes = self._conc_readers(n)
        probe = B.LoadProbe(B.qemu_pids())
        t0 = time.perf_counter()
        cats = []
        for i, dom in enumerate(doms):
            with pinned({place[i]}):
                cats.append(subprocess.Popen(["cat", self.raw_files[dom]], stdout=pipes[i][0]))
            os.close(pipes[i][0])
        for c in cats:
            if c.wait():
                raise RuntimeError(f"cat failed: {c.returncode}")
        for _w, rd in pipes:
            rd.wait()
        wall = time.perf_counter() - t0
        rec = self._record(figure="concurrency", who="raw", sink="pipe", size_gib=size / GIB, n=n,
                           rep=rep, wall_s=round(wall, 5),
                           aggregate_gib_per_s=round(n * size / GIB / wall, 4),
                           placement="pairs round-robin", nice=0, **probe.stop())
        return float(rec["aggregate_gib_per_s"])

    def concurrency_once(self, loop: Any, doms: Sequence[int], size: int, rep: int,
                         nice: int = 0, who: str = "ours") -> Dict[str, Any]:
        """N saves started back to back from this thread, then run on pyxl's loop.

        The 1 ms timer is armed once every save has started, so the lag figures
        are about the loop while N saves are in flight; how long starting them
        blocked the thread (N × pyxl.save(), each a Popen that waits for the
        helper's exec) is reported separately as start_*.
        """
        n = len(doms)
        place, pipes = self._conc_readers(n, nice)
        ref = subprocess.Popen([sys.executable, os.path.join(HERE, "lagprobe.py")],
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert ref.stdout is not None and ref.stdin is not None
        if ref.stdout.readline().strip() != "ready":
            raise RuntimeError("lag probe did not start")
        qemu = B.qemu_pids()
        probe = B.LoadProbe(qemu)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        t0 = time.perf_counter()
        ops = []
        starts = []
        for i, dom in enumerate(doms):
            ts = time.perf_counter()
            with pinned({place[i]}):
                op = pyxl.save(dom, pipes[i][0], leave="paused", helper=self.helpers[who],
                               sim_dir=self.sim_dir, timeout=600)
                # what the caller is blocked for: the call (the helper starts from the loop)
                starts.append(time.perf_counter() - ts)
                # the helper inherits this placement: let it start here (not timed)
                pyxl.default_loop().run_until(lambda: (op.helper is not None and op.helper.pid > 0) or op.done(), 60)
            if nice and op.helper is not None:
                os.setpriority(os.PRIO_PROCESS, op.helper.pid, nice)

            def close_writer(_op: Any, w: int = pipes[i][0]) -> None:
                os.close(w)   # a def: mypy cannot infer a lambda with a default argument

            op.add_done_callback(close_writer)
            ops.append(op)
        started = time.perf_counter()
        win0 = time.monotonic()
        ticker = Ticker(loop)
        loop.run_until(lambda: all(op.done() for op in ops))
        ticker.stop()
        win1 = time.monotonic()
        for op in ops:
            op.result()
        for _w, rd in pipes:
            rd.wait()
        t1 = time.perf_counter()
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        load = probe.stop()
        out, _ = ref.communicate("")
        ref_lags = [lag for t, lag in json.loads(out) if win0 <= t <= win1]
        wall = t1 - t0
        cpu = _cpu(ru0, ru1)
        gibs = n * size / GIB
        lag = lag_summary(ticker.lags)
        own = lag_summary(ticker.own_cpu)
        rl = lag_summary(ref_lags)
        pool = self.lag_pool.setdefault((n, nice, who), {"lag": [], "own": [], "ref": []})
        pool["lag"] += ticker.lags
        pool["own"] += ticker.own_cpu
        pool["ref"] += ref_lags
        return self._record(
            figure="concurrency", who=who, sink="pipe", size_gib=size / GIB, n=n, rep=rep,
            wall_s=round(wall, 5), aggregate_gib_per_s=round(gibs / wall, 4),
            pyxl_cpu_s=round(cpu, 4), pyxl_cpu_s_per_gib=round(cpu / gibs, 5),
            pyxl_cpu_s_per_gib_without_ticker=round(
                max(0.0, cpu - self.ticker_cpu_frac * (t1 - started)) / gibs, 5),
            lag_p99_ms=lag["p99_ms"], lag_max_ms=lag["max_ms"], lag_samples=lag["n"],
            lag_own_cpu_p99_ms=own["p99_ms"],
            ref_lag_p99_ms=rl["p99_ms"], ref_lag_samples=rl["n"],
            start_ms_median=round(median_of(starts) * 1000, 3),
            start_ms_max=round(max(starts) * 1000, 3),
            start_total_ms=round(sum(starts) * 1000, 3), placement="pairs round-robin",
            nice=nice, **load)

    # ---- driver ---------------------------------------------------------------------------

    def timed(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        t = time.monotonic()
        fn(*args)
        self.figure_time[name] = self.figure_time.get(name, 0.0) + time.monotonic() - t

    def run(self) -> Dict[str, Any]:
        started = datetime.datetime.now(datetime.timezone.utc)
        t_start = time.monotonic()
        load_start = B.loadavg()
        self.log(f"pyxl bench ({self.mode}): sim dir {self.sim_dir}, work dir {self.work}, "
                 f"same-vCPU placement on cpu{self.cpu}, guest vCPU on cpu{self.guest_cpu}, "
                 f"load {load_start}")
        try:
            if self.file_only:
                for size in self.cfg["save_sizes"]:
                    dom = self.create(size)
                    try:
                        self.timed("save", self.fig_save, dom, size)
                    finally:
                        self.destroy(dom)
                return self.summarise(started, time.monotonic() - t_start, load_start)
            self.timed("spawn", self.fig_spawn)
            sizes = self.cfg["save_sizes"]
            rss_sizes = self.cfg["rss_sizes"]
            for size in sorted(set(sizes) | set(rss_sizes) | {self.cfg["live_size"]}):
                dom = self.create(size)
                try:
                    if size in sizes:
                        self.timed("save", self.fig_save, dom, size)
                        self.timed("restore", self.fig_restore, dom, size, size == min(sizes))
                    if size in rss_sizes:
                        self.timed("rss", self.fig_rss, dom, size)
                    if size == self.cfg["live_size"]:
                        self.timed("live", self.fig_live, dom, size)
                finally:
                    self.destroy(dom)
            self.timed("concurrency", self.fig_concurrency)
        finally:
            self.cleanup()
        duration = time.monotonic() - t_start
        return self.summarise(started, duration, load_start)

    # ---- summary --------------------------------------------------------------------------

    def summarise(self, started: datetime.datetime, duration: float,
                  load_start: List[float]) -> Dict[str, Any]:
        runs = self.runs
        sizes = self.cfg["save_sizes"]

        def sel(fig: str, sink: str, size: int, plc: str) -> List[Dict[str, Any]]:
            return [r for r in runs if r["figure"] == fig and r["sink"] == sink
                    and r["size_gib"] == size / GIB and r.get("placement") == plc]

        def thr(fig: str, who: str, sink: str, size: int, plc: str = "pair") -> List[float]:
            return [r["gib_per_s"] for r in sel(fig, sink, size, plc) if r["who"] == who]

        def paired(fig: str, a: str, b: str, sink: str, size: int, plc: str = "pair") -> Optional[float]:
            by_rep: Dict[int, Dict[str, float]] = {}
            for r in sel(fig, sink, size, plc):
                by_rep.setdefault(r["rep"], {})[r["who"]] = r["gib_per_s"]
            return median([d[a] / d[b] for d in by_rep.values() if a in d and b in d])

        def cell_of(fig: str, sink: str, size: int, plc: str = "pair") -> Dict[str, Any]:
            cell: Dict[str, Any] = {who: B.spread(thr(fig, who, sink, size, plc))
                                    for who in ("ours", "debian", "raw")}
            m = {who: cell[who].get("median") for who in ("ours", "debian", "raw")}
            cell["ratio_vs_debian"] = ratio(m["ours"], m["debian"])
            cell["ratio_vs_raw"] = ratio(m["ours"], m["raw"])
            cell["debian_ratio_vs_raw"] = ratio(m["debian"], m["raw"])
            cell["paired_vs_debian"] = paired(fig, "ours", "debian", sink, size, plc)
            cell["paired_vs_raw"] = paired(fig, "ours", "raw", sink, size, plc)
            cell["foreign_cores"] = median([r["foreign_cores"] for r in sel(fig, sink, size, plc)])
            cell["placement"] = plc
            phases(cell, sel(fig, sink, size, plc), size)
            return cell

        def phases(cell: Dict[str, Any], rs: List[Dict[str, Any]], size: int) -> None:
            """Where ours and Debian's differ: start-up, libxc's stream, exit."""
            for who in ("ours", "debian"):
                mine = [r for r in rs if r["who"] == who and "stream_s" in r]
                cell[who]["start_ms"] = _r(median([r["start_ms"] for r in mine]))
                cell[who]["exit_ms"] = _r(median([r["exit_ms"] for r in mine]))
                cell[who]["stream_gib_per_s"] = _r(median([size / GIB / r["stream_s"] for r in mine]))
                cell[who]["helper_cpu_s"] = _r(median([r["helper_cpu_ms"] / 1000 for r in mine
                                                       if r.get("helper_cpu_ms")]))
            cell["stream_ratio_vs_debian"] = _r(ratio(cell["ours"]["stream_gib_per_s"],
                                                      cell["debian"]["stream_gib_per_s"]))
            # GiB per second of the helper's own CPU time: insensitive to other
            # tenants taking the CPU away (the helpers are CPU-bound or pipe-bound).
            cell["cpu_ratio_vs_debian"] = _r(ratio(cell["debian"]["helper_cpu_s"],
                                                   cell["ours"]["helper_cpu_s"]))

        save: Dict[str, Any] = {}
        for size in sizes:
            for sink in ("pipe", "pipe1m", "file", "file_ext4"):
                save[f"{gib(size)}/{sink}"] = cell_of("save", sink, size)
        if self.file_only:
            keys: Dict[str, Any] = {"file_save_run": {
                "mode": self.mode, "started": started.isoformat(timespec="seconds"),
                "duration_s": round(duration, 1), "load_start": load_start,
                "load_end": B.loadavg(), "machine": B.machine_info(),
                "foreign_cores": {k: c["foreign_cores"] for k, c in save.items()
                                  if k.split("/")[1].startswith("file")}}}
            for key, sink in (("save_file_ratio_vs_debian", "file"), ("save_file_ratio_vs_raw", "file"),
                              ("save_file_ratio_vs_debian_ext4", "file_ext4"),
                              ("save_file_ratio_vs_raw_ext4", "file_ext4")):
                field = "paired_vs_debian" if "debian" in key else "paired_vs_raw"
                keys[key] = _r(B.geomean([save[f"{gib(s)}/{sink}"][field] for s in sizes]))
            keys["save_file"] = {k: c for k, c in save.items() if k.split("/")[1].startswith("file")}
            keys["file_save_runs"] = runs
            return keys
        placements: Dict[str, Any] = {"pair": save[f"{gib(min(sizes))}/pipe"]}
        for plc in ("same", "split"):
            placements[plc] = cell_of("placement", "pipe", min(sizes), plc)
        restore: Dict[str, Any] = {}
        for size in sizes:
            cell: Dict[str, Any] = {who: B.spread(thr("restore", who, "file", size))
                                    for who in ("ours", "debian", "raw")}
            cell["ratio_vs_debian"] = ratio(cell["ours"].get("median"), cell["debian"].get("median"))
            cell["ratio_vs_raw"] = ratio(cell["ours"].get("median"), cell["raw"].get("median"))
            cell["paired_vs_debian"] = paired("restore", "ours", "debian", "file", size)
            phases(cell, [r for r in runs if r["figure"] == "restore" and r["size_gib"] == size / GIB], size)
            restore[gib(size)] = cell

        rss: Dict[str, Dict[str, Any]] = {"ours": {}, "debian": {}}
        # (The restore cells above use the pair placement too.)
        for r in runs:
            if r["figure"] == "rss":
                m = r["helper_mem_kib"]
                rss[r["who"]].setdefault(gib(int(r["size_gib"] * GIB)), []).append(m)
        rss_mib = {who: {k: round(max(x.get("VmHWM", 0) for x in v) / 1024, 2) for k, v in d.items()}
                   for who, d in rss.items()}
        rss_detail = {who: {k: v[-1] for k, v in d.items()} for who, d in rss.items()}

        sp = self.results["spawn"]
        conc = self.results["concurrency"]["levels"]
        levels = self.cfg["conc_levels"]
        one, top = conc[str(levels[0])], conc[str(levels[-1])]
        single, single_med = one["aggregate_gib_per_s_best"], one["aggregate_gib_per_s"]
        ncpu = len(self.cpus)
        avail = max(ncpu - top["foreign_cores"], 0.5)

        res: Dict[str, Any] = {
            "schema": 1,
            "mode": self.mode,
            "started": started.isoformat(timespec="seconds"),
            "duration_s": round(duration, 1),
            "figure_time_s": {k: round(v, 1) for k, v in self.figure_time.items()},
            "machine": B.machine_info(),
            "load": {
                "loadavg_start": load_start,
                "loadavg_end": B.loadavg(),
                "foreign_cores_median": median([r["foreign_cores"] for r in runs]),
                "qemu_cores_median": median([r["qemu_cores"] for r in runs]),
                "steal_cores_median": median([r["steal_cores"] for r in runs]),
                "note": "foreign = CPUs busy with anything but this benchmark and its children, "
                        "averaged over each run; qemu = other tenants' qemu-system processes",
            },
            "placement": {
                "writer_cpu": self.cpu,
                "other_cpu": self.guest_cpu,
                "save/restore/live/rss": f"pair: the writer (helper or cat) and the reader (cat, "
                                         f"wc) on cpu{self.cpu}, pyxl's loop on cpu{self.guest_cpu}",
                "spawn": f"same: pyxl and the helper on cpu{self.cpu}",
                "live guest vCPU": f"cpu{self.guest_cpu}",
                "concurrency": self.results["concurrency"]["placement"],
                "placement_check": f"{gib(min(sizes))} GiB pipe save also under 'same' (all on "
                                   f"cpu{self.cpu}) and 'split' (writer cpu{self.cpu}; reader and "
                                   f"pyxl cpu{self.guest_cpu})",
            },
            "sizes_gib": [s / GIB for s in sizes],
            # ---- headline keys ----
            "save_ratio_vs_debian": _r(B.geomean([save[f"{gib(s)}/pipe"]["paired_vs_debian"] for s in sizes])),
            "save_ratio_vs_raw": _r(B.geomean([save[f"{gib(s)}/pipe"]["paired_vs_raw"] for s in sizes])),
            "save_pipe1m_ratio_vs_debian": _r(B.geomean([save[f"{gib(s)}/pipe1m"]["paired_vs_debian"] for s in sizes])),
            "save_pipe1m_ratio_vs_raw": _r(B.geomean([save[f"{gib(s)}/pipe1m"]["paired_vs_raw"] for s in sizes])),
            "save_file_ratio_vs_debian": _r(B.geomean([save[f"{gib(s)}/file"]["paired_vs_debian"] for s in sizes])),
            "save_file_ratio_vs_raw": _r(B.geomean([save[f"{gib(s)}/file"]["paired_vs_raw"] for s in sizes])),
            "save_file_ratio_vs_debian_ext4": _r(B.geomean([save[f"{gib(s)}/file_ext4"]["paired_vs_debian"]
                                                            for s in sizes])),
            "save_file_ratio_vs_raw_ext4": _r(B.geomean([save[f"{gib(s)}/file_ext4"]["paired_vs_raw"]
                                                         for s in sizes])),
            "restore_ratio_vs_debian": _r(B.geomean([restore[gib(s)]["paired_vs_debian"] for s in sizes])),
            "save_cpu_ratio_vs_debian": _r(B.geomean([save[f"{gib(s)}/pipe"]["cpu_ratio_vs_debian"] for s in sizes])),
            "restore_cpu_ratio_vs_debian": _r(B.geomean([restore[gib(s)]["cpu_ratio_vs_debian"] for s in sizes])),
            "spawn_ms_ours": sp["ours"]["median_ms"],
            "spawn_ms_debian": sp["debian"]["median_ms"],
            "spawn_ms_extra_vs_debian": round(sp["ours"]["median_ms"] - sp["debian"]["median_ms"], 3),
            "concurrency_efficiency": _r(top["aggregate_gib_per_s_best"] / (single * ncpu)),
            "concurrency_efficiency_medians": _r(top["aggregate_gib_per_s"] / (single_med * ncpu)),
            "concurrency_efficiency_vs_available_cores": _r(top["aggregate_gib_per_s"]
                                                            / (single_med * avail)),
            "concurrency_efficiency_raw": _r(top["raw_aggregate_gib_per_s_best"]
                                             / (one["raw_aggregate_gib_per_s_best"] * ncpu)),
            "concurrency_ratio_vs_raw": _r(top["aggregate_gib_per_s"] / top["raw_aggregate_gib_per_s"]),
            "concurrency_efficiency_debian": _r(top["debian_aggregate_gib_per_s_best"]
                                                / (one["debian_aggregate_gib_per_s_best"] * ncpu)),
            "loop_lag_p99_ms": top["lag_p99_ms"],
            "loop_lag_reference_p99_ms": top["ref_lag_p99_ms"],
            "loop_start_block_ms": top["start_total_ms"],
            "live": self.results["live"],
            "helper_rss_mib": rss_mib["ours"],
            "helper_rss_mib_debian": rss_mib["debian"],
            # ---- details ----
            "save": save,
            "save_placements": placements,
            "restore": restore,
            "spawn": sp,
            "concurrency": self.results["concurrency"],
            "loop_lag_idle": self.results["loop_lag_idle"],
            "helper_mem_kib": rss_detail,
            "raw_bytes": self.results.get("raw_bytes", {}),
            "definitions": {
                "save_ratio_vs_debian": "pipe sink: median over the repetitions of (ours ÷ Debian's "
                                        "GiB/s in adjacent runs), geometric mean over the guest sizes; "
                                        "the ratio of the medians is in save[...]['ratio_vs_debian']",
                "save_ratio_vs_raw": "pipe sink: the same pairing of ours with `cat` of the guest's "
                                     "pages (a tmpfs file) into the same kind of pipe",
                "restore_ratio_vs_debian": "stream file in page cache (ext4) -> new fakexen domain; "
                                           "paired median ours ÷ Debian's, geometric mean over sizes",
                "save_cpu_ratio_vs_debian": "pipe sink: Debian's helper CPU time ÷ ours (schedstat at "
                                            "`complete`, medians), i.e. GiB per CPU-second, ours ÷ "
                                            "Debian's; not moved by other tenants taking the CPU",
                "restore_cpu_ratio_vs_debian": "the same for restore",
                "spawn_ms": "median ms from HelperProcess() (Popen) to the first decoded frame",
                "concurrency_efficiency": "aggregate GiB/s with 16 saves ÷ (GiB/s with 1 × nproc), "
                                          "best repetition of each (other tenants only ever slow a "
                                          "run down, so the best run is the least disturbed one)",
                "concurrency_efficiency_medians": "the same from the medians of the repetitions",
                "concurrency_efficiency_raw": "concurrency_efficiency of `cat` (each guest's pages, "
                                              "a tmpfs file) into the same pipes and readers, placed "
                                              "alike, run after each of ours: the machine's own scaling",
                "concurrency_ratio_vs_raw": "16 saves ÷ 16 such `cat`s, aggregate GiB/s, medians",
                "concurrency_efficiency_debian": "concurrency_efficiency of Debian's helper, driven "
                                                 "alike on the same fake, run after each of ours",
                "concurrency_efficiency_vs_available_cores": "medians, with nproc replaced by "
                                                             "nproc − foreign cores during the 16-save runs",
                "loop_lag_p99_ms": "p99 lateness of a 1 ms timer on pyxl's loop while 16 saves are "
                                   "in flight (armed once all 16 have started), pooled over the "
                                   "repetitions",
                "loop_lag_reference_p99_ms": "the same timer on an otherwise idle SelectorLoop in a "
                                             "separate process over the same window (the machine's floor)",
                "loop_start_block_ms": "how long starting the 16 saves (16 pyxl.save() calls) "
                                       "blocked the thread; their helpers start from the loop, "
                                       "one per callback (bench/stall.py's loop_stall_max_ms "
                                       "bounds each)",
                "save pipe1m": "the same pipe grown to 1 MiB (F_SETPIPE_SZ) by the benchmark before "
                               "the writer starts, read by cat",
                "helper_rss_mib": "helper VmHWM (peak RSS since exec, incl. mapped guest pages) read "
                                  "from /proc when its `complete` message arrives, keyed by guest GiB",
                "file sink": FILE_SINK_DEFINITION,
            },
            "runs": runs,
        }
        res["targets"] = {}
        for key, op, thr_, text in TARGETS:
            v = res.get(key)
            holds = None if v is None else (v >= thr_ if op == ">=" else v <= thr_)
            res["targets"][key] = {"value": v, "target": text, "holds": holds}
        growth = _rss_growth(rss_mib["ours"])
        res["targets"]["helper_rss_flat"] = {"value": growth, "target": "flat in guest size",
                                             "holds": growth is not None and growth < 0.10}
        return res


def _r(x: Optional[float]) -> Optional[float]:
    return None if x is None else round(x, 4)


def _rss_growth(d: Dict[str, float]) -> Optional[float]:
    """(RSS at the largest guest − RSS at the smallest) ÷ RSS at the smallest."""
    if len(d) < 2:
        return None
    ks = sorted(d, key=float)
    return round((d[ks[-1]] - d[ks[0]]) / d[ks[0]], 4)


def spy_helper(op: "pyxl.Operation[Any]", store: Dict[str, int], marks: Dict[str, float]) -> None:
    """Watch the helper: /proc memory lines at ``complete``, and when things happened.

    ``marks`` gets perf_counter() times of the first message ("first"), of
    ``complete`` and of the helper's exit being reported ("exit").

    pyxl reaps the helper itself (pidfd + waitpid), so its rusage is not ours to
    read; and ru_maxrss would include the pre-exec fork of this Python process
    anyway.  At ``complete`` the helper has finished xc_domain_save/restore and
    is blocked on the reply, so VmHWM is its peak RSS since exec.  This wraps
    HelperProcess's callbacks (private attributes) before the loop has delivered
    anything.
    """
    h = op.helper
    assert h is not None
    on_msg, on_exit = h._on_message, h._on_exit

    def spy(msg: Any) -> None:
        now = time.perf_counter()
        marks.setdefault("first", now)
        if isinstance(msg, Complete):
            marks["complete"] = now
            store.update(B.proc_status(h.pid))
            cpu = B.schedstat_ms(h.pid)
            if cpu is not None:
                marks["cpu_ms"] = cpu
        on_msg(msg)

    def exited(hp: Any) -> None:
        marks["exit"] = time.perf_counter()
        on_exit(hp)

    h._on_message = spy
    h._on_exit = exited


class Ticker:
    """A 1 ms timer re-armed on ``loop``.

    ``lags``: each firing's lateness (s).  ``own_cpu``: CPU time this process
    used between arming and firing -- an upper bound on the part of the
    lateness caused by work on the loop itself (the rest is waiting for a CPU).
    """

    def __init__(self, loop: Any, period: float = 0.001) -> None:
        self.loop = loop
        self.period = period
        self.lags: List[float] = []
        self.own_cpu: List[float] = []
        self.stopped = False
        self._arm()

    def _arm(self) -> None:
        self.cpu0 = time.process_time()
        self.due = time.monotonic() + self.period
        self.timer = self.loop.call_later(self.period, self._fire)

    def _fire(self) -> None:
        if self.stopped:
            return
        self.lags.append(time.monotonic() - self.due)
        self.own_cpu.append(max(0.0, time.process_time() - self.cpu0 - 0.0))
        self._arm()

    def stop(self) -> None:
        self.stopped = True
        self.timer.cancel()


def _cpu(ru0: resource.struct_rusage, ru1: resource.struct_rusage) -> float:
    return (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)


def lag_summary(lags: Sequence[float]) -> Dict[str, Any]:
    if not lags:
        return {"n": 0, "p50_ms": None, "p99_ms": None, "max_ms": None}
    return {"n": len(lags), "p50_ms": round(B.quantile_of(lags, 0.5) * 1000, 3),
            "p99_ms": round(B.quantile_of(lags, 0.99) * 1000, 3),
            "max_ms": round(max(lags) * 1000, 3)}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="short run (256 MiB guests)")
    p.add_argument("--smoke", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu", type=int, default=-1,
                   help="vCPU for the same-vCPU placement (default: the last allowed CPU)")
    p.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    p.add_argument("--name", default="latest", help="output file stem (default latest)")
    p.add_argument("--file-save", action="store_true",
                   help="only the file-sink saves (tmpfs and ext4); merge their keys "
                        f"({', '.join(FILE_SAVE_KEYS)}, save_file, file_save_run) into "
                        "the existing STEM.json and print them")
    args = p.parse_args(argv)
    import report
    os.makedirs(args.out, exist_ok=True)
    bench = Bench("smoke" if args.smoke else "quick" if args.quick else "full", args.cpu, args.out,
                  file_only=args.file_save)
    res = bench.run()
    stem = os.path.join(args.out, args.name)
    if args.file_save:
        try:
            with open(stem + ".json") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = {}
        old.update(res)
        # The full run's cells for file sinks: replaced by this run's (the same definition).
        if isinstance(old.get("save"), dict):
            old["save"] = {k: v for k, v in old["save"].items() if "/file" not in k}
            old["save"].update(res["save_file"])
        old.setdefault("definitions", {})["file sink"] = FILE_SINK_DEFINITION
        B.dump_json(stem + ".json", old)
        sys.stdout.write(json.dumps({k: res[k] for k in FILE_SAVE_KEYS}, indent=1) + "\n")
        for k, c in res["save_file"].items():
            sys.stdout.write(f"{k}: ours {c['ours'].get('median')} debian {c['debian'].get('median')} "
                             f"raw {c['raw'].get('median')} GiB/s, paired vs raw {c['paired_vs_raw']}\n")
        sys.stdout.write(f"merged into {stem}.json in {res['file_save_run']['duration_s']:.0f}s\n")
        return 0
    # Keys other benchmarks merged into the same file (bench/migrate.py adds
    # "migrate") survive a re-run of this one.
    try:
        with open(stem + ".json") as f:
            old = json.load(f)
        for key, value in old.items():
            if key not in res:
                res[key] = value
    except (OSError, ValueError, AttributeError):
        pass
    B.dump_json(stem + ".json", res)
    md = report.markdown(res)
    with open(stem + ".md", "w") as f:
        f.write(md)
    try:
        report.plot(res, stem + ".png")
    except ImportError as exc:
        sys.stderr.write(f"bench: no plot ({exc}); `pip install matplotlib`\n")
    sys.stdout.write(md)
    sys.stdout.write(f"\nwrote {stem}.json, {stem}.md, {stem}.png in {res['duration_s']:.0f}s\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
