"""A listening receiver's door under attack: real sockets, real processes.

* A flood of silent connections (another process, 200 a second, each held
  0.5 s) must not keep a real TLS sender out: the receiver drops the least
  advanced connection of the busiest source, and silent ones are the least.
* Plain TCP on loopback takes only the receiver's own user's connections:
  another uid (a forked child that setuid()s to nobody; the suite runs as
  root, as in CI) is told "not authorized" before any banner, the refusal is
  logged, and the receiver's own user then migrates through it.
* A trickle (a byte every 0.2 s) is idle: cut at idle_timeout.
* A compression offer whose xl header names no domain is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import pytest

import pyxl
from pyxl import migrate, sim
from pyxl.errors import MigrationAuthError
from pyxl.loop import default_loop
from pyxl.migrate.handshake import BANNER
from pyxl.migrate.tlsstage import CLOSED_EARLY

from test_migrate import busy, domains, source_survived
from test_receiver_told import _told as _told_peer
from test_migrate_tls import (SENDER, _stages, opts, pki, real_migration,  # noqa: F401  (pki)
                              receiver)

FLOOD = """
import collections, socket, sys, time
port, rate, first, hold = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3], float(sys.argv[4])
held = collections.deque()
n, t0 = 0, time.monotonic()
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), 1)
        if first:
            s.send(bytes.fromhex(first))     # its first bytes, then silence
        held.append((time.monotonic(), s))
        n += 1
    except OSError:
        time.sleep(0.05)
    while held and held[0][0] < time.monotonic() - hold:
        held.popleft()[1].close()
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
"""


@pytest.fixture
def flood() -> Iterator[Any]:
    procs = []

    def start(port: int, rate: float = 200, first: bytes = b"",
              hold: float = 0.5) -> "subprocess.Popen[bytes]":
        """Peers at ``rate``/s that send ``first`` (silent if empty), then
        nothing, each held open ``hold`` s."""
        procs.append(subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(rate),
                                       first.hex(), str(hold)]))
        return procs[-1]

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def test_a_silent_flood_does_not_keep_a_tls_sender_out(hosts, pki, flood):  # noqa: F811
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b, header_timeout=10)
    flood(rx.address[1])
    # the flood is under way: the door has been full and dropping for a while
    assert default_loop().run_until(lambda: rx.refused >= 100, 60), rx.refused
    real_migration(pki, a, b, dom, rx)


MB = 1 << 20
NOBODY = 65534


def _connect_as(uid: int, port: int) -> Tuple[int, int]:
    """A child that becomes ``uid``, connects, and writes what it was told
    (until EOF) to a pipe: (pid, read end)."""
    "warm".encode("idna")          # connect() encodes the host: no import after setuid
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            s = socket.socket()
            s.settimeout(30)
            s.connect(("127.0.0.1", port))
            got = b""
            while len(got) < 4096:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
            os.write(w, got)
        finally:
            os._exit(0)
    os.close(w)
    return pid, r


def _told(pid: int, r: int) -> bytes:
    os.waitpid(pid, 0)
    with os.fdopen(r, "rb") as f:
        return f.read()


def test_plain_loopback_refuses_another_users_connection(hosts, caplog):
    assert os.geteuid() == 0, "the suite runs as root (CI): it can be another user"
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    with caplog.at_level(logging.WARNING, logger="pyxl.migrate.receive"):
        pid, r = _connect_as(NOBODY, rx.address[1])
        assert default_loop().run_until(lambda: rx.refused >= 1 or rx.done(), 60)
        told = _told(pid, r)
    assert told == b"domain receive failed: not authorized\0", told
    assert not rx.done() and domains(b) == []
    logged = [m for m in caplog.messages if "dropped the connection" in m]
    assert len(logged) == 1 and f"user {NOBODY}'s, not this receiver's (0)" in logged[0], logged
    assert "\n" not in logged[0]
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)   # root: ours
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and domains(b) == [(got.domid, "running")]


def test_another_users_connection_closed_before_the_accept_is_refused(hosts, tmp_path, caplog):
    """Another user corks a connect, a stream head and a close into one go:
    its socket is TIME_WAIT before the receiver accepts, and the kernel then
    reports uid 0 for it, root's.  It must not pass for the receiver's own
    user (it did: the receiver built NAME--incoming from its bytes)."""
    assert os.geteuid() == 0, "the suite runs as root (CI): it can be another user"
    a, b = hosts
    dom = busy(a, 8)
    image = tmp_path / "g.save"
    pyxl.wait(pyxl.save(sim.create(1 << 20, sim_dir=a, paused=True), image, sim_dir=a))
    head = image.read_bytes()[:3000]
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    "warm".encode("idna")          # connect() encodes the host: no import after setuid
    with caplog.at_level(logging.WARNING, logger="pyxl.migrate.receive"):
        for _ in range(3):
            pid = os.fork()
            if pid == 0:
                try:
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    s = socket.socket()
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                    s.connect(("127.0.0.1", rx.address[1]))
                    s.sendall(head)
                    s.close()          # the data and the FIN go out together
                finally:
                    os._exit(0)
            assert os.waitpid(pid, 0)[1] == 0
        assert default_loop().run_until(lambda: rx.refused >= 3 or rx.done(), 60)
    assert not rx.done(), rx.exception()
    assert rx.refused == 3 and domains(b) == []
    logged = [m for m in caplog.messages if "dropped the connection" in m]
    assert len(logged) == 3 and all("cannot tell which user opened the connection (its socket "
                                    "is closed already" in m for m in logged), logged
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)   # root: ours
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and domains(b) == [(got.domid, "running")]


def test_insecure_loopback_takes_any_users_connection(hosts):
    _, b = hosts
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, insecure=True, header_timeout=1)
    pid, r = _connect_as(NOBODY, rx.address[1])
    assert default_loop().run_until(lambda: rx.refused >= 1, 60)    # at header_timeout
    assert _told(pid, r).startswith(b"xl migration receiver ready")
    rx.cancel()
    assert default_loop().run_until(rx.done, 30)


TRICKLE = """
import socket, sys, time
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
s.sendall(open(sys.argv[2], "rb").read()[:(1 << 20) + 4096])
for _ in range(60):          # then a byte every 0.2 s: the stream "moves"
    time.sleep(0.2)
    try:
        s.send(b"\\0")
    except OSError:
        break
