"""Broken streams: every rule gives a typed error at the right offset, what
libxc accepts is accepted, and no input hangs, crashes or allocates big."""

from __future__ import annotations

import io
import os
import struct
import tracemalloc
from typing import Any, Callable, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyxl.stream import libxc as xc
from pyxl.stream import libxl as xl2
from pyxl.stream import xl as xl1
from pyxl.stream.framing import StreamError, TruncatedStream, UnsupportedStream
from pyxl.stream.report import StreamReport
from pyxl.stream.libxc import LibxcRecordType as T
from pyxl.stream.libxc import PageType as P
from pyxl.stream.libxl import LibxlRecordType as L
from pyxl import streamio

from stream_support import (HVM_CONFIG, PV_CONFIG, boundaries, hvm_chunks, hvm_stream,
                                 libxl_chunks, page, pv_chunks, pv_stream, rec, scan, scan_pipe,
                                 xl_chunks)

# Chunk indexes in hvm_chunks() (v3): headers, CPUID, MSR, SDE, PD, PD, TSC, CTX, PARAMS, END
H_HDR, H_CPUID, H_MSR, H_SDE, H_PD1, H_PD2, H_TSC, H_CTX, H_PARAMS, H_END = range(10)
# pv_chunks() (v3): headers, PV_INFO, CPUID, MSR, SDE, P2M, PD, PD(XTAB), TSC, SHINFO, BASIC, END
(V_HDR, V_INFO, V_CPUID, V_MSR, V_SDE, V_P2M, V_PD1, V_PD2, V_TSC, V_SHINFO, V_BASIC,
 V_END) = range(12)

Chunks = List[bytes]


def refused(chunks: Chunks, culprit: int, match: str, exc: type = StreamError,
            **kw: Any) -> StreamReport:
    """Scan; assert the first error is ``exc`` at the start of chunk
    ``culprit`` and mentions ``match``."""
    report = scan(b"".join(chunks), **kw)
    err = report.error
    assert isinstance(err, exc) and err is not None, (err, match)
    assert match in err.reason, err
    assert err.offset == boundaries(chunks)[culprit], err
    return report


def accepted(chunks: Chunks, warning: Optional[str] = None, **kw: Any) -> StreamReport:
    report = scan(b"".join(chunks), **kw)
    assert report.error is None, report.error
    if warning is not None:
        assert any(warning in w for w in report.warnings), report.warnings
    return report


def swap(chunks: Chunks, i: int, j: int) -> Chunks:
    out = list(chunks)
    out[i], out[j] = out[j], out[i]
    return out


def replace(chunks: Chunks, i: int, *new: bytes) -> Chunks:
    return chunks[:i] + list(new) + chunks[i + 1:]


def drop(chunks: Chunks, i: int) -> Chunks:
    return chunks[:i] + chunks[i + 1:]


def raw_page_data(count: int, words: List[int], npages: int, extra: int = 0) -> bytes:
    body = struct.pack("<II", count, 0) + struct.pack(f"<{len(words)}Q", *words)
    return rec(T.PAGE_DATA, body + bytes(npages * 4096 + extra))


# ---------------------------------------------------------------------------
# libxc headers


@pytest.mark.parametrize("hdr, match", [
    (struct.pack(">QIIHHI", 0xFFFFFFFFFFFFFFFE, 0x58454E46, 3, 0, 0, 0), "marker"),
    (struct.pack(">QIIHHI", 2**64 - 1, 0x58454E47, 3, 0, 0, 0), "id 0x58454e47"),
    (xc.image_header(version=1), "version 1 not in 2..3"),
    (xc.image_header(version=4), "version 4 not in 2..3"),
    (xc.image_header(options=1), "big-endian"),
])
def test_libxc_image_header_rules(hdr: bytes, match: str) -> None:
    chunks = hvm_chunks()
    data = hdr + chunks[0][24:] + b"".join(chunks[1:])
    report = scan(data, layer="libxc")
    assert isinstance(report.error, StreamError) and match in report.error.reason
    assert report.error.offset == 0 and report.error.where == "libxc image header"


@pytest.mark.parametrize("dhdr, match", [
    (xc.domain_header(3), "type 3 is neither"),
    (xc.domain_header(0), "type 0 is neither"),
    (xc.domain_header(2, page_shift=13), "page_shift 13"),
])
def test_libxc_domain_header_rules(dhdr: bytes, match: str) -> None:
    chunks = replace(hvm_chunks(), 0, xc.image_header() + dhdr)
    report = scan(b"".join(chunks))
    assert isinstance(report.error, StreamError) and match in report.error.reason
    assert report.error.offset == 24


def test_reserved_header_fields_are_accepted_with_warnings() -> None:
    hdr = struct.pack(">QIIHHI", 2**64 - 1, 0x58454E46, 3, 2, 7, 9)
    dhdr = struct.pack("<IHHII", 2, 12, 0xAB, 4, 17)
    report = accepted(replace(hvm_chunks(), 0, hdr + dhdr), "reserved image header")
    assert any("reserved domain header" in w for w in report.warnings)


def test_legacy_converted_domain_header_is_accepted() -> None:
    report = accepted(replace(hvm_chunks(), 0, xc.image_header() + xc.domain_header(2, 0, 1)))
    assert report.domain_header is not None and report.domain_header.legacy_converted


# ---------------------------------------------------------------------------
# libxc record rules: each case is (chunks, culprit chunk index, reason)


