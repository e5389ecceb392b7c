"""The libxc migration stream (image version 2/3), Xen 4.17: constants,
headers and record writers.

Layout (Xen's ``docs/specs/libxc-migration-stream.pandoc``, sections
"Headers" -- "Image Header", "Domain Header" -- and "Records")::

    image header   24 bytes, big endian: marker ff*8, "XENF", version, options
    domain header  16 bytes: type (1 PV, 2 HVM), page_shift 12, xen version
    records        u32 type, u32 length, body, zero padding to 8 -- until END

The image header is 24 bytes and the domain header 16, and every record is
padded to a multiple of 8, so **a whole libxc stream is always a multiple of
8 bytes long**.  libxl relies on that: the records it writes after the
helper's libxc stream stay 8-aligned relative to the start of the libxl
stream without any extra padding (see ``pyxl.stream.libxl.libxl_trailer``).

Headers
    :func:`parse_image_header` and :func:`parse_domain_header` check the two
    headers as libxc's ``read_headers`` does (the spec's "Image Header" and
    "Domain Header"; version 3 and STATIC_DATA_END: "Compatibility with older
    versions").

Writers
    Small functions returning bytes (``image_header()``, ``domain_header()``,
    ``libxc_record()``, ``page_data()``, ...).  The real stream is written by
    the save helper; these exist for tests, fakes and tools.  They zero every
    reserved field and all padding, so Debian's strict verifier and Xen's
    lenient reader agree on their output.

The record-by-record rules live in :mod:`pyxl.stream.libxc_scan`.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import (Any, Callable, Dict, Iterable, Mapping, Optional, Sequence, Tuple,
                    Union)

from pyxl.stream.framing import StreamError, TruncatedStream, frame_record

__all__ = [
    "IHDR_MARKER", "IHDR_ID", "IHDR_VERSION", "IHDR_VERSIONS", "IHDR_OPT_BIG_ENDIAN",
    "IMAGE_HEADER", "DOMAIN_HEADER", "DHDR_TYPE_X86_PV", "DHDR_TYPE_X86_HVM", "PAGE_SHIFT",
    "PAGE_SIZE", "REC_LENGTH_MAX", "REC_TYPE_OPTIONAL", "LibxcRecordType", "PageType",
    "PAGE_DATA_PFN_MASK", "PAGE_DATA_TYPE_SHIFT", "PAGE_DATA_HEADER", "PAGE_TYPES_WITH_DATA",
    "PAGE_TYPES_VALID", "VCPU_CONTEXT_SIZE", "PV_WIDTH_LEVELS", "TSC_INFO", "HVM_PARAM_ENTRY",
    "ImageHeader", "DomainHeader",
    "record_name", "page_type_name", "guest_type_name",
    "image_header", "domain_header", "libxc_record", "page_data", "pv_info", "p2m_frames",
    "vcpu_record", "tsc_info", "hvm_params", "end_record",
    "parse_image_header", "parse_domain_header",
]

WHERE_HDR = "libxc image header"
WHERE_DHDR = "libxc domain header"
WHERE_REC = "libxc record"

# ---------------------------------------------------------------------------
# Constants (facts from the stream specification)

IHDR_MARKER = 0xFFFFFFFFFFFFFFFF
IHDR_ID = 0x58454E46  # "XENF"
IHDR_VERSION = 3  # written by 4.17; 2 and 3 are read
IHDR_VERSIONS = (2, 3)
IHDR_OPT_BIG_ENDIAN = 0x0001
#: marker u64, id u32, version u32, options u16, reserved u16, reserved u32
IMAGE_HEADER = struct.Struct(">QIIHHI")
#: type u32, page_shift u16, reserved u16, xen_major u32, xen_minor u32
DOMAIN_HEADER = struct.Struct("<IHHII")

DHDR_TYPE_X86_PV = 1
DHDR_TYPE_X86_HVM = 2
PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: the largest record body libxc writes or reads (128 MiB)
REC_LENGTH_MAX = 128 << 20
#: bit 31 of a record type: an unknown record with it set is skipped
REC_TYPE_OPTIONAL = 0x80000000


class LibxcRecordType(enum.IntEnum):
    """libxc record types (the mandatory ones 4.17 knows)."""

    END = 0x00
    PAGE_DATA = 0x01
    X86_PV_INFO = 0x02
    X86_PV_P2M_FRAMES = 0x03
    X86_PV_VCPU_BASIC = 0x04
    X86_PV_VCPU_EXTENDED = 0x05
    X86_PV_VCPU_XSAVE = 0x06
    SHARED_INFO = 0x07
    X86_TSC_INFO = 0x08
    HVM_CONTEXT = 0x09
    HVM_PARAMS = 0x0A
    TOOLSTACK = 0x0B
    X86_PV_VCPU_MSRS = 0x0C
    VERIFY = 0x0D
    CHECKPOINT = 0x0E
    CHECKPOINT_DIRTY_PFN_LIST = 0x0F
    STATIC_DATA_END = 0x10
    X86_CPUID_POLICY = 0x11
    X86_MSR_POLICY = 0x12


class PageType(enum.IntEnum):
    """PAGE_DATA page types: bits 63..60 of a pfn entry."""

    NOTAB = 0x0
    L1TAB = 0x1
    L2TAB = 0x2
    L3TAB = 0x3
    L4TAB = 0x4
    L1TAB_PINNED = 0x9
    L2TAB_PINNED = 0xA
    L3TAB_PINNED = 0xB
    L4TAB_PINNED = 0xC
    BROKEN = 0xD
    XALLOC = 0xE
    XTAB = 0xF


PAGE_DATA_PFN_MASK = (1 << 52) - 1
PAGE_DATA_RESERVED_MASK = 0xFF << 52
PAGE_DATA_TYPE_SHIFT = 60
PAGE_DATA_HEADER = struct.Struct("<II")  # count, reserved
#: page types that are followed by 4096 bytes of data
PAGE_TYPES_WITH_DATA = frozenset({0x0, 0x1, 0x2, 0x3, 0x4, 0x9, 0xA, 0xB, 0xC})
PAGE_TYPES_VALID = PAGE_TYPES_WITH_DATA | {0xD, 0xE, 0xF}

#: size of vcpu_guest_context for a PV guest of this width (bytes)
VCPU_CONTEXT_SIZE = {8: 5168, 4: 2800}
PV_WIDTH_LEVELS = {4: 3, 8: 4}
VCPU_EXTENDED_MAX = 128
VCPU_XSAVE_MIN = 16
VCPU_MSR_ENTRY = 16
CPUID_LEAF_SIZE = 24
MSR_ENTRY_SIZE = 16
TSC_INFO = struct.Struct("<IIQII")  # mode, khz, nsec, incarnation, reserved
HVM_PARAM_ENTRY = struct.Struct("<QQ")


def record_name(rtype: int) -> str:
    """Name of a libxc record type, e.g. ``PAGE_DATA``; unknown types are
    shown as ``UNKNOWN_0x13`` or ``OPTIONAL_0x80000001``."""
    try:
        return LibxcRecordType(rtype).name
    except ValueError:
        kind = "OPTIONAL" if rtype & REC_TYPE_OPTIONAL else "UNKNOWN"
        return f"{kind}_{rtype:#x}"


def page_type_name(ptype: int) -> str:
    try:
        return PageType(ptype).name
    except ValueError:
        return f"INVALID_{ptype:#x}"


def guest_type_name(gtype: int) -> str:
    return {DHDR_TYPE_X86_PV: "x86 PV", DHDR_TYPE_X86_HVM: "x86 HVM"}.get(
        gtype, f"type {gtype}")


# ---------------------------------------------------------------------------
# Headers


@dataclass(frozen=True)
class ImageHeader:
    version: int
    options: int
    reserved: Tuple[int, int] = (0, 0)

    def to_json(self, offset: int = 0) -> Dict[str, Any]:
        return {"offset": offset, "version": self.version, "options": self.options}


@dataclass(frozen=True)
class DomainHeader:
    guest_type: int
    page_shift: int
    xen_major: int
    xen_minor: int
    reserved: int = 0

    @property
    def legacy_converted(self) -> bool:
        """xen_major 0: written by the legacy-stream converter."""
        return self.xen_major == 0

    @property
    def type_name(self) -> str:
        return guest_type_name(self.guest_type)

    def to_json(self) -> Dict[str, Any]:
        return {
            "type": self.guest_type,
            "type_name": self.type_name,
            "page_shift": self.page_shift,
            "xen_major": self.xen_major,
            "xen_minor": self.xen_minor,
            "legacy_converted": self.legacy_converted,
        }


def parse_image_header(data: bytes, offset: int = 0,
                       warn: Optional[Callable[[int, str], None]] = None) -> ImageHeader:
    """Check a 24-byte image header as libxc's ``read_headers`` does."""
    if len(data) < IMAGE_HEADER.size:
        raise TruncatedStream(offset + len(data), "image header is 24 bytes", WHERE_HDR)
    marker, ident, version, options, res1, res2 = IMAGE_HEADER.unpack_from(data)
    if marker != IHDR_MARKER:
        raise StreamError(offset, f"marker {marker:#018x} != 0xffffffffffffffff", WHERE_HDR)
    if ident != IHDR_ID:
        raise StreamError(offset, f"id {ident:#010x} != 0x58454e46 (\"XENF\")", WHERE_HDR)
    if version not in IHDR_VERSIONS:
        raise StreamError(offset, f"version {version} not in 2..3", WHERE_HDR)
    if options & IHDR_OPT_BIG_ENDIAN:
        raise StreamError(offset, "options bit 0 set: big-endian streams are refused", WHERE_HDR)
    if warn is not None and (options & ~IHDR_OPT_BIG_ENDIAN or res1 or res2):
        warn(offset, "reserved image header bits are non-zero (libxc ignores them)")
    return ImageHeader(version, options, (res1, res2))


