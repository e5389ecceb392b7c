"""Migration a user can expose to a network: mutual TLS, an allow-list, plain
TCP refused off loopback, and a receiver that outlives bad peers.

Real sockets, real certificates made by the ``openssl`` command line: a CA, the
receiver's certificate, two senders' (one not allowed), and a second,
unrelated CA with a sender certificate of its own.  Every bad peer must leave
the receiver with no domain, still listening, and the real sender must then
migrate through it, memory byte for byte.
"""

from __future__ import annotations

import json
import logging
import os
import select
import re
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import pytest

import pyxl
from pyxl import migrate, sim
from pyxl.errors import MigrationAuthError, StartupError
from pyxl.loop import default_loop
from pyxl.migrate import TlsOptions

from conftest import ROOT, open_fds
from test_migrate import (_cli, _listening, assert_peer_told, assert_runs_intact, busy, domains,
                          run_both)
from test_migrate import netns, source_survived  # noqa: F401  (netns: a fixture)

MB = 1 << 20
PYXL = [sys.executable, "-m", "pyxl"]
SENDER = "sender.test"


def _openssl(*args: str, cwd: Path) -> None:
    done = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


def _ca(d: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def _leaf(d: Path, ca: str, name: str, sans: str, cn: str = "") -> None:
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={cn or name}",
             cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={sans}\n"
                                   "extendedKeyUsage=serverAuth,clientAuth\n"
                                   "keyUsage=critical,digitalSignature\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile",
             f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: Any) -> Dict[str, Path]:
    """CA + receiver + two senders; another CA + a sender it signed."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _leaf(d, "ca", "receiver.test", "DNS:receiver.test,DNS:localhost,IP:127.0.0.1")
    _leaf(d, "ca", SENDER, f"DNS:{SENDER}")
    _leaf(d, "ca", "intruder.test", "DNS:intruder.test")
    _ca(d, "rogue-ca")
    _leaf(d, "rogue-ca", "rogue", f"DNS:{SENDER}")   # the right name, the wrong CA
    return {"dir": d}


def opts(pki: Dict[str, Path], who: str, ca: str = "ca", **kw: Any) -> TlsOptions:
    d = pki["dir"]
    return TlsOptions(str(d / f"{who}.pem"), str(d / f"{who}.key"), str(d / f"{ca}.pem"), **kw)


def tls_args(pki: Dict[str, Path], who: str) -> List[str]:
    o = opts(pki, who)
    return ["--tls-cert", o.cert, "--tls-key", o.key, "--tls-ca", o.ca]


def receiver(pki: Dict[str, Path], b: str, **kw: Any) -> migrate.ReceiveOperation:
    return migrate.receive("127.0.0.1:0", sim_dir=b, digest=True,
                           tls=opts(pki, "receiver.test", allow=(SENDER,)), **kw)


def wait_refused(rx: migrate.ReceiveOperation, n: int, timeout: float = 60) -> None:
    assert default_loop().run_until(lambda: rx.refused >= n or rx.done(), timeout), rx.refused
    assert not rx.done(), rx.exception()
    assert rx.refused == n


def real_migration(pki: Dict[str, Path], a: str, b: str, dom: int,
                   rx: migrate.ReceiveOperation) -> None:
    """The real sender, after the bad peers: the guest arrives intact."""
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         tls=opts(pki, SENDER))
    try:
        # the sender first: its failure (pushed out, say) is the error shown,
        # not a timeout of the receiver that still waits for a sender
        (sent,) = pyxl.wait(tx, timeout=120)
        (got,) = pyxl.wait(rx, timeout=60)
    finally:    # a failure leaves nothing running for the tests after it
        for op in (tx, rx):
            if not op.done():
                op.cancel()
                default_loop().run_until(op.done, 30)
    assert sent.digest == got.digest and re.fullmatch(r"[0-9a-f]{64}", sent.digest)
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]
    assert_runs_intact(b, got.domid)


def snapshot() -> Any:
    """Open fds and the default loop's watched fds, to compare after."""
    return open_fds(), sorted(default_loop()._sel.get_map())


@pytest.fixture(autouse=True)
def nothing_left() -> Any:
    """Every test: once its operations are done, no fd and no loop watch of
    theirs is left (a dropped TLS peer's stage included) -- at once, not after
    a wait: an operation is done only when all of it is gone."""
    before = snapshot()
    yield
    assert snapshot() == before


# ---------------------------------------------------------------------------
# Success


