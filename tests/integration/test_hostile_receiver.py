"""A migration sender facing a receiver that lies, stalls or is not ours:
real sockets, a real forked peer (as another user where it matters), real
saves of simulated guests.

* Plain TCP on loopback goes only to a receiver of this user's (or root's):
  another local user who holds the port gets no guest, and cannot have the
  source destroyed with a false "status 0".
* Plain TCP off loopback is refused before any connection, unless insecure.
* A status sent before the receiver was cleared is a protocol error (the
  source runs on, with its name); a "failed" then is taken as a failure.
* What a receiver says in words reaches errors, logs and the terminal escaped
  and bounded.
* Whatever ends a migration after "cleared to unpause" (a timeout here) ends
  it in doubt, with the source paused.
* A Remus stream whose receiver stops reading does not keep the source
  suspended past the idle timeout.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import pytest

import pyxl
from pyxl import migrate, sim
from pyxl.errors import MigrationAuthError, MigrationInDoubt, MigrationProtocolError, StartupError
from pyxl.loop import default_loop
from pyxl.migrate.handshake import BANNER, FAILED, GO, READY, REPORT

from conftest import ROOT

MB = 1 << 20
NOBODY = 65534
PYXL = [sys.executable, "-m", "pyxl"]

Script = Callable[[socket.socket], Dict[str, Any]]


def _take_until_go(conn: socket.socket) -> Dict[str, Any]:
    """Read the stream until the sender's GO ends it, or EOF."""
    got, tail = 0, b""
    while True:
        data = conn.recv(1 << 16)
        if not data:
            return {"bytes": got, "go": False}
        got += len(data)
        tail = (tail + data)[-2 * len(GO):]
        if tail.endswith(GO):
            return {"bytes": got, "go": True}


def _fake_receiver(script: Script, uid: Optional[int] = None) -> Tuple[int, int, int]:
    """A receiver on 127.0.0.1 in a forked child (as ``uid``, if given, from
    before it listens: its socket is that user's).  Returns (pid, port, the
    read end its findings come back on)."""
    "warm".encode("idna")
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            srv = socket.create_server(("127.0.0.1", 0))
            os.write(w, struct.pack("=H", srv.getsockname()[1]))
            srv.settimeout(60)
            conn, _ = srv.accept()
            conn.settimeout(60)
            os.write(w, json.dumps(script(conn)).encode())
        finally:
            os._exit(0)
    os.close(w)
    port = struct.unpack("=H", os.read(r, 2))[0]
    return pid, port, r


def _findings(pid: int, r: int) -> Dict[str, Any]:
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    return dict(json.loads(data)) if data else {}


def _migrate(dom: int, port: int, sim_dir: str, **kw: Any) -> Any:
    tx = migrate.migrate(dom, ("127.0.0.1", port), sim_dir=sim_dir, **kw)
    assert default_loop().run_until(tx.done, 60)
    return tx


def _domains(sim_dir: str) -> list:
    return [(d.domid, d.name, d.state) for d in sim.list_domains(sim_dir=sim_dir)]


def test_another_users_receiver_on_loopback_gets_no_guest(hosts):
    """The port was free, another local user listens there (an ssh tunnel that
    failed to bind, say): it would take the guest and say "status 0"."""
    assert os.geteuid() == 0, "the suite runs as root (CI): it can be another user"
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)

    def impostor(conn: socket.socket) -> Dict[str, Any]:
        conn.sendall(BANNER + READY)
        took = _take_until_go(conn)
        if took["go"]:
            conn.sendall(REPORT + b"\0")
        return took

    pid, port, r = _fake_receiver(impostor, uid=NOBODY)
    tx = _migrate(dom, port, a)
    exc = tx.exception()
    assert isinstance(exc, MigrationAuthError), exc
    assert str(exc) == (f"the receiver at 127.0.0.1:{port} is user {NOBODY}'s, not this "
                        "sender's (0) or root's: plain TCP sends a domain only to its own user's "
                        "receiver; use mutual TLS (tls=TlsOptions(...)), ssh (command=\"ssh HOST "
                        "pyxl migrate-receive\"), or insecure=True on a trusted network")
    assert exc.source_state == "running"
    took = _findings(pid, r)
    assert took == {"bytes": 0, "go": False}      # not one byte of the guest
    assert _domains(a) == [(dom, "web1", "running")]