def parse_domain_header(data: bytes, offset: int = 0,
                        warn: Optional[Callable[[int, str], None]] = None,
                        expected_type: Optional[int] = None) -> DomainHeader:
    """Check a 16-byte domain header (type, page size)."""
    if len(data) < DOMAIN_HEADER.size:
        raise TruncatedStream(offset + len(data), "domain header is 16 bytes", WHERE_DHDR)
    gtype, page_shift, reserved, major, minor = DOMAIN_HEADER.unpack_from(data)
    if gtype not in (DHDR_TYPE_X86_PV, DHDR_TYPE_X86_HVM):
        raise StreamError(offset, f"type {gtype} is neither x86 PV (1) nor x86 HVM (2)",
                          WHERE_DHDR)
    if page_shift != PAGE_SHIFT:
        raise StreamError(offset, f"page_shift {page_shift} != 12 (4096-byte pages)", WHERE_DHDR)
    if expected_type is not None and gtype != expected_type:
        raise StreamError(offset, f"{guest_type_name(gtype)} stream cannot be restored into "
                          f"the {guest_type_name(expected_type)} domain its config describes",
                          WHERE_DHDR)
    if warn is not None and reserved:
        warn(offset, "reserved domain header field is non-zero (libxc ignores it)")
    return DomainHeader(gtype, page_shift, major, minor, reserved)


