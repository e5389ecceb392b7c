"""Device models over QMP: fakexen's device model process (pyxl.sim.devicemodel),
the loop-driven QMP client (pyxl.qmp.client), the QmpDeviceModel controller
(pyxl.backends.devicemodel) and SimBackend's device-model hooks, end to end with
real helpers -- and what happens when a device model dies, hangs, speaks garbage
or never gets ready."""

from __future__ import annotations

import json
import logging
import os
import struct
import subprocess
import sys
import time
from typing import Any, List, Optional, Tuple

import pytest

import pyxl
from pyxl import sim
from pyxl.backends.devicemodel import EMULATOR_CONTEXT, QmpDeviceModel
from pyxl.backends.sim import SimBackend
from pyxl.errors import DeviceModelError
from pyxl.loop import SelectorLoop, default_loop
from pyxl.qmp import (QmpClient, QmpCommandError, QmpConnectionError, QmpRemoteProtocolError,
                      QmpTimeout)
from pyxl.sim import devicemodel as simdm
from pyxl.sim import dmcontrol
from pyxl.sim.layout import CTL_FIELDS, CTL_MAGIC

from conftest import HELPERS, ROOT, children, domids, open_fds

MB = 1 << 20
PYXL = str(ROOT / ".venv" / "bin" / "pyxl")


# ---- helpers --------------------------------------------------------------------------------


def dm_processes(sim_dir: Optional[str] = None) -> List[int]:
    """pids of fakexen device models (of ``sim_dir``'s domains, or anyone's)."""
    out = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if zombie or not any(a.endswith(b"pyxl/sim/devicemodel.py") for a in argv):
            continue
        if sim_dir is None or os.path.abspath(sim_dir).encode() in argv:
            out.append(int(pid))
    return out


