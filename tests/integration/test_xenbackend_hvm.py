"""The real-Xen backend with an HVM guest, without Xen: the domain libxl would
build (createdomain flags, HVM params, XenStore layout and permissions), what
build_post adds, the device model started on the saved state (a stand-in QEMU
that records its argv, environment and incoming state), and the teardown.

The hypervisor is a recording stand-in (tests/xenfakes.py) and xenstored a
tiny in-process one.  What only real Xen can tell -- that Xen accepts these
hypercalls, that Debian's QEMU takes this argv, loads the state and writes
``running``, that the guest runs on -- is for the real-Xen lane (xen-e2e)."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from typing import List, Tuple

import pytest

from pyxl.backends import hvm, libxlcfg, qemu_args, xenbuild, xendevices, xenstore
from pyxl.backends.xen import XenBackend
from pyxl.backends.xenctrl import SHUTDOWN_suspend
from pyxl.errors import DeviceModelError, StartupError
from pyxl.loop import SelectorLoop
from pyxl.stream.libxl import EMULATOR_HEADER, LibxlRecordType
from xenfakes import FakeXenstored, RecordingXc, backend, reaped

UUID = "4b0f2d2e-6c8e-4a51-9d7c-0a0b0c0d0e0f"

FAKE_QEMU = """\
import json, os, signal, sys, time
# QEMU handles SIGHUP itself (it quits), whatever it inherited: a suite run
# under nohup gives its children SIGHUP ignored.
signal.signal(signal.SIGHUP, signal.SIG_DFL)
with open(os.environ["HOTPLUG_LOG"], "a") as f:
    f.write("qemu started\\n")
args = sys.argv[1:]
fd = int(args[args.index("-incoming") + 1].split(":")[1])
state = os.read(fd, 1 << 20)
with open(os.environ["FAKE_QEMU_OUT"], "w") as f:
    json.dump({"argv": sys.argv, "state": state.hex(), "sid": os.getsid(0) == os.getpid(),
               "env": {k: os.environ.get(k) for k in ("XEN_DOMAIN_ID", "XEN_QEMU_CONSOLE_LIMIT")},
               "stdin": os.read(0, 10).hex()}, f)
print("fake qemu: up", flush=True)
if os.environ.get("FAKE_QEMU_EXIT"):
    print("fake qemu: giving up", file=sys.stderr, flush=True)
    sys.exit(int(os.environ["FAKE_QEMU_EXIT"]))
time.sleep(60)
"""


FAKE_SCRIPT = """#!/bin/sh
echo "${0##*/} $* XENBUS_TYPE=$XENBUS_TYPE XENBUS_PATH=$XENBUS_PATH vif=$vif""" \
    """ INTERFACE=$INTERFACE netdev=$netdev script=$script" >> "$HOTPLUG_LOG"
if [ -n "$FAKE_SCRIPT_FAIL" ]; then echo "${0##*/}: cannot do it" >&2; exit 1; fi
"""


@pytest.fixture
def xsd():
    f = FakeXenstored()
    f.kernel_backends()
    yield f
    f.close()


@pytest.fixture
def host(tmp_path, monkeypatch):
    """Xen's directories in tmp_path, and a stand-in QEMU."""
    for d in ("lib", "log", "run"):
        (tmp_path / d).mkdir()
    monkeypatch.setattr("pyxl.backends.xen.USERDATA_DIR", str(tmp_path / "lib"))
    monkeypatch.setattr(hvm, "LIB_DIR", str(tmp_path / "lib"))
    monkeypatch.setattr(hvm, "LOG_DIR", str(tmp_path / "log"))
    monkeypatch.setattr(qemu_args, "RUN_DIR", str(tmp_path / "run"))
    qemu = tmp_path / "qemu"
    qemu.write_text(f"#!{sys.executable}\n" + FAKE_QEMU)
    qemu.chmod(0o755)
    monkeypatch.setenv("FAKE_QEMU_OUT", str(tmp_path / "qemu.json"))
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    for name in ("block", "vif-bridge"):
        (scripts / name).write_text(FAKE_SCRIPT)
        (scripts / name).chmod(0o755)
    monkeypatch.setattr(libxlcfg, "XEN_SCRIPT_DIR", str(scripts))
    monkeypatch.setenv("HOTPLUG_LOG", str(tmp_path / "hotplug.log"))
    (tmp_path / "net" / "xenbr0" / "bridge").mkdir(parents=True)    # as /sys/class/net
    monkeypatch.setattr(xendevices, "SYS_CLASS_NET", str(tmp_path / "net"))
    (tmp_path / "hvm1.img").write_bytes(b"\0" * 4096)
    return tmp_path


def hvm1(host) -> dict:
    """xen-e2e's hvm1 as xl stores it, with the stand-in QEMU as device_model."""
    return {
        "c_info": {"type": "hvm", "name": "hvm1", "uuid": UUID},
        "b_info": {"max_vcpus": 1, "avail_vcpus": [0], "max_memkb": 131072,
                   "target_memkb": 131072, "video_memkb": 0, "tsc_mode": "native",
                   "kernel": "/e2e/vmlinuz", "ramdisk": "/e2e/initrd.gz",
                   "cmdline": "console=hvc0", "device_model": str(host / "qemu"),
                   "type.hvm": {"vga": {"kind": "none"}, "vnc": {"enable": "False"},
                                "serial": "none"}},
        "disks": [{"pdev_path": str(host / "hvm1.img"), "vdev": "xvda", "format": "raw",
                   "readwrite": 1}],
        "nics": [{"devid": 0, "mac": "00:16:3e:00:00:03", "bridge": "xenbr0",
                  "nictype": "vif_ioemu"}],
    }


