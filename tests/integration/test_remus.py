"""Checkpointed (Remus, stream type 1) saves and restores on fakexen.

The host answers postcopy (libxl's checkpoint records, then the guest runs on)
and checkpoint (another one after the interval, or a graceful end); the
receiver reads each checkpoint's libxl records and lets libxc go on.  Checked
with our helper and Debian's on either side: the received domain is the
source as it was at its last checkpoint, byte for byte; a sender that dies
between checkpoints leaves the receiver a failover to the last complete one.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import time
from typing import List

import pytest

import pyxl
from pyxl import sim
from pyxl.loop import default_loop
from pyxl.ops.operation import STREAM_REMUS

from conftest import HELPERS

MB = 1 << 20


def remus_save(a: str, dom: int, fd: int, helper: str, **kw) -> "tuple[pyxl.SaveOperation, List[str]]":
    """A checkpointed save that records the source's digest at every checkpoint
    (in postcopy, while the guest is still suspended)."""
    digests: List[str] = []
    op = pyxl.save(dom, fd, live=True, leave="running", sim_dir=a, stream_type=STREAM_REMUS,
                   helper=HELPERS[helper], checkpoint_interval=0.05, **kw)

    def postcopy(req: pyxl.CallbackRequest) -> None:
        digests.append(sim.digest(dom, sim_dir=a))
        return op._default_postcopy(req)

    op.callbacks["postcopy"] = postcopy
    return op, digests


@pytest.mark.parametrize("saver,restorer", [("ours", "ours"), ("debian", "debian"),
                                            ("ours", "debian"), ("debian", "ours")])
def test_checkpoints_arrive_byte_exact(hosts, saver, restorer, caplog):
    caplog.set_level(logging.INFO)
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a)
    time.sleep(0.1)
    left, right = socket.socketpair()
    save, digests = remus_save(a, dom, left.fileno(), saver, checkpoints=3)
    rest = pyxl.restore(right.fileno(), paused=True, sim_dir=b, stream_type=STREAM_REMUS,
                        helper=HELPERS[restorer])
    sent, got = pyxl.wait(save, rest, timeout=120)
    left.close()
    right.close()
    assert sent.checkpoints == 3 and got.checkpoints == 3 and len(digests) == 3
    assert len(set(digests)) == 3               # the guest ran between checkpoints
    assert sim.digest(got.domid, sim_dir=b) == digests[-1]
    assert sim.check_guest(got.domid, sim_dir=b).consistent
    # The primary ran on after its last checkpoint, and still does.
    assert sim.info(dom, sim_dir=a).state == "running"
    assert sim.info(got.domid, sim_dir=b).state == "paused"
    assert any("Restore successful" in r.getMessage() for r in caplog.records)


def test_failover_to_the_last_complete_checkpoint(hosts, caplog):
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a)
    time.sleep(0.1)
    left, right = socket.socketpair()
    save, digests = remus_save(a, dom, left.fileno(), "ours")
    taken: List[int] = []

    def checkpoint(req: pyxl.CallbackRequest) -> None:
        taken.append(save.checkpoints)
        if save.checkpoints >= 2:
            save.cancel()       # the primary "dies" between checkpoints 2 and 3
            default_loop().call_later(0.05, left.close)
            return None
        return req.reply(1)

    save.callbacks["checkpoint"] = checkpoint
    rest = pyxl.restore(right.fileno(), paused=True, sim_dir=b, stream_type=STREAM_REMUS)
    assert default_loop().run_until(lambda: save.done() and rest.done(), 120)
    assert isinstance(save.exception(), pyxl.Cancelled)
    assert sim.info(dom, sim_dir=a).state == "running"   # it was running between checkpoints
    got = rest.result()
    assert got.checkpoints == 2
    assert any("failover to the last one" in r.getMessage() for r in caplog.records)
    assert sim.digest(got.domid, sim_dir=b) == digests[1]
    assert sim.check_guest(got.domid, sim_dir=b).consistent
    right.close()


def test_broken_stream_before_any_checkpoint_is_no_failover(hosts):
    a, b = hosts
    dom = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=a)
    r, w = os.pipe()
    save, _ = remus_save(a, dom, w, "ours")
    save.callbacks["suspend"] = lambda req: (save.cancel(), os.close(w), None)[2]
    rest = pyxl.restore(r, sim_dir=b, stream_type=STREAM_REMUS)
    assert default_loop().run_until(lambda: save.done() and rest.done(), 120)
    os.close(r)
    assert rest.exception() is not None and sim.list_domains(sim_dir=b) == []
    assert sim.info(dom, sim_dir=a).state == "running"


def remus_file(a: str, path, checkpoints: int) -> "tuple[pyxl.SaveResult, List[str]]":
    """A running 16 MiB guest's checkpointed stream, written to ``path``: the
    result and the source's digest at each checkpoint."""
    dom = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=a)
    time.sleep(0.1)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        save, digests = remus_save(a, dom, fd, "ours", checkpoints=checkpoints)
        sent = pyxl.wait(save, timeout=120)[0]
    finally:
        os.close(fd)
    return sent, digests


