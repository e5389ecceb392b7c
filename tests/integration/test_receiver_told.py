"""What a receiver tells its sender, what it logs, and names (review findings 9, 10, 12, 5).

Real receivers, real peers (child processes speaking the handshake over real
sockets), real fakexen hosts:

* A stream libxc refuses (errno 0) tells the sender which check refused it,
  not "the restore failed (0)"; no reason a receiver sends holds a local path,
  a size or free memory (one check: ``peer_reason``).
* ``pyxl -v migrate-receive``: a failure is printed once, not three times;
  without -v, dropped connections are summed up in one WARNING a window.
* A name held on the receiving host by a domain that is not the migrating one
  (another uuid) is refused before the stream moves, exit 2; the same name
  held by the source itself (same host, same uuid) migrates as before; a
  collision found at the rename is exit 2 too.
* A compressed offer whose image names another domain than its header is
  refused before any domain is built.
"""

from __future__ import annotations

import json
import logging
import re
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any


import pyxl
from pyxl import migrate, sim
from pyxl.errors import MigrationProtocolError, StartupError
from pyxl.backends.sim import SimBackend
from pyxl.loop import default_loop

from test_migrate import busy, domains, run_both, source_survived

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]
MAGIC = b"Xen saved domain, xl format\n \0 \r"

# A peer: reads the banner, sends the file argv[2] (or, with argv[3], an
# offer header from argv[3] first, then after the answer the file), prints
# everything the receiver said until it closes.
PEER = """
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=60)
banner = b""
while not banner.endswith(b"\\n"):
    banner += s.recv(100)
data = open(sys.argv[2], "rb").read()
if len(sys.argv) > 3:
    s.sendall(open(sys.argv[3], "rb").read())
    answer = b""
    while not answer.endswith(b"\\0"):
        answer += s.recv(1)
    assert answer == b"pyxl compression: zstd\\0", answer
try:
    s.sendall(data)
except OSError:
    pass
told = b""
while True:
    try:
        chunk = s.recv(4096)
    except OSError:
        break
    if not chunk:
        break
    told += chunk
sys.stdout.buffer.write(told)
"""


def _peer(port: int, *files: Path) -> "subprocess.Popen[bytes]":
    return subprocess.Popen([sys.executable, "-c", PEER, str(port), *map(str, files)],
                            stdout=subprocess.PIPE)


def _told(rx: migrate.ReceiveOperation, peer: "subprocess.Popen[bytes]") -> bytes:
    try:
        assert default_loop().run_until(rx.done, 120)
        told, _ = peer.communicate(timeout=60)
    finally:
        peer.kill()
        peer.wait(timeout=30)
    return told


def _saved(a: str, tmp_path: Path, name: str = "g.save", **kw: Any) -> Path:
    dom = sim.create(16 * MB, sim_dir=a, paused=True)
    path = tmp_path / name
    pyxl.wait(pyxl.save(dom, path, sim_dir=a, **kw))
    return path


def test_a_stream_libxc_refuses_tells_the_sender_which_check(hosts, tmp_path):
    """libxc refuses a record longer than its maximum with errno 0: the sender
    hears the kind of check, not "(0)", and no number."""
    a, b = hosts
    data = bytearray(_saved(a, tmp_path).read_bytes())
    libxc = data.index(b"\xff" * 8 + b"XENF")
    first = libxc + 24 + 16                    # image header, domain header
    struct.pack_into("<I", data, first + 4, 0xfffffff0)
    bad = tmp_path / "bad.save"
    bad.write_bytes(bytes(data))
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    told = _told(rx, _peer(rx.address[1], bad))
    assert told == (b"domain receive failed: the restore failed: the stream was refused by "
                    b"libxc (record length exceeds max)\0"), told
    assert "exceeds max" in str(rx.exception())    # the local error keeps libxc's words
    assert domains(b) == []