def wait_for(pred, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def qmp(domid: int, sim_dir: str, name: str, args: Optional[dict] = None,
        fds=(), timeout: float = 5.0) -> Any:
    """One command through a QmpClient on a private loop (raises its error)."""
    loop = SelectorLoop()
    out: List[Tuple[Any, Optional[DeviceModelError]]] = []
    client = QmpClient(loop, dmcontrol.qmp_path(domid, sim_dir), timeout=timeout)
    try:
        client.connect(lambda err: None)
        client.command(name, args, lambda v, e: out.append((v, e)), fds=fds)
        assert loop.run_until(lambda: bool(out), timeout + 2)
    finally:
        client.close()
        loop.close()
    value, err = out[0]
    if err is not None:
        raise err
    return value


def qmp_log(domid: int, sim_dir: str) -> List[str]:
    """The QMP commands the device model received, in order (from its log)."""
    path = os.path.join(dmcontrol.domain_dir(domid, sim_dir), dmcontrol.LOG_FILE)
    with open(path) as f:
        return [line.split()[1] + ("" if line.split()[2] in ("{}",) else " " +
                                   " ".join(line.split()[2:]))
                for line in f if line.startswith("qmp: ")]


def dm_state(domid: int, sim_dir: str) -> simdm.DeviceState:
    return simdm.DeviceState.decode(dmcontrol.read_state(dmcontrol.domain_dir(domid, sim_dir)))


def domain_files(domid: int, sim_dir: str) -> List[str]:
    return sorted(os.listdir(dmcontrol.domain_dir(domid, sim_dir)))


@pytest.fixture
def no_leaks(sim_dir):
    """Nothing of this process may be left: no fd, no child; and once the test's
    domains are destroyed, no device model of its state directory."""
    fds, kids = open_fds(), children()
    yield
    assert wait_for(lambda: open_fds() == fds and children() == kids, 5), \
        (open_fds(), fds, children(), kids)
    for d in domids(sim_dir):
        sim.destroy(d, sim_dir=sim_dir)
    assert wait_for(lambda: not dm_processes(sim_dir), 5), dm_processes(sim_dir)


FAKE_DM = r'''
import os, socket, sys, time
path, mode = sys.argv[1], sys.argv[2]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path + ".new")
srv.listen(8)
os.rename(path + ".new", path)      # listening once it is there
GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": ""}, "capabilities": ["oob"]}}\r\n')
kept = []
def line(c):
    data = b""
    while not data.endswith(b"\n"):
        chunk = c.recv(1)
        if not chunk:
            return None
        data += chunk
    return data
while True:
    c, _ = srv.accept()
    kept.append(c)
    if mode == "nothing":
        continue
    if mode == "garbage":
        c.sendall(b"\x00\xff garbage \x01\r\n")
        continue
    if mode == "close":
        c.close()
        continue
    c.sendall(GREETING)
    line(c)
    c.sendall(b'{"return": {}, "id": 1}\r\n')
    line(c)
    if mode == "wrong-id":
        c.sendall(b'{"return": {}, "id": 77}\r\n')
    elif mode == "huge":
        c.sendall(b"x" * (2 << 20))
    elif mode == "not-an-object":
        c.sendall(b'[{"return": {}, "id": 2}]\r\n')
'''


class FakeDeviceModel:
    """A process on the domain's QMP socket that is not a device model: it says
    nothing, sends garbage, closes at once, or answers wrongly."""

    def __init__(self, path: str, mode: str, tmp_path) -> None:
        script = tmp_path / "fake_dm.py"
        script.write_text(FAKE_DM)
        self.path = path
        self.proc = subprocess.Popen([sys.executable, "-I", str(script), path, mode],
                                     stdin=subprocess.DEVNULL)
        assert wait_for(lambda: os.path.exists(path)), "the fake device model did not listen"

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# ---- the device model process -----------------------------------------------------------------


def test_its_control_block_constants_are_fakexens():
    assert simdm.CTL_MAGIC == CTL_MAGIC
    assert CTL_FIELDS["magic"][0] == simdm.CTL_MAGIC_OFF
    assert CTL_FIELDS["domid"][0] == simdm.CTL_DOMID_OFF
    assert CTL_FIELDS["state"][0] == simdm.CTL_STATE_OFF
    assert CTL_FIELDS["uuid"] == (simdm.CTL_UUID_OFF, "16s")


def test_dmcontrol_names_the_device_models_files():
    """dmcontrol keeps its own copy of the file names (so that `pyxl sim list` need not
    load the device model program): the same names, and the program it runs is this one."""
    for name in ("QMP_SOCKET", "STATE_FILE", "REGS_FILE", "LOCK_FILE", "LOG_FILE"):
        assert getattr(dmcontrol, name) == getattr(simdm, name), name
    assert os.path.samefile(dmcontrol.PROGRAM, simdm.__file__)


def test_a_guest_with_a_device_model(sim_dir, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    domdir = dmcontrol.domain_dir(d, sim_dir)
    assert dmcontrol.has_device_model(d, sim_dir) and dmcontrol.ready(domdir)
    pid = dmcontrol.pid(domdir)
    assert pid in dm_processes(sim_dir)
    assert pid not in [p for p, _ in children()], "a daemon, not our child"
    status = qmp(d, sim_dir, "query-status")
    assert status == {"status": "running", "singlestep": False, "running": True}
    # its registers come from the guest's uuid and domid; paused guest: no ticks
    st = dm_state(d, sim_dir)
    uuid = bytes.fromhex(sim.info(d, sim_dir=sim_dir).uuid.replace("-", ""))
    assert st.uuid == uuid and st.domid == d
    assert st.regs == simdm.initial_registers(uuid, d) and st.counter == 0
    before = sim.digest(d, sim_dir=sim_dir)
    time.sleep(0.1)
    assert sim.digest(d, sim_dir=sim_dir) == before
    # running guest and device model: the counter advances, and the digest covers it
    sim.unpause(d, sim_dir=sim_dir)
    assert wait_for(lambda: dm_state(d, sim_dir).counter > 3)
    qmp(d, sim_dir, "stop")
    sim.pause(d, sim_dir=sim_dir)
    frozen = dm_state(d, sim_dir)
    sim.unpause(d, sim_dir=sim_dir)
    time.sleep(0.1)
    assert dm_state(d, sim_dir).encode() == frozen.encode(), "stopped: no ticks"
    assert qmp(d, sim_dir, "query-status")["status"] == "paused"
    sim.pause(d, sim_dir=sim_dir)
    assert sim.digest(d, sim_dir=sim_dir) != before
    qmp(d, sim_dir, "cont")
    # destroy kills it and removes its socket
    sim.destroy(d, sim_dir=sim_dir)
    assert pid not in dm_processes()
    assert not os.path.exists(domdir)


def test_device_model_exits_once_its_domain_is_gone(sim_dir, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    pid = dmcontrol.pid(dmcontrol.domain_dir(d, sim_dir))
    import shutil
    shutil.rmtree(dmcontrol.domain_dir(d, sim_dir))    # not destroyed: deleted under it
    assert wait_for(lambda: pid not in dm_processes(), 5)


def test_qmp_commands_of_the_device_model(sim_dir, tmp_path, any_loop, no_leaks):
    """The client on all three loops against fakexen's device model: greeting,
    capabilities, events, add-fd with SCM_RIGHTS, errors; nothing left watched."""
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    loop = any_loop.loop
    events: List[str] = []
    client = QmpClient(loop, dmcontrol.qmp_path(d, sim_dir), timeout=5,
                       on_event=lambda ev: events.append(ev.name))
    out: List[Tuple[str, Any, Any]] = []

    def reply(tag):
        return lambda value, err: out.append((tag, value, err))

    connected: List[Any] = []
    client.connect(connected.append)
    f = open(tmp_path / "state", "wb")
    client.command("stop", None, reply("stop"))           # queued until negotiated
    client.command("query-status", None, reply("status"))
    client.command("add-fd", {}, reply("add-fd"), fds=[f.fileno()])
    client.command("no-such-command", {}, reply("bad"))
    assert any_loop.run_until(lambda: len(out) == 4, 10)
    assert connected == [None] and client.greeting.version["qemu"]["major"] == 7
    tags = {t: (v, e) for t, v, e in out}
    assert tags["stop"] == ({}, None)
    assert tags["status"] == ({"status": "paused", "singlestep": False, "running": False}, None)
    added, err = tags["add-fd"]
    assert err is None and added["fdset-id"] == 0 and isinstance(added["fd"], int)
    assert isinstance(tags["bad"][1], QmpCommandError)
    assert tags["bad"][1].cls == "CommandNotFound"
    out.clear()
    client.command("xen-save-devices-state", {"filename": "/dev/fdset/0", "live": False},
                   reply("save"))
    client.command("cont", None, reply("cont"))
    assert any_loop.run_until(lambda: len(out) == 2 and "RESUME" in events, 10)
    f.close()
    assert [e for _, _, e in out] == [None, None]
    assert events == ["STOP", "RESUME"]
    saved = (tmp_path / "state").read_bytes()
    assert simdm.DeviceState.decode(saved).domid == d
    client.close()
    client.close()                               # idempotent
    got: List[Any] = []
    client.command("cont", None, lambda v, e: got.append(e))   # after close: an error, later
    assert got == []
    assert any_loop.run_until(lambda: bool(got), 5)
    assert isinstance(got[0], QmpConnectionError)


def test_client_connect_failures(sim_dir, tmp_path, no_leaks):
    loop = SelectorLoop()
    try:
        errs: List[Any] = []
        QmpClient(loop, str(tmp_path / "nobody"), timeout=5).connect(errs.append)
        assert loop.run_until(lambda: bool(errs), 2)
        assert isinstance(errs[0], QmpConnectionError) and "No such file" in str(errs[0])
        # waiting for a socket that never comes: bounded by the timeout
        t0 = time.monotonic()
        errs.clear()
        c = QmpClient(loop, str(tmp_path / "later"), timeout=0.3, retry_connect=True)
        c.connect(errs.append)
        assert loop.run_until(lambda: bool(errs), 3)
        assert isinstance(errs[0], QmpTimeout) and 0.25 < time.monotonic() - t0 < 2
        assert c.closed
        errs.clear()
        QmpClient(loop, "/tmp/" + "x" * 200, timeout=1).connect(errs.append)
        assert loop.run_until(lambda: bool(errs), 2)
        assert isinstance(errs[0], QmpConnectionError)
    finally:
        loop.close()


@pytest.mark.parametrize("mode,error", [
    ("nothing", QmpTimeout), ("garbage", QmpRemoteProtocolError),
    ("close", QmpConnectionError), ("wrong-id", QmpRemoteProtocolError),
    ("huge", QmpRemoteProtocolError), ("not-an-object", QmpRemoteProtocolError),
])
def test_client_against_a_broken_device_model(tmp_path, mode, error):
    fds = open_fds()
    fake = FakeDeviceModel(str(tmp_path / "qmp.sock"), mode, tmp_path)
    loop = SelectorLoop()
    try:
        got: List[Any] = []
        lost: List[Any] = []
        c = QmpClient(loop, fake.path, timeout=0.5, on_lost=lost.append)
        c.connect(lambda err: got.append(("connect", err)))
        c.command("stop", None, lambda v, e: got.append(("stop", e)))
        t0 = time.monotonic()
        assert loop.run_until(lambda: len(got) == 2, 5)
        assert time.monotonic() - t0 < 2
        errs = [e for _, e in got if e is not None]
        assert errs and all(isinstance(e, error) for e in errs), got
        assert isinstance(errs[0], DeviceModelError)
        assert c.closed
        # a broken connection is reported to on_lost too; a timeout closes no connection
        # of its own accord: the connect timeout does, and says so to connect's caller
        assert len(lost) == 1 and isinstance(lost[0], error)
    finally:
        fake.stop()
        loop.close()
    assert open_fds() == fds


def test_command_timeout_leaves_the_connection_usable(sim_dir, monkeypatch, no_leaks):
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "hang:xen-set-global-dirty-log")
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    loop = SelectorLoop()
    try:
        out: List[Any] = []
        c = QmpClient(loop, dmcontrol.qmp_path(d, sim_dir), timeout=5)
        c.connect(lambda err: None)
        c.command("query-status", None, lambda v, e: out.append(("a", v, e)))
        c.command("xen-set-global-dirty-log", {"enable": True},
                  lambda v, e: out.append(("b", v, e)), timeout=0.2)
        assert loop.run_until(lambda: len(out) == 2, 5)
        assert out[0][2] is None and isinstance(out[1][2], QmpTimeout)
        assert not c.closed
        c.close()
    finally:
        loop.close()


# ---- QmpDeviceModel ---------------------------------------------------------------------------


def controller(d: int, sim_dir: str, **kw: Any) -> QmpDeviceModel:
    domdir = dmcontrol.domain_dir(d, sim_dir)
    return QmpDeviceModel(d, dmcontrol.qmp_path(d, sim_dir),
                          kill=lambda: dmcontrol.kill(domdir), **kw)


def run_step(start, timeout: float = 10.0):
    loop = SelectorLoop()
    out: List[Any] = []
    try:
        start(loop, lambda *a: out.append(a))
        assert loop.run_until(lambda: bool(out), timeout)
    finally:
        loop.close()
    return out[0]


def test_controller_save_writes_libxl_records(sim_dir, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    dm = controller(d, sim_dir)
    domdir = dmcontrol.domain_dir(d, sim_dir)
    # The state goes through a file with no name: what the device model (the
    # guest's first target) plants where libxl names its files is never
    # opened -- not a symlink to a file of root's, not a FIFO.
    victim = os.path.join(sim_dir, "victim")
    with open(victim, "wb") as f:
        f.write(b"precious")
    os.symlink(victim, os.path.join(domdir, "qemu-save"))
    os.mkfifo(os.path.join(domdir, "qemu-resume"))
    (err,) = run_step(lambda loop, done: dm.start_logdirty(loop, True, done))
    assert err is None
    records, err = run_step(lambda loop, done: dm.start_save(loop, False, done))
    assert err is None
    assert [t for t, _ in records] == [EMULATOR_CONTEXT]
    body = records[0][1]
    assert struct.unpack_from("<II", body) == (2, 0)        # qemu-xen, index 0
    assert body[8:] == dmcontrol.read_state(domdir)
    with open(victim, "rb") as f:
        assert f.read() == b"precious"
    assert os.readlink(os.path.join(domdir, "qemu-save")) == victim     # not pyxl's to touch
    assert qmp(d, sim_dir, "query-status")["status"] == "paused"
    assert qmp(d, sim_dir, "query-fdsets") == [], "the descriptor was given back"
    assert qmp_log(d, sim_dir) == [
        "qmp_capabilities", 'xen-set-global-dirty-log {"enable": true}',
        "qmp_capabilities", "stop", "add-fd",
        'xen-save-devices-state {"filename": "/dev/fdset/0", "live": false}',
        'remove-fd {"fdset-id": 0}',
        "qmp_capabilities", "query-status", "qmp_capabilities", "query-fdsets"]
    dm.resume()
    assert qmp(d, sim_dir, "query-status")["status"] == "running"


def test_a_device_state_over_the_restore_bound_fails_the_save(sim_dir, tmp_path, no_leaks):
    """A save takes no more device state than a restore would (the backend's
    ``max_emulator_context``): an image that could never be restored is not
    written, and the guest runs on."""
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    records, err = run_step(lambda loop, done: controller(d, sim_dir, max_state=1024).start_save(
        loop, False, done))
    assert records is None and isinstance(err, DeviceModelError)
    assert str(err).startswith("device-model state of ") and "(more than 1024, the most a " \
        "restore takes)" in str(err)
    controller(d, sim_dir).resume()
    e = sim.create(16 * MB, sim_dir=sim_dir, device_model=True)
    backend = SimBackend(sim_dir)
    backend.max_emulator_context = 1024   # type: ignore[attr-defined]
    with pytest.raises(pyxl.OperationError, match="more than 1024, the most a restore takes"):
        pyxl.wait(pyxl.save(e, tmp_path / "g", backend=backend, timeout=30))
    assert sim.state(e, sim_dir=sim_dir) == "running" and os.listdir(tmp_path) == []


def test_files_the_device_model_writes_are_never_waited_on(sim_dir, no_leaks):
    """The device model writes its state directory; what pyxl reads there
    from its loop must not be a FIFO it would wait on forever."""
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    domdir = dmcontrol.domain_dir(d, sim_dir)
    for name in (dmcontrol.STATE_FILE, dmcontrol.LOG_FILE):
        os.replace(os.path.join(domdir, name), os.path.join(domdir, name + ".was"))
        os.mkfifo(os.path.join(domdir, name))
    t = time.monotonic()
    with pytest.raises(DeviceModelError, match="device-model-state is not a regular file"):
        dmcontrol.ready(domdir)
    assert dmcontrol.log_tail(domdir) == ""
    assert time.monotonic() - t < 1


def test_controller_typed_errors(sim_dir, monkeypatch, no_leaks):
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "die:xen-save-devices-state,error:cont")
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    dm = controller(d, sim_dir, qmp_timeout=1)
    records, err = run_step(lambda loop, done: dm.start_save(loop, True, done))
    assert records is None and isinstance(err, QmpConnectionError), err
    assert "qemu-save" not in domain_files(d, sim_dir)
    with pytest.raises(QmpConnectionError):
        dm.resume()                                  # it died: nobody listens
    (err,) = run_step(lambda loop, done: dm.start_logdirty(loop, False, done))
    assert isinstance(err, QmpConnectionError)


def test_controller_resume_error_is_typed(sim_dir, monkeypatch, no_leaks):
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "error:cont")
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    with pytest.raises(QmpCommandError, match="injected failure of cont"):
        controller(d, sim_dir).resume()


# ---- SimBackend: save and restore through QMP -------------------------------------------------


def inspect_records(path) -> List[dict]:
    r = subprocess.run([PYXL, "inspect", "--json", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return [rec for rec in json.loads(r.stdout)["records"] if rec["layer"] == "libxl"]


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_save_restore_goes_through_qmp(sim_dir, tmp_path, helper, no_leaks):
    if helper == "debian" and not os.access(HELPERS["debian"], os.X_OK):
        pytest.skip("Debian's helper is not installed")
    d = sim.create(32 * MB, dirty_rate=4 * MB, sim_dir=sim_dir, device_model=True)
    assert wait_for(lambda: dm_state(d, sim_dir).counter > 2)
    sim.pause(d, sim_dir=sim_dir)
    want = sim.digest(d, sim_dir=sim_dir)
    state = dmcontrol.read_state(dmcontrol.domain_dir(d, sim_dir))
    res = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir, helper=HELPERS[helper]))[0]
    assert d not in domids(sim_dir)
    recs = inspect_records(res.path)
    assert [r["name"] for r in recs] == ["LIBXC_CONTEXT", "EMULATOR_CONTEXT", "END"]
    assert recs[1]["length"] == 8 + simdm.STATE_SIZE
    rres = pyxl.wait(pyxl.restore(res.path, paused=True, sim_dir=sim_dir, name="copy",
                                  helper=HELPERS[helper]))[0]
    assert rres.emulator_records == [(EMULATOR_CONTEXT, struct.pack("<II", 2, 0) + state)]
    n = rres.domid
    assert sim.digest(n, sim_dir=sim_dir) == want
    assert dmcontrol.read_state(dmcontrol.domain_dir(n, sim_dir)) == state
    assert qmp(n, sim_dir, "query-status")["status"] == "running"
    assert "qemu-resume" not in domain_files(n, sim_dir)
    # the restored device model runs on from the saved counter
    sim.unpause(n, sim_dir=sim_dir)
    assert wait_for(lambda: dm_state(n, sim_dir).counter > simdm.DeviceState.decode(state).counter)


def test_live_save_of_a_running_guest(sim_dir, tmp_path, no_leaks):
    d = sim.create(64 * MB, dirty_rate=32 * MB, sim_dir=sim_dir, device_model=True)
    time.sleep(0.1)
    res = pyxl.wait(pyxl.save(d, tmp_path / "g", live=True, leave="paused", sim_dir=sim_dir))[0]
    assert res.iterations >= 2
    assert qmp_log(d, sim_dir) == [
        "qmp_capabilities", 'xen-set-global-dirty-log {"enable": true}',
        "qmp_capabilities", "stop", "add-fd",
        'xen-save-devices-state {"filename": "/dev/fdset/0", "live": true}',
        'remove-fd {"fdset-id": 0}',
        "qmp_capabilities", 'xen-set-global-dirty-log {"enable": false}',
        "qmp_capabilities", "cont",                 # leave=paused: xl's pause + resume
    ]
    src = sim.digest(d, sim_dir=sim_dir)
    saved = dm_state(d, sim_dir)
    assert saved.counter > 0, "it ran while the guest did"
    rres = pyxl.wait(pyxl.restore(tmp_path / "g", paused=True, sim_dir=sim_dir, name="copy"))[0]
    assert sim.digest(rres.domid, sim_dir=sim_dir) == src
    assert dm_state(rres.domid, sim_dir).encode() == saved.encode()
    assert sim.check_guest(rres.domid, sim_dir=sim_dir).consistent


def test_save_of_a_guest_without_device_model_is_unchanged(sim_dir, tmp_path, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, paused=True, device_model=False)
    assert not dmcontrol.has_device_model(d, sim_dir)
    want = sim.digest(d, sim_dir=sim_dir)
    res = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))[0]
    assert [r["name"] for r in inspect_records(res.path)] == ["LIBXC_CONTEXT", "END"]
    n = pyxl.wait(pyxl.restore(res.path, paused=True, sim_dir=sim_dir))[0].domid
    assert sim.digest(n, sim_dir=sim_dir) == want
    assert not dmcontrol.has_device_model(n, sim_dir)


