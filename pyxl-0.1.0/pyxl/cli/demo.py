"""``pyxl demo`` (``make demo``): live-migrate a busy simulated guest through a file.

Creates a guest that keeps writing to its memory, live-saves it with a
progress bar, restores it into a new domain, checks that the restored memory
is byte-identical to the source's at suspend time, shows that the restored
guest carries on counting, prints the throughput, and cleans up.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from pyxl.cli.args import dir_arg, size_arg
from pyxl.cli.runner import ProgressBar, run as run_op

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, List, Optional, Sequence


def add_parser(sub: Any, argv: "Optional[Sequence[str]]" = None) -> None:
    p = sub.add_parser("demo", help="live-save and restore a busy simulated guest, end to end")
    p.add_argument("--memory", type=size_arg(8 << 10, 16 << 40), default=512 << 20, help="guest size (default 512M)")
    p.add_argument("--dirty-rate", type=size_arg(0, 1 << 40), default=20 << 20,
                   help="bytes/s the guest writes (default 20M)")
    p.add_argument("--helper", metavar="PATH", help="helper to use (default: pyxl's own)")
    p.add_argument("--sim-dir", metavar="DIR", type=dir_arg, help="fakexen state directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import tempfile
    from pyxl import sim
    from pyxl._paths import helper_path
    from pyxl.ops.api import restore, save
    out = sys.stdout
    created: List[int] = []
    sim_dir = args.sim_dir
    workdir = tempfile.mkdtemp(prefix="pyxl-demo-")
    image = os.path.join(workdir, "guest.save")
    try:
        mib = args.memory >> 20
        domid = sim.create(args.memory, dirty_rate=args.dirty_rate, name="demo",
                           sim_dir=sim_dir)
        created.append(domid)
        out.write(f"created simulated guest {domid}: {mib} MiB, writing "
                  f"{args.dirty_rate / 1e6:.0f} MB/s to its memory\n")
        time.sleep(0.5)  # let the workload run a little before migrating
        bar = ProgressBar(f"live save of {domid}", out)
        op = save(domid, image, live=True, leave="paused", helper=args.helper,
                  on_progress=bar, sim_dir=sim_dir)
        bar.op = op
        try:
            sres = run_op(op)
        finally:
            bar.close()
        src_digest = sim.digest(domid, sim_dir=sim_dir)
        size = sres.bytes_written or 0
        out.write(f"saved {size / 2**20:.0f} MiB in {sres.duration:.2f}s "
                  f"({size / 2**20 / sres.duration:.0f} MiB/s), {sres.iterations} "
                  f"pre-copy iterations, downtime {sres.downtime * 1000 if sres.downtime else 0:.0f} ms\n")
        bar = ProgressBar("restore", out)
        # The source stays (paused, for the digest): the copy needs a name of its own.
        rop = restore(image, paused=True, helper=args.helper, on_progress=bar, sim_dir=sim_dir,
                      name="demo-restored")
        bar.op = rop
        try:
            rres = run_op(rop)
        finally:
            bar.close()
        created.append(rres.domid)
        out.write(f"restored into domain {rres.domid} in {rres.duration:.2f}s "
                  f"({size / 2**20 / rres.duration:.0f} MiB/s)\n")
        dst_digest = sim.digest(rres.domid, sim_dir=sim_dir)
        same = src_digest == dst_digest
        out.write(f"memory digest  source {src_digest[:16]}…  restored {dst_digest[:16]}…  "
                  f"{'IDENTICAL' if same else 'DIFFERENT'}\n")
        if not same:
            return 1
        before = sim.counter(rres.domid, sim_dir=sim_dir)
        sim.set_dirty_rate(rres.domid, args.dirty_rate, sim_dir=sim_dir)
        sim.unpause(rres.domid, sim_dir=sim_dir)
        time.sleep(0.5)
        after = sim.counter(rres.domid, sim_dir=sim_dir)
        out.write(f"restored guest is running: its write counter went {before} -> {after}\n")
        if after <= before and args.dirty_rate:
            return 1
        out.write(f"helper: {args.helper or helper_path()}\nOK\n")
        return 0
    finally:
        for d in created:
            try:
                sim.destroy(d, sim_dir=sim_dir)
            except sim.SimError:
                pass
        for name in os.listdir(workdir):
            os.unlink(os.path.join(workdir, name))
        os.rmdir(workdir)