# ---------------------------------------------------------------------------
# Writers


def image_header(version: int = IHDR_VERSION, options: int = 0) -> bytes:
    """The 24-byte image header (big endian)."""
    return IMAGE_HEADER.pack(IHDR_MARKER, IHDR_ID, version, options, 0, 0)


def domain_header(guest_type: int, xen_major: int = 4, xen_minor: int = 17,
                  page_shift: int = PAGE_SHIFT) -> bytes:
    """The 16-byte domain header."""
    return DOMAIN_HEADER.pack(guest_type, page_shift, 0, xen_major, xen_minor)


def libxc_record(rtype: int, body: bytes = b"") -> bytes:
    """One libxc record, padded with zeros to 8 bytes."""
    if len(body) > REC_LENGTH_MAX:
        raise ValueError(f"libxc record body of {len(body)} bytes exceeds 128 MiB")
    return frame_record(rtype, body)


def end_record() -> bytes:
    return libxc_record(LibxcRecordType.END)


def page_data(entries: Sequence[Tuple[int, int]], pages: Union[bytes, Sequence[bytes]]) -> bytes:
    """A PAGE_DATA record.

    ``entries`` is a list of ``(pfn, page_type)``; ``pages`` holds one
    4096-byte page per entry whose type carries data, in entry order.
    """
    if not entries:
        raise ValueError("PAGE_DATA needs at least one pfn")
    blob = pages if isinstance(pages, (bytes, bytearray)) else b"".join(pages)
    want = sum(1 for _, t in entries if t in PAGE_TYPES_WITH_DATA)
    if len(blob) != want * PAGE_SIZE:
        raise ValueError(f"{want} entries carry data but {len(blob)} bytes of pages given")
    words = []
    for pfn, ptype in entries:
        if not 0 <= pfn <= PAGE_DATA_PFN_MASK or ptype not in PAGE_TYPES_VALID:
            raise ValueError(f"bad PAGE_DATA entry pfn {pfn:#x} type {ptype:#x}")
        words.append(pfn | (ptype << PAGE_DATA_TYPE_SHIFT))
    body = PAGE_DATA_HEADER.pack(len(entries), 0) + struct.pack(f"<{len(words)}Q", *words)
    return libxc_record(LibxcRecordType.PAGE_DATA, body + bytes(blob))


def pv_info(guest_width: int = 8, pt_levels: int = 4) -> bytes:
    return libxc_record(LibxcRecordType.X86_PV_INFO,
                        struct.pack("<BB6x", guest_width, pt_levels))


def p2m_frames(start_pfn: int, end_pfn: int, frame_pfns: Sequence[int]) -> bytes:
    body = struct.pack("<II", start_pfn, end_pfn) + struct.pack(
        f"<{len(frame_pfns)}Q", *frame_pfns)
    return libxc_record(LibxcRecordType.X86_PV_P2M_FRAMES, body)


def vcpu_record(rtype: int, vcpu_id: int, blob: bytes) -> bytes:
    """X86_PV_VCPU_{BASIC,EXTENDED,XSAVE,MSRS}: ``u32 vcpu_id, u32 0, blob``."""
    return libxc_record(rtype, struct.pack("<II", vcpu_id, 0) + blob)


def tsc_info(mode: int = 0, khz: int = 0, nsec: int = 0, incarnation: int = 0) -> bytes:
    return libxc_record(LibxcRecordType.X86_TSC_INFO,
                        TSC_INFO.pack(mode, khz, nsec, incarnation, 0))


def hvm_params(params: Union[Mapping[int, int], Iterable[Tuple[int, int]]]) -> bytes:
    items = list(params.items()) if isinstance(params, Mapping) else list(params)
    body = struct.pack("<II", len(items), 0) + b"".join(
        HVM_PARAM_ENTRY.pack(i, v) for i, v in items)
    return libxc_record(LibxcRecordType.HVM_PARAMS, body)

