"""The real-Xen backend's pieces that run without Xen: the XenStore wire
protocol against a tiny in-process xenstored (a thread on a socketpair), and
the suspend's watch-driven wait on pyxl's loop with a fake libxenctrl.  The
real thing is tested on a hypervisor by xen-e2e/tests-pyxl-in-dom0.sh."""

from __future__ import annotations

import errno
import socket
import struct
import threading
import time
from typing import List, Tuple

import pytest

from pyxl.backends import xenstore
from pyxl.loop import SelectorLoop
from pyxl.backends.xen import XenBackend, _Suspend
from pyxl.backends.xenctrl import (SHUTDOWN_poweroff, SHUTDOWN_suspend, XEN_DOMINF_shutdown,
                                   XEN_DOMINF_shutdownshift)
from pyxl.backends.xenstore import XenStore, XenStoreError
from xenfakes import FakeXc, FakeXenstored, RecordingXc, backend, dominfo

H = struct.Struct("=IIII")


@pytest.fixture
def xsd():
    f = FakeXenstored()
    yield f
    f.close()


def test_wire_header_layout():
    assert xenstore.encode(xenstore.XS_READ, 5, 0, b"a\0") == H.pack(2, 5, 0, 2) + b"a\0"
    # numbering from xen/io/xs_wire.h
    assert (xenstore.XS_WATCH, xenstore.XS_WATCH_EVENT, xenstore.XS_ERROR,
            xenstore.XS_RESUME, xenstore.XS_RESET_WATCHES) == (4, 15, 16, 18, 21)
    with pytest.raises(ValueError):
        xenstore.encode(xenstore.XS_WRITE, 1, 0, b"x" * 4097)


def test_read_write_rm_directory(xsd):
    xs = XenStore(sock=xsd.client)
    xs.write("/local/domain/3/name", "web1")
    xs.write("/local/domain/3/control/shutdown", b"")
    assert xs.read("/local/domain/3/name") == b"web1"
    assert xs.read("/local/domain/3/nope") is None
    assert xs.directory("/local/domain/3") == ["control", "name"]
    assert xs.directory("/nowhere") == []
    assert xs.read_many(["/local/domain/3/name", "/local/domain/3/nope",
                         "/local/domain/3/control/shutdown"]) == [b"web1", None, b""]
    assert xs.read_many([]) == []
    xs.rm("/local/domain/3")
    xs.rm("/local/domain/3")  # ENOENT is not an error for rm
    assert xs.read("/local/domain/3/name") is None
    assert xs.transaction_start() == 7


def test_error_reply_is_typed(xsd):
    xs = XenStore(sock=xsd.client)
    with pytest.raises(XenStoreError) as ei:
        xs.request(xenstore.XS_GET_PERMS, b"/x\0")
    assert ei.value.errno == errno.EINVAL


def test_watch_events_interleaved_with_replies_are_queued(xsd):
    xs = XenStore(sock=xsd.client)
    xs.watch("@releaseDomain", "tok")
    xs.write("/local/domain/1/x", "1")         # no watch on it
    xsd.fire("@releaseDomain")
    assert xs.read("/local/domain/1/x") == b"1"  # reply after the event: event queued
    time.sleep(0.05)
    evs = xs.events()
    assert evs == [("@releaseDomain", "tok"), ("@releaseDomain", "tok")]
    assert xs.events() == []


def test_reply_split_across_reads():
    a, b = socket.socketpair()
    xs = XenStore(sock=a)

    def serve() -> None:
        hdr = b.recv(16)
        mtype, req, _tx, ln = H.unpack(hdr)
        b.recv(ln)
        msg = H.pack(mtype, req, 0, 5) + b"hello"
        for i in range(len(msg)):
            b.send(msg[i:i + 1])
            time.sleep(0.001)

    t = threading.Thread(target=serve)
    t.start()
    assert xs.read("/p") == b"hello"
    t.join()
    a.close()
    b.close()


