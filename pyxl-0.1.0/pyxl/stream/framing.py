"""Record framing and the scanners' input, shared by the libxl and libxc layers.

libxl and libxc frame their records the same way: ``u32 type, u32 length``
(little endian), ``length`` bytes of body, then zero padding up to a
multiple of 8 that is *not* counted in ``length`` (Xen's
``docs/specs/libxc-migration-stream.pandoc``, section "Records", and
``docs/specs/libxl-migration-stream.pandoc``, section "Record Overview").

This module holds:

* the framing itself (:data:`REC_HEADER`, :func:`roundup8`,
  :func:`pad_len`, :func:`frame_record`);
* :class:`Source`, the scanners' exact, bounded reader over a binary file
  object.  It is pure: it never asks the operating system anything.  Whether
  the stream has a known size (a regular file, an in-memory buffer) is
  decided by whoever opened it (:func:`pyxl.streamio.regular_size`) and
  passed in;
* the error types, re-exported from :mod:`pyxl.errors`.

Offsets in errors and reports are counted from the first byte the reader
was handed (for a file scanned from its start: the file offset).
"""

from __future__ import annotations

import io
import struct
from typing import BinaryIO, List, Optional

from pyxl.errors import StreamError, TruncatedStream, UnsupportedStream

__all__ = [
    "REC_ALIGN",
    "REC_HEADER",
    "CHUNK",
    "StreamError",
    "TruncatedStream",
    "UnsupportedStream",
    "roundup8",
    "pad_len",
    "frame_record",
    "Source",
]

#: Records of both libxl and libxc are padded to this many bytes.
REC_ALIGN = 8
#: ``u32 type, u32 length``, little endian (4.17 rejects big-endian streams).
REC_HEADER = struct.Struct("<II")

#: Bulk data is read (or skipped on pipes) at most this much at a time.
CHUNK = 1 << 20


# ---------------------------------------------------------------------------
# Record framing


def roundup8(n: int) -> int:
    """``n`` rounded up to the record alignment (8)."""
    return (n + REC_ALIGN - 1) & ~(REC_ALIGN - 1)


def pad_len(n: int) -> int:
    """Number of zero bytes that follow an ``n``-byte record body."""
    return roundup8(n) - n


def frame_record(rtype: int, body: bytes = b"") -> bytes:
    """One record in libxl/libxc framing: header, body, zero padding."""
    if not 0 <= rtype <= 0xFFFFFFFF:
        raise ValueError(f"record type {rtype:#x} does not fit in a u32")
    if len(body) > 0xFFFFFFFF:
        raise ValueError(f"record body of {len(body)} bytes does not fit in a u32 length")
    return REC_HEADER.pack(rtype, len(body)) + bytes(body) + bytes(pad_len(len(body)))


# ---------------------------------------------------------------------------
# Scanner input


class Source:
    """Exact, bounded reads from a binary file object, tracking the offset.

    * ``size`` is the number of bytes from the file's current position to
      its end, when the caller knows it (a regular file or a seekable
      in-memory buffer; see :func:`pyxl.streamio.regular_size`).  Then every
      read or skip is checked against the bytes left *before* it happens, so
      a forged length raises :class:`TruncatedStream` without allocating or
      reading anything, and skips seek.
    * Without a size (pipes, sockets, unknown files) skips read and discard
      in chunks of at most 1 MiB.
    * ``peek()`` keeps a small push-back buffer so that layer detection and
      end-of-stream checks work on pipes too.

    Offsets are relative to the file position when the Source was made.
    """

    def __init__(self, f: BinaryIO, size: Optional[int] = None) -> None:
        if size is not None and size < 0:
            raise ValueError(f"negative stream size {size}")
        self._f = f
        self.pos = 0
        self._pushback = b""
        self.size: Optional[int] = size

    @property
    def remaining(self) -> Optional[int]:
        """Bytes left for a sized source, else ``None``."""
        if self.size is None:
            return None
        return self.size - self.pos

    def need(self, n: int, what: str, where: str, at: Optional[int] = None) -> None:
        """Raise :class:`TruncatedStream` now if a sized source has fewer
        than ``n`` bytes left.  A no-op for pipes.

        Truncation errors carry the offset ``at`` of the unit being read
        (default: the current position) and say where the stream ended.
        """
        left = self.remaining
        if left is not None and n > left:
            raise TruncatedStream(
                self.pos if at is None else at,
                f"{what} needs {n} bytes but the stream ends after {max(left, 0)} "
                f"(at {self.pos + max(left, 0):#x})", where)

    def _raw_read(self, n: int) -> bytes:
        parts: List[bytes] = []
        got = 0
        while got < n:
            chunk = self._f.read(min(n - got, CHUNK))
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        return b"".join(parts)

    def read(self, n: int, what: str, where: str, at: Optional[int] = None) -> bytes:
        """Exactly ``n`` bytes, or :class:`TruncatedStream`."""
        self.need(n, what, where, at)
        data = b""
        if self._pushback:
            data, self._pushback = self._pushback[:n], self._pushback[n:]
        if len(data) < n:
            data += self._raw_read(n - len(data))
        if len(data) < n:
            raise TruncatedStream(
                self.pos if at is None else at,
                f"{what} needs {n} bytes but the stream ends after {len(data)} "
                f"(at {self.pos + len(data):#x})", where)
        self.pos += n
        return data

    def skip(self, n: int, what: str, where: str, at: Optional[int] = None) -> None:
        """Move ``n`` bytes forward without keeping them."""
        self.need(n, what, where, at)
        done = min(n, len(self._pushback))
        self._pushback = self._pushback[done:]
        if self.size is not None and n > done:
            self._f.seek(n - done, io.SEEK_CUR)
            done = n
        while done < n:
            chunk = self._f.read(min(n - done, CHUNK))
            if not chunk:
                raise TruncatedStream(
                    self.pos if at is None else at,
                    f"{what} needs {n} bytes but the stream ends after {done} "
                    f"(at {self.pos + done:#x})", where)
            done += len(chunk)
        self.pos += n

    def peek(self, n: int) -> bytes:
        """Up to ``n`` bytes without consuming them (fewer only at EOF)."""
        if len(self._pushback) < n:
            self._pushback += self._raw_read(n - len(self._pushback))
        return self._pushback[:n]

    def at_eof(self) -> bool:
        left = self.remaining
        if left is not None and not self._pushback:
            return left <= 0
        return not self.peek(1)

    def count_rest(self, limit: int = 1 << 62) -> int:
        """Consume and count the bytes left (at most ``limit``)."""
        left = self.remaining
        if left is not None:
            n = min(left, limit)
            self.skip(n, "trailing data", "stream")
            return n
        n = min(len(self._pushback), limit)
        self._pushback = self._pushback[n:]
        while n < limit:
            chunk = self._f.read(min(CHUNK, limit - n))
            if not chunk:
                break
            n += len(chunk)
        self.pos += n
        return n