def test_tls_migration_in_process(hosts, pki):
    a, b = hosts
    dom = busy(a, 30)
    gaps: List[float] = []
    last = [time.monotonic()]

    def tick() -> None:   # the loop keeps turning while TLS moves the stream
        now = time.monotonic()
        gaps.append(now - last[0])
        last[0] = now
        if not (tx.done() and rx.done()):
            default_loop().call_later(0.005, tick)

    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         tls=opts(pki, SENDER))
    default_loop().call_later(0, tick)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and re.fullmatch(r"[0-9a-f]{64}", sent.digest)
    assert 1 <= sent.iterations <= 5 and sent.bytes_sent > 64 * MB
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]
    assert max(gaps) < 1.0, max(gaps)
    assert rx.refused == 0
    assert_runs_intact(b, got.domid)


def test_tls_compressed_migration(hosts, pki):
    """--compress through TLS: the offer and the zstd frame ride the bridge;
    nothing is left behind."""
    a, b = hosts
    dom = sim.create(64 * MB, dirty_rate=8 * MB, sim_dir=a, content="typical")
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         tls=opts(pki, SENDER), compress=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.compressed and rx.compressed and sent.digest == got.digest
    assert sent.bytes_sent < 0.6 * 64 * MB
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]
    sim.destroy(got.domid, sim_dir=b)


def test_tls_cli_between_processes(hosts, pki):
    a, b = hosts
    dom = busy(a, 20)
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b, "--json",
              *tls_args(pki, "receiver.test"), "--tls-allow", "nobody.test",
              "--tls-allow", SENDER)
    port = _listening(rx)
    tx = subprocess.run(PYXL + ["migrate", "--live", "--json", "--sim-dir", a,
                                *tls_args(pki, SENDER), str(dom), f"localhost:{port}"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert sent["digest"] == got["digest"]
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]


# ---------------------------------------------------------------------------
# Bad peers: dropped, and the receiver listens on


def test_raw_save_file_to_tls_receiver_creates_nothing(hosts, pki, tmp_path):
    """The issue's attack: an ordinary save file over a raw socket."""
    a, b = hosts
    evil = sim.create(16 * MB, sim_dir=a, paused=True, name="evil")
    pyxl.wait(pyxl.save(evil, tmp_path / "evil.save", sim_dir=a))
    dom = busy(a, 20)
    rx = receiver(pki, b)
    client = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys\n"
         "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])))\n"
         "try:\n    s.sendall(open(sys.argv[2], 'rb').read())\n"
         "except OSError:\n    pass\n"
         "s.close()\n", str(rx.address[1]), str(tmp_path / "evil.save")])
    wait_refused(rx, 1)
    client.wait(timeout=30)
    assert domains(b) == []
    real_migration(pki, a, b, dom, rx)


def test_client_cert_from_another_ca_is_refused(hosts, pki):
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=opts(pki, "rogue", ca="ca"))
    run_both(tx)
    exc = tx.exception()
    assert isinstance(exc, MigrationAuthError), exc
    assert exc.source_state == "running"
    source_survived(a, dom)
    wait_refused(rx, 1)
    assert domains(b) == []
    real_migration(pki, a, b, dom, rx)


def test_receiver_from_another_ca_is_refused_by_the_sender(hosts, pki):
    a, b = hosts
    dom = busy(a, 8)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=opts(pki, SENDER, ca="rogue-ca"))
    run_both(tx)
    assert isinstance(tx.exception(), MigrationAuthError), tx.exception()
    assert "certificate verify failed" in str(tx.exception()).lower()
    source_survived(a, dom)
    wait_refused(rx, 1)
    rx.cancel()
    run_both(rx)


def test_wrong_receiver_name_is_refused_by_the_sender(hosts, pki):
    a, b = hosts
    dom = busy(a, 8)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=opts(pki, SENDER, server_name="other.test"))
    run_both(tx)
    assert isinstance(tx.exception(), MigrationAuthError), tx.exception()
    source_survived(a, dom)
    rx.cancel()
    run_both(rx)


def test_peer_not_on_the_allow_list_is_refused(hosts, pki):
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=opts(pki, "intruder.test"))
    run_both(tx)
    exc = tx.exception()
    # a refused certificate, as the README says: not a plain MigrationError
    assert isinstance(exc, MigrationAuthError), exc
    assert "the receiver failed: not authorized" in str(exc), exc
    assert exc.source_state == "running", exc.source_state
    source_survived(a, dom)
    wait_refused(rx, 1)
    assert domains(b) == []
    real_migration(pki, a, b, dom, rx)


