"""Migration over mutual TLS against plain TCP, in the same run: throughput and loop lag.

    python bench/migrate_tls.py [--quick] [--memory 512M] [--reps 3] [--no-write]

Each run migrates a fresh idle simulated guest (non-live: one pass, so the
figure is the stream's throughput, not the precopy policy's) from one fakexen
state dir to another over TCP on localhost.  The receiver is a separate
``pyxl migrate-receive`` process, the sender ``pyxl.migrate.migrate`` in this
process, on pyxl's default loop, with a 1 ms timer on that loop whose lateness
is the loop lag.  Plain and TLS runs alternate (ABBA), so that a machine whose
load drifts skews both alike.  Certificates: a CA and two leaves made by the
``openssl`` command line in a temporary directory.

* ``mib_s``: guest MiB / wall time (migrate() call -> source destroyed).
* ``tls_over_plain``: the median over repetitions of TLS ÷ plain throughput of
  adjacent runs (goal ≥ 0.8).
* ``lag_p99_ms``: p99 lateness of the 1 ms timer on the sender's loop during
  the run (goal ≤ 5 ms).
* ``cpu_s_per_gib``: this process's CPU seconds (user + sys) per GiB of guest:
  the loop's work (TLS runs in a stage child, pyxl/migrate/tlsstage.py).
* ``end_cpu_s_per_gib``: the same plus the children this process reaped in the
  run (its helper, its TLS stage): what the whole end cost.

Merges key ``migrate_tls`` into bench/results/latest.json and writes
bench/results/migrate_tls.md.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import benchlib  # noqa: E402  (puts the repo root on sys.path)
from migrate import merge_latest  # noqa: E402

from pyxl import migrate, sim  # noqa: E402
from pyxl.loop import default_loop  # noqa: E402

MB = 1 << 20
RESULTS = os.path.join(HERE, "results")


def _openssl(d: str, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True, timeout=60)


def make_pki(d: str) -> Dict[str, List[str]]:
    """CA, receiver and sender certificates; the CLI arguments for each end."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _openssl(d, "req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=bench-ca", "-addext", "basicConstraints=critical,CA:TRUE")
    for name in ("receiver", "sender"):
        _openssl(d, "req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", f"/CN={name}")
        with open(os.path.join(d, f"{name}.ext"), "w") as f:
            f.write(f"subjectAltName=DNS:{name},IP:127.0.0.1\n")
        _openssl(d, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
                 "-CAcreateserial", "-out", f"{name}.pem", "-days", "1", "-extfile",
                 f"{name}.ext")
    return {n: ["--tls-cert", os.path.join(d, f"{n}.pem"), "--tls-key",
                os.path.join(d, f"{n}.key"), "--tls-ca", os.path.join(d, "ca.pem")]
            for n in ("receiver", "sender")}


class Lag:
    """A 1 ms timer on the loop: each firing's lateness, and the CPU time this
    process used between arming and firing (an upper bound on the part of the
    lateness that work on the loop caused; the rest is waiting for a CPU), as
    bench/run.py's Ticker."""

    def __init__(self, period: float = 0.001) -> None:
        self.period = period
        self.lags: List[float] = []
        self.own_cpu: List[float] = []
        self.stopped = False
        self._arm()

    def _arm(self) -> None:
        self.cpu0 = time.process_time()
        self.due = time.monotonic() + self.period
        default_loop().call_later(self.period, self._fire)

    def _fire(self) -> None:
        self.lags.append(max(0.0, time.monotonic() - self.due))
        self.own_cpu.append(max(0.0, time.process_time() - self.cpu0))
        if not self.stopped:
            self._arm()


def ktls_available() -> bool:
    try:
        with open("/proc/sys/net/ipv4/tcp_available_ulp") as f:
            return "tls" in f.read().split()
    except OSError:
        return False


