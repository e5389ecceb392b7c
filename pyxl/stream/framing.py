"""Pieces shared by the three stream layers (xl, libxl, libxc).

Theory of operation
-------------------

A saved domain is three formats nested in one byte stream (see
``../shared/reference/xen-4.17-save-restore.md`` section 4)::

    xl save-file header  (magic, flags, JSON config)       -- stream_xl
    libxl v2 stream      (header, records, END)            -- stream_libxl
      LIBXC_CONTEXT record, then inline:
      libxc v2/v3 stream (image/domain header, records, END) -- stream_libxc

libxl and libxc share the same record framing: ``u32 type, u32 length``
(little endian), ``length`` bytes of body, then zero padding up to a
multiple of 8 that is *not* counted in ``length``.

This module holds what every layer needs:

* the error types (:class:`StreamError` and subclasses), which always
  carry the byte offset of the thing that broke a rule;
* exact file-descriptor I/O (:func:`read_exact`, :func:`write_all`) for
  the host's save and restore paths, where the fd is shared with the save
  helper and must never be read one byte too far;
* :class:`Source`, the narrow I/O boundary of the whole-stream scanner.
  It reads exactly what it is asked for, checks lengths against the size
  of a regular file *before* reading (so a forged length never turns into
  an allocation), seeks over bulk data in regular files and reads and
  discards it in bounded chunks from pipes;
* the scan report (:class:`StreamReport`) that the scanners fill in.

Offsets in errors and reports are counted from the first byte the reader
was handed (for a file scanned from its start: the file offset).
"""

from __future__ import annotations

import os
import select
import stat
import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO, Dict, List, Optional, Tuple

from pyxl.errors import StreamError, TruncatedStream, UnsupportedStream

if TYPE_CHECKING:  # pragma: no cover - typing only, avoids an import cycle
    from pyxl.stream.libxc import DomainHeader, ImageHeader
    from pyxl.stream.libxl import LibxlHeader
    from pyxl.stream.xl import XlHeader

__all__ = [
    "REC_ALIGN",
    "REC_HEADER",
    "StreamError",
    "TruncatedStream",
    "UnsupportedStream",
    "roundup8",
    "pad_len",
    "frame_record",
    "Source",
    "Scanner",
    "note_trailing",
    "RecordInfo",
    "PageStats",
    "StreamReport",
]

#: Records of both libxl and libxc are padded to this many bytes.
REC_ALIGN = 8
#: ``u32 type, u32 length``, little endian (4.17 rejects big-endian streams).
REC_HEADER = struct.Struct("<II")

#: Bulk data is read (or skipped on pipes) at most this much at a time.
CHUNK = 1 << 20


# ---------------------------------------------------------------------------
# Errors




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
# Exact fd I/O (save/restore paths)
#
# The restore fd is one open file description shared with the save helper:
# libxl reads its records, then the helper reads the libxc stream from the
# very next byte.  So these helpers use os.read() with exactly the number of
# bytes still wanted -- no Python-level buffering, no read-ahead.  The fd
# may be a regular file, a pipe or a socket (migration).  A non-blocking fd
# is waited on with select() rather than failing with BlockingIOError.


# ---------------------------------------------------------------------------
# Scanner input


class Source:
    """Exact, bounded reads from a binary file object, tracking the offset.

    * ``size`` is known for regular files (and seekable in-memory streams):
      every read or skip is checked against the bytes left *before* it
      happens, so a forged length raises :class:`TruncatedStream` without
      allocating or reading anything.
    * Skips seek on seekable files; on pipes and sockets they read and
      discard in chunks of at most 1 MiB.
    * ``peek()`` keeps a small push-back buffer so that layer detection and
      end-of-stream checks work on pipes too.

    Offsets are relative to the file position when the Source was made.
    """

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.pos = 0
        self._pushback = b""
        self._seekable = False
        self.size: Optional[int] = None
        start = 0
        try:
            seekable = f.seekable()
        except (AttributeError, OSError, ValueError):
            seekable = False
        if seekable:
            try:
                start = f.tell()
                end = f.seek(0, os.SEEK_END)
                f.seek(start, os.SEEK_SET)
                regular = True
                try:
                    regular = stat.S_ISREG(os.fstat(f.fileno()).st_mode)
                except (AttributeError, OSError, ValueError):
                    pass  # in-memory file: its size is reliable
                if regular:
                    self._seekable = True
                    self.size = end - start
            except OSError:
                self._seekable = False
                self.size = None

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
        if self._seekable and n > done:
            self._f.seek(n - done, os.SEEK_CUR)
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


#: on pipes, at most this much data after the final END is read (and counted)
TRAILING_LIMIT = 1 << 20


def note_trailing(src: Source, report: "StreamReport") -> None:
    """Count bytes after the outermost END (Xen never reads them) and warn.
    On pipes, stop after ``TRAILING_LIMIT`` so an endless producer cannot
    hang the scan."""
    limit = None if src.size is not None else TRAILING_LIMIT
    start = src.pos
    n = src.count_rest() if limit is None else src.count_rest(limit + 1)
    report.trailing_bytes = n
    if n:
        more = "more than " if limit is not None and n > limit else ""
        report.warn(start, f"{more}{min(n, limit or n)} bytes after the final END "
                    "(never read by Xen)")


# ---------------------------------------------------------------------------
# Scan report


