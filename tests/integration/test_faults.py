"""Fault injection on real helpers (ours and Debian's) driving fakexen domains.

The helper is SIGKILLed right after each kind of message it sends and in the
middle of page data, SIGSTOPped until the operation's timeout fires, or the
operation is cancelled in each phase.  Every case checks what a toolstack
relies on:

* a typed error (HelperDied / Timeout / Cancelled) within a bounded time;
* the helper reaped (no zombie, no other child left) and no fd leaked;
* a healthy save running alongside in the same loop is unaffected (it is held
  at its suspend callback until the faulty operation is over, and its image
  restores byte for byte);
* save: the source domain running again (resumed if it had been suspended),
  an existing file at the target untouched and no temporary file left;
* restore: the half-made domain destroyed.

Faults are injected from the host side, between the moment pyxl reads a
message from the helper's stdout and the moment it acts on it: the helper has
sent the message and dies (or stops) before it can see any answer.

Debian's helper runs under every kill in the quick lane and under every fault
with ``PYXL_SLOW=1``.
"""

from __future__ import annotations

import fcntl
import os
import signal
import struct
import sys
import termios
import textwrap
import time
from typing import Callable, Dict, List

import pytest

import pyxl
from pyxl import sim
from pyxl import streamio
from pyxl.wire.codec import Message

from conftest import HELPERS, ROOT, SLOW, children, domids, open_fds

MB = 1 << 20
#: How long any failure may take to be reported once the fault happened.
BOUND = 10.0
#: The operation timeout used by the SIGSTOP cases.
STOP_TIMEOUT = 1.0

Pred = Callable[[Message], bool]


def _progress(text: str) -> Pred:
    return lambda m: m.NAME == "progress" and m.doing_what == text


def _mid_pages(m: Message) -> bool:
    return (m.NAME == "progress" and m.doing_what.startswith("Frames")
            and 0 < m.done < m.total)


def _log_starting(text: str) -> Pred:
    return lambda m: m.NAME == "log" and m.formatted.startswith(text)


#: Every progress report of libxc's, as Xen's helper sends them: "page-data"
#: fires on one inside the Frames phase, which pyxl's default of one per 50 ms
#: may leave out of a save that takes less.
EVERY_REPORT = {"PYXL_PROGRESS_INTERVAL_MS": "0"}

#: Points in a save at which a fault is injected.  Non-live order (both
#: helpers): log, switch_qemu_logdirty, progress "Start of stream", suspend,
#: progress "Domain now suspended", Frames..., log "complete r=0", complete.
SAVE_TRIGGERS: Dict[str, Pred] = {
    "log": lambda m: m.NAME == "log",
    "switch_qemu_logdirty": lambda m: m.NAME == "switch_qemu_logdirty",
    "progress": lambda m: m.NAME == "progress",
    "suspend": lambda m: m.NAME == "suspend",              # suspend requested, not answered
    "suspended": _progress("Domain now suspended"),         # suspend answered: guest stopped
    "page-data": _mid_pages,
    "log-last": _log_starting("complete r="),
    "complete": lambda m: m.NAME == "complete",
}

#: Restore order: log..., static_data_done, (page data), log "Restore
#: successful", restore_results, log "complete r=0", complete.
#: "page-data" is injected by feeding the stream through a pipe (see feed_half).
RESTORE_TRIGGERS: Dict[str, Pred] = {
    "log": lambda m: m.NAME == "log",
    "static_data_done": lambda m: m.NAME == "static_data_done",
    "log-restored": _log_starting("Restore successful"),
    "restore_results": lambda m: m.NAME == "restore_results",
    "complete": lambda m: m.NAME == "complete",
}


def arm(op: pyxl.Operation, pred: Pred, action: Callable[[], None]) -> List[float]:
    """Run ``action`` when ``op``'s helper sends the first message matching
    ``pred``, before pyxl acts on that message.  Returns a list that receives
    the time the fault fired."""
    if op.helper is None:     # a save's helper starts from the loop
        op.loop.run_until(lambda: (op.helper is not None and op.helper.pid > 0) or op.done(), 30)
    helper = op.helper
    assert helper is not None
    deliver = helper._on_message
    fired: List[float] = []

    def hook(msg: Message) -> None:
        if not fired and pred(msg):
            fired.append(time.monotonic())
            action()
        deliver(msg)

    helper._on_message = hook  # type: ignore[method-assign]
    return fired