def test_another_users_receiver_is_taken_when_insecure(hosts):
    """``insecure``: the caller says the host's users are trusted."""
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)

    def refuses(conn: socket.socket) -> Dict[str, Any]:
        conn.sendall(BANNER)
        took = _take_until_go(conn)
        return took

    pid, port, r = _fake_receiver(refuses, uid=NOBODY)
    tx = migrate.migrate(dom, ("127.0.0.1", port), sim_dir=a, insecure=True)
    deadline = time.monotonic() + 60
    while tx.stats().bytes in (None, 0) and time.monotonic() < deadline:
        default_loop().run_once(0.05)
    assert tx.stats().bytes            # the stream went to it
    tx.cancel()
    assert default_loop().run_until(tx.done, 60)
    assert isinstance(tx.exception(), pyxl.Cancelled)
    assert _findings(pid, r)["bytes"] > 0
    assert _domains(a) == [(dom, "web1", "running")]


def test_plain_tcp_off_loopback_is_refused_before_any_connection(hosts):
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)
    with pytest.raises(StartupError, match=r"^refusing plain TCP to 192\.0\.2\.1:8002, not a "
                                           r"loopback address: the guest's memory would cross"):
        migrate.migrate(dom, "192.0.2.1:8002", sim_dir=a)
    with pytest.raises(StartupError, match=r"refusing plain TCP to \[2001:db8::1\]:8002"):
        migrate.migrate(dom, "[2001:db8::1]:8002", sim_dir=a)
    with pytest.raises(ValueError, match="insecure is for plain TCP"):
        migrate.migrate(dom, command="true", insecure=True, sim_dir=a)
    assert _domains(a) == [(dom, "web1", "running")]


@pytest.mark.parametrize("after_ready,complaint", [
    (REPORT + b"\0", (MigrationProtocolError,
                      "the receiver spoke before it was cleared to unpause: b'my copy unpause")),
    (FAILED + b"gave up waiting\0", (migrate.MigrationError,
                                     "the receiver failed: gave up waiting")),
])
def test_a_receiver_that_speaks_before_it_is_cleared(hosts, after_ready, complaint):
    """READY and then, before any GO, a status (it cannot know yet that it may
    run the guest) or pyxl's "failed": the source runs on with its name, and
    the receiver is never cleared."""
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)

    def eager(conn: socket.socket) -> Dict[str, Any]:
        conn.sendall(BANNER + READY + after_ready)   # READY is held until the stream ends
        return _take_until_go(conn)

    pid, port, r = _fake_receiver(eager)
    tx = _migrate(dom, port, a)
    kind, text = complaint
    exc = tx.exception()
    assert type(exc) is kind and str(exc).startswith(text), exc
    assert exc.source_state == "running"
    assert _findings(pid, r)["go"] is False
    assert _domains(a) == [(dom, "web1", "running")]


ESCAPES = ("\x1b[1A\x1b[2K\x1b[32mmigrated web1 in 1.2 s\x1b[0m\x1b]0;owned\x07\n"
           "pyxl.migrate.7: ERROR: forged\u2028\u202eevil" + "A" * 3000)