def hvm_cases() -> Dict[str, Tuple[Chunks, int, str]]:
    h = hvm_chunks()
    v2 = hvm_chunks(version=2)  # headers, PD, PD, TSC, CTX, PARAMS, END
    return {
        "page data before static data end": (swap(h, H_SDE, H_PD1), H_SDE,
                                             "PAGE_DATA before STATIC_DATA_END"),
        "second static data end": (h[:H_PD1] + [h[H_SDE]] + h[H_PD1:], H_PD1,
                                   "second STATIC_DATA_END"),
        "v2 static data end after inferred": (v2[:2] + [rec(T.STATIC_DATA_END)] + v2[2:], 2,
                                              "after libxc inferred it"),
        "missing hvm context": (drop(h, H_CTX), H_CTX + 1, "without an HVM_CONTEXT"),
        "empty hvm context": (replace(h, H_CTX, rec(T.HVM_CONTEXT)), H_CTX, "HVM_CONTEXT is empty"),
        "tsc info 16 bytes": (replace(h, H_TSC, rec(T.X86_TSC_INFO, bytes(16))), H_TSC,
                              "X86_TSC_INFO length 16 != 24"),
        "tsc info 32 bytes": (replace(h, H_TSC, rec(T.X86_TSC_INFO, bytes(32))), H_TSC,
                              "X86_TSC_INFO length 32 != 24"),
        "hvm params count too high": (
            replace(h, H_PARAMS, rec(T.HVM_PARAMS, struct.pack("<II", 5, 0) + bytes(64))),
            H_PARAMS, "HVM_PARAMS length 72 != 8+16*5"),
        "hvm params short": (replace(h, H_PARAMS, rec(T.HVM_PARAMS, bytes(4))), H_PARAMS,
                             "HVM_PARAMS length 4 < 8"),
        "hvm params zero length": (replace(h, H_PARAMS, rec(T.HVM_PARAMS)), H_PARAMS,
                                   "HVM_PARAMS length 0 < 8"),
        "cpuid not multiple of 24": (replace(h, H_CPUID, rec(T.X86_CPUID_POLICY, bytes(25))),
                                     H_CPUID, "X86_CPUID_POLICY length 25"),
        "cpuid empty": (replace(h, H_CPUID, rec(T.X86_CPUID_POLICY)), H_CPUID,
                        "X86_CPUID_POLICY length 0"),
        "msr empty": (replace(h, H_MSR, rec(T.X86_MSR_POLICY)), H_MSR, "X86_MSR_POLICY length 0"),
        "msr not multiple of 16": (replace(h, H_MSR, rec(T.X86_MSR_POLICY, bytes(24))), H_MSR,
                                   "X86_MSR_POLICY length 24"),
        "checkpoint in plain stream": (h[:H_END] + [rec(T.CHECKPOINT)] + h[H_END:], H_END,
                                       "CHECKPOINT in a non-checkpointed stream"),
        "unknown mandatory record": (h[:H_TSC] + [rec(0x13, b"x")] + h[H_TSC:], H_TSC,
                                     "mandatory record 0x13 (UNKNOWN_0x13) is not handled"),
        "toolstack record": (h[:H_TSC] + [rec(T.TOOLSTACK, b"x")] + h[H_TSC:], H_TSC,
                             "(TOOLSTACK) is not handled"),
        "dirty pfn list in forward stream": (
            h[:H_TSC] + [rec(T.CHECKPOINT_DIRTY_PFN_LIST, bytes(8))] + h[H_TSC:], H_TSC,
            "CHECKPOINT_DIRTY_PFN_LIST"),
        "pv record in hvm stream": (h[:H_TSC] + [xc.pv_info()] + h[H_TSC:], H_TSC,
                                    "(X86_PV_INFO) is not handled in an x86 HVM stream"),
        "shared info in hvm stream": (h[:H_TSC] + [rec(T.SHARED_INFO, bytes(4096))] + h[H_TSC:],
                                      H_TSC, "(SHARED_INFO) is not handled"),
        "record over 128 MiB": (replace(h, H_TSC, struct.pack("<II", T.X86_TSC_INFO,
                                                              (128 << 20) + 1)), H_TSC,
                                "exceeds the 128 MiB record limit"),
        "page data count 0": (replace(h, H_PD1, raw_page_data(0, [], 0)), H_PD1,
                              "PAGE_DATA count 0"),
        "page data too short for header": (replace(h, H_PD1, rec(T.PAGE_DATA, bytes(4))), H_PD1,
                                           "PAGE_DATA length 4 < 8"),
        "page data count too high": (replace(h, H_PD1, raw_page_data(9, list(range(8)), 0)),
                                     H_PD1, "too short for 9 pfns"),
        "page data one page missing": (replace(h, H_PD1, raw_page_data(1, [0], 0, extra=4088)),
                                       H_PD1, "PAGE_DATA length 4104 != 8+8*1+4096*1"),
        "page data one page extra": (replace(h, H_PD1, raw_page_data(1, [0], 2)), H_PD1,
                                     "PAGE_DATA length 8208 != 8+8*1+4096*1"),
        "page data xtab with data": (replace(h, H_PD1, raw_page_data(1, [0xF << 60], 1)), H_PD1,
                                     "PAGE_DATA length 4112 != 8+8*1+4096*0"),
        **{f"page type {t}": (replace(h, H_PD1, raw_page_data(1, [(t << 60) | 3], 1)), H_PD1,
                              f"pfn 0x3 (index 0) has invalid page type {t:#x}")
           for t in (5, 6, 7, 8)},
    }