def test_a_batch_is_sent_before_any_reply_is_read():
    """Batch.send pipelines: this xenstored answers only once it holds all four
    requests (one sent at a time would wait here forever).  A failed request
    does not put the replies out of step: rm's ENOENT is fine, the write's
    EACCES is raised naming its path, and the connection goes on."""
    a, b = socket.socketpair()
    a.settimeout(10)
    xs = XenStore(sock=a)
    got: List[Tuple[int, int, int, bytes]] = []

    def serve() -> None:
        buf = b""
        while len(got) < 4:
            buf += b.recv(4096)
            while len(buf) >= 16 and len(buf) >= 16 + H.unpack_from(buf)[3]:
                mtype, req, tx, ln = H.unpack_from(buf)
                got.append((mtype, req, tx, buf[16:16 + ln]))
                buf = buf[16 + ln:]
        for mtype, req, tx, body in got:
            if mtype == xenstore.XS_RM:
                b.sendall(H.pack(xenstore.XS_ERROR, req, tx, 7) + b"ENOENT\0")
            elif body.startswith(b"/denied\0"):
                b.sendall(H.pack(xenstore.XS_ERROR, req, tx, 7) + b"EACCES\0")
            else:
                b.sendall(H.pack(mtype, req, tx, 3) + b"OK\0")
        mtype, req, tx, ln = H.unpack(b.recv(16))      # then a plain request
        b.recv(ln)
        b.sendall(H.pack(mtype, req, tx, 5) + b"value")

    t = threading.Thread(target=serve)
    t.start()
    batch = xs.batch()
    batch.rm("/gone", 9)
    batch.write("/a", "1", 9)
    batch.write("/denied", "2", 9)
    batch.set_perms("/a", ["n0", "r7"], 9)
    with pytest.raises(XenStoreError) as exc:
        batch.send()
    assert exc.value.errno == errno.EACCES and str(exc.value).endswith(": /denied")
    assert [(m, tx) for m, _r, tx, _b in got] == [
        (xenstore.XS_RM, 9), (xenstore.XS_WRITE, 9), (xenstore.XS_WRITE, 9),
        (xenstore.XS_SET_PERMS, 9)]
    assert got[3][3] == b"/a\0n0\0r7\0"
    assert xs.read("/p") == b"value"      # in step
    t.join(10)
    a.close()
    b.close()


def test_closed_connection_raises():
    a, b = socket.socketpair()
    b.close()
    xs = XenStore(sock=a)
    with pytest.raises(OSError):
        xs.read("/p")
    a.close()


_info = dominfo


def test_dominfo_decoding():
    i = _info(4, XEN_DOMINF_shutdown | (SHUTDOWN_suspend << XEN_DOMINF_shutdownshift))
    assert i.domid == 4 and i.suspended and not i.dying
    assert i.uuid == "00010203-0405-0607-0809-0a0b0c0d0e0f"
    j = _info(4, XEN_DOMINF_shutdown | (SHUTDOWN_poweroff << XEN_DOMINF_shutdownshift))
    assert j.shutdown and not j.suspended


def _suspend_with(xsd: FakeXenstored, monkeypatch, guest, timeout=5.0):
    be = XenBackend.__new__(XenBackend)
    be.xc = FakeXc()
    be._xs = None
    monkeypatch.setattr("pyxl.backends.xen.open_default", xsd.connect)   # one per call
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    xsd.on_write = guest
    t0 = time.monotonic()
    _Suspend(be, loop, 5, timeout, lambda ok, why: out.append((ok, why)))
    guest(be.xc)
    loop.run_until(lambda: bool(out), timeout=timeout + 5)
    loop.close()
    return out, be, time.monotonic() - t0


def test_suspend_waits_for_release_domain_watch(xsd, monkeypatch):
    def guest(xc: FakeXc) -> None:
        def later() -> None:
            time.sleep(0.2)
            assert xsd.nodes["/local/domain/5/control/shutdown"] == b"suspend"
            xc.flags = XEN_DOMINF_shutdown | (SHUTDOWN_suspend << XEN_DOMINF_shutdownshift)
            xsd.fire("@releaseDomain")
        threading.Thread(target=later, daemon=True).start()

    out, be, dt = _suspend_with(xsd, monkeypatch, guest)
    assert out == [(True, "")]
    assert 0.15 < dt < 3
    # one look at registration, one on the event: driven by the watch, not polling
    assert be.xc.calls.count("getinfo") <= 3


def test_suspend_times_out_and_withdraws_the_request(xsd, monkeypatch):
    out, be, dt = _suspend_with(xsd, monkeypatch, lambda xc: None, timeout=0.3)
    assert out and out[0][0] is False and "did not suspend within 0.3s" in out[0][1]
    assert xsd.nodes["/local/domain/5/control/shutdown"] == b""


