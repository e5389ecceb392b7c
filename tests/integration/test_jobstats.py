"""Job statistics (virsh domjobinfo): ``op.stats()`` while a save or restore runs,
and the CLI's TTY progress showing bytes, rate and ETA rather than libxc's
fraction of the whole pfn space."""

from __future__ import annotations

import io
import os
from typing import List

import pyxl
from pyxl import sim
from pyxl.backends import SimBackend
from pyxl.cli.runner import ProgressBar
from pyxl.ops.jobstats import JobStats, memory_of, snapshot, stream_offset

MB = 1 << 20


def test_snapshot_arithmetic():
    st = snapshot("Frames", 0, 10, 100, 2.0, 64 * MB, 256 * MB)
    assert st.rate == 32 * MB and st.eta == 6.0 and st.bytes == 64 * MB
    assert snapshot("Frames", 0, 10, 100, 2.0, None, 256 * MB).rate is None
    assert snapshot("x", None, 0, 0, 1.0, 300 * MB, 256 * MB).eta is None   # past one pass
    assert memory_of({"b_info": {"max_memkb": 1024}}) == MB
    assert memory_of({}) is None
    r, w = os.pipe()
    try:
        assert stream_offset(r) is None and stream_offset(-1) is None
    finally:
        os.close(r)
        os.close(w)


def test_stats_while_a_save_and_a_restore_run(sim_dir, tmp_path):
    d = sim.create(96 * MB, sim_dir=sim_dir)
    seen: List[JobStats] = []
    target = str(tmp_path / "g.save")
    op = pyxl.save(d, target, backend=SimBackend(sim_dir),
                   on_progress=lambda ev: seen.append(op.stats()))
    pyxl.wait(op)
    moving = [s for s in seen if s.bytes]
    assert moving, seen
    assert all(s.memory == 96 * MB for s in moving)
    assert [s.bytes for s in moving] == sorted(s.bytes for s in moving)
    assert all(s.rate and s.rate > 0 and s.elapsed > 0 for s in moving)
    assert any(s.eta is not None for s in moving)
    assert moving[-1].bytes <= os.path.getsize(target)
    done = op.stats()
    assert done.bytes is None and done.phase          # finished: the stream is closed

    seen.clear()
    rop = pyxl.restore(target, backend=SimBackend(sim_dir),
                       on_progress=lambda ev: seen.append(rop.stats()))
    pyxl.wait(rop)
    assert all(s.memory == 96 * MB for s in seen)
    assert all(s.bytes is None or s.bytes <= os.path.getsize(target) for s in seen)


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_tty_progress_shows_bytes_rate_and_eta(sim_dir, tmp_path):
    d = sim.create(96 * MB, sim_dir=sim_dir)
    out = Tty()
    bar = ProgressBar("saving", out)
    op = pyxl.save(d, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), on_progress=bar)
    bar.op = op
    pyxl.wait(op)
    bar.close()
    shown = out.getvalue()
    assert "of ~96 MiB" in shown and "/s" in shown, shown
    assert "%" not in shown