def _cli_receiver(b: str, *args: str, verbose: bool = False
                  ) -> "tuple[subprocess.Popen[str], int]":
    rx = subprocess.Popen(PYXL + ["-v"] * verbose + ["migrate-receive", "--listen",
                                                     "127.0.0.1:0", "--sim-dir", b, *args],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert rx.stderr is not None
    line = rx.stderr.readline()
    m = re.fullmatch(r"listening on 127\.0\.0\.1:(\d+)\n", line)
    if not m:
        rx.kill()
        rx.wait(timeout=30)
    assert m, line
    return rx, int(m.group(1))


def test_with_v_a_failure_is_printed_once(hosts, tmp_path):
    """A config the receiver refuses: with -v, one line says it (the CLI's),
    not the restore's ERROR, the receive's ERROR and the CLI's."""
    a, b = hosts
    data = _saved(a, tmp_path).read_bytes()
    (optlen,) = struct.unpack_from("=I", data, 44)
    config = json.loads(data[52:48 + optlen].rstrip(b"\0"))
    config["b_info"]["max_memkb"] = 1 << 40
    raw = json.dumps(config).encode() + b"\0"
    opt = struct.pack("=I", len(raw)) + raw
    bad = tmp_path / "bad.save"
    bad.write_bytes(data[:44] + struct.pack("=I", len(opt)) + opt + data[48 + optlen:])
    rx, port = _cli_receiver(b, verbose=True)
    peer = _peer(port, bad)
    try:
        _, err = rx.communicate(timeout=120)
        told, _ = peer.communicate(timeout=60)
    finally:
        for p in (rx, peer):
            p.kill()
            p.wait(timeout=30)
    said = [line for line in err.splitlines() if "b_info.max_memkb" in line]
    assert said == ["pyxl: error: saved config: b_info.max_memkb: 1099511627776 is out of "
                    "range (1..17179869184)"], err
    assert rx.returncode == 2
    assert told == b"domain receive failed: the domain could not be created on the receiving " \
                   b"host\0", told
    assert domains(b) == []


def test_without_v_dropped_connections_are_summed_up(hosts):
    """30 probes (connect, close): without -v, the first 5 one line each, then
    one summary line with the count and the sources, not 30 lines or none."""
    _, b = hosts
    rx, port = _cli_receiver(b, "--header-timeout", "1", "--timeout", "4")
    import socket
    for _ in range(30):
        socket.create_connection(("127.0.0.1", port)).close()
        time.sleep(0.01)
    try:
        _, err = rx.communicate(timeout=60)
    finally:
        rx.kill()
        rx.wait(timeout=30)
    lines = err.splitlines()
    one = [line for line in lines if line.startswith("pyxl: warning: dropped the connection from")]
    summary = [line for line in lines if re.match(r"pyxl: warning: dropped \d+ connections", line)]
    assert len(one) == 5, err
    assert summary == ["pyxl: warning: dropped 30 connections from 1 source in the last 10s (5 "
                       "shown above; most from 127.0.0.1: 30)"], err
    assert len(lines) == 7 and lines[-1].startswith("pyxl: error: "), err


def _named(d: str, name: str) -> int:
    return sim.create(16 * MB, name=name, sim_dir=d)


def test_a_name_held_by_another_domain_is_refused_before_the_stream(hosts):
    a, b = hosts
    dom = busy(a, 8)
    sim.rename(dom, "web1", sim_dir=a)
    other = _named(b, "web1")                     # another guest, another uuid
    rx, port = _cli_receiver(b)
    try:
        tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a)
        run_both(tx)
        _, err = rx.communicate(timeout=60)
    finally:
        rx.kill()
        rx.wait(timeout=30)
    assert rx.returncode == 2, err
    assert err.splitlines() == [
        f"pyxl: error: domain 'web1' already exists here (domid {other}, uuid "
        f"{sim.config(other, sim_dir=b)['c_info']['uuid']}), and it is not the migrating "
        f"domain (uuid {sim.config(dom, sim_dir=a)['c_info']['uuid']}): refused before the "
        "stream"], err
    exc = tx.exception()
    assert str(exc) == ("the receiver failed: a domain of that name, not the migrating one, "
                        "already exists on the receiving host"), exc
    assert (tx.stats().bytes or 0) < 1 * MB        # the guest's memory never moved
    source_survived(a, dom)
    assert domains(b) == [(other, "running")]


