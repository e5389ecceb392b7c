"""A QMP client driven by a :class:`pyxl.loop.Loop`: nothing here ever blocks.

::

    client = QmpClient(loop, "/var/run/xen/qmp-libxl-7", timeout=10.0)
    client.connect(lambda err: ...)                # greeting + qmp_capabilities
    client.command("stop", None, lambda value, err: ...)
    client.command("add-fd", {}, on_added, fds=[fd])  # fd sent with SCM_RIGHTS
    client.close()

The socket is connected non-blocking (a connect still in progress is waited
for as writability), its reads and writes are fd watches on the loop, and every
wait -- connecting, the greeting, each command -- is bounded by a loop timer.
Commands given before the connection is ready are queued and sent, in order,
once ``qmp_capabilities`` has been answered.

A command's ``fds`` go in the same ``sendmsg`` as the command's first bytes,
as QEMU wants for ``add-fd`` (it takes the descriptors that arrived with the
command).  They stay the caller's: keep them open until ``done`` is called.

Each ``done`` is called exactly once, from the loop (never from inside
:meth:`~QmpClient.command`): ``done(value, None)`` with the ``return`` member,
or ``done(None, err)`` with a :class:`pyxl.errors.DeviceModelError` --
:class:`~pyxl.qmp.codec.QmpCommandError` (the device model's QMP error),
:class:`~pyxl.qmp.codec.QmpTimeout`, :class:`~pyxl.qmp.codec.QmpConnectionError`
(connect failed, connection lost) or :class:`~pyxl.qmp.codec.QmpRemoteProtocolError`.
A broken connection fails every command waiting on it and closes the client.
:meth:`~QmpClient.close` drops what is pending without calling anyone.

May import: pyxl.errors, pyxl.loop, pyxl.qmp.codec.
"""

from __future__ import annotations

import array
import errno
import os
import socket
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence

from pyxl.errors import DeviceModelError
from pyxl.loop import Loop, Timer
from pyxl.qmp.codec import (MAX_LINE, NEED_DATA, Closed, Error, Event, Greeting,
                            QmpCommandError, QmpConnection, QmpConnectionError,
                            QmpLocalProtocolError, QmpProtocolError, QmpTimeout, Return)

__all__ = ["Connected", "QmpClient", "Reply"]

#: ``done(value, err)``: a command's outcome.
Reply = Callable[[Any, Optional[DeviceModelError]], None]
#: ``done(err)``: the connection's outcome (None: ready for commands).
Connected = Callable[[Optional[DeviceModelError]], None]

_READ_SIZE = 65536
# While the server is not listening yet (retry_connect): how often to try again.
_RETRY = 0.01


class _Command:
    __slots__ = ("name", "arguments", "fds", "done", "timer", "id")

    def __init__(self, name: str, arguments: Optional[Mapping[str, Any]], fds: Sequence[int],
                 done: Reply) -> None:
        self.name, self.arguments, self.fds, self.done = name, arguments, list(fds), done
        self.timer: Optional[Timer] = None
        self.id: Optional[int] = None


class _Out:
    """Bytes to write; ``fds`` ride with the first of them."""

    __slots__ = ("data", "fds")

    def __init__(self, data: bytes, fds: List[int]) -> None:
        self.data = bytearray(data)
        self.fds = fds


