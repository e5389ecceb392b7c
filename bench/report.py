"""Turn a bench result (bench/results/*.json) into the markdown table and the PNG plot.

    python bench/report.py bench/results/latest.json   # rewrite latest.md, redraw the plot

``make bench`` runs it last: bench/run.py writes the table before bench/stall.py
and bench/compress.py merge their keys into the json.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

import benchlib


def _f(x: Optional[float], fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _cell(s: Dict[str, Any]) -> str:
    if not s or not s.get("n"):
        return "–"
    return f"{s['median']:.2f} [{s['min']:.2f}–{s['max']:.2f}]"


def _holds(h: Optional[bool]) -> str:
    return "–" if h is None else ("yes" if h else "**no**")


def stall_goals(stall: Dict[str, Any]) -> str:
    """Whether bench/stall.py's two goals hold (issue 17: the longest callback
    and the 16 starts, each at most 5 ms), for the table's holds column."""
    def holds(key: str) -> str:
        v = stall.get(key)
        return _holds(None if v is None else v <= 5.0)
    return f"{holds('loop_stall_max_ms')} / – / {holds('loop_start_block_ms')}"


def markdown(res: Dict[str, Any]) -> str:
    m = res["machine"]
    ld = res["load"]
    pl = res["placement"]
    out: List[str] = []
    w = out.append
    w(f"### pyxl bench ({res['mode']}), {res['started']}, {res['duration_s']:.0f} s\n")
    w(f"Machine: {m['nproc']} × {m['cpu_model']} vCPUs, kernel {m['kernel']}, "
      f"{m['mem_total_gib']} GiB RAM, cpuidle {m.get('cpuidle_driver') or '?'}, "
      f"Python {m['python']}; commit `{m['git_commit'][:12]}`{' (+ local changes)' if m['git_dirty'] else ''}.  ")
    w(f"Load: loadavg {'/'.join(f'{x:.2f}' for x in ld['loadavg_start'])} at start, "
      f"{'/'.join(f'{x:.2f}' for x in ld['loadavg_end'])} at end; during the runs a median "
      f"{_f(ld['foreign_cores_median'])} cores were busy with other work "
      f"(other tenants' QEMU: {_f(ld['qemu_cores_median'])}), steal {_f(ld['steal_cores_median'])}.  ")
    w(f"Placement (`os.sched_setaffinity`, inherited by every child): save, restore, live and RSS "
      f"runs put the writer (helper or `cat`) and the reader on cpu{pl['writer_cpu']} and pyxl's "
      f"loop on cpu{pl['other_cpu']} (\"pair\"); the live guest's vCPU runs on cpu{pl['other_cpu']}; "
      f"spawn: pyxl and the helper on cpu{pl['writer_cpu']}; concurrency: {pl['concurrency']}.\n")

    w("| figure | key | value | target | holds |")
    w("|---|---|---|---|---|")
    t = res["targets"]
    rows = [
        ("save, pipe", "save_ratio_vs_debian", "{:.3f}"),
        ("save, pipe", "save_ratio_vs_raw", "{:.3f}"),
        ("restore", "restore_ratio_vs_debian", "{:.3f}"),
        ("helper start", "spawn_ms_extra_vs_debian", "{:.2f} ms"),
        ("concurrency", "concurrency_efficiency", "{:.3f}"),
        ("concurrency", "loop_lag_p99_ms", "{:.2f} ms"),
    ]
    for fig, key, fmt in rows:
        w(f"| {fig} | `{key}` | {_f(t[key]['value'], fmt)} | {t[key]['target']} | "
          f"{_holds(t[key]['holds'])} |")
    w(f"| save, 1 MiB pipe | `save_pipe1m_ratio_vs_debian` / `_vs_raw` | "
      f"{_f(res.get('save_pipe1m_ratio_vs_debian'), '{:.3f}')} / "
      f"{_f(res.get('save_pipe1m_ratio_vs_raw'), '{:.3f}')} | (info) | – |")
    w(f"| save, file (tmpfs) | `save_file_ratio_vs_debian` / `_vs_raw` | {_f(res['save_file_ratio_vs_debian'], '{:.3f}')}"
      f" / {_f(res['save_file_ratio_vs_raw'], '{:.3f}')} | ≥ 0.90 (raw) | – |")
    w(f"| save, file (ext4) | `save_file_ratio_vs_debian_ext4` / `_vs_raw_ext4` | "
      f"{_f(res.get('save_file_ratio_vs_debian_ext4'), '{:.3f}')}"
      f" / {_f(res.get('save_file_ratio_vs_raw_ext4'), '{:.3f}')} | ≥ 0.90 (raw) | – |")
    w(f"| save / restore | `save_cpu_ratio_vs_debian` / `restore_cpu_ratio_vs_debian` (GiB per "
      f"helper CPU-second) | {_f(res.get('save_cpu_ratio_vs_debian'), '{:.3f}')} / "
      f"{_f(res.get('restore_cpu_ratio_vs_debian'), '{:.3f}')} | (info) | – |")
    w(f"| helper start | `spawn_ms_ours` / `spawn_ms_debian` | {_f(res['spawn_ms_ours'])} / "
      f"{_f(res['spawn_ms_debian'])} ms | (info) | – |")
    w(f"| concurrency | `loop_lag_reference_p99_ms` / `loop_start_block_ms` | "
      f"{_f(res.get('loop_lag_reference_p99_ms'))} / {_f(res.get('loop_start_block_ms'), '{:.1f}')} ms "
      f"| (info) | – |")
    stall = res.get("stall") or {}
    w(f"| loop stalls (bench/stall.py) | `loop_stall_max_ms` / `loop_stall_cpu_max_ms` / "
      f"its `loop_start_block_ms` | {_f(stall.get('loop_stall_max_ms'))} / "
      f"{_f(stall.get('loop_stall_cpu_max_ms'))} / {_f(stall.get('loop_start_block_ms'))} ms "
      f"| ≤ 5 / – / ≤ 5 | {stall_goals(stall)} |")
    if stall.get("loop_stall_unqueued_max_ms") is not None:
        w(f"| loop stalls less run-queue wait (same run) | `loop_stall_unqueued_max_ms` / "
          f"its worst callback's `queued_ms` | {_f(stall.get('loop_stall_unqueued_max_ms'))} / "
          f"{_f((stall.get('worst_save_callback') or {}).get('queued_ms'))} ms | (info) | – |")
    probed = stall.get("with_probe") or {}
    if "probe" in probed:
        w(f"| loop stalls, baseline: a stand-in loop beside the round (bench/stallprobe.py: "
          f"0.3 ms of CPU every 2.5 ms, a session of its own; same run) | its "
          f"`probe_stall_max_ms` / the round's `loop_stall_max_ms` / `stall_vs_probe` | "
          f"{_f(stall.get('probe_stall_max_ms'))} / {_f(probed.get('loop_stall_max_ms'))} ms / "
          f"{_f(stall.get('stall_vs_probe'), '{:.3f}')} | (info) | – |")
    every = stall.get("every_progress") or {}
    if every.get("loop_cpu_per_save_ms") is not None:
        w(f"| the loop's CPU per save / per restore, and per save with every progress report "
          f"(as Xen's helper; same run) | `loop_cpu_per_save_ms` / `loop_cpu_per_restore_ms` / "
          f"`loop_cpu_per_save_vs_every_progress` | {_f(stall.get('loop_cpu_per_save_ms'))} / "
          f"{_f(stall.get('loop_cpu_per_restore_ms'))} ms / "
          f"{_f(stall.get('loop_cpu_per_save_vs_every_progress'), '{:.3f}')} | (info) | – |")
    shared = stall.get("callers_session") or {}
    if "loop_stall_max_ms" in shared:
        w(f"| loop stalls, baseline: the children in the caller's session (as a fork's; same "
          f"run, autogroup {'on' if stall.get('autogroup') else 'off'}) | its "
          f"`loop_stall_max_ms` / `loop_stall_p99_ms` / `own_session_vs_callers_session` "
          f"(max, p99) | {_f(shared.get('loop_stall_max_ms'))} / "
          f"{_f(shared.get('loop_stall_p99_ms'))} ms / "
          f"{_f(stall.get('own_session_vs_callers_session'), '{:.3f}')}, "
          f"{_f(stall.get('own_session_p99_vs_callers_session'), '{:.3f}')} | (info) | – |")
    niced = stall.get("child_nice_10") or {}
    if niced:
        w(f"| loop stalls, children at nice +10 (`set_child_nice(10)`, same run) | its "
          f"`loop_stall_max_ms` / `nice10_vs_default` / `loop_stall_p99_ms` (default) | "
          f"{_f(niced.get('loop_stall_max_ms'))} ms / "
          f"{_f(stall.get('nice10_vs_default'), '{:.3f}')} / "
          f"{_f(stall.get('loop_stall_p99_ms'))} ms | (info) | – |")
    fifo = stall.get("loop_fifo") or {}
    if "loop_stall_max_ms" in fifo:
        w(f"| loop stalls, the loop's thread at SCHED_FIFO 1 (same run; children stay "
          f"SCHED_OTHER) | its `loop_stall_max_ms` / its `loop_stall_p99_ms` / "
          f"`loop_fifo_saves_vs_default` | {_f(fifo.get('loop_stall_max_ms'))} / "
          f"{_f(fifo.get('loop_stall_p99_ms'))} ms / "
          f"{_f(stall.get('loop_fifo_saves_vs_default'), '{:.3f}')} | ≤ 5 / – / – | – |")
    mig = stall.get("migrate") or {}
    if mig:
        w(f"| loop stalls, one {mig['mib']} MiB migration (bench/stall.py, same run) | "
          f"`migrate_stall_max_ms` / `inloop_destroy_ms` (the waited-for destroy its end "
          f"made before) | {_f(mig.get('migrate_stall_max_ms'))} / "
          f"{_f(mig.get('inloop_destroy_ms'))} ms | ≤ 5 / – | – |")
    cs = stall.get("child_start") or {}
    if cs:
        w(f"| one child's start (QEMU, a hotplug script) with {cs['busy']} busy processes "
          f"(bench/stall.py) | median / max through pyxl-spawner; `spawner_vs_popen_median` "
          f"(baseline: `subprocess.Popen` on the loop's thread, same run) | "
          f"{_f(cs.get('spawner_median_ms'), '{:.2f}')} / {_f(cs.get('spawner_max_ms'), '{:.2f}')}"
          f" ms / {_f(cs.get('spawner_vs_popen_median'), '{:.3f}')} | – | – |")
    comp = (res.get("compress") or {}).get("profiles") or {}
    typ = comp.get("typical") or {}
    w(f"| zstd (bench/compress.py), `typical` | `compress_size_ratio_typical` / "
      f"`compress_migrate_time_ratio_typical` (100 MiB/s cap) | "
      f"{_f(res.get('compress_size_ratio_typical'), '{:.3f}')} / "
      f"{_f(res.get('compress_migrate_time_ratio_typical'), '{:.3f}')} | – / ≤ 0.5 | – |")
    if typ:
        w(f"| zstd, `typical` file save | compressed ÷ plain time, tmpfs / ext4 | "
          f"{_f(typ['file']['tmpfs']['time_ratio'], '{:.2f}')} / "
          f"{_f(typ['file']['ext4']['time_ratio'], '{:.2f}')} | ≤ 1.0 | – |")
    w(f"| concurrency | `concurrency_efficiency_medians` / `_vs_available_cores` | "
      f"{_f(res.get('concurrency_efficiency_medians'), '{:.3f}')} / "
      f"{_f(res['concurrency_efficiency_vs_available_cores'], '{:.3f}')} | (info) | – |")
    w(f"| concurrency | `concurrency_efficiency_debian` / `_raw` (`cat` into the same pipes) / "
      f"`concurrency_ratio_vs_raw` | {_f(res.get('concurrency_efficiency_debian'), '{:.3f}')} / "
      f"{_f(res.get('concurrency_efficiency_raw'), '{:.3f}')} / "
      f"{_f(res.get('concurrency_ratio_vs_raw'), '{:.3f}')} | (info) | – |")
    rss = res["helper_rss_mib"]
    rss_txt = ", ".join(f"{k} GiB: {v:.1f}" for k, v in sorted(rss.items(), key=lambda kv: float(kv[0])))
    w(f"| helper RSS | `helper_rss_mib` | {rss_txt} MiB | flat | {_holds(t['helper_rss_flat']['holds'])} |")
    w("")

    w("Headline ratios are paired: the median over the repetitions of ours ÷ the other in adjacent "
      "runs (geometric mean over guest sizes).\n")
    w("**Save** of an idle guest, GiB/s of guest RAM, median [min–max]; pipe = default 64 KiB "
      "pipe → `cat`, pipe1m = the same grown to 1 MiB, file / file_ext4 = a new file on tmpfs / "
      "ext4 with fsync, rename and directory fsync (the `cat` reference alike):\n")
    w("| guest | sink | ours | Debian's | `cat` (raw) | ours ÷ Debian | ours ÷ raw | Debian ÷ raw "
      "| paired ours ÷ Debian | paired ours ÷ raw | foreign cores |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    for key, c in res["save"].items():
        g, sink = key.split("/")
        w(f"| {g} GiB | {sink} | {_cell(c['ours'])} | {_cell(c['debian'])} | {_cell(c['raw'])} | "
          f"{_f(c['ratio_vs_debian'], '{:.3f}')} | {_f(c['ratio_vs_raw'], '{:.3f}')} | "
          f"{_f(c['debian_ratio_vs_raw'], '{:.3f}')} | {_f(c['paired_vs_debian'], '{:.3f}')} | "
          f"{_f(c['paired_vs_raw'], '{:.3f}')} | {_f(c['foreign_cores'])} |")
    w("")
    w("**Where ours and Debian's differ** (pair placement): start = `pyxl.save()`/`restore()` call → "
      "first message; stream = first message → `complete` (libxc's work, as GiB/s of guest RAM); "
      "exit = `complete` → helper reaped; helper CPU = its on-CPU time at `complete` "
      "(/proc/PID/schedstat), which other tenants cannot inflate; medians:\n")
    w("| run | start ms ours / Debian's | stream GiB/s ours / Debian's | stream ours ÷ Debian | "
      "exit ms ours / Debian's | helper CPU s ours / Debian's | GiB per CPU-s ours ÷ Debian | "
      "whole run ours ÷ Debian |")
    w("|---|---|---|---|---|---|---|---|")
    for title, cells in (("save", res["save"]), ("restore", res["restore"])):
        for key, c in cells.items():
            if "stream_ratio_vs_debian" not in c:
                continue
            o, d = c["ours"], c["debian"]
            name = f"{title} {key.replace('/', ' GiB, ')}" + ("" if "/" in key else " GiB")
            w(f"| {name} | {_f(o.get('start_ms'), '{:.1f}')} / {_f(d.get('start_ms'), '{:.1f}')} | "
              f"{_f(o.get('stream_gib_per_s'))} / {_f(d.get('stream_gib_per_s'))} | "
              f"{_f(c.get('stream_ratio_vs_debian'), '{:.3f}')} | "
              f"{_f(o.get('exit_ms'), '{:.1f}')} / {_f(d.get('exit_ms'), '{:.1f}')} | "
              f"{_f(o.get('helper_cpu_s'), '{:.3f}')} / {_f(d.get('helper_cpu_s'), '{:.3f}')} | "
              f"{_f(c.get('cpu_ratio_vs_debian'), '{:.3f}')} | "
              f"{_f(c.get('ratio_vs_debian'), '{:.3f}')} |")
    w("")
    pls = res.get("save_placements") or {}
    if pls:
        g = f"{res['sizes_gib'][0]:g}"
        w(f"**Placement check**, {g} GiB pipe save (GiB/s median): pair = writer + reader on one "
          "vCPU, pyxl on the other; same = all three on one vCPU; split = writer on one vCPU, reader "
          "and pyxl on the other:\n")
        w("| placement | ours | Debian's | `cat` (raw) | ours ÷ Debian | ours ÷ raw |")
        w("|---|---|---|---|---|---|")
        for name, c in pls.items():
            w(f"| {name} | {_cell(c['ours'])} | {_cell(c['debian'])} | {_cell(c['raw'])} | "
              f"{_f(c['ratio_vs_debian'], '{:.3f}')} | {_f(c['ratio_vs_raw'], '{:.3f}')} |")
        w("")
    w("**Restore** from a stream file in page cache, GiB/s of guest RAM:\n")
    w("| guest | ours | Debian's | `cat` stream → tmpfs | ours ÷ Debian | paired | ours ÷ raw |")
    w("|---|---|---|---|---|---|---|")
    for g, c in res["restore"].items():
        w(f"| {g} GiB | {_cell(c['ours'])} | {_cell(c['debian'])} | {_cell(c['raw'])} | "
          f"{_f(c['ratio_vs_debian'], '{:.3f}')} | {_f(c['paired_vs_debian'], '{:.3f}')} | "
          f"{_f(c['ratio_vs_raw'], '{:.3f}')} |")
    w("")
    sp = res["spawn"]
    w(f"**Helper start** (exec → first message, n = {sp['ours']['n']} each, alternated): ours "
      f"{sp['ours']['median_ms']:.2f} ms (p10 {sp['ours']['p10_ms']:.2f}, p90 {sp['ours']['p90_ms']:.2f}), "
      f"Debian's {sp['debian']['median_ms']:.2f} ms (p10 {sp['debian']['p10_ms']:.2f}, "
      f"p90 {sp['debian']['p90_ms']:.2f}).  CPU the helper had used when its first message "
      f"arrived (/proc/PID/schedstat): ours {_f(sp['ours'].get('helper_cpu_ms_median'))} ms, "
      f"Debian's {_f(sp['debian'].get('helper_cpu_ms_median'))} ms.\n")
    cc = res["concurrency"]
    idle = res["loop_lag_idle"]
    w(f"**Concurrency**: N saves of {cc['guest_gib']:g} GiB idle guests at once (our helper, "
      f"each into its own pipe → `cat`), one pyxl thread.  Loop lag = lateness of a 1 ms timer on "
      f"pyxl's loop while the N saves are in flight, pooled over the repetitions (idle loop: p99 "
      f"{_f(idle['p99_ms'])} ms); "
      f"reference = the same timer in a separate idle process over the same window; own CPU = "
      f"pyxl's CPU time between arming and firing (bounds the lag caused by work on the loop); "
      f"start = the pyxl.save() calls, which block the thread:\n")
    w("| saves at once | aggregate GiB/s median (best) | Debian's helper instead | `cat` instead | pyxl CPU s/GiB (without the timer) | loop lag p50 / p99 ms "
      "(worst rep p99) | reference p50 / p99 ms | own CPU p99 ms | lag max ms | start ms per save "
      "(median / max), all | foreign cores |")
    w("|---|---|---|---|---|---|---|---|---|---|---|")
    levels = list(cc["levels"].items())
    if cc.get("niced_helpers"):
        levels.append((f"{levels[-1][0]}, helpers + readers at nice 5", cc["niced_helpers"]))
    for n, c in levels:
        w(f"| {n} | {c['aggregate_gib_per_s']:.2f} ({_f(c.get('aggregate_gib_per_s_best'))}) | "
          f"{_f(c.get('debian_aggregate_gib_per_s'))} ({_f(c.get('debian_aggregate_gib_per_s_best'))}) | "
          f"{_f(c.get('raw_aggregate_gib_per_s'))} ({_f(c.get('raw_aggregate_gib_per_s_best'))}) | "
          f"{c['pyxl_cpu_s_per_gib']:.4f} "
          f"({_f(c.get('pyxl_cpu_s_per_gib_without_ticker'), '{:.4f}')}) | "
          f"{_f(c.get('lag_p50_ms'))} / {c['lag_p99_ms']:.2f} ({_f(c.get('lag_p99_ms_worst_rep'))}) | "
          f"{_f(c.get('ref_lag_p50_ms'))} / {_f(c.get('ref_lag_p99_ms'))} | "
          f"{_f(c.get('lag_own_cpu_p99_ms'))} | {c['lag_max_ms']:.2f} | "
          f"{_f(c.get('start_ms_per_save_median'))} / {_f(c.get('start_ms_per_save_max'))}, "
          f"{_f(c.get('start_total_ms'), '{:.1f}')} | {c['foreign_cores']:.2f} |")
    w("")
    live = res["live"]
    if live:
        w(f"**Live save** of a {live[0]['guest_gib']:g} GiB guest (libxc's default policy), "
          "into a pipe → `wc -c`; downtime = suspend reply → end of stream (pyxl writes the END "
          "record once the helper has exited, so the helper's exit is inside it):\n")
        w("| helper | dirty MB/s (achieved) | rounds | bytes sent | × guest | downtime ms "
          "(of which helper exit) | wall s |")
        w("|---|---|---|---|---|---|---|")
        for e in live:
            w(f"| {e['helper']} | {e['dirty_rate_mbps']:.0f} ({_f(e['dirty_rate_achieved_mbps'], '{:.0f}')}) | "
              f"{_f(e['rounds'], '{:g}')} | {e['bytes_sent'] / 2**20:.0f} MiB | {e['bytes_vs_guest']:.2f} | "
              f"{e['downtime_ms']:.1f} ({_f(e.get('exit_ms'), '{:.1f}')}) | {e['wall_s']:.2f} |")
        w("")
    w("**Helper peak RSS** (VmHWM at `complete`, MiB):\n")
    w("| guest GiB | ours | Debian's |")
    w("|---|---|---|")
    deb = res.get("helper_rss_mib_debian", {})
    for k in sorted(rss, key=float):
        w(f"| {k} | {rss[k]:.1f} | {_f(deb.get(k), '{:.1f}')} |")
    w("")
    return "\n".join(out) + "\n"


def plot(res: Dict[str, Any], path: str) -> None:
    plt = benchlib.pyplot()
    if plt is None:
        raise ImportError("No module named 'matplotlib'")
    fig, axes = plt.subplots(2, 3, figsize=(16, 9))
    colors = {"ours": "tab:blue", "debian": "tab:orange", "raw": "tab:gray"}
    names = {"ours": "pyxl-save-helper", "debian": "Debian libxl-save-helper", "raw": "cat (raw)"}

    ax = axes[0][0]
    keys = list(res["save"])
    width = 0.27
    ax.tick_params(axis="x", labelsize=7)
    for i, who in enumerate(("ours", "debian", "raw")):
        vals = [res["save"][k][who].get("median") or 0 for k in keys]
        lo = [v - (res["save"][k][who].get("min") or v) for k, v in zip(keys, vals)]
        hi = [(res["save"][k][who].get("max") or v) - v for k, v in zip(keys, vals)]
        ax.bar([x + (i - 1) * width for x in range(len(keys))], vals, width, yerr=[lo, hi],
               color=colors[who], label=names[who], capsize=3)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([k.replace("/", " GiB\n") for k in keys])
    ax.set_ylabel("GiB/s of guest RAM")
    ax.set_title("Save, idle guest (median, min–max)")
    ax.legend(fontsize=8)

    ax = axes[0][1]
    keys = list(res["restore"])
    for i, who in enumerate(("ours", "debian", "raw")):
        vals = [res["restore"][k][who].get("median") or 0 for k in keys]
        ax.bar([x + (i - 1) * width for x in range(len(keys))], vals, width, color=colors[who],
               label=names[who] if who != "raw" else "cat stream → tmpfs")
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels([f"{k} GiB" for k in keys])
    ax.set_ylabel("GiB/s of guest RAM")
    ax.set_title("Restore from page cache")
    ax.legend(fontsize=8)

    ax = axes[0][2]
    sp = res["spawn"]
    ax.bar([0, 1], [sp["ours"]["median_ms"], sp["debian"]["median_ms"]],
           yerr=[[sp[w]["median_ms"] - sp[w]["p10_ms"] for w in ("ours", "debian")],
                 [sp[w]["p90_ms"] - sp[w]["median_ms"] for w in ("ours", "debian")]],
           color=[colors["ours"], colors["debian"]], capsize=4)
    ax.set_xticks([0, 1])
    ax.set_xticklabels([names["ours"], names["debian"]], fontsize=8)
    ax.set_ylabel("ms (median, p10–p90)")
    ax.set_title("Helper start: exec → first message")

    ax = axes[1][0]
    lv = res["concurrency"]["levels"]
    ns = [int(n) for n in lv]
    ax.plot(ns, [lv[str(n)]["aggregate_gib_per_s"] for n in ns], "o-", color=colors["ours"],
            label="aggregate GiB/s (median)")
    ax.plot(ns, [lv[str(n)].get("aggregate_gib_per_s_best") or 0 for n in ns], "o--",
            color=colors["ours"], alpha=0.5, label="aggregate GiB/s (best)")
    single = lv[str(ns[0])].get("aggregate_gib_per_s_best") or lv[str(ns[0])]["aggregate_gib_per_s"]
    ax.plot(ns, [single * min(n, res["machine"]["nproc"]) for n in ns], "--", color="gray",
            label="best single × min(N, nproc)")
    if all("raw_aggregate_gib_per_s" in lv[str(n)] for n in ns):
        ax.plot(ns, [lv[str(n)]["raw_aggregate_gib_per_s"] for n in ns], "o-", color=colors["raw"],
                label="`cat` instead (median)")
        ax.plot(ns, [lv[str(n)]["debian_aggregate_gib_per_s"] for n in ns], "o-",
                color=colors["debian"], label="Debian's helper (median)")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns)
    ax.set_xticklabels([str(n) for n in ns])
    ax.set_xlabel("saves at once (one pyxl thread)")
    ax.set_ylabel("GiB/s")
    ax2 = ax.twinx()
    ax2.plot(ns, [lv[str(n)]["lag_p99_ms"] for n in ns], "s:", color="tab:red", label="loop lag p99")
    ax2.plot(ns, [lv[str(n)].get("ref_lag_p99_ms") or 0 for n in ns], "^:", color="tab:pink",
             label="reference process p99")
    ax2.legend(fontsize=7, loc="lower right")
    ax2.set_ylabel("loop lag p99 (ms)", color="tab:red")
    ax.set_title(f"Concurrency ({res['concurrency']['guest_gib']:g} GiB guests)")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1][1]
    live = res["live"]
    for who in ("ours", "debian"):
        es = [e for e in live if e["helper"] == who]
        ax.plot([e["dirty_rate_mbps"] for e in es], [e["downtime_ms"] for e in es], "o-",
                color=colors[who], label=f"{names[who]} downtime")
    ax.set_xlabel("guest dirty rate (MB/s)")
    ax.set_ylabel("downtime (ms)")
    ax2 = ax.twinx()
    for who in ("ours", "debian"):
        es = [e for e in live if e["helper"] == who]
        ax2.plot([e["dirty_rate_mbps"] for e in es], [e["bytes_vs_guest"] for e in es], "x--",
                 color=colors[who], alpha=0.6)
    ax2.set_ylabel("bytes sent ÷ guest size (dashed)")
    ax.set_title(f"Live save ({live[0]['guest_gib']:g} GiB guest)" if live else "Live save")
    ax.legend(fontsize=8, loc="upper left")

    ax = axes[1][2]
    for who, key in (("ours", "helper_rss_mib"), ("debian", "helper_rss_mib_debian")):
        d = res.get(key, {})
        ks = sorted(d, key=float)
        ax.plot([float(k) for k in ks], [d[k] for k in ks], "o-", color=colors[who], label=names[who])
    ax.set_xscale("log", base=2)
    ax.set_xlabel("guest size (GiB)")
    ax.set_ylabel("peak RSS, VmHWM (MiB)")
    ax.set_ylim(bottom=0)
    ax.set_title("Helper peak RSS")
    ax.legend(fontsize=8)

    m = res["machine"]
    fig.suptitle(f"pyxl bench ({res['mode']}) {res['started']} — {m['nproc']} × {m['cpu_model']}, "
                 f"kernel {m['kernel']}, commit {m['git_commit'][:10]}; median foreign load "
                 f"{_f(res['load']['foreign_cores_median'])} cores", fontsize=10)
    benchlib.save_figure(plt, fig, path)


def main(argv: List[str]) -> int:
    if len(argv) != 2:
        sys.stderr.write("usage: report.py RESULT.json\n")
        return 2
    with open(argv[1]) as f:
        res = json.load(f)
    md = markdown(res)
    stem = os.path.splitext(argv[1])[0]
    with open(stem + ".md", "w") as f:     # what the json holds now, stall and zstd keys too
        f.write(md)
    sys.stdout.write(md)
    plot(res, stem + ".png")
    sys.stdout.write(f"\nplot: {stem}.png\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