def context_record(blob: bytes) -> Tuple[int, bytes]:
    return LibxlRecordType.EMULATOR_CONTEXT, EMULATOR_HEADER.pack(2, 0) + blob


@pytest.mark.parametrize("release", ["4.17", "4.20"])
def test_hvm_restore_target_as_libxl_builds_it(xsd, host, release):
    be = backend(xsd, RecordingXc(release=release))
    assert be.create_restore_target(hvm1(host)) == 7
    # the altp2m mode: a createdomain field on 4.20 (the param is read-only
    # there), an HVM param on 4.17
    assert be.xc.created_kw == [{"altp2m": 0}]
    altp2m_param = [(35, 0)] if release == "4.17" else []
    (handle, flags, max_vcpus, evtchn, _gf, _mf, gopts, _pool, emu, misc, _ssid), = be.xc.created
    assert handle == bytes.fromhex(UUID.replace("-", ""))
    assert flags == xenbuild.XEN_DOMCTL_CDF_hvm | xenbuild.XEN_DOMCTL_CDF_hap
    assert emu == 0x3FF and misc == 0          # XEN_X86_EMU_ALL & ~XEN_X86_EMU_VPCI (4.17)
    assert (max_vcpus, evtchn, gopts) == (1, 1023, 2)
    log = be.xc.log
    params = [c[2:] for c in log if c[0] == "xc_hvm_param_set"]
    # hvm_set_conf_params: HPET_ENABLED, VPT_ALIGN (no MCA_CAP), TIMER_MODE, ALTP2M
    assert params == [(11, 1), (16, 1), (10, 1)] + altp2m_param
    names = [c[0] for c in log]
    assert names == ["xc_domain_max_vcpus", "xc_domain_setmaxmem", "xc_evtchn_alloc_unbound",
                     "xc_evtchn_alloc_unbound"] + ["xc_hvm_param_set"] * len(params) + \
        ["xc_domain_set_tsc_info", "xc_set_paging_mempool_size"]
    calls = {c[0]: c[1:] for c in log}
    assert calls["xc_domain_set_tsc_info"] == (7, 2, 0, 0, 0)
    assert calls["xc_set_paging_mempool_size"] == (7, 4 * (256 + 128) << 10)
    n, perms = xsd.nodes, xsd.perms
    assert n["/libxl/7/type"] == b"hvm" and n["/libxl/7/dm-version"] == b"qemu_xen"
    assert perms["/local/domain/7/hvmloader"] == ["n0", "r7"]
    for f in ("s3", "s4", "suspend"):
        assert perms[f"/local/domain/7/control/feature-{f}"] == ["n7"]
    assert "/local/domain/0/device-model/7" in n
    stored = json.loads((host / "lib" / f"userdata-d.7.{UUID}.libxl-json")
                        .read_bytes().rstrip(b"\0"))
    assert stored["nics"][0]["nictype"] == "vif_ioemu" and stored["b_info"]["video_memkb"] == 0


def test_restore_done_hvm_nodes(xsd, host):
    be = backend(xsd, RecordingXc())
    be.create_restore_target(hvm1(host))
    be.restore_done(7, 0xfeffc, 0xfefff)
    n, perms = xsd.nodes, xsd.perms
    vm = f"/vm/{UUID}"
    assert n[f"{vm}/rtc/timeoffset"] == b"" and n[f"{vm}/image/ostype"] == b"hvm"
    assert n[f"{vm}/start_time"]
    assert (n["/local/domain/7/memory/target"], n["/local/domain/7/memory/videoram"]) == \
        (b"131072", b"0")
    assert n["/local/domain/7/store/ring-ref"] == str(0xfeffc).encode()
    # console 0 (xenconsoled) as for PV, and QEMU's vkb (vkb_device defaults on)
    assert n["/local/domain/7/console/ring-ref"] == str(0xfefff).encode()
    assert perms["/local/domain/7/console"] == ["n0", "r7"]
    front, back = "/local/domain/7/device/vkbd/0", "/local/domain/0/backend/vkbd/7/0"
    assert n[f"{front}/backend"] == back.encode() and n[f"{back}/frontend"] == front.encode()
    assert (n[f"{front}/state"], n[f"{back}/state"], n[f"{back}/online"]) == (b"1", b"1", b"1")
    assert perms[front] == ["n7", "r0"] and perms[back] == ["n0", "r7"]
    assert n["/libxl/7/device/vkbd/0/frontend"] == front.encode()
    intro = [p for (t, _tx, p) in xsd.log if t == 8]
    assert intro == [[b"7", str(0xfeffc).encode(), b"1", b""]]


def qemu_writes_running(xsd: FakeXenstored, within: float = 10.0) -> None:
    """What QEMU does once it runs (device-model/7/state = running), from a
    thread, once the stand-in QEMU has started (within ``within`` s)."""
    def qemu_side() -> None:
        for _ in range(int(within * 100)):
            if os.path.exists(os.environ["FAKE_QEMU_OUT"]):
                xsd.write("/local/domain/0/device-model/7/state", b"running")
                return
            time.sleep(0.01)
    threading.Thread(target=qemu_side, daemon=True).start()