def pv_cases() -> Dict[str, Tuple[Chunks, int, str]]:
    v = pv_chunks()
    v2 = pv_chunks(version=2)  # headers, INFO, P2M, PD, PD, TSC, SHINFO, BASIC, END
    basic = xc.vcpu_record
    return {
        "second pv info": (v[:V_CPUID] + [v[V_INFO]] + v[V_CPUID:], V_CPUID,
                           "second X86_PV_INFO"),
        "pv info bad combination": (replace(v, V_INFO, xc.pv_info(4, 4)), V_INFO,
                                    "guest_width 4 with pt_levels 4"),
        "pv info width 2": (replace(v, V_INFO, xc.pv_info(2, 2)), V_INFO, "guest_width 2"),
        "pv info short": (replace(v, V_INFO, rec(T.X86_PV_INFO, b"\x08\x04")), V_INFO,
                          "X86_PV_INFO length 2 < 8"),
        "p2m before pv info": (v[:V_INFO] + v[V_CPUID:V_P2M + 1] + [v[V_INFO]] + v[V_P2M + 1:],
                               V_P2M - 1, "X86_PV_P2M_FRAMES before X86_PV_INFO"),
        "p2m before static data end (v3)": (swap(v, V_SDE, V_P2M), V_SDE,
                                            "X86_PV_P2M_FRAMES before STATIC_DATA_END"),
        "p2m start after end": (replace(v, V_P2M, xc.p2m_frames(9, 8, [7])), V_P2M,
                                "start_pfn 0x9 > end_pfn 0x8"),
        "p2m wrong length": (replace(v, V_P2M, xc.p2m_frames(0, 8, [7, 8])), V_P2M,
                             "X86_PV_P2M_FRAMES length 24 != 8+8*1"),
        "p2m short": (replace(v, V_P2M, rec(T.X86_PV_P2M_FRAMES, bytes(4))), V_P2M,
                      "X86_PV_P2M_FRAMES length 4 < 8"),
        "page data before p2m": (swap(v, V_P2M, V_PD1), V_P2M,
                                 "before any X86_PV_P2M_FRAMES record"),
        "pfn beyond p2m maximum": (replace(v, V_PD2, xc.page_data([(9, P.XTAB)], b"")), V_PD2,
                                   "pfn 0x9 (index 0) outside the domain maximum 0x8"),
        "shared info before pv info": (v[:V_INFO] + [v[V_SHINFO]] + v[V_INFO:V_SHINFO]
                                       + v[V_SHINFO + 1:], V_INFO,
                                       "SHARED_INFO before X86_PV_INFO"),
        "shared info wrong size": (replace(v, V_SHINFO, rec(T.SHARED_INFO, bytes(4095))),
                                   V_SHINFO, "SHARED_INFO length 4095 != 4096"),
        "no vcpu0 basic": (drop(v, V_BASIC), V_BASIC, "without vcpu0's X86_PV_VCPU_BASIC"),
        "only vcpu1 basic": (replace(v, V_BASIC, basic(T.X86_PV_VCPU_BASIC, 1, bytes(5168))),
                             V_END, "without vcpu0's X86_PV_VCPU_BASIC"),
        "vcpu basic wrong size": (replace(v, V_BASIC, basic(T.X86_PV_VCPU_BASIC, 0,
                                                             bytes(2800))), V_BASIC,
                                  "context is 2800 bytes, a 64-bit guest's is 5168"),
        "vcpu basic short": (replace(v, V_BASIC, rec(T.X86_PV_VCPU_BASIC, bytes(4))), V_BASIC,
                             "X86_PV_VCPU_BASIC length 4 < 8"),
        "vcpu extended too long": (v[:V_END] + [basic(T.X86_PV_VCPU_EXTENDED, 0, bytes(129))]
                                   + v[V_END:], V_END, "blob is 129 bytes (max 128)"),
        "vcpu xsave too short": (v[:V_END] + [basic(T.X86_PV_VCPU_XSAVE, 0, bytes(15))]
                                 + v[V_END:], V_END, "blob is 15 bytes (min 16)"),
        "vcpu msrs not multiple of 16": (v[:V_END] + [basic(T.X86_PV_VCPU_MSRS, 0, bytes(17))]
                                         + v[V_END:], V_END, "not a multiple of 16"),
        "hvm context in pv stream": (v[:V_END] + [rec(T.HVM_CONTEXT, bytes(8))] + v[V_END:],
                                     V_END, "(HVM_CONTEXT) is not handled in an x86 PV stream"),
        "no pv info at all": (drop(drop(v, V_SHINFO), V_INFO), V_P2M - 1,
                              "X86_PV_P2M_FRAMES before X86_PV_INFO"),
        "no p2m frames at all": (drop(drop(drop(v, V_PD2), V_PD1), V_P2M), V_END - 3,
                                 "without an X86_PV_P2M_FRAMES"),
        "v2 second static data end after p2m": (v2[:3] + [rec(T.STATIC_DATA_END)] + v2[3:], 3,
                                                "after libxc inferred it"),
    }


@pytest.mark.parametrize("case", sorted(hvm_cases()))
def test_libxc_hvm_rules(case: str) -> None:
    chunks, culprit, match = hvm_cases()[case]
    refused(chunks, culprit, match)


@pytest.mark.parametrize("case", sorted(pv_cases()))
def test_libxc_pv_rules(case: str) -> None:
    chunks, culprit, match = pv_cases()[case]
    refused(chunks, culprit, match)


def test_vcpu_id_beyond_config_max_vcpus() -> None:
    libxc = pv_chunks()
    libxc = libxc[:V_END] + [xc.vcpu_record(T.X86_PV_VCPU_BASIC, 2, bytes(5168))] + libxc[V_END:]
    chunks = xl_chunks(PV_CONFIG, libxl_chunks(libxc))
    refused(chunks, 3 + V_END, "vcpu_id 2 >= the config's max_vcpus 2")


def test_config_type_must_match_domain_type() -> None:
    chunks = xl_chunks(HVM_CONFIG, libxl_chunks(pv_chunks()))
    report = scan(b"".join(chunks))
    assert isinstance(report.error, StreamError)
    assert "x86 PV stream cannot be restored into the x86 HVM domain" in report.error.reason
    assert report.error.offset == boundaries(chunks)[3] + 24


