"""The libxc stream scanner: :class:`LibxcScanner` walks one libxc stream
on a :class:`~pyxl.stream.framing.Source` and records it into a
:class:`~pyxl.stream.report.StreamReport`.

It applies the rules of Xen 4.17's ``xc_domain_restore`` (Xen's
``docs/specs/libxc-migration-stream.pandoc``: section "Records" and its
per-record subsections; ordering in "Layout" and "Compatibility with older
versions"), both the per-record size checks *and* the ordering rules that
Debian's ``verify-stream-v2`` does not keep state for:

* headers: marker, id, version 2..3, little endian; domain type 1 or 2
  (and, when known from the xl config, the type the domain was built
  as), page_shift 12;
* every record: length <= 128 MiB (``REC_LENGTH_MAX``), and for files,
  no longer than what is left of the file -- checked before reading;
* PAGE_DATA: count >= 1, length >= 8+8*count, page types valid (5-8
  refused), PV pfns within the maximum set by X86_PV_P2M_FRAMES, and
  length exactly 8 + 8*count + 4096*(entries with data);
* STATIC_DATA_END at most once and, in v3, before PAGE_DATA and
  X86_PV_P2M_FRAMES (v2: inferred at the first of those, as libxc does);
* PV: X86_PV_INFO once (width/levels 4/3 or 8/4), before P2M_FRAMES and
  SHARED_INFO; P2M_FRAMES size; vCPU record sizes; vCPU0 BASIC present
  at END;
* HVM: TSC_INFO exactly 24, HVM_PARAMS exactly 8+16*count, HVM_CONTEXT
  non-empty and present at END, CPUID/MSR policy sizes;
* CHECKPOINT only in checkpointed streams; unknown optional records
  skipped (with a warning), unknown mandatory records refused, records of
  the other guest type refused (libxc's "not handled");
* END.

Accepted like libxc does, with a warning in the report (the verifier
rejects these): non-zero reserved fields and pfn bits 52-59, non-zero
padding, a body on END, STATIC_DATA_END in a v2 stream, unknown optional
records, and HVM_PARAMS before or after HVM_CONTEXT.

pyxl is stricter than libxc in three places, each because the restore
would fail later anyway: a PV stream must contain X86_PV_INFO and
X86_PV_P2M_FRAMES, PV PAGE_DATA must follow a P2M_FRAMES record, and an
HVM stream must carry HVM_CONTEXT (Xen refuses an empty context).
"""

from __future__ import annotations

import array
import struct
import sys
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from pyxl.stream.framing import (REC_HEADER, Source, StreamError, TruncatedStream, pad_len,
                                 roundup8)
from pyxl.stream.libxc import (CPUID_LEAF_SIZE, DHDR_TYPE_X86_PV, DOMAIN_HEADER,
                               HVM_PARAM_ENTRY, IMAGE_HEADER, MSR_ENTRY_SIZE, PAGE_DATA_HEADER,
                               PAGE_DATA_PFN_MASK, PAGE_SIZE, PAGE_TYPES_VALID,
                               PAGE_TYPES_WITH_DATA, PV_WIDTH_LEVELS, REC_LENGTH_MAX,
                               REC_TYPE_OPTIONAL, TSC_INFO, VCPU_CONTEXT_SIZE, VCPU_EXTENDED_MAX,
                               VCPU_MSR_ENTRY, VCPU_XSAVE_MIN, WHERE_DHDR, WHERE_HDR, WHERE_REC,
                               DomainHeader, LibxcRecordType, guest_type_name, page_type_name,
                               parse_domain_header, parse_image_header, record_name)
from pyxl.stream.report import RecordInfo, Scanner, StreamReport

__all__ = ["LibxcScanner", "scan_libxc_on"]

#: byte translation tables for checking pfn words a chunk at a time
_TYPE_OF_TOP = bytes(b >> 4 for b in range(256))
_LOW_NIBBLE = bytes(b & 0x0F for b in range(256))
_HIGH_NIBBLE = bytes(b & 0xF0 for b in range(256))
#: the scanner reads HVM_PARAMS entries into the report only up to this many
_HVM_PARAMS_SHOWN = 32
#: pfn words read per chunk while checking a PAGE_DATA record
_PFN_CHUNK = 8192

