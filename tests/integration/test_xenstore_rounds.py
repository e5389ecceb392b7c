"""A real host's XenStore exchanges are rounds on the loop, never waited for in
a callback: a watch's registration and its checks, a disk's and a NIC's
addition and removal, an HVM guest's QEMU start (its nodes, its pid, its
serial ptys), the save's physmap keys and the domain's type, the destroy's
device-model node, and a suspend's last look after its timeout.

Each test runs against a busy xenstored (tests/xenfakes.py, real sockets) that
sleeps before it answers the requests a callback used to wait for, while a
ticker on the same loop records its longest gap: the old code held the loop
for at least one such answer."""

from __future__ import annotations

import errno
import signal
import threading
import time
from typing import Any, Callable, List, Tuple

import pytest

from pyxl.backends import qemu_args, xenstore, xsasync
from pyxl.backends.xenctrl import XEN_DOMINF_hvm_guest
from pyxl.backends.xsasync import XsTask
from pyxl.backends.xswatch import XsWait, node_is
from pyxl.loop import SelectorLoop
import test_xenbackend_hvm
from test_xenbackend_hvm import (XS_DATA, FakeQmp, context_record, hvm_and_pvh, pv1,
                                 qemu_writes_running, restored_hvm1)
from test_xsasync import Gaps
from xenfakes import FakeXenstored, RecordingXc, backend, reaped

xsd = test_xenbackend_hvm.xsd
host = test_xenbackend_hvm.host

#: What xenstored takes per answer here, and the longest gap the ticker may see.
SLOW, GAP = 0.1, 0.08
READS = {xenstore.XS_READ: SLOW, xenstore.XS_DIRECTORY: SLOW, xenstore.XS_WATCH: SLOW}


def on_loop(start: Callable[[SelectorLoop, Callable[..., None]], Any], timeout: float = 30
            ) -> Tuple[List[Any], Gaps]:
    """``start(loop, done)`` run on a loop with a ticker, until ``done(*args)``."""
    loop = SelectorLoop()
    out: List[Any] = []
    gaps = Gaps(loop)
    start(loop, lambda *a: out.append(a))
    assert loop.run_until(lambda: bool(out), timeout), "never done"
    gaps.running = False
    loop.close()
    return out, gaps


def test_a_watch_registers_and_checks_as_rounds_on_the_loop(xsd: FakeXenstored):
    """The node is written 0.5 s in; every answer takes 0.1 s; the ticker runs on."""
    xsd.delay = dict(READS)
    threading.Timer(0.5, lambda: xsd.write("/w/state", b"4")).start()
    t0 = time.monotonic()
    out, gaps = on_loop(lambda loop, done: XsWait(loop, xsd.connect, ["/w/state"],
                                                  node_is("/w/state", b"4"), 10, done, "w"))
    assert out == [(True, "")] and time.monotonic() - t0 >= 0.5
    assert gaps.longest < GAP, gaps.longest


def test_a_watch_whose_connection_is_refused_fails_in_one_line():
    def refused() -> xenstore.XenStore:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    loop = SelectorLoop()
    out: List[Any] = []
    XsWait(loop, refused, ["/x"], node_is("/x", b"1"), 5, lambda *a: out.append(a), "the wait")
    assert loop.run_until(lambda: bool(out), 10)
    (ok, why), = out
    assert (ok, why) == (False, "the wait: XenStore: Connection refused")
    loop.close()


def test_a_disk_and_a_nic_come_and_go_without_holding_the_loop(xsd, host):
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    xsd.delay = dict(READS)
    out, gaps = on_loop(lambda loop, done: be.start_restore_device_model(loop, 7, [], done))
    assert out == [(True, "")]
    assert gaps.longest < GAP, ("add", gaps.longest)
    xsd.log.clear()
    out, gaps = on_loop(lambda loop, done: be.start_destroy(loop, 7, done))
    assert out == [(True, "")]
    assert gaps.longest < GAP, ("destroy", gaps.longest)
    ran = [line.split(" XENBUS")[0] for line in (host / "hotplug.log").read_text().splitlines()]
    assert sorted(ran[2:]) == ["block remove", "vif-bridge offline type_if=vif"]
    assert not [p for p in xsd.nodes if "/7" in p and not p.startswith("/tool")]


