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
        lk: Any = None
        lk = resolve.Lookup(loop, "slow.example", 9, lambda *a: got.append(a))
        # The spawner answers from the loop: the child exists once it has.
        assert loop.run_until(lambda: len(children()) == 1, 10)
        loop.run_until(lambda: False, 0.1)
        lk.cancel()
        assert loop.run_until(lambda: children() == [], 10)     # killed and reaped
        loop.run_until(lambda: False, 0.05)
        assert got == []
    finally:
        if lk is not None:
            lk.cancel()              # never leave ``sleep 60`` to the next test
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


def test_every_address_of_a_name_is_kept_in_order(tmp_path):
    two = tmp_path / "getent"
    two.write_text("#!/bin/sh\necho '::1 STREAM localhost'\necho '::1 DGRAM'\n"
                   "echo '127.0.0.1 STREAM'\necho '127.0.0.1 RAW'\n")
    two.chmod(0o755)
    (addr, why), _, lk = lookup("two.example", 9, slow_getent=str(two))
    assert addr[1][:2] == ("::1", 9) and why == ""
    assert [a[1][:2] for a in lk.addresses] == [("::1", 9), ("127.0.0.1", 9)]


def _channel_to(name: str, port: int, getent: str) -> Any:
    """Open a ReceiverChannel to name:port; (ready fds or None, failure or None)."""
    from pyxl.migrate.connection import ReceiverChannel
    loop = SelectorLoop()
    got: List[Any] = []
    old, resolve.GETENT = resolve.GETENT, getent
    try:
        ch = ReceiverChannel(loop, (name, port), None, lambda r, w: got.append(("ready", r)),
                             lambda exc: got.append(("failed", exc)))
        assert loop.run_until(lambda: bool(got), 30)
        ch.close()
    finally:
        resolve.GETENT = old
        loop.close()
    return got[0]


def test_the_connection_tries_the_names_next_address(tmp_path):
    """Debian 13 resolves localhost as ::1 first: a receiver listening on
    127.0.0.1 only must still be reached through the name."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        # ::1 first (nothing listens there on this port), then 127.0.0.1
        getent = tmp_path / "getent"
        getent.write_text("#!/bin/sh\necho '::1 STREAM'\necho '127.0.0.1 STREAM'\n")
        getent.chmod(0o755)
        fds = open_fds()
        kind, _ = _channel_to("both.example", port, str(getent))
        assert kind == "ready"
        assert open_fds() == fds     # the refused socket was closed
        conn, peer = srv.accept()
        conn.close()
        assert peer[0] == "127.0.0.1"


def test_every_address_refused_is_one_clear_error(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]      # bound, not listening: refused
        getent = tmp_path / "getent"
        getent.write_text("#!/bin/sh\necho '::1 STREAM'\necho '127.0.0.1 STREAM'\n")
        getent.chmod(0o755)
        kind, exc = _channel_to("none.example", port, str(getent))
    assert kind == "failed" and isinstance(exc, migrate.MigrationError)
    assert str(exc) == "cannot connect to the receiver: Connection refused"