def test_device_model_killed_mid_save(sim_dir, tmp_path, monkeypatch, no_leaks, caplog):
    """It dies on xen-save-devices-state: the save fails with the device model's
    typed error, the guest runs again, nothing is left behind."""
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "die:xen-save-devices-state")
    d = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=sim_dir, device_model=True)
    pid = dmcontrol.pid(dmcontrol.domain_dir(d, sim_dir))
    target = tmp_path / "g"
    with caplog.at_level(logging.ERROR):
        with pytest.raises(pyxl.OperationError, match="device model failed: QmpConnectionError"):
            pyxl.wait(pyxl.save(d, target, live=True, sim_dir=sim_dir, timeout=30))
    assert sim.state(d, sim_dir=sim_dir) == "running"       # the guest was resumed
    assert "was resumed, but its device model was not" in caplog.text
    assert pid not in dm_processes()
    assert not target.exists() and os.listdir(tmp_path) == []
    assert "qemu-save" not in domain_files(d, sim_dir)


def test_failed_device_model_save_is_followed_by_cont(sim_dir, tmp_path, monkeypatch, no_leaks):
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "error:xen-save-devices-state")
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True)
    with pytest.raises(pyxl.OperationError, match="QmpCommandError.*injected failure"):
        pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir, timeout=30))
    assert sim.state(d, sim_dir=sim_dir) == "running"
    assert qmp(d, sim_dir, "query-status")["status"] == "running"
    log = qmp_log(d, sim_dir)
    assert log.index("stop") < len(log) - 1 and log[-2:] == ["qmp_capabilities", "query-status"]
    assert "cont" in log[log.index("stop"):]


