"""Host-name lookup that does not block the event loop, and uses no thread.

``socket.getaddrinfo`` on a name may wait seconds for DNS.  asyncio hides
that in a thread pool; pyxl has no threads, so a name goes to a child
process instead -- ``getent ahosts NAME``, which resolves through the same
NSS configuration as getaddrinfo (/etc/hosts, DNS, ...) -- whose output and
exit the loop watches like any other fd.  Numeric addresses need no lookup
and are answered at once.

A name may have several addresses (Debian 13 gives ``localhost`` as ::1
before 127.0.0.1): :attr:`Lookup.addresses` holds them all, in the resolver's
order, and the connection tries each in turn, as ``socket.create_connection``
does.
"""

from __future__ import annotations

import os
import socket
import subprocess
from typing import Any, Callable, List, Optional, Tuple

from pyxl.loop import Loop, Timer

Address = Tuple[int, Tuple[Any, ...]]   # (family, sockaddr) for socket.socket(family).connect_ex(sockaddr)
Done = Callable[[Optional[Address], str], None]

GETENT = "getent"
_MAX_OUTPUT = 1 << 16


def numeric(host: str, port: int) -> Optional[Address]:
    """The address if ``host`` is an IPv4/IPv6 literal, else None."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_NUMERICHOST | socket.AI_NUMERICSERV)
    except (socket.gaierror, UnicodeError):
        return None
    return infos[0][0], infos[0][4]


def parse_ahosts(text: str, port: int) -> List[Address]:
    """The STREAM addresses of ``getent ahosts`` output, with ``port``, in its
    order, each once."""
    found: List[Address] = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 2 and fields[1] == "STREAM":
            addr = numeric(fields[0], port)
            if addr is not None and addr not in found:
                found.append(addr)
    return found


class Lookup:
    """Resolve ``host`` for a TCP connection to ``port``; ``done(address, "")``
    or ``done(None, why)`` is called once, from the loop (never from here).
    ``address`` is the first of :attr:`addresses`, all the name has."""

    def __init__(self, loop: Loop, host: str, port: int, done: Done) -> None:
        self.loop, self.host, self.port, self._done = loop, host, port, done
        self._out: List[bytes] = []
        self._proc: Optional["subprocess.Popen[bytes]"] = None
        self._pidfd = -1
        self._reading = False
        self._reaping = False
        self.finished = False
        self._timer: Optional[Timer] = None
        self.addresses: List[Address] = []
        addr = numeric(host, port)
        if addr is not None or not host or host.startswith("-"):
            self.addresses = [addr] if addr is not None else []
            why = "" if addr is not None else f"cannot resolve {host!r}: not a host name"
            self._timer = loop.call_later(0, lambda: self._finish(addr, why))
            return
        try:
            self._proc = subprocess.Popen([GETENT, "ahosts", host], stdin=subprocess.DEVNULL,
                                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          close_fds=True, process_group=0)  # Ctrl-C: pyxl's
        except OSError as exc:
            # The message now: ``exc`` is unbound once the except block ends.
            why = f"cannot resolve {host!r}: {GETENT}: {exc.strerror or exc}"
            self._timer = loop.call_later(0, lambda: self._finish(None, why))
            return
        assert self._proc.stdout is not None
        os.set_blocking(self._proc.stdout.fileno(), False)
        self._pidfd = os.pidfd_open(self._proc.pid)
        loop.add_reader(self._proc.stdout.fileno(), self._readable)
        self._reading = True

    def _readable(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        try:
            data = os.read(self._proc.stdout.fileno(), 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and sum(map(len, self._out)) < _MAX_OUTPUT:
            self._out.append(data)
            return
        # EOF: reap the child when it has exited (it is about to).
        self._stop_reading()
        self.loop.add_reader(self._pidfd, self._exited)
        self._reaping = True

    def _stop_reading(self) -> None:
        if self._reading and self._proc is not None and self._proc.stdout is not None:
            self.loop.remove_reader(self._proc.stdout.fileno())
            self._reading = False

    def _exited(self) -> None:
        assert self._proc is not None
        self.loop.remove_reader(self._pidfd)
        self._reaping = False
        status = self._proc.wait()
        self._close()
        self.addresses = parse_ahosts(b"".join(self._out).decode("ascii", "replace"), self.port)
        if self.addresses:
            self._finish(self.addresses[0], "")
        elif status == 2:
            self._finish(None, f"cannot resolve {self.host!r}: unknown host")
        else:
            self._finish(None, f"cannot resolve {self.host!r} ({GETENT} ahosts exit {status})")

    def _close(self) -> None:
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        if self._proc is not None and self._proc.stdout is not None:
            self._proc.stdout.close()

    def _finish(self, addr: Optional[Address], why: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._done(addr, why)

    def cancel(self) -> None:
        """Stop: no callback; the lookup process is killed and reaped."""
        if self.finished:
            return
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        self._stop_reading()
        if self._proc is not None:
            if self._reaping:
                self.loop.remove_reader(self._pidfd)
                self._reaping = False
            if self._proc.returncode is None:
                self._proc.kill()
                self._proc.wait()   # SIGKILLed: returns at once
            self._close()
