"""Reference for pyxl's loop lag: the same 1 ms timer on a SelectorLoop, in a process doing nothing else.

Run by bench/run.py beside the concurrency runs, unpinned like pyxl's loop.
It prints "ready", ticks until its stdin is closed, then prints one JSON line:
[time.monotonic() at firing, lateness] for every firing, in seconds (CLOCK_MONOTONIC
is system-wide, so the caller can keep only the firings inside its own window).  Whatever lag it sees comes from the
machine (CPU contention, wake-up latency, epoll's 1 ms timeout granularity),
not from work done on the loop.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any, Dict

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pyxl.loop import SelectorLoop  # noqa: E402


def main() -> int:
    loop = SelectorLoop()
    lags = []
    state: Dict[str, Any] = {"stop": False, "due": 0.0}   # "stop" a bool, "due" a float

    def fire() -> None:
        if state["stop"]:
            return
        now = time.monotonic()
        lags.append((round(now, 6), round(now - state["due"], 7)))
        arm()

    def arm() -> None:
        state["due"] = time.monotonic() + 0.001
        loop.call_later(0.001, fire)

    def stdin_ready() -> None:
        if not os.read(0, 4096):
            state["stop"] = True
            loop.remove_reader(0)

    loop.add_reader(0, stdin_ready)
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    arm()
    loop.run_until(lambda: state["stop"])
    sys.stdout.write(json.dumps(lags) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
