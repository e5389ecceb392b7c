"""Sans-I/O codec for the Xen 4.17 save/restore helper protocol.

Bytes in, message objects out -- no sockets, selectors or processes here (the
event loop in :mod:`pyxl.ops.operation` does the I/O), in the spirit of h11.

Helper -> host (the helper's fd 1) is a stream of frames::

    u16 body_len | u16 msgnum | packed little-endian arguments

with strings encoded as ``u32 size`` (including the terminating NUL), the
bytes, and the NUL.  Host -> helper (its fd 0) carries only replies: one bare
little-endian ``int32`` per message that waits for one, in order.

We are strict where libxl is lax (libxl silently drops a malformed frame, which
leaves both sides hanging if that frame was a callback): an unknown message
number, a short or over-long argument list, a string of size 0 or without its
NUL, a message the helper's mode never sends, a second callback before the
first was answered, anything after ``complete``, or a frame cut short at EOF
all raise :class:`ProtocolError` naming the message and the byte offset.
"""

from __future__ import annotations

import struct
from typing import Any, Dict, List, Optional, Tuple, Type

from pyxl.errors import LocalProtocolError, ProtocolError, RemoteProtocolError
from pyxl.wire._generated import (
    BY_NAME,
    BY_NUMBER,
    Checkpoint,
    Complete,
    Log,
    Message,
    Postcopy,
    PrecopyRound,
    Progress,
    RestoreResults,
    StaticDataDone,
    Suspend,
    SwitchQemuLogdirty,
    WaitCheckpoint,
)

__all__ = [
    "BY_NAME", "BY_NUMBER", "Checkpoint", "Complete", "Conversation", "Decoder", "EXTENSIONS",
    "LOG_LEVELS", "Log", "Message", "Postcopy", "PrecopyRound", "Progress", "ProtocolError",
    "RestoreResults", "StaticDataDone", "Suspend", "SwitchQemuLogdirty",
    "WaitCheckpoint", "cbflags_for", "encode", "encode_reply",
]

#: xentoollog levels as sent in ``log.level``.
LOG_LEVELS = {1: "DEBUG", 2: "VERBOSE", 3: "DETAIL", 4: "PROGRESS", 5: "INFO",
              6: "NOTICE", 7: "WARN", 8: "ERROR", 9: "CRITICAL"}

_FIXED: Dict[str, struct.Struct] = {
    "uint16": struct.Struct("<H"), "uint32": struct.Struct("<I"),
    "int32": struct.Struct("<i"), "uint64": struct.Struct("<Q"),
}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_REPLY = struct.Struct("<i")
MAX_BODY = 0xFFFF




def _message_class(number: int, offset: int, mode: Optional[str]) -> Type[Message]:
    cls = BY_NUMBER.get(number)
    if cls is None:
        raise RemoteProtocolError(f"unknown message number {number}", offset)
    if mode is not None and mode not in cls.SENDERS:
        raise RemoteProtocolError(f"not sent by a {mode} helper", offset, cls.NAME)
    return cls


def _body_bounds(cls: Type[Message]) -> Tuple[int, Optional[int]]:
    """The shortest body ``cls`` can have, and the longest (None: strings)."""
    size, strings = 2, False
    for _arg, wtype in cls.ARGS:
        fixed = _FIXED.get(wtype)
        if fixed is None:
            size, strings = size + 5, True     # u32 size and at least the NUL
        else:
            size += fixed.size
    return size, None if strings else size


def _check_head(length: int, number: int, offset: int, mode: Optional[str]) -> None:
    """What a frame's first four bytes already rule out."""
    cls = _message_class(number, offset, mode)
    least, most = _body_bounds(cls)
    if length < least or (most is not None and length > most):
        raise RemoteProtocolError(f"body length {length} impossible for this message", offset,
                                  cls.NAME)


