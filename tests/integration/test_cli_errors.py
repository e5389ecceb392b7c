"""``pyxl save`` / ``pyxl restore`` on bad input and a hostile environment.

Unknown domains, missing, unreadable and directory paths, no permission
(root without CAP_DAC_OVERRIDE, or user nobody), a full disk (a 1 MiB tmpfs),
a missing or unusable helper, Ctrl-C.  Every case runs the real ``pyxl``
process: the documented exit status, one line on stderr and never a
traceback; an existing save file untouched and no temporary file left; the
domain still running; no half-restored domain left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Iterator, List, Optional

import pytest

import pyxl
from pyxl import sim

from conftest import HELPERS, ROOT, domids, mounted_tmpfs

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]
#: root, but file modes apply (no CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH)
NO_DAC = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
          "--inh-caps", "-dac_override,-dac_read_search", "--"]


def pyxl_cli(*args: str, prefix: Optional[List[str]] = None, timeout: float = 60,
             env: Optional[dict] = None) -> subprocess.CompletedProcess:
    return subprocess.run((prefix or []) + PYXL + list(args), capture_output=True, text=True,
                          timeout=timeout, cwd=str(ROOT), env=env)


def one_line_error(r: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert r.returncode == code, (r.returncode, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyxl: error: "), r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert "internal error" not in lines[0]
    return lines[0]


@pytest.fixture
def guest(sim_dir):
    return sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=sim_dir)


@pytest.fixture
def saved(sim_dir, tmp_path):
    """A good save file (its domain destroyed)."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    path = tmp_path / "good.save"
    pyxl.wait(pyxl.save(d, path, sim_dir=sim_dir))
    return path


def untouched(directory, name: str = "existing.save", content: bytes = b"precious") -> None:
    assert (directory / name).read_bytes() == content
    assert [n for n in os.listdir(directory) if ".pyxl-" in n] == [], "temporary file left"


# ---------------------------------------------------------------------------
# save


def test_save_unknown_domid(sim_dir, tmp_path):
    r = pyxl_cli("save", "--sim-dir", sim_dir, "4242", str(tmp_path / "x.save"))
    one_line_error(r, 2, "no such domain: 4242")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("domid", ["abc", "-1", "99999"])
