"""What a save to a path does with what is already there.

A regular file is replaced atomically (a temporary file renamed over it);
through a symlink the file it names is replaced and the link stays.  A FIFO
or a character device is written into, as xl does (``save DOM /dev/null``
times a save): renaming a file over it would have replaced the node itself.
Anything else, and names that can never be a file, are refused before the
guest is touched."""

from __future__ import annotations

import os
import socket
import stat

from typing import List

import pytest

import pyxl
from pyxl import sim
from pyxl.errors import StartupError
from pyxl.loop import SelectorLoop
from pyxl.stream.xl import XL_MAGIC

MiB = 1 << 20


def _save(dom, target, sim_dir):
    loop = SelectorLoop()
    op = pyxl.save(dom, target, leave="running", sim_dir=sim_dir, loop=loop)
    assert loop.run_until(op.done, 60)
    loop.close()
    return op.result()


def test_a_character_device_is_written_into_and_stays_a_device(sim_dir, tmp_path):
    node = tmp_path / "null"
    os.mknod(node, 0o666 | stat.S_IFCHR, os.makedev(1, 3))     # another /dev/null
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    res = _save(dom, str(node), sim_dir)
    assert stat.S_ISCHR(os.lstat(node).st_mode) and os.lstat(node).st_rdev == os.makedev(1, 3)
    assert res.path == str(node) and res.bytes_written is None
    assert sorted(os.listdir(tmp_path)) == ["null"]           # no temporary file
    assert sim.state(dom, sim_dir=sim_dir) == "running"


def test_a_fifo_is_written_into_and_its_reader_gets_the_image(sim_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    rfd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)      # the reader: drained from the loop
    got = bytearray()
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()

    def readable():
        try:
            data = os.read(rfd, 1 << 16)
        except BlockingIOError:
            return
        if data:
            got.extend(data)
        else:
            loop.remove_reader(rfd)
    loop.add_reader(rfd, readable)
    op = pyxl.save(dom, str(fifo), leave="running", sim_dir=sim_dir, loop=loop)
    assert loop.run_until(op.done, 60)
    op.result()
    while True:                                              # what is left in the pipe
        try:
            data = os.read(rfd, 1 << 16)
        except BlockingIOError:
            break
        if not data:
            break
        got.extend(data)
    os.close(rfd)
    loop.close()
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert bytes(got[:len(XL_MAGIC)]) == XL_MAGIC and len(got) > 16 * MiB
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


