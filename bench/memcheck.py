#!/usr/bin/env python3
"""pyxl-save-helper under valgrind memcheck, driven by pyxl on fakexen (``make memcheck``).

Three runs on 64 MiB simulated guests, each a real conversation with Debian's
libxc underneath:

1. a non-live save of an idle guest;
2. a live save of a guest writing 20 MB/s to its memory;
3. a restore of the stream from run 2 (checked byte for byte against the source).

Each run must report "ERROR SUMMARY: 0 errors" and "definitely lost: 0 bytes"
(or "All heap blocks were freed").  Memcheck options: ``--leak-check=full
--show-leak-kinds=definite --errors-for-leak-kinds=definite``: "possibly lost"
blocks are CPython's static objects still alive after Py_FinalizeEx (see
tests/integration/test_helper_memcheck.py) and are not counted as errors.  The helper runs
with PYXL_HELPER_PYTHONMALLOC=malloc0 so that memcheck sees every Python
allocation.  Exit status 0 only if all three runs are clean.

tests/integration/test_helper_memcheck.py covers the helper's other paths (start-up
failure, bad argv, lost reply) against a libxc stand-in; this script covers
the real data paths.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import stat
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyxl  # noqa: E402
from pyxl import sim  # noqa: E402

GUEST = 64 << 20
DIRTY_RATE = 20_000_000
MEMCHECK_OPTS = ["--tool=memcheck", "--leak-check=full", "--show-leak-kinds=definite",
                 "--errors-for-leak-kinds=definite", "--error-exitcode=99", "--num-callers=30"]
if sys.version_info >= (3, 12):
    # CPython 3.12+ leaves its immortal interned strings allocated (see the file)
    MEMCHECK_OPTS.append("--suppressions=" + os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "libxl_helper",
        "cpython-immortal.supp"))

_ERRORS = re.compile(r"ERROR SUMMARY: ([\d,]+) errors")
_DEFINITE = re.compile(r"definitely lost: ([\d,]+) bytes in ([\d,]+) blocks")


def parse_log(text: str) -> Dict[str, Any]:
    """Error count and definitely-lost bytes from a memcheck log (None: not reported)."""
    errors = _ERRORS.findall(text)
    definite = _DEFINITE.findall(text)
    lost: Optional[int]
    if definite:
        lost = int(definite[-1][0].replace(",", ""))
    elif "All heap blocks were freed" in text or "no leaks are possible" in text:
        lost = 0
    else:
        lost = None
    return {"errors": int(errors[-1].replace(",", "")) if errors else None, "definitely_lost": lost}


def make_wrapper(workdir: str, helper: str, valgrind: str) -> str:
    """An executable that pyxl runs as its helper: valgrind exec'ing the real one.

    ``exec`` keeps the pid, so the log named after %p is the helper's.
    """
    path = os.path.join(workdir, "memcheck-helper")
    opts = " ".join(MEMCHECK_OPTS)
    with open(path, "w") as f:
        f.write("#!/bin/sh\n"
                f"exec {valgrind} {opts} --log-file={workdir}/vg.%p.log {helper} \"$@\"\n")
    os.chmod(path, stat.S_IRWXU)
    return path


def run(helper: Optional[str] = None, keep: Optional[str] = None) -> Dict[str, Any]:
    valgrind = shutil.which("valgrind")
    if not valgrind:
        raise SystemExit("memcheck: valgrind is not installed (apt-get install valgrind)")
    helper = helper or pyxl.helper_path()
    workdir = tempfile.mkdtemp(prefix="pyxl-memcheck-")
    sim_dir = tempfile.mkdtemp(prefix="pyxl-memcheck-", dir="/dev/shm")
    os.environ["PYXL_HELPER_PYTHONMALLOC"] = "malloc0"  # copied into the helper's environment
    wrapper = make_wrapper(workdir, helper, valgrind)
    runs: List[Dict[str, Any]] = []

    def record(name: str, op: Any, t0: float, extra: Dict[str, Any]) -> None:
        pid = op.helper.pid
        log = os.path.join(workdir, f"vg.{pid}.log")
        text = open(log).read() if os.path.exists(log) else ""
        res = parse_log(text)
        res.update(run=name, seconds=round(time.monotonic() - t0, 1), log=log, **extra)
        res["ok"] = res["errors"] == 0 and res["definitely_lost"] == 0
        runs.append(res)
        sys.stderr.write(f"memcheck {name}: {res['errors']} errors, {res['definitely_lost']} bytes "
                         f"definitely lost ({res['seconds']}s)\n")
        if keep:
            shutil.copy(log, os.path.join(keep, f"memcheck-{name}.log"))

    try:
        # 1. non-live save of an idle guest
        idle = sim.create(GUEST, sim_dir=sim_dir, paused=True)
        t0 = time.monotonic()
        op: pyxl.Operation[Any]   # a save, then a restore
        op = pyxl.save(idle, os.path.join(workdir, "idle.save"), leave="paused", helper=wrapper,
                       sim_dir=sim_dir, timeout=600)
        res = pyxl.wait(op)[0]
        record("save", op, t0, {"bytes": res.bytes_written})

        # 2. live save of a guest dirtying its memory
        busy = sim.create(GUEST, dirty_rate=DIRTY_RATE, sim_dir=sim_dir)
        time.sleep(0.3)
        t0 = time.monotonic()
        image = os.path.join(workdir, "live.save")
        op = pyxl.save(busy, image, live=True, leave="paused", helper=wrapper, sim_dir=sim_dir,
                       timeout=600)
        res = pyxl.wait(op)[0]
        record("live-save", op, t0, {"bytes": res.bytes_written, "iterations": res.iterations,
                                     "dirty_rate": DIRTY_RATE})
        want = sim.digest(busy, sim_dir=sim_dir)

        # 3. restore of the live stream
        t0 = time.monotonic()
        op = pyxl.restore(image, paused=True, helper=wrapper, sim_dir=sim_dir, timeout=600,
                          name="restored")
        back = pyxl.wait(op)[0]
        same = sim.digest(back.domid, sim_dir=sim_dir) == want
        record("restore", op, t0, {"identical": same})
        if not same:
            runs[-1]["ok"] = False
    finally:
        sim.remove_dir(sim_dir)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"helper": helper, "valgrind_options": MEMCHECK_OPTS, "guest_bytes": GUEST,
            "runs": runs, "ok": len(runs) == 3 and all(r["ok"] for r in runs)}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--helper", help="helper to check (default: pyxl's own)")
    p.add_argument("--json", metavar="FILE", help="also write the result as JSON")
    p.add_argument("--keep-logs", metavar="DIR", help="copy the valgrind logs into DIR")
    args = p.parse_args(argv)
    if args.keep_logs:
        os.makedirs(args.keep_logs, exist_ok=True)
    result = run(args.helper, args.keep_logs)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
            f.write("\n")
    sys.stderr.flush()
    print(f"valgrind {' '.join(MEMCHECK_OPTS)} {result['helper']} (64 MiB fakexen guests)")
    print("| run | errors | definitely lost (bytes) | seconds | notes | ok |")
    print("|---|---|---|---|---|---|")
    for r in result["runs"]:
        notes = {"save": "non-live, idle guest",
                 "live-save": f"{r.get('iterations')} rounds, guest writing {DIRTY_RATE // 10**6} MB/s",
                 "restore": "of the live stream, " + ("identical" if r.get("identical") else "DIFFERENT")}
        print(f"| {r['run']} | {r['errors']} | {r['definitely_lost']} | {r['seconds']} | "
              f"{notes[r['run']]} | {'yes' if r['ok'] else 'NO'} |")
    print("memcheck: " + ("OK, every run clean" if result["ok"] else "FAILED"))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
