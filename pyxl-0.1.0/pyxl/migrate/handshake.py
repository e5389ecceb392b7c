"""xl's migration handshake as two sans-I/O state machines, one per role.

This module owns the handshake's bytes -- Xen's banner and messages, which
must stay byte-identical to xl's, and pyxl's one extension (a receiver that
fails says why) -- their size limits, and the parsing of the stream's head
that a receiver reads itself.  :class:`SenderHandshake` and
:class:`ReceiverHandshake` work in the h11 style: feed received bytes with
``receive_data(data)`` (``b""``: EOF), take ``next_event()`` until it returns
:data:`NEED_DATA`, and get the bytes of a message to write from
``send(event)``.  Bad peer bytes raise
:class:`~pyxl.errors.MigrationProtocolError` and poison the machine; asking
it to send what the protocol forbids raises
:class:`~pyxl.errors.LocalProtocolError`.  What a receiver says in words (why
it failed) is made safe here, as it is received: escaped, at most
:data:`REASON_MAX` characters.  It may import pyxl.errors, pyxl._text and
pyxl.stream's header codecs (bytes in, values out); never os, select,
socket, subprocess, the loop or the operations.
"""

# The exchange (receiver on the left; xl's strings, NULs included):
#
#   "xl migration receiver ready, send binary domain data.\n"   ->
#                              <-  xl header + libxl stream (a live save)
#   restore (paused)
#   "domain received, ready to unpause\0"                        ->
#                              <-  "domain is yours, you are cleared to unpause\0"
#   unpause
#   "my copy unpause results are as follows\0" + status byte     ->
#
# pyxl's extension: a receiver that fails sends "domain receive failed:
# REASON\0" instead of its next message (xl's receiver just exits; either
# reads as failure at either kind of sender).
#
# pyxl's compression offer (neither end can know the other is pyxl: xl's
# banner and xl's header are fixed, and xl reads exactly them): a sender that
# would compress sends its xl header alone, with the optional flag
# XL_OPTIONAL_PYXL_ZSTD (xl ignores optional flags), and waits a moment.  A
# pyxl receiver answers at once "pyxl compression: zstd\0" (or "none\0");
# the sender then sends the whole image as one zstd frame (xl header again
# included: the format of a compressed save file), or the plain rest of the
# stream.  An xl receiver says nothing: after OFFER_WAIT the sender sends the
# plain rest.  The receiver tells the two apart by the next four bytes (the
# zstd magic or libxl's "Libx"), so an answer that comes late is harmless.
#
# While a compressed stream flows, a pyxl receiver reports "pyxl restored
# N\0" now and then: N raw stream bytes its restore has taken.  Memory that
# compresses a hundredfold arrives faster than any restore takes it, and a
# second of it can sit in socket buffers; the sender waits for the receiver
# to catch up before it suspends the guest, so the downtime stays its own.

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn, Optional, Union

from pyxl._text import shown
from pyxl.errors import LocalProtocolError, MigrationProtocolError
from pyxl.stream import xl as stream_xl
from pyxl.stream.framing import REC_HEADER
from pyxl.stream.libxl import LIBXL_HEADER
from pyxl.stream.xl import XL_OPTIONAL_PYXL_ZSTD, ZSTD_MAGIC

LIBXL_MAGIC_START = b"Libx"    # a plain libxl stream's first bytes (its ident, "LibxlFmt")

__all__ = [
    "BANNER", "READY", "GO", "REPORT", "FAILED", "CHOSEN", "RESTORED", "COMPRESSIONS",
    "OFFER_WAIT", "ReceiverProgress",
    "MESSAGE_MAX", "REASON_MAX", "HEAD_MAX", "Banner", "StreamHead", "CompressionChosen", "StreamStart", "DomainReceived", "ReceiverFailed", "ClearedToUnpause",
    "UnpauseResult", "ConnectionClosed", "NEED_DATA", "Event",
    "SenderHandshake", "ReceiverHandshake",
]

BANNER = b"xl migration receiver ready, send binary domain data.\n"
READY = b"domain received, ready to unpause\0"
GO = b"domain is yours, you are cleared to unpause\0"
REPORT = b"my copy unpause results are as follows\0"
FAILED = b"domain receive failed: "       # pyxl: + reason + NUL, instead of READY
CHOSEN = b"pyxl compression: "           # pyxl: + name + NUL, the answer to an offer
RESTORED = b"pyxl restored "             # pyxl: + decimal bytes + NUL, a compressed stream's progress
COMPRESSIONS = ("zstd", "none")
OFFER_WAIT = 2.0            # s a sender waits for the answer to its offer (xl never answers)
MESSAGE_MAX = 4096          # longest handshake message (NUL included) we accept or send
REASON_MAX = 200            # characters of a receiver's reason a sender keeps (as reasons.py sends)
HEAD_MAX = 512 << 10        # xl optional data (the config) a receiver takes


