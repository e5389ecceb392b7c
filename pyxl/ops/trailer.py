"""The libxl records after the libxc stream: one reader, three ways to feed it.

After the helper's libxc stream, a libxl stream goes on with the device model's
records (EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT) and ends with END -- or, in a
checkpointed (Remus) stream, with CHECKPOINT_END after each checkpoint.  libxl
reads them itself, on the same open file description the helper read from, so
the reader must never take a byte past the end record: a migration handshake
may follow on the same fd.

* :class:`TrailerParser` -- sans-I/O: it says how many bytes it needs next
  (:meth:`~TrailerParser.need`, exact) and is fed exactly those;
* :func:`read_trailer` -- blocking reads, for regular files (a save file);
* :class:`TrailerReader` -- non-blocking reads from the loop, for pipes and
  sockets (migration), as the records arrive.

May import: pyxl.errors, pyxl.fdio, pyxl.loop, pyxl.stream.
"""

from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

from pyxl.errors import StreamError, TruncatedStream
from pyxl.fdio import read_exact, set_nonblocking
from pyxl.loop import Loop
from pyxl.stream.framing import REC_HEADER, roundup8
from pyxl.stream.libxl import LIBXL_RECORD_MAX, WHERE_REC, record_name
from pyxl.stream.libxl import LibxlRecordType as RecordType

__all__ = ["EMULATOR_RECORDS", "TrailerParser", "TrailerReader", "read_trailer"]

#: The records a trailer may carry before its end record.
EMULATOR_RECORDS = (RecordType.EMULATOR_XENSTORE_DATA, RecordType.EMULATOR_CONTEXT)

Records = List[Tuple[int, bytes]]


class TrailerParser:
    """libxl records up to the record of type ``end``: bytes in, records out.

    Feed it exactly :meth:`need` bytes at a time.  :attr:`done` turns true at the
    end record; :attr:`records` holds (type, body) of the records before it.  A
    record other than the emulator's, or one longer than ``max_length``, raises
    :class:`~pyxl.StreamError`; so does every call after an error.
    """

    def __init__(self, end: int = RecordType.END, *, offset: int = 0,
                 max_length: int = LIBXL_RECORD_MAX) -> None:
        self.end = end
        self.offset = offset          # of the next unit, for errors
        self.max_length = max_length
        self.records: Records = []
        self.done = False
        self._rtype: Optional[int] = None
        self._length = 0
        self._want = REC_HEADER.size
        self._error: Optional[StreamError] = None

    def need(self) -> int:
        """Bytes the next :meth:`feed` must carry (0 once done)."""
        return 0 if self.done else self._want

    def feed(self, data: bytes) -> bool:
        """Take the next unit (exactly :meth:`need` bytes); True once the end record was read."""
        if self._error is not None:
            raise self._error
        if self.done or len(data) != self._want:
            raise ValueError(f"fed {len(data)} bytes where {self.need()} were needed")
        try:
            self._unit(data)
        except StreamError as exc:
            self._error = exc
            raise
        return self.done

    def eof(self, got: int = 0) -> TruncatedStream:
        """The error for a stream that ended ``got`` bytes into the unit it owed."""
        self._error = TruncatedStream(
            self.offset + got, "end of stream in the libxl records after the libxc stream "
            f"({got} of {self._want} bytes)", WHERE_REC)
        return self._error

    def _unit(self, data: bytes) -> None:
        at = self.offset
        self.offset += len(data)
        if self._rtype is None:
            rtype, length = REC_HEADER.unpack(data)
            if rtype == self.end:
                self.done = True
                return
            if rtype not in EMULATOR_RECORDS:
                raise StreamError(at, f"unexpected libxl record {record_name(rtype)} "
                                  "after the libxc stream", WHERE_REC)
            if length > self.max_length:
                raise StreamError(at, f"{record_name(rtype)} length {length:#x} exceeds "
                                  f"pyxl's limit {self.max_length:#x}", WHERE_REC)
            self._rtype, self._length = rtype, length
            self._want = roundup8(length)
            if self._want:
                return
        self.records.append((self._rtype, data[:self._length]))
        self._rtype = None
        self._want = REC_HEADER.size


def read_trailer(fd: int, end: int = RecordType.END) -> Records:
    """The emulator records from ``fd`` up to the ``end`` record (blocking reads)."""
    parser = TrailerParser(end)
    while not parser.done:
        try:
            unit = read_exact(fd, parser.need(), offset=parser.offset, what="libxl records",
                              where=WHERE_REC)
        except TruncatedStream as exc:
            raise parser.eof(exc.offset - parser.offset) from None
        parser.feed(unit)
    return parser.records


class TrailerReader:
    """:class:`TrailerParser` fed from a pipe or socket by the loop:
    ``done(records, None)`` or ``done([], error)``.

    The fd is non-blocking meanwhile (its flags are given back when it stops).
    """

    def __init__(self, loop: Loop, fd: int,
                 done: Callable[[Records, Optional[Exception]], None],
                 end: int = RecordType.END) -> None:
        self.loop, self.fd, self.done = loop, fd, done
        self.parser = TrailerParser(end)
        self.flags = set_nonblocking(fd, True)
        self.buf = bytearray()
        self.active = True
        loop.add_reader(fd, self._readable)

    def cancel(self) -> None:
        """Stop quietly (as a loop timer would be cancelled)."""
        self._detach()

    def _detach(self) -> bool:
        """Unwatch the fd and give back its flags; False if already done."""
        if not self.active:
            return False
        self.active = False
        self.loop.remove_reader(self.fd)
        try:
            set_nonblocking(self.fd, bool(self.flags & os.O_NONBLOCK))
        except OSError:
            pass
        return True

    def stop(self, records: Optional[Records] = None, err: Optional[Exception] = None) -> None:
        if self._detach():
            self.done(records or [], err)

    def _readable(self) -> None:
        while self.active:
            want = self.parser.need() - len(self.buf)
            try:
                chunk = os.read(self.fd, want)
            except BlockingIOError:
                return
            except OSError as exc:
                self.stop(err=exc)
                return
            if not chunk:
                self.stop(err=self.parser.eof(len(self.buf)))
                return
            self.buf += chunk
            if len(chunk) < want:
                continue
            unit, self.buf = bytes(self.buf), bytearray()
            try:
                finished = self.parser.feed(unit)
            except StreamError as exc:
                self.stop(err=exc)
                return
            if finished:
                self.stop(self.parser.records)
                return
