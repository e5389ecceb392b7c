"""A stand-in loop for bench/stall.py: what any loop waits on this machine.

    python bench/stallprobe.py [--cpu-ms 0.3] [--period-ms 2.5]

Prints ``ready``, then, until its stdin ends, wakes every PERIOD and runs one
"callback" that spins for CPU of this thread's CPU time, timing it as
bench/stall.py times pyxl's: by the wall clock, and less the time the thread
waited for a CPU (/proc/thread-self/schedstat).  Then prints one JSON line:
the callbacks' count, longest, 99th percentile and how many took over 5 ms.

bench/stall.py runs it beside a round of pyxl's saves and restores, in a
session of its own (so, under autogroup, weighed as the loop's session is),
with about the loop's share of a CPU (0.3 ms every 2.5 ms: 12 %; pyxl's loop
used 10-13 % in that round).  The callback does nothing but use a CPU, so
what it waits beyond its CPU time is the machine's doing: the scheduler
sharing two CPUs with the round's children, interrupts charged to it, and
time the hypervisor under this machine takes without telling it.  Its
longest callback is the floor any loop sharing the machine would meet.
"""

import argparse
import json
import os
import select
import sys
import time


def _queued(fd: int) -> float:
    """Seconds this thread has waited on a run queue."""
    return int(os.pread(fd, 128, 0).split()[1]) / 1e9


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu-ms", type=float, default=0.3)
    p.add_argument("--period-ms", type=float, default=2.5)
    args = p.parse_args()
    cpu, period = args.cpu_ms / 1e3, args.period_ms / 1e3
    sched = os.open("/proc/thread-self/schedstat", os.O_RDONLY | os.O_CLOEXEC)
    walls, ran = [], []
    worst = {"wall_ms": -1.0}
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    due = time.monotonic()
    while True:
        due += period
        wait = due - time.monotonic()
        if wait < 0:        # late: start again from now rather than catch up
            due, wait = time.monotonic(), 0.0
        if select.select([sys.stdin], [], [], wait)[0]:
            break           # stdin ended: the round is over
        q = _queued(sched)
        w, c = time.perf_counter(), time.thread_time()
        while time.thread_time() - c < cpu:
            pass
        wall = time.perf_counter() - w
        queued = _queued(sched) - q
        walls.append(wall)
        ran.append(max(0.0, wall - queued))
        if wall * 1e3 > worst["wall_ms"]:
            worst = {"wall_ms": round(wall * 1e3, 2),
                     "cpu_ms": round((time.thread_time() - c) * 1e3, 2),
                     "queued_ms": round(queued * 1e3, 2)}
    ordered = sorted(walls)
    out = {"cpu_ms": args.cpu_ms, "period_ms": args.period_ms, "callbacks": len(walls),
           "probe_stall_max_ms": round(ordered[-1] * 1e3, 2) if walls else None,
           "probe_stall_unqueued_max_ms": round(max(ran) * 1e3, 2) if ran else None,
           "probe_stall_p99_ms": round(ordered[int(len(ordered) * 0.99)] * 1e3, 2)
           if walls else None,
           "probe_callbacks_over_5ms": sum(1 for x in walls if x > 0.005),
           "worst_probe_callback": worst}
    sys.stdout.write(json.dumps(out) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
