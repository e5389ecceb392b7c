"""fakexen's state directory is private: a per-user default created mode 0700,
refused when others could write into it, and its files opened without
following symlinks -- in Python (pyxl/sim) and in C (pyxl-sim-vcpu,
libfakexen.so) -- so a planted symlink cannot make pyxl overwrite a file."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess

import pytest

import pyxl
from pyxl import sim

from conftest import ROOT
from test_cli_errors import PYXL, one_line_error

MB = 1 << 20


def sim_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(PYXL + ["sim"] + list(args), capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT))


def test_default_is_per_user():
    assert sim.DEFAULT_SIM_DIR == f"/dev/shm/pyxl-sim-{os.geteuid()}"
    assert "/dev/shm/pyxl-sim-" in subprocess.run(
        PYXL + ["sim", "list", "--help"], capture_output=True, text=True, cwd=str(ROOT)).stdout


def test_created_private(tmp_path):
    path = str(tmp_path / "state")
    try:
        sim.create(16 * MB, sim_dir=path, paused=True)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    finally:
        sim.remove_dir(path)


def unsafe_dirs(tmp_path):
    good = tmp_path / "good"
    good.mkdir(0o700)
    world = tmp_path / "world"
    world.mkdir()
    world.chmod(0o777)
    group = tmp_path / "group"
    group.mkdir()
    group.chmod(0o770)
    theirs = tmp_path / "theirs"
    theirs.mkdir(0o700)
    os.chown(theirs, 65534, 65534)
    link = tmp_path / "link"
    link.symlink_to(good)
    plain = tmp_path / "file"
    plain.write_text("")
    return [(world, "group- or world-writable"), (group, "group- or world-writable"),
            (theirs, "belongs to uid 65534"), (link, "is a symlink"),
            (plain, "is not a directory")]


def test_unsafe_directories_are_refused(tmp_path):
    """Library: UnsafeSimDir; CLI: exit 2, one line, for sim commands and restore."""
    if os.geteuid() != 0:
        pytest.skip("chown to another user needs root")
    saved = tmp_path / "g.save"
    good = str(tmp_path / "src")
    try:
        d = sim.create(16 * MB, sim_dir=good)
        pyxl.wait(pyxl.save(d, saved, sim_dir=good))
    finally:
        sim.remove_dir(good)
    for path, needle in unsafe_dirs(tmp_path):
        with pytest.raises(sim.UnsafeSimDir, match=needle):
            sim.list_domains(str(path))
        with pytest.raises(sim.UnsafeSimDir, match=needle):
            sim.create(16 * MB, sim_dir=str(path))
        r = sim_cli("list", "--sim-dir", str(path))
        assert r.returncode == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r
        r = subprocess.run(PYXL + ["restore", "--sim-dir", str(path), str(saved)],
                           capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        one_line_error(r, 2, needle)
        r = subprocess.run(PYXL + ["save", "--sim-dir", str(path), "1", str(tmp_path / "x")],
                           capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        one_line_error(r, 2, needle)
        # a receiver refuses it before it greets a sender (stdin: a pipe)
        r = subprocess.run(PYXL + ["migrate-receive", "--sim-dir", str(path)], input="",
                           capture_output=True, text=True, timeout=60, cwd=str(ROOT))
        one_line_error(r, 2, needle)
        assert r.stdout == ""
        if path.is_dir() and not path.is_symlink():
            assert [n for n in os.listdir(path) if not n.startswith(".")] == []


def test_planted_symlinks_are_not_written_through(sim_dir, tmp_path):
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    # the domid counter's temporary file: written with O_TRUNC before
    os.symlink(victim, os.path.join(sim_dir, ".next-domid.new"))
    d = sim.create(16 * MB, sim_dir=sim_dir, paused=True)
    assert victim.read_bytes() == b"precious"
    assert not os.path.islink(os.path.join(sim_dir, ".next-domid.new"))
    # a domain's control file swapped for a symlink: refused, not mapped
    ctl = os.path.join(sim_dir, f"d{d}", "ctl")
    shutil.copy(ctl, tmp_path / "ctl.copy")
    os.rename(ctl, ctl + ".real")
    os.symlink(tmp_path / "ctl.copy", ctl)
    before = (tmp_path / "ctl.copy").read_bytes()
    with pytest.raises(sim.SimError, match="is a symlink"):
        sim.pause(d, sim_dir=sim_dir)
    assert (tmp_path / "ctl.copy").read_bytes() == before
    os.unlink(ctl)
    os.rename(ctl + ".real", ctl)


def test_vcpu_does_not_write_through_a_planted_symlink(sim_dir, tmp_path):
    """C side: ``pyxl-sim-vcpu init`` stamps every RAM page of ``mem``; with
    ``mem`` a symlink it refuses (O_NOFOLLOW), and the victim is untouched."""
    d = sim.create(16 * MB, sim_dir=sim_dir, paused=True)
    src = os.path.join(sim_dir, f"d{d}")
    fake = tmp_path / "dom"
    fake.mkdir(0o700)
    shutil.copy(os.path.join(src, "ctl"), fake / "ctl")
    victim = tmp_path / "victim"
    size = os.stat(os.path.join(src, "mem")).st_size
    with open(victim, "wb") as f:
        f.write(b"precious")
        f.truncate(size)
    os.symlink(victim, fake / "mem")
    r = subprocess.run([sim.vcpu_path(), "init", str(fake)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0, r
    assert "symbolic links" in r.stderr, r.stderr
    with open(victim, "rb") as f:
        assert f.read(8) == b"precious"


def test_a_save_in_a_missing_state_directory_says_so(tmp_path):
    """A mistyped sim_dir: the error names the directory that does not exist,
    not only the domain."""
    missing = str(tmp_path / "no" / "such")
    with pytest.raises(pyxl.StartupError,
                       match=f"no such domain: 3: the sim state directory {missing} does not "
                             "exist$"):
        pyxl.save(3, str(tmp_path / "g.save"), sim_dir=missing)
    assert list(tmp_path.iterdir()) == []
