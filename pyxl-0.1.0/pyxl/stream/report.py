"""What a whole-stream scan found: :class:`StreamReport` and its parts, and
the :class:`Scanner` base that the libxl and libxc scanners share.

The report sits below the three layers it describes, so it does not name
their header classes: it holds them through the small read-only protocols
below (:class:`XlHeaderInfo`, :class:`LibxlHeaderInfo`,
:class:`ImageHeaderInfo`, :class:`DomainHeaderInfo`), which
``pyxl.stream.xl.XlHeader``, ``pyxl.stream.libxl.LibxlHeader`` and
``pyxl.stream.libxc.ImageHeader``/``DomainHeader`` satisfy.  Each protocol
lists exactly what readers of a report (``pyxl inspect``, the libxl
scanner) use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

from pyxl.errors import StreamError
from pyxl.stream.framing import Source

__all__ = [
    "XlHeaderInfo",
    "LibxlHeaderInfo",
    "ImageHeaderInfo",
    "DomainHeaderInfo",
    "RecordInfo",
    "PageStats",
    "StreamReport",
    "Scanner",
]


# ---------------------------------------------------------------------------
# The layers' headers, as a report sees them


class XlHeaderInfo(Protocol):
    """An xl save-file header (``pyxl.stream.xl.XlHeader``)."""

    @property
    def mandatory_flags(self) -> int: ...
    @property
    def optional_data_len(self) -> int: ...
    @property
    def config_len(self) -> int: ...
    @property
    def config(self) -> Optional[Dict[str, Any]]: ...
    def to_json(self) -> Dict[str, Any]: ...


class LibxlHeaderInfo(Protocol):
    """A libxl stream header (``pyxl.stream.libxl.LibxlHeader``)."""

    @property
    def version(self) -> int: ...
    @property
    def options(self) -> int: ...
    @property
    def legacy(self) -> bool: ...
    def to_json(self, offset: int = 0) -> Dict[str, Any]: ...


class ImageHeaderInfo(Protocol):
    """A libxc image header (``pyxl.stream.libxc.ImageHeader``)."""

    @property
    def version(self) -> int: ...
    def to_json(self, offset: int = 0) -> Dict[str, Any]: ...


class DomainHeaderInfo(Protocol):
    """A libxc domain header (``pyxl.stream.libxc.DomainHeader``)."""

    @property
    def guest_type(self) -> int: ...
    @property
    def type_name(self) -> str: ...
    @property
    def xen_major(self) -> int: ...
    @property
    def xen_minor(self) -> int: ...
    @property
    def legacy_converted(self) -> bool: ...
    def to_json(self) -> Dict[str, Any]: ...


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
    xl_header: Optional[XlHeaderInfo] = None
    libxl_header: Optional[LibxlHeaderInfo] = None
    libxl_offset: Optional[int] = None
    libxc_header: Optional[ImageHeaderInfo] = None
    libxc_offset: Optional[int] = None
    domain_header: Optional[DomainHeaderInfo] = None
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
    #: ``inspect --verify``: what Xen tolerates but neither xl nor pyxl ever
    #: writes (reserved bits, padding, bytes after END, ...) is refused: in an
    #: image on disk it is a sign of corruption, reported at its offset
    strict: bool = False

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

    def warn(self, offset: int, text: str, suspect: bool = True) -> None:
        """Note what Xen accepts anyway; ``suspect``: never written by a
        writer of these streams (``strict`` refuses it)."""
        if self.strict and suspect:
            raise StreamError(offset, f"{text}: refused by --verify (never written by xl or "
                              "pyxl: a sign of corruption)", "verify")
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