def one_run(memory: int, tls: bool, pki: Dict[str, List[str]], log: benchlib.Log,
            side: str = "sender") -> Dict[str, Any]:
    """One migration; ``side`` is the end that runs in this process, on the
    default loop with the lag probe (the other is a ``pyxl`` CLI process)."""
    a = tempfile.mkdtemp(prefix="pyxl-bench-a-", dir="/dev/shm")
    b = tempfile.mkdtemp(prefix="pyxl-bench-b-", dir="/dev/shm")
    peer = None
    try:
        dom = sim.create(memory, sim_dir=a)
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        if side == "sender":
            peer = subprocess.Popen([sys.executable, "-m", "pyxl", "migrate-receive",
                                     "--listen", "127.0.0.1:0", "--sim-dir", b]
                                    + (pki["receiver"] + ["--tls-allow", "sender"]
                                       if tls else []),
                                    stderr=subprocess.PIPE, text=True, cwd=benchlib.ROOT)
            assert peer.stderr is not None
            m = re.search(r":(\d+)$", peer.stderr.readline().strip())
            assert m, "receiver did not start"
            kw: Dict[str, Any] = {}
            if tls:
                s = pki["sender"]
                kw["tls"] = migrate.TlsOptions(s[1], s[3], s[5])
            ru0 = resource.getrusage(resource.RUSAGE_SELF)
            ch0 = resource.getrusage(resource.RUSAGE_CHILDREN)
            lag = Lag()
            t0 = time.monotonic()
            op: Any = migrate.migrate(dom, ("127.0.0.1", int(m.group(1))), sim_dir=a,
                                      timeout=600, **kw)
        else:
            kw = {}
            if tls:
                r = pki["receiver"]
                kw["tls"] = migrate.TlsOptions(r[1], r[3], r[5], allow=("sender",))
            lag = Lag()
            t0 = time.monotonic()
            op = migrate.receive("127.0.0.1:0", sim_dir=b, timeout=600, **kw)
            assert op.address is not None
            peer = subprocess.Popen([sys.executable, "-m", "pyxl", "migrate", "--sim-dir", a]
                                    + (pki["sender"] if tls else [])
                                    + [str(dom), f"127.0.0.1:{op.address[1]}"],
                                    stderr=subprocess.PIPE, text=True, cwd=benchlib.ROOT)
        default_loop().run_until(op.done)
        total = time.monotonic() - t0
        lag.stopped = True
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        ch1 = resource.getrusage(resource.RUSAGE_CHILDREN)   # before the peer CLI's reaping
        peer.wait(timeout=60)
        res = op.result()
        # The sender's wall time is the migration's; the receiver's op also waits
        # for the sender CLI to start, so its figure is the restore's (the stream).
        secs = total if side == "sender" else res.restore.duration
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        children = (ch1.ru_utime - ch0.ru_utime) + (ch1.ru_stime - ch0.ru_stime)
        row = {"transport": "tls" if tls else "plain", "side": side, "seconds": round(secs, 4),
               "mib_s": round(memory / MB / secs, 1),
               "cpu_s_per_gib": round(cpu / (memory / (1 << 30)), 3),
               "end_cpu_s_per_gib": round((cpu + children) / (memory / (1 << 30)), 3),
               "lag_p99_ms": round((benchlib.quantile(lag.lags, 0.99) or 0) * 1000, 3),
               "lag_max_ms": round(max(lag.lags, default=0) * 1000, 3),
               "lag_own_cpu_p99_ms": round((benchlib.quantile(lag.own_cpu, 0.99) or 0) * 1000,
                                           3),
               "lag_samples": len(lag.lags), "peer_rc": peer.returncode}
        log(f"  {side:8s} {row['transport']:5s} {row['mib_s']:8.1f} MiB/s  {secs:6.2f} s  "
            f"lag p99 {row['lag_p99_ms']:.2f} ms (own CPU {row['lag_own_cpu_p99_ms']:.2f}, "
            f"max {row['lag_max_ms']:.1f})  "
            f"{row['cpu_s_per_gib']:.2f} CPU s/GiB (with children {row['end_cpu_s_per_gib']:.2f})")
        return row
    finally:
        if peer is not None and peer.poll() is None:
            peer.kill()
            peer.wait()
        for d in (a, b):
            sim.remove_dir(d)