def test_suspend_request_is_a_round_trip_on_the_loop(xsd, monkeypatch):
    """xenstored takes 0.3 s to answer the control/shutdown write: the loop's
    ticker runs on meanwhile, and the guest that then suspends is seen."""
    xsd.delay[xenstore.XS_WRITE] = 0.3
    ticks: List[float] = []

    def guest(xc: FakeXc) -> None:
        def suspend(path: str, value: bytes) -> None:
            if path == "/local/domain/5/control/shutdown" and value == b"suspend":
                xc.flags = XEN_DOMINF_shutdown | (SHUTDOWN_suspend << XEN_DOMINF_shutdownshift)
                threading.Timer(0.05, xsd.fire, ["@releaseDomain"]).start()
        xsd.after_write = suspend

    loop_ticks = SelectorLoop.call_later

    def ticking(self: SelectorLoop, delay: float, cb):  # type: ignore[no-untyped-def]
        if not ticks:     # the first timer set starts the application's ticker
            def tick() -> None:
                ticks.append(time.monotonic())
                loop_ticks(self, 0.005, tick)
            loop_ticks(self, 0, tick)
        return loop_ticks(self, delay, cb)
    monkeypatch.setattr(SelectorLoop, "call_later", ticking)
    out, be, dt = _suspend_with(xsd, monkeypatch, guest)
    assert out == [(True, "")] and dt >= 0.3
    assert max(b - a for a, b in zip(ticks, ticks[1:])) < 0.15


def test_suspend_request_that_cannot_be_made_fails_in_one_line(xsd, monkeypatch):
    opened: List[int] = []
    real = xsd.connect

    def connect() -> XenStore:
        opened.append(1)
        if len(opened) > 1:     # the watch's connection works; the request's does not
            raise OSError(errno.ECONNREFUSED, "Connection refused")
        return real()
    monkeypatch.setattr(xsd, "connect", connect)
    out, be, dt = _suspend_with(xsd, monkeypatch, lambda xc: None)
    assert out == [(False, "cannot ask domain 5 to suspend: Connection refused")]
    assert dt < 3


def test_suspend_reports_other_shutdown(xsd, monkeypatch):
    def guest(xc: FakeXc) -> None:
        xc.flags = XEN_DOMINF_shutdown | (SHUTDOWN_poweroff << XEN_DOMINF_shutdownshift)
    out, be, dt = _suspend_with(xsd, monkeypatch, guest)
    assert out[0][0] is False and "reason 0" in out[0][1]


PVH_CONFIG = {"c_info": {"type": "pvh", "name": "g1", "uuid": "00010203-0405-0607-0809-0a0b0c0d0e0f",
                         "hap": "True"},
              "b_info": {"max_vcpus": 1, "max_memkb": 131072, "target_memkb": 131072,
                         "event_channels": 1023, "max_grant_frames": 64,
                         "max_maptrack_frames": 1024, "max_grant_version": 2,
                         "tsc_mode": "native", "shadow_memkb": 2048, "video_memkb": 0}}


def test_restore_target_pvh(xsd, tmp_path, monkeypatch):
    from pyxl.backends import xen as xenbackend
    monkeypatch.setattr(xenbackend, "USERDATA_DIR", str(tmp_path))
    monkeypatch.setattr("pyxl.backends.hvm.LIB_DIR", str(tmp_path))
    be = backend(xsd, RecordingXc())
    domid = be.create_restore_target(PVH_CONFIG)
    assert domid == 7
    (handle, flags, max_vcpus, evtchn, gframes, mframes, gopts, pool, emu, misc, ssid), = \
        be.xc.created
    assert handle == bytes(range(16))
    assert flags == xenbackend.XEN_DOMCTL_CDF_hvm | xenbackend.XEN_DOMCTL_CDF_hap
    assert (max_vcpus, evtchn, gframes, mframes, gopts, emu) == (1, 1023, 64, 1024, 2,
                                                                 xenbackend.XEN_X86_EMU_LAPIC)
    calls = {c[0]: c[1:] for c in be.xc.log}
    assert calls["xc_domain_setmaxmem"] == (7, 131072 + 1024)
    assert calls["xc_domain_set_tsc_info"] == (7, 2, 0, 0, 0)
    assert calls["xc_set_paging_mempool_size"] == (7, 2048 << 10)
    assert be.restore_ports(7) == (1, 0, 2, 0)
    n = xsd.nodes
    assert n["/local/domain/7/name"] == b"g1"
    assert n["/local/domain/7/vm"] == b"/vm/00010203-0405-0607-0809-0a0b0c0d0e0f"
    assert "/local/domain/7/control/shutdown" in n
    perms = [p for (t, _tx, p) in xsd.log if t == xenstore.XS_SET_PERMS
             and p[0] == b"/local/domain/7/control/shutdown"]
    assert perms and perms[0][1] == b"n7"
    assert (tmp_path / "userdata-d.7.00010203-0405-0607-0809-0a0b0c0d0e0f.libxl-json").read_bytes() \
        .endswith(b"\0")
    be.restore_done(7, 0xfeffc, 0xfefff)
    assert n["/local/domain/7/store/ring-ref"] == str(0xfeffc).encode()
    assert n["/local/domain/7/console/ring-ref"] == str(0xfefff).encode()
    assert n["/local/domain/7/console/port"] == b"2"
    intro = [p for (t, _tx, p) in xsd.log if t == xenstore.XS_INTRODUCE]
    assert intro == [[b"7", str(0xfeffc).encode(), b"1", b""]]
    # a second restore of the same guest is refused by name
    with pytest.raises(pyxl_errors.StartupError, match="already exists"):
        be.create_restore_target(PVH_CONFIG)
    be.destroy(7)
    assert ("destroy", 7) in be.xc.log
    assert not [p for p in n if p.startswith(("/local/domain/7", "/vm/00010203", "/libxl/7"))]
    assert not list(tmp_path.iterdir())


