"""Saving to a file with ``fsync`` (issue 19): the flushing finisher.

A :class:`pyxl.childproc.FileFinisher` starts with the save, follows the
growing temporary file and starts its writeback every 8 MiB, and at the end
fsyncs it, renames it into place and fsyncs the directory.  These tests check
that the image is whole (it restores to byte-identical memory), that the
loop's own process never fsyncs or renames, and the failure paths: the
finisher killed while the helper writes, and a rename that fails at the end.
Either way the save fails with the reason, the guest runs again, and neither
a temporary file nor a child is left behind.
"""

from __future__ import annotations

import os

import pytest

import pyxl
from conftest import children, open_fds
from pyxl import sim
from pyxl.backends import SimBackend
from pyxl.errors import OperationError
from pyxl.loop import SelectorLoop


@pytest.fixture
def slow_calls(monkeypatch):
    calls = []
    for name in ("fsync", "fdatasync", "rename", "replace"):
        real = getattr(os, name)

        def spy(*a, _real=real, _name=name, **k):
            calls.append((_name, str(a[0]) if a else ""))
            return _real(*a, **k)
        monkeypatch.setattr(os, name, spy)
    return calls


@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_flushed_save_restores_byte_identical(sim_dir, tmp_path, slow_calls, where):
    """64 MiB (8 finisher chunks) to ext4 and to tmpfs: in place, flushed, whole."""
    base = tmp_path if where == "disk" else None
    with _dir(base) as d:
        before_fds = open_fds()
        dom = sim.create(64 << 20, name="g", sim_dir=sim_dir)
        want = sim.digest(dom, sim_dir=sim_dir)
        loop = SelectorLoop()
        target = os.path.join(d, "g.save")
        op = pyxl.save(dom, target, backend=SimBackend(sim_dir), loop=loop, leave="destroy")
        assert loop.run_until(op.done, 120)
        res = op.result()
        loop.close()
        assert [c for c in slow_calls if d in c[1]] == []        # none on the loop's process
        assert os.listdir(d) == ["g.save"] and os.path.getsize(target) == res.bytes_written
        assert res.bytes_written > 64 << 20
        assert children() == [] and open_fds() == before_fds
        back = pyxl.wait(pyxl.restore(target, backend=SimBackend(sim_dir), paused=True))[0]
        assert sim.digest(back.domid, sim_dir=sim_dir) == want


def test_finisher_killed_mid_save_fails_the_save(sim_dir, tmp_path):
    """The flushing child dies while the helper writes: the save stops with
    that reason, the guest runs again, the temporary file is gone."""
    before_fds = open_fds()
    dom = sim.create(256 << 20, name="g", sim_dir=sim_dir, dirty_rate=20_000_000)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), loop=loop,
                   live=True)
    loop.run_until(lambda: op._finisher is not None or op.done(), 30)   # started from the loop
    finisher = op._finisher
    assert finisher is not None
    loop.call_later(0.05, lambda: finisher.child.kill())
    assert loop.run_until(op.done, 120)
    with pytest.raises(OperationError, match=r"flushing the save file failed: .*status -9"):
        op.result()
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert os.listdir(tmp_path) == []
    assert children() == [] and open_fds() == before_fds