#: the stream's EMULATOR_XENSTORE_DATA record: one physmap key
XS_DATA = (LibxlRecordType.EMULATOR_XENSTORE_DATA,
           EMULATOR_HEADER.pack(2, 0) + b"physmap/1/name\0vga\0")


def restored_hvm1(xsd: FakeXenstored, host) -> XenBackend:
    """A backend with hvm1 built as domain 7, its helper done: ready for QEMU."""
    be = backend(xsd, RecordingXc())
    be.create_restore_target(hvm1(host))
    be.restore_done(7, 0xfeffc, 0xfefff)
    return be


def _start_dm(be, records, timeout=10.0, write_running=True, xsd=None):
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    if write_running:
        qemu_writes_running(xsd)
    t = be.start_restore_device_model(loop, 7, records, lambda ok, why: out.append((ok, why)))
    loop.run_until(lambda: bool(out), timeout=timeout + 10)
    loop.close()
    return out, t


def test_device_model_started_on_the_saved_state(xsd, host):
    be = restored_hvm1(xsd, host)
    qmp = FakeQmp(qemu_args.qmp_path(7))        # the stand-in QEMU's QMP, served here
    try:
        out, _ = _start_dm(be, [XS_DATA, context_record(b"QEVM" + bytes(range(256)))], xsd=xsd)
    finally:
        qmp.close()
    assert out == [(True, "")]
    # libxl's postconfig: the serial pty published
    assert [c[0] for c in qmp.commands] == ["query-chardev"]
    assert xsd.nodes["/local/domain/7/serial/0/tty"] == b"/dev/pts/5"
    assert "/local/domain/7/serial/1/tty" not in xsd.nodes
    rec = json.loads((host / "qemu.json").read_text())
    argv = rec["argv"]
    fd = argv[argv.index("-incoming") + 1]
    expected = qemu_args.device_model_command(hvm1(host), 7, int(fd.split(":")[1]), {}).argv
    assert argv == expected
    assert rec["state"] == (b"QEVM" + bytes(range(256))).hex()
    assert rec["env"] == {"XEN_DOMAIN_ID": "7", "XEN_QEMU_CONSOLE_LIMIT": "1048576"}
    assert rec["sid"] and rec["stdin"] == ""           # own session, stdin /dev/null
    n = xsd.nodes
    pid = int(n["/local/domain/7/image/device-model-pid"])
    assert n["/local/domain/0/device-model/7/physmap/1/name"] == b"vga"
    assert (n["/local/domain/7/hvmloader/bios"],
            n["/local/domain/7/hvmloader/allow-memory-relocate"]) == (b"seabios", b"0")
    assert not (host / "lib" / "qemu-resume.7").exists()     # never named: a memfd
    assert "fake qemu: up" in (host / "log" / "qemu-dm-hvm1.log").read_text()
    # the disk before QEMU, the NIC after it, with Xen's scripts and libxl's environment
    log = (host / "hotplug.log").read_text().splitlines()
    scripts = str(host / "scripts")
    assert log == [
        f"block add XENBUS_TYPE=vbd XENBUS_PATH=backend/vbd/7/51712 vif= INTERFACE= netdev= "
        f"script={scripts}/block",
        "qemu started",
        f"vif-bridge online type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/7/0 vif=vif7.0 "
        f"INTERFACE=vif7.0-emu netdev= script={scripts}/vif-bridge",
        f"vif-bridge add type_if=tap XENBUS_TYPE=vif XENBUS_PATH=backend/vif/7/0 vif=vif7.0 "
        f"INTERFACE=vif7.0-emu netdev= script={scripts}/vif-bridge"]
    vbd, vbdf = "/local/domain/0/backend/vbd/7/51712", "/local/domain/7/device/vbd/51712"
    assert {k[len(vbd) + 1:]: v for k, v in xsd.subtree(vbd).items() if k != vbd} == {
        "frontend": vbdf.encode(), "params": str(host / "hvm1.img").encode(),
        "script": f"{scripts}/block".encode(), "frontend-id": b"7", "online": b"1",
        "removable": b"0", "bootable": b"1", "state": b"2", "dev": b"xvda", "type": b"phy",
        "mode": b"w", "device-type": b"disk", "discard-enable": b"1", "specification": b"xen"}
    assert {k[len(vbdf) + 1:]: v for k, v in xsd.subtree(vbdf).items() if k != vbdf} == {
        "backend": vbd.encode(), "backend-id": b"0", "state": b"1", "virtual-device": b"51712",
        "device-type": b"disk", "trusted": b"1"}
    assert xsd.perms[vbdf] == ["n7", "r0"] and xsd.perms[vbd] == ["n0", "r7"]
    vif, viff = "/local/domain/0/backend/vif/7/0", "/local/domain/7/device/vif/0"
    assert {k[len(vif) + 1:]: v for k, v in xsd.subtree(vif).items() if k != vif} == {
        "frontend": viff.encode(), "frontend-id": b"7", "online": b"1", "state": b"2",
        "script": f"{scripts}/vif-bridge".encode(), "mac": b"00:16:3e:00:00:03",
        "bridge": b"xenbr0", "handle": b"0", "type": b"vif_ioemu", "hotplug-status": b""}
    assert {k[len(viff) + 1:]: v for k, v in xsd.subtree(viff).items() if k != viff} == {
        "backend": vif.encode(), "backend-id": b"0", "state": b"1", "handle": b"0",
        "mac": b"00:16:3e:00:00:03", "trusted": b"1", "mtu": b"1500"}
    assert xsd.perms[f"{viff}/mtu"] == ["n0", "r7"] and xsd.perms[f"{viff}/mac"] == ["n7", "r0"]
    assert xsd.nodes["/libxl/7/device/vif/0/type"] == b"vif_ioemu"
    # destroy: libxl's order, QEMU gets SIGHUP, nothing of the domain is left
    open(qemu_args.qmp_paths(7)[1], "w").close()
    (host / "lib" / "qemu-save.7").write_bytes(b"x")
    proc = be._dm_procs[7]
    assert proc.pid == pid
    be.destroy(7)
    assert be.xc.log.index(("pause", 7)) < be.xc.log.index(("destroy", 7))
    assert reaped(proc) == -signal.SIGHUP
    assert not [p for p in n if p.startswith(("/local/domain/7", f"/vm/{UUID}", "/libxl/7",
                                              "/local/domain/0/device-model/7",
                                              "/local/domain/0/backend/vkbd/7"))]
    assert not [p for p in qemu_args.qmp_paths(7) if os.path.exists(p)]
    assert sorted(os.listdir(host / "lib")) == []
    removal = (host / "hotplug.log").read_text().splitlines()[4:]
    vifs = [line.split()[1] for line in removal if line.startswith("vif-bridge")]
    assert vifs == ["offline", "remove"]      # the tap's run after the vif's
    assert sorted(removal) == [
        f"block remove XENBUS_TYPE=vbd XENBUS_PATH=backend/vbd/7/51712 vif= INTERFACE= netdev= "
        f"script={scripts}/block",
        f"vif-bridge offline type_if=vif XENBUS_TYPE=vif XENBUS_PATH=backend/vif/7/0 vif=vif7.0 "
        f"INTERFACE=vif7.0-emu netdev= script={scripts}/vif-bridge",
        f"vif-bridge remove type_if=tap XENBUS_TYPE=vif XENBUS_PATH=backend/vif/7/0 vif=vif7.0 "
        f"INTERFACE=vif7.0-emu netdev= script={scripts}/vif-bridge"]
    # empty parents go too (libxl__xs_path_cleanup); dom0's own nodes stay
    assert not [p for p in n if p.startswith("/local/domain/0/backend/")]
    assert not [p for p in n if p.startswith("/local/domain/7")]