import pyxl.errors as pyxl_errors  # noqa: E402


def test_destroy_makes_its_hypercall_in_a_child_and_reports_its_failure(xsd, tmp_path,
                                                                       monkeypatch):
    """xc_domain_destroy (Xen frees the memory inside it) runs in a short child:
    here the real one, on a machine without Xen, where it cannot open the
    hypervisor interface.  The loop runs on meanwhile, the XenStore nodes are
    gone first (libxl's order), and the failure comes back in one line."""
    import sys
    import types

    from pyxl.backends.xenctrl import Xc, host_release
    monkeypatch.setattr("pyxl.backends.xen.USERDATA_DIR", str(tmp_path))
    monkeypatch.setattr("pyxl.backends.hvm.LIB_DIR", str(tmp_path))
    xc = RecordingXc()
    be = backend(xsd, xc)
    be.create_restore_target(PVH_CONFIG)
    release = host_release()   # 4.17 on Debian 12, 4.20 on Debian 13
    argv = Xc.destroy_command(types.SimpleNamespace(release=release), 7)   # type: ignore
    assert argv[:4] == [sys.executable, "-I", "-S", "-c"]
    assert argv[-2:] == [f"libxenctrl.so.{release}", "7"]
    monkeypatch.setattr(xc, "destroy_command", lambda domid: argv)
    loop = SelectorLoop()
    out: List[Tuple[bool, str]] = []
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not out:
            loop.call_later(0.005, tick)
    loop.call_later(0, tick)
    be.start_destroy(loop, 7, lambda ok, why: out.append((ok, why)))
    assert not out                     # not waited for on the caller
    assert loop.run_until(lambda: bool(out), 30)
    loop.close()
    (ok, why), = out
    assert not ok and why.startswith("destroying domain 7: xc_interface_open: "), why
    assert "\n" not in why and len(ticks) > 1
    assert not [p for p in xsd.nodes if p.startswith(("/local/domain/7", "/libxl/7"))]


def test_domain_config_takes_current_name_and_memory(xsd, tmp_path, monkeypatch):
    from pyxl.backends import xen as xenbackend
    monkeypatch.setattr(xenbackend, "USERDATA_DIR", str(tmp_path))
    be = backend(xsd, RecordingXc())
    be.xc.domains[3] = 0
    uuid = "00010203-0405-0607-0809-0a0b0c0d0e0f"
    (tmp_path / f"userdata-d.3.{uuid}.libxl-json").write_bytes(
        b'{"c_info": {"name": "g--incoming"}, "b_info": {"max_memkb": 1, "video_memkb": -1}}\n\0')
    xsd.nodes["/local/domain/3/name"] = b"g"
    xsd.nodes["/local/domain/3/memory/static-max"] = b"131072"
    xsd.nodes["/local/domain/3/memory/target"] = b"65536"
    cfg = be.domain_config(3)
    assert cfg["c_info"] == {"name": "g", "uuid": uuid}
    assert cfg["b_info"]["max_memkb"] == 131072 and cfg["b_info"]["target_memkb"] == 65536
    with pytest.raises(pyxl_errors.StartupError, match="no libxl config"):
        be.xc.domains[4] = 0
        be.domain_config(4)


def test_suspend_failure_is_named_in_the_save_error(sim_dir, tmp_path):
    """The default suspend's failure (a guest that never answers, as one
    without PV drivers) leads the save's error, not libxc's "Save failed"."""
    import pyxl
    from pyxl import sim
    from pyxl.backends.sim import SimBackend

    class Deaf(SimBackend):
        def start_suspend(self, loop, domid, timeout, done):
            return loop.call_later(timeout, lambda: done(False, f"guest did not suspend within {timeout:g}s"))

    d = sim.create(16 << 20, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g", backend=Deaf(sim_dir), suspend_timeout=0.3)
    with pytest.raises(pyxl.OperationError) as ei:
        pyxl.wait(op)
    assert str(ei.value).startswith("the guest did not suspend: guest did not suspend within 0.3s; ")
    assert not (tmp_path / "g").exists()
    assert sim.info(d, sim_dir=sim_dir).state == "running"