def test_failed_rename_keeps_the_guest_and_the_old_path(sim_dir, tmp_path):
    """The target became a non-empty directory while the save ran: the
    finisher's rename fails, and the save says so; nothing is left."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    target = tmp_path / "g.save"
    loop = SelectorLoop()
    op = pyxl.save(dom, str(target), backend=SimBackend(sim_dir), loop=loop)
    target.mkdir()
    (target / "keep").write_bytes(b"k")
    assert loop.run_until(op.done, 60)
    with pytest.raises(OperationError,
                       match=r"putting the save file in place failed: rename to .*g\.save: "):
        op.result()
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert sorted(os.listdir(tmp_path)) == ["g.save"] and (target / "keep").read_bytes() == b"k"
    assert children() == []


@pytest.mark.parametrize("fsync", [True, False])   # the flushing finisher; finish_file
def test_a_missing_finisher_fails_the_save_in_one_line(sim_dir, tmp_path, monkeypatch, fsync):
    """pyxl-finisher absent (a broken install): the save fails from the loop,
    naming the program; the old image stays, the guest runs again, nothing
    is left behind."""
    import pyxl.childproc
    missing = str(tmp_path / "no" / "pyxl-finisher")
    monkeypatch.setattr(pyxl.childproc, "package_file", lambda name: missing)
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    target = tmp_path / "g.save"
    target.write_bytes(b"the old image")
    loop = SelectorLoop()
    op = pyxl.save(dom, str(target), backend=SimBackend(sim_dir), loop=loop, fsync=fsync)
    assert loop.run_until(op.done, 60)
    with pytest.raises(OperationError) as info:
        op.result()
    msg = str(info.value)
    assert f"cannot run {missing}: No such file or directory" in msg and "\n" not in msg, msg
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert sorted(os.listdir(tmp_path)) == ["g.save"] and target.read_bytes() == b"the old image"
    assert children() == []


class _dir:
    """``base`` itself, or a fresh directory on tmpfs (/dev/shm), removed after."""

    def __init__(self, base):
        self.base, self.made = base, None

    def __enter__(self):
        if self.base is not None:
            return str(self.base)
        import tempfile
        self.made = tempfile.mkdtemp(prefix="pyxl-test-", dir="/dev/shm")
        return self.made

    def __exit__(self, *exc):
        if self.made:
            import shutil
            shutil.rmtree(self.made)


def test_a_backend_without_a_helper_environment_fails_the_save_cleanly(sim_dir, tmp_path):
    """The helper's environment is built from the loop, where the helper
    starts: a backend that raises there fails the save with a StartupError
    that says so; the guest was never touched and no file is left."""

    class Broken(SimBackend):
        def helper_env(self):
            raise RuntimeError("no LD_PRELOAD today")

    before_fds = open_fds()
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=Broken(sim_dir), loop=loop)
    assert loop.run_until(op.done, 30)
    with pytest.raises(pyxl.StartupError,
                       match="the backend gave no helper environment: no LD_PRELOAD today"):
        op.result()
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert os.listdir(tmp_path) == []
    assert children() == [] and open_fds() == before_fds


def test_the_config_is_read_from_the_loop_and_its_failure_fails_the_save_cleanly(
        sim_dir, tmp_path):
    """pyxl.save() holds its caller only for the domain check and the file's
    creation; the config is read (a file and XenStore on a real host) and the
    stream's head written from the loop.  A backend whose config read fails
    there fails the save with the reason; no helper ran, no file is left."""
    reads = []

    class NoConfig(SimBackend):
        def domain_config(self, domid):
            reads.append(domid)
            raise KeyError("c_info")

    before_fds = open_fds()
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=NoConfig(sim_dir), loop=loop)
    assert reads == []                  # not on the caller
    assert loop.run_until(op.done, 30)
    assert reads == [dom]
    with pytest.raises(pyxl.StartupError, match=f"cannot read domain {dom}'s config: 'c_info'"):
        op.result()
    assert op.helper is None
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert os.listdir(tmp_path) == []
    assert children() == [] and open_fds() == before_fds


def test_a_save_cancelled_before_its_start_writes_nothing(sim_dir, tmp_path):
    """Cancelled before the loop ran: the caller's fd gets no header."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    with open(tmp_path / "g.save", "wb") as f:
        op = pyxl.save(dom, f.fileno(), backend=SimBackend(sim_dir), loop=loop)
        assert op.cancel()
        assert loop.run_until(op.done, 30)
        with pytest.raises(pyxl.Cancelled):
            op.result()
    loop.close()
    assert os.path.getsize(tmp_path / "g.save") == 0
    assert sim.info(dom, sim_dir=sim_dir).state == "running"


def test_a_config_too_large_to_compress_fails_the_save_cleanly(sim_dir, tmp_path):
    """A compressed save's head goes into a pipe of 1 MiB before the
    compressor runs: a larger config is refused with its size."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    config = {"c_info": {"name": "g", "type": "hvm"}, "junk": "x" * (2 << 20)}
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), loop=loop,
                   compress=True, config=config)
    assert loop.run_until(op.done, 30)
    with pytest.raises(pyxl.StartupError, match=r"config is too large to compress a save of "
                                                r"it \(\d+ bytes\)"):
        op.result()
    loop.close()
    assert os.listdir(tmp_path) == []
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert children() == []


def test_a_save_cancelled_while_its_config_is_read_calls_the_read_off(sim_dir, tmp_path):
    """A backend whose config comes later (XenBackend: a XenStore round): a
    cancel meanwhile calls the read off, removes the file, starts nothing."""
    called_off = []

    class Slow(SimBackend):
        def start_domain_config(self, loop, domid, done):
            class Read:
                def cancel(self):
                    called_off.append(domid)
            return Read()

    before_fds = open_fds()
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=Slow(sim_dir), loop=loop)
    loop.run_until(lambda: False, 0.2)          # the launch ran: the read is pending
    assert not op.done() and op.helper is None
    assert op.cancel()
    assert called_off == [dom] and op.done()
    with pytest.raises(pyxl.Cancelled):
        op.result()
    loop.close()
    assert os.listdir(tmp_path) == [] and children() == [] and open_fds() == before_fds
    assert sim.info(dom, sim_dir=sim_dir).state == "running"


def test_the_flushing_child_starts_in_a_callback_of_its_own_and_a_cancel_calls_it_off(
        sim_dir, tmp_path):
    """The helper's start and the flushing child's are two requests to the
    spawner, made in two loop callbacks (the loop's longest stretch is one of
    them).  A save cancelled between the two starts no flushing child."""
    before_fds = open_fds()
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), loop=loop)
    assert loop.run_until(lambda: op.helper is not None, 10)
    assert op._finisher is None and op._finisher_due is not None
    assert op.cancel()
    assert loop.run_until(op.done, 30)
    with pytest.raises(pyxl.Cancelled):
        op.result()
    loop.run_until(lambda: False, 0.3)     # a due start would have run by now
    assert op._finisher is None
    loop.close()
    assert os.listdir(tmp_path) == [] and children() == [] and open_fds() == before_fds
    assert sim.info(dom, sim_dir=sim_dir).state == "running"


def test_a_stream_that_ends_before_the_flushing_child_starts_is_still_made_durable(
        sim_dir, tmp_path, slow_calls):
    """Had the helper finished before the flushing child's start came due,
    the file is flushed and put in place by a short child all the same."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    want = sim.digest(dom, sim_dir=sim_dir)
    loop = SelectorLoop()
    path = str(tmp_path / "g.save")
    op = pyxl.save(dom, path, backend=SimBackend(sim_dir), loop=loop, leave="destroy")
    assert loop.run_until(lambda: op.helper is not None, 10)
    op._no_finisher_due()                  # as if the stream's end came first
    assert loop.run_until(op.done, 60)
    res = op.result()
    loop.close()
    assert op._finisher is None
    assert [c for c in slow_calls if str(tmp_path) in c[1]] == []    # none on the loop's process
    assert os.listdir(tmp_path) == ["g.save"] and os.path.getsize(path) == res.bytes_written
    assert children() == []
    back = pyxl.wait(pyxl.restore(path, backend=SimBackend(sim_dir), paused=True))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want


