"""One test per exit code the README documents (README "Exit codes"), on the real
``pyxl`` process, plus the CLI conventions behind them: a domain by name or id,
usage errors from the subcommand's own parser, range checks, one error prefix.

| 0 success | 1 the operation failed | 2 bad arguments or unusable input |
| 130 interrupted (Ctrl-C) | 143 terminated (SIGTERM or SIGHUP) |
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import List

import pytest

from pyxl import sim

from conftest import HELPERS, ROOT, VECTORS

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]


def pyxl_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(PYXL + list(args), capture_output=True, text=True, timeout=timeout,
                          cwd=str(ROOT), stdin=subprocess.DEVNULL)


def last_error(r: subprocess.CompletedProcess) -> str:
    """The one error line: `pyxl: error: ...` (after argparse's usage line, if any)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert lines and lines[-1].startswith("pyxl: error: "), r.stderr
    assert all(line.startswith(("usage:", " ")) for line in lines[:-1]), r.stderr
    return lines[-1]


def leftovers(directory) -> List[str]:
    return [n for n in os.listdir(directory) if ".pyxl-" in n]


# ---- 0 ---------------------------------------------------------------------------------------


def test_exit_0_save_by_name_and_restore(sim_dir, tmp_path):
    """Success, and xl's convention: the domain given by its name."""
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    r = pyxl_cli("save", "-c", "--sim-dir", sim_dir, "web1", str(tmp_path / "web1.save"))
    assert r.returncode == 0, r.stderr
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    sim.destroy(d, sim_dir=sim_dir)     # its name is free again (names are unique)
    r = pyxl_cli("restore", "-p", "--sim-dir", sim_dir, str(tmp_path / "web1.save"))
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.split()[-1]) != d


# ---- 1 ---------------------------------------------------------------------------------------