def test_a_receivers_words_reach_the_sender_escaped_and_bounded(hosts, caplog):
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)

    def says(conn: socket.socket) -> Dict[str, Any]:
        conn.sendall(FAILED + ESCAPES.encode() + b"\0")
        return _take_until_go(conn)

    pid, port, r = _fake_receiver(says)
    with caplog.at_level(logging.ERROR, logger="pyxl"):
        tx = _migrate(dom, port, a)
    _findings(pid, r)
    text = str(tx.exception())
    assert text.startswith("the receiver failed: \\x1b[1A\\x1b[2K\\x1b[32mmigrated web1")
    assert text.isprintable() and len(text) < 250
    logged = [rec.getMessage() for rec in caplog.records if "receiver failed" in rec.getMessage()]
    assert logged and all(m.isprintable() for m in logged)
    assert _domains(a) == [(dom, "web1", "running")]

    # the command line: one line, no byte a terminal would act on
    pid, port, r = _fake_receiver(says)
    cli = subprocess.run(PYXL + ["-vv", "migrate", "--sim-dir", a, str(dom), f"127.0.0.1:{port}"],
                         capture_output=True, timeout=120, cwd=ROOT)
    _findings(pid, r)
    assert cli.returncode == 1, cli.stderr
    assert b"\x1b" not in cli.stderr and "\u202e".encode() not in cli.stderr
    assert "\u2028".encode() not in cli.stderr
    last = cli.stderr.decode().splitlines()[-1]
    assert last.startswith("pyxl: error: the receiver failed: \\x1b[1A"), cli.stderr
    assert not any(line.startswith("pyxl.migrate.7: ERROR: forged")
                   for line in cli.stderr.decode().splitlines())


def test_a_timeout_after_the_receiver_was_cleared_leaves_the_migration_in_doubt(hosts):
    """The receiver was cleared and may run the guest: whatever ends the
    migration now leaves the source paused, and says so."""
    a, _ = hosts
    dom = sim.create(32 * MB, name="web1", sim_dir=a)

    def silent_after_go(conn: socket.socket) -> Dict[str, Any]:
        conn.sendall(BANNER + READY)
        took = _take_until_go(conn)
        conn.settimeout(30)
        try:
            conn.recv(1)             # holds its status until the sender gives up
        except OSError:
            pass
        return took

    pid, port, r = _fake_receiver(silent_after_go)
    tx = _migrate(dom, port, a, timeout=4)
    exc = tx.exception()
    assert isinstance(exc, MigrationInDoubt), exc
    assert str(exc) == (f"migration of domain {dom} timed out after 4s after clearing the "
                        f"receiver to unpause: domain {dom} may run there; the source is left "
                        "paused")
    assert isinstance(exc.__cause__, pyxl.Timeout)
    assert exc.source_state == "paused"
    assert _findings(pid, r)["go"] is True
    assert _domains(a) == [(dom, "web1--migratedaway", "paused")]


def test_a_remus_receiver_that_stops_reading_does_not_hold_the_source(hosts):
    """Remus is quiet between checkpoints, so its idle check counts only a
    stream held up by the receiver: one that stops reading in the middle of a
    checkpoint (the source suspended) ends the migration within two idle
    timeouts."""
    a, _ = hosts
    dom = sim.create(64 * MB, name="web1", dirty_rate=16 * MB, sim_dir=a)

    def stops(conn: socket.socket) -> Dict[str, Any]:
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        conn.sendall(BANNER)
        got = 0
        while got < 80 * MB:         # into the first checkpoints
            data = conn.recv(1 << 16)
            if not data:
                return {"bytes": got}
            got += len(data)
        conn.settimeout(40)
        try:
            while conn.recv(1):      # takes nothing more, holds the connection
                time.sleep(30)
        except OSError:
            pass
        return {"bytes": got}

    pid, port, r = _fake_receiver(stops)
    try:
        t = time.monotonic()
        tx = migrate.migrate(dom, ("127.0.0.1", port), sim_dir=a, live=True, remus=True,
                             idle_timeout=2, handshake_timeout=2)
        assert default_loop().run_until(tx.done, 30), "the source stays held"
        took = time.monotonic() - t
    finally:
        os.kill(pid, 9)
        _findings(pid, r)
    exc = tx.exception()
    assert "the stream did not move for 2s" in str(exc), exc
    if isinstance(exc, MigrationInDoubt):     # a checkpoint was complete: the receiver fails over
        assert "failover" in str(exc) and exc.source_state == "paused"
    else:                                     # none was: the source runs on
        assert type(exc) is migrate.MigrationError and exc.source_state == "running"
    assert sim.state(dom, sim_dir=a) == exc.source_state     # not left suspended
    assert took < 20
