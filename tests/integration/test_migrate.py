"""Host-to-host migration between two simulated hosts (two fakexen state dirs).

In-process (sender and receiver on one loop), as separate CLI processes over
TCP and through --command, and across two network namespaces.  A dirtying
guest must arrive byte for byte and running, the source gone; every failure
must leave the source running and the destination empty -- except a lost
status after "cleared to unpause", which leaves the source paused.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from typing import Any, List, Tuple

import pytest

import pyxl
from pyxl import migrate
from pyxl.migrate.handshake import BANNER, READY
from pyxl import sim
from pyxl.backends.sim import SimBackend
from pyxl.loop import default_loop

from conftest import HELPERS, ROOT, SPAWNED

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]


def assert_peer_told(peer: socket.socket, timeout: float = 10) -> None:
    """A raw sender (a non-blocking socket) is told that its receive failed,
    or its connection is closed."""
    got = bytearray()

    def told() -> bool:
        try:
            chunk = peer.recv(4096)
        except BlockingIOError:
            return False
        got.extend(chunk)
        return not chunk or b"domain receive failed: " in got

    assert default_loop().run_until(told, timeout)
    assert b"domain receive failed: " in got, bytes(got)


def busy(sim_dir: str, rate_mb: float = 20, memory: int = 64 * MB) -> int:
    dom = sim.create(memory, dirty_rate=int(rate_mb * MB), sim_dir=sim_dir)
    time.sleep(0.1)
    return dom


def domains(sim_dir: str) -> List[Tuple[int, str]]:
    return [(i.domid, i.state) for i in sim.list_domains(sim_dir=sim_dir)]


def run_both(*ops: Any, timeout: float = 120) -> None:
    assert default_loop().run_until(lambda: all(op.done() for op in ops), timeout)


def assert_runs_intact(sim_dir: str, dom: int, rate_mb: float = 8) -> None:
    """The guest is running, writes on when asked to, and its memory is consistent."""
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    before = sim.counter(dom, sim_dir=sim_dir)
    sim.set_dirty_rate(dom, int(rate_mb * MB), sim_dir=sim_dir)
    time.sleep(0.2)
    sim.pause(dom, sim_dir=sim_dir)
    check = sim.check_guest(dom, sim_dir=sim_dir)
    assert check.consistent, check
    assert check.pages_written > before
    sim.unpause(dom, sim_dir=sim_dir)


def source_survived(sim_dir: str, dom: int) -> None:
    assert domains(sim_dir) == [(dom, "running")]
    assert_runs_intact(sim_dir, dom)


# ---------------------------------------------------------------------------
# Success


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_live_migration_in_process(hosts, helper):
    a, b = hosts
    dom = busy(a, 40)
    gaps: List[float] = []
    last = [time.monotonic()]

    def tick() -> None:   # the loop must keep turning throughout
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
        if not (tx.done() and rx.done()):
            default_loop().call_later(0.005, tick)

    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True, helper=HELPERS[helper])
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         helper=HELPERS[helper])
    default_loop().call_later(0, tick)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and re.fullmatch(r"[0-9a-f]{64}", sent.digest)
    assert 1 <= sent.iterations <= 5 and sent.bytes_sent > 64 * MB
    assert sent.downtime is not None and 0 < sent.downtime < sent.duration
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]
    # the result's config names the domain as it is called now, not NAME--incoming
    name = sim.info(got.domid, sim_dir=b).name
    assert "--" not in name and got.restore.config["c_info"]["name"] == name
    assert max(gaps) < 1.0, max(gaps)
    assert_runs_intact(b, got.domid)


def test_nonlive_migration(hosts):
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive(("127.0.0.1", 0), sim_dir=b, digest=True)
    tx = migrate.migrate(dom, f"127.0.0.1:{rx.address[1]}", sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and sent.iterations == 0
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]


def test_receive_paused(hosts):
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, paused=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert domains(b) == [(got.domid, "paused")] and got.paused
    assert sim.digest(got.domid, sim_dir=b) == sent.digest


def test_bandwidth_cap_paces_the_stream(hosts):
    a, b = hosts
    dom = busy(a, 2, memory=32 * MB)
    cap = 40 * MB
    gaps: List[float] = []
    last = [time.monotonic()]

    def tick() -> None:
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
        if not tx.done():
            default_loop().call_later(0.005, tick)

    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, max_bandwidth=cap)
    default_loop().call_later(0, tick)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    rate = sent.bytes_sent / sent.duration
    assert 0.5 * cap < rate <= 1.1 * cap, rate / MB
    assert max(gaps) < 0.5, max(gaps)


def test_downtime_policy_migration(hosts):
    a, b = hosts
    dom = busy(a, 30)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         downtime_ms=20, max_bandwidth=150 * MB)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]


# ---------------------------------------------------------------------------
# CLI, separate processes


def _cli(*args: str, **kw: Any) -> "subprocess.Popen[str]":
    proc = subprocess.Popen(PYXL + list(args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT, **kw)
    SPAWNED.append(proc)      # killed after the test if it is still running
    return proc


def _listening(proc: "subprocess.Popen[str]") -> int:
    assert proc.stderr is not None
    line = proc.stderr.readline()
    m = re.match(r"listening on .*:(\d+)$", line.strip())
    assert m, line
    return int(m.group(1))


def test_cli_over_tcp(hosts):
    a, b = hosts
    dom = busy(a, 30)
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b, "--json")
    port = _listening(rx)
    tx = subprocess.run(PYXL + ["migrate", "--live", "--json", "--sim-dir", a, str(dom),
                                f"127.0.0.1:{port}"], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert set(sent) == {"name", "memory", "domid", "digest", "downtime_ms", "iterations",
                         "bytes_sent", "seconds"}
    assert set(got) == {"name", "memory", "domid", "digest", "seconds"}
    assert sent["digest"] == got["digest"] and sent["domid"] == dom
    assert sent["downtime_ms"] > 0 and 1 <= sent["iterations"] <= 5
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]
    assert_runs_intact(b, got["domid"])


def test_cli_through_a_command(hosts):
    a, b = hosts
    dom = busy(a, 30)
    receiver = " ".join(PYXL + ["migrate-receive", "--sim-dir", b, "--json"])
    tx = subprocess.run(PYXL + ["migrate", "--live", "--downtime", "50", "--json", "--sim-dir",
                                a, "--command", receiver, str(dom)],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    sent = json.loads(tx.stdout)
    # The receiver's JSON went to its stderr (its stdout is the channel), i.e. ours.
    got = json.loads([ln for ln in tx.stderr.splitlines() if ln.startswith("{")][-1])
    assert sent["digest"] == got["digest"]
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]


@pytest.mark.parametrize("command,ended", [
    ("exit 3", "the receiving command exited with status 3"),
    ("kill -KILL $$", "the receiving command was killed by SIGKILL"),
    ("{receiver} --sim-dir /dev/null", "the receiving command exited with status 2"),
])
def test_a_failed_command_says_how_it_ended(hosts, command, ended):
    """ssh's 255, a receiver's own exit status: the sender's error says how the
    command ended, the one clue a user has to which side failed."""
    a, b = hosts
    dom = busy(a, 5)
    receiver = " ".join(PYXL + ["migrate-receive", "--sim-dir", b, "--paused"])
    tx = subprocess.run(PYXL + ["migrate", "--sim-dir", a, "--command",
                                command.format(receiver=receiver), str(dom)],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tx.returncode == 1, tx.stderr
    assert tx.stderr.splitlines()[-1].startswith("pyxl: error: ")
    assert tx.stderr.splitlines()[-1].endswith(f"({ended})"), tx.stderr
    source_survived(a, dom)
    assert domains(b) == []


@pytest.mark.parametrize("opts,target,complaint", [
    ([], [], "give HOST:PORT or --command CMD"),
    (["--command", "true"], ["127.0.0.1:1"], "give HOST:PORT or --command CMD"),
    (["--downtime", "5"], ["127.0.0.1:1"], "--downtime needs --live"),
    (["--live", "--on-fail", "stop"], ["127.0.0.1:1"], "go with --downtime"),
    (["--live"], ["127.0.0.1:0"], "port out of range"),
    (["--live"], ["localhost"], "expected HOST:PORT"),
    (["--live", "--max-bandwidth", "0"], ["127.0.0.1:1"], "must be positive"),
    (["--live", "--downtime", "0"], ["127.0.0.1:1"], "must be from 0.001"),
    (["--insecure", "--command", "true"], [], "--insecure is for plain TCP to HOST:PORT"),
])
def test_cli_usage_errors(hosts, opts, target, complaint):
    done = subprocess.run(PYXL + ["migrate", "--sim-dir", hosts[0]] + opts + ["1"] + target,
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and complaint in done.stderr, done.stderr


def test_cli_unknown_domain_and_refused_connection(hosts):
    a, _ = hosts
    done = subprocess.run(PYXL + ["migrate", "--sim-dir", a, "7", "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "no such domain: 7" in done.stderr
    dom = busy(a, 4)
    done = subprocess.run(PYXL + ["migrate", "--live", "--sim-dir", a, str(dom), "127.0.0.1:1"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 1 and "cannot connect to the receiver" in done.stderr
    source_survived(a, dom)


# ---------------------------------------------------------------------------
# Two network namespaces


@pytest.fixture
def netns():
    """Two namespaces joined by a veth pair: yields (sender ns, receiver ns, receiver addr)."""
    tag = f"{os.getpid() % 100000}"
    ns = (f"pyxl-a{tag}", f"pyxl-b{tag}")
    veth = (f"pxa{tag}", f"pxb{tag}")
    made: List[str] = []

    def ip(*args: str) -> None:
        subprocess.run(["ip"] + list(args), check=True, capture_output=True, timeout=30)

    try:
        for n in ns:
            ip("netns", "add", n)
            made.append(n)
    except (OSError, subprocess.CalledProcessError) as exc:
        for n in made:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)
        pytest.skip(f"ip netns add failed: {getattr(exc, 'stderr', exc)!r}")
    try:
        ip("link", "add", veth[0], "netns", ns[0], "type", "veth", "peer", "name", veth[1],
           "netns", ns[1])
        for n, v, addr in zip(ns, veth, ("10.213.0.1/24", "10.213.0.2/24")):
            ip("-n", n, "addr", "add", addr, "dev", v)
            ip("-n", n, "link", "set", v, "up")
            ip("-n", n, "link", "set", "lo", "up")
        yield ns[0], ns[1], "10.213.0.2"
    finally:
        for n in ns:
            subprocess.run(["ip", "netns", "del", n], capture_output=True)


def test_migration_between_network_namespaces(hosts, netns):
    a, b = hosts
    ns_a, ns_b, addr = netns
    dom = busy(a, 30)
    # plain TCP off loopback: --insecure (test_migrate_tls.py covers the refusal)
    rx = _cli_ns(ns_b, "migrate-receive", "--listen", f"{addr}:0", "--insecure", "--sim-dir", b,
                 "--json")
    port = _listening(rx)
    # the sender refuses plain TCP off loopback as well, before it connects
    refused = subprocess.run(["ip", "netns", "exec", ns_a] + PYXL +
                             ["migrate", "--live", "--sim-dir", a, str(dom), f"{addr}:{port}"],
                             capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert refused.returncode == 2, refused.stderr
    assert refused.stderr == (f"pyxl: error: refusing plain TCP to {addr}:{port}, not a loopback "
                              "address: the guest's memory would cross the network unencrypted, "
                              "to whoever answers; use mutual TLS (--tls-cert/--tls-key/--tls-ca)"
                              ", ssh (--command \"ssh HOST pyxl migrate-receive\"), or --insecure "
                              "on a trusted network\n")
    assert domains(a) == [(dom, "running")]
    tx = subprocess.run(["ip", "netns", "exec", ns_a] + PYXL +
                        ["migrate", "--live", "--insecure", "--json", "--sim-dir", a, str(dom),
                         f"{addr}:{port}"], capture_output=True, text=True, timeout=120,
                        cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert sent["digest"] == got["digest"]
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]
    assert_runs_intact(b, got["domid"])


def _cli_ns(ns: str, *args: str) -> "subprocess.Popen[str]":
    return subprocess.Popen(["ip", "netns", "exec", ns] + PYXL + list(args),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


def test_killed_receiver_across_namespaces_leaves_source_running(hosts, netns):
    a, b = hosts
    ns_a, ns_b, addr = netns
    dom = busy(a, 20)
    rx = _cli_ns(ns_b, "migrate-receive", "--listen", f"{addr}:0", "--insecure", "--sim-dir",
                 b)
    port = _listening(rx)
    tx = subprocess.Popen(["ip", "netns", "exec", ns_a] + PYXL +
                          ["migrate", "--live", "--insecure", "--max-bandwidth", "20M",
                           "--sim-dir", a, str(dom), f"{addr}:{port}"], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(1.0)
    rx.kill()
    rx.wait()
    _, err = tx.communicate(timeout=60)
    assert tx.returncode == 1, err
    assert "the receiver closed the connection" in err or "failed" in err, err
    source_survived(a, dom)


# ---------------------------------------------------------------------------
# Failures


def _slow_migration(a: str, b: str, dom: int):
    """A receiver subprocess and an in-process capped sender, ~3 s of stream."""
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b)
    port = _listening(rx)
    tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a, max_bandwidth=24 * MB)
    return rx, tx


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM])
def test_killed_receiver_leaves_source_running(hosts, sig):
    a, b = hosts
    dom = busy(a, 20)
    rx, tx = _slow_migration(a, b, dom)
    default_loop().call_later(1.0, lambda: rx.send_signal(sig))
    run_both(tx)
    rx.wait(timeout=30)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError) and not isinstance(
        exc, migrate.MigrationInDoubt), exc
    assert exc.source_state == "running"
    source_survived(a, dom)
    if sig == signal.SIGTERM:
        # A receiver that could clean up did: no half-made domain.
        assert rx.returncode == 143
        assert domains(b) == []


def test_killed_sender_leaves_no_domain_at_the_receiver(hosts):
    a, b = hosts
    dom = busy(a, 20)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = _cli("migrate", "--live", "--max-bandwidth", "24M", "--sim-dir", a, str(dom),
              f"127.0.0.1:{rx.address[1]}")
    # Kill the sender once its stream is flowing: killed before it even connected
    # (a slow start on a loaded machine), it would leave a receiver listening with no
    # deadline, which is another test's matter.
    assert default_loop().run_until(lambda: rx.state == "stream", 60), rx.state
    default_loop().call_later(0.5, tx.kill)
    run_both(rx)
    tx.wait(timeout=30)
    assert isinstance(rx.exception(), pyxl.OperationError), rx.exception()
    assert domains(b) == []


def test_failed_restore_is_reported_to_the_sender(hosts):
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, helper="/bin/false")
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert isinstance(rx.exception(), pyxl.HelperExited)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert "the receiver failed: " in str(exc) and "exited with error status 1" in str(exc)
    assert domains(b) == []
    source_survived(a, dom)


def test_not_a_receiver(hosts):
    a, _ = hosts
    dom = busy(a, 8)
    srv = socket.create_server(("127.0.0.1", 0))
    tx = migrate.migrate(dom, srv.getsockname(), live=True, sim_dir=a)
    conn, _ = srv.accept()
    conn.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"x" * 64)
    run_both(tx)
    conn.close()
    srv.close()
    assert "not a migration receiver" in str(tx.exception())
    source_survived(a, dom)


def test_silent_peer_times_out_the_handshake(hosts):
    a, _ = hosts
    dom = busy(a, 8)
    srv = socket.create_server(("127.0.0.1", 0))
    tx = migrate.migrate(dom, srv.getsockname(), live=True, sim_dir=a, handshake_timeout=0.5)
    run_both(tx)
    srv.close()
    assert "no migration receiver answered" in str(tx.exception())
    source_survived(a, dom)


def test_precopy_abort_during_migration(hosts):
    a, b = hosts
    dom = busy(a, 400)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, downtime_ms=0.001,
                         max_iterations=3)
    run_both(tx, rx)
    assert isinstance(tx.exception(), pyxl.PrecopyAborted), tx.exception()
    # The receiver says the sender stopped, not libxc's view of a short stream.
    msg = str(rx.exception())
    assert "the sender closed the stream after" in msg and "before its end" in msg, msg
    assert "Restore failed" not in msg
    assert domains(b) == []
    source_survived(a, dom)


def test_lost_status_after_go_leaves_source_paused(hosts):
    """The receiver's reply channel dies right after "ready": the sender clears
    it to unpause, gets no status, and keeps its copy paused (never two running)."""
    a, b = hosts
    dom = busy(a, 8)
    n = len(BANNER) + len(READY)
    receiver = " ".join(PYXL + ["migrate-receive", "--sim-dir", b]) + f" | dd bs=1 count={n} status=none"
    tx = migrate.migrate(dom, command=receiver, live=True, sim_dir=a)
    run_both(tx)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationInDoubt), exc
    assert exc.source_state == "paused" and domains(a) == [(dom, "paused")]
    assert sim.info(dom, sim_dir=a).name.endswith("--migratedaway")   # as xl leaves it
    deadline = time.monotonic() + 30
    while not domains(b) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [s for _, s in domains(b)] == ["running"]   # it did unpause: in doubt indeed


def test_cancel_before_go(hosts):
    a, b = hosts
    dom = busy(a, 20)
    rx, tx = _slow_migration(a, b, dom)
    default_loop().call_later(0.8, tx.cancel)
    run_both(tx)
    rx.wait(timeout=30)
    assert isinstance(tx.exception(), pyxl.Cancelled)
    source_survived(a, dom)
    assert domains(b) == []


def test_receiver_timeout_without_sender(hosts):
    _, b = hosts
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, timeout=0.3)
    run_both(rx)
    assert isinstance(rx.exception(), pyxl.Timeout)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", rx.address[1]), timeout=1).close()


def test_a_given_listening_socket_stays_the_callers(hosts):
    """pyxl never closes an fd it was given: a listening socket passed to
    receive() stays open, in the blocking mode it had, after a cancelled
    receive and after a migration; one pyxl made from an address is closed."""
    a, b = hosts
    with socket.create_server(("127.0.0.1", 0)) as srv:
        assert srv.getblocking()
        rx = migrate.receive(srv, sim_dir=b)
        assert not srv.getblocking()       # pyxl's, while it listens
        rx.cancel()
        run_both(rx)
        assert isinstance(rx.exception(), pyxl.Cancelled)
        assert srv.fileno() >= 0 and srv.getblocking()
        dom = sim.create(32 * MB, sim_dir=a)
        srv.settimeout(7.5)
        rx = migrate.receive(srv, sim_dir=b)
        tx = migrate.migrate(dom, srv.getsockname(), sim_dir=a)
        pyxl.wait(tx, rx)
        assert srv.fileno() >= 0 and srv.gettimeout() == 7.5
        # still a listening socket the caller can use
        with socket.create_connection(srv.getsockname(), timeout=5):
            srv.accept()[0].close()
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    port = rx.address[1]
    rx.cancel()
    run_both(rx)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# ---------------------------------------------------------------------------
# The restore side's trailer read never blocks the loop


def test_restore_reads_a_late_trailer_without_blocking(hosts, tmp_path):
    a, b = hosts
    dom = sim.create(8 * MB, sim_dir=a, paused=True)
    pyxl.wait(pyxl.save(dom, tmp_path / "g", leave="paused", sim_dir=a))
    data = (tmp_path / "g").read_bytes()
    assert data.endswith(b"\0" * 8)   # libxl END
    left, right = socket.socketpair()
    # All but END from another process; END (and more) 0.5 s after that.
    feeder = subprocess.Popen(["head", "-c", str(len(data) - 8), str(tmp_path / "g")],
                              stdout=right.fileno())
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not op.done():
            default_loop().call_later(0.01, tick)

    def send_end() -> None:
        if feeder.poll() is None:
            default_loop().call_later(0.05, send_end)
        else:
            default_loop().call_later(0.5, lambda: right.sendall(data[-8:] + b"handshake"))

    op = pyxl.restore(left.fileno(), paused=True, sim_dir=b)
    default_loop().call_later(0, tick)
    send_end()
    res = pyxl.wait(op, timeout=60)[0]
    assert feeder.wait() == 0
    assert sim.digest(res.domid, sim_dir=b) == sim.digest(dom, sim_dir=a)
    assert len(ticks) > 20 and max(y - x for x, y in zip(ticks, ticks[1:])) < 0.3
    assert left.recv(100) == b"handshake"   # nothing read past END
    left.close()
    right.close()


def test_migration_under_asyncio(hosts):
    """Both ends on an asyncio loop, awaited; a coroutine keeps ticking meanwhile."""
    import asyncio

    a, b = hosts
    dom = busy(a, 20)

    async def main() -> Tuple[Any, Any, int]:
        loop = pyxl.AsyncioLoop(asyncio.get_running_loop())
        rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True, loop=loop)
        tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, loop=loop,
                             max_bandwidth=200 * MB)
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        sent, got = await asyncio.gather(tx, rx)
        t.cancel()
        return sent, got, ticks

    sent, got, ticks = asyncio.run(main())
    assert sent.digest == got.digest and ticks > 10
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]


# ---------------------------------------------------------------------------
# Names: xl's NAME--incoming / NAME--migratedaway, so both copies fit on one host


class _Watching(SimBackend):
    """The receiver's real sim backend, noting both hosts' names as it unpauses
    (and failing that unpause on request: the receiver then reports status 1)."""

    def __init__(self, sim_dir: str, source_dir: str, fail: bool = False) -> None:
        super().__init__(sim_dir)
        self.source_dir, self.fail = source_dir, fail
        self.seen: List[Tuple[List[str], List[str]]] = []

    def start_unpause(self, loop: Any, domid: int, done: Any) -> Any:
        self.seen.append(([i.name for i in sim.list_domains(sim_dir=self.source_dir)],
                          [i.name for i in sim.list_domains(sim_dir=self.sim_dir)]))
        if self.fail:
            raise OSError("injected: the copy would not start")
        return super().start_unpause(loop, domid, done)


def test_names_during_and_after_a_migration(hosts):
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=4 * MB, name="web1", sim_dir=a)
    seen = _Watching(b, a)
    rx = migrate.receive("127.0.0.1:0", backend=seen)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    _, got = pyxl.wait(tx, rx, timeout=120)
    # cleared to run: the source is away, the copy has the name back
    assert seen.seen == [(["web1--migratedaway"], ["web1"])]
    assert [(i.name, i.state) for i in sim.list_domains(sim_dir=b)] == [("web1", "running")]
    assert sim.config(got.domid, sim_dir=b)["c_info"]["name"] == "web1"
    assert domains(a) == []


def test_failed_start_at_the_receiver_gives_the_source_its_name_back(hosts):
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=4 * MB, name="web2", sim_dir=a)
    rx = migrate.receive("127.0.0.1:0", backend=_Watching(b, a, fail=True))
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert isinstance(tx.exception(), migrate.MigrationError), tx.exception()
    assert "status 1" in str(tx.exception())
    assert isinstance(rx.exception(), migrate.MigrationError), rx.exception()
    assert [i.name for i in sim.list_domains(sim_dir=a)] == ["web2"]
    source_survived(a, dom)
    assert domains(b) == []


class _SlowDestroy(_Watching):
    """A backend whose destroys take 0.4 s of the loop's time (a child's sleep,
    as a domain's hotplug scripts would), and whose waited-for ``destroy`` must
    not be called: from a loop callback it would block the loop that long."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.destroyed: List[int] = []

    def destroy(self, domid: int) -> None:
        raise AssertionError(f"destroy({domid}) waited for, on the loop")

    def start_destroy(self, loop: Any, domid: int, done: Any) -> Any:
        from pyxl.childproc import ShortChild

        def slept(status: int, err: str) -> None:
            self.destroyed.append(domid)
            super(_SlowDestroy, self).start_destroy(loop, domid, done)
        return ShortChild(loop, ["sleep", "0.4"], slept)