_PV_ONLY = frozenset({
    LibxcRecordType.X86_PV_INFO, LibxcRecordType.X86_PV_P2M_FRAMES,
    LibxcRecordType.X86_PV_VCPU_BASIC, LibxcRecordType.X86_PV_VCPU_EXTENDED,
    LibxcRecordType.X86_PV_VCPU_XSAVE, LibxcRecordType.X86_PV_VCPU_MSRS,
    LibxcRecordType.SHARED_INFO,
})
#: Xen's HVM save-record descriptor inside HVM_CONTEXT (xen/include/public/hvm/save.h).
HVM_SAVE_DESC = struct.Struct("<HHI")
HVM_SAVE_LAPIC = 5
LAPIC_SIZE_417, LAPIC_SIZE_420_1 = 24, 32
#: HVM_CONTEXT bodies up to this size are walked (real ones: a few KiB per vCPU).
_HVM_CONTEXT_WALKED = 1 << 20
_HVM_ONLY = frozenset({LibxcRecordType.HVM_CONTEXT, LibxcRecordType.HVM_PARAMS})


class _Body:
    """Bounded access to one record body; finish() skips the rest and the
    padding (checking the padding only to warn about it)."""

    def __init__(self, src: Source, offset: int, length: int, name: str, where: str) -> None:
        self.src = src
        self.offset = offset
        self.length = length
        self.name = name
        self.where = where
        self.used = 0

    @property
    def left(self) -> int:
        return self.length - self.used

    def read(self, n: int) -> bytes:
        if n > self.left:  # pragma: no cover - handlers check lengths first
            raise AssertionError(f"{self.name}: read past end of body")
        data = self.src.read(n, f"{self.name} body", self.where, self.offset)
        self.used += n
        return data

    def finish(self) -> bool:
        """Skip what the handler did not read; True if the padding is zero."""
        if self.left:
            self.src.skip(self.left, f"{self.name} body", self.where, self.offset)
            self.used = self.length
        pad = pad_len(self.length)
        if pad:
            return not any(self.src.read(pad, f"{self.name} padding", self.where, self.offset))
        return True


@dataclass
class _State:
    version: int
    guest_type: int
    checkpointed: bool
    max_vcpus: Optional[int]
    seen_static_data_end: bool = False
    static_data_inferred: bool = False
    seen_pv_info: bool = False
    pv_width: int = 8  # the native width of a new PV domain until X86_PV_INFO
    pv_max_pfn: Optional[int] = None
    seen_p2m_frames: bool = False
    vcpu0_basic: bool = False
    seen_hvm_context: bool = False
    verify: bool = False
    seen_cpuid: bool = False
    seen_msr: bool = False