def test_a_fifo_nobody_reads_is_refused_at_once(sim_dir, tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    with pytest.raises(StartupError, match=rf"^cannot write to {fifo}: a FIFO nobody reads$"):
        pyxl.save(dom, str(fifo), sim_dir=sim_dir)
    assert sim.state(dom, sim_dir=sim_dir) == "running"


def test_through_a_symlink_its_file_is_replaced_and_the_link_stays(sim_dir, tmp_path):
    real = tmp_path / "real.save"
    real.write_bytes(b"old")
    link = tmp_path / "link.save"
    link.symlink_to("real.save")
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    res = _save(dom, str(link), sim_dir)
    assert os.readlink(link) == "real.save"
    assert real.stat().st_size == res.bytes_written > 16 * MiB
    assert sorted(os.listdir(tmp_path)) == ["link.save", "real.save"]


@pytest.mark.parametrize("name,why", [
    ("", "the save file name is empty"),
    ("newdir/", "newdir/: not a file name (it ends in '/')"),
    ("dangling", "dangling: a symlink to nowhere, which does not exist"),
    ("sock", "sock: not a regular file, a FIFO or a character device"),
])
def test_what_can_never_be_a_save_file_is_refused_before_the_guest_is_touched(
        sim_dir, tmp_path, monkeypatch, name, why):
    monkeypatch.chdir(tmp_path)
    os.symlink("nowhere", "dangling")
    s = socket.socket(socket.AF_UNIX)
    s.bind("sock")
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    pid = sim.info(dom, sim_dir=sim_dir).vcpu_pid
    try:
        with pytest.raises(StartupError) as e:
            pyxl.save(dom, name, sim_dir=sim_dir)
    finally:
        s.close()
    assert str(e.value) == why
    assert sorted(os.listdir(tmp_path)) == ["dangling", "sock"]
    assert sim.state(dom, sim_dir=sim_dir) == "running"
    assert sim.info(dom, sim_dir=sim_dir).vcpu_pid == pid    # never suspended


def _swap_after_lstat(monkeypatch, path, swap):
    """The attacker wins the race: ``swap()`` runs right after pyxl's first
    look at ``path``, by stat or lstat (as another user's loop in a shared
    directory could)."""
    done = []

    def looked(real):
        def look(p, *a, **kw):
            st = real(p, *a, **kw)
            if os.fspath(p) == str(path) and not done:
                done.append(True)
                swap()
            return st
        return look
    monkeypatch.setattr(os, "lstat", looked(os.lstat))
    monkeypatch.setattr(os, "stat", looked(os.stat))


def test_a_file_swapped_for_a_symlink_is_replaced_as_a_name_never_followed(
        sim_dir, tmp_path, monkeypatch):
    """Saving as root into a directory others write to: the regular file at
    the name is swapped for a symlink to a file elsewhere after pyxl looked.
    The name is replaced (the symlink goes); the other file is untouched."""
    victim = tmp_path / "elsewhere" / "victim"
    victim.parent.mkdir()
    victim.write_bytes(b"precious\n")
    target = tmp_path / "shared" / "g.save"
    target.parent.mkdir()
    target.write_bytes(b"old")

    def swap():
        target.unlink()
        target.symlink_to(victim)
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    _swap_after_lstat(monkeypatch, target, swap)
    res = _save(dom, str(target), sim_dir)
    monkeypatch.undo()
    assert victim.read_bytes() == b"precious\n"
    assert os.listdir(victim.parent) == ["victim"]
    assert not target.is_symlink() and target.stat().st_size == res.bytes_written
    assert target.read_bytes()[:len(XL_MAGIC)] == XL_MAGIC


def test_a_fifo_swapped_for_a_file_is_never_written_into(sim_dir, tmp_path, monkeypatch):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious\n")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)

    def swap():
        fifo.unlink()
        fifo.symlink_to(victim)
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    _swap_after_lstat(monkeypatch, fifo, swap)
    try:
        with pytest.raises(StartupError, match=rf"^{fifo}: changed while it was being opened$"):
            pyxl.save(dom, str(fifo), sim_dir=sim_dir)
    finally:
        monkeypatch.undo()
        os.close(reader)
    assert victim.read_bytes() == b"precious\n"
    assert sim.state(dom, sim_dir=sim_dir) == "running"


def test_a_relative_name_is_the_callers_directory_at_the_call(sim_dir, tmp_path, monkeypatch):
    """The image is put in place later, from the loop: a caller that changes
    its working directory meanwhile still gets it where it asked."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    dom = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    monkeypatch.chdir(first)
    loop = SelectorLoop()
    op = pyxl.save(dom, "g.save", sim_dir=sim_dir, loop=loop)
    os.chdir(second)
    assert loop.run_until(op.done, 60)
    loop.close()
    op.result()
    assert os.listdir(first) == ["g.save"] and os.listdir(second) == []


def test_a_pipe_whose_reader_stalls_at_the_end_leaves_the_loop_free_and_can_be_cancelled(sim_dir):
    """The stream's end (here 1 MiB of device records) goes into a pipe whose
    reader stops as the helper exits: it is written from the loop, so timers
    run meanwhile and a cancel ends the save, the guest running again and the
    caller's fd as it was.  It was written inside the loop's callback, which
    blocked until the reader came back (6 s in a review's run) and saw no
    cancel, no timer, no signal meanwhile."""
    import fcntl
    import threading
    import time

    from pyxl.loop import default_loop
    dom = sim.create(16 << 20, sim_dir=sim_dir)
    r, w = os.pipe()
    op = pyxl.save(dom, w, leave="destroy", sim_dir=sim_dir,
                   emulator_records=[(3, bytes(1 << 20))])
    resume_reading = threading.Event()

    def reader() -> None:
        while op.helper is None or op.helper.running:
            if not os.read(r, 1 << 16):
                return
        resume_reading.wait(10)          # the reader stalls, the pipe fills
        while os.read(r, 1 << 16):
            pass
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    loop = default_loop()
    beats: List[float] = []

    def beat() -> None:
        beats.append(time.monotonic())
        if not op.done():
            loop.call_later(0.02, beat)
    beat()
    assert loop.run_until(lambda: op.helper is not None and not op.helper.running, 30)
    loop.call_later(0.5, op.cancel)
    with pytest.raises(pyxl.Cancelled):
        pyxl.wait(op, timeout=5)
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    resume_reading.set()
    os.close(w)
    t.join(10)
    os.close(r)
    assert max(b - a for a, b in zip(beats, beats[1:])) < 0.3
    assert sim.state(dom, sim_dir=sim_dir) == "running"
    assert w not in loop._w.writers


def test_the_timeout_bounds_a_stream_end_that_waits_for_a_stalled_reader(sim_dir):
    """The operation's ``timeout`` used to end with the helper: a reader that
    stopped before the stream's end held the save until a cancel.  Now the
    save fails with Timeout when its time is up, the guest runs again, the
    caller's fd is as it was."""
    import fcntl
    import threading
    import time

    dom = sim.create(16 << 20, sim_dir=sim_dir)
    r, w = os.pipe()
    start = time.monotonic()
    op = pyxl.save(dom, w, leave="destroy", sim_dir=sim_dir, timeout=4,
                   emulator_records=[(3, bytes(1 << 20))])
    stop = threading.Event()

    def reader() -> None:               # reads while the helper runs, then stops
        while op.helper is None or op.helper.running:
            if not os.read(r, 1 << 16):
                return
        stop.wait(30)
    t = threading.Thread(target=reader, daemon=True)
    t.start()
    with pytest.raises(pyxl.Timeout, match=r"timed out after 4s: the stream's end waited for its "
                                           r"reader"):
        pyxl.wait(op, timeout=20)
    assert 3.9 < time.monotonic() - start < 8
    assert op.helper is not None and op.helper.wait_status == 0    # it had finished its part
    assert not fcntl.fcntl(w, fcntl.F_GETFL) & os.O_NONBLOCK
    assert sim.state(dom, sim_dir=sim_dir) == "running"
    stop.set()
    os.close(w)
    t.join(10)
    os.close(r)


def test_a_callers_non_blocking_socket_is_saved_into_and_restored_from(sim_dir):
    """Sockets as asyncio leaves them (O_NONBLOCK): the helper shares the open
    file description and libxc does not retry EAGAIN, so a save failed ("Failed
    to write page data") and so did a restore.  The fds are blocking while the
    operations run, and non-blocking again after."""
    import fcntl
    import threading
    dom = sim.create(32 << 20, dirty_rate=4 << 20, sim_dir=sim_dir)
    a, b = socket.socketpair()
    a.setblocking(False)
    b.setblocking(False)
    got = bytearray()

    def slowly() -> None:             # a slow reader, so the helper meets a full socket
        b2 = b.dup()
        b2.setblocking(True)
        while True:
            chunk = b2.recv(1 << 15)
            if not chunk:
                break
            got.extend(chunk)
            threading.Event().wait(0.0002)
        b2.close()
    t = threading.Thread(target=slowly, daemon=True)
    t.start()
    pyxl.wait(pyxl.save(dom, a.fileno(), live=True, sim_dir=sim_dir), timeout=60)
    assert fcntl.fcntl(a.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    a.close()
    t.join(30)
    c, d = socket.socketpair()
    d.setblocking(False)
    threading.Thread(target=lambda: (c.sendall(bytes(got)), c.close()), daemon=True).start()
    (res,) = pyxl.wait(pyxl.restore(d.fileno(), sim_dir=sim_dir), timeout=60)
    assert fcntl.fcntl(d.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
    assert sim.check_guest(res.domid, sim_dir=sim_dir).consistent
    d.close()
    b.close()


@pytest.mark.parametrize("source", ["/dev/zero", "directory"])
def test_a_callers_non_blocking_fd_refused_at_restore_gets_its_flags_back(tmp_path, source):
    """A restore that refuses a caller's fd in its constructor (a device; a
    directory's fd) gives it back as it came: non-blocking, still open."""
    import fcntl
    path = str(tmp_path) if source == "directory" else source
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with pytest.raises(StartupError, match="not a regular file, a pipe or a socket"):
            pyxl.restore(fd)
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    finally:
        os.close(fd)