def test_qemu_and_hotplug_scripts_are_not_forked_by_this_process(xsd, host, monkeypatch):
    """QEMU and every hotplug script (the disk's and the NIC's, added and
    removed) are started by pyxl-spawner: no fork, Popen or posix_spawn here,
    where the loop would wait for each exec (20-150 ms with the CPUs busy)."""
    import subprocess
    from pyxl.spawn import start_spawner
    start_spawner()
    forks: List[str] = []
    real_init = subprocess.Popen.__init__

    def spy(self, *a, **k):
        forks.append(str(a[0] if a else k.get("args")))
        real_init(self, *a, **k)
    monkeypatch.setattr(subprocess.Popen, "__init__", spy)
    monkeypatch.setattr(os, "fork", lambda: forks.append("fork") or -1)
    monkeypatch.setattr(os, "posix_spawn", lambda *a, **k: forks.append("posix_spawn") or -1)
    be = restored_hvm1(xsd, host)
    qmp = FakeQmp(qemu_args.qmp_path(7))
    try:
        out, _ = _start_dm(be, [XS_DATA, context_record(b"QEVM")], xsd=xsd)
    finally:
        qmp.close()
    assert out == [(True, "")]
    proc = be._dm_procs[7]
    be.destroy(7)
    assert reaped(proc) == -signal.SIGHUP
    log = [line.split()[:2] for line in (host / "hotplug.log").read_text().splitlines()]
    assert log[:4] == [["block", "add"], ["qemu", "started"], ["vif-bridge", "online"],
                       ["vif-bridge", "add"]]
    assert sorted(log[4:]) == [["block", "remove"], ["vif-bridge", "offline"],
                               ["vif-bridge", "remove"]]
    assert forks == []


def test_device_model_that_exits_fails_at_once_with_its_log(xsd, host, monkeypatch):
    monkeypatch.setenv("FAKE_QEMU_EXIT", "3")
    be = backend(xsd, RecordingXc())
    be.create_restore_target(hvm1(host))
    be.restore_done(7, 1, 2)
    t0 = time.monotonic()
    out, _ = _start_dm(be, [context_record(b"QEVM")], write_running=False, xsd=xsd)
    assert time.monotonic() - t0 < 5
    assert out[0][0] is False
    assert "exited with status 3 before it was ready" in out[0][1]
    assert "giving up" in out[0][1]
    assert not (host / "lib" / "qemu-resume.7").exists()
    # rotated logs, as libxl_create_logfile
    be2 = backend(xsd, RecordingXc(domid=8))
    be.destroy(7)
    be2.create_restore_target(hvm1(host))
    be2.restore_done(8, 1, 2)
    loop = SelectorLoop()
    out2: List[Tuple[bool, str]] = []
    be2.start_restore_device_model(loop, 8, [context_record(b"Q")], lambda *a: out2.append(a))
    loop.run_until(lambda: bool(out2), timeout=10)
    loop.close()
    assert sorted(os.listdir(host / "log")) == ["qemu-dm-hvm1.log", "qemu-dm-hvm1.log.1"]