# ---------------------------------------------------------------------------
# What libxc accepts, we accept


def test_accepts_nonzero_padding() -> None:
    h = hvm_chunks()
    padded = rec(T.HVM_CONTEXT, bytes(36))[:-4] + b"\xde\xad\xbe\xef"
    accepted(replace(h, H_CTX, padded), "padding is non-zero")


def test_accepts_unknown_optional_record() -> None:
    h = hvm_chunks()
    report = accepted(h[:H_TSC] + [rec(0x80000001, b"whatever")] + h[H_TSC:],
                      "unknown optional record 0x80000001 skipped")
    assert any(r.name == "OPTIONAL_0x80000001" for r in report.records)


def test_accepts_optional_bit_on_known_type() -> None:
    h = hvm_chunks()
    accepted(h[:H_TSC] + [rec(0x80000000 | T.PAGE_DATA, b"junk")] + h[H_TSC:])


def test_accepts_hvm_params_before_context() -> None:
    accepted(swap(hvm_chunks(), H_CTX, H_PARAMS))


def test_accepts_end_with_body() -> None:
    accepted(replace(hvm_chunks(), H_END, rec(T.END, b"tail")), "END has a 4-byte body")


def test_accepts_reserved_pfn_bits_and_page_data_reserved() -> None:
    h = hvm_chunks()
    body = struct.pack("<II", 1, 0xAA) + struct.pack("<Q", (0x5A << 52) | 3) + page(3)
    report = accepted(replace(h, H_PD1, rec(T.PAGE_DATA, body)), "bits 52-59")
    assert any("reserved field" in w for w in report.warnings)


def test_accepts_v2_with_static_data_end() -> None:
    h = hvm_chunks()
    report = accepted([xc.image_header(2) + h[0][24:]] + h[1:], "STATIC_DATA_END in a v2")
    assert report.libxc_header is not None and report.libxc_header.version == 2


def test_accepts_v2_without_static_data_end() -> None:
    report = accepted(hvm_chunks(version=2))
    sde = [r for r in report.records if r.name == "STATIC_DATA_END"]
    assert sde == []


def test_accepts_empty_hvm_params_and_vcpu_records() -> None:
    h = hvm_chunks()
    accepted(replace(h, H_PARAMS, rec(T.HVM_PARAMS, bytes(8))))
    v = pv_chunks()
    accepted(v[:V_END] + [xc.vcpu_record(T.X86_PV_VCPU_XSAVE, 0, b"")] + v[V_END:])


def test_accepts_extra_pv_vcpu_records() -> None:
    v = pv_chunks()
    extra = [xc.vcpu_record(T.X86_PV_VCPU_EXTENDED, 0, bytes(128)),
             xc.vcpu_record(T.X86_PV_VCPU_XSAVE, 0, bytes(16)),
             xc.vcpu_record(T.X86_PV_VCPU_MSRS, 0, bytes(32)),
             xc.vcpu_record(T.X86_PV_VCPU_BASIC, 1, bytes(5168))]
    accepted(v[:V_END] + extra + v[V_END:])


def test_accepts_verify_mode() -> None:
    h = hvm_chunks()
    accepted(h[:H_TSC] + [rec(T.VERIFY)] + h[H_PD1:H_TSC] + h[H_TSC:])


def test_accepts_policy_after_static_data_end() -> None:
    accepted(swap(hvm_chunks(), H_MSR, H_SDE))


def test_accepts_trailing_data_after_end() -> None:
    for layer in ("xl", "libxl", "libxc"):
        report = accepted(hvm_stream(layer) + [b"garbage!"], "8 bytes after")
        assert report.trailing_bytes == 8


def test_accepts_page_data_over_1024_pfns() -> None:
    entries = [(p, P.XTAB) for p in range(2000)]
    h = hvm_chunks()
    report = accepted(h[:H_TSC] + [xc.page_data(entries, b"")] + h[H_TSC:])
    assert report.pages.holes == 2002


# ---------------------------------------------------------------------------
# libxl layer


def libxl_hvm() -> Chunks:
    return libxl_chunks(hvm_chunks(), emulator_context=b"state")


@pytest.mark.parametrize("header, match", [
    (struct.pack(">QII", 0x4C6962786C466D75, 2, 0), "ident"),
    (struct.pack(">QII", 0x4C6962786C466D74, 1, 0), "version 1 != 2"),
    (struct.pack(">QII", 0x4C6962786C466D74, 3, 0), "version 3 != 2"),
    (xl2.libxl_header(options=1), "big-endian"),
])
def test_libxl_header_rules(header: bytes, match: str) -> None:
    report = scan(b"".join(replace(libxl_hvm(), 0, header)), layer="libxl")
    assert isinstance(report.error, StreamError) and match in report.error.reason
    assert report.error.offset == 0 and report.error.where == "libxl header"


def test_libxl_legacy_option_is_only_reported() -> None:
    report = accepted(replace(libxl_hvm(), 0, xl2.libxl_header(options=2)))
    assert report.libxl_header is not None and report.libxl_header.legacy


