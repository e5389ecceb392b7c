"""A script that exits while an operation runs on pyxl's default loop (an
uncaught exception, sys.exit, the script's end): the operation is cancelled at
interpreter exit and cleaned up as any cancel is (no temporary file, the guest
resumed, a half-made domain destroyed).  Real processes: the script is a child
Python, with a slowed real helper so that the exit lands mid-stream."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

from pyxl import sim

from conftest import HELPERS, ROOT

MB = 1 << 20

SCRIPT = """
import os, sys
import pyxl
from pyxl import sim
sim_dir, d, target, helper, how = sys.argv[1:6]
d = int(d)
if how == "restore":
    op = pyxl.restore(target, name="half", helper=helper, sim_dir=sim_dir)
    pyxl.default_loop().run_until(lambda: op.domid >= 0, 30)
else:
    op = pyxl.save(d, target, live=(how != "suspended"), helper=helper, sim_dir=sim_dir)
    pyxl.default_loop().run_until(lambda: (op.stats().bytes or 0) > 8 << 20, 30)
    assert not op.done(), op.exception()
    if how == "suspended":
        assert sim.state(d, sim_dir=sim_dir) == "suspended"
print("in flight", flush=True)
if how == "exception":
    raise RuntimeError("a toolstack bug elsewhere")
if how == "suspended":
    sys.exit(3)
# else: the script's end
"""


def slowed(tmp_path) -> str:
    slow = tmp_path / "slow-helper"
    slow.write_text(f"#!/bin/sh\nexec nice -n 19 {HELPERS['ours']} \"$@\"\n")
    slow.chmod(0o755)
    return str(slow)


def run_script(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, cwd=str(ROOT), env=env)


@pytest.mark.parametrize("how,status", [("exception", 1), ("suspended", 3), ("end", 0)])
def test_an_exit_mid_save_cancels_it(sim_dir, tmp_path, how, status):
    d = sim.create(256 * MB, dirty_rate=4 * MB, sim_dir=sim_dir)
    out = tmp_path / "out"
    out.mkdir()
    done = run_script(sim_dir, str(d), str(out / "g.save"), slowed(tmp_path), how)
    assert "in flight" in done.stdout, done.stderr
    assert done.returncode == status, done.stderr
    assert list(out.iterdir()) == [], "the temporary file was left"
    assert [(i.domid, i.state) for i in sim.list_domains(sim_dir)] == [(d, "running")]


def test_an_exit_mid_restore_destroys_the_half_made_domain(sim_dir, tmp_path):
    d = sim.create(256 * MB, sim_dir=sim_dir)
    img = tmp_path / "g.save"
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""\
        import pyxl
        pyxl.wait(pyxl.save({d}, {str(img)!r}, sim_dir={sim_dir!r}))
        """)], env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=60)
    assert done.returncode == 0
    done = run_script(sim_dir, "-1", str(img), slowed(tmp_path), "restore")
    assert "in flight" in done.stdout, done.stderr
    assert done.returncode == 0, done.stderr
    assert sim.list_domains(sim_dir) == []
