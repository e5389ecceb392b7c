"""Names are unique on a host, within one process and across processes: a
name is held from before its check until the domain has it
(pyxl.backends.names), so restores, receives and renames racing for one name
cannot all pass the check.
Real helpers and fakexen; fakes of libxenctrl and xenstored for XenBackend."""

from __future__ import annotations

import subprocess
import sys
from typing import List, Optional, Tuple

import pyxl
from pyxl import sim
from pyxl.backends import base
from pyxl.backends.sim import SimBackend
from pyxl.errors import StartupError
from pyxl.loop import SelectorLoop

import test_xenbackend_steps
from conftest import ROOT
from test_xenbackend_steps import CONFIG, SlowMake
from xenfakes import backend

MB = 1 << 20

xsd = test_xenbackend_steps.xsd
host = test_xenbackend_steps.host


def test_three_restores_of_one_name_at_once_make_one_domain(sim_dir, tmp_path):
    d = sim.create(64 * MB, sim_dir=sim_dir)
    img = tmp_path / "a.save"
    pyxl.wait(pyxl.save(d, img, sim_dir=sim_dir))
    loop = pyxl.default_loop()
    ops = [pyxl.restore(img, name="twin", sim_dir=sim_dir) for _ in range(3)]
    assert loop.run_until(lambda: all(o.done() for o in ops), 60)
    ok = [o for o in ops if o.exception() is None]
    failed = [o.exception() for o in ops if o.exception() is not None]
    assert len(ok) == 1, [str(e) for e in failed]
    assert len(failed) == 2
    for exc in failed:
        assert type(exc) is StartupError and "domain 'twin' already exists" in str(exc), exc
        assert "\n" not in str(exc)
    # no half-made domain: the one that won, nothing else
    assert [(i.domid, i.name) for i in sim.list_domains(sim_dir=sim_dir)] == \
        [(ok[0].result().domid, "twin")]
    # the name is released: once the domain is gone, it can be restored again
    sim.destroy(ok[0].result().domid, sim_dir=sim_dir)
    again = pyxl.wait(pyxl.restore(img, name="twin", sim_dir=sim_dir))[0]
    assert sim.info(again.domid, sim_dir=sim_dir).name == "twin"


HOLDER = """
import sys
from pyxl.backends import names
from pyxl.backends.sim import SimBackend
release = names.reserve(SimBackend(sys.argv[1]), sys.argv[2])
print("held", flush=True)
sys.stdin.read()          # until told
release()
"""


def test_a_name_another_process_is_making_is_refused_until_it_lets_go(sim_dir, tmp_path):
    """Another pyxl process holds the name (its restore is making the
    domain): ours fails as if the domain existed, naming the holder; once the
    holder lets go, or is killed, the name restores."""
    d = sim.create(64 * MB, sim_dir=sim_dir)
    img = tmp_path / "a.save"
    pyxl.wait(pyxl.save(d, img, sim_dir=sim_dir))
    for end in ("release", "SIGKILL"):
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, sim_dir, "twin"],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT)
        try:
            assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
            op = pyxl.restore(img, name="twin", sim_dir=sim_dir)
            assert pyxl.default_loop().run_until(op.done, 60)
            exc = op.exception()
            assert type(exc) is StartupError, exc
            assert str(exc).endswith(f"domain 'twin' already exists (a restore or rename by "
                                     f"process {holder.pid} is making it)"), exc
            assert sim.list_domains(sim_dir=sim_dir) == []
        finally:
            if end == "release":
                holder.communicate(b"", timeout=30)
            else:
                holder.kill()
                holder.wait(timeout=30)
        restored = pyxl.wait(pyxl.restore(img, name="twin", sim_dir=sim_dir))[0]
        assert sim.info(restored.domid, sim_dir=sim_dir).name == "twin"
        sim.destroy(restored.domid, sim_dir=sim_dir)


def test_names_are_held_per_host(tmp_path, hosts):
    """Two state directories are two hosts: the same name restores on both at once."""
    src, dst = hosts
    d = sim.create(64 * MB, sim_dir=src)
    img = tmp_path / "a.save"
    pyxl.wait(pyxl.save(d, img, sim_dir=src))
    a = pyxl.restore(img, name="same", sim_dir=src)
    b = pyxl.restore(img, name="same", sim_dir=dst)
    pyxl.wait(a, b)


def test_a_rename_to_a_name_being_restored_is_refused(sim_dir, tmp_path):
    d = sim.create(64 * MB, sim_dir=sim_dir)
    img = tmp_path / "a.save"
    pyxl.wait(pyxl.save(d, img, leave="running", sim_dir=sim_dir))
    loop = pyxl.default_loop()
    rop = pyxl.restore(img, name="wanted", sim_dir=sim_dir)
    got: List[Tuple[bool, str]] = []
    # the restore's domain is being made from the loop's first callbacks on
    assert loop.run_until(lambda: rop._creating, 10)
    base.start_rename(SimBackend(sim_dir), loop, d, "wanted", lambda ok, why: got.append((ok, why)))
    pyxl.wait(rop)
    assert got and got[0][0] is False and "domain 'wanted' already exists" in got[0][1], got
    assert sim.info(d, sim_dir=sim_dir).name != "wanted"


def test_xen_backends_of_one_process_hold_names_for_the_host(xsd, host):
    """Two XenBackend objects are one host: the second restore target of a name
    is refused while the first is still being made (its hypercalls' child takes
    0.3 s), and nothing of it is made."""
    loop = SelectorLoop()
    one, two = backend(xsd, SlowMake()), backend(xsd, SlowMake())
    out: List[Tuple[str, Optional[int], Optional[Exception]]] = []
    base.start_create_restore_target(one, loop, CONFIG, lambda d, e: out.append(("one", d, e)))
    base.start_create_restore_target(two, loop, CONFIG, lambda d, e: out.append(("two", d, e)))
    assert loop.run_until(lambda: len(out) == 2, 10)
    by = {who: (d, e) for who, d, e in out}
    assert by["one"] == (7, None)
    assert by["two"][0] is None and isinstance(by["two"][1], StartupError)
    assert "domain 'g1' already exists" in str(by["two"][1])
    assert not [c for c in two.xc.log if c[0] == "create"]
    loop.close()