@pytest.mark.parametrize("fault", ["garbage:stop", "hang:stop", "garbage-greeting", "silent"])
def test_broken_device_model_fails_the_save_in_time(sim_dir, tmp_path, monkeypatch, fault,
                                                    no_leaks, caplog):
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", fault)
    d = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=sim_dir, device_model=True)
    backend = SimBackend(sim_dir, qmp_timeout=0.5)
    t0 = time.monotonic()
    with caplog.at_level(logging.ERROR):
        with pytest.raises(pyxl.OperationError) as exc:
            pyxl.wait(pyxl.save(d, tmp_path / "g", live=True, backend=backend, timeout=30))
    took = time.monotonic() - t0
    assert took < 10, took
    want = "QmpTimeout" if fault in ("hang:stop", "silent") else "QmpRemoteProtocolError"
    if fault.endswith(":stop"):
        # the device model's save failed: the operation says so with its typed error
        assert f"device model failed: {want}" in str(exc.value)
    else:
        # log-dirty is the first QMP step: libxc gives up before suspending
        assert isinstance(exc.value, pyxl.HelperFailed)
        assert f"log-dirty on for domain {d}'s device model failed: {want}" in caplog.text
    assert sim.state(d, sim_dir=sim_dir) == "running"
    assert os.listdir(tmp_path) == []
    assert "qemu-save" not in domain_files(d, sim_dir)