def test_device_model_timeout_and_missing_state(xsd, host, monkeypatch):
    monkeypatch.setenv("PYXL_DM_START_TIMEOUT", "0.3")    # (libxl: a fixed 60 s)
    be = backend(xsd, RecordingXc())
    be.create_restore_target(hvm1(host))
    be.restore_done(7, 1, 2)
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    dm = hvm.DeviceModelStart(loop, xsd.connect, 7, be._restoring[7],
                              [context_record(b"QEVM")], lambda *a: out.append(a), be._dm_procs,
                              timeout=0.3)
    loop.run_until(lambda: bool(out), timeout=10)
    assert out[0][0] is False and "was not ready after 0.3s" in out[0][1]
    assert "fake qemu: up" in out[0][1]       # the log's tail says how far it got
    assert dm.finished and dm.wait is not None and dm.wait.finished
    be.destroy(7)
    be.create_restore_target(hvm1(host))
    be.restore_done(7, 1, 2)
    out.clear()
    be.start_restore_device_model(loop, 7, [], lambda *a: out.append(a))
    loop.run_until(lambda: bool(out), timeout=10)
    loop.close()
    assert out == [(False, "the stream has no EMULATOR_CONTEXT record")]
    assert not (host / "lib" / "qemu-resume.7").exists()


@pytest.mark.parametrize("chardevs", [
    [{"label": "serial\u00b2", "filename": "pty:/dev/pts/9"}],       # str.isdigit says yes
    [{"label": "serial\u0661", "filename": "pty:/dev/pts/9"}],       # Arabic-Indic one
    [{"label": "serial" + "9" * 5000, "filename": "pty:/dev/pts/9"}],  # past int()'s limit
    [{"label": f"serial{i}", "filename": "pty:/dev/pts/9"} for i in range(100)],
])
def test_a_device_model_that_names_its_serial_ports_oddly_fails_its_start(xsd, host, chardevs):
    """QEMU's answer to query-chardev is its own (its guest's first target):
    a port that is not a small ASCII number, or too many ports, fail the
    start with a reason -- not an exception out of the loop, nor a key of
    its choosing in XenStore."""
    be = restored_hvm1(xsd, host)
    qmp = FakeQmp(qemu_args.qmp_path(7))
    qmp.chardevs = chardevs
    try:
        out, _ = _start_dm(be, [XS_DATA, context_record(b"QEVM")], xsd=xsd)
    finally:
        qmp.close()
    ((ok, why),) = out
    assert ok is False and "invalid serial port" in why and len(why) < 400, why
    assert not [k for k in xsd.nodes if k.startswith("/local/domain/7/serial/")]
    proc = be._dm_procs[7]
    be.destroy(7)           # what the failed restore does next: its QEMU goes with it
    assert reaped(proc) == -signal.SIGHUP


def test_unsupported_config_refused_before_any_domain(xsd, host):
    be = backend(xsd, RecordingXc())
    cfg = hvm1(host)
    cfg["b_info"]["type.hvm"]["vnc"] = {"enable": "True"}
    cfg["pcidevs"] = [{"func": 1}]
    with pytest.raises(StartupError) as ei:
        be.create_restore_target(cfg)
    assert "vnc=1" in str(ei.value) and "pcidevs" in str(ei.value)
    cfg = hvm1(host)
    cfg["b_info"]["device_model"] = str(host / "no-such-qemu")
    with pytest.raises(StartupError, match="no-such-qemu is not executable"):
        be.create_restore_target(cfg)
    cfg = hvm1(host)
    cfg["disks"][0]["pdev_path"] = str(host / "gone.img")
    with pytest.raises(StartupError, match="cannot stat"):
        be.create_restore_target(cfg)
    cfg = hvm1(host)
    cfg["nics"][0]["bridge"] = "xenbr9"       # vif-bridge would fail minutes later
    with pytest.raises(StartupError, match="NIC 0 .*bridge 'xenbr9' does not exist"):
        be.create_restore_target(cfg)
    cfg["nics"][0]["script"] = "vif-route"    # a NIC on no bridge: not checked
    (host / "scripts" / "vif-route").write_text(FAKE_SCRIPT)
    assert be.create_restore_target(cfg) == 7
    be.destroy(7)
    assert be.xc.created[:-1] == [] and not xsd.subtree("/local/domain/7")


def test_failed_build_destroys_the_domain(xsd, host):
    class Failing(RecordingXc):
        def call(self, fn, *args):
            if fn == "xc_set_paging_mempool_size":
                raise OSError(12, "Cannot allocate memory")
            return super().call(fn, *args)

    be = backend(xsd, Failing())
    with pytest.raises(StartupError, match="cannot prepare domain 7"):
        be.create_restore_target(hvm1(host))
    assert ("destroy", 7) in be.xc.log and not xsd.subtree("/local/domain/0/device-model/7")
    assert os.listdir(host / "lib") == []