def libxl_cases() -> Dict[str, Tuple[Chunks, int, str]]:
    x = libxl_hvm()  # header, LIBXC_CONTEXT, 10 libxc chunks, EMULATOR_CONTEXT, END
    emu, end = len(x) - 2, len(x) - 1
    pv = libxl_chunks(pv_chunks())
    return {
        "unknown type": (x[:end] + [xl2.libxl_record(6)] + x[end:], end,
                         "unrecognised libxl record type 0x6"),
        "unknown optional type": (x[:end] + [xl2.libxl_record(0x80000003, b"x")] + x[end:], end,
                                  "unrecognised libxl record type 0x80000003"),
        "checkpoint end in plain stream": (x[:end] + [xl2.checkpoint_end_record()] + x[end:],
                                           end, "CHECKPOINT_END outside a checkpoint"),
        "checkpoint state": (x[:end] + [xl2.libxl_record(L.CHECKPOINT_STATE, bytes(8))]
                             + x[end:], end, "back channel"),
        "emulator record in pv stream": (pv[:-1] + [xl2.emulator_context_record(b"s")]
                                         + pv[-1:], len(pv) - 1, "PV guest"),
        "emulator record too short": (replace(x, emu, xl2.libxl_record(L.EMULATOR_CONTEXT,
                                                                       b"abc")), emu,
                                      "EMULATOR_CONTEXT length 3 < 8"),
        "xenstore key not terminated": (
            x[:end] + [xl2.libxl_record(L.EMULATOR_XENSTORE_DATA, bytes(8) + b"key")] + x[end:],
            end, "key is not NUL-terminated"),
        "xenstore value not terminated": (
            x[:end] + [xl2.libxl_record(L.EMULATOR_XENSTORE_DATA, bytes(8) + b"k\0v")] + x[end:],
            end, "value is not NUL-terminated"),
        "xenstore empty key": (
            x[:end] + [xl2.libxl_record(L.EMULATOR_XENSTORE_DATA, bytes(8) + b"\0v\0")]
            + x[end:], end, "empty key"),
        "end before libxc context": ([x[0], x[-1]] + x[1:-1], 1, "END before LIBXC_CONTEXT"),
        "second libxc context": (x[:end] + [x[1]] + x[end:], end, "second LIBXC_CONTEXT"),
        "cut at libxl record boundary": (x[:end], end, "ends at a record boundary without END"),
        "cut right after libxc end": (x[:emu], emu, "ends at a record boundary without END"),
        "libxc stream inside libxl broken": (replace(x, 2 + H_CTX, rec(T.HVM_CONTEXT)),
                                             2 + H_CTX, "HVM_CONTEXT is empty"),
    }


@pytest.mark.parametrize("case", sorted(libxl_cases()))
def test_libxl_rules(case: str) -> None:
    chunks, culprit, match = libxl_cases()[case]
    exc = TruncatedStream if case.startswith("cut") else StreamError
    refused(chunks, culprit, match, exc)


def test_libxl_accepts_unknown_emulator_id_padding_and_libxc_context_body() -> None:
    x = libxl_hvm()
    emu = len(x) - 2
    report = accepted(replace(x, emu, xl2.emulator_context_record(b"st", emulator_id=9)),
                      "unknown emulator_id 9")
    assert report.ok
    bad_pad = xl2.emulator_context_record(b"st")[:-1] + b"\x01"
    accepted(replace(x, emu, bad_pad), "padding is non-zero (libxl ignores it)")
    accepted(replace(x, 1, xl2.libxl_record(L.LIBXC_CONTEXT, b"ignored")))


def test_libxl_checkpointed_stream() -> None:
    """Remus layout: libxc rounds end in CHECKPOINT, then libxl records up to
    CHECKPOINT_END, then the next round's libxc records (no new header)."""
    h = hvm_chunks()
    round1 = h[:H_END] + [rec(T.CHECKPOINT)]
    round2 = [h[H_PD2], h[H_TSC], h[H_CTX], h[H_PARAMS], rec(T.CHECKPOINT)]
    libxl_round = [xl2.emulator_context_record(b"qemu"), xl2.checkpoint_end_record()]
    chunks = ([xl2.libxl_header(), xl2.libxc_context_record()] + round1 + libxl_round
              + round2 + libxl_round)
    report = accepted(chunks, checkpointed=True)
    assert report.checkpoints == 2
    assert report.end_offset == len(b"".join(chunks))
    # A cut inside the libxl part of a checkpoint is still a truncation.
    cut = chunks[:-1]
    report = scan(b"".join(cut), checkpointed=True)
    assert isinstance(report.error, TruncatedStream)
    # And the same stream is refused as a plain stream.
    refused(chunks, 2 + H_END, "CHECKPOINT in a non-checkpointed stream")


# ---------------------------------------------------------------------------
# xl layer


def xl_bytes(config: object = HVM_CONFIG) -> bytes:
    return b"".join(xl_chunks(config, libxl_hvm()))


def patch(data: bytes, offset: int, new: bytes) -> bytes:
    return data[:offset] + new + data[offset + len(new):]


def optdata(config_blob: bytes, *, flags: int = 3, extra: bytes = b"",
            config_len: Optional[int] = None) -> bytes:
    n = len(config_blob) if config_len is None else config_len
    opt = struct.pack("<I", n) + config_blob + extra
    head = struct.pack("<32sIIII", xl1.XL_MAGIC, 0x01020304, flags, 0, len(opt))
    return head + opt + b"".join(libxl_hvm())


