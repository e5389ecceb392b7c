"""Job statistics (virsh domjobinfo): ``op.stats()`` while a save or restore runs,
and the CLI's TTY progress showing bytes, rate and ETA rather than libxc's
fraction of the whole pfn space."""

from __future__ import annotations

import io
import re
import os
import time
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
    # finished: the final figures stay (virsh domjobinfo --completed), and the
    # clock stops at the result's duration
    done = op.stats()
    assert done.phase and done.bytes == op.result().bytes_written == os.path.getsize(target)
    assert done.elapsed == op.result().duration
    assert done.rate == done.bytes / done.elapsed and done.eta is None
    time.sleep(0.05)
    assert op.stats() == done

    seen.clear()
    rop = pyxl.restore(target, backend=SimBackend(sim_dir),
                       on_progress=lambda ev: seen.append(rop.stats()))
    pyxl.wait(rop)
    assert all(s.memory == 96 * MB for s in seen)
    assert all(s.bytes is None or s.bytes <= os.path.getsize(target) for s in seen)
    rdone = rop.stats()
    assert rdone.bytes == os.path.getsize(target)     # the whole image was read
    assert rdone.elapsed == rop.result().duration and rdone.rate
    # libxc reports no progress while it restores: no phase, no pages
    assert rdone.phase == "" and rdone.pages_done == rdone.pages_total == 0
    time.sleep(0.05)
    assert rop.stats() == rdone


def test_stats_of_a_failed_save_stop_at_its_end(sim_dir, tmp_path):
    d = sim.create(64 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, str(tmp_path / "g.save"), helper="/bin/false", sim_dir=sim_dir)
    pyxl.default_loop().run_until(op.done, 30)
    assert op.exception() is not None
    first = op.stats()
    time.sleep(0.05)
    assert op.stats() == first and first.elapsed > 0


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
    for line in shown.split("\r"):
        m = re.match(r"saving \S+ +([\d.]+) (B|KiB|MiB|GiB)", line)
        if m is None:
            continue
        moved = float(m.group(1)) * {"B": 1, "KiB": 1 << 10, "MiB": MB, "GiB": 1 << 30}[m.group(2)]
        if "/s" in line:              # a rate only once there is something to measure
            assert moved >= 4 * MB, line
        if "of ~" in line:            # a total only while the stream is below it
            assert moved < 96 * MB, line


# ---- migration (issue 17: job statistics for migrate and migrate-receive) ----------------------


def test_stats_while_a_migration_runs(tmp_path):
    """The sender's and the receiver's snapshots: bytes on the connection, growing,
    the guest's memory, a rate and a time left; at the end the sender's bytes are
    the result's bytes_sent.  With auto-converge, each round's dirty rate and
    predicted downtime too."""
    from pyxl import migrate
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(a, 0o700)
    os.mkdir(b, 0o700)
    try:
        d = sim.create(64 * MB, dirty_rate=40 * MB, sim_dir=a)
        rx = migrate.receive("127.0.0.1:0", sim_dir=b)
        sent: List[JobStats] = []
        got: List[JobStats] = []

        def sample(ev: pyxl.ProgressEvent) -> None:
            sent.append(tx.stats())
            got.append(rx.stats())

        tx = migrate.migrate(d, rx.address, live=True, sim_dir=a, downtime_ms=1,
                             max_iterations=6, on_fail="stop", auto_converge=True,
                             max_bandwidth=64 * MB, on_progress=sample)
        res, rres = pyxl.wait(tx, rx, timeout=120)
        moving = [s for s in sent if s.bytes]
        assert moving and all(s.memory == 64 * MB for s in moving), sent[:3]
        assert [s.bytes for s in moving] == sorted(s.bytes for s in moving)
        assert any(s.rate and s.eta is not None for s in moving)
        rounds = [s for s in moving if s.dirty_rate is not None]
        assert rounds and any(s.dirty_rate > 0 for s in rounds)   # 0: not measured yet
        assert any(s.predicted_downtime is not None for s in rounds)
        assert tx.stats().bytes == res.bytes_sent
        incoming = [s for s in got if s.bytes]
        assert incoming and [s.bytes for s in incoming] == sorted(s.bytes for s in incoming)
        assert rx.stats().bytes == res.bytes_sent          # all of it arrived
        # finished: the clocks stop at the results' durations
        assert tx.stats().elapsed == res.duration and rx.stats().elapsed == rres.duration
        time.sleep(0.05)
        assert tx.stats().elapsed == res.duration
    finally:
        sim.remove_dir(a)
        sim.remove_dir(b)


def test_the_tty_progress_of_a_migration(tmp_path):
    from pyxl import migrate
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    os.mkdir(a, 0o700)
    os.mkdir(b, 0o700)
    try:
        d = sim.create(64 * MB, sim_dir=a)
        out = Tty()
        bar = ProgressBar("migrating", out)
        rx = migrate.receive("127.0.0.1:0", sim_dir=b)
        tx = migrate.migrate(d, rx.address, live=True, sim_dir=a, max_bandwidth=128 * MB,
                             on_progress=bar)
        bar.op = tx
        pyxl.wait(tx, rx, timeout=120)
        bar.close()
        shown = out.getvalue()
        assert "of ~64 MiB" in shown and "/s" in shown, shown
    finally:
        sim.remove_dir(a)
        sim.remove_dir(b)