"""


def test_a_trickle_is_idle_at_the_receiver(hosts, tmp_path):
    """A sender that moves a byte now and then (under 64 KiB per idle_timeout)
    is cut at idle_timeout, and the half-made domain is destroyed."""
    a, b = hosts
    dom = sim.create(16 * MB, sim_dir=a, paused=True)
    pyxl.wait(pyxl.save(dom, tmp_path / "g.save", sim_dir=a))
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, idle_timeout=1)
    peer = subprocess.Popen([sys.executable, "-c", TRICKLE, str(rx.address[1]),
                             str(tmp_path / "g.save")])
    try:
        t = time.monotonic()
        assert default_loop().run_until(rx.done, 60)
        took = time.monotonic() - t
    finally:
        peer.kill()
        peer.wait(timeout=30)
    assert "the sender sent under 64 KiB in 1s" in str(rx.exception()), rx.exception()
    assert took < 5, took          # not the trickle's 12 s
    assert domains(b) == []


OFFER = """
import socket, struct, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=30)
banner = b""
while not banner.endswith(b"\\n"):
    banner += s.recv(100)
magic = b"Xen saved domain, xl format\\n \\0 \\r"
# an outer xl header that offers zstd (pyxl's optional flag) and carries no config
s.sendall(struct.pack("=32sIIII", magic, 0x01020304, 2, 1 << 31, 4) + struct.pack("=I", 0))
told = b""
while True:
    chunk = s.recv(4096)
    if not chunk:
        break
    told += chunk
sys.stdout.buffer.write(told)
"""


def test_a_compression_offer_without_a_name_is_refused(hosts):
    """The copy is named from the offer's outer header (NAME--incoming until
    cleared): an outer header without a name is refused before anything is
    restored, rather than restoring the inner header's name as final."""
    _, b = hosts
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    told = _told_peer(rx, subprocess.Popen([sys.executable, "-c", OFFER, str(rx.address[1])],
                                           stdout=subprocess.PIPE))
    assert "the compression offer's xl header names no domain" in str(rx.exception())
    assert told == b"domain receive failed: the compression offer's xl header names no domain " \
                   b"(c_info.name)\0", told
    assert domains(b) == []


def _server_stages() -> List[int]:
    """The receiver's TLS stages (children of this process, role "server"),
    but for one it has killed already: the receiver starts the newer
    connection's stage as it kills the one it pushed out, which may take a
    moment to exit (CI once sampled 9 with max_pending 8)."""
    return [p for p in _stages()
            if b"server" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")
            and not _dying(p)]