def test_hvm_suspend_without_pv_drivers_asks_xen(xsd, host):
    """No HVM_PARAM_CALLBACK_IRQ: libxl's xc_domain_shutdown(SHUTDOWN_suspend),
    not control/shutdown; with PV drivers, control/shutdown."""
    be = backend(xsd, RecordingXc())
    be.create_restore_target(hvm1(host))
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    s = be.start_suspend(loop, 7, 0.2, lambda ok, why: out.append((ok, why)))
    loop.run_until(lambda: bool(out), timeout=5)
    assert ("shutdown", 7, SHUTDOWN_suspend) in be.xc.log
    assert xsd.nodes.get("/local/domain/7/control/shutdown") == b""
    assert out[0][0] is False and "did not suspend within 0.2s" in out[0][1]
    s.cancel()
    be.xc.params[(7, 0)] = 1    # PV drivers: callback IRQ set
    out.clear()
    be.start_suspend(loop, 7, 0.2, lambda ok, why: out.append((ok, why)))
    # the request is written from the loop (a round trip to xenstored)
    assert loop.run_until(lambda: xsd.nodes["/local/domain/7/control/shutdown"] == b"suspend", 5)
    loop.run_until(lambda: bool(out), timeout=5)
    loop.close()
    assert xsd.nodes["/local/domain/7/control/shutdown"] == b""     # withdrawn