class LibxcScanner(Scanner):
    """Walks one libxc stream on a :class:`Source`, recording into a
    :class:`StreamReport`.  Raises :class:`StreamError` at the first broken
    rule; the caller (``scan_*``) stores it in the report.

    ``run()`` returns ``"end"`` after END, or ``"checkpoint"`` after a
    CHECKPOINT record in a checkpointed stream -- the next round's records
    follow without a new header (in a libxl stream, after the libxl
    checkpoint records), so call ``run()`` again to continue.
    """

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.st: Optional[_State] = None
        self._pending_pages: Optional[Tuple[Dict[str, int], int, int]] = None

    # -- headers --------------------------------------------------------

    def read_headers(self) -> DomainHeader:
        src, rep = self.src, self.report
        off = src.pos
        ihdr = parse_image_header(src.read(IMAGE_HEADER.size, "image header", WHERE_HDR),
                                  off, rep.warn)
        rep.libxc_header, rep.libxc_offset = ihdr, off
        off = src.pos
        dhdr = parse_domain_header(src.read(DOMAIN_HEADER.size, "domain header", WHERE_DHDR),
                                   off, rep.warn, self.expected_guest_type)
        rep.domain_header = dhdr
        self.st = _State(ihdr.version, dhdr.guest_type, self.checkpointed, self.max_vcpus)
        return dhdr

    # -- records --------------------------------------------------------

    def run(self) -> str:
        """Read records until END (``"end"``) or CHECKPOINT (``"checkpoint"``)."""
        if self.st is None:
            self.read_headers()
        while True:
            rtype = self.read_record()
            if rtype == LibxcRecordType.END:
                return "end"
            if rtype == LibxcRecordType.CHECKPOINT:
                return "checkpoint"

    def read_record(self) -> int:
        st = self.st
        assert st is not None, "read_headers() first"
        src = self.src
        off = src.pos
        if src.at_eof():
            raise TruncatedStream(off, "stream ends at a record boundary before END", WHERE_REC)
        rtype: int
        length: int
        rtype, length = REC_HEADER.unpack(src.read(REC_HEADER.size, "record header", WHERE_REC))
        name = record_name(rtype)
        if length > REC_LENGTH_MAX:
            raise StreamError(off, f"{name} length {length:#x} exceeds the 128 MiB record limit",
                              WHERE_REC)
        src.need(roundup8(length), f"{name} body", WHERE_REC, off)
        body = _Body(src, off, length, name, WHERE_REC)
        self._pending_pages = None
        detail = self._dispatch(st, rtype, body)
        if not body.finish():
            self.report.warn(off, f"{name} padding is non-zero (libxc ignores it)")
        pfns = with_data = 0
        if self._pending_pages is not None:
            named, pfns, with_data = self._pending_pages
            self.report.pages.add(named, with_data)
        self.report.add_record(RecordInfo("libxc", rtype, name, off, length, detail,
                                          pfns, with_data))
        return rtype

    def _fail(self, body: _Body, reason: str) -> StreamError:
        return StreamError(body.offset, reason, WHERE_REC)

    def _dispatch(self, st: _State, rtype: int, body: _Body) -> str:
        T = LibxcRecordType
        # Record types handled by the common restore loop, for both guests.
        if rtype == T.END:
            return self._end(st, body)
        if rtype == T.PAGE_DATA:
            return self._page_data(st, body)
        if rtype == T.VERIFY:
            st.verify = True
            return "verify mode: later pages are compared, not written"
        if rtype == T.CHECKPOINT:
            if not st.checkpointed:
                raise self._fail(body, "CHECKPOINT in a non-checkpointed stream (a Remus "
                                       "stream? inspect --checkpointed reads one)")
            self.report.checkpoints += 1
            return f"checkpoint {self.report.checkpoints}"
        if rtype == T.STATIC_DATA_END:
            return self._static_data_end(st, body)
        # Per-guest-type records.
        pv = st.guest_type == DHDR_TYPE_X86_PV
        handled = rtype in (T.X86_TSC_INFO, T.X86_CPUID_POLICY, T.X86_MSR_POLICY) or (
            rtype in _PV_ONLY if pv else rtype in _HVM_ONLY)
        if not handled:
            if rtype & REC_TYPE_OPTIONAL:
                self.report.warn(body.offset, f"unknown optional record {rtype:#x} skipped")
                return "unknown optional record, skipped"
            raise self._fail(body, f"mandatory record {rtype:#x} ({body.name}) is not handled "
                             f"in an {guest_type_name(st.guest_type)} stream")
        handler = _HANDLERS[rtype]
        return handler(self, st, body)

    # -- common records -------------------------------------------------

    def _end(self, st: _State, body: _Body) -> str:
        if body.length:
            self.report.warn(body.offset, f"END has a {body.length}-byte body (libxc ignores it)")
        if st.guest_type == DHDR_TYPE_X86_PV:
            if not st.seen_pv_info:
                raise self._fail(body, "PV stream ended without an X86_PV_INFO record")
            if not st.seen_p2m_frames:
                raise self._fail(body, "PV stream ended without an X86_PV_P2M_FRAMES record")
            if not st.vcpu0_basic:
                raise self._fail(body, "PV stream ended without vcpu0's X86_PV_VCPU_BASIC record")
        elif not st.seen_hvm_context:
            raise self._fail(body, "HVM stream ended without an HVM_CONTEXT record "
                             "(Xen refuses an empty HVM context)")
        if not st.seen_static_data_end:
            self.report.warn(body.offset, "stream ended without STATIC_DATA_END "
                             "(the CPUID/MSR policy is never applied)", suspect=False)
        return ""

    def _infer_static_data_end(self, st: _State, body: _Body, what: str) -> None:
        if st.version < 3 and not st.seen_static_data_end:
            st.seen_static_data_end = True
            st.static_data_inferred = True
        if not st.seen_static_data_end:
            raise self._fail(body, f"{what} before STATIC_DATA_END (required in a v3 stream)")

    def _static_data_end(self, st: _State, body: _Body) -> str:
        if st.seen_static_data_end:
            if st.static_data_inferred:
                raise self._fail(body, "STATIC_DATA_END after libxc inferred it at the first "
                                 "PAGE_DATA/X86_PV_P2M_FRAMES of this v2 stream")
            raise self._fail(body, "second STATIC_DATA_END")
        st.seen_static_data_end = True
        if st.version < 3:
            self.report.warn(body.offset, "STATIC_DATA_END in a v2 stream (libxc accepts it)")
        missing = []
        if not st.seen_cpuid:
            missing.append("CPUID")
        if not st.seen_msr:
            missing.append("MSR")
        return f"policy missing: {', '.join(missing)}" if missing else ""

    def _page_data(self, st: _State, body: _Body) -> str:
        self._infer_static_data_end(st, body, "PAGE_DATA")
        length = body.length
        if length < PAGE_DATA_HEADER.size:
            raise self._fail(body, f"PAGE_DATA length {length} < 8 (no room for count)")
        count, reserved = PAGE_DATA_HEADER.unpack(body.read(PAGE_DATA_HEADER.size))
        if count < 1:
            raise self._fail(body, "PAGE_DATA count 0 (at least 1 pfn required)")
        if length < 8 + 8 * count:
            raise self._fail(body, f"PAGE_DATA length {length} too short for {count} pfns "
                             f"(< 8+8*{count})")
        if reserved:
            self.report.warn(body.offset, "PAGE_DATA reserved field is non-zero")
        pv = st.guest_type == DHDR_TYPE_X86_PV
        by_type: Dict[int, int] = {}
        reserved_bits = False
        index = 0
        while index < count:
            n = min(_PFN_CHUNK, count - index)
            raw = body.read(8 * n)
            reserved_bits |= self._check_pfns(st, body, raw, index, pv, by_type)
            index += n
        with_data = sum(n for t, n in by_type.items() if t in PAGE_TYPES_WITH_DATA)
        expected = 8 + 8 * count + PAGE_SIZE * with_data
        if length != expected:
            raise self._fail(body, f"PAGE_DATA length {length} != 8+8*{count}+4096*{with_data}")
        if reserved_bits:
            self.report.warn(body.offset, "PAGE_DATA pfn bits 52-59 are non-zero "
                             "(libxc ignores them)")
        named = {page_type_name(t): n for t, n in sorted(by_type.items())}
        self._pending_pages = (named, count, with_data)  # counted once the record is whole
        parts = ", ".join(f"{k} {v}" for k, v in named.items())
        return f"{count} pfns, {with_data} with data ({parts})"

    def _check_pfns(self, st: _State, body: _Body, raw: bytes, first: int, pv: bool,
                    by_type: Dict[int, int]) -> bool:
        """Check a run of little-endian pfn words starting at entry ``first``;
        add to ``by_type``; return True if reserved bits 52-59 are set.

        Works on byte slices rather than per-entry Python loops (a 128 MiB
        PAGE_DATA record holds 16M entries): byte 7 of each word holds the
        type nibble and pfn bits 56-59, byte 6 bits 48-55.  When several
        entries are bad, the first one is reported, and for one entry a bad
        pfn before a bad type -- libxc's order.
        """
        n = len(raw) // 8
        top = raw[7::8]
        types = top.translate(_TYPE_OF_TOP)
        counts = {t: types.count(t) for t in range(16)}
        bad_type = min((types.index(t) for t, c in counts.items() if c and t not in PAGE_TYPES_VALID),
                       default=n)
        bad_pfn = n
        pfns = array.array("Q")
        low6 = raw[6::8]
        if pv:
            # Compare pfns (bits 0-51) with the maximum set by P2M_FRAMES.
            masked = bytearray(raw)
            masked[7::8] = bytes(n)
            masked[6::8] = low6.translate(_LOW_NIBBLE)
            pfns.frombytes(bytes(masked))
            if sys.byteorder == "big":  # pragma: no cover - x86 is little endian
                pfns.byteswap()
            max_pfn = st.pv_max_pfn
            if max_pfn is None:
                bad_pfn = 0
            elif max(pfns) > max_pfn:
                bad_pfn = next(j for j, p in enumerate(pfns) if p > max_pfn)
        if bad_pfn < n and bad_pfn <= bad_type:
            pfn, i = pfns[bad_pfn], first + bad_pfn
            if st.pv_max_pfn is None:
                raise self._fail(body, f"PAGE_DATA pfn {pfn:#x} (index {i}) before any "
                                 "X86_PV_P2M_FRAMES record set the domain maximum")
            raise self._fail(body, f"PAGE_DATA pfn {pfn:#x} (index {i}) outside the domain "
                             f"maximum {st.pv_max_pfn:#x}")
        if bad_type < n:
            word = struct.unpack_from("<Q", raw, 8 * bad_type)[0]
            raise self._fail(body, f"PAGE_DATA pfn {word & PAGE_DATA_PFN_MASK:#x} (index "
                             f"{first + bad_type}) has invalid page type {word >> 60:#x}")
        for t, c in counts.items():
            if c:
                by_type[t] = by_type.get(t, 0) + c
        return (top.translate(_LOW_NIBBLE).count(0) != n
                or low6.translate(_HIGH_NIBBLE).count(0) != n)

    # -- x86 records (both guest types) ----------------------------------

    def _tsc_info(self, st: _State, body: _Body) -> str:
        if body.length != TSC_INFO.size:
            raise self._fail(body, f"X86_TSC_INFO length {body.length} != 24")
        mode, khz, nsec, incarnation, _ = TSC_INFO.unpack(body.read(TSC_INFO.size))
        return f"mode {mode}, {khz} kHz, {nsec} ns, incarnation {incarnation}"

    def _cpuid(self, st: _State, body: _Body) -> str:
        if body.length == 0 or body.length % CPUID_LEAF_SIZE:
            raise self._fail(body, f"X86_CPUID_POLICY length {body.length} is not a non-zero "
                             "multiple of 24")
        st.seen_cpuid = True
        return f"{body.length // CPUID_LEAF_SIZE} leaves"

    def _msr(self, st: _State, body: _Body) -> str:
        if body.length == 0 or body.length % MSR_ENTRY_SIZE:
            raise self._fail(body, f"X86_MSR_POLICY length {body.length} is not a non-zero "
                             "multiple of 16")
        st.seen_msr = True
        return f"{body.length // MSR_ENTRY_SIZE} MSRs"

    # -- HVM ---------------------------------------------------------------

    def _hvm_context(self, st: _State, body: _Body) -> str:
        if body.length == 0:
            raise self._fail(body, "HVM_CONTEXT is empty")
        st.seen_hvm_context = True
        if body.length > _HVM_CONTEXT_WALKED:
            return ""
        return self._hvm_save_records(body.offset, body.read(body.length))

    def _hvm_save_records(self, offset: int, blob: bytes) -> str:
        """Walk Xen's save records inside HVM_CONTEXT (descriptor: u16 type,
        u16 instance, u32 length) for what they say of the Xen that wrote them:
        the LAPIC record (type 5) grew from 24 to 32 bytes in Xen 4.20.1
        (``pending_esr``), which 4.20 loads either way and 4.17 refuses."""
        pos, records, lapic = 0, 0, set()
        while pos + HVM_SAVE_DESC.size <= len(blob):
            code, _inst, length = HVM_SAVE_DESC.unpack_from(blob, pos)
            pos += HVM_SAVE_DESC.size + length
            if pos > len(blob):
                break            # Xen checks the framing; inspect only reports
            records += 1
            if code == 0:        # END
                break
            if code == HVM_SAVE_LAPIC:
                lapic.add(length)
        detail = f"{records} save records"
        if LAPIC_SIZE_420_1 in lapic:
            self.report.warn(offset, "written by Xen 4.20.1 or later (its LAPIC save record is "
                             f"{LAPIC_SIZE_420_1} bytes): Xen 4.17 cannot restore it",
                             suspect=False)
            return f"{detail}; LAPIC {LAPIC_SIZE_420_1} bytes: Xen 4.20.1 or later"
        if LAPIC_SIZE_417 in lapic:
            return f"{detail}; LAPIC {LAPIC_SIZE_417} bytes: Xen 4.17 to 4.20.0"
        return detail

    def _hvm_params(self, st: _State, body: _Body) -> str:
        if body.length < 8:
            raise self._fail(body, f"HVM_PARAMS length {body.length} < 8 (no room for count)")
        count, _ = struct.unpack("<II", body.read(8))
        if body.length != 8 + HVM_PARAM_ENTRY.size * count:
            raise self._fail(body, f"HVM_PARAMS length {body.length} != 8+16*{count}")
        if count == 0:
            return "empty, ignored"
        if count > _HVM_PARAMS_SHOWN:
            return f"{count} params"
        raw = body.read(HVM_PARAM_ENTRY.size * count)
        shown = " ".join(f"[{i}]={v:#x}" for i, v in HVM_PARAM_ENTRY.iter_unpack(raw))
        return f"{count} params: {shown}"

    # -- PV ----------------------------------------------------------------

    def _pv_info(self, st: _State, body: _Body) -> str:
        if st.seen_pv_info:
            raise self._fail(body, "second X86_PV_INFO")
        if body.length < 8:
            raise self._fail(body, f"X86_PV_INFO length {body.length} < 8")
        width, levels, *reserved = struct.unpack("<BB6B", body.read(8))
        if PV_WIDTH_LEVELS.get(width) != levels:
            raise self._fail(body, f"X86_PV_INFO guest_width {width} with pt_levels {levels} "
                             "(valid: 4 with 3, 8 with 4)")
        if any(reserved):
            self.report.warn(body.offset, "X86_PV_INFO reserved bytes are non-zero")
        st.seen_pv_info = True
        st.pv_width = width
        return f"{width * 8}-bit guest, {levels} levels"

    def _p2m_frames(self, st: _State, body: _Body) -> str:
        self._infer_static_data_end(st, body, "X86_PV_P2M_FRAMES")
        if not st.seen_pv_info:
            raise self._fail(body, "X86_PV_P2M_FRAMES before X86_PV_INFO")
        if body.length < 8:
            raise self._fail(body, f"X86_PV_P2M_FRAMES length {body.length} < 8")
        start, end = struct.unpack("<II", body.read(8))
        if start > end:
            raise self._fail(body, f"X86_PV_P2M_FRAMES start_pfn {start:#x} > end_pfn {end:#x}")
        fpp = PAGE_SIZE // st.pv_width
        frames = end // fpp - start // fpp + 1
        if body.length != 8 + 8 * frames:
            raise self._fail(body, f"X86_PV_P2M_FRAMES length {body.length} != 8+8*{frames} "
                             f"for pfns {start:#x}..{end:#x}")
        st.seen_p2m_frames = True
        if st.pv_max_pfn is None or end > st.pv_max_pfn:
            st.pv_max_pfn = end
        return f"pfns {start:#x}..{end:#x}, {frames} frames"

    def _vcpu(self, st: _State, body: _Body) -> str:
        T = LibxcRecordType
        name = body.name
        if body.length < 8:
            raise self._fail(body, f"{name} length {body.length} < 8 (no room for vcpu_id)")
        vcpu_id, _ = struct.unpack("<II", body.read(8))
        blob = body.length - 8
        if blob == 0:
            return f"vcpu {vcpu_id}, empty, ignored"
        if st.max_vcpus is not None and vcpu_id >= st.max_vcpus:
            raise self._fail(body, f"{name} vcpu_id {vcpu_id} >= the config's max_vcpus "
                             f"{st.max_vcpus}")
        rtype = LibxcRecordType[name]
        if rtype == T.X86_PV_VCPU_BASIC:
            want = VCPU_CONTEXT_SIZE[st.pv_width]
            if blob != want:
                raise self._fail(body, f"{name} context is {blob} bytes, a {st.pv_width * 8}-bit "
                                 f"guest's is {want}")
            if vcpu_id == 0:
                st.vcpu0_basic = True
        elif rtype == T.X86_PV_VCPU_EXTENDED and blob > VCPU_EXTENDED_MAX:
            raise self._fail(body, f"{name} blob is {blob} bytes (max 128)")
        elif rtype == T.X86_PV_VCPU_XSAVE and blob < VCPU_XSAVE_MIN:
            raise self._fail(body, f"{name} blob is {blob} bytes (min 16)")
        elif rtype == T.X86_PV_VCPU_MSRS and blob % VCPU_MSR_ENTRY:
            raise self._fail(body, f"{name} blob is {blob} bytes (not a multiple of 16)")
        return f"vcpu {vcpu_id}, {blob} bytes"

    def _shared_info(self, st: _State, body: _Body) -> str:
        if not st.seen_pv_info:
            raise self._fail(body, "SHARED_INFO before X86_PV_INFO")
        if body.length != PAGE_SIZE:
            raise self._fail(body, f"SHARED_INFO length {body.length} != 4096")
        return ""


