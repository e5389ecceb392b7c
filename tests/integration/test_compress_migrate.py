"""Compressed migration (issue 19): the offer, its answer, and the fallback.

A pyxl sender with ``compress=True`` offers compression in its xl header's
optional flags and waits for the answer (pyxl.migrate.handshake).  A pyxl
receiver takes it (a zstd frame of the whole image follows, checked before
the domain may run) or declines (``compress=False``: plain at once).  An xl
receiver never answers: here a pyxl receiver behind a filter that clears
the flag is one, exactly as xl reads the header (optional flags ignored), and
the sender sends plain after OFFER_WAIT.  A peer that answers an unknown
compression, a sender that sends neither a frame nor a libxl stream after the
answer, and a corrupt frame are each a typed failure with the source running
and nothing left at the destination.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time

import pytest
import zstandard

import pyxl
from conftest import ROOT
from pyxl import migrate, sim
from pyxl.backends import SimBackend
from pyxl.errors import CorruptImage, MigrationError, MigrationProtocolError
from pyxl.loop import default_loop
from pyxl.migrate.handshake import BANNER, CHOSEN, OFFER_WAIT
from pyxl.migrate.sender import CATCH_UP
from pyxl.stream import xl as stream_xl
from pyxl.stream.xl import XL_OPTIONAL_PYXL_ZSTD

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]

# A filter in front of a receiver command that clears the sender's optional
# flags: the receiver behind it sees what xl sees, and never answers an offer.
XL_LIKE = r"""
import os, select, subprocess, sys
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
seen = 0
ends = {0: child.stdin.fileno(), child.stdout.fileno(): 1}
while ends:
    for fd in select.select(list(ends), [], [])[0]:
        data = os.read(fd, 65536)
        if not data:
            os.close(ends.pop(fd))
            continue
        if fd == 0 and seen < 44:
            b = bytearray(data)
            for i in range(max(40, seen), min(44, seen + len(b))):
                b[i - seen] = 0
            seen += len(data)
            data = bytes(b)
        os.write(ends[fd], data)
