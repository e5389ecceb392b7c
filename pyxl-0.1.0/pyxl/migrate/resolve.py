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
from typing import Any, Callable, List, Optional, Tuple

from pyxl.fdio import close_quietly
from pyxl.loop import Loop, Timer
from pyxl.spawn import Child

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
        self._child: Optional[Child] = None
        self._rfd = -1
        self._status: Optional[int] = None
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
            self._rfd, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
            try:
                # Started by pyxl-spawner (never waited for); its own process
                # group: Ctrl-C is pyxl's.
                self._child = Child(loop, [GETENT, "ahosts", host], self._exited, fds={1: w})
            finally:
                os.close(w)
        except OSError as exc:
            close_quietly(self._rfd)
            self._rfd = -1
            # The message now: ``exc`` is unbound once the except block ends.
            why = f"cannot resolve {host!r}: {GETENT}: {exc.strerror or exc}"
            self._timer = loop.call_later(0, lambda: self._finish(None, why))
            return
        loop.add_reader(self._rfd, self._readable)

    def _readable(self) -> None:
        try:
            data = os.read(self._rfd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data and sum(map(len, self._out)) < _MAX_OUTPUT:
            self._out.append(data)
            return
        # EOF (or too much): done reading; the outcome once it has exited too.
        self._stop_reading()
        self._conclude()

    def _stop_reading(self) -> None:
        if self._rfd >= 0:
            self.loop.remove_reader(self._rfd)
            os.close(self._rfd)
            self._rfd = -1

    def _exited(self, status: Optional[int]) -> None:
        self._status = -1 if status is None else status
        self._conclude()

    def _conclude(self) -> None:
        if self._rfd >= 0 or self._status is None:
            return       # still reading, or not reaped yet
        status = self._status
        self.addresses = parse_ahosts(b"".join(self._out).decode("ascii", "replace"), self.port)
        if self.addresses:
            self._finish(self.addresses[0], "")
        elif self._child is not None and self._child.start_error is not None:
            self._finish(None, f"cannot resolve {self.host!r}: {GETENT}: "
                               f"{self._child.start_error.strerror}")
        elif status == 2:
            self._finish(None, f"cannot resolve {self.host!r}: unknown host")
        else:
            self._finish(None, f"cannot resolve {self.host!r} ({GETENT} ahosts exit {status})")

    def _finish(self, addr: Optional[Address], why: str) -> None:
        if self.finished:
            return
        self.finished = True
        self._done(addr, why)

    def cancel(self) -> None:
        """Stop: no callback; the lookup process is killed (and reaped from the loop)."""
        if self.finished:
            return
        self.finished = True
        if self._timer is not None:
            self._timer.cancel()
        self._stop_reading()
        if self._child is not None:
            self._child.forget()
            self._child.kill()