def test_allow_list_names_are_dns_names(hosts, pki):
    """RFC 6125, as the sender's check: any case matches; the subject CN counts
    only when the certificate has no DNS subjectAltName."""
    a, b = hosts
    dom = busy(a, 20)
    d = pki["dir"]
    _leaf(d, "ca", "upper", "DNS:SENDER.Test", cn="SENDER.TEST")
    _leaf(d, "ca", "cn-only", "email:x@example.org", cn=SENDER)     # no DNS SAN: the CN
    _leaf(d, "ca", "cn-and-other-san", "DNS:other.test", cn=SENDER)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, tls=opts(pki, "cn-and-other-san"))
    run_both(tx)
    assert "the receiver failed: not authorized" in str(tx.exception()), tx.exception()
    wait_refused(rx, 1)
    rx.cancel()
    run_both(rx)
    source_survived(a, dom)
    for who in ("upper", "cn-only"):
        rx = receiver(pki, b)
        tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                             tls=opts(pki, who))
        sent, got = pyxl.wait(tx, rx, timeout=120)
        assert sent.digest == got.digest and rx.refused == 0
        dom, a, b = got.domid, b, a       # and back, with the next certificate


def _revoke(d: Path, ca: str, *names: str) -> Path:
    """A CRL from ``ca`` that revokes the certificates ``names`` (openssl ca)."""
    (d / "crl-index.txt").write_text("")
    (d / "crl-number").write_text("01\n")
    (d / "crl.cnf").write_text("[ca]\ndefault_ca = d\n[d]\ndatabase = crl-index.txt\n"
                               "crlnumber = crl-number\ndefault_md = sha256\n"
                               "default_crl_days = 2\n")
    for name in names:
        _openssl("ca", "-config", "crl.cnf", "-keyfile", f"{ca}.key", "-cert", f"{ca}.pem",
                 "-revoke", f"{name}.pem", cwd=d)
    _openssl("ca", "-config", "crl.cnf", "-keyfile", f"{ca}.key", "-cert", f"{ca}.pem",
             "-gencrl", "-out", "revoked.crl", cwd=d)
    return d / "revoked.crl"


def test_a_revoked_certificate_is_refused_at_either_end(hosts, pki):
    """--tls-crl / TlsOptions.crl: the receiver refuses a revoked sender, the
    sender a revoked receiver; certificates the CRL does not name still work."""
    a, b = hosts
    dom = busy(a, 20)
    d = pki["dir"]
    _leaf(d, "ca", "revoked-sender", f"DNS:{SENDER}")
    _leaf(d, "ca", "revoked-receiver", "DNS:localhost,IP:127.0.0.1")
    crl = str(_revoke(d, "ca", "revoked-sender", "revoked-receiver"))
    with pytest.raises(StartupError, match="cannot load the TLS CRL file /no/crl"):
        migrate.receive("127.0.0.1:0", sim_dir=b, tls=opts(pki, "receiver.test", crl="/no/crl"))
    done = subprocess.run(PYXL + ["migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b,
                                  *tls_args(pki, "receiver.test"), "--tls-crl", str(d / "ca.key")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "cannot load the TLS CRL file" in done.stderr, done.stderr
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True,
                         tls=opts(pki, "receiver.test", allow=(SENDER,), crl=crl))
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, tls=opts(pki, "revoked-sender"))
    run_both(tx)
    assert isinstance(tx.exception(), migrate.MigrationError), tx.exception()
    wait_refused(rx, 1)
    source_survived(a, dom)
    real_migration(pki, a, b, dom, rx)           # a sender the CRL does not name
    dom = domains(b)[0][0]
    a, b = b, a
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, tls=opts(pki, "revoked-receiver"))
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=opts(pki, SENDER, crl=crl))
    run_both(tx)
    exc = tx.exception()
    assert isinstance(exc, MigrationAuthError) and "certificate revoked" in str(exc), exc
    source_survived(a, dom)
    rx.cancel()
    run_both(rx)
    assert domains(b) == []