@pytest.mark.parametrize("mode", ["nothing", "garbage", "close", "wrong-id"])
def test_a_fake_device_model_fails_the_save(sim_dir, tmp_path, mode, caplog):
    fds, kids = open_fds(), children()
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=False)
    fake = FakeDeviceModel(dmcontrol.qmp_path(d, sim_dir), mode, tmp_path)
    try:
        t0 = time.monotonic()
        with caplog.at_level(logging.ERROR):
            with pytest.raises(pyxl.OperationError):
                pyxl.wait(pyxl.save(d, tmp_path / "g", backend=SimBackend(sim_dir, qmp_timeout=0.5),
                                    timeout=30))
        assert time.monotonic() - t0 < 10
        want = {"nothing": "QmpTimeout", "garbage": "QmpRemoteProtocolError",
                "close": "QmpConnectionError", "wrong-id": "QmpRemoteProtocolError"}[mode]
        assert f"log-dirty on for domain {d}'s device model failed: {want}" in caplog.text
        assert sim.state(d, sim_dir=sim_dir) == "running"
    finally:
        fake.stop()
    assert not (tmp_path / "g").exists()
    assert open_fds() == fds and children() == kids


def test_restore_whose_device_model_never_gets_ready(sim_dir, tmp_path, monkeypatch, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    path = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))[0].path
    assert domids(sim_dir) == []
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "never-ready")
    t0 = time.monotonic()
    with pytest.raises(pyxl.OperationError, match="DeviceModelTimeout.*not ready after 0.5s"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir,
                               backend=SimBackend(sim_dir, dm_ready_timeout=0.5)))
    assert 0.5 <= time.monotonic() - t0 < 10
    assert domids(sim_dir) == [], "the half-made domain was destroyed"
    assert dm_processes(sim_dir) == []