def fault_action(op: pyxl.Operation, kind: str) -> Callable[[], None]:
    def act() -> None:
        if kind == "cancel":      # before the helper started too (a save's starts from the loop)
            op.cancel(grace=1.0)
            return
        assert op.helper is not None
        if kind == "kill":
            os.kill(op.helper.pid, signal.SIGKILL)
        elif kind == "stop":
            os.kill(op.helper.pid, signal.SIGSTOP)
        else:
            raise AssertionError(kind)
    return act


EXPECTED = {"kill": pyxl.HelperDied, "stop": pyxl.Timeout, "cancel": pyxl.Cancelled}


class Companion:
    """A healthy non-live save in the same loop.  Its suspend callback holds it
    until every watched (faulty) operation is over, so the two overlap; its
    image must then restore byte for byte."""

    def __init__(self, sim_dir: str, path: os.PathLike, helper: str) -> None:
        self.sim_dir = sim_dir
        self.domid = sim.create(16 * MB, name="companion", sim_dir=sim_dir)
        sim.pause(self.domid, sim_dir=sim_dir)
        self.digest = sim.digest(self.domid, sim_dir=sim_dir)
        self.watched: List[pyxl.Operation] = []
        self.overlapped: List[bool] = []
        loop = pyxl.default_loop()

        def suspend(req: pyxl.CallbackRequest) -> None:
            def poll() -> None:
                if self.watched and all(o.done() for o in self.watched):
                    sim.suspend(self.domid, sim_dir=sim_dir)
                    req.reply(1)
                else:
                    loop.call_later(0.002, poll)
            poll()

        self.op = pyxl.save(self.domid, path, helper=helper, sim_dir=sim_dir, timeout=60,
                            callbacks={"suspend": suspend})

    def watch(self, op: pyxl.Operation) -> None:
        self.watched.append(op)
        op.add_done_callback(lambda o: self.overlapped.append(not self.op.done()))

    def check(self, helper: str) -> None:
        res = self.op.result()
        assert self.overlapped == [True] * len(self.watched), "the healthy save overlapped"
        rop = pyxl.restore(res.path, paused=True, helper=helper, sim_dir=self.sim_dir)
        new = pyxl.wait(rop)[0].domid
        assert sim.digest(new, sim_dir=self.sim_dir) == self.digest
        sim.destroy(new, sim_dir=self.sim_dir)


def run_faulty(op: pyxl.Operation, companion: Companion, kind: str,
               fired: List[float], t0: float) -> pyxl.OperationError:
    """Wait for both; return the faulty op's error after the timing checks."""
    exc_type = EXPECTED[kind]
    with pytest.raises(exc_type) as e:
        pyxl.wait(op, companion.op, timeout=60)
    assert companion.op.done()
    assert fired, "the fault was injected"
    took = time.monotonic() - fired[0]
    if kind == "stop":
        assert time.monotonic() - t0 < STOP_TIMEOUT + BOUND
    assert took < BOUND, f"failure reported {took:.1f}s after the fault"
    err = e.value
    assert err.op is op
    if kind == "kill":
        assert err.signum == signal.SIGKILL
    return err


# ---------------------------------------------------------------------------
# save

SAVE_CASES = (
    [("kill", t, False) for t in SAVE_TRIGGERS]
    + [("kill", t, True) for t in ("page-data", "suspend", "suspended")]
    + [("stop", t, False) for t in ("log", "suspend", "page-data")]
    + [("cancel", t, False) for t in ("start", "log", "suspend", "suspended", "page-data",
                                      "complete")]
    + [("cancel", "page-data", True)]
)


#: Debian's helper in the quick lane: every kill, one stop and one cancel case;
#: PYXL_SLOW=1 runs it under every fault.
DEBIAN_QUICK = {("stop", "suspend"), ("cancel", "page-data"), ("stop", "page-data"),
                ("cancel", "static_data_done")}