def test_silent_and_garbage_tls_peers(hosts, pki):
    """A peer that completes TLS and then says nothing, one that never starts
    TLS, and one that sends garbage inside TLS: all dropped."""
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b, header_timeout=1.0)
    silent = socket.create_connection(rx.address)            # no ClientHello at all
    ctx = ssl.create_default_context(cafile=opts(pki, SENDER).ca)
    o = opts(pki, SENDER)
    ctx.load_cert_chain(o.cert, o.key)
    raw = socket.create_connection(rx.address)
    raw.setblocking(False)
    inside = ctx.wrap_socket(raw, server_hostname="127.0.0.1", do_handshake_on_connect=False)

    def handshake() -> bool:
        try:
            inside.do_handshake()
            return True
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            return False

    # The receiver's TLS runs in a child: only our own socket's readiness
    # wakes this loop for our client's side of the handshake.
    default_loop().add_reader(inside.fileno(), lambda: None)
    assert default_loop().run_until(handshake, 30)
    got = bytearray()

    def banner() -> bool:   # the receiver runs on this loop: never block it
        try:
            got.extend(inside.recv(100))
        except (ssl.SSLWantReadError, BlockingIOError):
            pass
        return got.endswith(b"\n")

    try:
        assert default_loop().run_until(banner, 30)
    finally:
        default_loop().remove_reader(inside.fileno())
    assert got.startswith(b"xl migration receiver ready")
    inside.send(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 200)
    wait_refused(rx, 2, timeout=30)      # the garbage one, then the silent one
    assert domains(b) == []
    silent.close()
    inside.close()
    real_migration(pki, a, b, dom, rx)


def test_probe_does_not_end_a_plain_loopback_receiver(hosts):
    a, b = hosts
    dom = busy(a, 20)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True, header_timeout=1.0)
    socket.create_connection(rx.address).close()                       # a probe
    garbage = socket.create_connection(rx.address)
    garbage.sendall(b"SSH-2.0-OpenSSH_9.2\r\n" + b"\0" * 4096)
    idle = socket.create_connection(rx.address)                        # says nothing
    wait_refused(rx, 3, timeout=30)
    garbage.close()
    idle.close()
    assert domains(b) == []
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest
    assert domains(a) == [] and domains(b) == [(got.domid, "running")]


def test_failure_text_to_the_sender_has_no_local_path(hosts):
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, helper="/nonexistent/secret/helper")
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a)
    run_both(tx, rx)
    assert "/nonexistent" in str(rx.exception())          # the local log says it all
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert "the receiver failed: " in str(exc) and "/nonexistent" not in str(exc), exc
    assert not re.search(r"\d+\s*(KiB|MiB|GiB|kB|MB|bytes)", str(exc)), exc
    source_survived(a, dom)
    assert domains(b) == []


# ---------------------------------------------------------------------------
# Plain TCP off loopback; options


def test_plain_listen_off_loopback_is_refused_unless_insecure(hosts, caplog):
    _, b = hosts
    done = subprocess.run(PYXL + ["migrate-receive", "--listen", "0.0.0.0:0", "--sim-dir", b],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing plain TCP" in lines[0], lines
    assert "--tls-cert" in lines[0] and "--insecure" in lines[0] and "ssh" in lines[0]
    assert "tls=" not in lines[0] and "insecure=True" not in lines[0]
    rx = _cli("migrate-receive", "--listen", "0.0.0.0:0", "--insecure", "--sim-dir", b,
              "--timeout", "0.5")
    port = _listening(rx)
    assert rx.stderr is not None
    warned = rx.stderr.readline()     # the next line, at once (communicate() may skip it)
    assert warned == (f"pyxl: warning: plain TCP on 0.0.0.0:{port}: anyone who can connect "
                      "can send a domain\n"), warned
    _, err = rx.communicate(timeout=60)
    assert rx.returncode == 1 and "timed out" in err and "warning" not in err, err
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--insecure", "--sim-dir", b,
              "--timeout", "0.5")                                # loopback: no warning
    _listening(rx)
    assert rx.stderr is not None
    after = rx.stderr.readline()
    rx.communicate(timeout=60)
    assert rx.returncode == 1 and "timed out" in after, after
    with pytest.raises(StartupError, match="refusing plain TCP") as refused:
        migrate.receive("0.0.0.0:0", sim_dir=b)
    # an API caller is told the API's keywords, not the CLI's flags
    assert "tls=" in str(refused.value) and "insecure=True" in str(refused.value)
    assert "--tls-cert" not in str(refused.value) and "--insecure" not in str(refused.value)
    with caplog.at_level(logging.WARNING, logger="pyxl.migrate.receive"):
        op = migrate.receive("0.0.0.0:0", sim_dir=b, insecure=True)
        op.loop.run_once(0.1)
    assert op.address is not None
    # the library warns its caller too, through logging
    assert [r.getMessage() for r in caplog.records] == [
        f"plain TCP on 0.0.0.0:{op.address[1]}: anyone who can connect can send a domain"]
    op.cancel()
    run_both(op)
    with socket.create_server(("0.0.0.0", 0)) as srv, \
            pytest.raises(StartupError, match="refusing plain TCP"):
        migrate.receive(srv, sim_dir=b)


