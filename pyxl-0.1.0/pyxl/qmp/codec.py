"""Sans-I/O codec for the client side of QMP, the QEMU Machine Protocol.

Bytes in, events out, in the spirit of h11: no sockets, selectors or processes
here (:mod:`pyxl.qmp.client` does the I/O on a loop).

QMP is JSON objects, one per line (QEMU ends each with ``\\r\\n``), on a UNIX
socket.  The server speaks first, with a greeting::

    {"QMP": {"version": {...}, "capabilities": [...]}}

the client leaves capabilities-negotiation mode with ``qmp_capabilities`` and may
then execute commands, each with an ``id`` the answer echoes::

    -> {"execute": "stop", "id": 2}
    <- {"return": {}, "id": 2}
    <- {"error": {"class": "GenericError", "desc": "..."}, "id": 3}
    <- {"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}

:class:`QmpConnection` enforces the order (the greeting first and once;
``qmp_capabilities`` answered before any other command is sent), bounds its
buffer (a line longer than ``max_line``, default 1 MiB, is an error), and
rejects what is not QMP: bytes that are not UTF-8 JSON, a JSON value that is not
an object, an object that is none of greeting/return/error/event, an answer to
an ``id`` it never sent (or already answered), EOF in the middle of a line.
Such a failure raises :class:`QmpRemoteProtocolError` and poisons the connection:
every later call raises again.  Asking it for something QMP forbids raises
:class:`QmpLocalProtocolError`.

All the QMP errors live here, under :class:`pyxl.errors.DeviceModelError`, so the
client and the backends share them.  What the device model says in words (an
error's class and desc, an event's name) is escaped and bounded as it is
parsed (:func:`pyxl._text.shown`).  May import: pyxl.errors, pyxl._text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Dict, Mapping, NoReturn, Optional, Tuple, Union

from pyxl._text import shown as _shown
from pyxl.errors import DeviceModelError

__all__ = [
    "Closed", "Error", "Event", "Greeting", "MAX_LINE", "NEED_DATA", "QmpCommandError",
    "QmpConnection", "QmpConnectionError", "QmpEvent", "QmpLocalProtocolError",
    "QmpProtocolError", "QmpRemoteProtocolError", "QmpTimeout", "Return",
]

#: Longest line accepted from the server (QEMU's answers here are a few hundred bytes).
MAX_LINE = 1 << 20


# ---- errors ---------------------------------------------------------------------------------


class QmpProtocolError(DeviceModelError):
    """Bytes or a request that break QMP's rules."""


class QmpRemoteProtocolError(QmpProtocolError):
    """The device model sent something that is not QMP (or not in QMP's order)."""


class QmpLocalProtocolError(QmpProtocolError):
    """The caller asked the codec for something QMP forbids (a bug in the caller)."""


class QmpCommandError(DeviceModelError):
    """The device model answered a command with a QMP error (``class``, ``desc``)."""

    def __init__(self, command: str, cls: str, desc: str) -> None:
        super().__init__(f"QMP {command} failed: {cls}: {desc}")
        self.command = command
        self.cls = cls
        self.desc = desc


class QmpConnectionError(DeviceModelError):
    """The QMP socket could not be connected to, or the connection broke."""


class QmpTimeout(DeviceModelError):
    """The device model did not answer (connect, greeting or a command) in time."""


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Greeting:
    """The server's first message: its version and the capabilities it offers."""

    version: Mapping[str, Any]
    capabilities: Tuple[str, ...]


@dataclass(frozen=True)
class Return:
    """A command succeeded; ``value`` is its ``return`` member."""

    id: int
    value: Any
    command: str = ""


@dataclass(frozen=True)
class Error:
    """A command failed; ``cls`` and ``desc`` are QMP's error class and description."""

    id: int
    cls: str
    desc: str
    command: str = ""


@dataclass(frozen=True)
class Event:
    """An asynchronous event (``STOP``, ``RESUME``, ...); ``timestamp`` in seconds."""

    name: str
    data: Mapping[str, Any] = field(default_factory=dict)
    timestamp: Optional[float] = None


@dataclass(frozen=True)
class Closed:
    """The server closed the connection between two messages."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event()``: no complete message in what was received so far."""

