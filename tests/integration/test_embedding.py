"""pyxl inside an application that set SIGCHLD to SIG_IGN (issue 16).

The kernel then reaps every child at once, and ``waitpid`` fails with ECHILD:
the helper's exit status is lost.  The operation must still end, with its
true outcome as far as the helper's own messages tell it: a save that
completed succeeds; a helper killed mid-save fails the save, the guest runs
again and no file is left.  (pyxl never installs a SIGCHLD handler itself.)
"""

from __future__ import annotations

import os
import signal

import pytest

import pyxl
from pyxl import sim
from pyxl.backends import SimBackend
from pyxl.loop import SelectorLoop


@pytest.fixture
def sigchld_ignored():
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGCHLD, old)


def test_save_completes_with_sigchld_ignored(sim_dir, tmp_path, sigchld_ignored):
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), loop=loop,
                   leave="paused")
    assert loop.run_until(op.done, 60), "the save never finished"
    res = op.result()
    assert res.bytes_written == os.path.getsize(tmp_path / "g.save")
    assert op.helper is not None and op.helper.status_unknown
    restored = pyxl.wait(pyxl.restore(str(tmp_path / "g.save"), backend=SimBackend(sim_dir),
                                      paused=True, name="copy"))[0]
    assert sim.digest(restored.domid, sim_dir=sim_dir) == sim.digest(dom, sim_dir=sim_dir)
    loop.close()


def test_killed_helper_with_sigchld_ignored(sim_dir, tmp_path, sigchld_ignored):
    dom = sim.create(64 << 20, dirty_rate=4 << 20, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    killed = []

    def progress(ev):
        if not killed and op.helper is not None:
            os.kill(op.helper.pid, signal.SIGKILL)
            killed.append(ev)

    op = pyxl.save(dom, str(tmp_path / "g.save"), backend=SimBackend(sim_dir), loop=loop,
                   live=True, on_progress=progress)
    assert loop.run_until(op.done, 60), "the save never finished"
    assert killed
    with pytest.raises(pyxl.HelperExited, match="exit status is lost"):
        op.result()
    assert os.listdir(tmp_path) == []
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    loop.close()


def test_library_prints_nothing_without_logging_configured(tmp_path):
    """A script that configured no logging sees a failed save as an exception
    only: pyxl's loggers have a NullHandler, so logging's last-resort handler
    does not print the error to stderr as well."""
    import subprocess
    import sys
    script = f"""
import pyxl
from pyxl import sim
from pyxl.backends import SimBackend
d = {str(tmp_path / "sim")!r}
dom = sim.create(4 << 20, name="g", sim_dir=d)
try:
    pyxl.wait(pyxl.save(dom, {str(tmp_path / "g.save")!r}, backend=SimBackend(d), helper="/bin/false"))
except pyxl.OperationError as exc:
    print("raised:", type(exc).__name__)
sim.remove_dir(d)
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "raised: HelperExited"
    assert out.stderr == ""
