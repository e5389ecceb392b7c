"""A restore's stream head (xl header, config, libxl header) from a source that
is not a regular file is read from the loop, under the restore's timeout:
a FIFO without a writer, or a pipe that never writes, blocks neither the
caller nor its loop, and the timeout (or a cancel) ends it cleanly.
Real FIFOs (os.mkfifo) and pipes."""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import threading
import time

import pytest

import pyxl
from pyxl import sim
from pyxl.loop import default_loop

from conftest import domids
from test_cli_errors import one_line_error, pyxl_cli

MB = 1 << 20


def open_fds() -> set:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "stream.fifo"
    os.mkfifo(path)
    return path


def test_cli_restore_from_a_fifo_without_writer_times_out(sim_dir, fifo):
    """``pyxl restore --timeout`` covers opening the FIFO and reading its head:
    exit 1 (a timeout, as the README's table says), one line, no domain."""
    t0 = time.monotonic()
    r = pyxl_cli("restore", "--sim-dir", sim_dir, "--timeout", "1", str(fifo))
    took = time.monotonic() - t0
    one_line_error(r, 1, "timed out after 1s waiting for the stream's head")
    assert took < 20, took
    assert domids(sim_dir) == []


def test_library_restore_from_a_fifo_returns_at_once_and_times_out(sim_dir, fifo):
    default_loop()     # its own fds (a selector) are not the restore's
    fds = open_fds()
    t0 = time.monotonic()
    op = pyxl.restore(fifo, sim_dir=sim_dir, timeout=0.5)
    assert time.monotonic() - t0 < 0.5, "opening the FIFO blocked"
    assert not op.done() and op.domid == -1
    assert default_loop().run_until(op.done, 30)
    assert isinstance(op.exception(), pyxl.Timeout), op.exception()
    assert "waiting for the stream's head" in str(op.exception())
    assert open_fds() == fds, "the FIFO is closed"
    assert domids(sim_dir) == []


def test_restore_from_a_silent_pipe_leaves_the_loop_free(sim_dir):
    """A pipe whose writer never writes: the caller's loop runs its own timers
    meanwhile; the timeout fires; the caller's fd stays open with its flags."""
    r, w = os.pipe()
    try:
        flags = fcntl.fcntl(r, fcntl.F_GETFL)
        t0 = time.monotonic()
        op = pyxl.restore(r, sim_dir=sim_dir, timeout=1.0)
        assert time.monotonic() - t0 < 0.5
        ticks = []
        loop = default_loop()
        for i in range(5):
            loop.call_later(0.1 * (i + 1), lambda: ticks.append(time.monotonic() - t0))
        assert loop.run_until(op.done, 30)
        assert len(ticks) == 5 and ticks[-1] < 0.9, ticks
        assert isinstance(op.exception(), pyxl.Timeout), op.exception()
        assert fcntl.fcntl(r, fcntl.F_GETFL) == flags
        os.fstat(r)    # still the caller's
    finally:
        os.close(r)
        os.close(w)
    assert domids(sim_dir) == []


def test_cancel_while_waiting_for_the_head(sim_dir):
    r, w = os.pipe()
    try:
        op = pyxl.restore(r, sim_dir=sim_dir)
        default_loop().call_later(0.2, op.cancel)
        assert default_loop().run_until(op.done, 30)
        assert isinstance(op.exception(), pyxl.Cancelled), op.exception()
    finally:
        os.close(r)
        os.close(w)
    assert domids(sim_dir) == []


def test_restore_from_a_fifo_whose_writer_comes_late(sim_dir, fifo, tmp_path):
    """The writer shows up after a while: the head is read from the loop, the
    FIFO made blocking for the helper, and the domain restored."""
    dom = sim.create(16 * MB, sim_dir=sim_dir)
    before = sim.digest(dom, sim_dir=sim_dir)
    saved = tmp_path / "g.save"
    pyxl.wait(pyxl.save(dom, saved, sim_dir=sim_dir))
    data = saved.read_bytes()
    op = pyxl.restore(fifo, sim_dir=sim_dir, paused=True, timeout=60)

    def writer() -> None:
        time.sleep(0.3)
        with open(fifo, "wb") as f:   # the reader is open: this does not block
            for i in range(0, len(data), 1 << 16):   # in pieces, as a network would
                f.write(data[i:i + (1 << 16)])

    t = threading.Thread(target=writer, daemon=True)
    t.start()
    (res,) = pyxl.wait(op)
    t.join(10)
    assert sim.digest(res.domid, sim_dir=sim_dir) == before
    assert sim.state(res.domid, sim_dir=sim_dir) == "paused"


@pytest.mark.skipif(shutil.which("zstd") is None, reason="zstd is installed by make setup")
def test_where_a_files_head_errors_come_from(sim_dir, tmp_path):
    """As the README's Restore table says: an uncompressed file's bad head
    raises from pyxl.restore(); a compressed file's is the operation's outcome
    (read through the decompressor, from the loop)."""
    junk = tmp_path / "junk.save"
    junk.write_bytes(b"not an xl save file at all" * 10)
    with pytest.raises(pyxl.StartupError, match="wrong magic"):
        pyxl.restore(junk, sim_dir=sim_dir)
    subprocess.run(["zstd", "-q", str(junk), "-o", str(tmp_path / "junk.zst")], check=True)
    op = pyxl.restore(tmp_path / "junk.zst", sim_dir=sim_dir)
    assert default_loop().run_until(op.done, 30)
    assert isinstance(op.exception(), pyxl.StartupError) and "wrong magic" in str(op.exception())
    assert domids(sim_dir) == []
