"""The I/O edge of the stream layer: stream headers and libxl records read
from a file descriptor, and whole-stream scans over files and pipes.

:mod:`pyxl.stream` is sans-I/O: it checks bytes it is given and reads
through a :class:`~pyxl.stream.framing.Source` wrapped around a file object.
Everything that touches the operating system lives here:

* **Exact fd readers** for the host's restore path:
  :func:`read_xl_header`, :func:`read_libxl_header`,
  :func:`read_libxl_record_header`, :func:`read_libxl_record` and the
  stateful :class:`LibxlRestoreReader`.  The restore fd is one open file
  description shared with the save helper: libxl's records are read up to
  the very byte where the helper's libxc stream starts, so they use
  :func:`pyxl.fdio.read_exact` (exact ``os.read`` calls, no buffering, no
  read-ahead).  After the LIBXC_CONTEXT record header the fd is on the first
  byte of the libxc stream, ready for the helper.
* **Scans over files and pipes**: :func:`scan_stream` (any binary file
  object), :func:`scan_path` (opens a file), :func:`scan_libxl` and
  :func:`scan_libxc` (a given outermost layer).  :func:`regular_size` tells
  whether a file object has a reliable size (a regular file or an in-memory
  buffer: reads are bounds-checked before they happen and bulk data is
  seeked over) or not (pipes, sockets, character devices: bulk data is read
  and discarded in 1 MiB chunks).

May import: pyxl.errors, pyxl.fdio, pyxl.stream.
"""

from __future__ import annotations

import io
import os
import stat
from typing import BinaryIO, Optional, Tuple

from pyxl.fdio import read_exact
from pyxl.stream.framing import REC_HEADER, Source, StreamError, UnsupportedStream, roundup8
from pyxl.stream.libxl import (LIBXL_HEADER, LIBXL_RECORD_MAX, WHERE_HDR, WHERE_REC,
                               LibxlHeader, LibxlRecord, LibxlRecordType, check_record_order,
                               check_record_type, parse_libxl_header, parse_xenstore_data,
                               record_name)
from pyxl.stream.report import StreamReport
from pyxl.stream.scan import scan_source
from pyxl.stream.xl import (WHERE as WHERE_XL, XL_HEADER, XL_OPTDATA_MAX, XlHeader,
                            parse_xl_header, parse_xl_optional_data)

__all__ = [
    "read_xl_header", "read_libxl_header", "read_libxl_record_header", "read_libxl_record",
    "LibxlRestoreReader", "regular_size", "open_source", "scan_stream", "scan_path",
    "scan_libxl", "scan_libxc",
]


# ---------------------------------------------------------------------------
# Exact fd readers (restore)


def read_xl_header(fd: int, *, max_optional_data: int = XL_OPTDATA_MAX) -> XlHeader:
    """Read and check the xl header and its optional data from ``fd``, with
    exact ``os.read`` calls: afterwards the fd is on the libxl header."""
    fixed = parse_xl_header(read_exact(fd, XL_HEADER.size, what="xl header", where=WHERE_XL),
                            max_optional_data=max_optional_data)
    optdata = read_exact(fd, fixed.optional_data_len, offset=XL_HEADER.size,
                         what="xl optional data", where=WHERE_XL)
    return parse_xl_optional_data(fixed, optdata)


def read_libxl_header(fd: int, *, offset: int = 0) -> LibxlHeader:
    """Read and check the 16-byte libxl header from ``fd`` (exactly 16
    bytes).  ``offset`` is only used in error messages."""
    return parse_libxl_header(read_exact(fd, LIBXL_HEADER.size, offset=offset,
                                         what="libxl header", where=WHERE_HDR), offset)


def read_libxl_record_header(fd: int, *, offset: int = 0) -> Tuple[int, int]:
    """Read one 8-byte record header; returns ``(rtype, length)``.

    Unknown types raise :class:`StreamError` before anything else is read.
    After a LIBXC_CONTEXT header with length 0 the fd is on the first byte
    of the libxc stream.
    """
    rtype, length = REC_HEADER.unpack(read_exact(fd, REC_HEADER.size, offset=offset,
                                                 what="libxl record header", where=WHERE_REC))
    check_record_type(rtype, offset)
    return rtype, length


def read_libxl_record(fd: int, *, offset: int = 0,
                      max_length: int = LIBXL_RECORD_MAX) -> LibxlRecord:
    """Read one whole record: header, body and padding (exactly
    ``8 + roundup8(length)`` bytes).  Bodies over ``max_length`` raise
    :class:`UnsupportedStream` without being read."""
    rtype, length = read_libxl_record_header(fd, offset=offset)
    if length > max_length:
        raise UnsupportedStream(offset, f"{record_name(rtype)} length {length:#x} exceeds "
                                f"pyxl's limit {max_length:#x}", WHERE_REC)
    data = read_exact(fd, roundup8(length), offset=offset + REC_HEADER.size,
                      what=f"{record_name(rtype)} body", where=WHERE_REC)
    return LibxlRecord(rtype, data[:length])