def _ticking(loop: Any, period: float = 0.02) -> List[float]:
    """Timestamps of a timer that asks to run every ``period`` on ``loop``."""
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        loop.call_later(period, tick)
    loop.call_later(0, tick)
    return ticks


@pytest.mark.parametrize("fail", [False, True], ids=["migrated", "copy-would-not-start"])
def test_a_migration_destroys_its_domain_without_blocking_the_loop(hosts, fail):
    """The source after a migration, the receiver's copy when it would not start:
    each goes through ``start_destroy``, and the operation is done only once the
    domain is gone.  A timer on the loop runs on meanwhile."""
    a, b = hosts
    dom = sim.create(32 * MB, name="web3", sim_dir=a)
    source, target = _SlowDestroy(a, a), _SlowDestroy(b, a, fail=fail)
    rx = migrate.receive("127.0.0.1:0", backend=target)
    tx = migrate.migrate(dom, rx.address, backend=source)
    ticks = _ticking(default_loop())
    run_both(tx, rx)
    gaps = [t1 - t0 for t0, t1 in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.3, f"the loop was held for {max(gaps):.3f} s"
    if fail:
        assert isinstance(rx.exception(), migrate.MigrationError), rx.exception()
        assert len(target.destroyed) == 1 and source.destroyed == []
        assert domains(b) == []        # gone when the receiver said it was done
        source_survived(a, dom)
    else:
        assert tx.exception() is None and rx.exception() is None
        assert source.destroyed == [dom] and target.destroyed == []
        assert domains(a) == []        # gone when the sender said it was done
        assert [state for _, state in domains(b)] == ["running"]


class _SlowRename(_Watching):
    """A backend whose renames take 0.4 s (a child's sleep, as a busy
    xenstored's answers would) and are told from the loop; a migration must
    never wait for its ``rename``, not even on a failure's way back."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.renamed: List[str] = []
        self.on_start: Any = None

    def rename(self, domid: int, name: str) -> None:
        raise AssertionError(f"rename({domid}, {name!r}) waited for, on the loop")

    def start_rename(self, loop: Any, domid: int, name: str, done: Any) -> Any:
        from pyxl.childproc import ShortChild

        def slept(status: int, err: str) -> None:
            self.renamed.append(name)
            super(_SlowRename, self).rename(domid, name)
            done(True, "")
        if self.on_start is not None:
            loop.call_later(0, self.on_start)
        return ShortChild(loop, ["sleep", "0.4"], slept)


def test_a_migrations_renames_run_on_the_loop(hosts):
    """The source's NAME--migratedaway and the copy's NAME go through
    ``start_rename``; the application's timer runs on meanwhile."""
    a, b = hosts
    dom = sim.create(32 * MB, name="web4", sim_dir=a)
    source, target = _SlowRename(a, a), _SlowRename(b, a)
    rx = migrate.receive("127.0.0.1:0", backend=target)
    tx = migrate.migrate(dom, rx.address, backend=source)
    ticks = _ticking(default_loop())
    run_both(tx, rx)
    assert tx.exception() is None and rx.exception() is None
    gaps = [t1 - t0 for t0, t1 in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.3, f"the loop was held for {max(gaps):.3f} s"
    assert source.renamed == ["web4--migratedaway"] and target.renamed == ["web4"]
    assert [(i.name, i.state) for i in sim.list_domains(sim_dir=b)] == [("web4", "running")]
    assert domains(a) == []


def test_a_migration_cancelled_while_its_source_is_renamed_gives_the_name_back(hosts):
    """Cancelled while the rename to NAME--migratedaway is under way: the
    teardown waits for the rename to end, renames the source back (on the
    loop too), and it runs on with its name; the receiver has nothing."""
    a, b = hosts
    dom = sim.create(32 * MB, name="web5", sim_dir=a)
    source = _SlowRename(a, a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, backend=source)
    source.on_start = tx.cancel
    run_both(tx, rx)
    assert isinstance(tx.exception(), pyxl.Cancelled), tx.exception()
    assert source.renamed == ["web5--migratedaway", "web5"]
    assert [(i.name, i.state) for i in sim.list_domains(sim_dir=a)] == [("web5", "running")]
    source_survived(a, dom)
    assert rx.exception() is not None and domains(b) == []


def test_a_failed_start_at_the_receiver_renames_the_source_back_on_the_loop(hosts):
    """The receiver reports status 1: the source gets its name back through
    ``start_rename`` (0.4 s here) and runs on; the error stays the receiver's."""
    a, b = hosts
    dom = sim.create(32 * MB, name="web6", sim_dir=a)
    source = _SlowRename(a, a)
    rx = migrate.receive("127.0.0.1:0", backend=_Watching(b, a, fail=True))
    tx = migrate.migrate(dom, rx.address, backend=source)
    ticks = _ticking(default_loop())
    run_both(tx, rx)
    assert isinstance(tx.exception(), migrate.MigrationError), tx.exception()
    assert "could not start its copy (status 1)" in str(tx.exception())
    assert source.renamed == ["web6--migratedaway", "web6"]
    assert max(t1 - t0 for t0, t1 in zip(ticks, ticks[1:])) < 0.2
    assert [(i.name, i.state) for i in sim.list_domains(sim_dir=a)] == [("web6", "running")]
    source_survived(a, dom)
    assert domains(b) == []


def test_migration_within_one_host(hosts):
    a, _ = hosts
    dom = sim.create(32 * MB, dirty_rate=4 * MB, name="local1", sim_dir=a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=a, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert [(i.domid, i.name, i.state) for i in sim.list_domains(sim_dir=a)] == [
        (got.domid, "local1", "running")]
    assert_runs_intact(a, got.domid)


def test_sim_rename_api_and_cli(hosts):
    a, _ = hosts
    dom = sim.create(16 * MB, name="x" * 63, sim_dir=a, paused=True)
    with pytest.raises(sim.SimError, match="is 70 bytes of UTF-8"):   # refused, not cut
        sim.rename(dom, "y" * 70, sim_dir=a)
    assert sim.info(dom, sim_dir=a).name == "x" * 63
    with pytest.raises(ValueError):
        sim.rename(dom, "", sim_dir=a)
    done = subprocess.run(PYXL + ["sim", "rename", "--sim-dir", a, str(dom), "db2"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sim.info(dom, sim_dir=a).name == "db2"
    assert sim.config(dom, sim_dir=a)["c_info"]["name"] == "db2"
    done = subprocess.run(PYXL + ["sim", "rename", "--sim-dir", a, "999", "z"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "999" in done.stderr