class QmpClient:
    """One QMP connection to the socket at ``path``, on ``loop``.

    ``timeout``: the default bound for connecting (connect + greeting +
    capabilities) and for each command.  ``retry_connect``: while the socket does
    not exist or nobody listens yet (ENOENT, ECONNREFUSED), try again until the
    connect timeout instead of failing at once.  ``on_event(event)``: QMP events
    (STOP, RESUME, ...).  ``on_lost(err)``: the connection broke (after the
    pending commands were failed with ``err``).
    """

    def __init__(self, loop: Loop, path: str, *, timeout: float = 10.0,
                 retry_connect: bool = False, max_line: int = MAX_LINE,
                 on_event: Optional[Callable[[Event], None]] = None,
                 on_lost: Optional[Callable[[DeviceModelError], None]] = None) -> None:
        if not timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {timeout!r}")
        self.loop = loop
        self.path = path
        self.timeout = timeout
        self.retry_connect = retry_connect
        self.on_event = on_event
        self.on_lost = on_lost
        self.codec = QmpConnection(max_line)
        self.greeting: Optional[Greeting] = None
        self._sock: Optional[socket.socket] = None
        self._connected: Optional[Connected] = None
        self._connect_timer: Optional[Timer] = None
        self._retry_timer: Optional[Timer] = None
        self._queued: Deque[_Command] = deque()        # waiting for the connection
        self._sent: Dict[int, _Command] = {}           # id -> waiting for its answer
        self._abandoned: Dict[int, str] = {}           # timed-out ids whose answers are dropped
        self._out: Deque[_Out] = deque()
        self._writing = False
        self._reading = False
        self._state = "new"        # new, connecting, negotiating, ready, closed
        self._soon: List[Timer] = []

    # -- public -------------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._state == "ready"

    @property
    def closed(self) -> bool:
        return self._state == "closed"

    def connect(self, done: Connected, timeout: Optional[float] = None) -> None:
        """Connect, read the greeting and negotiate capabilities; ``done(None)`` then,
        or ``done(err)``.  Bounded by ``timeout`` (default: the client's)."""
        if self._state != "new":
            raise QmpLocalProtocolError(f"QmpClient.connect: already {self._state}")
        self._connected = done
        self._state = "connecting"
        self._connect_timer = self.loop.call_later(
            self.timeout if timeout is None else timeout, self._connect_timed_out)
        self._try_connect()

    def command(self, name: str, arguments: Optional[Mapping[str, Any]] = None,
                done: Optional[Reply] = None, fds: Sequence[int] = (),
                timeout: Optional[float] = None) -> None:
        """Execute ``name`` with ``arguments``; ``done(value, err)`` from the loop.
        ``fds`` are passed with SCM_RIGHTS in the command's own ``sendmsg``."""
        if name == "qmp_capabilities":
            raise QmpLocalProtocolError("qmp_capabilities is the client's own business")
        cmd = _Command(name, arguments, fds, done or (lambda value, err: None))
        if self._state == "closed":
            self._later(cmd, QmpConnectionError(f"QMP {name}: the connection to {self.path} "
                                                "is closed"))
            return
        cmd.timer = self.loop.call_later(self.timeout if timeout is None else timeout,
                                         lambda: self._command_timed_out(cmd))
        if self._state == "ready":
            self._send(cmd)
        else:
            self._queued.append(cmd)

    def close(self) -> None:
        """Stop: no more watches or timers, the socket closed, pending commands dropped."""
        if self._state == "closed":
            return
        self._state = "closed"
        for t in [self._connect_timer, self._retry_timer, *self._soon]:
            if t is not None:
                t.cancel()
        self._connect_timer = self._retry_timer = None
        self._soon.clear()
        for cmd in [*self._queued, *self._sent.values()]:
            if cmd.timer is not None:
                cmd.timer.cancel()
                cmd.timer = None
        self._queued.clear()
        self._sent.clear()
        self._out.clear()
        self._connected = None
        if self._sock is not None:
            fd = self._sock.fileno()
            if self._reading:
                self.loop.remove_reader(fd)
            if self._writing:
                self.loop.remove_writer(fd)
            self._reading = self._writing = False
            self._sock.close()
            self._sock = None

    # -- connecting ---------------------------------------------------------------------------

    def _try_connect(self) -> None:
        self._retry_timer = None
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK
                             | socket.SOCK_CLOEXEC)
        try:
            err = sock.connect_ex(self.path)
        except OSError as exc:          # e.g. a path too long for sun_path
            sock.close()
            self._fail(QmpConnectionError(f"cannot connect to QMP socket {self.path}: {exc}"))
            return
        if err in (errno.EAGAIN, errno.ENOENT, errno.ECONNREFUSED) and \
                (err == errno.EAGAIN or self.retry_connect):
            sock.close()       # nobody listens yet, or its backlog is full: try again
            self._retry_timer = self.loop.call_later(_RETRY, self._try_connect)
            return
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self._fail(QmpConnectionError(f"cannot connect to QMP socket {self.path}: "
                                          f"{os.strerror(err)}"))
            return
        self._sock = sock
        if err == errno.EINPROGRESS:
            self.loop.add_writer(sock.fileno(), self._connect_finished)
            self._writing = True
            return
        self._start_reading()

    def _connect_finished(self) -> None:
        assert self._sock is not None
        self.loop.remove_writer(self._sock.fileno())
        self._writing = False
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._fail(QmpConnectionError(f"cannot connect to QMP socket {self.path}: "
                                          f"{os.strerror(err)}"))
            return
        self._start_reading()

    def _start_reading(self) -> None:
        assert self._sock is not None
        self._state = "negotiating"
        self.loop.add_reader(self._sock.fileno(), self._readable)
        self._reading = True

    def _connect_timed_out(self) -> None:
        self._connect_timer = None
        what = "connecting to" if self._sock is None else "the greeting and capabilities of"
        self._fail(QmpTimeout(f"QMP: {what} {self.path} took more than the time allowed"))

    # -- reading ------------------------------------------------------------------------------

    def _readable(self) -> None:
        assert self._sock is not None
        try:
            data = self._sock.recv(_READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fail(QmpConnectionError(f"QMP socket {self.path}: {exc.strerror or exc}"))
            return
        try:
            self.codec.receive_data(data)
            while self._state != "closed":
                ev = self.codec.next_event()
                if ev is NEED_DATA:
                    break
                self._handle(ev)
        except QmpProtocolError as exc:
            self._fail(exc)

    def _handle(self, ev: object) -> None:
        if isinstance(ev, Greeting):
            self.greeting = ev
            _, data = self.codec.send_command("qmp_capabilities")
            self._write(data, [])
        elif isinstance(ev, (Return, Error)):
            if ev.command == "qmp_capabilities":
                self._negotiated(ev)
                return
            abandoned = self._abandoned.pop(ev.id, None)
            cmd = self._sent.pop(ev.id, None)
            if cmd is None:
                assert abandoned is not None   # the codec knows every id it sent
                return                         # answered after its timeout: nobody waits
            if cmd.timer is not None:
                cmd.timer.cancel()
                cmd.timer = None
            if isinstance(ev, Return):
                cmd.done(ev.value, None)
            else:
                cmd.done(None, QmpCommandError(cmd.name, ev.cls, ev.desc))
        elif isinstance(ev, Event):
            if self.on_event is not None:
                self.on_event(ev)
        elif isinstance(ev, Closed):
            self._fail(QmpConnectionError(f"the device model closed QMP socket {self.path}"
                                          + (f" while {len(self._sent)} command(s) waited"
                                             if self._sent else "")))

    def _negotiated(self, ev: object) -> None:
        if isinstance(ev, Error):
            self._fail(QmpCommandError("qmp_capabilities", ev.cls, ev.desc))
            return
        self._state = "ready"
        if self._connect_timer is not None:
            self._connect_timer.cancel()
            self._connect_timer = None
        done, self._connected = self._connected, None
        while self._queued and self._state == "ready":
            self._send(self._queued.popleft())
        if done is not None and self._state == "ready":
            done(None)

    # -- writing ------------------------------------------------------------------------------

    def _send(self, cmd: _Command) -> None:
        try:
            cmd.id, data = self.codec.send_command(cmd.name, cmd.arguments)
        except QmpLocalProtocolError as exc:   # e.g. arguments that are not JSON
            if cmd.timer is not None:
                cmd.timer.cancel()
            self._later(cmd, exc)
            return
        self._sent[cmd.id] = cmd
        self._write(data, cmd.fds)

    def _write(self, data: bytes, fds: List[int]) -> None:
        self._out.append(_Out(data, fds))
        if not self._writing:
            self._flush()

    def _flush(self) -> None:
        sock = self._sock
        assert sock is not None
        while self._out and self._state != "closed":
            out = self._out[0]
            anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", out.fds))] \
                if out.fds else []
            try:
                n = sock.sendmsg([out.data], anc, socket.MSG_NOSIGNAL)
            except (BlockingIOError, InterruptedError):
                if not self._writing:
                    self.loop.add_writer(sock.fileno(), self._flush)
                    self._writing = True
                return
            except OSError as exc:
                self._fail(QmpConnectionError(f"QMP socket {self.path}: "
                                              f"{exc.strerror or exc}"))
                return
            out.fds = []          # the descriptors went with the first byte
            del out.data[:n]
            if not out.data:
                self._out.popleft()
        if self._writing and self._sock is not None:
            self.loop.remove_writer(self._sock.fileno())
            self._writing = False

    # -- failures -----------------------------------------------------------------------------

    def _command_timed_out(self, cmd: _Command) -> None:
        cmd.timer = None
        if cmd.id is not None and self._sent.pop(cmd.id, None) is not None:
            self._abandoned[cmd.id] = cmd.name
        elif cmd in self._queued:
            self._queued.remove(cmd)
        else:
            return
        why = "" if self._state == "ready" else f" (the connection was still {self._state})"
        cmd.done(None, QmpTimeout(f"QMP {cmd.name}: no answer from {self.path} in time{why}"))

    def _fail(self, err: DeviceModelError) -> None:
        """The connection broke: close, then tell whoever waits."""
        if self._state == "closed":
            return
        connected = self._connected
        waiting = [*self._sent.values(), *self._queued]
        self.close()
        if connected is not None:
            connected(err)
        for cmd in waiting:
            cmd.done(None, err)
        if self.on_lost is not None:
            self.on_lost(err)

    def _later(self, cmd: _Command, err: DeviceModelError) -> None:
        """``cmd.done(None, err)`` from the loop, not from inside the caller's call."""
        def fire() -> None:
            self._soon.remove(timer)
            cmd.done(None, err)

        timer = self.loop.call_later(0, fire)
        self._soon.append(timer)