_Handler = Callable[[LibxcScanner, _State, _Body], str]
_HANDLERS: Dict[int, _Handler] = {
    LibxcRecordType.X86_TSC_INFO: LibxcScanner._tsc_info,
    LibxcRecordType.X86_CPUID_POLICY: LibxcScanner._cpuid,
    LibxcRecordType.X86_MSR_POLICY: LibxcScanner._msr,
    LibxcRecordType.HVM_CONTEXT: LibxcScanner._hvm_context,
    LibxcRecordType.HVM_PARAMS: LibxcScanner._hvm_params,
    LibxcRecordType.X86_PV_INFO: LibxcScanner._pv_info,
    LibxcRecordType.X86_PV_P2M_FRAMES: LibxcScanner._p2m_frames,
    LibxcRecordType.X86_PV_VCPU_BASIC: LibxcScanner._vcpu,
    LibxcRecordType.X86_PV_VCPU_EXTENDED: LibxcScanner._vcpu,
    LibxcRecordType.X86_PV_VCPU_XSAVE: LibxcScanner._vcpu,
    LibxcRecordType.X86_PV_VCPU_MSRS: LibxcScanner._vcpu,
    LibxcRecordType.SHARED_INFO: LibxcScanner._shared_info,
}


def scan_libxc_on(src: Source, report: StreamReport, *, checkpointed: bool = False) -> None:
    """Scan a bare libxc stream from ``src`` into ``report`` (raises
    StreamError).  In a checkpointed stream, EOF right after a CHECKPOINT
    is the normal end (the sender stopped; the receiver fails over to the
    last checkpoint)."""
    report.checkpointed = checkpointed
    scanner = LibxcScanner(src, report, checkpointed=checkpointed)
    scanner.read_headers()
    while True:
        if scanner.run() == "end":
            report.end_offset = src.pos
            return
        if src.at_eof():
            report.end_offset = src.pos
            return