def test_exit_0_save_to_stdout_and_restore_from_stdin(sim_dir, tmp_path):
    """FILE - is stdout for save and stdin for restore, as it is stdin for inspect."""
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    want = sim.digest(d, sim_dir=sim_dir)
    other = tmp_path / "sim2"
    other.mkdir(mode=0o700)
    save = subprocess.Popen(PYXL + ["save", "-q", "--sim-dir", sim_dir, "web1", "-"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=str(ROOT))
    got = subprocess.run(PYXL + ["restore", "-p", "--sim-dir", str(other), "-"],
                         stdin=save.stdout, capture_output=True, text=True, cwd=str(ROOT),
                         timeout=120)
    assert save.stdout is not None
    save.stdout.close()
    assert save.wait(60) == 0 and got.returncode == 0, (save.stderr.read(), got.stderr)
    (new,) = sim.list_domains(sim_dir=str(other))
    assert int(got.stdout) == new.domid and new.name == "web1"
    assert sim.digest(new.domid, sim_dir=str(other)) == want
    assert d not in [i.domid for i in sim.list_domains(sim_dir=sim_dir)]     # xl's default
    sim.destroy(new.domid, sim_dir=str(other))


def test_exit_1_the_operation_failed(sim_dir, tmp_path):
    """The helper fails: exit 1, one line, nothing left behind, the guest runs on."""
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    r = pyxl_cli("save", "--sim-dir", sim_dir, "--helper", "/bin/false", "web1",
                 str(tmp_path / "x.save"))
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and "exit" in last_error(r)
    assert os.listdir(tmp_path) == []
    assert sim.info(d, sim_dir=sim_dir).state == "running"


def test_exit_1_inspect_refuses_a_stream(tmp_path):
    """README: `inspect` exits 1 on a stream Xen would refuse (2 is for unusable input)."""
    good = sorted((VECTORS / "xen-4.17-streams").glob("*"))[0].read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    bad = bytes(bad[: len(bad) // 2 + 64])
    (tmp_path / "bad.save").write_bytes(bad)
    r = pyxl_cli("inspect", str(tmp_path / "bad.save"))
    assert r.returncode == 1
    assert last_error(r).startswith("pyxl: error: refused: ")


# ---- 2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv,needle", [
    (["save", "web2", "{tmp}/x.save"], "no such domain: 'web2'"),
    (["save", "99999", "{tmp}/x.save"], "domain id out of range: 99999"),
    (["save", "-c", "-p", "web1", "{tmp}/x.save"], "save: argument -p: not allowed with argument -c"),
    (["save", "--timeout", "-1", "web1", "{tmp}/x.save"], "save: argument --timeout: must be more than 0"),
    (["save", "--timeout", "86401", "web1", "{tmp}/x.save"], "at most 86400 seconds"),
    (["save", "--timeout", "nan", "web1", "{tmp}/x.save"], "argument --timeout"),
    (["restore", "--timeout", "0", "{tmp}/x.save"], "restore: argument --timeout"),
    (["save", "web1", "{tmp}/missing-dir/x.save"], "cannot create {tmp}/missing-dir/x.save: No such file"),
    (["restore", "{tmp}/nothing.save"], "{tmp}/nothing.save"),
    (["sim", "info", "web2"], "no such domain: 'web2'"),
    (["migrate", "--command", "true", "web2"], "no such domain: 'web2'"),
    (["migrate", "--downtime", "50", "web1", "127.0.0.1:1"], "migrate: --downtime needs --live"),
    (["save", "web1", ""], "the save file name is empty"),
    (["save", "web1", "{tmp}/newdir/"], "{tmp}/newdir/: not a file name (it ends in '/')"),
    (["restore", "/dev/zero"], "/dev/zero: not a regular file, a pipe or a socket"),
    (["migrate-receive"], "the read fd 0 is not a pipe or a socket"),         # stdin: /dev/null
    (["sim", "create", "--memory", "0"], "argument --memory: must be from 8.0 KiB to"),
    (["sim", "create", "--memory", "16T"], "a 16384.0 GiB guest needs"),     # no room
    (["sim", "create", "--memory", "64M", "--content", "text", "--seed", "-1"],
     "argument --seed: must be from 0"),
    (["sim", "create", "--memory", "64M", "--seed", "5"], "argument --seed: goes with --content"),
    (["sim", "create", "--memory", "64M", "--name", "x/y"], "'x/y' must not contain '/'"),
    (["sim", "create", "--memory", "64M", "--name", "999"], "'999' reads as a domain id"),
    (["sim", "rename", "web1", ""], "argument NAME: '' must be a non-empty string"),
    (["sim", "set-rate", "web1", "2T"], "argument RATE: must be from 0 B to 1024.0 GiB"),
    (["sim", "suspend", "--timeout", "-5", "web1"], "argument --timeout: must be more than 0"),
    (["demo", "--memory", "0"], "argument --memory: must be from 8.0 KiB"),
    (["migrate", "--command", " ", "web1"], "argument --command: empty"),
    (["save", "--json", "web1", "-"], "--json prints on stdout, which FILE - gives the image"),
    (["bogus"], "argument COMMAND: invalid choice: 'bogus'"),
])
def test_exit_2_bad_arguments_or_unusable_input(sim_dir, tmp_path, argv, needle):
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    tmp = str(tmp_path)
    argv = [a.replace("{tmp}", tmp) for a in argv]
    if argv[0] != "bogus":
        argv[1:1] = ["--sim-dir", sim_dir] if argv[0] != "sim" else []
        if argv[0] == "sim":
            argv += ["--sim-dir", sim_dir]
    r = pyxl_cli(*argv)
    assert r.returncode == 2, (r.returncode, r.stderr)
    line = last_error(r)
    assert needle.replace("{tmp}", tmp) in line, line
    assert ".tmp" not in line and not leftovers(tmp_path)      # never a hidden temp file
    assert sim.info(d, sim_dir=sim_dir).state == "running"


def test_exit_2_a_sim_dir_named_but_missing_or_empty(tmp_path):
    """A mistyped --sim-dir (or $PYXL_SIM_DIR) is said, not shown as an empty host;
    an empty one is a usage error rather than quietly the default."""
    missing = str(tmp_path / "no-such-host")
    for argv in (["sim", "list", "--sim-dir", missing], ["sim", "list", "--json", "--sim-dir", missing]):
        r = pyxl_cli(*argv)
        assert r.returncode == 2 and r.stdout == "", (r.returncode, r.stdout, r.stderr)
        assert last_error(r) == f"pyxl: error: the sim state directory {missing} does not exist"
    r = subprocess.run(PYXL + ["sim", "list"], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT), env={**os.environ, "PYXL_SIM_DIR": missing})
    assert r.returncode == 2 and missing in last_error(r), r.stderr
    assert not os.path.exists(missing)
    for argv in (["sim", "list", "--sim-dir", ""], ["save", "--sim-dir", "", "1", "x.save"],
                 ["restore", "--sim-dir=", "x.save"], ["demo", "--sim-dir", ""]):
        r = pyxl_cli(*argv)
        assert r.returncode == 2, (argv, r.stderr)
        assert "argument --sim-dir: empty: name a directory" in last_error(r), r.stderr