sys.exit(child.wait())
"""


def busy(sim_dir, rate_mb=20, memory=64 * MB, content="typical"):
    return sim.create(memory, dirty_rate=int(rate_mb * MB), sim_dir=sim_dir, content=content)


def domains(sim_dir):
    return [(i.domid, i.state) for i in sim.list_domains(sim_dir=sim_dir)]


def test_compressed_live_migration(hosts):
    """Taken: a zstd stream, smaller than the plain one, the guest arrives whole.
    (A guest dirtying 4 MiB/s: what a slow, loaded machine resends in its extra
    rounds stays well under a pass; at 20 MiB/s a loaded CI once sent 69 MB.)"""
    a, b = hosts
    dom = busy(a, rate_mb=4)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, compress=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.compressed and rx.compressed and tx.handshake.answered
    assert sent.digest == got.digest
    assert sent.bytes_sent < 64 * MB              # less than one plain pass over the guest
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]


def test_switch_over_waits_for_the_receiver_to_catch_up(hosts, caplog):
    """Zero pages compress ~1000x: at 100 MiB/s the whole guest is queued in
    buffers long before the receiver's restore has taken it.  The sender holds
    the suspend until the receiver's progress reports say it is within
    CATCH_UP, so what waits at the switch-over is not downtime."""
    a, b = hosts
    dom = sim.create(512 * MB, dirty_rate=4 * MB, sim_dir=a, content="zero")
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, compress=True,
                         max_bandwidth=100 * MB, downtime_ms=300, on_fail="stop")
    with caplog.at_level("DEBUG", logger="pyxl.migrate"):
        sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.compressed and sent.digest == got.digest
    held = [r.getMessage() for r in caplog.records if "suspend held" in r.getMessage()]
    released = [r.getMessage() for r in caplog.records if "suspend released" in r.getMessage()]
    assert len(held) == 1 and len(released) == 1, (held, released)
    behind_then = int(re.search(r"is (\d+) bytes behind", held[0]).group(1))
    behind_at_release = int(re.search(r"\((-?\d+) bytes behind\)", released[0]).group(1))
    # Tens of MiB were still queued (64-70 MiB on a quiet machine; 55 MiB with
    # QEMU busy beside the run, CI run 41: the receiver then kept up better).
    assert behind_then > 4 * CATCH_UP
    assert behind_at_release <= CATCH_UP
    # Quiet machine: 0.12 s with the hold, 0.8 s without (2 s for 1 GiB).
    assert sent.downtime < 1.5, sent.downtime


def test_receiver_that_declines_gets_it_plain_at_once(hosts):
    a, b = hosts
    dom = busy(a)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True, compress=False)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True, compress=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert not sent.compressed and not rx.compressed
    assert sent.digest == got.digest and sent.bytes_sent > 64 * MB
    assert tx.handshake.answered                  # "none", not the timeout: plain at once


def test_xl_like_receiver_falls_back_to_plain(hosts, tmp_path):
    """A receiver that ignores the offer (as xl does): plain after OFFER_WAIT,
    and the stream is one it restores (the xl header is not sent twice)."""
    a, b = hosts
    dom = busy(a, 8)
    filt = tmp_path / "xl_like.py"
    filt.write_text(XL_LIKE)
    t0 = time.monotonic()
    sent, got = _cli_migrate(a, b, dom, [sys.executable, str(filt)])
    assert sent["compressed"] is False and "compressed" not in got
    assert sent["digest"] == got["digest"]
    assert time.monotonic() - t0 >= OFFER_WAIT
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]


def _cli_migrate(a, b, dom, wrapper=()):
    """`pyxl migrate --compress --command "[WRAPPER] pyxl migrate-receive"`:
    the sender's and the receiver's JSON."""
    receiver = " ".join(list(wrapper) + PYXL + ["migrate-receive", "--sim-dir", b, "--json"])
    tx = subprocess.run(PYXL + ["migrate", "--live", "--compress", "--json", "--sim-dir", a,
                                "--command", receiver, str(dom)],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    # The receiver's JSON went to its stderr (its stdout is the channel), i.e. ours.
    got = json.loads([ln for ln in tx.stderr.splitlines() if ln.startswith("{")][-1])
    return json.loads(tx.stdout), got


def test_cli_compressed_migration_through_a_command(hosts):
    a, b = hosts
    dom = busy(a, 8)
    sent, got = _cli_migrate(a, b, dom)
    assert sent["compressed"] is True and got["compressed"] is True
    assert sent["digest"] == got["digest"]


def _fake_receiver(answer: bytes):
    """A listening socket that plays a receiver: banner, then ``answer`` once
    the sender's xl header came."""
    srv = socket.create_server(("127.0.0.1", 0))
    srv.setblocking(False)
    state = {"conn": None, "got": b""}

    def accept():
        try:
            conn, _ = srv.accept()
        except BlockingIOError:
            return
        conn.setblocking(False)
        conn.sendall(BANNER)
        state["conn"] = conn
        default_loop().remove_reader(srv.fileno())
        default_loop().add_reader(conn.fileno(), read)

    def read():
        try:
            data = state["conn"].recv(65536)
        except BlockingIOError:
            return
        if not data:
            default_loop().remove_reader(state["conn"].fileno())
            return
        before = len(state["got"])
        state["got"] += data
        if before < 48 <= len(state["got"]):
            state["conn"].sendall(answer)

    default_loop().add_reader(srv.fileno(), accept)
    return srv, state