def test_same_host_migration_with_the_source_holding_the_name(hosts):
    """One host: the source holds NAME (same uuid as the offer): not refused;
    xl's NAME--incoming / NAME--migratedaway renames let it through."""
    a, _ = hosts
    dom = busy(a, 8)
    sim.rename(dom, "web7", sim_dir=a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=a, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert [(i.domid, i.name) for i in sim.list_domains(sim_dir=a)] == [(got.domid, "web7")]


def test_a_collision_at_the_rename_is_exit_2(hosts, tmp_path):
    """A copy of the same guest (same uuid) holds NAME here: the receiver cannot
    tell it from the source, so it goes on; the rename finds the collision:
    a StartupError (exit 2), one line, the copy destroyed."""
    a, b = hosts
    dom = busy(a, 8)
    sim.rename(dom, "web8", sim_dir=a)
    pyxl.wait(pyxl.save(dom, tmp_path / "twin.save", sim_dir=a, leave="running"))
    twin = pyxl.wait(pyxl.restore(tmp_path / "twin.save", sim_dir=b))[0].domid
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    exc = rx.exception()
    assert isinstance(exc, StartupError), exc
    assert re.fullmatch(r"received domain \d+ would not start: domain 'web8' already exists "
                        rf"\(domid {twin}\); the received copy was destroyed", str(exc)), exc
    # xl's protocol has only a status byte after "cleared to unpause"
    assert "could not start its copy (status 1)" in str(tx.exception()), tx.exception()
    source_survived(a, dom)
    assert domains(b) == [(twin, "running")]


class RemoteNames(SimBackend):
    """fakexen, but its domains' names come as a real host's do: later, from the
    loop (a XenStore round); the waited-for form must not be used on the loop."""

    def domain_names(self):
        caller = sys._getframe(1).f_globals["__name__"]
        if not caller.startswith("pyxl.backends.sim"):   # fakexen's own create may
            raise AssertionError(f"domain_names() waited for on the loop, by {caller}")
        return SimBackend.domain_names(self)

    def start_domain_names(self, loop, done):
        names = SimBackend.domain_names(self)
        return loop.call_later(0.05, lambda: done(names, None))

    def rename(self, domid, name):    # its own check, as the Xen backend's
        taken = [d for d, n in SimBackend.domain_names(self).items() if n == name and d != domid]
        if taken:
            raise pyxl.BackendError(f"domain {name!r} already exists (domid {taken[0]})")
        sim.rename(domid, name, sim_dir=self.sim_dir)


def test_the_names_are_read_from_the_loop_not_waited_for(hosts, tmp_path):
    """Both name checks (at the head, at the rename) take the backend's loop
    form: on Xen a waited-for XenStore round would stall the loop."""
    a, b = hosts
    dom = busy(a, 8)
    sim.rename(dom, "web9", sim_dir=a)
    other = _named(b, "web9")
    rx = migrate.receive("127.0.0.1:0", backend=RemoteNames(b))
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert "not the migrating domain" in str(rx.exception()), rx.exception()
    sim.destroy(other, sim_dir=b)
    pyxl.wait(pyxl.save(dom, tmp_path / "twin.save", sim_dir=a, leave="running"))
    twin = pyxl.wait(pyxl.restore(tmp_path / "twin.save", sim_dir=b))[0].domid
    rx = migrate.receive("127.0.0.1:0", backend=RemoteNames(b))
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert re.search(rf"domain 'web9' already exists \(domid {twin}\); the received copy was "
                     "destroyed", str(rx.exception())), rx.exception()
    source_survived(a, dom)
    assert domains(b) == [(twin, "running")]


def test_a_compressed_image_of_another_domain_is_refused(hosts, tmp_path, caplog):
    """The offer's header names 'web9', the zstd image's own header another:
    refused (a protocol error, told) before any domain is built."""
    a, b = hosts
    dom = sim.create(16 * MB, sim_dir=a, paused=True)
    inner = sim.info(dom, sim_dir=a).name
    pyxl.wait(pyxl.save(dom, tmp_path / "g.save", sim_dir=a, leave="paused"))
    pyxl.wait(pyxl.save(dom, tmp_path / "g.zst", sim_dir=a, compress=True))
    image = tmp_path / "g.zst"
    plain = (tmp_path / "g.save").read_bytes()
    (optlen,) = struct.unpack_from("=I", plain, 44)
    config = json.loads(plain[52:48 + optlen].rstrip(b"\0"))
    config["c_info"]["name"] = "web9"
    raw = json.dumps(config).encode() + b"\0"
    opt = struct.pack("=I", len(raw)) + raw
    offer = tmp_path / "offer"
    offer.write_bytes(struct.pack("=32sIIII", MAGIC, 0x01020304, 3, 1 << 31, len(opt)) + opt)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    peer = _peer(rx.address[1], image, offer)
    with caplog.at_level(logging.DEBUG, logger="pyxl"):
        told = _told(rx, peer)
    exc = rx.exception()
    assert isinstance(exc, MigrationProtocolError), exc
    want = (f"the compressed image's xl header names another domain (c_info.name) than the "
            f"offer's: {inner!r}, not 'web9'")
    assert str(exc) == want, exc
    # (after the progress reports of a compressed stream)
    assert told.endswith(b"\0domain receive failed: " + want.encode() + b"\0"), told
    assert domains(b) == []
    assert not [r for r in caplog.records if r.name.startswith("pyxl.domain.")]   # none built