@pytest.mark.parametrize("data, exc, offset, match", [
    (patch(xl_bytes(), 0, b"Xen saved domain, XL"), StreamError, 0, "wrong magic"),
    (patch(xl_bytes(), 32, struct.pack(">I", 0x01020304)), StreamError, 32, "byteorder"),
    (patch(xl_bytes(), 36, struct.pack("<I", 0x13)), StreamError, 36, "flags 0x10"),
    (patch(xl_bytes(), 36, struct.pack("<I", 0x1)), UnsupportedStream, 36, "STREAMv2"),
    (patch(xl_bytes(), 44, struct.pack("<I", 0x7FFFFFFF)), UnsupportedStream, 44, "limit"),
    (patch(xl_bytes(), 44, struct.pack("<I", 0x00FFFFFF)), TruncatedStream, 44, "optional data"),
    (optdata(b'{"a": 1}'), StreamError, 52, "not NUL-terminated"),
    (optdata(b'{"a": 1\0'), StreamError, 52, "not valid JSON"),
    (optdata(b'{"a": NaN}\0'), StreamError, 52, "not valid JSON"),
    (optdata(b'[1]\0'), StreamError, 52, "not an object"),
    (optdata(b'{"a": "\xff"}\0'), StreamError, 52, "not UTF-8"),
    (optdata(b'{"a": 1}\0', config_len=100), StreamError, 48, "config_len 100 exceeds"),
    (optdata(b"", config_len=None)[:44] + struct.pack("<I", 2) + b"\0\0"
     + b"".join(libxl_hvm()), StreamError, 48, "no room for config_len"),
])
def test_xl_header_rules(data: bytes, exc: type, offset: int, match: str) -> None:
    err = scan(data).error
    assert isinstance(err, exc) and err is not None, err
    assert err.offset == offset and match in err.reason, err
    assert err.where == "xl header"


def test_xl_config_text_ends_at_first_nul_like_xl() -> None:
    report = accepted([optdata(b'{"a": 1}\0trailing junk\0')])
    assert report.config == {"a": 1}


def test_xl_optional_data_after_config_is_ignored() -> None:
    accepted([optdata(b'{"a": 1}\0', extra=b"more")], "after the config")


def test_xl_without_config_is_accepted() -> None:
    report = accepted([optdata(b"", flags=2)])
    assert report.config is None
    report = accepted([struct.pack("<32sIIII", xl1.XL_MAGIC, 0x01020304, 2, 0, 0)]
                      + libxl_hvm())
    assert report.xl_header is not None and report.xl_header.config_bytes is None


def test_xl_non_json_config_is_kept_raw() -> None:
    report = accepted([optdata(b'name = "x"\n\0', flags=2)])
    assert report.config is None
    assert report.xl_header is not None and report.xl_header.config_bytes == b'name = "x"\n\0'


# ---------------------------------------------------------------------------
# Wrong layer


def test_wrong_layer_is_a_stream_error() -> None:
    libxc = b"".join(hvm_stream("libxc"))
    libxl = b"".join(hvm_stream("libxl"))
    for data, layer, where in ((libxc, "libxl", "libxl header"), (libxl, "xl", "xl header"),
                               (libxl, "libxc", "libxc image header"),
                               (xl_bytes(), "libxc", "libxc image header")):
        report = scan(data, layer=layer)
        assert isinstance(report.error, StreamError) and report.error.offset == 0
        assert report.error.where == where


def test_garbage_is_not_a_stream() -> None:
    report = scan(b"\x7fELF\x02\x01\x01\x00" + bytes(100))
    assert isinstance(report.error, StreamError)
    assert "no xl, libxl or libxc magic" in report.error.reason


def test_libxc_stream_embedded_twice_is_refused() -> None:
    """A libxl stream whose body is a whole libxl stream again."""
    inner = b"".join(libxl_hvm())
    data = xl2.libxl_header() + xl2.libxc_context_record() + inner
    report = scan(data)
    assert isinstance(report.error, StreamError) and report.error.offset == 24


# ---------------------------------------------------------------------------
# Truncation everywhere