def test_unknown_compression_answer_fails_the_sender(hosts):
    a, _ = hosts
    dom = busy(a, 8)
    srv, state = _fake_receiver(CHOSEN + b"lz4\0")
    tx = migrate.migrate(dom, srv.getsockname(), live=True, sim_dir=a, compress=True)
    with pytest.raises(MigrationProtocolError, match=r"unknown compression 'lz4'"):
        pyxl.wait(tx, timeout=60)
    if state["conn"] is not None:
        default_loop().remove_reader(state["conn"].fileno())
        state["conn"].close()
    srv.close()
    assert domains(a) == [(dom, "running")]


def _offer(rx_address, config):
    """A raw sender: read the banner, offer, read the answer; the socket."""
    s = socket.create_connection(rx_address)
    s.settimeout(30)
    got = b""
    while len(got) < len(BANNER):
        got += s.recv(len(BANNER) - len(got))
    assert got == BANNER
    s.sendall(stream_xl.xl_header(config, optional_flags=XL_OPTIONAL_PYXL_ZSTD))
    answer = b""
    while not answer.endswith(b"\0"):
        answer += s.recv(1)
    return s, answer


def _receive_in_background(b):
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    return rx


def test_garbage_after_the_answer_fails_the_receiver(hosts):
    a, b = hosts
    rx = _receive_in_background(b)
    config = {"c_info": {"name": "g", "type": "hvm"}, "b_info": {"max_memkb": 65536}}
    import threading   # the test's raw sender only: pyxl itself is thread-free
    out = {}

    def sender():
        s, out["answer"] = _offer(rx.address, config)
        s.sendall(b"XXXXYYYY")
        time.sleep(0.5)
        s.close()

    t = threading.Thread(target=sender)
    t.start()
    with pytest.raises(MigrationProtocolError, match=r"neither a zstd frame nor a libxl stream"):
        pyxl.wait(rx, timeout=60)
    t.join()
    assert out["answer"] == CHOSEN + b"zstd\0"
    assert domains(b) == []


def test_corrupt_compressed_stream_is_refused(hosts, tmp_path):
    """A frame with a flipped bit: CorruptImage at the receiver, no domain left."""
    a, b = hosts
    dom = sim.create(16 * MB, sim_dir=a, content="typical", name="g")
    image = tmp_path / "g.zsave"
    pyxl.wait(pyxl.save(dom, str(image), backend=SimBackend(a), compress=True, leave="paused"))
    data = bytearray(image.read_bytes())
    data[len(data) // 2] ^= 0x10
    config = SimBackend(a).domain_config(dom)
    rx = _receive_in_background(b)
    import threading   # the test's raw sender only
    out = {}

    def sender():
        s, out["answer"] = _offer(rx.address, config)
        got = b""
        try:
            s.sendall(bytes(data))
            while b"domain receive failed" not in got:   # progress reports come first
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except OSError:
            pass
        s.close()

    t = threading.Thread(target=sender)
    t.start()
    with pytest.raises((CorruptImage, MigrationError), match=r"corrupt|checksum"):
        pyxl.wait(rx, timeout=60)
    t.join()
    assert domains(b) == []
    assert zstandard.ZstdDecompressor   # the corruption is zstd's to find, not a parse error


def test_a_config_that_cannot_be_read_fails_the_offer_and_keeps_the_source(hosts):
    """The offer's xl header needs the domain's config, asked for from the
    loop once the banner came: a backend that cannot give it fails the
    migration with the reason before any stream; the source runs on."""
    a, b = hosts
    dom = sim.create(16 * MB, sim_dir=a, name="g")

    class NoConfig(SimBackend):
        def domain_config(self, domid):
            raise OSError("the config store is gone")

    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    tx = migrate.migrate(dom, rx.address, backend=NoConfig(a), compress=True)
    with pytest.raises(pyxl.StartupError,
                       match=f"cannot read domain {dom}'s config: the config store is gone"):
        pyxl.wait(tx, timeout=60)
    rx.cancel()
    with pytest.raises(pyxl.OperationError):
        pyxl.wait(rx, timeout=30)
    assert domains(a) == [(dom, "running")] and domains(b) == []