def test_restore_whose_device_model_cannot_load_its_state(sim_dir, tmp_path, no_leaks):
    """A state that is not whole: the device model exits at once and says why."""
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    path = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))[0].path
    data = bytearray(open(path, "rb").read())
    at = data.rfind(simdm.STATE_MAGIC)
    data[at + 100] ^= 0xFF                           # one flipped bit of a register
    open(path, "wb").write(data)
    t0 = time.monotonic()
    with pytest.raises(pyxl.OperationError, match="checksum mismatch"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir, backend=SimBackend(sim_dir)))
    assert time.monotonic() - t0 < 10
    assert domids(sim_dir) == []


def test_restore_with_a_device_model_command_that_fails(sim_dir, tmp_path, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    path = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))[0].path
    backend = SimBackend(sim_dir, dm_command=lambda domid, fd: [sys.executable, "-c",
                                                               "import sys; sys.exit(7)"])
    with pytest.raises(pyxl.OperationError, match="exited with status 7|not running"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir, backend=backend))
    assert domids(sim_dir) == []
    # a command that runs but never gets ready: killed after the timeout, reaped
    backend = SimBackend(sim_dir, dm_ready_timeout=0.3, dm_command=lambda domid, fd: [
        sys.executable, "-c", "import time; time.sleep(60)"])
    with pytest.raises(pyxl.OperationError, match="DeviceModelTimeout"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir, backend=backend))
    assert children() == []
    assert domids(sim_dir) == []
    # ... and reaped before the failure is told (CI run 43: a zombie, when the
    # failure was told at the kill and the loop stopped before its exit came).
    # This one takes a while to die: 768 MiB to free.
    backend = SimBackend(sim_dir, dm_ready_timeout=1.5, dm_command=lambda domid, fd: [
        sys.executable, "-c", "import time; b = bytearray(b'x') * (768 << 20); time.sleep(60)"])
    with pytest.raises(pyxl.OperationError, match="DeviceModelTimeout"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir, backend=backend))
    assert children() == []


