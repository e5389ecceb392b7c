"""A/B of pyxl's file save with and without the flushing finisher (issue 19).

    python bench/filesave_ab.py [MIB] [REPS]      (default 1024 MiB, 5 reps)

One idle fakexen guest; per rep, on tmpfs (/dev/shm) and on ext4 (/var/tmp),
alternating: ``raw`` (`cat` of the guest's pages into a new file, `sync FILE`,
`mv`, `sync DIR`), ``old`` (pyxl.save(fsync=True) with the fsync, rename and
directory fsync all after the helper: the FileFinisher replaced by None) and
``new`` (the FileFinisher following the file).  Prints medians and the paired
median of raw time ÷ pyxl time (pyxl's throughput ÷ raw's).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Tuple

import benchlib as B

import pyxl
from pyxl import sim

RAW = 'cat "$1" > "$2" && sync "$2" && mv "$2" "$3" && sync "$4"'


def main() -> int:
    size = int(sys.argv[1] if len(sys.argv) > 1 else 1024) << 20
    reps = int(sys.argv[2] if len(sys.argv) > 2 else 5)
    save_mod = sys.modules["pyxl.ops.save"]
    real = save_mod.FileFinisher
    simd = tempfile.mkdtemp(prefix="pyxl-ab-", dir="/dev/shm")
    ext = tempfile.mkdtemp(prefix="pyxl-ab-", dir="/var/tmp")
    dom = sim.create(size, sim_dir=simd, device_model=False)
    raw = os.path.join(simd, "raw.bin")
    B.write_raw_copy(os.path.join(simd, f"d{dom}", "mem"), sim.populated_runs(dom, sim_dir=simd),
                     raw)
    res: Dict[Tuple[str, str], List[float]] = {}
    print("load", B.loadavg())
    try:
        for _ in range(reps):
            for d, dn in ((simd, "tmpfs"), (ext, "ext4")):
                for who in ("raw", "old", "new"):
                    path = os.path.join(d, "sink.bin")
                    os.sync()
                    t0 = time.perf_counter()
                    if who == "raw":
                        subprocess.run(["sh", "-c", RAW, "sh", raw, path + ".tmp", path, d],
                                       check=True)
                    else:
                        save_mod.FileFinisher = real if who == "new" else (lambda *a: None)  # type: ignore[attr-defined]
                        pyxl.wait(pyxl.save(dom, path, leave="paused", sim_dir=simd, fsync=True))
                    res.setdefault((dn, who), []).append(time.perf_counter() - t0)
                    os.unlink(path)
    finally:
        save_mod.FileFinisher = real  # type: ignore[attr-defined]
        sim.destroy(dom, sim_dir=simd)
        os.unlink(raw)
        os.rmdir(ext)
    for (dn, who), v in sorted(res.items()):
        med = statistics.median(v)
        print(f"{dn:5} {who:3} median {med:.3f} s = {size / 2**30 / med:.2f} GiB/s",
              [round(x, 3) for x in v])
    for dn in ("tmpfs", "ext4"):
        for who in ("old", "new"):
            r = [a / b for a, b in zip(res[(dn, "raw")], res[(dn, who)])]
            print(f"{dn:5} {who:3} paired ratio vs raw {statistics.median(r):.3f}",
                  [round(x, 2) for x in r])
    print("load", B.loadavg())
    return 0


if __name__ == "__main__":
    sys.exit(main())
