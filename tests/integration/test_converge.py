"""Switch-over policies in Python and auto-converge, on fakexen (issue 20).

A policy is asked once per precopy round through pyxl's extension of the
callback protocol (precopy_round, PYXL_PRECOPY=host).  Every way a policy can
misbehave -- raising, missing its deadline, answering nonsense -- and every way
a throttled migration can end -- success, policy failure, cancel, a killed
helper -- leaves the guest running (or gone, on success) and uncapped.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from typing import Any, List

import pytest

import pyxl
from pyxl import migrate, sim
from pyxl.loop import default_loop
from pyxl.migrate.converge import ABORT, CONTINUE, STOP, RoundStats, Throttle, target_policy

from conftest import HELPERS

MB = 1 << 20


def busy(sim_dir: str, rate_mb: float, memory: int = 32 * MB) -> int:
    dom = sim.create(memory, dirty_rate=int(rate_mb * MB), sim_dir=sim_dir)
    time.sleep(0.1)
    return dom


def run_both(*ops: Any, timeout: float = 120) -> None:
    assert default_loop().run_until(lambda: all(op.done() for op in ops), timeout)


def running_uncapped(sim_dir: str, dom: int) -> None:
    info = sim.info(dom, sim_dir=sim_dir)
    assert info.state == "running" and info.cpu_cap == 0, info
    assert [i.domid for i in sim.list_domains(sim_dir=sim_dir)] == [dom]
    n = sim.counter(dom, sim_dir=sim_dir)
    time.sleep(0.1)
    assert sim.counter(dom, sim_dir=sim_dir) > n          # it runs
    sim.pause(dom, sim_dir=sim_dir)
    assert sim.check_guest(dom, sim_dir=sim_dir).consistent
    sim.unpause(dom, sim_dir=sim_dir)


def migrate_with(hosts, policy, rate_mb=40.0, **kw):
    a, b = hosts
    dom = busy(a, rate_mb)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, policy=policy,
                         max_bandwidth=60 * MB, **kw)
    return a, b, dom, rx, tx


def test_policy_sees_each_round_and_decides(hosts):
    seen: List[RoundStats] = []

    def policy(s: RoundStats):
        seen.append(s)
        if s.round == 1:
            return Throttle(50)
        return STOP if s.round >= 3 else CONTINUE

    a, b, dom, rx, tx = migrate_with(hosts, policy)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert [s.round for s in seen] == [0, 1, 2, 3]
    assert seen[0].pages_dirty > 0 and seen[0].predicted_downtime is None
    later = seen[2]
    assert later.cap == 50 and later.bandwidth > 0 and later.dirty_rate > 0
    assert later.pages_sent > 0 and later.elapsed > seen[1].elapsed
    assert sent.throttle == 50 and sent.iterations == 4
    assert sim.list_domains(sim_dir=a) == []
    assert sim.info(got.domid, sim_dir=b).cpu_cap == 0        # a cap is not migrated


def _fails_cleanly(hosts, policy, match, rate_mb=40.0, **kw):
    a, b, dom, rx, tx = migrate_with(hosts, policy, rate_mb, **kw)
    run_both(tx, rx)
    exc = tx.exception()
    assert isinstance(exc, pyxl.PrecopyPolicyError), exc
    assert match in str(exc), exc
    assert exc.source_state == "running"
    assert sim.list_domains(sim_dir=b) == []
    running_uncapped(a, dom)
    return exc


def test_policy_that_raises(hosts):
    def policy(s):
        if s.round < 2:
            return Throttle(30) if s.round else CONTINUE
        raise RuntimeError("boom")
    exc = _fails_cleanly(hosts, policy, "raised RuntimeError('boom') at round 2")
    assert isinstance(exc.__cause__, RuntimeError)


@pytest.mark.parametrize("answer", ["stop", 1, None, Throttle(0), Throttle(101), Throttle(True)])
def test_policy_that_answers_nonsense(hosts, answer):
    def policy(s):
        return answer if s.round == 2 else Throttle(40) if s.round else CONTINUE
    _fails_cleanly(hosts, policy, "at round 2")


def test_policy_that_misses_its_deadline(hosts):
    def policy(s):
        if s.round < 2:
            return Throttle(30) if s.round else CONTINUE
        time.sleep(0.3)
        return CONTINUE
    _fails_cleanly(hosts, policy, "over its 0.1s deadline", policy_deadline=0.1)


def test_async_policy_that_never_answers(hosts):
    """An awaitable answer (asyncio) gets the deadline as a loop timer."""
    async def policy(s):
        if s.round < 2:
            return Throttle(30) if s.round else CONTINUE
        await asyncio.sleep(3600)

    from pyxl.loop import AsyncioLoop
    loop = asyncio.new_event_loop()
    try:
        async def main():
            a, b = hosts
            dom = busy(a, 40)
            pl = AsyncioLoop(asyncio.get_running_loop())
            rx = migrate.receive("127.0.0.1:0", sim_dir=b, loop=pl)
            tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, policy=policy,
                                 policy_deadline=0.2, max_bandwidth=60 * MB, loop=pl)
            with pytest.raises(pyxl.PrecopyPolicyError, match="did not answer round 2"):
                await tx
            with pytest.raises(pyxl.OperationError):
                await rx
            return a, dom
        a, dom = loop.run_until_complete(main())
    finally:
        loop.close()
    running_uncapped(a, dom)


def test_policy_abort_is_a_typed_failure(hosts):
    def policy(s):
        return ABORT if s.round == 2 else Throttle(20) if s.round else CONTINUE
    _fails_cleanly(hosts, policy, "aborted the live migration at round 2")


def test_cancel_restores_the_cap(hosts):
    def policy(s):
        return Throttle(25) if s.round == 1 else CONTINUE   # never converges at 60 MB/s

    a, b, dom, rx, tx = migrate_with(hosts, policy, rate_mb=200.0)
    assert default_loop().run_until(lambda: sim.info(dom, sim_dir=a).cpu_cap == 25, 60)
    tx.cancel()
    run_both(tx, rx)
    assert isinstance(tx.exception(), pyxl.Cancelled)
    running_uncapped(a, dom)


def test_killed_helper_restores_the_cap(hosts):
    def policy(s):
        return Throttle(25) if s.round == 1 else CONTINUE

    a, b, dom, rx, tx = migrate_with(hosts, policy, rate_mb=200.0)
    assert default_loop().run_until(lambda: sim.info(dom, sim_dir=a).cpu_cap == 25, 60)
    os.kill(tx.save.helper.pid, signal.SIGKILL)
    run_both(tx, rx)
    assert isinstance(tx.exception(), pyxl.OperationError), tx.exception()
    running_uncapped(a, dom)


def test_policy_needs_pyxls_helper_and_a_capping_backend(hosts):
    a, _ = hosts
    dom = busy(a, 1)
    with pytest.raises(ValueError, match="needs pyxl's helper"):
        migrate.migrate(dom, "127.0.0.1:1", live=True, sim_dir=a, policy=lambda s: STOP,
                        helper=HELPERS["debian"])
    with pytest.raises(ValueError, match="downtime target or a policy"):
        migrate.migrate(dom, "127.0.0.1:1", live=True, sim_dir=a, policy=lambda s: STOP,
                        downtime_ms=20)
    with pytest.raises(ValueError, match="auto_converge needs a downtime target"):
        migrate.migrate(dom, "127.0.0.1:1", live=True, sim_dir=a, auto_converge=True)


def test_auto_converge_throttles_a_fast_guest_and_lifts_the_cap(hosts):
    a, b = hosts
    dom = busy(a, 48, memory=64 * MB)                  # 80 % of the 60 MB/s link
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, downtime_ms=20,
                         auto_converge=True, max_bandwidth=60 * MB)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert 5 <= sent.throttle < 100, sent.throttle
    assert sent.iterations < 15
    assert sim.info(got.domid, sim_dir=b).cpu_cap == 0


def test_auto_converge_leaves_a_slow_guest_alone(hosts):
    a, b = hosts
    dom = busy(a, 3, memory=64 * MB)                   # 5 % of the link
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, downtime_ms=20,
                         auto_converge=True, max_bandwidth=60 * MB)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and sent.throttle == 0


def test_target_policy_rules():
    p = target_policy(20, auto_converge=True)
    s = RoundStats(round=2, pages_sent=10000, pages_dirty=8000, dirty_rate=20000.0,
                   bandwidth=25000.0, predicted_downtime=0.25, elapsed=2.0, cap=0)
    t = p(s)
    assert isinstance(t, Throttle) and 50 <= t.cap < 100    # at most halved per round
    assert p(RoundStats(2, 1, 100, 1000.0, 25000.0, 0.0002, 1.0, 0)) == STOP
    slow = RoundStats(2, 1000, 3000, 2000.0, 25000.0, 0.01 * 3, 1.0, 0)
    assert p(slow) == CONTINUE                              # converges by copying alone
    assert target_policy(20)(s) == CONTINUE                 # no auto-converge: never throttles
    assert target_policy(20, max_rounds=2)(s) == ABORT
    assert target_policy(20, max_rounds=2, on_fail="stop")(s) == STOP


def test_cli_auto_converge(hosts):
    import json
    import subprocess
    from conftest import ROOT
    from test_migrate import PYXL, _cli, _listening
    a, b = hosts
    dom = busy(a, 48, memory=64 * MB)
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b, "--json")
    port = _listening(rx)
    tx = subprocess.run(PYXL + ["migrate", "--live", "--downtime", "20", "--auto-converge",
                                "--max-bandwidth", "60M", "--json", "--sim-dir", a, str(dom),
                                f"127.0.0.1:{port}"], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert sent["digest"] == got["digest"] and 5 <= sent["throttle"] < 100
    bad = subprocess.run(PYXL + ["migrate", "--live", "--auto-converge", "--sim-dir", a, str(dom),
                                 "127.0.0.1:1"], capture_output=True, text=True, timeout=60,
                         cwd=ROOT)
    assert bad.returncode == 2 and "--auto-converge goes with --downtime" in bad.stderr