# ---- events ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Banner:
    """Receiver -> sender: ready for the stream (:data:`BANNER`)."""


@dataclass(frozen=True)
class StreamHead:
    """Sender -> receiver: the stream's head -- xl header, its optional data,
    the libxl header and the first record's header -- which the receiver hands
    on to its restore.  ``header``: the parsed xl header with its config, None
    if the config does not parse (the restore says why).  ``rest``: bytes fed
    after the head, the start of the stream's remainder (empty if the caller
    read no more than :attr:`ReceiverHandshake.wanted`).  ``offered``: the
    sender offers compression: the head is its xl header alone; answer with
    :class:`CompressionChosen`, then :class:`StreamStart` follows."""

    data: bytes
    header: Optional[stream_xl.XlHeader]
    rest: bytes = b""
    offered: bool = False


@dataclass(frozen=True)
class CompressionChosen:
    """Receiver -> sender (pyxl only): the answer to an offer, one of
    :data:`COMPRESSIONS` (:data:`CHOSEN`)."""

    name: str


@dataclass(frozen=True)
class ReceiverProgress:
    """Receiver -> sender (pyxl only, a compressed stream): its restore has
    taken ``restored`` raw stream bytes (:data:`RESTORED`)."""

    restored: int


@dataclass(frozen=True)
class StreamStart:
    """Sender -> receiver, after an offer: the stream's first four bytes --
    ``compressed``: a zstd frame of the whole image follows (these bytes are
    its start), else the plain stream's rest (libxl's header starts here)."""

    data: bytes
    compressed: bool


@dataclass(frozen=True)
class DomainReceived:
    """Receiver -> sender: its copy is restored, paused (:data:`READY`)."""


@dataclass(frozen=True)
class ReceiverFailed:
    """Receiver -> sender (pyxl only): it failed and kept nothing (:data:`FAILED`)."""

    reason: str


@dataclass(frozen=True)
class ClearedToUnpause:
    """Sender -> receiver: the guest is the receiver's (:data:`GO`)."""


@dataclass(frozen=True)
class UnpauseResult:
    """Receiver -> sender: :data:`REPORT` + status (0: its copy runs)."""

    status: int


@dataclass(frozen=True)
class ConnectionClosed:
    """The peer closed the connection between two messages."""


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA = _NeedData()
"""``next_event()``: no complete event in what was received so far."""

Event = Union[Banner, StreamHead, DomainReceived, ReceiverFailed, ClearedToUnpause,
              UnpauseResult, ConnectionClosed, CompressionChosen, StreamStart, ReceiverProgress]


# ---- the machines ---------------------------------------------------------------------------


class _Handshake:
    """What both roles share: the receive buffer, EOF, poisoning."""

    ERROR = "error"          # a protocol error: no more events
    peer = "the peer"

    def __init__(self, state: str) -> None:
        self.state = state
        self._buf = bytearray()
        self._eof = False
        self._error: Optional[MigrationProtocolError] = None

    @property
    def trailing_data(self) -> bytes:
        """Received bytes no event has consumed yet."""
        return bytes(self._buf)

    @property
    def eof(self) -> bool:
        return self._eof

    def receive_data(self, data: bytes) -> None:
        """Bytes read from the peer; ``b""``: it closed the connection."""
        if self._eof:
            if data:
                raise LocalProtocolError("handshake: data fed after EOF")
            return
        if data:
            self._buf += data
        else:
            self._eof = True

    def next_event(self) -> Union[Event, _NeedData]:
        """The next event, or :data:`NEED_DATA`.  Raises
        :class:`MigrationProtocolError` for bytes that break the handshake,
        and again on every later call."""
        if self._error is not None:
            raise MigrationProtocolError(f"the handshake already failed: {self._error.brief}")
        try:
            event = self._parse()
            if event is NEED_DATA and self._eof:
                if self._buf and self._parsing():
                    self._bad(f"{self.peer} closed the connection in the middle of a message "
                              f"({len(self._buf)} bytes: {bytes(self._buf[:80])!r})")
                return ConnectionClosed()
            if event is NEED_DATA and len(self._buf) > self._limit():
                self._bad(f"{self.peer} sent {len(self._buf)} bytes without a complete message")
            return event
        except MigrationProtocolError as exc:
            self._error = exc
            self.state = self.ERROR
            raise

    def _bad(self, why: str) -> NoReturn:
        raise MigrationProtocolError(why)

    def _take(self, n: int) -> bytes:
        data = bytes(self._buf[:n])
        del self._buf[:n]
        return data

    def _expect(self, want: bytes, what: str) -> bool:
        """Does the buffer start with ``want``?  False: not enough bytes yet."""
        if len(self._buf) < len(want):
            if not want.startswith(bytes(self._buf)):
                self._bad(f"{what} {bytes(self._buf[:len(want)])[:80]!r}")
            return False
        if self._buf[:len(want)] != want:
            self._bad(f"{what} {bytes(self._buf[:len(want)])[:80]!r}")
        return True

    def _refuse(self, event: object) -> LocalProtocolError:
        return LocalProtocolError(f"handshake: cannot send {type(event).__name__} in "
                                  f"state {self.state!r}")

    # -- per role --

    def _parse(self) -> Union[Event, _NeedData]:
        raise NotImplementedError

    def _parsing(self) -> bool:
        """Is a message from the peer expected now (so buffered bytes are part of one)?"""
        raise NotImplementedError

    def _limit(self) -> int:
        return MESSAGE_MAX