def cut_points(chunks: Chunks) -> List[int]:
    points = set()
    for start, end in zip(boundaries(chunks), boundaries(chunks)[1:]):
        for p in (start, start + 1, start + 4, start + 7, start + 8, start + 9,
                  (start + end) // 2, end - 1):
            if start <= p < end:
                points.add(p)
    return sorted(points)


@pytest.mark.parametrize("layer", ["xl", "libxl", "libxc"])
@pytest.mark.parametrize("build", [hvm_stream, pv_stream], ids=["hvm", "pv"])
def test_every_truncation_is_detected(layer: str, build: Callable[..., Chunks]) -> None:
    chunks = build(layer)
    data = b"".join(chunks)
    for cut in cut_points(chunks):
        report = scan(data[:cut])
        assert isinstance(report.error, TruncatedStream), (cut, report.error)
        assert report.error.offset <= cut, (cut, report.error)
        assert report.end_offset is None


@pytest.mark.parametrize("layer", ["xl", "libxl", "libxc"])
def test_truncation_at_record_boundaries_reports_the_boundary(layer: str) -> None:
    chunks = hvm_stream(layer)
    data = b"".join(chunks)
    for b in boundaries(chunks)[2:-1]:
        report = scan(data[:b])
        assert isinstance(report.error, TruncatedStream)
        assert report.error.offset == b, (b, report.error)


def test_truncation_through_a_pipe() -> None:
    chunks = hvm_stream("xl")
    data = b"".join(chunks)
    for cut in cut_points(chunks)[::5]:
        report = scan_pipe(data[:cut])
        assert isinstance(report.error, TruncatedStream), (cut, report.error)
        assert report.error.offset <= cut
        # Page counts only include records that were read whole.
        listed = [r for r in report.records if r.name == "PAGE_DATA"]
        assert report.pages.records == len(listed)
        assert report.pages.pfns == sum(r.pfns for r in listed)


# ---------------------------------------------------------------------------
# Huge lengths: typed errors, no big allocation


def peak_alloc(fn: Callable[[], StreamReport]) -> Tuple[StreamReport, int]:
    tracemalloc.start()
    try:
        report = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return report, peak


@pytest.mark.parametrize("length", [(128 << 20), (128 << 20) - 8, 0x10000000, 0xFFFFFFFF])
def test_huge_libxc_length_no_allocation(length: int) -> None:
    h = hvm_chunks()
    data = b"".join(h[:H_TSC]) + struct.pack("<II", T.HVM_CONTEXT, length) + bytes(64)
    for scanner in (scan, scan_pipe):
        report, peak = peak_alloc(lambda: scanner(data))
        assert isinstance(report.error, StreamError)
        assert peak < 4 << 20, peak


def test_huge_page_data_count_no_allocation() -> None:
    h = hvm_chunks()
    body_len = 128 << 20
    count = (body_len - 8) // 8
    head = struct.pack("<IIII", T.PAGE_DATA, body_len, count, 0)
    data = b"".join(h[:H_PD1]) + head + bytes(1 << 16)
    for scanner in (scan, scan_pipe):
        report, peak = peak_alloc(lambda: scanner(data))
        assert isinstance(report.error, TruncatedStream)
        assert peak < 8 << 20, peak


def test_huge_libxl_and_xl_lengths_no_allocation() -> None:
    x = libxl_hvm()
    libxl = b"".join(x[:-2]) + struct.pack("<II", L.EMULATOR_CONTEXT, 0xFFFFFFF0) + bytes(64)
    xs = b"".join(x[:-2]) + struct.pack("<II", L.EMULATOR_XENSTORE_DATA, 0xFFFFFFF0) + bytes(64)
    xlh = struct.pack("<32sIIII", xl1.XL_MAGIC, 0x01020304, 3, 0, (16 << 20)) + bytes(64)
    for data in (libxl, xs, xlh):
        for scanner in (scan, scan_pipe):
            report, peak = peak_alloc(lambda: scanner(data))
            assert isinstance(report.error, StreamError), report.error
            assert peak < 20 << 20, peak


# ---------------------------------------------------------------------------
# Fuzzing: any bytes give a report, never another exception or a hang


def check_invariant(data: bytes) -> StreamReport:
    report = scan(data)
    assert report.error is None or isinstance(report.error, StreamError)
    if report.error is not None:
        assert 0 <= report.error.offset <= len(data) + 8
        assert "\n" not in str(report.error)
    return report


SAMPLES = [b"".join(build(layer)) for build in (hvm_stream, pv_stream)
           for layer in ("xl", "libxl", "libxc")]
HEADER_REGIONS = [(0, 48), (48, 60)]


@settings(max_examples=300, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(range(len(SAMPLES))), st.lists(st.tuples(st.integers(0, 10**9),
                                                                st.integers(0, 7)),
                                                      min_size=1, max_size=4))
def test_bit_flips_anywhere(which: int, flips: List[Tuple[int, int]]) -> None:
    data = bytearray(SAMPLES[which])
    for pos, bit in flips:
        data[pos % len(data)] ^= 1 << bit
    check_invariant(bytes(data))


@settings(max_examples=300, deadline=2000)
@given(st.sampled_from(range(len(SAMPLES))), st.integers(0, 10**9), st.integers(0, 7))
def test_bit_flips_in_headers_and_record_headers(which: int, pos: int, bit: int) -> None:
    """Flip a bit within the first 600 bytes, where every header and the
    first record headers live (after the xl config)."""
    data = bytearray(SAMPLES[which])
    data[pos % min(600, len(data))] ^= 1 << bit
    check_invariant(bytes(data))


@settings(max_examples=200, deadline=2000)
@given(st.sampled_from(range(len(SAMPLES))), st.integers(0, 10**9),
       st.sampled_from([0, 1, 7, 8, 0x7FFFFFFF, 0x80000000, 0x8000000, 0xFFFFFFFF,
                        0xFFFFFFF8, 4096, 4104]))
def test_forged_u32_fields(which: int, pos: int, value: int) -> None:
    data = SAMPLES[which]
    pos = (pos % (len(data) - 4)) & ~3
    check_invariant(data[:pos] + struct.pack("<I", value) + data[pos + 4:])


@settings(max_examples=200, deadline=2000)
@given(st.binary(max_size=512))
def test_random_bytes(data: bytes) -> None:
    check_invariant(data)


@settings(max_examples=100, deadline=2000)
@given(st.sampled_from(["libxc", "libxl", "xl"]), st.binary(max_size=256))
def test_random_bytes_after_valid_magic(layer: str, tail: bytes) -> None:
    prefix = {"libxc": xc.image_header(), "libxl": xl2.libxl_header(),
              "xl": xl1.XL_MAGIC + struct.pack("<I", 0x01020304)}[layer]
    check_invariant(prefix + tail)


@settings(max_examples=150, deadline=3000)
@given(st.sampled_from([hvm_chunks, pv_chunks]), st.data())
def test_records_reordered_duplicated_or_dropped(build: Callable[..., Chunks],
                                                 data: st.DataObject) -> None:
    chunks = build()
    body = chunks[1:]
    op = data.draw(st.sampled_from(["swap", "dup", "drop"]))
    i = data.draw(st.integers(0, len(body) - 1))
    j = data.draw(st.integers(0, len(body) - 1))
    if op == "swap":
        body[i], body[j] = body[j], body[i]
    elif op == "dup":
        body.insert(j, body[i])
    else:
        del body[i]
    report = check_invariant(b"".join([chunks[0]] + body))
    if report.error is None:
        # Whatever passes must still be a complete stream with an END.
        assert report.end_offset is not None


# ---------------------------------------------------------------------------
# Big streams are streamed, not loaded


def _write_sparse_stream(path: str, gib: float) -> int:
    """A valid HVM libxc stream of ~gib GiB whose page data is file holes."""
    h = hvm_chunks(holes=(), npages=0)
    batch = 1024
    npages = int(gib * (1 << 30)) // 4096 // batch * batch
    with open(path, "wb") as f:
        f.write(b"".join(h[:H_SDE + 1]))
        words = struct.Struct(f"<{batch}Q")
        for first in range(0, npages, batch):
            body_len = 8 + 8 * batch + 4096 * batch
            f.write(struct.pack("<IIII", T.PAGE_DATA, body_len, batch, 0))
            f.write(words.pack(*range(first, first + batch)))
            f.seek(4096 * batch, os.SEEK_CUR)
        f.write(b"".join(h[H_SDE + 1:]))
    return npages


@pytest.mark.parametrize("gib", [4.0])
def test_4gib_sparse_file_scans_in_bounded_memory(tmp_path: object, gib: float) -> None:
    path = os.path.join(str(tmp_path), "big.libxc")
    try:
        npages = _write_sparse_stream(path, gib)
    except OSError as err:  # pragma: no cover - filesystem without room/holes
        pytest.skip(f"cannot create a sparse {gib} GiB file: {err}")
    report, peak = peak_alloc(lambda: streamio.scan_path(path))
    assert report.error is None, report.error
    assert report.size is not None and report.size > 4 << 30
    assert report.pages.pfns == npages == report.pages.with_data
    assert report.pages.records == npages // 1024
    assert peak < 16 << 20, peak


def test_large_stream_through_a_pipe_in_bounded_memory() -> None:
    h = hvm_chunks(holes=(), npages=0)
    batch = [(p, P.NOTAB) for p in range(1024)]
    pd = xc.page_data(batch, bytes(4096 * 1024))  # one 4 MiB record, sent 16 times
    data = b"".join(h[:H_SDE + 1]) + pd * 16 + b"".join(h[H_SDE + 1:])

    report, peak = peak_alloc(lambda: scan_pipe(data))
    assert report.error is None, report.error
    assert report.pages.pfns == 16 * 1024
    # tracemalloc also counts the feeding thread's slices; bulk data stays bounded.
    assert peak < 24 << 20, peak


def test_report_caps_the_record_list() -> None:
    h = hvm_chunks()
    many = [rec(0x80000001)] * 50
    data = b"".join(h[:H_TSC] + many + h[H_TSC:])
    report = streamio.scan_stream(io.BytesIO(data))
    report2 = StreamReport(max_records=5)
    assert report.ok and len(report.records) == len(h) - 1 + 50
    report2.records.clear()
    src_report = scan(data)
    assert src_report.records_omitted == 0
    from pyxl.stream.framing import Source
    from pyxl.stream.libxc_scan import scan_libxc_on
    capped = StreamReport(max_records=5, max_warnings=3)
    scan_libxc_on(Source(io.BytesIO(data)), capped)
    assert len(capped.records) == 5 and capped.records_omitted == len(h) - 1 + 50 - 5
    assert len(capped.warnings) == 3


def test_every_header_bit_flip_is_accepted_or_refused_cleanly() -> None:
    """Exhaustive: every bit of every header and record header of an xl
    stream (HVM and PV) -- each flip scans to OK or a StreamError."""
    for build in (hvm_stream, pv_stream):
        chunks = build("xl")
        data = b"".join(chunks)
        starts = boundaries(chunks)[:-1]
        spots = list(range(48)) + [starts[1] + i for i in range(16)]  # xl + libxl headers
        spots += [starts[3] + i for i in range(40)]  # libxc image + domain header
        spots += [s + i for s in starts[2:3] + starts[4:] for i in range(8)]  # record headers
        outcomes = {"ok": 0, "refused": 0}
        for pos in spots:
            for bit in range(8):
                flipped = bytearray(data)
                flipped[pos] ^= 1 << bit
                report = check_invariant(bytes(flipped))
                outcomes["ok" if report.ok else "refused"] += 1
        # Reserved/ignored fields exist (optional_flags, reserved words), but
        # most flips must be refused.
        assert outcomes["refused"] > 4 * outcomes["ok"], outcomes


def test_first_bad_pfn_entry_wins_in_libxc_order() -> None:
    """libxc checks entry by entry, the pfn before the type."""
    v = pv_chunks()
    both = raw_page_data(3, [3, (5 << 60) | 4, 100], 2)
    refused(replace(v, V_PD1, both), V_PD1, "pfn 0x4 (index 1) has invalid page type 0x5")
    same_entry = raw_page_data(2, [3, (5 << 60) | 100], 1)
    refused(replace(v, V_PD1, same_entry), V_PD1, "pfn 0x64 (index 1) outside the domain")
    late = [p for p in range(8)] * 1200 + [(7 << 60) | 1]  # bad entry in the 2nd chunk
    refused(replace(v, V_PD1, raw_page_data(len(late), late, len(late) - 1)), V_PD1,
            f"pfn 0x1 (index {len(late) - 1}) has invalid page type 0x7")


def test_page_data_with_16m_entries_is_checked_quickly() -> None:
    import time
    n = (128 << 20) // 8 - 1  # the largest PAGE_DATA record: 16M entries, no data
    body = struct.pack("<II", n, 0) + struct.pack("<Q", 0xF << 60) * n
    h = hvm_chunks()
    chunks = replace(h, H_PD1, rec(T.PAGE_DATA, body))
    start = time.monotonic()
    report = accepted(chunks)
    assert time.monotonic() - start < 10
    assert report.pages.holes == n + 2


def test_endless_data_after_end_on_a_pipe_does_not_hang() -> None:
    r, w = os.pipe()
    import threading

    stop = threading.Event()

    def feed() -> None:
        try:
            os.write(w, b"".join(hvm_stream("xl")))
            while not stop.is_set():
                os.write(w, bytes(65536))
        except OSError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        with open(r, "rb", buffering=0) as f:
            report = streamio.scan_stream(f)
    finally:
        stop.set()
        t.join(timeout=10)
    assert report.ok
    assert report.trailing_bytes > 1 << 20
    assert any("more than 1048576 bytes after the final END" in w for w in report.warnings)
