"""XenStore scripts (pyxl.backends.xsasync): one exchange, run waited-for or on
the loop.  On the loop, a busy xenstored (here: one that sleeps before it
answers a transaction's start and end) never holds up the application's
callbacks; a restore target's nodes and build_post's go that way.

A fake xenstored (tests/xenfakes.py: a thread per connection, xenstored's wire
protocol over real sockets) and the real pyxl loop."""

from __future__ import annotations

import errno
import socket
import time
from typing import Any, List, Optional, Tuple

import pytest

from pyxl.backends import base, xenbuild, xsasync
from pyxl.backends.xenstore import (XS_INTRODUCE, XS_READ, XS_TRANSACTION_END,
                                    XS_TRANSACTION_START, XS_WRITE, Batch, XenStore,
                                    XenStoreError)
from pyxl.loop import SelectorLoop
import test_xenbackend_hvm
import test_xenbackend_steps
from test_xenbackend_steps import CONFIG, UUID
from xenfakes import FakeXenstored, RecordingXc, backend

xsd = test_xenbackend_hvm.xsd    # the fake xenstored, with dom0's backend directories
host = test_xenbackend_steps.host    # libxl's userdata and QEMU's state files in tmp_path


def writes(values: List[Tuple[str, str]]) -> xsasync.XsScript[Optional[bytes]]:
    """A transaction of ``values``, then a read of the first path."""
    def fill(b: Batch, tx: int) -> None:
        for path, value in values:
            b.write(path, value, tx)
    yield from xsasync.transaction(fill)
    [reply] = yield [(XS_READ, values[0][0].encode() + b"\0", 0)]
    return xsasync.ok(reply)