# ---- 130 and 143 -------------------------------------------------------------------------------


def _save_in_its_own_group(sim_dir: str, tmp_path, domid: int) -> subprocess.Popen:
    """`pyxl save` as a shell runs a foreground job: the leader of a new process group,
    which a terminal's Ctrl-C signals as a whole.  A slowed helper keeps it streaming."""
    slow = tmp_path / "slow-helper"
    slow.write_text(f"#!/bin/sh\nexec nice -n 19 {HELPERS['ours']} \"$@\"\n")
    slow.chmod(0o755)
    return subprocess.Popen(PYXL + ["save", "--live", "--sim-dir", sim_dir, "--helper", str(slow),
                                    str(domid), str(tmp_path / "g.save")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=str(ROOT), process_group=0)


def children(pid: int) -> List[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(c) for c in f.read().split()]


def _wait_streaming(p: subprocess.Popen, tmp_path) -> None:
    deadline = time.monotonic() + 30
    while True:
        tmp = leftovers(tmp_path)
        if tmp and os.path.getsize(tmp_path / tmp[0]) > MB:
            return
        assert time.monotonic() < deadline and p.poll() is None, p.stderr.read() if p.stderr else ""
        time.sleep(0.002)


@pytest.mark.parametrize("attempt", range(3))
def test_exit_130_ctrl_c_to_the_whole_process_group(sim_dir, tmp_path, attempt):
    """SIGINT to pyxl's process group (what a terminal's Ctrl-C does) reaches pyxl
    only: the helper runs in its own group, pyxl cancels once, cleanly, and exits
    130 every time (the helper is never killed by the SIGINT itself)."""
    d = sim.create(128 * MB, dirty_rate=50 * MB, sim_dir=sim_dir)
    p = _save_in_its_own_group(sim_dir, tmp_path, d)
    _wait_streaming(p, tmp_path)
    helpers = children(p.pid)
    assert helpers and all(os.getpgid(c) == c != p.pid for c in helpers), helpers
    os.killpg(p.pid, signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, (p.returncode, err)
    assert err.splitlines() == ["pyxl: interrupted"], err
    assert sorted(os.listdir(tmp_path)) == ["slow-helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_exit_143_terminated(sim_dir, tmp_path, signum):
    d = sim.create(128 * MB, dirty_rate=50 * MB, sim_dir=sim_dir)
    p = _save_in_its_own_group(sim_dir, tmp_path, d)
    _wait_streaming(p, tmp_path)
    os.killpg(p.pid, signum)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, (p.returncode, err)
    assert err.splitlines() == ["pyxl: terminated"], err
    assert sorted(os.listdir(tmp_path)) == ["slow-helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"


def test_a_result_that_cannot_be_written_says_the_operation_succeeded(sim_dir, tmp_path):
    """stdout on a full disk: exit 1, but the line says the restore ran (a script
    must not retry it) and which domain it made."""
    sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    image = str(tmp_path / "web1.save")
    assert pyxl_cli("save", "--sim-dir", sim_dir, "web1", image).returncode == 0
    with open("/dev/full", "w") as full:
        r = subprocess.run(PYXL + ["restore", "--sim-dir", sim_dir, image], stdout=full,
                           stderr=subprocess.PIPE, text=True, cwd=str(ROOT), timeout=120)
    assert r.returncode == 1, r.stderr     # (Python 3.13 exits 120 if stdout fails at exit)
    assert r.stderr.count("\n") == 1, r.stderr
    (dom,) = sim.list_domains(sim_dir=sim_dir)
    assert last_error(r) == (f"pyxl: error: restored domain {dom.domid} (the operation "
                             f"succeeded), but its result could not be written: No space left "
                             f"on device")