def test_save_bad_domid_syntax(sim_dir, tmp_path, domid):
    r = pyxl_cli("save", "--sim-dir", sim_dir, domid, str(tmp_path / "x.save"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.splitlines()[-1].startswith("usage: ") is False
    assert "error:" in r.stderr.splitlines()[-1]
    assert os.listdir(tmp_path) == []


def test_save_to_a_directory(sim_dir, tmp_path, guest):
    (tmp_path / "dir").mkdir()
    r = pyxl_cli("save", "--sim-dir", sim_dir, str(guest), str(tmp_path / "dir"))
    one_line_error(r, 2, "is a directory")
    assert os.listdir(tmp_path / "dir") == [] and os.listdir(tmp_path) == ["dir"]
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


def test_save_into_missing_directory(sim_dir, tmp_path, guest):
    r = pyxl_cli("save", "--sim-dir", sim_dir, str(guest), str(tmp_path / "no" / "x.save"))
    one_line_error(r, 2, "No such file or directory")
    assert os.listdir(tmp_path) == []
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


def test_save_without_write_permission(sim_dir, tmp_path, guest):
    """Root without CAP_DAC_OVERRIDE into a read-only directory: refused, the
    existing file untouched."""
    d = tmp_path / "ro"
    d.mkdir()
    (d / "existing.save").write_bytes(b"precious")
    d.chmod(0o555)
    try:
        r = pyxl_cli("save", "--sim-dir", sim_dir, str(guest), str(d / "existing.save"),
                     prefix=NO_DAC)
    finally:
        d.chmod(0o755)
    one_line_error(r, 2, "Permission denied")
    untouched(d)
    assert os.listdir(d) == ["existing.save"]
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


def test_save_helper_missing_or_not_executable(sim_dir, tmp_path, guest):
    (tmp_path / "existing.save").write_bytes(b"precious")
    r = pyxl_cli("save", "--sim-dir", sim_dir, "--helper", str(tmp_path / "nohelper"),
                 str(guest), str(tmp_path / "existing.save"))
    one_line_error(r, 2, "cannot run helper")
    (tmp_path / "helper.txt").write_text("not a program")
    r = pyxl_cli("save", "--sim-dir", sim_dir, "--helper", str(tmp_path / "helper.txt"),
                 str(guest), str(tmp_path / "existing.save"))
    one_line_error(r, 2, "cannot run helper")
    untouched(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["existing.save", "helper.txt"]
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


@pytest.fixture
def tiny_tmpfs() -> Iterator[str]:
    """A 1 MiB tmpfs (root only)."""
    with mounted_tmpfs("1m", prefix="pyxl-full-", lazy=False) as d:
        yield d


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_save_disk_full(sim_dir, guest, tiny_tmpfs, helper):
    """A 16 MiB guest into 1 MiB: the operation fails (1), the existing file is
    untouched, the temporary file removed, the guest running again."""
    import pathlib
    d = pathlib.Path(tiny_tmpfs)
    (d / "existing.save").write_bytes(b"precious")
    r = pyxl_cli("save", "--sim-dir", sim_dir, "--helper", HELPERS[helper], str(guest),
                 str(d / "existing.save"))
    line = one_line_error(r, 1)
    assert "No space left on device" in line or "failed" in line
    untouched(d)
    assert os.listdir(d) == ["existing.save"]
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


def test_save_disk_already_full(sim_dir, guest, tiny_tmpfs):
    """Not even the headers fit: refused before the helper runs."""
    import pathlib
    d = pathlib.Path(tiny_tmpfs)
    (d / "existing.save").write_bytes(b"precious")
    fd = os.open(d / "filler", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 512)
    except OSError:
        pass
    finally:
        os.close(fd)
    r = pyxl_cli("save", "--sim-dir", sim_dir, str(guest), str(d / "existing.save"))
    one_line_error(r, 2, "No space left on device")
    untouched(d)
    assert sorted(os.listdir(d)) == ["existing.save", "filler"]
    assert sim.info(guest, sim_dir=sim_dir).state == "running"


@pytest.mark.parametrize("signum,code,text", [(signal.SIGINT, 130, "pyxl: interrupted"),
                                              (signal.SIGTERM, 143, "pyxl: terminated")])
def test_save_interrupted(sim_dir, tmp_path, signum, code, text):
    """Ctrl-C or SIGTERM during a save: the operation is cancelled, the existing
    file untouched, the temporary file removed, the guest resumed."""
    d = sim.create(256 * MB, dirty_rate=50 * MB, sim_dir=sim_dir)
    (tmp_path / "existing.save").write_bytes(b"precious")
    # slow the helper down so that the interrupt lands mid-stream
    slow = tmp_path / "slow-helper"
    slow.write_text(f"#!/bin/sh\nexec nice -n 19 {HELPERS['ours']} \"$@\"\n")
    slow.chmod(0o755)
    p = subprocess.Popen(PYXL + ["save", "--live", "--sim-dir", sim_dir, "--helper", str(slow),
                                 str(d), str(tmp_path / "existing.save")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=str(ROOT))
    deadline = time.monotonic() + 20

    def streaming() -> bool:  # the helper has written pages into the temporary file
        tmp = [n for n in os.listdir(tmp_path) if ".pyxl-" in n]
        return bool(tmp) and os.path.getsize(tmp_path / tmp[0]) > 1 * MB

    while not streaming():
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.002)
    p.send_signal(signum)
    out, err = p.communicate(timeout=30)
    if p.returncode == 0:
        pytest.skip("the save finished before the interrupt")
    assert p.returncode == code, (p.returncode, err)
    assert err.strip().splitlines() == [text], err
    untouched(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["existing.save", "slow-helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"


# ---------------------------------------------------------------------------
# restore


def test_restore_missing_file(sim_dir, tmp_path):
    before = domids(sim_dir)
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(tmp_path / "nope.save"))
    one_line_error(r, 2, "No such file or directory")
    assert domids(sim_dir) == before


def test_restore_into_a_name_in_use(sim_dir, tmp_path):
    """Names are unique, as libxl keeps them: restoring a save file while a
    domain of its name runs is refused before anything is created (exit 2),
    and the restore goes through once the name is free."""
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    path = tmp_path / "web1.save"
    pyxl.wait(pyxl.save(d, path, sim_dir=sim_dir, leave="running"))
    before = domids(sim_dir)
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(path))
    one_line_error(r, 2, "domain 'web1' already exists", f"(domid {d})")
    assert domids(sim_dir) == before
    sim.destroy(d, sim_dir=sim_dir)
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(path))
    assert r.returncode == 0, r.stderr
    assert sim.info(int(r.stdout), sim_dir=sim_dir).name == "web1"


def test_rename_into_a_name_in_use(sim_dir):
    """A rename (a migration receiver's NAME--incoming -> NAME) into a taken name fails."""
    from pyxl.backends.sim import SimBackend
    a = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    b = sim.create(16 * MB, name="web1--incoming", sim_dir=sim_dir)
    backend = SimBackend(sim_dir)
    with pytest.raises(pyxl.BackendError, match=f"domain 'web1' already exists \\(domid {a}\\)"):
        backend.rename(b, "web1")
    backend.rename(a, "web1")          # its own name: fine
    assert sim.info(b, sim_dir=sim_dir).name == "web1--incoming"


def test_restore_a_directory(sim_dir, tmp_path):
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(tmp_path))
    one_line_error(r, 2, "is a directory")
    assert domids(sim_dir) == []


def test_restore_unreadable_file(sim_dir, tmp_path, saved):
    # Root without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, rather than another
    # user: that user would also need to reach the checkout's .venv, which a
    # CI clone under a private directory does not allow.
    saved.chmod(0o000)
    before = domids(sim_dir)
    try:
        r = pyxl_cli("restore", "--sim-dir", sim_dir, str(saved), prefix=NO_DAC)
    finally:
        saved.chmod(0o600)
    one_line_error(r, 2, "Permission denied")
    assert domids(sim_dir) == before


def test_restore_not_a_save_file(sim_dir, tmp_path):
    for name, data in [("empty", b""), ("text", b"hello\n" * 100), ("dev-null", None)]:
        path = "/dev/null" if data is None else str(tmp_path / name)
        if data is not None:
            (tmp_path / name).write_bytes(data)
        r = pyxl_cli("restore", "--sim-dir", sim_dir, path)
        one_line_error(r, 2)
        assert domids(sim_dir) == []


def test_restore_unusable_sim_dir(tmp_path, saved):
    """The state directory is a regular file: refused, one line."""
    (tmp_path / "notadir").write_text("x")
    r = pyxl_cli("restore", "--sim-dir", str(tmp_path / "notadir"), str(saved))
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    one_line_error(r, r.returncode)


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_restore_disk_full(tiny_tmpfs, saved, helper):
    """The new domain's memory has no room (its state directory is a 1 MiB
    tmpfs): refused or failed, one line, nothing left behind."""
    r = pyxl_cli("restore", "--sim-dir", tiny_tmpfs, "--helper", HELPERS[helper], str(saved))
    assert r.returncode in (1, 2), (r.returncode, r.stdout, r.stderr)
    one_line_error(r, r.returncode)
    assert domids(tiny_tmpfs) == []
    assert [n for n in os.listdir(tiny_tmpfs) if not n.startswith(".")] in ([], ["lock"]), \
        os.listdir(tiny_tmpfs)


def test_restore_helper_missing(sim_dir, tmp_path, saved):
    before = domids(sim_dir)
    r = pyxl_cli("restore", "--sim-dir", sim_dir, "--helper", str(tmp_path / "nohelper"),
                 str(saved))
    one_line_error(r, 2, "cannot run helper")
    assert domids(sim_dir) == before, "the new domain is destroyed"


def test_restore_timeout(sim_dir, tmp_path, saved):
    """A helper that hangs: --timeout ends it, exit 1, the new domain destroyed."""
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    before = domids(sim_dir)
    t0 = time.monotonic()
    r = pyxl_cli("restore", "--sim-dir", sim_dir, "--helper", str(hang), "--timeout", "0.5",
                 str(saved))
    assert time.monotonic() - t0 < 15
    one_line_error(r, 1, "timed out")
    assert domids(sim_dir) == before


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_restore_interrupted(sim_dir, tmp_path, saved, signum, code):
    """Ctrl-C or SIGTERM while the helper runs: the new domain is destroyed."""
    hang = tmp_path / "hang"
    hang.write_text("#!/bin/sh\nexec sleep 60\n")
    hang.chmod(0o755)
    before = domids(sim_dir)
    p = subprocess.Popen(PYXL + ["restore", "--sim-dir", sim_dir, "--helper", str(hang),
                                 str(saved)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=str(ROOT))
    deadline = time.monotonic() + 20
    while len(domids(sim_dir)) == len(before):
        assert time.monotonic() < deadline and p.poll() is None
        time.sleep(0.01)
    time.sleep(0.1)
    p.send_signal(signum)
    out, err = p.communicate(timeout=30)
    assert p.returncode == code, (p.returncode, err)
    assert out == "" and len(err.splitlines()) == 1
    assert domids(sim_dir) == before


def test_pyxl_s_own_warnings_show_without_v_and_the_helper_s_log_does_not(sim_dir):
    """A user who asked for --downtime is told, without -v, that Debian's helper
    may ignore it; the helper's own log lines stay behind -v."""
    d = sim.create(16 * MB, name="w", sim_dir=sim_dir)
    receiver = f"{sys.executable} -m pyxl migrate-receive -q --sim-dir {sim_dir}"
    r = pyxl_cli("migrate", "-q", "--live", "--downtime", "50", "--helper", HELPERS["debian"],
                 "--sim-dir", sim_dir, "--command", receiver, "w", timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert lines == [f"pyxl: warning: helper {HELPERS['debian']} may not implement "
                     f"PYXL_PRECOPY: it may use Xen's default policy"], r.stderr
    assert d not in domids(sim_dir)


STAMP = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(\d+)\] "


def test_T_starts_each_log_line_with_the_time_and_the_pid(sim_dir, tmp_path):
    """``pyxl -T``, as ``xl -T``: a warning without -v and every -v line begin
    with the local date and time and pyxl's pid; the command's own lines
    (its summary, its error) do not change."""
    import re
    d = sim.create(16 * MB, name="w", sim_dir=sim_dir)
    before = time.time()
    r = pyxl_cli("-T", "-v", "save", "--sim-dir", sim_dir, "w", str(tmp_path / "w.save"))
    assert r.returncode == 0, r.stderr
    logged = [line for line in r.stderr.splitlines() if not line.startswith("saved ")]
    assert logged, r.stderr
    pids = set()
    for line in logged:
        m = re.match(STAMP + r"pyxl\.\S+: (INFO|DEBUG|DETAIL|WARNING|ERROR): ", line)
        assert m, line
        pids.add(m.group(1))
        stamp = time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S"))
        assert before - 2 <= stamp <= time.time() + 1, line
    assert len(pids) == 1            # the pyxl process's, not the helper's
    assert d not in domids(sim_dir)   # saved, then destroyed
    # without -v: pyxl's own warning, stamped
    d = sim.create(16 * MB, name="w2", sim_dir=sim_dir)
    receiver = f"{sys.executable} -m pyxl migrate-receive -q --sim-dir {sim_dir}"
    r = pyxl_cli("-T", "migrate", "-q", "--live", "--downtime", "50", "--helper",
                 HELPERS["debian"], "--sim-dir", sim_dir, "--command", receiver, "w2",
                 timeout=120)
    assert r.returncode == 0, r.stderr
    [line] = r.stderr.splitlines()
    assert re.fullmatch(STAMP + f"pyxl: warning: helper {re.escape(HELPERS['debian'])} may "
                        "not implement PYXL_PRECOPY: it may use Xen's default policy", line), line
    # a command's error is its own line, unstamped
    one_line_error(pyxl_cli("-T", "save", "--sim-dir", sim_dir, "nosuch", "x.save"), 2,
                   "no such domain")