def with_helpers(cases, ids):
    out = []
    for case, case_id in zip(cases, ids):
        for helper in ("ours", "debian"):
            slow_only = (helper == "debian" and case[0] != "kill"
                         and tuple(case[:2]) not in DEBIAN_QUICK)
            marks = [pytest.mark.skipif(not SLOW, reason="PYXL_SLOW=1")] if slow_only else []
            out.append(pytest.param(helper, *case, marks=marks, id=f"{case_id}-{helper}"))
    return out


@pytest.mark.parametrize("helper,kind,trigger,live", with_helpers(
    SAVE_CASES, [f"{k}-{t}{'-live' if lv else ''}" for k, t, lv in SAVE_CASES]))
def test_save_fault(sim_dir, tmp_path, helper, kind, trigger, live):
    hpath = HELPERS[helper]
    (tmp_path / "faulty").mkdir()
    target = tmp_path / "faulty" / "existing.save"
    target.write_bytes(b"precious")
    fds, kids = open_fds(), children()
    d = sim.create(16 * MB, dirty_rate=8 * MB, sim_dir=sim_dir)
    companion = Companion(sim_dir, tmp_path / "healthy.save", hpath)
    before = domids(sim_dir)
    t0 = time.monotonic()
    op = pyxl.save(d, target, live=live, helper=hpath, sim_dir=sim_dir,
                   timeout=STOP_TIMEOUT if kind == "stop" else 60, helper_env=EVERY_REPORT)
    companion.watch(op)
    if trigger == "start":
        if kind != "cancel":   # the helper starts from the loop: kill or stop it once it runs
            op.loop.run_until(lambda: (op.helper is not None and op.helper.pid > 0) or op.done(), 30)
        fired = [time.monotonic()]
        fault_action(op, kind)()
    else:
        fired = arm(op, SAVE_TRIGGERS[trigger], fault_action(op, kind))
    run_faulty(op, companion, kind, fired, t0)

    assert target.read_bytes() == b"precious"
    assert os.listdir(tmp_path / "faulty") == ["existing.save"], "temporary file removed"
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    time.sleep(0.05)  # a suspend still in flight would show by now
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    companion.check(hpath)
    assert domids(sim_dir) == [x for x in before if x != companion.domid]
    assert children() == kids
    assert open_fds() == fds


