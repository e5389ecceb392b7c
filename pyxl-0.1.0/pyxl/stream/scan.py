"""The whole-stream scan: detect the outermost layer, walk every layer
below it, and report (``pyxl inspect``'s engine).

A saved domain is three formats nested in one byte stream::

    xl save-file header  (magic, flags, JSON config)        -- pyxl.stream.xl
    libxl v2 stream      (header, records, END)             -- pyxl.stream.libxl
      LIBXC_CONTEXT record, then inline:
      libxc v2/v3 stream (image/domain header, records, END) -- pyxl.stream.libxc

(Xen's ``docs/specs/libxl-migration-stream.pandoc``, section "LIBXC_CONTEXT":
the libxc stream follows that record inline; the xl header is xl's own, see
:mod:`pyxl.stream.xl`.)  :func:`scan_source` takes any of the three as the
outermost layer, detected from the first 8 bytes (:func:`detect_layer`).

Pure: it reads through a :class:`~pyxl.stream.framing.Source`.  Opening
files and telling a regular file's size is :mod:`pyxl.streamio`'s
(``scan_stream(f)``, ``scan_path(path)``).
"""

from __future__ import annotations

from typing import Optional

from pyxl.stream.framing import Source, StreamError, TruncatedStream
from pyxl.stream.libxc import IHDR_MARKER, IMAGE_HEADER
from pyxl.stream.libxc_scan import scan_libxc_on
from pyxl.stream.libxl import LIBXL_HEADER, LIBXL_IDENT
from pyxl.stream.libxl_scan import scan_libxl_on
from pyxl.stream.report import StreamReport
from pyxl.stream.xl import (WHERE, XL_HEADER, XL_MAGIC, ZSTD_MAGIC, max_vcpus_of_config,
                            parse_xl_header, parse_xl_optional_data)

__all__ = ["LIBXC_MAGIC", "LIBXL_MAGIC", "TRAILING_LIMIT", "detect_layer", "note_trailing",
           "scan_xl_on", "scan_source"]

#: the first 8 bytes of each layer (a libxc stream starts with its marker)
LIBXC_MAGIC = IMAGE_HEADER.pack(IHDR_MARKER, 0, 0, 0, 0, 0)[:8]
LIBXL_MAGIC = LIBXL_HEADER.pack(LIBXL_IDENT, 0, 0)[:8]

#: on pipes, at most this much data after the final END is read (and counted)
TRAILING_LIMIT = 1 << 20


def detect_layer(head: bytes) -> Optional[str]:
    """"xl", "libxl" or "libxc" from a stream's first 8 bytes, else None."""
    if head[:8] == XL_MAGIC[:8]:
        return "xl"
    if head[:8] == LIBXL_MAGIC:
        return "libxl"
    if head[:8] == LIBXC_MAGIC:
        return "libxc"
    return None


def note_trailing(src: Source, report: StreamReport) -> None:
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


def scan_xl_on(src: Source, report: StreamReport, *, checkpointed: bool = False) -> None:
    """Scan an xl save file (xl header, then the libxl stream) from ``src``
    into ``report`` (raises StreamError)."""
    fixed = parse_xl_header(src.read(XL_HEADER.size, "xl header", WHERE))
    optdata = src.read(fixed.optional_data_len, "xl optional data", WHERE, 44)
    hdr = parse_xl_optional_data(fixed, optdata)
    report.xl_header = hdr
    if hdr.config_bytes is not None:
        consumed = 4 + len(hdr.config_bytes)
        if consumed < len(optdata):
            report.warn(48 + consumed, f"{len(optdata) - consumed} bytes of optional data "
                        "after the config (ignored by xl)")
    scan_libxl_on(src, report, checkpointed=checkpointed,
                  expected_guest_type=hdr.guest_type,
                  max_vcpus=max_vcpus_of_config(hdr.config))


def scan_source(src: Source, *, layer: Optional[str] = None,
                checkpointed: bool = False, strict: bool = False) -> StreamReport:
    """Scan a whole stream from ``src``.

    The outermost layer is detected from the first 8 bytes unless ``layer``
    ("xl", "libxl" or "libxc") is given.  Nothing bulky is held in memory:
    page data is skipped (seeked over when ``src`` has a size, read and
    discarded in 1 MiB chunks otherwise).  Never raises :class:`StreamError`
    -- the first one is in ``report.error`` -- but ``OSError`` from the
    underlying file propagates, and an unknown ``layer`` is a ``ValueError``.
    ``strict``: refuse what Xen tolerates but no writer writes (``--verify``).
    """
    report = StreamReport(size=src.size, checkpointed=checkpointed, strict=strict)
    try:
        head = src.peek(8)
        detected = detect_layer(head)
        report.layer = layer or detected or "unknown"
        if layer is None and detected is None:
            if len(head) < 8:
                raise TruncatedStream(len(head), "stream is shorter than any header", "stream")
            if head[:4] == ZSTD_MAGIC:     # a file is decompressed first; a pipe cannot be
                raise StreamError(0, "a zstd-compressed image: inspect the file, or "
                                  "`zstd -dc FILE | pyxl inspect -`", "stream")
            raise StreamError(0, "not a Xen 4.17 stream: no xl, libxl or libxc magic "
                              f"(starts {head.hex()})", "stream")
        if report.layer == "xl":
            scan_xl_on(src, report, checkpointed=checkpointed)
        elif report.layer == "libxl":
            scan_libxl_on(src, report, checkpointed=checkpointed)
        elif report.layer == "libxc":
            scan_libxc_on(src, report, checkpointed=checkpointed)
        else:
            raise ValueError(f"unknown layer {layer!r}")
        note_trailing(src, report)
    except StreamError as err:
        report.error = err
    return report
