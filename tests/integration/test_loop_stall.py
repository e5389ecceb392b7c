"""Nothing slow on the loop at the end of a save or a failed restore (issue 17).

The end of a save used to fsync the file, rename it over the target, fsync the
directory and free the domain's memory inside one loop callback (250-560 ms
for 256 MiB here).  Those steps now run in short children
(:mod:`pyxl.childproc`) and the backend's ``start_destroy``: the test records
every fsync, rename and tree removal the loop's own process makes while the
operations run -- there must be none -- and checks that the outcome is still
the same: the file in place, flushed, the domain gone, nothing left behind.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

import pyxl
from conftest import children, open_fds
from pyxl import sim
from pyxl.backends import SimBackend
from pyxl.childproc import ShortChild, finish_file
from pyxl.errors import OperationError
from pyxl.loop import SelectorLoop


@pytest.fixture
def slow_calls(monkeypatch):
    """Every blocking call of interest made in this process: (name, first argument).
    (fakexen's own bookkeeping renames small state files in its state directory.)"""
    calls = []
    for mod, name in ((os, "fsync"), (os, "fdatasync"), (os, "rename"), (os, "replace"),
                      (shutil, "rmtree")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, str(a[0]) if a else ""))
            return _real(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    return calls


def _saves(sim_dir, tmp_path, n, mib, **kw):
    backend = SimBackend(sim_dir)
    doms = [sim.create(mib << 20, name=f"g{i}", sim_dir=sim_dir) for i in range(n)]
    loop = SelectorLoop()
    paths = [str(tmp_path / f"g{i}.save") for i in range(n)]
    ops = [pyxl.save(d, p, backend=backend, loop=loop, **kw) for d, p in zip(doms, paths)]
    assert loop.run_until(lambda: all(o.done() for o in ops), 120)
    loop.close()
    return doms, paths, ops


def test_save_finishes_off_the_loop(sim_dir, tmp_path, slow_calls):
    before_fds = open_fds()
    doms, paths, ops = _saves(sim_dir, tmp_path, 3, 32)
    results = [o.result() for o in ops]
    # no fsync, no rename of the image, no tree removal, here
    assert [c for c in slow_calls if c[0] != "rename" and c[0] != "replace"
            or str(tmp_path) in c[1]] == []
    for r, p in zip(results, paths):
        assert r.path == p and os.path.getsize(p) == r.bytes_written > 32 << 20
    # the targets are complete streams, the temporaries gone, the domains destroyed
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)
    assert not [d for d in sim.list_domains(sim_dir=sim_dir) if d.domid in doms]
    assert not [n for n in os.listdir(sim_dir) if n.startswith(".dead-")]
    assert open_fds() == before_fds
    assert children() == []
    # and they restore to the memory they were saved with
    restored = pyxl.wait(pyxl.restore(paths[0], backend=SimBackend(sim_dir), paused=True))[0]
    assert sim.info(restored.domid, sim_dir=sim_dir).name == "g0"


def test_failed_placement_keeps_the_guest(sim_dir, tmp_path, monkeypatch):
    """The finisher fails (its file vanished under it): the save fails with the
    finisher's reason, the guest runs again, nothing is left.  (``fsync=False``:
    finish_file's path; the flushing finisher's failures are in test_save_file.py.)"""
    backend = SimBackend(sim_dir)
    dom = sim.create(8 << 20, name="g", sim_dir=sim_dir)
    target = tmp_path / "sub"
    target.mkdir()
    loop = SelectorLoop()
    save_mod = sys.modules["pyxl.ops.save"]   # (pyxl.ops.save the attribute is the function)
    real = save_mod.finish_file

    def sabotage(loop_, tmp, dest, fsync, done):
        os.unlink(tmp)                 # the finisher then cannot rename it
        return real(loop_, tmp, dest, fsync, done)
    monkeypatch.setattr(save_mod, "finish_file", sabotage)
    op = pyxl.save(dom, str(target / "g.save"), backend=backend, loop=loop, fsync=False)
    assert loop.run_until(op.done, 60)
    with pytest.raises(OperationError, match=r"putting the save file in place failed: rename "):
        op.result()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert os.listdir(target) == []


def test_finisher_reports_without_an_exit_status(tmp_path):
    """An application that set SIGCHLD to SIG_IGN: the kernel reaps the child,
    waitpid fails with ECHILD, and the outcome still comes through."""
    src = tmp_path / "a"
    src.write_bytes(b"x" * 4096)
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        loop = SelectorLoop()
        out = []
        finish_file(loop, str(src), str(tmp_path / "b"), True, out.append)
        assert loop.run_until(lambda: bool(out), 30)
        assert out == [None] and (tmp_path / "b").read_bytes() == b"x" * 4096
        out.clear()
        finish_file(loop, str(src), str(tmp_path / "c"), True, out.append)   # src is gone
        assert loop.run_until(lambda: bool(out), 30)
        assert out[0] is not None and out[0].startswith("fsync ")
        loop.close()
    finally:
        signal.signal(signal.SIGCHLD, old)


def test_short_child_cancel_still_reaps(tmp_path):
    loop = SelectorLoop()
    seen = []
    child = ShortChild(loop, [sys.executable, "-c", "import time; time.sleep(0.2)"],
                       lambda st, err: seen.append(st))
    child.cancel()
    deadline = time.monotonic() + 10
    while not child.finished and time.monotonic() < deadline:
        loop.run_once(0.1)
    assert child.finished and seen == []
    assert subprocess.run(["ps", "-o", "stat=", "-p", str(child.pid)],
                          capture_output=True, text=True).stdout.strip() == ""
    loop.close()