def test_a_failed_script_names_the_scripts_own_reason_read_on_the_loop(xsd, host,
                                                                        monkeypatch):
    monkeypatch.setenv("FAKE_SCRIPT_FAIL", "1")
    be = backend(xsd, RecordingXc())
    be.create_restore_target(pv1(host))
    be.restore_done(7, 1, 2)
    back = "/local/domain/0/backend/vbd/7/51712"
    orig = xsd.write

    def with_reason(path: str, value: bytes) -> None:
        orig(path, value)
        if path == f"{back}/state" and value == b"2":
            orig(f"{back}/hotplug-error", b"no such file")
    xsd.write = with_reason   # type: ignore[method-assign]
    xsd.delay = dict(READS)
    out, gaps = on_loop(lambda loop, done: be.start_restore_device_model(loop, 7, [], done))
    (ok, why), = out
    assert not ok and why.endswith("block: cannot do it (no such file)"), why
    assert gaps.longest < GAP, gaps.longest
    be.destroy(7)


def test_an_hvm_guests_qemu_starts_and_goes_without_holding_the_loop(xsd, host):
    be = restored_hvm1(xsd, host)
    qmp = FakeQmp(qemu_args.qmp_path(7))
    try:
        qemu_writes_running(xsd, within=20)
        xsd.delay = {**READS, xenstore.XS_WRITE: SLOW, xenstore.XS_MKDIR: SLOW}
        out, gaps = on_loop(lambda loop, done: be.start_restore_device_model(
            loop, 7, [XS_DATA, context_record(b"QEVM")], done))
        assert out == [(True, "")]
        assert gaps.longest < GAP, ("start", gaps.longest)
        n = xsd.nodes
        pid = int(n["/local/domain/7/image/device-model-pid"])
        assert n["/local/domain/0/device-model/7/physmap/1/name"] == b"vga"
        assert n["/local/domain/7/serial/0/tty"] == b"/dev/pts/5"
        xsd.delay = {**READS, xenstore.XS_RM: SLOW}
        proc = be._dm_procs[7]
        out, gaps = on_loop(lambda loop, done: be.start_destroy(loop, 7, done))
        assert out == [(True, "")]
        assert gaps.longest < GAP, ("destroy", gaps.longest)
        # SIGHUP to the pid on record, as libxl
        assert proc.pid == pid and reaped(proc) == -signal.SIGHUP
        assert "/local/domain/0/device-model/7" not in xsd.nodes
    finally:
        qmp.close()


def test_the_save_reads_the_type_and_physmap_on_the_loop(xsd, host):
    be = hvm_and_pvh(xsd)
    qmp = FakeQmp(qemu_args.qmp_path(7))
    try:
        xsd.delay = dict(READS)
        out, gaps = on_loop(lambda loop, done: be.start_save_device_model(loop, 7, True, done))
        (records, why), = out
        assert why == "" and records[0][1].endswith(b"physmap/f0000000/name\0vga.vram\0")
        assert gaps.longest < GAP, gaps.longest
        out, _ = on_loop(lambda loop, done: be.start_logdirty(loop, 8, True, done))
        assert out == [(True, "")]      # PVH: no QEMU to tell
        # the type is read once per domain
        reads = [p[0] for t, _tx, p in xsd.log if t == xenstore.XS_READ
                 and p[0].endswith(b"/type")]
        assert reads == [b"/libxl/7/type", b"/libxl/8/type"]
        out, _ = on_loop(lambda loop, done: be.start_logdirty(loop, 8, False, done))
        assert len([1 for t, _tx, p in xsd.log if t == xenstore.XS_READ
                    and p[0] == b"/libxl/8/type"]) == 1
    finally:
        qmp.close()