class Gaps:
    """A ticker on the loop: the longest time between two of its ticks."""

    def __init__(self, loop: SelectorLoop, every: float = 0.005) -> None:
        self.loop, self.every = loop, every
        self.last = time.monotonic()
        self.longest = 0.0
        self.running = True
        loop.call_later(every, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        self.longest = max(self.longest, now - self.last)
        self.last = now
        if self.running:
            self.loop.call_later(self.every, self._tick)


def on_loop(xsd: FakeXenstored, script: xsasync.XsScript[Any], timeout: float = 10
            ) -> Tuple[Optional[Exception], Any, Gaps]:
    loop = SelectorLoop()
    out: List[Optional[Exception]] = []
    gaps = Gaps(loop)
    task = xsasync.XsTask(loop, xsd.connect, script, out.append, "test", timeout=timeout)
    assert loop.run_until(lambda: bool(out), timeout + 5)
    gaps.running = False
    loop.close()
    return out[0], task.result, gaps


def test_a_script_runs_the_same_waited_for_and_on_the_loop(xsd):
    values = [("/a/x", "1"), ("/a/y", "2")]
    assert xsasync.run(XenStore(sock=xsd.client), writes(values)) == b"1"
    xsd.nodes.clear()
    exc, result, _ = on_loop(xsd, writes(values))
    assert (exc, result) == (None, b"1")
    assert xsd.nodes["/a/y"] == b"2"
    # three rounds: start; both writes and nothing else; the end
    kinds = [m for m, _tx, _p in xsd.log[-5:]]
    assert kinds == [XS_TRANSACTION_START, XS_WRITE, XS_WRITE, XS_TRANSACTION_END, XS_READ]


def test_the_loop_runs_while_xenstored_takes_its_time(xsd):
    """0.3 s before each answer to a transaction's start and end: the script
    takes 0.6 s or more, and the loop's ticker never waits 0.15 s."""
    xsd.delay = {XS_TRANSACTION_START: 0.3, XS_TRANSACTION_END: 0.3}
    t0 = time.monotonic()
    exc, result, gaps = on_loop(xsd, writes([("/b", "v")]))
    assert (exc, result) == (None, b"v")
    assert time.monotonic() - t0 >= 0.6
    assert gaps.longest < 0.15, gaps.longest


def test_a_conflicting_transaction_is_made_again(xsd):
    xsd.conflicts = 2
    exc, result, _ = on_loop(xsd, writes([("/c", "v")]))
    assert (exc, result) == (None, b"v")
    starts = [m for m, _tx, _p in xsd.log if m == XS_TRANSACTION_START]
    assert len(starts) == 3
    xsd.conflicts = 100
    exc, _, _ = on_loop(xsd, writes([("/c", "v")]))
    assert isinstance(exc, XenStoreError) and exc.errno == errno.EAGAIN
    assert f"conflicted {xsasync.TRANSACTION_ATTEMPTS} times" in str(exc)


def test_a_refused_change_ends_the_transaction_uncommitted_and_names_its_path(xsd):
    def script() -> xsasync.XsScript[None]:
        def fill(b: Batch, tx: int) -> None:
            b.write("/d/ok", "1", tx)
            b.set_perms("/d/missing", ["n0"], tx)    # the fake: ENOENT
        yield from xsasync.transaction(fill)
    exc, _, _ = on_loop(xsd, script())
    assert isinstance(exc, XenStoreError) and exc.errno == errno.ENOENT
    assert str(exc).endswith("/d/missing"), str(exc)
    end = [(m, p) for m, _tx, p in xsd.log if m == XS_TRANSACTION_END]
    assert end == [(XS_TRANSACTION_END, [b"F", b""])]


def test_a_xenstored_that_never_answers_is_a_timeout_and_the_connection_is_closed():
    a, b = socket.socketpair()
    loop = SelectorLoop()
    out: List[Optional[Exception]] = []
    xsasync.XsTask(loop, lambda: XenStore(sock=a), writes([("/e", "v")]), out.append,
                   "domain 9's nodes", timeout=0.3)
    assert loop.run_until(lambda: bool(out), 5)
    assert isinstance(out[0], OSError) and out[0].errno == errno.ETIMEDOUT
    assert str(out[0]) == "[Errno 110] domain 9's nodes: xenstored did not answer within 0.3 s"
    assert a.fileno() == -1 and b.recv(100)     # closed; the start was sent
    assert not loop._sel.get_map()              # nothing left on the loop
    loop.close()
    b.close()


def test_xenstored_closing_the_connection_fails_the_script_at_once():
    a, b = socket.socketpair()
    loop = SelectorLoop()
    out: List[Optional[Exception]] = []
    xsasync.XsTask(loop, lambda: XenStore(sock=a), writes([("/e", "v")]), out.append)
    loop.run_once(0.1)
    b.close()
    t0 = time.monotonic()
    assert loop.run_until(lambda: bool(out), 5)
    assert time.monotonic() - t0 < 1
    assert isinstance(out[0], OSError) and out[0].errno == errno.ECONNRESET
    loop.close()


def test_a_cancelled_script_calls_nothing_and_leaves_nothing(xsd):
    xsd.delay = {XS_TRANSACTION_START: 0.2}
    loop = SelectorLoop()
    out: List[Optional[Exception]] = []
    task = xsasync.XsTask(loop, xsd.connect, writes([("/f", "v")]), out.append)
    loop.run_once(0.05)
    task.cancel()
    loop.run_until(lambda: False, 0.4)
    assert out == [] and "/f" not in xsd.nodes
    assert not loop._sel.get_map()
    loop.close()


def test_a_restore_targets_nodes_and_build_post_wait_on_the_loop(xsd, host):
    """The XenStore parts of a restore on a busy xenstored: the domain's
    nodes (made with the domain) and build_post's (after the stream) take
    0.4 s or more each, and the application's ticker never waits 0.15 s."""
    loop = SelectorLoop()
    be = backend(xsd, RecordingXc())
    xsd.delay = {XS_TRANSACTION_START: 0.2, XS_TRANSACTION_END: 0.2}
    made: List[Tuple[Optional[int], Optional[Exception]]] = []
    gaps = Gaps(loop)
    t0 = time.monotonic()
    base.start_create_restore_target(be, loop, CONFIG, lambda d, e: made.append((d, e)))
    assert loop.run_until(lambda: bool(made), 10)
    assert made == [(7, None)] and time.monotonic() - t0 >= 0.4
    assert xsd.nodes["/local/domain/7/name"] == b"g1"
    assert xsd.nodes["/vm/" + UUID + "/name"] == b"g1"
    done: List[Tuple[bool, str]] = []
    t0 = time.monotonic()
    base.start_restore_done(be, loop, 7, 0xfeffc, 0xfefff, lambda ok, why: done.append((ok, why)))
    assert loop.run_until(lambda: bool(done), 10)
    assert done == [(True, "")] and time.monotonic() - t0 >= 0.4
    gaps.running = False
    assert gaps.longest < 0.15, gaps.longest
    assert xsd.nodes["/local/domain/7/store/ring-ref"] == str(0xfeffc).encode()
    assert xsd.nodes["/local/domain/7/console/ring-ref"] == str(0xfefff).encode()
    intro = [p for m, _tx, p in xsd.log if m == XS_INTRODUCE]
    assert intro and intro[-1][:2] == [b"7", str(0xfeffc).encode()]
    loop.close()


def test_build_post_refused_by_xenstored_is_one_line(xsd, host):
    loop = SelectorLoop()
    be = backend(xsd, RecordingXc())
    made: List[Tuple[Optional[int], Optional[Exception]]] = []
    base.start_create_restore_target(be, loop, CONFIG, lambda d, e: made.append((d, e)))
    assert loop.run_until(lambda: bool(made), 10) and made == [(7, None)]
    xsd.conflicts = 1000
    done: List[Tuple[bool, str]] = []
    base.start_restore_done(be, loop, 7, 1, 2, lambda ok, why: done.append((ok, why)))
    assert loop.run_until(lambda: bool(done), 10)
    ok, why = done[0]
    assert not ok and "\n" not in why
    assert why == (f"XenStore: xenstored: the transaction conflicted "
                   f"{xsasync.TRANSACTION_ATTEMPTS} times")
    # nothing introduced: the domain is not finished
    assert not [p for m, _tx, p in xsd.log if m == XS_INTRODUCE]
    loop.close()


def test_build_post_is_the_same_waited_for_and_on_the_loop(xsd, host):
    """The script is one: the nodes the waited-for restore_done writes are
    those the loop's form writes."""
    be = backend(xsd, RecordingXc())
    domid = be.create_restore_target(CONFIG)
    before = dict(xsd.nodes)
    be.restore_done(domid, 5, 6)
    waited = {p: v for p, v in xsd.nodes.items() if before.get(p) != v
              and not p.endswith("start_time")}
    for p in waited:
        xsd.nodes[p] = before.get(p, b"")
    loop = SelectorLoop()
    done: List[Tuple[bool, str]] = []
    be.start_restore_done(loop, domid, 5, 6, lambda ok, why: done.append((ok, why)))
    assert loop.run_until(lambda: bool(done), 10) and done == [(True, "")]
    on_loop_ = {p: v for p, v in xsd.nodes.items() if p in waited}
    assert on_loop_ == waited and len(waited) > 20
    loop.close()


def test_xenbuild_scripts_are_generators_not_calls():
    """Making the script sends nothing (it runs when driven)."""
    script = xenbuild.make_xenstore(7, CONFIG, "g1", UUID)
    assert next(script) == [(XS_TRANSACTION_START, b"\0", 0)]
    script.close()


def test_a_rename_on_the_loop_renames_both_nodes_and_the_stored_config(xsd, host):
    loop = SelectorLoop()
    be = backend(xsd, RecordingXc())
    domid = be.create_restore_target(CONFIG)
    xsd.delay = {XS_TRANSACTION_START: 0.2, XS_TRANSACTION_END: 0.2}
    gaps = Gaps(loop)
    done: List[Tuple[bool, str]] = []
    base.start_rename(be, loop, domid, "g1--incoming", lambda ok, why: done.append((ok, why)))
    assert loop.run_until(lambda: bool(done), 10) and done == [(True, "")]
    gaps.running = False
    assert gaps.longest < 0.15, gaps.longest
    assert xsd.nodes[f"/local/domain/{domid}/name"] == b"g1--incoming"
    assert xsd.nodes[f"/vm/{UUID}/name"] == b"g1--incoming"
    stored = xenbuild.read_userdata(str(host), domid, UUID)
    assert stored is not None and stored["c_info"]["name"] == "g1--incoming"
    assert be.domain_names()[domid] == "g1--incoming"
    loop.close()


def test_a_rename_into_a_name_in_use_is_refused_and_changes_nothing(xsd, host):
    be = backend(xsd, RecordingXc())
    domid = be.create_restore_target(CONFIG)
    xsd.nodes["/local/domain/9/name"] = b"other"
    loop = SelectorLoop()
    done: List[Tuple[bool, str]] = []
    base.start_rename(be, loop, domid, "other", lambda ok, why: done.append((ok, why)))
    assert loop.run_until(lambda: bool(done), 10)
    assert done == [(False, "domain 'other' already exists (domid 9)")]
    with pytest.raises(OSError, match=r"domain 'other' already exists \(domid 9\)"):
        be.rename(domid, "other")
    assert xsd.nodes[f"/local/domain/{domid}/name"] == b"g1"
    assert not [p for m, _tx, p in xsd.log if m == XS_TRANSACTION_START][1:]   # only the build's
    loop.close()