def _decode_body(body: bytes, offset: int, mode: Optional[str]) -> Message:
    if len(body) < 2:
        raise RemoteProtocolError(f"body of {len(body)} bytes has no message number", offset)
    (number,) = _U16.unpack_from(body, 0)
    cls = _message_class(number, offset, mode)
    name = cls.NAME
    pos = 2
    values: List[Any] = []
    for arg, wtype in cls.ARGS:
        fixed = _FIXED.get(wtype)
        if fixed is not None:
            if pos + fixed.size > len(body):
                raise RemoteProtocolError(f"argument {arg!r} cut short", offset, name)
            values.append(fixed.unpack_from(body, pos)[0])
            pos += fixed.size
            continue
        # string: u32 size including NUL, then the bytes
        if pos + 4 > len(body):
            raise RemoteProtocolError(f"argument {arg!r} length cut short", offset, name)
        (size,) = _U32.unpack_from(body, pos)
        pos += 4
        if size == 0:
            raise RemoteProtocolError(f"string {arg!r} has size 0 (no NUL)", offset, name)
        if pos + size > len(body):
            raise RemoteProtocolError(f"string {arg!r} of size {size} overruns the body", offset, name)
        raw = body[pos:pos + size]
        if raw[-1] != 0:
            raise RemoteProtocolError(f"string {arg!r} does not end in NUL", offset, name)
        # surrogateescape: libxc's texts are not guaranteed UTF-8, and encode()
        # must give back the exact bytes.
        values.append(raw[:-1].decode("utf-8", "surrogateescape"))
        pos += size
    if pos != len(body):
        raise RemoteProtocolError(f"{len(body) - pos} trailing bytes after the arguments", offset, name)
    return cls(*values)


class Decoder:
    """Incremental frame decoder.  ``feed`` any split of the byte stream.

    Memory is bounded by construction: at most one partial frame (< 64 KiB +
    header) is ever buffered.  After a :class:`ProtocolError` the decoder is
    poisoned and every later call raises the same error.
    """

    def __init__(self, mode: Optional[str] = None) -> None:
        if mode not in (None, "save", "restore"):
            raise ValueError(f"mode must be 'save', 'restore' or None, not {mode!r}")
        self.mode = mode
        self._buf = bytearray()
        self._offset = 0  # stream offset of _buf[0]
        self._error: Optional[ProtocolError] = None
        #: stream offsets of the frames the last :meth:`feed` returned
        self.last_offsets: List[int] = []

    @property
    def offset(self) -> int:
        """Bytes of the stream consumed so far (complete frames only)."""
        return self._offset

    @property
    def pending(self) -> int:
        """Bytes buffered of a frame not yet complete."""
        return len(self._buf)

    def feed(self, data: bytes) -> List[Message]:
        if self._error is not None:
            raise self._error
        self._buf += data
        out: List[Message] = []
        offsets: List[int] = []
        self.last_offsets = offsets
        buf = self._buf
        pos = 0
        try:
            while len(buf) - pos >= 2:
                (length,) = _U16.unpack_from(buf, pos)
                if length >= 2 and len(buf) - pos >= 4:     # (shorter: no number of its own)
                    # The head is judged before the body is awaited: text on
                    # the helper's stdout reads as a ~26 KB length, and must
                    # fail now, not after 26 KB that may never come.
                    _check_head(length, _U16.unpack_from(buf, pos + 2)[0],
                                self._offset + pos, self.mode)
                if len(buf) - pos - 2 < length:
                    break
                out.append(_decode_body(bytes(buf[pos + 2:pos + 2 + length]),
                                        self._offset + pos, self.mode))
                offsets.append(self._offset + pos)
                pos += 2 + length
        except ProtocolError as exc:
            exc.before = out
            self._error = exc
            raise
        finally:
            del buf[:pos]
            self._offset += pos
        return out

    def eof(self) -> None:
        """The helper closed its stdout.  A partial frame is an error."""
        if self._error is not None:
            raise self._error
        if self._buf:
            need = "header" if len(self._buf) < 2 else "body"
            self._error = ProtocolError(
                f"stream ended inside a frame {need} ({len(self._buf)} bytes buffered)", self._offset)
            raise self._error


def _encode_args(msg: Message) -> bytes:
    parts = [_U16.pack(msg.NUMBER)]
    for arg, wtype in msg.ARGS:
        value = getattr(msg, arg)
        fixed = _FIXED.get(wtype)
        if fixed is not None:
            parts.append(fixed.pack(value))
        else:
            raw = value.encode("utf-8", "surrogateescape") + b"\0"
            parts.append(_U32.pack(len(raw)))
            parts.append(raw)
    return b"".join(parts)