@dataclass
class RecordInfo:
    """One record seen by a scanner."""

    layer: str
    rtype: int
    name: str
    offset: int
    length: int
    detail: str = ""
    #: PAGE_DATA only: pfn entries, and entries carrying a page of data
    pfns: int = 0
    with_data: int = 0

    def to_json(self) -> Dict[str, Any]:
        out: Dict[str, Any] = {
            "layer": self.layer,
            "type": self.rtype,
            "name": self.name,
            "offset": self.offset,
            "length": self.length,
            "detail": self.detail,
        }
        if self.pfns:
            out["pfns"] = self.pfns
            out["with_data"] = self.with_data
        return out


@dataclass
class PageStats:
    """Totals over all PAGE_DATA records."""

    records: int = 0
    #: pfn entries (pages mentioned), with or without data
    pfns: int = 0
    #: entries that carry 4096 bytes of data
    with_data: int = 0
    #: entries per page type name (NOTAB, L1TAB, ..., XTAB)
    by_type: Dict[str, int] = field(default_factory=dict)

    @property
    def without_data(self) -> int:
        """XTAB (holes), XALLOC and BROKEN entries."""
        return self.pfns - self.with_data

    @property
    def holes(self) -> int:
        """XTAB entries: pfns that are invalid or absent in the guest."""
        return self.by_type.get("XTAB", 0)

    def add(self, by_type: Dict[str, int], with_data: int) -> None:
        self.records += 1
        for name, n in by_type.items():
            self.by_type[name] = self.by_type.get(name, 0) + n
            self.pfns += n
        self.with_data += with_data

    def to_json(self) -> Dict[str, Any]:
        return {
            "records": self.records,
            "pfns": self.pfns,
            "with_data": self.with_data,
            "without_data": self.without_data,
            "holes": self.holes,
            "by_type": dict(sorted(self.by_type.items())),
        }


@dataclass
class StreamReport:
    """What a whole-stream scan found, up to the first error.

    ``error`` is ``None`` for a stream that passes every check; otherwise it
    is the first :class:`StreamError` and everything before it is filled in.
    """

    #: outermost layer: "xl", "libxl", "libxc" or "unknown"
    layer: str = "unknown"
    #: total size for regular files, else None
    size: Optional[int] = None
    checkpointed: bool = False
    xl_header: Optional["XlHeader"] = None
    libxl_header: Optional["LibxlHeader"] = None
    libxl_offset: Optional[int] = None
    libxc_header: Optional["ImageHeader"] = None
    libxc_offset: Optional[int] = None
    domain_header: Optional["DomainHeader"] = None
    records: List[RecordInfo] = field(default_factory=list)
    #: records seen but not stored (the list is capped at ``max_records``)
    records_omitted: int = 0
    max_records: int = 100_000
    pages: PageStats = field(default_factory=PageStats)
    #: things Xen accepts but Debian's verifier would not (reserved bits,
    #: non-zero padding, unknown optional records, trailing data ...)
    warnings: List[str] = field(default_factory=list)
    max_warnings: int = 100
    #: checkpoints seen (checkpointed streams only)
    checkpoints: int = 0
    #: offset just past the outermost END record
    end_offset: Optional[int] = None
    #: bytes after the outermost END (ignored by Xen)
    trailing_bytes: int = 0
    error: Optional[StreamError] = None

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def config(self) -> Optional[Dict[str, Any]]:
        """The domain config from the xl header, if any."""
        return self.xl_header.config if self.xl_header is not None else None

    def add_record(self, info: RecordInfo) -> None:
        if len(self.records) < self.max_records:
            self.records.append(info)
        else:
            self.records_omitted += 1

    def warn(self, offset: int, text: str) -> None:
        if len(self.warnings) < self.max_warnings:
            self.warnings.append(f"{offset:#x}: {text}")

    def record_counts(self) -> List[Tuple[str, str, int]]:
        """(layer, name, count) for the stored records, in first-seen order."""
        counts: Dict[Tuple[str, str], int] = {}
        for rec in self.records:
            key = (rec.layer, rec.name)
            counts[key] = counts.get(key, 0) + 1
        return [(layer, name, n) for (layer, name), n in counts.items()]

    def to_json(self) -> Dict[str, Any]:
        return {
            "ok": self.ok,
            "layer": self.layer,
            "size": self.size,
            "checkpointed": self.checkpointed,
            "xl_header": self.xl_header.to_json() if self.xl_header else None,
            "libxl_header": (self.libxl_header.to_json(self.libxl_offset or 0)
                             if self.libxl_header else None),
            "libxc_header": (self.libxc_header.to_json(self.libxc_offset or 0)
                             if self.libxc_header else None),
            "domain_header": self.domain_header.to_json() if self.domain_header else None,
            "config": self.config,
            "records": [r.to_json() for r in self.records],
            "records_omitted": self.records_omitted,
            "pages": self.pages.to_json(),
            "checkpoints": self.checkpoints,
            "end_offset": self.end_offset,
            "trailing_bytes": self.trailing_bytes,
            "warnings": list(self.warnings),
            "error": self.error.to_json() if self.error else None,
        }


class Scanner:
    """What the libxl and libxc scanners share: where they read, what they
    record into, and what the outer layer told them to expect."""

    def __init__(self, src: Source, report: StreamReport, *, checkpointed: bool = False,
                 expected_guest_type: Optional[int] = None,
                 max_vcpus: Optional[int] = None) -> None:
        self.src = src
        self.report = report
        self.checkpointed = checkpointed
        self.expected_guest_type = expected_guest_type
        self.max_vcpus = max_vcpus
