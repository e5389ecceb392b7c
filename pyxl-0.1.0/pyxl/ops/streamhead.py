"""The head of a stream to restore, read before the helper starts.

A restore reads, exactly and never a byte further (the helper reads libxc's
stream from the very next byte of the same open file description): the xl
header with its optional data (the domain's config), the libxl header, and the
empty LIBXC_CONTEXT record's header.  :class:`HeadParser` is that, sans-I/O,
in the shape :class:`~pyxl.ops.trailer.LoopReader` feeds (exact units from
:meth:`~HeadParser.need`), so a pipe or socket is read from the loop -- a
sender that never writes cannot block the caller's loop, and the restore's
timeout covers the wait; :func:`read_head` reads a regular file at once.

May import: pyxl.errors, pyxl.fdio, pyxl.stream.
"""

from __future__ import annotations

from typing import Any, Optional

from pyxl.errors import StreamError, TruncatedStream
from pyxl.fdio import read_exact
from pyxl.stream.framing import REC_HEADER
from pyxl.stream.libxl import LIBXL_HEADER, WHERE_REC, check_record_type, parse_libxl_header
from pyxl.stream.libxl import LibxlRecordType as RecordType
from pyxl.stream.xl import WHERE as WHERE_XL
from pyxl.stream.xl import XL_HEADER, XlHeader, parse_xl_header, parse_xl_optional_data

__all__ = ["HeadParser", "read_head"]

_XL_FIXED, _XL_OPTDATA, _LIBXL_HEADER, _LIBXC_CONTEXT, _DONE = range(5)
_WHAT = {_XL_FIXED: "xl header", _XL_OPTDATA: "xl optional data",
         _LIBXL_HEADER: "libxl header", _LIBXC_CONTEXT: "libxl record header"}


class HeadParser:
    """The stream head, bytes in: feed exactly :meth:`need` bytes at a time;
    :attr:`header` is the xl header once :meth:`feed` returns True.  Errors are
    :class:`~pyxl.StreamError` (a ``ValueError``)."""

    def __init__(self) -> None:
        self.offset = 0
        self.header: Optional[XlHeader] = None
        self._step = _XL_FIXED
        self._want = XL_HEADER.size
        self._fixed: Any = None   # the xl header's fixed part, once read

    @property
    def done(self) -> bool:
        return self._step == _DONE

    @property
    def what(self) -> str:
        return _WHAT.get(self._step, "stream head")

    def need(self) -> int:
        return self._want

    def eof(self, got: int = 0) -> TruncatedStream:
        where = WHERE_XL if self._step in (_XL_FIXED, _XL_OPTDATA) else WHERE_REC
        return TruncatedStream(self.offset + got, f"end of stream after {got} of {self._want} "
                               f"bytes of {self.what}", where)

    def feed(self, data: bytes) -> bool:
        if len(data) != self._want or self.done:
            raise ValueError(f"fed {len(data)} bytes where {self.need()} were needed")
        at = self.offset
        self.offset += len(data)
        if self._step == _XL_FIXED:
            fixed = parse_xl_header(data)
            self._fixed = fixed
            self._step, self._want = _XL_OPTDATA, fixed.optional_data_len
            if self._want == 0:    # no optional data: nothing to read for it
                self._optional_data(b"")
        elif self._step == _XL_OPTDATA:
            self._optional_data(data)
        elif self._step == _LIBXL_HEADER:
            parse_libxl_header(data, at)
            self._step, self._want = _LIBXC_CONTEXT, REC_HEADER.size
        else:
            rtype, length = REC_HEADER.unpack(data)
            check_record_type(rtype, at)
            if rtype != RecordType.LIBXC_CONTEXT or length != 0:
                raise StreamError(at, f"libxl stream starts with record {rtype:#x} (length "
                                  f"{length}), not an empty LIBXC_CONTEXT", WHERE_REC)
            self._step, self._want = _DONE, 0
        return self.done

    def _optional_data(self, data: bytes) -> None:
        self.header = parse_xl_optional_data(self._fixed, data)
        self._step, self._want = _LIBXL_HEADER, LIBXL_HEADER.size


def read_head(fd: int) -> XlHeader:
    """The stream head from ``fd`` with blocking exact reads (a regular file)."""
    parser = HeadParser()
    while not parser.done:
        try:
            unit = read_exact(fd, parser.need(), offset=parser.offset, what=parser.what)
        except TruncatedStream as exc:
            raise parser.eof(exc.offset - parser.offset) from None
        parser.feed(unit)
    assert parser.header is not None
    return parser.header