def many_run(memory: int, n: int, tls: bool, pki: Dict[str, List[str]],
             log: benchlib.Log) -> Dict[str, Any]:
    """``n`` migrations at once from this process (one loop, as a toolstack
    that manages many domains runs them), each to its own receiver process:
    the aggregate throughput and this loop's lag while they run."""
    a = tempfile.mkdtemp(prefix="pyxl-bench-a-", dir="/dev/shm")
    bs = [tempfile.mkdtemp(prefix="pyxl-bench-b-", dir="/dev/shm") for _ in range(n)]
    peers: List[subprocess.Popen[str]] = []
    try:
        doms = [sim.create(memory, sim_dir=a) for _ in range(n)]
        ports = []
        for b in bs:
            peer = subprocess.Popen([sys.executable, "-m", "pyxl", "migrate-receive",
                                     "--listen", "127.0.0.1:0", "--sim-dir", b]
                                    + (pki["receiver"] + ["--tls-allow", "sender"]
                                       if tls else []),
                                    stderr=subprocess.PIPE, text=True, cwd=benchlib.ROOT)
            peers.append(peer)
            assert peer.stderr is not None
            m = re.search(r":(\d+)$", peer.stderr.readline().strip())
            assert m, "receiver did not start"
            ports.append(int(m.group(1)))
        kw: Dict[str, Any] = {}
        if tls:
            s = pki["sender"]
            kw["tls"] = migrate.TlsOptions(s[1], s[3], s[5])
        ru0 = resource.getrusage(resource.RUSAGE_SELF)
        lag = Lag()
        t0 = time.monotonic()
        ops = [migrate.migrate(d, ("127.0.0.1", port), sim_dir=a, timeout=600, **kw)
               for d, port in zip(doms, ports)]
        default_loop().run_until(lambda: all(o.done() for o in ops))
        total = time.monotonic() - t0
        lag.stopped = True
        ru1 = resource.getrusage(resource.RUSAGE_SELF)
        for o in ops:
            o.result()
        for peer in peers:
            peer.wait(timeout=60)
        cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
        row = {"transport": "tls" if tls else "plain", "migrations": n,
               "seconds": round(total, 4), "mib_s": round(n * memory / MB / total, 1),
               "cpu_s_per_gib": round(cpu / (n * memory / (1 << 30)), 3),
               "lag_p99_ms": round((benchlib.quantile(lag.lags, 0.99) or 0) * 1000, 3),
               "lag_max_ms": round(max(lag.lags, default=0) * 1000, 3)}
        log(f"  {n} at once {row['transport']:5s} {row['mib_s']:8.1f} MiB/s in all  "
            f"lag p99 {row['lag_p99_ms']:.2f} ms (max {row['lag_max_ms']:.1f})  "
            f"{row['cpu_s_per_gib']:.2f} CPU s/GiB in this process")
        return row
    finally:
        for peer in peers:
            if peer.poll() is None:
                peer.kill()
                peer.wait()
        for d in (a, *bs):
            sim.remove_dir(d)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer, smaller runs")
    p.add_argument("--memory", type=sim.parse_size, help="guest RAM (default 512M; quick 128M)")
    p.add_argument("--reps", type=int, help="TLS/plain pairs (default 3; quick 2)")
    p.add_argument("--concurrent", type=int,
                   help="migrations at once in the concurrent round (default 4; quick 2)")
    p.add_argument("--no-write", action="store_true", help="print only")
    args = p.parse_args(argv)
    quick = args.quick or bool(os.environ.get("QUICK"))
    memory = args.memory or (128 * MB if quick else 512 * MB)
    reps = args.reps or (2 if quick else 3)
    log = benchlib.Log()
    log(f"migrate-tls bench: {memory // MB} MiB idle guest, non-live, {reps} pair(s)")
    started = time.time()
    load_before = benchlib.loadavg()
    runs: List[Dict[str, Any]] = []
    ratios: List[float] = []
    rx_ratios: List[float] = []
    with tempfile.TemporaryDirectory(prefix="pyxl-bench-pki-") as d:
        pki = make_pki(d)
        for rep in range(reps):
            for side in ("sender", "receiver"):
                pair = {}
                for tls in ((False, True) if rep % 2 == 0 else (True, False)):
                    row = one_run(memory, tls, pki, log, side)
                    row["rep"] = rep
                    runs.append(row)
                    pair[row["transport"]] = row["mib_s"]
                (ratios if side == "sender" else rx_ratios).append(pair["tls"] / pair["plain"])
        n = args.concurrent or (2 if quick else 4)
        log(f"concurrent round: {n} migrations of {memory // 2 // MB} MiB at once, one loop")
        many = [many_run(memory // 2, n, tls, pki, log) for tls in (False, True, True, False)]

    def med(transport: str, key: str, side: str = "sender") -> Optional[float]:
        m = benchlib.median([r[key] for r in runs
                             if r["transport"] == transport and r["side"] == side])
        return None if m is None else round(m, 2)

    summary = {
        "tls_over_plain": round(benchlib.median(ratios) or 0, 3),
        "tls_over_plain_each": [round(r, 3) for r in ratios],
        "plain_mib_s": med("plain", "mib_s"), "tls_mib_s": med("tls", "mib_s"),
        "plain_lag_p99_ms": med("plain", "lag_p99_ms"),
        "tls_lag_p99_ms": med("tls", "lag_p99_ms"),
        "plain_cpu_s_per_gib": med("plain", "cpu_s_per_gib"),
        "tls_cpu_s_per_gib": med("tls", "cpu_s_per_gib"),
        "receiver_tls_over_plain": round(benchlib.median(rx_ratios) or 0, 3),
        "receiver_plain_lag_p99_ms": med("plain", "lag_p99_ms", "receiver"),
        "receiver_tls_lag_p99_ms": med("tls", "lag_p99_ms", "receiver"),
        "receiver_plain_cpu_s_per_gib": med("plain", "cpu_s_per_gib", "receiver"),
        "receiver_tls_cpu_s_per_gib": med("tls", "cpu_s_per_gib", "receiver"),
        "end_plain_cpu_s_per_gib": med("plain", "end_cpu_s_per_gib"),
        "end_tls_cpu_s_per_gib": med("tls", "end_cpu_s_per_gib"),
        "receiver_end_plain_cpu_s_per_gib": med("plain", "end_cpu_s_per_gib", "receiver"),
        "receiver_end_tls_cpu_s_per_gib": med("tls", "end_cpu_s_per_gib", "receiver"),
        "sender_plain_own_cpu_p99_ms": med("plain", "lag_own_cpu_p99_ms"),
        "sender_tls_own_cpu_p99_ms": med("tls", "lag_own_cpu_p99_ms"),
        "receiver_plain_own_cpu_p99_ms": med("plain", "lag_own_cpu_p99_ms", "receiver"),
        "receiver_tls_own_cpu_p99_ms": med("tls", "lag_own_cpu_p99_ms", "receiver"),
        "tls_lag_p99_ms_worst": max(r["lag_p99_ms"] for r in runs if r["transport"] == "tls"),
        "concurrent": n,
    }
    for t in ("plain", "tls"):
        for key in ("mib_s", "lag_p99_ms", "cpu_s_per_gib"):
            summary[f"concurrent_{t}_{key}"] = round(benchlib.median(
                [r[key] for r in many if r["transport"] == t]) or 0, 3)
    S = summary
    md = "\n".join([
        f"# Migration over mutual TLS vs plain TCP ({memory // MB} MiB idle guest, non-live, "
        f"{reps} pairs per side, {time.strftime('%Y-%m-%d', time.gmtime(started))})", "",
        "The in-process end runs on pyxl's default loop with a 1 ms timer (its lateness is the "
        "loop lag); the other end is a `pyxl` CLI process.  Same machine, localhost TCP.", "",
        "| figure | plain | TLS | goal |", "|---|---:|---:|---|",
        f"| sender in process: throughput, guest MiB/s (median) | {S['plain_mib_s']} | "
        f"{S['tls_mib_s']} | |",
        f"| sender in process: TLS ÷ plain, paired runs (median; each) | | "
        f"{S['tls_over_plain']} ({', '.join(map(str, S['tls_over_plain_each']))}) | ≥ 0.8 |",
        f"| receiver in process: TLS ÷ plain, restore time (median) | | "
        f"{S['receiver_tls_over_plain']} | |",
        f"| sender loop lag p99, ms (median) | {S['plain_lag_p99_ms']} | "
        f"{S['tls_lag_p99_ms']} | ≤ 5 ms |",
        f"| receiver loop lag p99, ms (median) | {S['receiver_plain_lag_p99_ms']} | "
        f"{S['receiver_tls_lag_p99_ms']} | ≤ 5 ms |",
        f"| of which the process's own CPU, p99 ms, sender / receiver | "
        f"{S['sender_plain_own_cpu_p99_ms']} / {S['receiver_plain_own_cpu_p99_ms']} | "
        f"{S['sender_tls_own_cpu_p99_ms']} / {S['receiver_tls_own_cpu_p99_ms']} | |",
        f"| worst TLS run's lag p99, ms | | {S['tls_lag_p99_ms_worst']} | |",
        f"| sender process CPU s per GiB | {S['plain_cpu_s_per_gib']} | "
        f"{S['tls_cpu_s_per_gib']} | |",
        f"| receiver process CPU s per GiB | {S['receiver_plain_cpu_s_per_gib']} | "
        f"{S['receiver_tls_cpu_s_per_gib']} | |",
        f"| sender end (process + helper + TLS stage) CPU s per GiB | "
        f"{S['end_plain_cpu_s_per_gib']} | {S['end_tls_cpu_s_per_gib']} | |",
        f"| receiver end (process + helper + TLS stage) CPU s per GiB | "
        f"{S['receiver_end_plain_cpu_s_per_gib']} | {S['receiver_end_tls_cpu_s_per_gib']} | |",
        f"| {n} migrations at once from one loop: guest MiB/s in all (median of 2) | "
        f"{S['concurrent_plain_mib_s']} | {S['concurrent_tls_mib_s']} | |",
        f"| {n} at once: the loop's lag p99, ms | {S['concurrent_plain_lag_p99_ms']} | "
        f"{S['concurrent_tls_lag_p99_ms']} | ≤ 5 ms |",
        f"| {n} at once: the loop process's CPU s per GiB | "
        f"{S['concurrent_plain_cpu_s_per_gib']} | {S['concurrent_tls_cpu_s_per_gib']} | |",
        "",
        f"Load average before/after: {load_before} / {benchlib.loadavg()}; "
        f"{os.cpu_count()} CPUs; kernel TLS (the `tls` ULP) "
        f"{'available' if ktls_available() else 'not available'}.", "",
        "Why this design, and what limits the figures: TLS runs in user space, in a TLS "
        "stage child per connection (pyxl/migrate/tlsstage.py: Python's ssl over memory "
        "BIOs, its own poll loop); the loop hands it plaintext through a pipe as it would "
        "hand an ssh command, so the loop's own work (the own-CPU row, the process CPU "
        "rows) is what plain TCP costs, and the rest of the lag is waiting for a CPU.  The "
        "stage pays for AES-256-GCM and two copies (the end CPU rows), while the plain path "
        "splices without touching the bytes.  Here both ends, both helpers, both stages "
        "and the machine's other load share two CPUs, so that CPU is the throughput lost; "
        "with the two ends on two hosts, each pays only its half.  Kernel TLS (splice "
        "straight into an encrypting socket) would remove the copies where the kernel has "
        "it (Python < 3.12 also lacks `ssl.OP_ENABLE_KTLS`); Python's ssl cannot choose "
        "TLS 1.3's AES-128-GCM, 1.7x faster than AES-256-GCM on this CPU (openssl speed).",
        ""])
    print(md)
    result = {"schema": 1, "mode": "quick" if quick else "full", "started": started,
              "duration_s": round(time.time() - started, 1), "guest_mib": memory // MB,
              "machine": benchlib.machine_info(), "summary": summary, "runs": runs,
              "concurrent_runs": many,
              "ktls_available": ktls_available(),
              "load_before": load_before, "load_after": benchlib.loadavg()}
    if not args.no_write:
        with open(os.path.join(RESULTS, "migrate_tls.md"), "w") as f:
            f.write(md)
        log(f"wrote key 'migrate_tls' of {merge_latest('migrate_tls', result)} and "
            "bench/results/migrate_tls.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