def test_tls_listen_off_loopback_is_allowed(hosts, pki):
    _, b = hosts
    op = migrate.receive("0.0.0.0:0", sim_dir=b, tls=opts(pki, "receiver.test"))
    op.cancel()
    run_both(op)
    assert isinstance(op.exception(), pyxl.Cancelled)


@pytest.mark.parametrize("argv,complaint", [
    (["migrate-receive", "--listen", "127.0.0.1:0", "--tls-cert", "x"],
     "needs all of --tls-cert, --tls-key and --tls-ca"),
    (["migrate-receive", "--listen", "127.0.0.1:0", "--tls-allow", "x"],
     "--tls-allow, --tls-name and --tls-crl go with"),
    (["migrate-receive", "--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a"],
     "go with --listen"),
    (["migrate-receive", "--listen", "127.0.0.1:0", "--tls-cert", "/no/c", "--tls-key",
      "/no/k", "--tls-ca", "/no/a"], "cannot load the TLS CA file"),
    (["migrate", "--tls-cert", "c", "--tls-key", "k", "--tls-ca", "a", "--command", "true",
      "1"], "--command is its own channel"),
    (["migrate-receive", "--listen", "127.0.0.1:0", "--insecure", "--tls-cert", "c",
      "--tls-key", "k", "--tls-ca", "a"], "--insecure is for plain TCP"),
    (["migrate-receive", "--listen", "127.0.0.1:0", "--tls-crl", "x"],
     "--tls-crl go with --tls-cert"),
    (["migrate-receive", "--listen", "127.0.0.1:0", "--header-timeout", "0"],
     "must be more than 0"),
])
def test_cli_tls_usage_errors(hosts, argv, complaint):
    done = subprocess.run(PYXL + argv + ["--sim-dir", hosts[1]], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 2 and complaint in done.stderr, done.stderr


def test_tls_options_are_checked():
    with pytest.raises(TypeError):
        TlsOptions("c", "k", "")
    with pytest.raises(TypeError):
        TlsOptions("c", "k", "a", allow="one-name")   # type: ignore[arg-type]
    assert TlsOptions(Path("c"), "k", "a", allow=["x"]).allow == ("x",)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        migrate.receive("127.0.0.1:0", tls={"cert": "c"})   # type: ignore[arg-type]
    with pytest.raises(ValueError):
        migrate.receive(fds=(0, 1), tls=TlsOptions("c", "k", "a"))



# ---------------------------------------------------------------------------
# Deadlines and bounds


def test_silent_peers_cannot_fill_the_door(hosts):
    """With every slot (8 x max_pending) held by a silent peer, a newcomer
    evicts the oldest silent one."""
    a, b = hosts
    dom = busy(a, 8)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True, max_pending=2)
    idle = [socket.create_connection(rx.address) for _ in range(16)]
    assert default_loop().run_until(lambda: len(rx._pending) == 16, 30)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=120)
    assert sent.digest == got.digest and rx.refused >= 1
    for s in idle:
        s.close()


def test_stalled_stream_times_out_at_the_receiver(hosts, tmp_path):
    a, b = hosts
    dom = sim.create(16 * MB, sim_dir=a, paused=True)
    pyxl.wait(pyxl.save(dom, tmp_path / "g.save", sim_dir=a))
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, idle_timeout=0.5)
    stalled = socket.create_connection(rx.address)
    stalled.sendall((tmp_path / "g.save").read_bytes()[:1 << 20])   # then nothing
    run_both(rx, timeout=60)
    assert "sent nothing for 0.5s" in str(rx.exception()), rx.exception()
    assert domains(b) == []
    stalled.close()


def test_silent_receiver_after_the_stream_times_out_the_sender(hosts):
    """A receiver that takes the stream and never says "ready": the source runs on."""
    a, _ = hosts
    dom = busy(a, 8)
    fake = subprocess.Popen(
        [sys.executable, "-c", "import socket, sys\n"
         "srv = socket.create_server(('127.0.0.1', 0))\n"
         "print(srv.getsockname()[1], flush=True)\n"
         "c, _ = srv.accept()\n"
         "c.sendall(b'xl migration receiver ready, send binary domain data.\\n')\n"
         "while c.recv(1 << 20):\n    pass\n"], stdout=subprocess.PIPE, text=True)
    assert fake.stdout is not None
    port = int(fake.stdout.readline())
    tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a, handshake_timeout=2)
    run_both(tx)
    fake.wait(timeout=30)
    assert 'no "ready" from the receiver within 2s' in str(tx.exception()), tx.exception()
    source_survived(a, dom)


