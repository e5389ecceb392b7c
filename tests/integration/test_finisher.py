"""pyxl-finisher (finisher/finisher.c) on its own: the contract pyxl.childproc
relies on, run as the real program on real files."""

from __future__ import annotations

import os
import resource
import subprocess
import time

import pytest

from pyxl.childproc import FINISHER_NAME
from pyxl._paths import package_file

EXE = package_file(FINISHER_NAME)


def run(*args: str, stdin: bytes = b"", delay: float = 0.0) -> subprocess.CompletedProcess:
    p = subprocess.Popen([EXE, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    time.sleep(delay)
    out, err = p.communicate(stdin, timeout=30)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def test_follow_commit_puts_the_file_in_place(tmp_path):
    tmp, dest = tmp_path / ".w.save.tmp", tmp_path / "w.save"
    data = os.urandom(20 << 20)         # more than two 8 MiB chunks: writeback runs
    tmp.write_bytes(data)
    r = run("follow", str(tmp), str(dest), str(tmp_path), stdin=b"commit\n", delay=0.05)
    assert (r.returncode, r.stderr) == (0, b"\nok\n")
    assert dest.read_bytes() == data and not tmp.exists()


def test_follow_abandoned_touches_nothing(tmp_path):
    tmp, dest = tmp_path / ".w.save.tmp", tmp_path / "w.save"
    tmp.write_bytes(b"half a save")
    dest.write_bytes(b"the old image")
    for word in (b"", b"cancel\n"):     # EOF, or anything but "commit"
        r = run("follow", str(tmp), str(dest), str(tmp_path), stdin=word)
        assert (r.returncode, r.stderr) == (0, b"")
        assert tmp.read_bytes() == b"half a save" and dest.read_bytes() == b"the old image"


def test_finish_renames_with_and_without_sync(tmp_path):
    for sync in ("0", "1"):
        tmp, dest = tmp_path / f"t{sync}", tmp_path / f"d{sync}"
        tmp.write_bytes(sync.encode() * 100)
        r = run("finish", str(tmp), str(dest), str(tmp_path), sync)
        assert (r.returncode, r.stderr) == (0, b"\nok\n")
        assert dest.read_bytes() == sync.encode() * 100 and not tmp.exists()


@pytest.mark.parametrize("args, line", [
    (("follow", "{d}/missing", "{d}/x", "{d}"), "open {d}/missing: No such file or directory"),
    (("finish", "{d}/missing", "{d}/x", "{d}", "1"), "fsync {d}/missing: No such file or directory"),
    (("finish", "{d}/t", "{d}/no/x", "{d}", "0"), "rename to {d}/no/x: No such file or directory"),
    # the renamed file given as the directory
    (("finish", "{d}/t", "{d}/x", "{d}/x", "1"), "fsync of directory {d}/x: Not a directory"),
])
def test_errors_name_the_step_and_the_file_in_one_line(tmp_path, args, line):
    (tmp_path / "t").write_bytes(b"x")
    d = str(tmp_path)
    r = run(*(a.format(d=d) for a in args), stdin=b"commit\n")
    assert r.returncode == 1
    assert r.stderr.decode() == line.format(d=d) + "\n"


@pytest.mark.parametrize("args", [(), ("follow", "a", "b"), ("finish", "a", "b", "c", "yes"),
                                  ("sync", "a", "b", "c")])
def test_bad_arguments_are_a_usage_error(args):
    r = run(*args)
    assert r.returncode == 2 and r.stderr.startswith(b"usage: pyxl-finisher ")
    assert r.stderr.count(b"\n") == 1


def test_a_finisher_costs_little_cpu(tmp_path):
    """Why it is C: every save starts one, beside the loop.  The Python
    program it replaced took about 19 ms of CPU for this."""
    tmp = tmp_path / "t"
    tmp.write_bytes(os.urandom(1 << 20))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i in range(5):
        r = run("follow", str(tmp), str(tmp_path / "d"), str(tmp_path), stdin=b"commit\n",
                delay=0.05)
        assert r.returncode == 0
        os.rename(tmp_path / "d", tmp)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_ms = (after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime) * 1e3 / 5
    assert cpu_ms < 5, cpu_ms