def test_device_models_start_through_the_spawner(sim_dir, tmp_path, monkeypatch, no_leaks):
    """The device model of a restore is started by pyxl-spawner (no fork,
    Popen or posix_spawn in this process: the loop never waits for its exec);
    a program that cannot run is a typed error, and nothing is left."""
    from pyxl.spawn import start_spawner
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    state = dmcontrol.read_state(dmcontrol.domain_dir(d, sim_dir))
    path = pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))[0].path
    start_spawner()
    forks: List[str] = []
    real_init = subprocess.Popen.__init__

    def spy(self: Any, *a: Any, **k: Any) -> None:
        forks.append(str(a[0] if a else k.get("args")))
        real_init(self, *a, **k)
    with monkeypatch.context() as m:
        m.setattr(subprocess.Popen, "__init__", spy)
        m.setattr(os, "fork", lambda: forks.append("fork") or -1)
        m.setattr(os, "posix_spawn", lambda *a, **k: forks.append("posix_spawn") or -1)
        n = pyxl.wait(pyxl.restore(path, paused=True, sim_dir=sim_dir))[0].domid
    assert forks == []
    assert dmcontrol.read_state(dmcontrol.domain_dir(n, sim_dir)) == state
    sim.destroy(n, sim_dir=sim_dir)
    backend = SimBackend(sim_dir, dm_command=lambda domid, fd: [str(tmp_path / "no-qemu")])
    with pytest.raises(pyxl.OperationError, match="cannot start domain .*device model.*no-qemu"):
        pyxl.wait(pyxl.restore(path, sim_dir=sim_dir, backend=backend))
    assert domids(sim_dir) == []


def test_cli_guests_get_a_device_model_from_the_environment(sim_dir, tmp_path, no_leaks):
    env = dict(os.environ, PYXL_SIM_DIR=sim_dir, PYXL_SIM_DEVICE_MODEL="1")
    r = subprocess.run([PYXL, "sim", "create", "--memory", "16M", "--paused", "--json"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)["domid"]
    assert dmcontrol.has_device_model(d, sim_dir)
    want = sim.digest(d, sim_dir=sim_dir)
    r = subprocess.run([PYXL, "save", str(d), str(tmp_path / "g")], capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([PYXL, "restore", "-p", "--json", str(tmp_path / "g")],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    n = json.loads(r.stdout)["domid"]
    assert sim.digest(n, sim_dir=sim_dir) == want
    assert dm_processes(sim_dir) == [dmcontrol.pid(dmcontrol.domain_dir(n, sim_dir))]


def test_migration_carries_the_device_model(hosts):
    from pyxl import migrate
    a, b = hosts
    d = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a, device_model=True)
    time.sleep(0.1)
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, digest=True)
    tx = migrate.migrate(d, rx.address, live=True, sim_dir=a, digest=True)
    sent, got = pyxl.wait(tx, rx, timeout=60)
    assert sent.digest == got.digest
    assert dmcontrol.has_device_model(got.domid, b)
    assert domids(a) == [] and wait_for(lambda: dm_processes(a) == [])
    assert qmp(got.domid, b, "query-status")["status"] == "running"



def test_controller_teardown(sim_dir, no_leaks):
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True, paused=True)
    domdir = dmcontrol.domain_dir(d, sim_dir)
    pid = dmcontrol.pid(domdir)
    dm = controller(d, sim_dir)
    dm.teardown()
    assert pid not in dm_processes()
    left = domain_files(d, sim_dir)
    assert "qmp.sock" not in left, left
    dm.teardown()                                    # nothing left to do: fine