@pytest.mark.parametrize("source", ["file", "pipe"])
def test_stream_cut_in_a_checkpoints_libxl_records_fails_over(hosts, tmp_path, source, caplog):
    """The sender dies after libxc's CHECKPOINT record, inside libxl's records of
    that checkpoint: as libxl (a failure while it buffers them), the restore
    answers failover, and libxc runs the domain from the last complete checkpoint."""
    from pyxl.streamio import scan_path
    a, b = hosts
    path = tmp_path / "remus.stream"
    _, digests = remus_file(a, path, 3)
    third = [r.offset for r in scan_path(str(path), checkpointed=True).records
             if r.name == "CHECKPOINT"][2]
    with open(path, "r+b") as f:
        f.truncate(third + 8 + 4)       # half of the CHECKPOINT_END record's header
    if source == "file":
        rest = pyxl.restore(path, paused=True, sim_dir=b, stream_type=STREAM_REMUS)
    else:
        r, w = os.pipe()
        rest = pyxl.restore(r, paused=True, sim_dir=b, stream_type=STREAM_REMUS)
        feeder = subprocess.Popen(["cat", str(path)], stdout=w)
        os.close(w)
    got = pyxl.wait(rest, timeout=120)[0]
    if source == "pipe":
        feeder.wait(30)
        os.close(r)
    assert got.failover and got.checkpoints == 2
    assert sim.digest(got.domid, sim_dir=b) == digests[1]
    assert sim.check_guest(got.domid, sim_dir=b).consistent
    assert any("failover to checkpoint 2" in r.getMessage() for r in caplog.records)


def test_checkpointed_stream_in_a_file(hosts, tmp_path):
    a, b = hosts
    path = tmp_path / "remus.stream"
    sent, digests = remus_file(a, path, 2)
    assert sent.checkpoints == 2
    got = pyxl.wait(pyxl.restore(path, paused=True, sim_dir=b, stream_type=STREAM_REMUS),
                    timeout=120)[0]
    assert got.checkpoints == 2
    assert sim.digest(got.domid, sim_dir=b) == digests[-1]
    # The file ends with libxc's END (which libxc 4.17 leaves out) and libxl's END.
    assert path.read_bytes()[-16:] == b"\0" * 16


# ---------------------------------------------------------------------------
# Checkpointed migration (pyxl migrate --remus)

import json  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import sys  # noqa: E402

from pyxl import migrate  # noqa: E402

from conftest import ROOT  # noqa: E402

PYXL = [sys.executable, "-m", "pyxl"]