def test_the_saves_config_is_read_in_one_round_on_the_loop(xsd, tmp_path, monkeypatch):
    """The xl header's config: the stored file, then the name and the memory
    from XenStore in one round on the loop; the same as domain_config()."""
    from pyxl.backends import base, xen as xenbackend
    from pyxl.errors import StartupError
    monkeypatch.setattr(xenbackend, "USERDATA_DIR", str(tmp_path))
    be = backend(xsd, RecordingXc())
    be.xc.domains[3] = 0
    uuid = "00010203-0405-0607-0809-0a0b0c0d0e0f"
    (tmp_path / f"userdata-d.3.{uuid}.libxl-json").write_bytes(
        b'{"c_info": {"name": "g--incoming", "type": "hvm"}, '
        b'"b_info": {"max_memkb": 2, "target_memkb": 1, "video_memkb": 8192}}\n\0')
    xsd.nodes.update({"/local/domain/3/name": b"g",
                      "/local/domain/3/memory/static-max": b"131072",
                      "/local/domain/3/memory/target": b"65536"})
    xsd.delay = dict(READS)
    # from a callback, as a save's; its end reported a little later, so that
    # the ticker sees any callback that held the loop
    out, gaps = on_loop(lambda loop, done: loop.call_later(0.05, lambda: base.start_domain_config(
        be, loop, 3, lambda *a: loop.call_later(0.02, lambda: done(*a)))))
    (cfg, exc), = out
    assert exc is None and cfg == be.domain_config(3)
    assert cfg["c_info"] == {"name": "g", "type": "hvm", "uuid": uuid}
    # libxl's fudge: video memory plus LIBXL_MAXMEM_CONSTANT (max > target in the file)
    assert cfg["b_info"]["target_memkb"] == 65536 + 8192 + 1024
    assert cfg["b_info"]["max_memkb"] == 131072
    assert gaps.longest < GAP, gaps.longest
    xsd.delay = {}
    del xsd.nodes["/local/domain/3/memory/target"]   # missing: the stored value stands
    out, _ = on_loop(lambda loop, done: base.start_domain_config(be, loop, 3, done))
    assert out[0][0]["b_info"]["target_memkb"] == 1
    be.xc.domains[4] = 0
    out, _ = on_loop(lambda loop, done: base.start_domain_config(be, loop, 4, done))
    (cfg, exc), = out
    assert cfg is None and isinstance(exc, StartupError) and "has no libxl config" in str(exc)


def test_a_missing_physmap_key_fails_the_save_in_one_line(xsd, host):
    be = backend(xsd, RecordingXc())
    be.xc.domains[7] = XEN_DOMINF_hvm_guest
    xsd.nodes.update({"/libxl/7/type": b"hvm",
                      "/local/domain/0/device-model/7/physmap/f0/size": b"1"})
    out, _ = on_loop(lambda loop, done: be.start_save_device_model(loop, 7, True, done))
    (records, why), = out
    assert records is None
    assert why == ("domain 7's device model: /local/domain/0/device-model/7/physmap/f0/"
                   "start_addr is missing")


def test_a_suspend_that_times_out_withdraws_its_request_on_the_loop(xsd, monkeypatch):
    be = backend(xsd, RecordingXc())
    be.xc.domains[5] = 0
    xsd.nodes["/local/domain/5/control/shutdown"] = b""
    xsd.delay = dict(READS)
    out, gaps = on_loop(lambda loop, done: be.start_suspend(loop, 5, 0.5, done))
    (ok, why), = out
    assert not ok and why == ("guest did not suspend within 0.5s (no PV drivers answering "
                              "control/shutdown?)")
    assert xsd.nodes["/local/domain/5/control/shutdown"] == b""     # withdrawn
    assert gaps.longest < GAP, gaps.longest


def test_a_scripts_event_wait_is_only_for_the_loop(xsd):
    def waits() -> xsasync.XsScript[None]:
        yield xsasync.EVENT
    with pytest.raises(ValueError, match="runs on a loop"):
        xsasync.run(xsd.connect(), waits())
    out, _ = on_loop(lambda loop, done: XsTask(loop, xsd.connect, waits(), done, "t", 0.3))
    (exc,), = out
    assert isinstance(exc, OSError) and "did not answer within 0.3 s" in str(exc)


def test_a_removal_that_cannot_list_the_devices_ends_once_and_says_why():
    from pyxl.backends.xendevices import DevicesRemoval

    def refused() -> xenstore.XenStore:
        raise ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")
    loop = SelectorLoop()
    calls: List[int] = []
    removal = DevicesRemoval(loop, refused, 7, lambda: calls.append(1))
    assert loop.run_until(lambda: bool(calls), 5)
    loop.run_until(lambda: False, 0.2)      # nothing more comes
    assert calls == [1]
    assert removal.failures == ["listing its devices: Connection refused"]
    loop.close()