class SenderHandshake(_Handshake):
    """The sender's side.  States, in order:

    ``AWAIT_BANNER`` -(:class:`Banner`)-> ``STREAMING`` -(``stream_sent()``)->
    ``AWAIT_READY`` -(:class:`DomainReceived`)-> ``MAY_CLEAR``
    -(``send(ClearedToUnpause())``)-> ``AWAIT_REPORT`` -(:class:`UnpauseResult`)->
    ``DONE``.  Instead of its banner, while streaming, awaiting READY, or
    before it is cleared to unpause, the receiver may say
    :class:`ReceiverFailed` (-> ``DONE``); anything else before it is cleared
    (an early status: the source must not go on its word) is a protocol
    error.  Bytes that came before ``send(ClearedToUnpause())`` are parsed
    in ``MAY_CLEAR``, so the caller takes every event before it clears.
    """

    AWAIT_BANNER = "await-banner"
    STREAMING = "streaming"
    AWAIT_READY = "await-ready"
    MAY_CLEAR = "may-clear"
    AWAIT_REPORT = "await-report"
    DONE = "done"
    peer = "the receiver"

    def __init__(self) -> None:
        super().__init__(self.AWAIT_BANNER)
        self.offered = False     # our xl header offered compression
        self.answered = False

    def offer_sent(self) -> None:
        """Our xl header offered compression: the receiver may answer it."""
        if self.state != self.STREAMING:
            raise LocalProtocolError(f"handshake: offer sent in state {self.state!r}")
        self.offered = True

    def stream_sent(self) -> None:
        """The whole stream (and its trailer) is written: READY may come now."""
        if self.state != self.STREAMING:
            raise LocalProtocolError(f"handshake: stream sent in state {self.state!r}")
        self.state = self.AWAIT_READY

    def send(self, event: Event) -> bytes:
        if isinstance(event, ClearedToUnpause) and self.state == self.MAY_CLEAR:
            self.state = self.AWAIT_REPORT
            return GO
        raise self._refuse(event)

    def _parsing(self) -> bool:
        return self.state in (self.AWAIT_BANNER, self.STREAMING, self.AWAIT_READY,
                              self.MAY_CLEAR, self.AWAIT_REPORT)

    def _parse(self) -> Union[Event, _NeedData]:
        if self.state == self.AWAIT_BANNER:
            # A pyxl receiver that refuses us (e.g. TLS allow-list) says why
            # instead of its banner.
            if self._buf[:1] == FAILED[:1] and FAILED.startswith(bytes(self._buf[:len(FAILED)])):
                if len(self._buf) < len(FAILED):
                    return NEED_DATA
                return self._parse_message()
            if not self._expect(BANNER, "not a migration receiver: it said"):
                return NEED_DATA
            self._take(len(BANNER))
            self.state = self.STREAMING
            return Banner()
        if self.state in (self.STREAMING, self.AWAIT_READY):
            return self._parse_message()
        if self.state == self.MAY_CLEAR:
            # Only pyxl's "failed" (a receiver that gave up waiting to be
            # cleared); a status now would come before it could be true.
            if not self._buf:
                return NEED_DATA
            if not FAILED.startswith(bytes(self._buf[:len(FAILED)])):
                self._bad("the receiver spoke before it was cleared to unpause: "
                          f"{bytes(self._buf[:80])!r}")
            return self._parse_message() if len(self._buf) >= len(FAILED) else NEED_DATA
        if self.state == self.AWAIT_REPORT:
            if len(self._buf) < len(REPORT) + 1:
                if not REPORT.startswith(bytes(self._buf[:len(REPORT)])):
                    self._bad(f"unexpected reply {bytes(self._buf)[:80]!r}")
                return NEED_DATA
            if self._buf[:len(REPORT)] != REPORT:
                self._bad(f"unexpected reply {bytes(self._buf[:len(REPORT)])!r}")
            status = self._take(len(REPORT) + 1)[-1]
            self.state = self.DONE
            return UnpauseResult(status)
        return NEED_DATA   # DONE: the receiver has nothing to say

    def _parse_message(self) -> Union[Event, _NeedData]:
        """READY or FAILED (or pyxl's CHOSEN, RESTORED): NUL-terminated."""
        nul = self._buf.find(b"\0", 0, MESSAGE_MAX)
        if nul < 0:
            if len(self._buf) >= MESSAGE_MAX:
                self._bad(f"the receiver sent garbage (no message end in {MESSAGE_MAX} "
                          "bytes)")
            return NEED_DATA
        if self.state == self.STREAMING and bytes(self._buf[:nul + 1]) == READY:
            # A compressed stream's end (END) can reach the receiver before our
            # relay has seen its pipe's EOF: READY waits until stream_sent().
            return NEED_DATA
        msg = self._take(nul + 1)
        if msg.startswith(FAILED):
            self.state = self.DONE
            # Words for logs and terminals: escaped and cut here, once.
            reason = msg[len(FAILED):-1].decode("utf-8", "replace")
            return ReceiverFailed(shown(reason, REASON_MAX) or "(no reason given)")
        if msg.startswith(RESTORED) and self.answered and self.state in (self.STREAMING,
                                                                          self.AWAIT_READY):
            digits = msg[len(RESTORED):-1]
            if not digits.isdigit() or len(digits) > 20:
                self._bad(f"bad progress from the receiver: {msg[:80]!r}")
            return ReceiverProgress(int(digits))
        if msg.startswith(CHOSEN) and self.offered and not self.answered:
            name = msg[len(CHOSEN):-1].decode("ascii", "replace")
            if name not in COMPRESSIONS:
                self._bad(f"the receiver chose an unknown compression {name[:40]!r}")
            self.answered = True
            return CompressionChosen(name)
        if msg != READY or self.state != self.AWAIT_READY:   # MAY_CLEAR: FAILED only
            self._bad(f"unexpected message from the receiver: {msg[:80]!r}")
        self.state = self.MAY_CLEAR
        return DomainReceived()