QmpEvent = Union[Greeting, Return, Error, Event, Closed]


def _no_constants(name: str) -> NoReturn:
    raise ValueError(f"{name} is not JSON")


# ---- the connection -------------------------------------------------------------------------


class QmpConnection:
    """One client's view of one QMP connection.

    ``state``: ``"greeting"`` (nothing received yet), ``"negotiating"`` (greeting
    received; only ``qmp_capabilities`` may be sent), ``"ready"`` (commands may be
    sent), ``"closed"`` (EOF seen) or ``"error"`` (poisoned).
    """

    GREETING, NEGOTIATING, READY, CLOSED, ERROR = (
        "greeting", "negotiating", "ready", "closed", "error")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        if max_line < 64:
            raise ValueError(f"max_line must be at least 64 bytes, not {max_line}")
        self.max_line = max_line
        self.state = self.GREETING
        self.greeting: Optional[Greeting] = None
        #: id -> command name of every command sent and not yet answered.
        self.pending: Dict[int, str] = {}
        self._next_id = 1
        self._buf = bytearray()
        self._eof = False
        self._error: Optional[QmpRemoteProtocolError] = None
        self._negotiation_id: Optional[int] = None

    @property
    def trailing_data(self) -> bytes:
        """Received bytes no event has consumed yet."""
        return bytes(self._buf)

    # -- sending ----------------------------------------------------------------------------

    def send_command(self, name: str, arguments: Optional[Mapping[str, Any]] = None
                     ) -> Tuple[int, bytes]:
        """Encode a command: ``(id, bytes to write)``.  The id is the one its
        :class:`Return` or :class:`Error` will carry."""
        self._check_poisoned()
        if not isinstance(name, str) or not name:
            raise QmpLocalProtocolError(f"a QMP command name is a non-empty string, not {name!r}")
        if arguments is not None and not isinstance(arguments, Mapping):
            raise QmpLocalProtocolError(f"QMP arguments are an object, not {type(arguments).__name__}")
        if self.state == self.GREETING:
            raise QmpLocalProtocolError(f"cannot send {name}: no greeting received yet")
        if self.state == self.CLOSED:
            raise QmpLocalProtocolError(f"cannot send {name}: the connection is closed")
        if self.state == self.NEGOTIATING:
            if name != "qmp_capabilities":
                raise QmpLocalProtocolError(
                    f"cannot send {name} before qmp_capabilities has been answered")
            if self._negotiation_id is not None:
                raise QmpLocalProtocolError("qmp_capabilities was sent already")
        elif name == "qmp_capabilities":
            raise QmpLocalProtocolError("capabilities were negotiated already")
        msg: Dict[str, Any] = {"execute": name}
        if arguments is not None:
            msg["arguments"] = dict(arguments)
        cid = self._next_id
        msg["id"] = cid
        try:
            data = json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\r\n"
        except (TypeError, ValueError) as exc:
            raise QmpLocalProtocolError(f"cannot encode {name}'s arguments: {exc}") from None
        self._next_id += 1
        self.pending[cid] = name
        if name == "qmp_capabilities":
            self._negotiation_id = cid
        return cid, data

    # -- receiving --------------------------------------------------------------------------

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the server; ``b""``: it closed the connection."""
        self._check_poisoned()
        if self._eof:
            if data:
                raise QmpLocalProtocolError("QMP: data fed after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Union[QmpEvent, _NeedData]:
        """The next event, or :data:`NEED_DATA`.  Raises :class:`QmpRemoteProtocolError`
        for what is not QMP, and again on every later call."""
        self._check_poisoned()
        try:
            return self._next()
        except QmpRemoteProtocolError as exc:
            self._error = exc
            self.state = self.ERROR
            raise

    def _check_poisoned(self) -> None:
        if self._error is not None:
            raise QmpRemoteProtocolError(f"the QMP connection already failed: {self._error}")

    def _bad(self, why: str) -> NoReturn:
        raise QmpRemoteProtocolError(why)

    def _next(self) -> Union[QmpEvent, _NeedData]:
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                if len(self._buf) > self.max_line:
                    self._bad(f"a line of more than {self.max_line} bytes "
                              f"({len(self._buf)} without a newline)")
                if self._eof:
                    if self._buf.strip():
                        self._bad(f"the connection closed in the middle of a message "
                                  f"({len(self._buf)} bytes: {bytes(self._buf[:80])!r})")
                    self._buf.clear()
                    self.state = self.CLOSED
                    return Closed()
                return NEED_DATA
            if nl > self.max_line:
                self._bad(f"a line of {nl} bytes (the limit is {self.max_line})")
            line = bytes(self._buf[:nl]).rstrip(b"\r")
            del self._buf[:nl + 1]
            if line.strip():
                return self._message(line)

    def _message(self, line: bytes) -> QmpEvent:
        shown = line[:80]
        try:
            msg = json.loads(line.decode("utf-8"), parse_constant=_no_constants)
        except (UnicodeDecodeError, ValueError, RecursionError):
            self._bad(f"not JSON: {shown!r}")
        if not isinstance(msg, dict):
            self._bad(f"a JSON {type(msg).__name__}, not an object: {shown!r}")
        keys = {"QMP", "return", "error", "event"} & set(msg)
        if len(keys) != 1:
            self._bad(f"neither greeting, return, error nor event: {shown!r}")
        (kind,) = keys
        if self.state == self.GREETING:
            if kind != "QMP":
                self._bad(f"{kind} before the greeting: {shown!r}")
            return self._greeting(msg["QMP"], shown)
        if kind == "QMP":
            self._bad(f"a second greeting: {shown!r}")
        if kind == "event":
            return self._event(msg, shown)
        err = msg.get("error")
        if kind == "error":
            if not (isinstance(err, dict) and isinstance(err.get("class"), str)
                    and isinstance(err.get("desc"), str)):
                self._bad(f"an error without class and desc: {shown!r}")
            # Words from the device model (the guest's first target) reach
            # logs and terminals: escaped and bounded here, as they arrive.
            err = {"class": _shown(err["class"], 64), "desc": _shown(err["desc"], 500)}
            if "id" not in msg:
                self._bad(f"an error for no command (id missing): {err['class']}: {err['desc']}")
        cid, command = self._answered(msg.get("id"), shown)
        if cid == self._negotiation_id:
            self._negotiation_id = None
            if kind == "return":
                self.state = self.READY
        if kind == "return":
            return Return(cid, msg["return"], command)
        assert isinstance(err, dict)
        return Error(cid, err["class"], err["desc"], command)

    def _greeting(self, body: Any, shown: bytes) -> Greeting:
        if not isinstance(body, dict) or not isinstance(body.get("version"), dict):
            self._bad(f"a greeting without a version: {shown!r}")
        caps = body.get("capabilities", [])
        if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
            self._bad(f"a greeting whose capabilities are not a list of names: {shown!r}")
        self.greeting = Greeting(body["version"], tuple(caps))
        self.state = self.NEGOTIATING
        return self.greeting

    def _event(self, msg: Dict[str, Any], shown: bytes) -> Event:
        name, data, ts = msg["event"], msg.get("data", {}), msg.get("timestamp")
        if not isinstance(name, str) or not name:
            self._bad(f"an event without a name: {shown!r}")
        name = _shown(name, 64)
        if not isinstance(data, dict):
            self._bad(f"an event whose data is not an object: {shown!r}")
        when: Optional[float] = None
        if isinstance(ts, dict):
            sec, usec = ts.get("seconds"), ts.get("microseconds")
            # (-1, -1): QEMU's "no time"; a 400-digit one would not even make a float
            if type(sec) is int and type(usec) is int and abs(sec) < 1 << 63 \
                    and abs(usec) < 1_000_000:
                when = sec + usec / 1e6
        return Event(name, data, when)

    def _answered(self, cid: Any, shown: bytes) -> Tuple[int, str]:
        if type(cid) is not int:
            self._bad(f"an answer with id {cid!r}, not one this client sent: {shown!r}")
        command = self.pending.pop(cid, None)
        if command is None:
            self._bad(f"an answer to id {cid}, which no command is waiting for: {shown!r}")
        return cid, command
