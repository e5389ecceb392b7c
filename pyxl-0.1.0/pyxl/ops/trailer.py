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
  sockets (migration), as the records arrive (:class:`LoopReader` drives any
  parser of that shape: the restore's stream head too).

**Bounds.**  These records come from the stream, so from whoever wrote it, and
they are held in memory until the device model takes them.  libxl has no cap
(6 records of 64 MiB took a receiver from 25 to 450 MB); pyxl has three, per
trailer (per checkpoint in a Remus stream), checked on each record's header
before its body is read, so a stream past a bound costs nothing to refuse
(:class:`TrailerLimits`):

* at most :data:`MAX_RECORDS` records (libxl writes at most two: one
  EMULATOR_XENSTORE_DATA, one EMULATOR_CONTEXT);
* EMULATOR_XENSTORE_DATA bytes up to :data:`MAX_XENSTORE_DATA` (real ones,
  the physmap keys, are under 1 KiB);
* EMULATOR_CONTEXT bytes up to the backend's ``max_emulator_context``
  attribute if it has one, else :data:`DEFAULT_MAX_EMULATOR_CONTEXT` (4 MiB:
  QEMU's device state for the lane's HVM guest is 6.6 KB on Xen 4.17 and
  4.20 -- guest RAM, VRAM included, travels in the libxc stream -- so this
  leaves room for large device sets without letting a stream claim the
  host's memory).

The device model can start only once the stream has ended (as with libxl,
which writes the record to a file and starts QEMU after the libxc restore),
so the records are held until then: at most these bounds, per receiver.

Past a bound, the parser raises :class:`TrailerTooLarge` (naming the bound).

May import: pyxl.errors, pyxl.fdio, pyxl.loop, pyxl.stream, pyxl.backends.devicemodel
(the one bound of the device model's state).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Protocol, Tuple

from pyxl.backends.devicemodel import DEFAULT_MAX_EMULATOR_CONTEXT, state_bound
from pyxl.errors import StreamError, TruncatedStream, UnsupportedStream
from pyxl.fdio import CHUNK, read_exact, set_nonblocking
from pyxl.loop import Loop, ignore
from pyxl.stream.framing import REC_HEADER, roundup8
from pyxl.stream.libxl import WHERE_REC, record_name
from pyxl.stream.libxl import LibxlRecordType as RecordType

__all__ = ["DEFAULT_MAX_EMULATOR_CONTEXT", "EMULATOR_RECORDS", "LoopReader", "MAX_RECORDS",
           "MAX_XENSTORE_DATA", "TrailerLimits", "TrailerParser", "TrailerReader",
           "TrailerTooLarge", "read_trailer"]

#: The records a trailer may carry before its end record.
EMULATOR_RECORDS = (RecordType.EMULATOR_XENSTORE_DATA, RecordType.EMULATOR_CONTEXT)
#: Records before the end record, at most (libxl writes two).
MAX_RECORDS = 8
#: EMULATOR_XENSTORE_DATA bytes in one trailer, at most.
MAX_XENSTORE_DATA = 1 << 20

Records = List[Tuple[int, bytes]]


class TrailerTooLarge(UnsupportedStream):
    """A trailer went past one of :class:`TrailerLimits`; ``bound`` names it
    ("records", "EMULATOR_XENSTORE_DATA bytes", "EMULATOR_CONTEXT bytes")."""

    def __init__(self, offset: int, reason: str, bound: str) -> None:
        super().__init__(offset, reason, WHERE_REC)
        self.bound = bound


@dataclass(frozen=True)
class TrailerLimits:
    """What one trailer may hold (see the module's docstring)."""

    records: int = MAX_RECORDS
    xenstore_data: int = MAX_XENSTORE_DATA
    emulator_context: int = DEFAULT_MAX_EMULATOR_CONTEXT

    @classmethod
    def for_backend(cls, backend: Any) -> "TrailerLimits":
        """The defaults, with the backend's ``max_emulator_context`` (bytes) if it
        declares one (a device model whose saved state may be larger)."""
        return cls(emulator_context=state_bound(backend))   # as the save bounds it

    def bound_of(self, rtype: int) -> Tuple[int, str]:
        if rtype == RecordType.EMULATOR_XENSTORE_DATA:
            return self.xenstore_data, "EMULATOR_XENSTORE_DATA bytes"
        return self.emulator_context, "EMULATOR_CONTEXT bytes"


class TrailerParser:
    """libxl records up to the record of type ``end``: bytes in, records out.

    Feed it exactly :meth:`need` bytes at a time.  :attr:`done` turns true at the
    end record; :attr:`records` holds (type, body) of the records before it.  A
    record other than the emulator's raises :class:`~pyxl.StreamError`, one past
    ``limits`` :class:`TrailerTooLarge` (before its body is read); so does every
    call after an error.
    """

    def __init__(self, end: int = RecordType.END, *, offset: int = 0,
                 limits: TrailerLimits = TrailerLimits()) -> None:
        self.end = end
        self.offset = offset          # of the next unit, for errors
        self.limits = limits
        self.totals = {int(t): 0 for t in EMULATOR_RECORDS}   # bytes so far, per type
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
            self._check_bounds(at, rtype, length)
            self._rtype, self._length = rtype, length
            self._want = roundup8(length)
            if self._want:
                return
        self.records.append((self._rtype, bytes(data[:self._length])))
        self._rtype = None
        self._want = REC_HEADER.size

    def _check_bounds(self, at: int, rtype: int, length: int) -> None:
        if len(self.records) >= self.limits.records:
            raise TrailerTooLarge(at, f"more than {self.limits.records} libxl records after "
                                  "the libxc stream (pyxl's bound on records)", "records")
        limit, bound = self.limits.bound_of(rtype)
        total = self.totals[rtype] + length
        if total > limit:
            raise TrailerTooLarge(at, f"{record_name(rtype)} records of more than {limit} bytes "
                                  f"after the libxc stream (pyxl's bound on {bound})", bound)
        self.totals[rtype] = total


class Parser(Protocol):
    """What :class:`LoopReader` feeds: exact units in, done when :meth:`feed` says so."""

    def need(self) -> int: ...

    def feed(self, data: bytes) -> bool: ...

    def eof(self, got: int = 0) -> Exception: ...


def read_trailer(fd: int, end: int = RecordType.END, *,
                 limits: TrailerLimits = TrailerLimits()) -> Records:
    """The emulator records from ``fd`` up to the ``end`` record (blocking reads).
    Errors name file offsets (``pyxl inspect``'s): the fd's position is where
    the records begin."""
    try:
        start = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        start = 0       # not a file: offsets from the records' start
    parser = TrailerParser(end, offset=start, limits=limits)
    while not parser.done:
        try:
            unit = read_exact(fd, parser.need(), offset=parser.offset, what="libxl records",
                              where=WHERE_REC)
        except TruncatedStream as exc:
            raise parser.eof(exc.offset - parser.offset) from None
        parser.feed(unit)
    return parser.records


class LoopReader:
    """A parser with exact units (``need``/``feed``/``eof``) fed from a pipe or
    socket by the loop: ``done(None)`` once ``feed`` says it is finished, or
    ``done(error)``.  It never reads past the unit the parser needs.

    The fd is non-blocking meanwhile (its flags are given back when it stops).
    A unit's bytes are read at most :data:`~pyxl.fdio.CHUNK` at a time.
    """

    def __init__(self, loop: Loop, fd: int, parser: Parser,
                 done: Callable[[Optional[Exception]], None]) -> None:
        self.loop, self.fd, self.parser, self._done = loop, fd, parser, done
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
        self.buf = bytearray()
        self._done = ignore     # its owner, which holds this reader, is let go
        self.loop.remove_reader(self.fd)
        try:
            set_nonblocking(self.fd, bool(self.flags & os.O_NONBLOCK))
        except OSError:
            pass
        return True

    def stop(self, err: Optional[Exception] = None) -> None:
        done = self._done
        if self._detach():
            done(err)

    def _readable(self) -> None:
        while self.active:
            want = self.parser.need() - len(self.buf)
            try:
                chunk = os.read(self.fd, min(want, CHUNK))
            except BlockingIOError:
                return
            except OSError as exc:
                self.stop(exc)
                return
            if not chunk:
                self.stop(self.parser.eof(len(self.buf)))
                return
            self.buf += chunk
            if len(chunk) < want:
                continue
            unit, self.buf = bytes(self.buf), bytearray()
            try:
                finished = self.parser.feed(unit)
            except (StreamError, ValueError) as exc:
                self.stop(exc)
                return
            if finished:
                self.stop()
                return


class TrailerReader(LoopReader):
    """:class:`TrailerParser` fed by the loop: ``done(records, None)`` or
    ``done([], error)``."""

    def __init__(self, loop: Loop, fd: int,
                 done: Callable[[Records, Optional[Exception]], None],
                 end: int = RecordType.END, *, limits: TrailerLimits = TrailerLimits(),
                 offset: int = 0) -> None:
        self.trailer = TrailerParser(end, offset=offset, limits=limits)
        super().__init__(loop, fd, self.trailer,
                         lambda err: done([] if err else self.trailer.records, err))