def test_roundtrip_on_every_loop(sim_dir, tmp_path, any_loop, no_leaks):
    """Save and restore with a device model on SelectorLoop, HookLoop and AsyncioLoop:
    the QMP connections, the pidfd and the timers all go away (HookLoop checks)."""
    d = sim.create(16 * MB, dirty_rate=2 * MB, sim_dir=sim_dir, device_model=True)
    res = any_loop.run_until(pyxl.save(d, tmp_path / "g", live=True, leave="paused",
                                       sim_dir=sim_dir, loop=any_loop.loop))
    want = sim.digest(d, sim_dir=sim_dir)
    rres = any_loop.run_until(pyxl.restore(res.path, paused=True, sim_dir=sim_dir,
                                           name="copy", loop=any_loop.loop))
    assert sim.digest(rres.domid, sim_dir=sim_dir) == want


def remus_with_device_model(a: str, b: str):
    """A 3-checkpoint Remus stream of a guest with a device model, a -> b; the source's
    digest and device-model counter at each checkpoint (taken in postcopy)."""
    import socket as socketlib

    from pyxl.ops.operation import STREAM_REMUS
    d = sim.create(32 * MB, dirty_rate=8 * MB, sim_dir=a, device_model=True)
    time.sleep(0.05)
    digests: List[str] = []
    counters: List[int] = []
    left, right = socketlib.socketpair()
    save = pyxl.save(d, left.fileno(), live=True, leave="running", sim_dir=a,
                     stream_type=STREAM_REMUS, checkpoint_interval=0.05, checkpoints=3)

    def postcopy(req):
        digests.append(sim.digest(d, sim_dir=a))
        counters.append(dm_state(d, a).counter)
        return save._default_postcopy(req)

    save.callbacks["postcopy"] = postcopy
    rest = pyxl.restore(right.fileno(), paused=True, sim_dir=b, stream_type=STREAM_REMUS)
    try:
        sent, got = pyxl.wait(save, rest, timeout=120)
    finally:
        left.close()
        right.close()
    assert sent.checkpoints == got.checkpoints == 3
    return d, got, digests, counters, rest


def test_checkpoints_save_the_device_model_each_time(hosts):
    a, b = hosts
    d, got, digests, counters, rest = remus_with_device_model(a, b)
    assert counters == sorted(counters) and counters[0] < counters[-1], counters
    log = qmp_log(d, a)
    assert log.count("stop") == 3 and log.count("cont") == 3, log
    assert qmp(d, a, "query-status")["status"] == "running"    # the primary runs on
    # each checkpoint carried the device model's state of that moment
    assert [t for t, _ in rest.checkpoint_records] == [EMULATOR_CONTEXT]
    state = simdm.DeviceState.decode(rest.checkpoint_records[0][1][8:])
    assert state.counter == counters[-1]


def test_checkpointed_restore_starts_the_last_checkpoints_device_model(hosts):
    a, b = hosts
    d, got, digests, counters, rest = remus_with_device_model(a, b)
    assert dmcontrol.has_device_model(got.domid, b)
    assert sim.digest(got.domid, sim_dir=b) == digests[-1]


def test_a_device_model_slow_to_cont_does_not_hold_the_loop(sim_dir, tmp_path, monkeypatch,
                                                             no_leaks, caplog):
    """``save -c``: the guest is resumed from the loop (QMP ``cont`` on it, not on
    a private loop inside a callback).  A device model that never answers
    ``cont`` costs the QMP timeout, while the caller's timer keeps ticking; the
    image is safe and the save succeeds, saying it could not leave the guest
    running."""
    monkeypatch.setenv("PYXL_SIM_DM_FAULT", "hang:cont")
    d = sim.create(16 * MB, sim_dir=sim_dir, device_model=True)
    backend = SimBackend(sim_dir, qmp_timeout=0.8)
    loop = default_loop()
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not op.done():
            loop.call_later(0.02, tick)

    with caplog.at_level(logging.ERROR):
        op = pyxl.save(d, tmp_path / "g", leave="running", backend=backend, timeout=30)
        tick()
        (res,) = pyxl.wait(op)
    took = ticks[-1] - ticks[0]
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert took >= 0.8 and max(gaps) < 0.4, (took, max(gaps))
    assert res.path == str(tmp_path / "g") and os.path.getsize(res.path) > 16 * MB
    assert f"saved domain {d}, but could not leave it running" in caplog.text
    assert "QMP cont: no answer from" in caplog.text