def encode(msg: Message) -> bytes:
    """Frame a message as the helper would send it (used by tests and fakes)."""
    body = _encode_args(msg)
    if len(body) > MAX_BODY:
        raise LocalProtocolError(f"{msg.NAME} body of {len(body)} bytes exceeds the 64 KiB frame limit")
    return _U16.pack(len(body)) + body


def encode_reply(value: int) -> bytes:
    """A reply on the helper's fd 0: one little-endian int32."""
    return _REPLY.pack(value)


#: Messages of pyxl's own extension of the protocol (table rows after Xen's):
#: only pyxl's helper sends them, and only when the host asked for them (the
#: helper's environment); a :class:`Conversation` refuses them otherwise.
EXTENSIONS = frozenset({"precopy_round"})


def cbflags_for(names: "Tuple[str, ...] | List[str]") -> int:
    """CBFLAGS for the given callback names, e.g. ('suspend', 'switch_qemu_logdirty') -> 136."""
    flags = 0
    for name in names:
        cls: Optional[Type[Message]] = BY_NAME.get(name)
        if cls is None or not cls.CBFLAG:
            raise ValueError(f"{name!r} is not a callback with a CBFLAGS bit")
        flags |= cls.CBFLAG
    return flags


class Conversation:
    """The helper conversation's state on top of :class:`Decoder`.

    Tracks what libxl's side must hold true: exactly one reply per message that
    waits, in order, with no new message before the reply (the helper blocks),
    and nothing after ``complete``.  ``receive`` returns messages; ``reply``
    returns the bytes to write to the helper's fd 0.
    """

    def __init__(self, mode: str, cbflags: Optional[int] = None,
                 extensions: "frozenset[str]" = frozenset()) -> None:
        self.decoder = Decoder(mode)
        self.mode = mode
        self.cbflags = cbflags
        self.extensions = extensions   # the EXTENSIONS negotiated for this helper run
        self.awaiting: Optional[Message] = None  # callback waiting for our reply
        self.completed: Optional[Complete] = None
        self.results: Optional[RestoreResults] = None

    def receive(self, data: bytes) -> List[Message]:
        try:
            msgs = self.decoder.feed(data) if data else []
            if not data:
                self.decoder.eof()
        except ProtocolError as exc:
            # A rule broken earlier in the batch is the first fault to report.
            exc.before = self._checked(exc.before)
            raise
        return self._checked(msgs)

    def _checked(self, msgs: List[Message]) -> List[Message]:
        good: List[Message] = []
        try:
            for msg, offset in zip(msgs, self.decoder.last_offsets):
                self._check(msg, offset)
                good.append(msg)
        except ProtocolError as exc:
            exc.before = good
            raise
        return good

    def _check(self, msg: Message, offset: int) -> None:
        if self.completed is not None:
            self._fail(f"{msg.NAME} after complete", offset, msg.NAME)
        if self.awaiting is not None:
            self._fail(f"{msg.NAME} while {self.awaiting.NAME} still awaits its reply",
                       offset, msg.NAME)
        if (self.cbflags is not None and msg.CBFLAG and msg.WAITS_FOR_REPLY
                and not self.cbflags & msg.CBFLAG):
            self._fail("callback not enabled in CBFLAGS", offset, msg.NAME)
        if msg.NAME in EXTENSIONS and msg.NAME not in self.extensions:
            self._fail("pyxl's protocol extension was not negotiated", offset, msg.NAME)
        if isinstance(msg, RestoreResults):
            self.results = msg
        if isinstance(msg, Complete):
            self.completed = msg
        if msg.WAITS_FOR_REPLY:
            self.awaiting = msg

    def _fail(self, reason: str, offset: int, name: str) -> None:
        err = ProtocolError(reason, offset, name)
        self.decoder._error = err
        raise err

    def reply(self, value: int) -> bytes:
        if self.awaiting is None:
            raise LocalProtocolError("no helper callback is waiting for a reply")
        self.awaiting = None
        return encode_reply(value)
