"""fakexen's names: its control page holds 63 bytes of UTF-8, and names are unique.

A longer name is refused whole, with one line, at create, restore and receive
(a receive restores ``NAME--incoming``: 10 bytes more; the source is renamed
``NAME--migratedaway``, 15 more), instead of being cut
(two such domains then shared a name and neither could be found by it).
``pyxl sim create --name`` refuses a name that is taken, as a restore does.
"""

from __future__ import annotations

import pyxl
import pytest
from pyxl import migrate, sim

from conftest import domids
from test_cli_errors import one_line_error, pyxl_cli
from test_migrate import domains, run_both, source_survived
from test_untrusted_input import good, with_config  # noqa: F401  (good: a fixture)

MB = 1 << 20
TOO_LONG = "is 70 bytes of UTF-8; fakexen keeps at most 63"


def test_restore_refuses_a_name_fakexen_cannot_hold(sim_dir, tmp_path, good):  # noqa: F811
    path = tmp_path / "long.save"
    path.write_bytes(with_config(good, lambda c: c["c_info"].update(name="A" * 70)))
    with pytest.raises(pyxl.StartupError, match=TOO_LONG):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir))
    one_line_error(pyxl_cli("restore", "--sim-dir", sim_dir, str(path)), 2, TOO_LONG)
    path.write_bytes(with_config(good, lambda c: c["c_info"].update(name="é" * 32)))
    with pytest.raises(pyxl.StartupError, match="is 64 bytes of UTF-8"):   # bytes, not chars
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir))
    assert domids(sim_dir) == []
    path.write_bytes(with_config(good, lambda c: c["c_info"].update(name="é" * 31)))
    res, = pyxl.wait(pyxl.restore(path, sim_dir=sim_dir))
    assert sim.info(res.domid, sim_dir=sim_dir).name == "é" * 31


def test_sim_create_refuses_a_long_or_taken_name(sim_dir):
    one_line_error(pyxl_cli("sim", "create", "--memory", "16M", "--paused", "--name", "A" * 70,
                            "--sim-dir", sim_dir), 1, TOO_LONG)
    one_line_error(pyxl_cli("sim", "create-empty", "--max-mem", "16M", "--name", "A" * 70,
                            "--sim-dir", sim_dir), 1, TOO_LONG)
    assert domids(sim_dir) == []
    r = pyxl_cli("sim", "create", "--memory", "16M", "--paused", "--name", "vm2",
                 "--sim-dir", sim_dir)
    assert r.returncode == 0, r.stderr
    first = int(r.stdout)
    for argv in (["create", "--memory", "16M", "--paused"], ["create-empty", "--max-mem", "16M"]):
        one_line_error(pyxl_cli("sim", *argv, "--name", "vm2", "--sim-dir", sim_dir), 2,
                       f"domain 'vm2' already exists (domid {first})")
    assert domids(sim_dir) == [first]
    with pytest.raises(sim.SimError, match="is 64 bytes"):
        sim.rename(first, "x" * 64, sim_dir=sim_dir)
    assert sim.info(first, sim_dir=sim_dir).name == "vm2"


def test_receive_refuses_a_name_whose_incoming_form_does_not_fit(hosts):
    a, b = hosts
    dom = sim.create(16 * MB, name="n" * 54, sim_dir=a)    # 64 bytes with "--incoming"
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert "is 64 bytes of UTF-8; fakexen keeps at most 63" in str(rx.exception())
    assert "the receiver failed" in str(tx.exception()), tx.exception()
    source_survived(a, dom)
    assert domains(b) == []
    # fits at both ends: 58 bytes with "--incoming", 63 with the source's "--migratedaway"
    sim.rename(dom, "m" * 48, sim_dir=a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sim.info(got.domid, sim_dir=b).name == "m" * 48
