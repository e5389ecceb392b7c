"""One save (or migration) of a domain at a time: two share its log-dirty
bitmap and both "succeed" with stale pages, so the second is refused."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import pyxl
from pyxl import sim
from pyxl.errors import StartupError
from pyxl.loop import SelectorLoop

MiB = 1 << 20


def test_a_second_save_of_a_domain_is_refused_while_the_first_runs(sim_dir, tmp_path):
    d = sim.create(32 * MiB, dirty_rate=8 * MiB, name="g", sim_dir=sim_dir)
    loop = SelectorLoop()
    first = pyxl.save(d, str(tmp_path / "a.save"), live=True, leave="running",
                      sim_dir=sim_dir, loop=loop)
    with pytest.raises(StartupError, match=rf"domain {d} is busy: a live save by process "
                                           rf"{os.getpid()} is in flight"):
        pyxl.save(d, str(tmp_path / "b.save"), leave="running", sim_dir=sim_dir, loop=loop)
    assert not (tmp_path / "b.save").exists()
    # held in a directory of its own, not fakexen's busy state directory
    assert os.path.exists(os.path.join(sim_dir, ".locks", f".lock-d{d}"))
    assert not os.path.exists(os.path.join(sim_dir, f".lock-d{d}"))
    assert loop.run_until(first.done, 60)
    first.result()
    with pytest.raises(StartupError, match="the save file name is empty"):
        pyxl.save(d, "", sim_dir=sim_dir, loop=loop)      # a refused target lets go too
    # let go at the end, and the lock file with it
    assert [n for n in os.listdir(os.path.join(sim_dir, ".locks"))
            if n.startswith(".lock-d")] == []
    second = pyxl.save(d, str(tmp_path / "b.save"), leave="running", sim_dir=sim_dir, loop=loop)
    assert loop.run_until(second.done, 60)
    second.result()
    loop.close()


def test_the_lock_holds_across_processes_and_a_failed_save_lets_go(sim_dir, tmp_path):
    d = sim.create(16 * MiB, name="g", sim_dir=sim_dir)
    # another process holds the lock while it saves through a helper that never talks
    hold = tmp_path / "hold.sh"
    hold.write_text("#!/bin/sh\nexec sleep 30\n")
    hold.chmod(0o755)
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, pyxl\n"
            f"op = pyxl.save({d}, {str(tmp_path / 'x.save')!r}, helper={str(hold)!r}, "
            f"sim_dir={sim_dir!r})\n"
            "print('started', flush=True)\n"
            "sys.stdin.read()\n"
            "op.cancel(); pyxl.wait(op, timeout=10) if False else None\n")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "started\n"
        with pytest.raises(StartupError, match=rf"domain {d} is busy: a save by process "
                                               rf"{child.pid} is in flight"):
            pyxl.save(d, str(tmp_path / "y.save"), sim_dir=sim_dir)
    finally:
        child.communicate("", timeout=30)
    # the holder's exit let go (the kernel drops an flock with its last fd)
    loop = SelectorLoop()
    op = pyxl.save(d, str(tmp_path / "y.save"), helper="/bin/false", sim_dir=sim_dir, loop=loop)
    assert loop.run_until(op.done, 30)
    assert op.exception() is not None
    op = pyxl.save(d, str(tmp_path / "y.save"), leave="running", sim_dir=sim_dir, loop=loop)
    assert loop.run_until(op.done, 60)
    op.result()
    loop.close()


class _HostAt:
    """A backend's one say in locking: where its host's lock files go."""

    def __init__(self, path: str) -> None:
        self.path = path

    def lock_dir(self) -> str:
        return self.path


def test_a_lock_directory_others_could_write_into_is_refused(tmp_path):
    from pyxl.backends.domainlock import DomainLock
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o700)
    os.chmod(shared, 0o777)
    with pytest.raises(StartupError, match=r"lock directory .*shared is group- or world-writable "
                                           r"\(mode 0777\): refusing it"):
        DomainLock(_HostAt(str(shared)), 3, "save")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "own")
    (tmp_path / "own").mkdir(mode=0o700)
    with pytest.raises(StartupError, match=r"lock directory .*link is a symlink: refusing it"):
        DomainLock(_HostAt(str(link)), 3, "save")
    assert os.listdir(shared) == [] and os.listdir(tmp_path / "own") == []
    held = DomainLock(_HostAt(str(tmp_path / "new" / "dir")), 3, "save")  # made, 0700
    assert os.stat(tmp_path / "new" / "dir").st_mode & 0o777 == 0o700
    held.release()