def _receiver(b: str, *extra: str) -> "tuple[subprocess.Popen[str], int]":
    rx = subprocess.Popen(PYXL + ["migrate-receive", "--listen", "127.0.0.1:0", "--sim-dir", b,
                                  "--remus"] + list(extra), stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, cwd=ROOT)
    assert rx.stderr is not None
    m = re.search(r":(\d+)$", rx.stderr.readline().strip())
    assert m
    return rx, int(m.group(1))


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_checkpointed_migration(hosts, helper):
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a)
    time.sleep(0.1)
    rx, port = _receiver(b, "--json", "--helper", HELPERS[helper])
    tx = subprocess.run(PYXL + ["migrate", "--live", "--remus", "--checkpoints", "3", "--interval",
                                "0.05", "--json", "--sim-dir", a, "--helper", HELPERS[helper],
                                str(dom), f"127.0.0.1:{port}"], capture_output=True, text=True,
                        timeout=120, cwd=ROOT)
    assert tx.returncode == 0, tx.stderr
    out, err = rx.communicate(timeout=60)
    assert rx.returncode == 0, err
    sent, got = json.loads(tx.stdout), json.loads(out)
    assert sent["checkpoints"] == 3 and got["checkpoints"] == 3 and not got["failover"]
    assert sent["digest"] == got["digest"]
    assert sim.list_domains(sim_dir=a) == []
    assert [i.state for i in sim.list_domains(sim_dir=b)] == ["running"]