def _dying(pid: int) -> bool:
    """SIGKILL pending, or already exiting (PF_EXITING), or gone."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        flags = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return True
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    pending = int(fields["SigPnd"], 16) | int(fields["ShdPnd"], 16)
    return bool(pending & (1 << (9 - 1))) or bool(flags & 0x4) or \
        fields["State"].strip()[:1] in ("Z", "X")


#: 1-byte peers a second.  Each starts a stage; the sender's own handshake is
#: pushed out if max_pending (8) newer stages start during it (README, Trust),
#: so at some rate a byte flood does keep it out: on this 2-vCPU machine 10/s
#: lets it in, 25/s with max_pending 4 kept it out for 120 s.
RATE = 10


def test_a_one_byte_flood_keeps_stages_bounded_and_a_tls_sender_gets_in(hosts, pki,  # noqa: F811
                                                                        flood):
    """Peers that send one byte and then nothing each start a TLS stage (a
    process): at most max_pending run at once, and a real TLS migration gets
    through while the flood goes on (at RATE, stages dropped at the 2 s
    header timeout or pushed out by newer ones)."""
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b, header_timeout=2)          # max_pending: 8
    peer = flood(rx.address[1], RATE, first=b"\x16", hold=3)   # a TLS record's first byte
    seen: List[int] = []

    def sample() -> None:
        seen.append(len(_server_stages()))
        if not rx.done():
            default_loop().call_later(0.02, sample)

    try:
        sample()
        assert default_loop().run_until(lambda: rx.refused >= 20, 60), rx.refused
        before = rx.refused
        try:
            real_migration(pki, a, b, dom, rx)
        finally:
            if not rx.done():
                rx.cancel()
                default_loop().run_until(rx.done, 30)
        assert peer.poll() is None and rx.refused > before   # the flood went on meanwhile
    finally:
        peer.kill()
        peer.wait(timeout=30)
    assert max(seen) <= 8, sorted(seen)[-10:]
    assert max(seen) >= 4, seen      # the flood did start stages


def test_a_sender_pushed_out_in_its_handshake_is_told_why(hosts, pki):  # noqa: F811
    """A full door (max_pending=1) drops the real sender's TLS handshake for a
    newer stage: the sender says the receiver closed before it was ready, and
    may be full, not a bare "Connection reset by peer"."""
    a, b = hosts
    dom = busy(a, 8)
    rx = receiver(pki, b, max_pending=1)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, tls=opts(pki, SENDER))
    assert default_loop().run_until(lambda: any(p.staged for p in rx._pending), 30)
    pusher = socket.create_connection(rx.address)
    pusher.send(b"\x16")                       # a newer stage: the sender's goes
    try:
        assert default_loop().run_until(tx.done, 60)
    finally:
        pusher.close()
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert not isinstance(exc, MigrationAuthError), exc
    # Dropped in its handshake, or (TLS 1.3's client finishes a flight before
    # the server) after the sender's side of it was done: the same hint.
    assert (str(exc).startswith("TLS with the receiver failed: ")
            and str(exc).endswith(f"({CLOSED_EARLY})")) or str(exc) == CLOSED_EARLY, exc
    source_survived(a, dom)
    rx.cancel()
    assert default_loop().run_until(rx.done, 30)
    assert domains(b) == []


def test_a_plain_sender_dropped_before_the_banner_is_told_why(hosts):
    """A receiver that accepts and closes at once (a full or refusing one):
    the plain sender's error says so."""
    a, _ = hosts
    dom = busy(a, 8)
    door = socket.socket()
    door.bind(("127.0.0.1", 0))
    door.listen(4)
    tx = migrate.migrate(dom, door.getsockname(), live=True, sim_dir=a)
    door.settimeout(30)
    conn, _ = door.accept()
    conn.close()
    door.close()
    assert default_loop().run_until(tx.done, 60)
    assert str(tx.exception()) == ("the receiver closed the connection before it was ready: "
                                   "it may be full, or refuse this host; see its log"), \
        tx.exception()
    source_survived(a, dom)


@pytest.mark.parametrize("end", ["eof", "close_notify", "after_banner"])
def test_a_tls_sender_dropped_after_its_side_of_the_handshake_is_told_why(
        hosts, pki, end):  # noqa: F811
    """TLS 1.3's client is done a flight before the server, so a receiver
    still counting the connection as pending may drop it after the sender's
    TLS is up: the sender's error is the same hint, not a bare close.  After
    the receiver's banner, a close is not that."""
    a, _ = hosts
    dom = busy(a, 8)
    d = pki["dir"]
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "receiver.test.pem", d / "receiver.test.key")
    ctx.load_verify_locations(d / "ca.pem")
    ctx.verify_mode = ssl.CERT_REQUIRED
    door = socket.socket()
    door.bind(("127.0.0.1", 0))
    door.listen(1)
    door.settimeout(30)
    handshaken = []

    def serve() -> None:
        conn, _ = door.accept()
        with ctx.wrap_socket(conn, server_side=True) as s:
            handshaken.append(s.version())
            if end == "close_notify":
                s.unwrap()
            elif end == "after_banner":
                s.sendall(BANNER)
                time.sleep(0.5)          # the sender is streaming

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    try:
        tx = migrate.migrate(dom, door.getsockname(), live=True, sim_dir=a,
                             tls=opts(pki, SENDER))
        assert default_loop().run_until(tx.done, 60)
    finally:
        server.join(30)
        door.close()
    assert handshaken == ["TLSv1.3"]
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert not isinstance(exc, MigrationAuthError), exc
    if end == "close_notify":
        assert str(exc) == CLOSED_EARLY, exc
    elif end == "eof":
        assert str(exc).startswith("TLS with the receiver failed: "), exc
        assert str(exc).endswith(f" ({CLOSED_EARLY})"), exc
    else:
        assert "before it was ready" not in str(exc), exc
    source_survived(a, dom)