class ReceiverHandshake(_Handshake):
    """The receiver's side.  States, in order:

    ``SEND_BANNER`` -(``send(Banner())``)-> ``AWAIT_HEAD`` -(:class:`StreamHead`)->
    ``STREAMING`` (the rest of the stream is not the handshake's: the caller
    relays it) -(``send(DomainReceived())``)-> ``AWAIT_GO``
    -(:class:`ClearedToUnpause`)-> ``MAY_REPORT`` -(``send(UnpauseResult(s))``)->
    ``DONE``.  A head that offers compression goes ``AWAIT_HEAD``
    -(:class:`StreamHead`, ``offered``)-> ``CHOOSING`` -(``send(CompressionChosen(n))``)->
    ``AWAIT_START`` -(:class:`StreamStart`)-> ``STREAMING``.
    ``send(ReceiverFailed(reason))`` is allowed once, in any state,
    even after a protocol error (-> ``FAILED``: nothing more is parsed, received
    bytes are dropped).

    In ``AWAIT_HEAD`` read at most :attr:`wanted` bytes at a time, so that the
    stream's remainder stays in the connection for the relay.
    """

    SEND_BANNER = "send-banner"
    AWAIT_HEAD = "await-head"
    CHOOSING = "choosing"          # an offer came: send(CompressionChosen(...))
    AWAIT_START = "await-start"    # then the stream's first four bytes
    STREAMING = "streaming"
    AWAIT_GO = "await-go"
    MAY_REPORT = "may-report"
    DONE = "done"
    FAILED = "failed"
    peer = "the sender"

    def __init__(self, head_max: int = HEAD_MAX) -> None:
        super().__init__(self.SEND_BANNER)
        self.head_max = head_max
        self.compressed = False     # the stream is a zstd frame (progress may be sent)
        self._head_len = stream_xl.XL_HEADER.size   # grows once the xl header is parsed

    @property
    def wanted(self) -> int:
        """How many more bytes the stream's head needs (0 outside ``AWAIT_HEAD``)."""
        if self.state in (self.SEND_BANNER, self.AWAIT_HEAD):
            return max(self._head_len - len(self._buf), 0)
        if self.state == self.AWAIT_START:
            return max(len(ZSTD_MAGIC) - len(self._buf), 0)
        return 0

    def send(self, event: Event) -> bytes:
        if isinstance(event, ReceiverFailed) and self.state != self.FAILED:
            self.state = self.FAILED
            self._buf.clear()
            limit = MESSAGE_MAX - len(FAILED) - 1
            reason = event.reason.replace("\0", " ").encode("utf-8", "replace")[:limit]
            return FAILED + reason.decode("utf-8", "ignore").encode("utf-8") + b"\0"
        if isinstance(event, Banner) and self.state == self.SEND_BANNER:
            self.state = self.AWAIT_HEAD
            return BANNER
        if isinstance(event, CompressionChosen) and self.state == self.CHOOSING:
            if event.name not in COMPRESSIONS:
                raise LocalProtocolError(f"handshake: unknown compression {event.name!r}")
            self.state = self.AWAIT_START
            return CHOSEN + event.name.encode("ascii") + b"\0"
        if (isinstance(event, ReceiverProgress) and self.state == self.STREAMING
                and self.compressed):
            return RESTORED + b"%d\0" % max(0, event.restored)
        if isinstance(event, DomainReceived) and self.state == self.STREAMING:
            self.state = self.AWAIT_GO
            return READY
        if isinstance(event, UnpauseResult) and self.state == self.MAY_REPORT:
            if not 0 <= event.status <= 255:
                raise LocalProtocolError(f"handshake: status {event.status} is not a byte")
            self.state = self.DONE
            return REPORT + bytes([event.status])
        raise self._refuse(event)

    def receive_data(self, data: bytes) -> None:
        if data and self.state == self.FAILED:
            return   # nothing the sender says matters any more
        super().receive_data(data)

    def _parsing(self) -> bool:
        return self.state in (self.AWAIT_HEAD, self.AWAIT_START, self.AWAIT_GO)

    def _limit(self) -> int:
        return self._head_len if self.state == self.AWAIT_HEAD else MESSAGE_MAX

    def _parse(self) -> Union[Event, _NeedData]:
        if self.state == self.AWAIT_HEAD:
            return self._parse_head()
        if self.state == self.AWAIT_START:
            if len(self._buf) < len(ZSTD_MAGIC):
                return NEED_DATA
            start = self._take(len(ZSTD_MAGIC))
            if start != ZSTD_MAGIC and start != LIBXL_MAGIC_START:
                self._bad(f"after the compression answer the sender sent {start!r}: neither a "
                          "zstd frame nor a libxl stream")
            self.state = self.STREAMING
            self.compressed = start == ZSTD_MAGIC
            return StreamStart(start, self.compressed)
        if self.state == self.AWAIT_GO:
            if not self._expect(GO, "unexpected message from the sender:"):
                return NEED_DATA
            self._take(len(GO))
            self.state = self.MAY_REPORT
            return ClearedToUnpause()
        return NEED_DATA

    def _parse_head(self) -> Union[Event, _NeedData]:
        xl_size = stream_xl.XL_HEADER.size
        if len(self._buf) < xl_size:
            return NEED_DATA
        try:
            fixed = stream_xl.parse_xl_header(bytes(self._buf[:xl_size]),
                                              max_optional_data=self.head_max)
        except ValueError as exc:
            self._bad(f"not a migration stream: {exc}")
        offered = bool(fixed.optional_flags & XL_OPTIONAL_PYXL_ZSTD)
        # An offer: the xl header alone (what follows waits for our answer).
        self._head_len = xl_size + fixed.optional_data_len + (
            0 if offered else LIBXL_HEADER.size + REC_HEADER.size)
        if len(self._buf) < self._head_len:
            return NEED_DATA
        head = self._take(self._head_len)
        rest = self._take(len(self._buf))
        try:
            header: Optional[stream_xl.XlHeader] = stream_xl.parse_xl_optional_data(
                fixed, head[xl_size:xl_size + fixed.optional_data_len])
        except (ValueError, RecursionError):   # deep JSON nesting: RecursionError
            header = None   # the restore reports it
        self.state = self.CHOOSING if offered else self.STREAMING
        return StreamHead(head, header, rest, offered)