def test_killed_tls_receiver_leaves_source_running(hosts, pki):
    a, b = hosts
    dom = busy(a, 20)
    rx = _cli("migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b,
              *tls_args(pki, "receiver.test"))
    port = _listening(rx)
    tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a, max_bandwidth=24 * MB,
                         tls=opts(pki, SENDER))
    default_loop().call_later(1.0, rx.kill)
    run_both(tx)
    rx.communicate(timeout=30)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert not isinstance(exc, (MigrationAuthError, migrate.MigrationInDoubt)), exc
    assert exc.source_state == "running"
    source_survived(a, dom)


def test_sender_handshake_reads_a_refusal_instead_of_the_banner():
    """Sans-I/O: a receiver that refuses a peer says why instead of its banner."""
    from pyxl.migrate.handshake import (FAILED, NEED_DATA, ReceiverFailed, SenderHandshake)
    tx = SenderHandshake()
    tx.receive_data(FAILED[:5])
    assert tx.next_event() is NEED_DATA
    tx.receive_data(FAILED[5:] + b"not authorized\0")
    assert tx.next_event() == ReceiverFailed("not authorized")
    assert tx.state == SenderHandshake.DONE
    tx = SenderHandshake()
    tx.receive_data(b"domain received, ready to unpause\0")   # READY is no banner
    with pytest.raises(pyxl.MigrationError):
        tx.next_event()


def test_receiver_that_stops_reading_times_out_the_sender(hosts):
    a, _ = hosts
    dom = busy(a, 8)
    fake = subprocess.Popen(
        [sys.executable, "-c", "import socket, time\n"
         "srv = socket.create_server(('127.0.0.1', 0))\n"
         "print(srv.getsockname()[1], flush=True)\n"
         "c, _ = srv.accept()\n"
         "c.sendall(b'xl migration receiver ready, send binary domain data.\\n')\n"
         "time.sleep(120)\n"], stdout=subprocess.PIPE, text=True)
    try:
        assert fake.stdout is not None
        port = int(fake.stdout.readline())
        tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a, idle_timeout=1)
        run_both(tx, timeout=60)
        assert "the stream did not move for 1s" in str(tx.exception()), tx.exception()
        source_survived(a, dom)
    finally:
        fake.kill()
        fake.wait()


