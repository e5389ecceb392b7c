"""A listening receiver's door under attack: real sockets, real processes.

* A flood of silent connections (another process, 200 a second, each held
  0.5 s) must not keep a real TLS sender out: the receiver drops the least
  advanced connection of the busiest source, and silent ones are the least.
"""

from __future__ import annotations

import subprocess
import sys
from typing import Any, Iterator

import pytest

from pyxl.loop import default_loop

from test_migrate import busy
from test_migrate_tls import pki, real_migration, receiver  # noqa: F401  (pki: a fixture)

FLOOD = """
import collections, socket, sys, time
port, rate = int(sys.argv[1]), float(sys.argv[2])
held = collections.deque()
n, t0 = 0, time.monotonic()
while True:
    try:
        held.append((time.monotonic(), socket.create_connection(("127.0.0.1", port), 1)))
        n += 1
    except OSError:
        time.sleep(0.05)
    while held and held[0][0] < time.monotonic() - 0.5:
        held.popleft()[1].close()
    time.sleep(max(0.0, t0 + n / rate - time.monotonic()))
"""


@pytest.fixture
def flood() -> Iterator[Any]:
    procs = []

    def start(port: int, rate: float = 200) -> None:
        procs.append(subprocess.Popen([sys.executable, "-c", FLOOD, str(port), str(rate)]))

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=30)


def test_a_silent_flood_does_not_keep_a_tls_sender_out(hosts, pki, flood):  # noqa: F811
    a, b = hosts
    dom = busy(a, 20)
    rx = receiver(pki, b, header_timeout=10)
    flood(rx.address[1])
    # the flood is under way: the door has been full and dropping for a while
    assert default_loop().run_until(lambda: rx.refused >= 100, 60), rx.refused
    real_migration(pki, a, b, dom, rx)