# ---------------------------------------------------------------------------
# restore


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    """A saved 16 MiB guest, and the offset of the middle of its page data."""
    import tempfile

    d = tempfile.mkdtemp(prefix="pyxl-test-", dir="/dev/shm")
    path = tmp_path_factory.mktemp("image") / "guest.save"
    try:
        dom = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=d)
        pyxl.wait(pyxl.save(dom, path, sim_dir=d))
    finally:
        sim.remove_dir(d)
    report = streamio.scan_path(str(path))
    assert report.ok
    pages = [r for r in report.records if r.name == "PAGE_DATA" and r.length > 1 * MB]
    middle = pages[len(pages) // 2]
    return path, report.libxc_offset, middle.offset + middle.length // 2


def feed_half(data: bytes, head: int, upto: int, on_drained: Callable[[], None]):
    """A pipe carrying ``data``: ``data[:head]`` written at once, then the
    loop writes up to ``upto`` and calls ``on_drained`` once the helper has
    read all of it (it then waits, in the middle of page data, for more)."""
    r, w = os.pipe2(os.O_CLOEXEC)
    fcntl.fcntl(w, 1031, 1 * MB)  # F_SETPIPE_SZ
    os.write(w, data[:head])
    os.set_blocking(w, False)
    loop = pyxl.default_loop()
    pos = [head]

    def drained() -> bool:
        buf = fcntl.ioctl(w, termios.FIONREAD, b"\0\0\0\0")
        return struct.unpack("i", buf)[0] == 0

    def wait_drained() -> None:
        if drained():
            on_drained()
        else:
            loop.call_later(0.001, wait_drained)

    def writable() -> None:
        try:
            pos[0] += os.write(w, data[pos[0]:upto])
        except BlockingIOError:
            return
        if pos[0] == upto:
            loop.remove_writer(w)
            wait_drained()

    def start() -> None:
        loop.add_writer(w, writable)

    return r, w, start


RESTORE_CASES = (
    [("kill", t) for t in list(RESTORE_TRIGGERS) + ["page-data"]]
    + [("stop", t) for t in ("static_data_done", "page-data")]
    + [("cancel", t) for t in ("start", "static_data_done", "page-data", "restore_results")]
)


@pytest.mark.parametrize("helper,kind,trigger", with_helpers(
    RESTORE_CASES, [f"{k}-{t}" for k, t in RESTORE_CASES]))
def test_restore_fault(sim_dir, tmp_path, image, helper, kind, trigger):
    path, head, middle = image
    hpath = HELPERS[helper]
    fds, kids = open_fds(), children()
    companion = Companion(sim_dir, tmp_path / "healthy.save", hpath)
    before = domids(sim_dir)
    timeout = STOP_TIMEOUT if kind == "stop" else 60
    t0 = time.monotonic()
    pipe = None
    if trigger == "page-data":
        fired: List[float] = []
        holder: Dict[str, pyxl.Operation] = {}

        def drained() -> None:
            fired.append(time.monotonic())
            fault_action(holder["op"], kind)()

        pipe = feed_half(path.read_bytes(), head, middle, drained)
        op = pyxl.restore(pipe[0], helper=hpath, sim_dir=sim_dir, timeout=timeout)
        holder["op"] = op
        pipe[2]()
    else:
        op = pyxl.restore(path, helper=hpath, sim_dir=sim_dir, timeout=timeout)
        if trigger == "start":
            fired = [time.monotonic()]
            fault_action(op, kind)()
        else:
            fired = arm(op, RESTORE_TRIGGERS[trigger], fault_action(op, kind))
    companion.watch(op)
    try:
        run_faulty(op, companion, kind, fired, t0)
    finally:
        if pipe is not None:
            os.close(pipe[0])
            os.close(pipe[1])
    # From a pipe, the domain is created once its head is in (op.domid is -1 until then).
    target = op.domid
    assert target not in before
    assert target not in domids(sim_dir), "the half-restored domain is destroyed"
    companion.check(hpath)
    assert domids(sim_dir) == [x for x in before if x != companion.domid]
    assert children() == kids
    assert open_fds() == fds


# ---------------------------------------------------------------------------
# stdout closed early, late suspend answers, deaths inside a frame


def wrapper(tmp_path, helper: str, redirect: str) -> str:
    """The real helper with its stdout redirected (``>/dev/null``: pyxl sees
    EOF at once while the helper keeps running; ``>&-``: closed)."""
    path = tmp_path / "wrapped-helper"
    path.write_text(f'#!/bin/sh\nexec {helper} "$@" {redirect}\n')
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("helper", ["ours", "debian"])
@pytest.mark.parametrize("mode", ["save", "restore"])
@pytest.mark.parametrize("redirect,exc_type", [(">/dev/null", pyxl.HelperProtocolError),
                                              (">&-", pyxl.HelperExited)])
def test_stdout_closed_early(sim_dir, tmp_path, image, helper, mode, redirect, exc_type):
    """No timeout set: pyxl itself must notice that the helper can no longer talk."""
    hpath = wrapper(tmp_path, HELPERS[helper], redirect)
    target = tmp_path / "existing.save"
    target.write_bytes(b"precious")
    fds, kids = open_fds(), children()
    d = sim.create(16 * MB, dirty_rate=8 * MB, sim_dir=sim_dir)
    before = domids(sim_dir)
    t0 = time.monotonic()
    if mode == "save":
        op = pyxl.save(d, target, helper=hpath, sim_dir=sim_dir)
    else:
        op = pyxl.restore(image[0], helper=hpath, sim_dir=sim_dir, name="copy")
    with pytest.raises(exc_type) as e:
        pyxl.wait(op, timeout=30)
    assert time.monotonic() - t0 < BOUND
    if redirect == ">&-":
        assert e.value.status == 255
    else:
        assert "stdout" in str(e.value)
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["existing.save", "wrapped-helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    assert domids(sim_dir) == before
    assert children() == kids
    assert open_fds() == fds


def script(tmp_path, body: str) -> str:
    """A scripted helper: a real process speaking pyxl.wire.codec frames."""
    path = tmp_path / "helper"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import os, sys, time, signal
        sys.path.insert(0, {str(ROOT)!r})
        from pyxl.wire import codec as p
        def send(m): os.write(1, p.encode(m))
        def reply(): return int.from_bytes(os.read(0, 4), "little", signed=True)
        """) + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


@pytest.mark.parametrize("body,exc_type", [
    # stdout closed while the helper lives on: found within the EOF grace, no timeout needed
    pytest.param("os.close(1)\ntime.sleep(60)", pyxl.HelperProtocolError, id="closed-lives-on"),
    pytest.param("send(p.Suspend()); assert reply() == 1\nos.close(1)\ntime.sleep(60)",
                 pyxl.HelperProtocolError, id="suspended-closed-lives-on"),
    # stdout closed, then a clean exit without complete
    pytest.param("os.close(1)\ntime.sleep(0.2)\nsys.exit(0)", pyxl.MissingComplete,
                 id="closed-exit0"),
    # killed half way through writing a frame: the death is what went wrong
    pytest.param("os.write(1, p.encode(p.Log(8, -1, 'xc', 'x' * 100))[:40])\n"
                 "os.kill(os.getpid(), signal.SIGKILL)", pyxl.HelperDied, id="killed-mid-frame"),
    pytest.param("send(p.Suspend()); assert reply() == 1\n"
                 "os.write(1, p.encode(p.Progress('xc', 'Frames', 1, 2))[:9])\nsys.exit(1)",
                 pyxl.HelperExited, id="suspended-exit1-mid-frame"),
    # cut inside a frame and exit 0: that is the helper's own protocol error
    pytest.param("os.write(1, p.encode(p.Log(5, 0, 'xc', 'x'))[:7])\nsys.exit(0)",
                 pyxl.HelperProtocolError, id="exit0-mid-frame"),
])
def test_scripted_stdout_faults(sim_dir, tmp_path, body, exc_type):
    d = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=sim_dir)
    target = tmp_path / "existing.save"
    target.write_bytes(b"precious")
    fds, kids = open_fds(), children()
    t0 = time.monotonic()
    op = pyxl.save(d, target, helper=script(tmp_path, body), sim_dir=sim_dir)
    with pytest.raises(exc_type):
        pyxl.wait(op, timeout=30)
    assert time.monotonic() - t0 < BOUND
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["existing.save", "helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    assert children() == kids
    assert open_fds() == fds


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_custom_suspend_answered_after_helper_died(sim_dir, tmp_path, helper):
    """A toolstack's suspend handler that finishes only after the helper died:
    its guest is suspended by then, and pyxl resumes it (through on_resume)."""
    d = sim.create(16 * MB, dirty_rate=8 * MB, sim_dir=sim_dir)
    loop = pyxl.default_loop()
    resumed: List[int] = []
    late: List[bool] = []

    def suspend(req: pyxl.CallbackRequest) -> None:
        os.kill(req.op.helper.pid, signal.SIGKILL)

        def finish() -> None:
            late.append(req.op.done())
            sim.suspend(d, sim_dir=sim_dir)
            req.reply(1)
        loop.call_later(0.2, finish)

    def on_resume(domid: int) -> None:
        resumed.append(domid)
        sim.resume(domid, sim_dir=sim_dir)

    op = pyxl.save(d, tmp_path / "x", helper=HELPERS[helper], sim_dir=sim_dir,
                   callbacks={"suspend": suspend}, on_resume=on_resume)
    with pytest.raises(pyxl.HelperDied):
        pyxl.wait(op, timeout=30)
    loop.run_until(lambda: bool(late), timeout=5)
    assert late == [True], "the handler answered after the operation had failed"
    assert resumed == [d]
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_slow_guest_suspend_in_flight_when_helper_dies(sim_dir, tmp_path, helper):
    """The default suspend was requested but the guest had not stopped yet when
    the helper died: pyxl waits for the suspend to land, then resumes the guest."""
    d = sim.create(16 * MB, dirty_rate=8 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "x", helper=HELPERS[helper], sim_dir=sim_dir)
    arm(op, SAVE_TRIGGERS["suspend"], lambda: os.kill(op.helper.pid, signal.SIGKILL))
    with pytest.raises(pyxl.HelperDied):
        pyxl.wait(op, timeout=30)
    for _ in range(10):
        assert sim.info(d, sim_dir=sim_dir).state == "running"
        time.sleep(0.02)