@pytest.mark.parametrize("compress", [False, True])
def test_no_child_to_put_the_file_in_place_fails_the_save(sim_dir, tmp_path, monkeypatch, compress):
    """The short child that puts the file in place cannot start (no fds left,
    no processes): the save fails with that said, the temporary file goes and
    the guest runs again.  With compress the OSError escaped from the loop's
    callback: the save never ended, its guest stayed suspended."""
    import errno

    import importlib
    save_module = importlib.import_module("pyxl.ops.save")

    def no_child(*args: object, **kw: object) -> None:
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
    monkeypatch.setattr(save_module, "finish_file", no_child)
    d = sim.create(16 << 20, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", sim_dir=sim_dir, fsync=False, compress=compress)
    with pytest.raises(OperationError, match="^putting the save file in place failed: cannot "
                                             "start it: Too many open files"):
        pyxl.wait(op, timeout=30)
    assert sim.state(d, sim_dir=sim_dir) == "running"
    assert list(tmp_path.iterdir()) == [] and children() == []


def test_a_failed_save_leaves_freeing_its_file_to_the_flushing_child(sim_dir, tmp_path, monkeypatch):
    """A failed save closes its descriptor and unlinks its temporary file
    before it lets the flushing child go, whose descriptor is then the file's
    last: freeing the blocks is that child's exit's work.  Unlinked on the loop
    afterwards, a 1 GiB file held the loop 209-217 ms (ext4, a review's run)."""
    import importlib
    childproc = importlib.import_module("pyxl.childproc")
    seen = []
    abandon = childproc.FileFinisher.abandon

    def watched(self, then):
        seen.append((sorted(p.name for p in tmp_path.iterdir()),
                     any(os.readlink(f"/proc/{self.child.pid}/fd/{fd}").endswith(" (deleted)")
                         for fd in os.listdir(f"/proc/{self.child.pid}/fd"))))
        return abandon(self, then)
    monkeypatch.setattr(childproc.FileFinisher, "abandon", watched)
    _cancel_a_save_midway(sim_dir, tmp_path, fsync=True)
    assert seen == [([], True)]          # gone by name; the child held the last descriptor


def _cancel_a_save_midway(sim_dir, tmp_path, fsync: bool) -> None:
    """A 256 MiB save cancelled once 8 MiB are written: Cancelled, no file,
    no child, the guest running."""
    d = sim.create(256 << 20, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", sim_dir=sim_dir, fsync=fsync, leave="running")
    loop = pyxl.default_loop()
    assert loop.run_until(lambda: op.stats().bytes > 8 << 20 or op.done(), 30)
    op.cancel()
    with pytest.raises(pyxl.Cancelled):
        pyxl.wait(op, timeout=30)
    assert list(tmp_path.iterdir()) == [] and children() == []
    assert sim.state(d, sim_dir=sim_dir) == "running"


def test_without_the_flushing_child_a_failed_save_has_a_short_child_remove_its_file(
        sim_dir, tmp_path, monkeypatch):
    """fsync=False starts no flushing child: a failed save unlinked its file on
    the loop, 47-56 ms for a GiB of unwritten pages on ext4 (the journal), and
    its close freed the blocks there.  Now a short child gets the file's last
    descriptor and its name, removes it and exits; the failure is reported once
    it has gone."""
    import importlib
    save_module = importlib.import_module("pyxl.ops.save")
    seen = []
    remove_in_child = save_module.remove_in_child

    def watched(loop, path, fd, done):
        seen.append((os.path.dirname(path) == str(tmp_path),
                     os.readlink(f"/proc/self/fd/{fd}") == path))
        return remove_in_child(loop, path, fd, done)
    monkeypatch.setattr(save_module, "remove_in_child", watched)
    _cancel_a_save_midway(sim_dir, tmp_path, fsync=False)
    assert seen == [(True, True)]        # the file and its last descriptor, to the child
