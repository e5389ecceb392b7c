"""bench/: the benchmark machinery and the fakexen memcheck (``make bench``, ``make memcheck``).

The numbers themselves are not tested (they depend on the machine); what is:
the statistics helpers, the memcheck log parser, a smoke run of bench/run.py
end to end (JSON keys, markdown, PNG), and bench/memcheck.py's three valgrind
runs on fakexen -- so CI (``make test``) runs the memcheck of the real data
paths as well as tests/integration/test_helper_memcheck.py.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ROOT, needs_debian

BENCH = ROOT / "bench"
sys.path.insert(0, str(BENCH))

import benchlib  # noqa: E402
import report  # noqa: E402
import memcheck  # noqa: E402

needs_valgrind = pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind not installed")


def test_statistics():
    assert benchlib.median([3, 1, 2]) == 2
    assert benchlib.median([]) is None
    assert benchlib.quantile(list(range(1, 101)), 0.99) == 99
    assert benchlib.quantile([5.0], 0.99) == 5.0
    assert benchlib.quantile(list(range(1, 11)), 0.5) == 5
    assert benchlib.rotate(["a", "b", "c"], 1) == ["b", "c", "a"]
    assert benchlib.rotate(["a", "b", "c"], 5) == ["c", "a", "b"]
    assert abs(benchlib.geomean([2.0, 8.0]) - 4.0) < 1e-12
    assert benchlib.geomean([None]) is None
    assert benchlib.ratio(1.0, 0) is None


def test_pinned_restores_affinity():
    before = os.sched_getaffinity(0)
    cpu = min(before)
    with benchlib.pinned({cpu}):
        assert os.sched_getaffinity(0) == {cpu}
    assert os.sched_getaffinity(0) == before


def test_raw_copy_is_the_populated_pages(tmp_path):
    src = tmp_path / "mem"
    src.write_bytes(bytes(range(256)) * 16 * 8)  # 8 pages
    n = benchlib.write_raw_copy(str(src), [(1, 2), (5, 1)], str(tmp_path / "raw"))
    data = src.read_bytes()
    assert n == 3 * 4096
    assert (tmp_path / "raw").read_bytes() == data[4096:3 * 4096] + data[5 * 4096:6 * 4096]


def test_memcheck_log_parser():
    clean = ("==1== HEAP SUMMARY:\n==1==    definitely lost: 0 bytes in 0 blocks\n"
             "==1==    possibly lost: 4,816 bytes in 12 blocks\n"
             "==1== ERROR SUMMARY: 0 errors from 0 contexts (suppressed: 0 from 0)\n")
    assert memcheck.parse_log(clean) == {"errors": 0, "definitely_lost": 0}
    leaky = ("==1==    definitely lost: 1,024 bytes in 2 blocks\n"
             "==1== ERROR SUMMARY: 3 errors from 3 contexts (suppressed: 0 from 0)\n")
    assert memcheck.parse_log(leaky) == {"errors": 3, "definitely_lost": 1024}
    freed = "==1== All heap blocks were freed -- no leaks are possible\n==1== ERROR SUMMARY: 0 errors"
    assert memcheck.parse_log(freed) == {"errors": 0, "definitely_lost": 0}
    # No summary at all (valgrind never ran, or the log was cut): not a pass.
    assert memcheck.parse_log("") == {"errors": None, "definitely_lost": None}


@needs_debian
def test_bench_smoke(tmp_path):
    """bench/run.py end to end on tiny guests: every key, the table and the plot."""
    before = {d for d in os.listdir("/dev/shm") if d.startswith("pyxl-bench-")}
    r = subprocess.run([sys.executable, str(BENCH / "run.py"), "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "latest.json").read_text())
    for key in ("save_ratio_vs_debian", "save_ratio_vs_raw", "restore_ratio_vs_debian",
                "spawn_ms_ours", "spawn_ms_debian", "spawn_ms_extra_vs_debian",
                "concurrency_efficiency", "concurrency_efficiency_raw", "concurrency_ratio_vs_raw",
                "concurrency_efficiency_debian",
                "loop_lag_p99_ms"):
        assert isinstance(res[key], float) and res[key] == res[key], key
    assert res["spawn_ms_extra_vs_debian"] == pytest.approx(
        res["spawn_ms_ours"] - res["spawn_ms_debian"], abs=1e-3)
    assert sorted(res["helper_rss_mib"]) == ["0.015625", "0.03125"]
    assert {(e["helper"], e["dirty_rate_mbps"]) for e in res["live"]} == {
        (h, r) for h in ("ours", "debian") for r in (0.0, 20.0)}
    for e in res["live"]:
        assert e["rounds"] >= 1 and e["bytes_sent"] > 32 << 20 and e["downtime_ms"] > 0
    for key in ("nproc", "cpu_model", "kernel", "git_commit"):
        assert res["machine"][key]
    assert set(res["targets"]) >= {"save_ratio_vs_debian", "loop_lag_p99_ms", "helper_rss_flat"}
    md = (tmp_path / "latest.md").read_text()
    assert "`save_ratio_vs_debian`" in md and md in r.stdout
    assert (tmp_path / "latest.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Nothing left behind: the bench's state directory (and its domains) is gone.
    assert {d for d in os.listdir("/dev/shm") if d.startswith("pyxl-bench-")} <= before


def test_stall_smoke(tmp_path):
    """bench/stall.py on 2 tiny guests: both rounds, every figure, merged into --out."""
    out = tmp_path / "latest.json"
    out.write_text(json.dumps({"kept": 1}))
    r = subprocess.run([sys.executable, str(BENCH / "stall.py"), "--n", "2", "--mib", "8",
                        "--dir", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["kept"] == 1
    st = res["stall"]
    assert st["child_nice"] == 0 and st["child_nice_10"]["child_nice"] == 10
    for fig in (st, st["child_nice_10"]):
        assert 0 < fig["loop_stall_p99_ms"] <= fig["loop_stall_max_ms"]
        assert fig["loop_stall_cpu_max_ms"] > 0 and fig["loop_stall_blocked_max_ms"] >= 0
        # less the run-queue wait, a callback is never longer than by the wall clock
        assert 0 < fig["loop_stall_unqueued_max_ms"] <= fig["loop_stall_max_ms"]
        assert fig["most_cpu_callback"]["cpu_ms"] == fig["loop_stall_cpu_max_ms"]
        assert fig["callbacks"] > 20 and 0 <= fig["callbacks_over_5ms"] <= fig["callbacks"]
        for phase in ("worst_save_callback", "worst_restore_callback"):
            # the two clocks tick apart: CPU may read a hair over wall
            assert fig[phase]["wall_ms"] + 1 >= fig[phase]["cpu_ms"] >= 0
            assert fig[phase]["callback"]
            assert fig[phase]["queued_ms"] >= 0 and fig[phase]["stolen_ms"] >= 0
    shared = st["callers_session"]
    assert shared["callbacks"] > 20 and 0 < shared["loop_stall_p99_ms"] <= shared["loop_stall_max_ms"]
    assert st["own_session_vs_callers_session"] == pytest.approx(
        st["loop_stall_max_ms"] / shared["loop_stall_max_ms"], rel=1e-2)
    assert isinstance(st["autogroup"], bool)
    assert st["nice10_vs_default"] == pytest.approx(
        st["child_nice_10"]["loop_stall_max_ms"] / st["loop_stall_max_ms"], rel=1e-2)
    assert st["inloop_finish_ms"] > 0
    probed = st["with_probe"]
    probe = probed["probe"]
    assert probe["cpu_ms"] == 0.3 and probe["callbacks"] > 0
    # each of its callbacks spins for 0.3 ms of CPU: none is shorter by the wall clock
    assert 0.29 <= probe["probe_stall_p99_ms"] <= probe["probe_stall_max_ms"]
    assert 0 < probe["probe_stall_unqueued_max_ms"] <= probe["probe_stall_max_ms"]
    assert probe["worst_probe_callback"]["wall_ms"] == probe["probe_stall_max_ms"]
    assert st["probe_stall_max_ms"] == probe["probe_stall_max_ms"]
    assert st["stall_vs_probe"] == pytest.approx(
        probed["loop_stall_max_ms"] / probe["probe_stall_max_ms"], rel=1e-2)
    assert "probe" not in st and probed["callbacks"] > 20
    every = st["every_progress"]
    assert st["loop_cpu_per_restore_ms"] > 0 and every["loop_cpu_per_restore_ms"] > 0
    assert st["loop_cpu_per_save_vs_every_progress"] == pytest.approx(
        st["loop_cpu_per_save_ms"] / every["loop_cpu_per_save_ms"], rel=2e-2)
    # ~1,000 progress frames a save (the guests' 4 GiB pfn space) cost the loop
    # more than one per 50 ms
    assert st["loop_cpu_per_save_vs_every_progress"] < 0.8, (st["loop_cpu_per_save_ms"],
                                                             every["loop_cpu_per_save_ms"])
    mig = st["migrate"]
    assert mig["mib"] == 16 * 8 and mig["migrate_s"] > 0 and mig["inloop_destroy_ms"] > 0
    assert 0 < mig["migrate_stall_unqueued_max_ms"] <= mig["migrate_stall_max_ms"]
    assert mig["worst_migrate_callback"]["callback"]
    assert mig["migrate_stall_vs_inloop_destroy"] == pytest.approx(
        mig["migrate_stall_max_ms"] / mig["inloop_destroy_ms"], rel=2e-2)
    cs = st["child_start"]
    assert cs["busy"] == 2 and cs["starts"] == 20
    assert 0 < cs["spawner_median_ms"] <= cs["spawner_max_ms"]
    assert 0 < cs["popen_median_ms"] <= cs["popen_max_ms"]
    assert cs["spawner_vs_popen_median"] == pytest.approx(
        cs["spawner_median_ms"] / cs["popen_median_ms"], rel=2e-2)
    rt = st["loop_fifo"]
    if os.geteuid() != 0:   # no CAP_SYS_NICE (CI runs as root): the round says why
        assert rt["error"].startswith("cannot set SCHED_FIFO"), rt
        return
    assert rt["callbacks"] > 20 and rt["saves_s"] > 0 and rt["restores_s"] > 0, rt
    assert 0 < rt["loop_stall_unqueued_max_ms"] <= rt["loop_stall_max_ms"]
    assert st["loop_fifo_vs_default"] == pytest.approx(
        rt["loop_stall_max_ms"] / st["loop_stall_max_ms"], rel=1e-2)
    assert [p for p in os.listdir(tmp_path) if p != "latest.json"] == []


@needs_valgrind
def test_memcheck_on_fakexen(tmp_path):
    """make memcheck's data-path half: non-live save, live save of a dirtying guest, restore."""
    out = tmp_path / "memcheck.json"
    r = subprocess.run([sys.executable, str(BENCH / "memcheck.py"), "--json", str(out)],
                       capture_output=True, text=True, timeout=900)
    res = json.loads(out.read_text())
    assert r.returncode == 0 and res["ok"], r.stdout + r.stderr[-3000:]
    runs = {x["run"]: x for x in res["runs"]}
    assert set(runs) == {"save", "live-save", "restore"}
    for x in runs.values():
        assert x["errors"] == 0 and x["definitely_lost"] == 0
    assert runs["live-save"]["iterations"] >= 2
    assert runs["restore"]["identical"]


def test_the_report_says_whether_the_stall_goals_hold():
    """The loop-stall row's holds column: each goal (at most 5 ms) on its own."""
    assert report.stall_goals({"loop_stall_max_ms": 4.76, "loop_start_block_ms": 2.5}) == \
        "yes / – / yes"
    assert report.stall_goals({"loop_stall_max_ms": 5.43, "loop_start_block_ms": 5.0}) == \
        "**no** / – / yes"
    assert report.stall_goals({}) == "– / – / –"