def test_tls_migration_between_network_namespaces(hosts, pki, netns):  # noqa: F811
    """Off loopback, no --insecure: TLS, the receiver's name given by --tls-name."""
    a, b = hosts
    ns_a, ns_b, addr = netns
    dom = busy(a, 20)
    plain = subprocess.run(["ip", "netns", "exec", ns_b] + PYXL +
                           ["migrate-receive", "--listen", f"{addr}:0", "--sim-dir", b],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert plain.returncode == 2 and "refusing plain TCP" in plain.stderr, plain.stderr
    rx = subprocess.Popen(["ip", "netns", "exec", ns_b] + PYXL +
                          ["migrate-receive", "--listen", f"{addr}:0", "--sim-dir", b, "--json",
                           *tls_args(pki, "receiver.test"), "--tls-allow", SENDER],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    port = _listening(rx)
    tx = subprocess.run(["ip", "netns", "exec", ns_a] + PYXL +
                        ["migrate", "--live", "--json", "--sim-dir", a, *tls_args(pki, SENDER),
                         "--tls-name", "receiver.test", str(dom), f"{addr}:{port}"],
                        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert sent["digest"] == got["digest"]
    assert domains(a) == [] and domains(b) == [(got["domid"], "running")]
    assert_runs_intact(b, got["domid"])


@pytest.mark.parametrize("config", [
    b"[" * 100000 + b"]" * 100000,                     # nesting deeper than Python recurses
    b'{"c_info": [], "b_info": {"max_memkb": 1e999}}',   # wrong types, overflowing number
])
def test_hostile_config_fails_the_receive_and_leaves_the_loop_alone(hosts, config):
    """A stream head with a hostile config: the receive fails typed, the peer is
    told, no domain, and nothing escapes the loop (pyxl.wait keeps working)."""
    import struct

    from pyxl.stream import xl as sxl
    from pyxl.stream.libxl import libxc_context_record, libxl_header
    _, b = hosts
    cfg = config + b"\0"
    optdata = struct.pack("=I", len(cfg)) + cfg
    head = (struct.pack("=32sIIII", sxl.XL_MAGIC, sxl.XL_BYTEORDER,
                        sxl.XL_FLAG_STREAMV2 | sxl.XL_FLAG_JSON, 0, len(optdata))
            + optdata + libxl_header() + libxc_context_record())
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    peer = socket.create_connection(rx.address)
    peer.setblocking(False)
    peer.sendall(head)
    run_both(rx, timeout=60)
    assert isinstance(rx.exception(), pyxl.OperationError), rx.exception()
    assert_peer_told(peer)
    assert domains(b) == []
    peer.close()


def test_failed_restore_is_reported_inside_tls(hosts, pki):
    a, b = hosts
    dom = busy(a, 8)
    rx = receiver(pki, b, helper="/bin/false")
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, tls=opts(pki, SENDER))
    run_both(tx, rx)
    assert isinstance(rx.exception(), pyxl.HelperExited), rx.exception()
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert "the receiver failed: the restore helper exited with error status 1" in str(exc), exc
    assert domains(b) == []
    source_survived(a, dom)


# ---------------------------------------------------------------------------
# The TLS stage: a child process per connection, never the loop


def _stages() -> List[int]:
    """Our TLS stage children (pyxl/migrate/tlsstage.py), by pid."""
    me, found = str(os.getpid()), []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[1]
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if ppid == me and any(a.endswith(b"tlsstage.py") for a in cmd):
            found.append(int(d.name))
    return found


def test_the_sender_starts_its_stage_while_it_connects(hosts, pki):
    """The sender's stage starts with the connect, not after it: its
    connection is silent for a round trip, not for a stage's start as well
    (a full receiver drops silent connections first).  A connect that cannot
    complete (the door's backlog is full: the kernel drops the SYN) finds
    the stage up; cancelled, the migration leaves no stage."""
    a, _ = hosts
    dom = busy(a, 8)
    door = socket.socket()
    door.bind(("127.0.0.1", 0))
    door.listen(0)
    fillers: List[socket.socket] = []
    try:
        while True:                      # until a connect no longer completes
            s = socket.socket()
            fillers.append(s)
            s.settimeout(0.3)
            try:
                s.connect(door.getsockname())
            except socket.timeout:
                break
        tx = migrate.migrate(dom, door.getsockname(), live=True, sim_dir=a,
                             tls=opts(pki, SENDER))
        assert default_loop().run_until(lambda: _stages() or tx.done(), 30)
        assert not tx.done(), tx.exception()
        assert len(_stages()) == 1
        tx.cancel()
        assert default_loop().run_until(tx.done, 30)
        assert default_loop().run_until(lambda: not _stages(), 30), _stages()
    finally:
        for s in fillers:
            s.close()
        door.close()
    assert isinstance(tx.exception(), pyxl.Cancelled), tx.exception()
    source_survived(a, dom)


def test_a_refused_tls_connect_says_so_and_leaves_no_stage(hosts, pki):
    a, _ = hosts
    dom = busy(a, 8)
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                       # nobody listens there
    tx = migrate.migrate(dom, ("127.0.0.1", port), live=True, sim_dir=a,
                         tls=opts(pki, SENDER))
    assert default_loop().run_until(tx.done, 30)
    assert str(tx.exception()) == "cannot connect to the receiver: Connection refused", \
        tx.exception()
    assert default_loop().run_until(lambda: not _stages(), 30), _stages()
    source_survived(a, dom)


def test_tls_runs_in_stage_children_that_end_with_the_migration(hosts, pki):
    """Both ends' TLS runs in a stage child while the stream flows; the loop
    process spends a fraction of what the stream's AES-GCM costs; no stage
    outlives its migration."""
    import resource
    a, b = hosts
    dom = busy(a, 20, memory=256 * MB)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, digest=True,
                         tls=opts(pki, SENDER))
    seen: List[int] = []
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)

    def watch() -> bool:
        seen.append(len(_stages()))
        return tx.done() and rx.done()

    assert default_loop().run_until(watch, 120)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    sent, got = tx.result(), rx.result()
    assert sent.digest == got.digest
    assert max(seen) == 2, seen          # the sender's stage and the receiver's
    assert _stages() == []
    # Both ends ran on this loop, and both digests (sha256 of 2 x 256 MiB, about
    # 1.2 s) were made here: 1.9-2.9 s in all on 2 quiet vCPUs, 3.15 s once
    # beside the lane.  A bound for a gross regression; the stages seen above
    # are what says the TLS ran in them.
    own = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    assert own < 4.5, own


