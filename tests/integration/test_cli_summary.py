"""A successful command ends with one summary line on stderr (stdout stays the
result: restore's domid, or the migration channel); ``-q`` drops it; ``--json``
prints the same numbers as one JSON object on stdout instead."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from pyxl import sim

from conftest import ROOT

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]


def cli(*args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(PYXL + list(args), capture_output=True, text=True, timeout=120,
                       cwd=str(ROOT))
    assert r.returncode == 0, r.stderr
    return r


def test_save_and_restore_say_what_they_did(sim_dir, tmp_path):
    sim.create(64 * MB, name="web1", sim_dir=sim_dir)
    target = str(tmp_path / "web1.save")
    r = cli("save", "--sim-dir", sim_dir, "web1", target)
    assert r.stdout == ""
    assert re.fullmatch(rf"saved web1 \(64 MiB\) to {re.escape(target)} in \d+\.\d s\n",
                        r.stderr), r.stderr
    r = cli("restore", "-p", "--sim-dir", sim_dir, target)
    domid = int(r.stdout)
    assert re.fullmatch(rf"restored web1 \(64 MiB\) from {re.escape(target)} as domain "
                        rf"{domid} in \d+\.\d s\n", r.stderr), r.stderr


def test_quiet_prints_no_summary(sim_dir, tmp_path):
    sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    r = cli("save", "-q", "--sim-dir", sim_dir, "web1", str(tmp_path / "w.save"))
    assert (r.stdout, r.stderr) == ("", "")
    r = cli("restore", "--quiet", "--sim-dir", sim_dir, str(tmp_path / "w.save"))
    assert r.stderr == "" and int(r.stdout) >= 0


def test_json_carries_the_summarys_numbers(sim_dir, tmp_path):
    d = sim.create(16 * MB, name="web1", sim_dir=sim_dir)
    target = str(tmp_path / "w.save")
    r = cli("save", "--json", "--sim-dir", sim_dir, "web1", target)
    assert r.stderr == ""
    got = json.loads(r.stdout)
    assert got["name"] == "web1" and got["memory"] == 16 * MB and got["domid"] == d
    assert got["file"] == target and got["bytes"] > 16 * MB and got["seconds"] > 0
    r = cli("restore", "--json", "--sim-dir", sim_dir, target)
    assert r.stderr == ""
    got = json.loads(r.stdout)
    assert (got["name"], got["memory"], got["file"]) == ("web1", 16 * MB, target)
    assert got["domid"] != d and got["seconds"] > 0


@pytest.mark.parametrize("json_out", [False, True])
def test_migrate_and_receive_summaries(sim_dir, tmp_path, json_out):
    src = sim.create(32 * MB, name="db", sim_dir=sim_dir)
    receiver = f"{sys.executable} -m pyxl migrate-receive --sim-dir {sim_dir}"
    args = ["migrate", "--live", "--sim-dir", sim_dir, "--command", receiver, "db"]
    if json_out:
        args.insert(1, "--json")
    r = cli(*args)
    lines = r.stderr.splitlines()
    # the receiver's stderr is the sender's (through --command): its line comes first
    rx = [line for line in lines if line.startswith("received ")]
    assert len(rx) == 1 and re.fullmatch(r"received db \(32 MiB\) as domain \d+ in \d+\.\d s",
                                         rx[0]), lines
    if json_out:
        got = json.loads(r.stdout)
        assert (got["name"], got["memory"], got["domid"]) == ("db", 32 * MB, src)
        assert got["bytes_sent"] > 32 * MB and got["iterations"] >= 1
        assert got["downtime_ms"] > 0 and got["seconds"] > 0
        assert not [line for line in lines if line.startswith("migrated ")]
    else:
        tx = [line for line in lines if line.startswith("migrated ")]
        assert len(tx) == 1 and re.fullmatch(
            r"migrated db \(32 MiB\) to .* in \d+\.\d s \(\d+\.\d MiB sent, downtime \d+ ms\)",
            tx[0]), lines
    names = [i.name for i in sim.list_domains(sim_dir)]
    assert names == ["db"]