class FakeQmp:
    """QEMU's QMP socket, just enough: greeting, capabilities, and the commands
    libxl sends around a save; ``add-fd`` takes the descriptor sent with it and
    ``xen-save-devices-state`` writes the device state into it."""

    def __init__(self, path: str, state: bytes = b"QEVM-device-state") -> None:
        import socket as _socket
        self.state = state
        self.chardevs = [{"label": "libxl-cmd", "filename": "unix:/x,server=on"},
                         {"label": "serial0", "filename": "pty:/dev/pts/5"},
                         {"label": "serial1", "filename": "null"}]
        self.commands: List[Tuple[str, object]] = []
        self.srv = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.fds: List[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import array
        import socket as _socket
        while True:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                return
            conn.sendall(b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
                         b'"package": ""}, "capabilities": []}}\r\n')
            buf = b""
            while True:
                fds = array.array("i")
                try:
                    data, anc, _f, _a = conn.recvmsg(65536, _socket.CMSG_SPACE(16))
                except OSError:
                    break
                for level, kind, cdata in anc:
                    if level == _socket.SOL_SOCKET and kind == _socket.SCM_RIGHTS:
                        fds.frombytes(cdata[:len(cdata) - len(cdata) % fds.itemsize])
                self.fds += list(fds)
                if not data:
                    break
                buf += data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    msg = json.loads(line)
                    name, args = msg["execute"], msg.get("arguments")
                    ret: object = {}
                    if name != "qmp_capabilities":
                        self.commands.append((name, args))
                    if name == "add-fd":
                        ret = {"fdset-id": 1, "fd": 42}
                    elif name == "query-chardev":
                        ret = self.chardevs
                    elif name == "xen-save-devices-state":
                        os.write(self.fds.pop(), self.state)
                    conn.sendall(json.dumps({"return": ret, "id": msg["id"]}).encode() + b"\r\n")
            conn.close()

    def close(self) -> None:
        self.srv.close()
        for fd in self.fds:
            os.close(fd)


def hvm_and_pvh(xsd: FakeXenstored):
    """A backend where domain 7 is an HVM guest whose QEMU wrote a physmap
    key (Xen < 4.10's interface) and domain 8 a PVH guest."""
    from pyxl.backends.xenctrl import XEN_DOMINF_hvm_guest
    be = backend(xsd, RecordingXc())
    be.xc.domains.update({7: XEN_DOMINF_hvm_guest, 8: XEN_DOMINF_hvm_guest})
    xsd.nodes.update({"/libxl/7/type": b"hvm", "/libxl/8/type": b"pvh"})
    dm = "/local/domain/0/device-model/7/physmap/f0000000"
    xsd.nodes.update({f"{dm}/start_addr": b"f0000000", f"{dm}/size": b"800000",
                      f"{dm}/name": b"vga.vram"})
    return be


def test_hvm_save_side_over_qmp(xsd, host):
    """What the save of an HVM domain (xl's or pyxl's) asks of its QEMU, through
    /var/run/xen/qmp-libxl-D: log-dirty on, stop + add-fd + xen-save-devices-state
    (live) -> EMULATOR_XENSTORE_DATA (physmap) + EMULATOR_CONTEXT; cont before
    the domain runs again (unpause, resume after a failed save).  PVH: none."""
    be = hvm_and_pvh(xsd)
    qmp = FakeQmp(qemu_args.qmp_path(7))
    loop = SelectorLoop()
    try:
        out: List[tuple] = []
        be.start_logdirty(loop, 7, True, lambda ok, why: out.append((ok, why)))
        be.start_logdirty(loop, 8, True, lambda ok, why: out.append(("pvh", ok)))
        loop.run_until(lambda: len(out) == 2, timeout=10)
        assert sorted(out, key=str) == [("pvh", True), (True, "")]
        out.clear()
        be.start_save_device_model(loop, 7, True, lambda recs, why: out.append((recs, why)))
        loop.run_until(lambda: bool(out), timeout=10)
        (records, why), = out
        assert why == ""
        head = EMULATOR_HEADER.pack(2, 0)
        assert records == [
            (2, head + b"physmap/f0000000/start_addr\0f0000000\0physmap/f0000000/size\0800000\0"
                       b"physmap/f0000000/name\0vga.vram\0"),
            (3, head + b"QEVM-device-state")]
        names = [c[0] for c in qmp.commands]
        assert names == ["xen-set-global-dirty-log", "stop", "add-fd",
                         "xen-save-devices-state", "remove-fd"]
        assert qmp.commands[0][1] == {"enable": True}
        assert qmp.commands[3][1] == {"filename": "/dev/fdset/1", "live": True}
        be.unpause(7)
        be.resume(7)
        assert [c[0] for c in qmp.commands[-2:]] == ["cont", "cont"]
        assert [c for c in be.xc.log if c[0] in ("unpause", "resume")] == \
            [("unpause", 7), ("resume", 7, True)]
        assert [p for (t, _tx, p) in xsd.log if t == 18] == [[b"7", b""]]    # XS_RESUME
        be.unpause(8)                        # PVH: no device model to tell
        assert len(qmp.commands) == 7
        # the same from an operation's loop: QMP cont is an exchange on it
        out.clear()
        be.start_unpause(loop, 7, lambda ok, why: out.append(("unpause", ok, why)))
        be.start_resume(loop, 7, lambda ok, why: out.append(("resume", ok, why)))
        be.start_unpause(loop, 8, lambda ok, why: out.append(("pvh", ok, why)))
        assert out == [] and loop.run_until(lambda: len(out) == 3, timeout=10)
        assert sorted(out) == [("pvh", True, ""), ("resume", True, ""), ("unpause", True, "")]
        assert [c[0] for c in qmp.commands[7:]] == ["cont", "cont"]
        assert sorted([c for c in be.xc.log if c[0] in ("unpause", "resume")][-3:]) == \
            [("resume", 7, True), ("unpause", 7), ("unpause", 8)]
        resumes = [[b"7", b""]] * 2                                           # XS_RESUME
        assert [p for (t, _tx, p) in xsd.log if t == 18] == resumes
        # QEMU killed during the save: the vCPUs run again all the same, and the
        # error says its device model did not
        qmp.close()
        os.unlink(qemu_args.qmp_path(7))
        with pytest.raises(DeviceModelError, match="domain 7 was resumed, but its device model"):
            be.resume(7)
        assert be.xc.log[-1] == ("resume", 7, True)
        out.clear()
        be.start_resume(loop, 7, lambda ok, why: out.append((ok, why)))
        assert loop.run_until(lambda: bool(out), timeout=10)
        assert out[0][0] is False and "domain 7 was resumed, but its device model" in out[0][1]
        assert be.xc.log[-1] == ("resume", 7, True)
        assert [p for (t, _tx, p) in xsd.log if t == 18] == resumes + [[b"7", b""]] * 2
        # unpause does not run the vCPUs without their QEMU (as unpause)
        out.clear()
        be.start_unpause(loop, 7, lambda ok, why: out.append((ok, why)))
        assert loop.run_until(lambda: bool(out), timeout=10)
        assert out[0][0] is False and "domain 7's device model would not run" in out[0][1]
        assert be.xc.log[-1] == ("resume", 7, True)
    finally:
        loop.close()
        qmp.close()


def _restore_devices(be, domid, records, timeout=30):
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    be.start_restore_device_model(loop, domid, records, lambda ok, why: out.append((ok, why)))
    loop.run_until(lambda: bool(out), timeout=timeout)
    loop.close()
    return out


def pv1(host) -> dict:
    cfg = hvm1(host)
    cfg["c_info"]["type"] = "pv"
    del cfg["b_info"]["type.hvm"]
    return cfg


def test_pv_guest_gets_its_disk_and_nic_without_qemu(xsd, host):
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    assert _restore_devices(be, 7, []) == [(True, "")]
    n = xsd.nodes
    assert n["/local/domain/7/device/vbd/51712/protocol"] == b"x86_64-abi"   # PV only
    assert n["/local/domain/0/backend/vif/7/0/type"] == b"vif"                 # not ioemu
    log = (host / "hotplug.log").read_text().splitlines()
    assert [line.split(" XENBUS")[0] for line in log] == ["block add", "vif-bridge online type_if=vif"]
    assert not (host / "qemu.json").exists()
    t0 = time.monotonic()
    xsd.log.clear()
    be.destroy(7)
    # Each backend closed (no wait for libxl's 10 s timeout) and its script ran.
    # blkback closes when the frontend goes; the frontend's removal, online=0
    # and Closing must land together, or its Closed is overwritten by Closing.
    assert time.monotonic() - t0 < 5
    for kind, dev in (("vbd", "51712"), ("vif", "0")):
        front = f"/local/domain/7/device/{kind}/{dev}".encode()
        back = f"/local/domain/0/backend/{kind}/7/{dev}/".encode()
        rm_tx = [tx for mtype, tx, parts in xsd.log if mtype == xenstore.XS_RM and parts[0] == front]
        w_tx = [tx for mtype, tx, parts in xsd.log if mtype == xenstore.XS_WRITE
                and parts[0] in (back + b"online", back + b"state") and parts[1] in (b"0", b"5")]
        # (the later removal outside a transaction: the final cleanup, a no-op)
        assert rm_tx[0] != 0 and w_tx == [rm_tx[0]] * 2, (kind, rm_tx, w_tx)
    log = (host / "hotplug.log").read_text().splitlines()
    # (the devices are removed concurrently, as libxl does: either script may run first)
    assert sorted(line.split(" XENBUS")[0] for line in log[2:]) == [
        "block remove", "vif-bridge offline type_if=vif"]
    assert not [p for p in n if "/7" in p and not p.startswith("/tool")]
    cfg = pv1(host)
    cfg["disks"][0]["format"] = "qcow2"
    with pytest.raises(StartupError, match="qdisk"):
        be.create_restore_target(cfg)


def test_failed_hotplug_script_fails_the_restore(xsd, host, monkeypatch):
    monkeypatch.setenv("FAKE_SCRIPT_FAIL", "1")
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    (ok, why), = _restore_devices(be, 7, [])
    assert not ok
    assert why.startswith(f"disk xvda: {host}/scripts/block add failed (exit status 1): "
                          "block: cannot do it")
    be.destroy(7)        # the restore's failure path: nothing left
    assert not xsd.subtree("/local/domain/0/backend/vbd") and not xsd.subtree("/libxl/7")


def test_backend_that_never_comes_or_goes(xsd, host, monkeypatch):
    """No blkback answering: the add fails after libxl's 10 s (here 0.3 s); the
    forced removal gives up waiting, runs no script, and removes the nodes."""
    from pyxl.backends import xendevices
    monkeypatch.setattr(xendevices, "INIT_TIMEOUT", 0.3)
    monkeypatch.setattr(xendevices, "DESTROY_TIMEOUT", 0.3)
    xsd.after_write = xsd.after_rm = None          # no kernel backends
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    (ok, why), = _restore_devices(be, 7, [])
    assert not ok and "reaching state 2 timed out after 0.3 s" in why
    be.destroy(7)
    assert not (host / "hotplug.log").exists()
    assert not xsd.subtree("/local/domain/0/backend/vbd")


def test_hotplug_script_timeout(xsd, host, monkeypatch):
    from pyxl.backends import xendevices
    monkeypatch.setattr(xendevices, "HOTPLUG_TIMEOUT", 0.3)
    (host / "scripts" / "block").write_text("#!/bin/sh\nexec sleep 30\n")
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    t0 = time.monotonic()
    (ok, why), = _restore_devices(be, 7, [])
    assert not ok and "block add did not finish within 0.3 s" in why
    assert time.monotonic() - t0 < 5
    be.destroy(7)


def test_a_hotplug_script_that_writes_no_newline_is_kept_to_a_line(xsd, host, monkeypatch):
    """Its output was buffered whole until a newline came: 8 MiB without one
    stayed in memory (and was split again at every read).  Now a line is cut at
    4 KiB, and the failure quotes the cut line."""
    from pyxl.backends import xendevices
    (host / "scripts" / "block").write_text(
        "#!/bin/sh\nhead -c 8388608 /dev/zero | tr '\\0' x\nexit 1\n")
    seen: List[int] = []
    readable = xendevices.Script._readable

    def watched(self):
        readable(self)
        seen.append(len(self._buf))
    monkeypatch.setattr(xendevices.Script, "_readable", watched)
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    (ok, why), = _restore_devices(be, 7, [])
    assert not ok and "block add failed (exit status 1)" in why
    assert seen and max(seen) <= xendevices._MAX_LINE
    assert "x" * 100 in why and len(why) < 20000
    be.destroy(7)


def test_backend_that_does_not_close_still_gets_its_remove_script(xsd, host, monkeypatch,
                                                                   caplog):
    """A disk whose add script ran (hotplug-status, as Xen's block script
    writes) and whose blkback does not close within the 10 s (here 0.3 s):
    libxl's forced removal would skip the script and leave the loop device
    attached for good (seen in the lane: QEMU killed during a restore on a
    loaded host).  pyxl runs ``block remove`` all the same and reports the
    removal as failed; the nodes go."""
    from pyxl.backends import xendevices
    monkeypatch.setattr(xendevices, "DESTROY_TIMEOUT", 0.3)
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    assert _restore_devices(be, 7, []) == [(True, "")]
    (back,) = [p for p in xsd.nodes if p.startswith("/local/domain/0/backend/vbd/7/")
               and p.count("/") == 7]
    xsd.write(f"{back}/hotplug-status", b"connected")
    xsd.after_rm = None                       # blkback never notices the frontend go
    with caplog.at_level("ERROR", logger="pyxl"):
        be.destroy(7)
    assert f"removing vbd/51712: backend {back} closing timed out after 0.3 s" in caplog.text
    ran = [line.split(" XENBUS")[0] for line in (host / "hotplug.log").read_text().splitlines()]
    # the disk's script undoes its add; the NIC, whose script marked nothing, gets none
    assert ran.count("block add") == 1 and ran[-1] == "block remove"
    assert not any(r.startswith("vif-bridge offline") for r in ran)
    assert not xsd.subtree("/local/domain/0/backend/vbd")


def test_a_config_uuid_in_upper_case_is_kept_as_libxl_keeps_it(xsd, host):
    """An upper-case uuid passes the config check, and named libxl's stored
    config and /vm as given, while everything that later finds them goes by
    Xen's handle, in lower case: the restored domain could not be saved again
    ("no libxl config"), and its userdata file outlived it."""
    upper = "4B0F2D2E-6C8E-4A51-9D7C-0A0B0C0D0E0F"
    cfg = pv1(host)
    cfg["c_info"]["uuid"] = upper
    be = backend(xsd, RecordingXc())
    domid = be.create_restore_target(cfg)
    be.restore_done(domid, 1, 2)
    assert be.domain_config(domid)["c_info"]["uuid"] == upper.lower()
    assert f"/vm/{upper.lower()}" in xsd.nodes
    assert (host / "lib" / f"userdata-d.{domid}.{upper.lower()}.libxl-json").exists()
    be.destroy(domid)
    assert list((host / "lib").glob("userdata-d.*")) == []