def test_receiver_takes_over_when_the_sender_dies(hosts):
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a)
    time.sleep(0.1)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, remus=True)
    tx = subprocess.Popen(PYXL + ["migrate", "--live", "--remus", "--interval", "0.05",
                                  "--sim-dir", a, str(dom), f"127.0.0.1:{rx.address[1]}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    default_loop().call_later(2.0, lambda: tx.send_signal(signal.SIGKILL))
    got = pyxl.wait(rx, timeout=120)[0]
    tx.wait(timeout=30)
    assert got.failover and got.checkpoints >= 2
    assert sim.info(got.domid, sim_dir=b).state == "running"
    sim.pause(got.domid, sim_dir=b)
    check = sim.check_guest(got.domid, sim_dir=b)
    assert check.consistent, check


def test_stopped_sender_pauses_its_source_and_the_receiver_takes_over(hosts):
    """The take-over also names the copy: NAME--incoming to NAME through
    ``start_rename`` (0.4 s here, never waited for), then runs the guest."""
    from test_migrate import _SlowRename
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, name="r1", sim_dir=a)
    time.sleep(0.1)
    target = _SlowRename(b, a)
    rx = migrate.receive("127.0.0.1:0", backend=target, remus=True)
    tx = migrate.migrate(dom, rx.address, live=True, sim_dir=a, remus=True,
                         checkpoint_interval=0.05)
    default_loop().call_later(1.5, tx.cancel)
    assert default_loop().run_until(lambda: tx.done() and rx.done(), 120)
    exc = tx.exception()
    assert isinstance(exc, migrate.MigrationInDoubt) and exc.source_state == "paused", exc
    assert sim.info(dom, sim_dir=a).state == "paused"
    got = rx.result()
    assert got.failover and sim.info(got.domid, sim_dir=b).state == "running"
    assert target.renamed[-1] == "r1" and sim.info(got.domid, sim_dir=b).name == "r1"


def test_ctrl_c_of_a_cli_replication_says_where_the_guest_is(hosts):
    """Ctrl-C is how a replication without --checkpoints ends: the CLI says
    more than "interrupted" when the source is left paused and the copy runs."""
    a, b = hosts
    dom = sim.create(32 * MB, dirty_rate=8 * MB, name="r2", sim_dir=a)
    time.sleep(0.1)
    rx, port = _receiver(b)
    tx = subprocess.Popen(PYXL + ["migrate", "--live", "--remus", "--interval", "0.05",
                                  "--sim-dir", a, "r2", f"127.0.0.1:{port}"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    time.sleep(2.0)
    tx.send_signal(signal.SIGINT)
    _, err = tx.communicate(timeout=60)
    rx.communicate(timeout=60)
    assert tx.returncode == 130, err
    last = err.splitlines()[-1]
    assert last.startswith("pyxl: interrupted: ") and "failover" in last \
        and "the source is left paused" in last, err
    assert sim.info(dom, sim_dir=a).state == "paused"
    (copy,) = sim.list_domains(sim_dir=b)
    assert copy.state == "running"


def test_remus_needs_live_and_checkpoints_need_remus(hosts):
    a, _ = hosts
    dom = sim.create(4 * MB, sim_dir=a)
    with pytest.raises(ValueError):
        migrate.migrate(dom, "127.0.0.1:1", sim_dir=a, remus=True)
    with pytest.raises(ValueError):
        migrate.migrate(dom, "127.0.0.1:1", live=True, sim_dir=a, checkpoints=2)
    # a save too: checkpoints on a plain stream would be ignored
    with pytest.raises(ValueError, match="checkpoints is for a checkpointed stream"):
        pyxl.save(dom, "/nonexistent/x.save", live=True, sim_dir=a, checkpoints=3)
    assert sim.info(dom, sim_dir=a).state == "running"
    done = subprocess.run(PYXL + ["migrate", "--sim-dir", a, "--live", "--checkpoints", "2",
                                  str(dom), "127.0.0.1:1"], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert done.returncode == 2 and "go with --remus" in done.stderr



def test_a_long_replication_holds_one_checkpoints_steps_not_all(hosts):
    """Each checkpoint's steps (the checkpoint timer, the records' write; at
    the receiver the reader of its libxl records, records and all) are let go
    at the next one: every one was kept until the end (a replication meant to
    run for days grew by a checkpoint's device state each time)."""
    a, b = hosts
    dom = sim.create(8 * MB, sim_dir=a)
    left, right = socket.socketpair()
    save, _ = remus_save(a, dom, left.fileno(), "ours", checkpoints=40)
    save.checkpoint_interval = 0.001
    rest = pyxl.restore(right.fileno(), paused=True, sim_dir=b, stream_type=STREAM_REMUS)
    most = [0, 0]

    def sample() -> None:
        most[:] = [max(most[0], len(save._aux)), max(most[1], len(rest._aux))]
        if not (save.done() and rest.done()):
            default_loop().call_later(0.002, sample)
    sample()
    sent, got = pyxl.wait(save, rest, timeout=120)
    left.close()
    right.close()
    assert sent.checkpoints == 40 == got.checkpoints
    assert most[0] <= 4 and most[1] <= 4, most


def test_a_cancel_while_a_checkpoints_records_wait_for_the_peer_leaves_its_fd_alone(hosts):
    """The checkpoint's records wait for a peer that stopped reading, and the
    replication is cancelled: the write goes with the helper.  It used to
    outlive the operation: the caller's fd still watched and non-blocking, and
    once the peer read again, the guest resumed and a checkpoint counted on the
    finished operation."""
    import fcntl
    a, _ = hosts
    dom = sim.create(16 * MB, sim_dir=a)
    left, right = socket.socketpair()
    left.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 16)
    resumes: List[bool] = []
    save, _ = remus_save(a, dom, left.fileno(), "ours", checkpoints=5,
                         emulator_records=[(3, bytes(4 << 20))],
                         on_resume=lambda d: resumes.append(save.done()))
    loop = default_loop()

    def drain() -> None:            # the peer reads the stream, not the records after it
        if save.done():
            return
        if save.callbacks.get("_stalled") is None:
            try:
                while right.recv(1 << 20, socket.MSG_DONTWAIT):
                    pass
            except BlockingIOError:
                pass
        loop.call_later(0.001, drain)
    postcopy = save.callbacks["postcopy"]

    def stalled(req: pyxl.CallbackRequest) -> None:
        save.callbacks["_stalled"] = postcopy
        loop.call_later(0.3, save.cancel)
        return postcopy(req)
    save.callbacks["postcopy"] = stalled
    right.setblocking(False)
    drain()
    with pytest.raises(pyxl.Cancelled):
        pyxl.wait(save, timeout=60)
    fd = left.fileno()
    assert fd not in loop._w.writers
    assert not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK
    checkpoints = save.checkpoints
    while True:                     # the peer reads again
        try:
            if not right.recv(1 << 20):
                break
        except BlockingIOError:
            break
    loop.run_until(lambda: False, 0.3)
    assert save.checkpoints == checkpoints and True not in resumes
    left.close()
    right.close()
