"""Host-name lookup without blocking the loop and without threads (pyxl.migrate.resolve)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, List, Optional

import pytest

import pyxl
from pyxl import migrate
from pyxl.migrate import resolve
from pyxl import sim
from pyxl.loop import SelectorLoop

from conftest import children, open_fds


def lookup(host: str, port: int = 80, slow_getent: Optional[str] = None) -> Any:
    loop = SelectorLoop()
    got: List[Any] = []
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not got:
            loop.call_later(0.005, tick)

    old = resolve.GETENT
    if slow_getent:
        resolve.GETENT = slow_getent
    try:
        lk = resolve.Lookup(loop, host, port, lambda addr, why: got.append((addr, why)))
        assert not got, "the answer comes from the loop, never from the constructor"
        loop.call_later(0, tick)
        assert loop.run_until(lambda: bool(got), 30)
    finally:
        resolve.GETENT = old
        loop.close()
    assert threading.active_count() == 1
    return got[0], ticks, lk


def test_numeric_addresses_need_no_process():
    before = children()
    (addr, why), _, _ = lookup("127.0.0.1", 8002)
    assert addr == (socket.AF_INET, ("127.0.0.1", 8002)) and why == ""
    (addr, _), _, _ = lookup("::1", 8002)
    assert addr[0] == socket.AF_INET6 and addr[1][:2] == ("::1", 8002)
    assert children() == before


def test_a_name_resolves_through_getent():
    fds = open_fds()
    (addr, why), _, _ = lookup("localhost", 8002)
    assert why == "" and addr is not None
    assert addr[1][0] in ("127.0.0.1", "::1") and addr[1][1] == 8002
    assert children() == [] and open_fds() == fds


def test_unknown_name_is_a_clear_error():
    (addr, why), _, _ = lookup("no-such-host.invalid")
    assert addr is None and "cannot resolve 'no-such-host.invalid'" in why


@pytest.mark.parametrize("host", ["", "-n", "a b"])
def test_bad_names(host):
    (addr, why), _, _ = lookup(host)
    assert addr is None and "cannot resolve" in why


def test_the_loop_turns_while_a_slow_lookup_runs(tmp_path):
    slow = tmp_path / "getent"
    slow.write_text("#!/bin/sh\nsleep 0.5\necho '10.1.2.3        STREAM $2'\n")
    slow.chmod(0o755)
    t0 = time.monotonic()
    (addr, why), ticks, _ = lookup("slow.example", 9, slow_getent=str(slow))
    assert addr == (socket.AF_INET, ("10.1.2.3", 9)), why
    assert time.monotonic() - t0 >= 0.5
    assert len(ticks) >= 20 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.2


def test_cancel_kills_and_reaps_the_lookup(tmp_path):
    slow = tmp_path / "getent"
    slow.write_text("#!/bin/sh\nexec sleep 60\n")
    slow.chmod(0o755)
    fds = open_fds()
    loop = SelectorLoop()
    old, resolve.GETENT = resolve.GETENT, str(slow)
    try:
        got: List[Any] = []
        lk = resolve.Lookup(loop, "slow.example", 9, lambda *a: got.append(a))
        assert len(children()) == 1
        loop.run_until(lambda: False, 0.1)
        lk.cancel()
        loop.run_until(lambda: False, 0.05)
        assert got == [] and children() == []
    finally:
        resolve.GETENT = old
        loop.close()
    assert open_fds() == fds


def test_migration_to_a_host_name(hosts):
    a, b = hosts
    dom = sim.create(16 << 20, sim_dir=a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, f"localhost:{rx.address[1]}", sim_dir=a)
    _, got = pyxl.wait(tx, rx, timeout=60)
    assert [i.domid for i in sim.list_domains(sim_dir=b)] == [got.domid]
    assert sim.list_domains(sim_dir=a) == []
    tx = migrate.migrate(got.domid, "no-such-host.invalid:8002", sim_dir=b)
    with pytest.raises(migrate.MigrationError, match="cannot resolve"):
        pyxl.wait(tx, timeout=60)
    assert tx.exception().source_state == "running"
    assert [i.state for i in sim.list_domains(sim_dir=b)] == ["running"]
