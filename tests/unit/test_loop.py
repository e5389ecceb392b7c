"""The three loop integrations watch fds and timers correctly."""

import asyncio
import os
import select
import time

from pyxl.loop import READ, WRITE, AsyncioLoop, HookLoop, SelectorLoop


def exercise(loop, run_until):
    """Reader, writer and timer semantics every loop must share."""
    r, w = os.pipe()
    got, fired, wrote = [], [], []
    try:
        loop.add_reader(r, lambda: got.append(os.read(r, 100)))
        cancelled = loop.call_later(0.01, lambda: fired.append("cancelled"))
        cancelled.cancel()
        loop.call_later(0.02, lambda: fired.append("timer"))

        def writable():
            wrote.append(os.write(w, b"ping"))
            loop.remove_writer(w)

        loop.add_writer(w, writable)
        run_until(lambda: got and fired)
        assert got == [b"ping"] and wrote == [4] and fired == ["timer"]
        loop.remove_reader(r)
        os.write(w, b"more")
        t0 = time.monotonic()
        loop.call_later(0.05, lambda: fired.append("late"))
        run_until(lambda: len(fired) == 2)
        assert got == [b"ping"], "a removed reader must not fire"
        assert time.monotonic() - t0 >= 0.045
    finally:
        os.close(r)
        os.close(w)


def test_selector_loop():
    loop = SelectorLoop()
    exercise(loop, lambda cond: loop.run_until(cond, timeout=5) or (_ for _ in ()).throw(AssertionError("hang")))


class ToolstackLoop:
    """A toolstack's own poll loop, exposing libxl-style registration hooks."""

    def __init__(self):
        self.fds = {}        # token -> [fd, events, ready]
        self.timeouts = {}   # token -> [deadline, fire]
        self.next = 0
        self.calls = []

    def fd_register(self, fd, events, ready):
        self.next += 1
        self.fds[self.next] = [fd, events, ready]
        self.calls.append(("register", fd, events))
        return self.next

    def fd_modify(self, token, events):
        self.fds[token][1] = events
        self.calls.append(("modify", self.fds[token][0], events))

    def fd_deregister(self, token):
        self.calls.append(("deregister", self.fds.pop(token)[0]))

    def timeout_register(self, delay, fire):
        self.next += 1
        self.timeouts[self.next] = [time.monotonic() + delay, fire]
        return self.next

    def timeout_cancel(self, token):
        self.timeouts.pop(token, None)

    def run_until(self, cond, limit=5.0):
        end = time.monotonic() + limit
        while not cond():
            assert time.monotonic() < end, "hang"
            p = select.poll()
            for fd, events, _ in self.fds.values():
                p.register(fd, (select.POLLIN if events & READ else 0) | (select.POLLOUT if events & WRITE else 0))
            wait = min([d for d, _ in self.timeouts.values()], default=time.monotonic() + 0.1) - time.monotonic()
            ready = p.poll(max(0, wait) * 1000)
            for fd, ev in ready:
                for token, (f, events, cb) in list(self.fds.items()):
                    if f == fd and token in self.fds:
                        cb((READ if ev & (select.POLLIN | select.POLLHUP) else 0) | (WRITE if ev & select.POLLOUT else 0))
            now = time.monotonic()
            for token, (deadline, fire) in list(self.timeouts.items()):
                if deadline <= now:
                    del self.timeouts[token]
                    fire()


def test_hook_loop_uses_only_the_hooks():
    ts = ToolstackLoop()
    loop = HookLoop(ts.fd_register, ts.fd_modify, ts.fd_deregister, ts.timeout_register, ts.timeout_cancel)
    exercise(loop, ts.run_until)
    kinds = [c[0] for c in ts.calls]
    assert kinds.count("register") == 2 and "deregister" in kinds
    assert not ts.fds, "every fd watch was deregistered"


def test_hook_loop_timers_fire_once_cancel_and_leave_no_cyclic_garbage():
    """A HookLoop timer fires once, a cancelled one never (its token goes back
    to the toolstack), and making one creates nothing only the cyclic
    collector could free (a class per call did: the collector then ran inside
    some later callback)."""
    import gc
    ts = ToolstackLoop()
    loop = HookLoop(ts.fd_register, ts.fd_modify, ts.fd_deregister, ts.timeout_register, ts.timeout_cancel)
    fired = []
    t1 = loop.call_later(0, lambda: fired.append(1))
    t2 = loop.call_later(0, lambda: fired.append(2))
    t2.cancel()
    assert len(ts.timeouts) == 1
    ts.run_until(lambda: fired)
    t1.cancel()                         # after firing: nothing to cancel
    assert fired == [1] and not ts.timeouts
    gc.collect()
    gc.disable()
    try:
        for _ in range(200):
            loop.call_later(0, lambda: None).cancel()
        assert gc.collect() == 0
    finally:
        gc.enable()


def test_asyncio_loop():
    loop = asyncio.new_event_loop()
    try:
        exercise(AsyncioLoop(loop), lambda cond: _step_until(loop, cond))
    finally:
        loop.close()


def _step_until(loop, cond, limit=5.0):
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, "hang"
        loop.run_until_complete(asyncio.sleep(0.001))