class LibxlRestoreReader:
    """Stateful exact reader of a libxl stream on an fd, for the restore
    path: enforces libxl's record order and tracks offsets.

    Usage::

        r = LibxlRestoreReader(fd, guest_type=DHDR_TYPE_X86_HVM)
        r.read_header()
        rec = r.next_record()          # LIBXC_CONTEXT: run the helper now
        r.libxc_done(nbytes)           # after the helper (nbytes if known)
        while (rec := r.next_record()).rtype != LibxlRecordType.END: ...

    ``base_offset`` is the offset of the libxl header in the whole stream
    (e.g. the xl header's length), used only for messages.
    """

    def __init__(self, fd: int, *, guest_type: Optional[int] = None, base_offset: int = 0,
                 checkpointed: bool = False, max_length: int = LIBXL_RECORD_MAX) -> None:
        self.fd = fd
        self.guest_type = guest_type
        self.offset: Optional[int] = base_offset
        self.checkpointed = checkpointed
        self.max_length = max_length
        self.header: Optional[LibxlHeader] = None
        self.seen_libxc = False
        self.in_libxc = False
        self.in_checkpoint = False
        self.done = False

    def _off(self) -> int:
        return self.offset if self.offset is not None else 0

    def read_header(self) -> LibxlHeader:
        self.header = read_libxl_header(self.fd, offset=self._off())
        if self.offset is not None:
            self.offset += LIBXL_HEADER.size
        return self.header

    def libxc_done(self, nbytes: Optional[int] = None) -> None:
        """The helper has consumed the libxc stream (``nbytes`` long if the
        caller knows; offsets in later errors are unknown otherwise)."""
        self.in_libxc = False
        if self.offset is not None and nbytes is not None:
            self.offset += nbytes
        else:
            self.offset = None

    def checkpoint(self) -> None:
        """The helper reported a checkpoint: read libxl records up to
        CHECKPOINT_END next."""
        if not self.checkpointed:
            raise StreamError(self._off(), "CHECKPOINT in a non-checkpointed stream (a Remus "
                              "stream? inspect --checkpointed reads one)", WHERE_REC)
        self.in_libxc = False
        self.in_checkpoint = True
        self.offset = None

    def next_record(self) -> LibxlRecord:
        if self.header is None:
            raise RuntimeError("read_header() first")
        if self.in_libxc:
            raise RuntimeError("the libxc stream is being read by the helper; "
                               "call libxc_done() first")
        if self.done:
            raise RuntimeError("END already read")
        off = self._off()
        rec = read_libxl_record(self.fd, offset=off, max_length=self.max_length)
        check_record_order(rec.rtype, len(rec.body), off, guest_type=self.guest_type,
                           seen_libxc=self.seen_libxc, in_checkpoint=self.in_checkpoint)
        if rec.rtype == LibxlRecordType.EMULATOR_XENSTORE_DATA:
            parse_xenstore_data(rec.payload, off)
        if self.offset is not None:
            self.offset += REC_HEADER.size + roundup8(len(rec.body))
        if rec.rtype == LibxlRecordType.LIBXC_CONTEXT:
            self.seen_libxc = True
            self.in_libxc = True
        elif rec.rtype == LibxlRecordType.CHECKPOINT_END:
            self.in_checkpoint = False
            self.in_libxc = True
        elif rec.rtype == LibxlRecordType.END:
            self.done = True
        return rec


# ---------------------------------------------------------------------------
# Scans over files and pipes


def regular_size(f: BinaryIO) -> Optional[int]:
    """Bytes from the current position of ``f`` to its end, if that number
    can be trusted: a seekable regular file, or a seekable in-memory file
    (no ``fileno()``).  ``None`` for pipes, sockets and seekable files that
    are not regular (character or block devices).  Leaves the position as
    it was."""
    try:
        seekable = f.seekable()
    except (AttributeError, OSError, ValueError):
        return None
    if not seekable:
        return None
    try:
        start = f.tell()
        end = f.seek(0, io.SEEK_END)
        f.seek(start, io.SEEK_SET)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            return None
    except (AttributeError, OSError, ValueError):
        pass  # in-memory file: its size is reliable
    return end - start


def open_source(f: BinaryIO) -> Source:
    """A :class:`Source` over ``f``, sized when :func:`regular_size` can tell."""
    return Source(f, regular_size(f))


def scan_stream(f: BinaryIO, *, layer: Optional[str] = None,
                checkpointed: bool = False, strict: bool = False) -> StreamReport:
    """Scan a whole stream from the current position of ``f``.

    The outermost layer is detected from the first 8 bytes unless ``layer``
    ("xl", "libxl" or "libxc") is given.  Nothing bulky is held in memory:
    page data is seeked over in regular files and read and discarded in
    1 MiB chunks from pipes.  Never raises :class:`StreamError` -- the first
    one is in ``report.error`` -- but ``OSError`` from ``f`` propagates.
    """
    return scan_source(open_source(f), layer=layer, checkpointed=checkpointed, strict=strict)


def scan_path(path: str, *, layer: Optional[str] = None,
              checkpointed: bool = False, strict: bool = False) -> StreamReport:
    """Open ``path`` and :func:`scan_stream` it (OSError if unreadable)."""
    with open(path, "rb", buffering=0) as f:
        return scan_stream(f, layer=layer, checkpointed=checkpointed, strict=strict)


def scan_libxl(f: BinaryIO, *, checkpointed: bool = False) -> StreamReport:
    """Scan a libxl stream (libxl header first).  Never raises StreamError;
    see ``report.error``."""
    return scan_stream(f, layer="libxl", checkpointed=checkpointed)


def scan_libxc(f: BinaryIO, *, checkpointed: bool = False) -> StreamReport:
    """Scan a bare libxc stream (e.g. what the save helper wrote to its fd).

    Never raises :class:`StreamError`: the first one ends the scan and is
    stored in ``report.error``.  ``OSError`` from the file propagates.
    """
    return scan_stream(f, layer="libxc", checkpointed=checkpointed)