def test_killed_tls_stage_fails_the_migration_and_the_source_runs_on(hosts, pki):
    import signal
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, max_bandwidth=16 * MB,
                         tls=opts(pki, SENDER))
    assert default_loop().run_until(lambda: len(_stages()) == 2 and (tx.stats().bytes or 0) > 4 * MB, 60)
    # the sender's stage: the one whose command line says "client"
    mine = [p for p in _stages()
            if b"client" in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")]
    os.kill(mine[0], signal.SIGKILL)
    run_both(tx)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert not isinstance(exc, MigrationAuthError), exc
    assert "the TLS stage failed: killed by SIGKILL" in str(exc), exc
    assert exc.source_state == "running"
    source_survived(a, dom)
    assert default_loop().run_until(lambda: _stages() == [] or rx.done(), 60)
    rx.cancel()
    run_both(rx)
    assert domains(b) == []


def test_key_gone_before_the_connection_is_a_typed_failure(hosts, pki, tmp_path):
    """The files are loaded when the operation starts (StartupError) and again
    by the stage: one that vanished in between fails the migration in one line."""
    import shutil
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b)
    mine = tmp_path / "sender.key"
    o = opts(pki, SENDER)
    shutil.copy(o.key, mine)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a,
                         tls=TlsOptions(o.cert, str(mine), o.ca))
    mine.unlink()
    run_both(tx)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationError), exc
    assert f"cannot load the TLS certificate {o.cert} with key {mine}" in str(exc), exc
    assert "\n" not in str(exc)
    source_survived(a, dom)
    wait_refused(rx, 1)
    rx.cancel()
    run_both(rx)


def test_silent_or_closed_connections_start_no_stage(hosts, pki):
    """A TLS stage starts only once a peer has sent something: silent peers
    and port scans cost the receiver a socket, not a process."""
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b)
    silent = [socket.create_connection(rx.address) for _ in range(3)]
    scan = socket.create_connection(rx.address)
    scan.close()
    wait_refused(rx, 1)                      # the scan: closed before TLS
    default_loop().run_until(lambda: False, 0.5)
    assert _stages() == []
    for s in silent:
        s.close()
    wait_refused(rx, 4)
    real_migration(pki, a, b, dom, rx)


def test_a_plain_sender_to_a_tls_receiver_is_told_why_nobody_answered(hosts, pki):
    """A TLS receiver says nothing until a TLS client speaks: the plain sender's
    timeout says so, where it only said that nobody answered."""
    a, b = hosts
    dom = busy(a, 8)
    rx = receiver(pki, b)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, handshake_timeout=1)
    assert default_loop().run_until(tx.done, 60)
    assert str(tx.exception()).endswith(
        "no migration receiver answered within the handshake timeout (a receiver that wants "
        "TLS waits for it: give the sender --tls-*)"), tx.exception()
    rx.cancel()
    assert default_loop().run_until(rx.done, 30)
    source_survived(a, dom)


def test_a_bridge_closed_while_its_ready_line_is_on_the_way_says_nothing(pki):
    """A receiver that pushes a peer out during its handshake closes the peer's
    bridge; the stage's "ready", read after that, must not reach the owner
    (CI run 29: on_ready(-1, -1), then fcntl(-1) inside a loop callback)."""
    from pyxl.migrate.tls import TlsBridge
    loop = default_loop()
    raced = 0
    for _ in range(5):    # the race is between two processes: several tries
        near, far = socket.socketpair()
        got: List[Any] = []
        server = TlsBridge(loop, near, opts(pki, "receiver.test"), server=True,
                           on_ready=lambda r, w: got.append(("server", r, w)),
                           on_failed=lambda exc: got.append(("server failed", exc)))
        client = TlsBridge(loop, far, opts(pki, SENDER), server=False,
                           server_name="receiver.test",
                           on_ready=lambda r, w: got.append(("client", r, w)),
                           on_failed=lambda exc: got.append(("client failed", exc)))
        # the client is through: the server's stage has said, or is saying, "ready"
        assert loop.run_until(lambda: any(g[0] == "client" for g in got), 30), got
        raced += not any(g[0] == "server" for g in got) and \
            bool(select.select([server._control], [], [], 5)[0])   # "ready" unread
        server.close()
        client.abort()
        assert loop.run_until(lambda: server._child.finished and client._child.finished, 30)
        assert all(g[1] >= 0 for g in got if g[0] in ("server", "client")), got
        for g in got:
            if g[0] in ("server", "client"):
                for fd in {g[1], g[2]}:
                    os.close(fd)
    assert raced, "the server's ready line was read before the close every time"