def test_failed_restore_destroys_before_it_reports(sim_dir, tmp_path, slow_calls):
    """A stream cut short: the half-restored domain is destroyed through the
    backend's start_destroy (its memory freed by a child), and only then does
    the operation report the failure."""
    doms, paths, ops = _saves(sim_dir, tmp_path, 1, 16)
    data = open(paths[0], "rb").read()
    cut = tmp_path / "cut.save"
    cut.write_bytes(data[:len(data) // 2])
    slow_calls.clear()
    loop = SelectorLoop()
    op = pyxl.restore(str(cut), backend=SimBackend(sim_dir), loop=loop)
    assert loop.run_until(op.done, 60)
    with pytest.raises(OperationError):
        op.result()
    assert "rmtree" not in [c[0] for c in slow_calls]
    assert sim.list_domains(sim_dir=sim_dir) == []
    assert not [n for n in os.listdir(sim_dir) if n.startswith(".dead-")]
    loop.close()


def test_starting_saves_forks_nothing_on_the_caller(sim_dir, tmp_path):
    """pyxl.save() returns before its helper runs: the call forks no process (a
    fork+exec waits for the child's exec, 2-4 ms each), the loop starts each
    helper and its file's flushing child in a callback of its own; a cancel
    before that start leaves nothing (no temporary file, the guest untouched)."""
    doms = [sim.create(16 << 20, name=f"g{i}", sim_dir=sim_dir) for i in range(4)]
    kids = children()
    loop = SelectorLoop()
    backend = SimBackend(sim_dir)
    ops = [pyxl.save(d, str(tmp_path / f"g{i}.save"), backend=backend, loop=loop)
           for i, d in enumerate(doms)]
    assert children() == kids and all(op.helper is None for op in ops)
    assert ops[3].cancel()
    assert isinstance(ops[3].exception(), pyxl.Cancelled)
    assert loop.run_until(lambda: all(op.done() for op in ops), 120)
    for op in ops[:3]:
        op.result()
    assert sorted(os.listdir(tmp_path)) == ["g0.save", "g1.save", "g2.save"]
    assert sim.info(doms[3], sim_dir=sim_dir).state == "running"
    loop.close()
    assert children() == kids


def test_restores_start_from_the_loop_and_nothing_forks_here(sim_dir, tmp_path, monkeypatch):
    """pyxl.restore(file) reads and checks the head in the call, and nothing
    else: the domain is built from the loop, and no process of the whole run
    -- helpers, finishers, fakexen's vCPUs and clean-up -- is forked by this
    process (pyxl-spawner starts them: the loop never waits for an exec).  A
    cancel before the build leaves nothing."""
    from pyxl.spawn import start_spawner
    doms, paths, ops = _saves(sim_dir, tmp_path, 4, 16, leave="paused")
    for op in ops:
        op.result()
    for d in doms:
        sim.destroy(d, sim_dir=sim_dir)
    start_spawner()
    forks = []
    real_init = subprocess.Popen.__init__

    def spy(self, *a, **k):
        forks.append(a[0] if a else k.get("args"))
        real_init(self, *a, **k)
    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    monkeypatch.setattr(os, "fork", lambda: forks.append("fork") or -1)
    before, kids = sorted(d.domid for d in sim.list_domains(sim_dir=sim_dir)), children()
    loop = SelectorLoop()
    backend = SimBackend(sim_dir)
    rops = [pyxl.restore(p, backend=backend, loop=loop) for p in paths]
    assert all(op.domid == -1 and op.helper is None for op in rops)
    assert sorted(d.domid for d in sim.list_domains(sim_dir=sim_dir)) == before
    assert children() == kids
    assert rops[3].cancel()
    assert isinstance(rops[3].exception(), pyxl.Cancelled)
    assert loop.run_until(lambda: all(op.done() for op in rops), 120)
    results = [op.result() for op in rops[:3]]
    assert forks == []
    for res in results:
        info = sim.info(res.domid, sim_dir=sim_dir)
        assert info.state == "running" and info.vcpu_pid is not None
    assert len(sim.list_domains(sim_dir=sim_dir)) == len(before) + 3
    loop.close()


def test_finished_operations_are_freed_without_the_cyclic_collector(sim_dir, tmp_path):
    """Once an operation has reported, nothing it owned (helper, child, timers,
    finisher) still points back at it: refcounting frees it when the application
    lets go.  A cycle would be left for the cyclic collector, whose pass then
    runs inside some later loop callback (1-2 ms each here, once a round)."""
    import gc
    backend = SimBackend(sim_dir)
    loop = SelectorLoop()

    def results(ops):
        assert loop.run_until(lambda: all(o.done() for o in ops), 120)
        return [o.result() for o in ops]

    def round_trip(n: int) -> None:
        doms = [sim.create(8 << 20, name=f"c{i}", sim_dir=sim_dir) for i in range(n)]
        paths = [str(tmp_path / f"c{i}.save") for i in range(n)]
        results([pyxl.save(d, p, backend=backend, loop=loop, compress=(d % 2 == 0))
                 for d, p in zip(doms, paths)])
        for r in results([pyxl.restore(p, backend=backend, loop=loop) for p in paths]):
            backend.destroy(r.domid)

    round_trip(1)           # imports and first-use caches
    gc.collect()
    was_enabled, flags = gc.isenabled(), gc.get_debug()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        round_trip(4)
        gc.collect()
        left = sorted({type(o).__qualname__ for o in gc.garbage
                       if type(o).__module__.startswith("pyxl")})
    finally:
        gc.set_debug(flags)
        gc.garbage.clear()
        if was_enabled:
            gc.enable()
        loop.close()
    assert left == [], left
