"""The migration relay hands the loop back within a bounded time per wake-up.

A splice can sleep on the pipe's lock while the helper, holding it mid-write,
waits for a CPU; eight such in a row once held the loop for 50-90 ms
(``bench/stall.py``'s migrate round).  Real pipes here, and splices made slow
by a sleep before each real one.
"""

from __future__ import annotations

import os
import time
from typing import Any, List

from pyxl.fdio import make_pipe
from pyxl.loop import SelectorLoop
from pyxl.migrate import relay


def test_a_wake_up_stops_after_its_time_and_every_byte_arrives(monkeypatch):
    real = os.splice
    splices: List[int] = []      # splices made in each wake-up of the relay

    def slow_splice(*a: Any, **k: Any) -> int:
        splices[-1] += 1
        time.sleep(0.003)          # as if the helper held the pipe's lock
        return real(*a, **k)
    monkeypatch.setattr(relay.os, "splice", slow_splice)
    monkeypatch.setattr(relay, "SPLICE", 16 << 10)   # 256 KiB: 16 splices

    src_r, src_w = make_pipe(1 << 20)
    dst_r, dst_w = make_pipe(1 << 20)
    data = os.urandom(256 << 10)
    os.write(src_w, data)
    os.close(src_w)
    loop = SelectorLoop()
    done: List[bool] = []
    real_pump = relay.SpliceRelay._pump

    def counted_pump(self: relay.SpliceRelay) -> None:
        splices.append(0)
        real_pump(self)
    monkeypatch.setattr(relay.SpliceRelay, "_pump", counted_pump)
    r = relay.SpliceRelay(loop, src_r, dst_w, None, lambda: done.append(True),
                          lambda exc: done.append(False))
    assert loop.run_until(lambda: r.eof, 10)
    r.finish(b"trailer")
    assert loop.run_until(lambda: bool(done), 10) and done == [True]
    os.set_blocking(dst_r, False)
    assert os.read(dst_r, 1 << 20) == data + b"trailer"
    # 16 data splices (and the one that saw the end), one per wake-up: each
    # splice took 3 ms, over the 2 ms a wake-up may take; 8 per wake-up before
    moved = [n for n in splices if n]
    assert sum(moved) == 17 and max(moved) == 1, splices
    loop.close()
    for fd in (src_r, dst_r, dst_w):
        os.close(fd)
