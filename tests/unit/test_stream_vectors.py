"""The sample streams and the real libxc captures parse with the expected
records and page counts, from files and from pipes."""

from __future__ import annotations

from typing import List

import pytest

from pyxl.stream.framing import StreamError, TruncatedStream
from pyxl.stream.report import StreamReport
from pyxl.streamio import scan_path

from stream_support import HELPER, STREAMS, run_verifier, scan_pipe, verifier_available

HVM_LIBXC = ["X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END", "PAGE_DATA",
             "PAGE_DATA", "X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS", "END"]
PV_LIBXC = ["X86_PV_INFO", "X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END",
            "X86_PV_P2M_FRAMES", "PAGE_DATA", "PAGE_DATA", "X86_TSC_INFO", "SHARED_INFO",
            "X86_PV_VCPU_BASIC", "END"]
V2_DROPPED = {"X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END"}

EXPECTED = {
    "hvm.libxc": ("libxc", HVM_LIBXC),
    "hvm-v2.libxc": ("libxc", [n for n in HVM_LIBXC if n not in V2_DROPPED]),
    "hvm.libxl": ("libxl", ["LIBXC_CONTEXT"] + HVM_LIBXC + ["EMULATOR_CONTEXT", "END"]),
    "hvm.xl": ("xl", ["LIBXC_CONTEXT"] + HVM_LIBXC + ["EMULATOR_CONTEXT", "END"]),
    "pv.libxc": ("libxc", PV_LIBXC),
    "pv-v2.libxc": ("libxc", [n for n in PV_LIBXC if n not in V2_DROPPED]),
    "pv.libxl": ("libxl", ["LIBXC_CONTEXT"] + PV_LIBXC + ["END"]),
    "pv.xl": ("xl", ["LIBXC_CONTEXT"] + PV_LIBXC + ["END"]),
}


def names(report: StreamReport) -> List[str]:
    return [r.name for r in report.records]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sample_vectors_parse(name: str) -> None:
    layer, expected = EXPECTED[name]
    path = STREAMS / name
    report = scan_path(str(path))
    assert report.error is None, report.error
    assert report.layer == layer
    assert names(report) == expected
    assert report.size == path.stat().st_size
    assert report.end_offset == report.size and report.trailing_bytes == 0
    assert report.warnings == []
    dh = report.domain_header
    assert dh is not None and (dh.xen_major, dh.xen_minor) == (4, 17)
    assert report.libxc_header is not None
    assert report.libxc_header.version == (2 if "-v2" in name else 3)
    pages = report.pages
    if name.startswith("hvm"):
        assert dh.guest_type == 2
        assert (pages.records, pages.pfns, pages.with_data, pages.holes) == (2, 13, 13, 0)
        assert pages.by_type == {"NOTAB": 13}
    else:
        assert dh.guest_type == 1
        assert (pages.records, pages.pfns, pages.with_data, pages.holes) == (2, 9, 8, 1)
        assert pages.by_type == {"NOTAB": 4, "L1TAB": 1, "L2TAB": 1, "L3TAB": 1,
                                 "L4TAB_PINNED": 1, "XTAB": 1}
    if layer == "xl":
        assert report.config is not None
        assert report.config["c_info"]["name"] == ("tiny-hvm" if name.startswith("hvm")
                                                   else "tiny-pv")
        assert report.xl_header is not None and report.xl_header.mandatory_flags == 3


def test_sample_vector_offsets() -> None:
    """Offsets match the worked example in the reference (section 4.4)."""
    report = scan_path(str(STREAMS / "pv.xl"))
    assert report.libxl_offset == 0x137
    assert report.libxc_offset == 0x14F
    by_off = {r.offset: r.name for r in report.records}
    assert by_off[0x147] == "LIBXC_CONTEXT"
    assert by_off[0x177] == "X86_PV_INFO"
    assert by_off[0x207] == "PAGE_DATA"
    assert by_off[0x8257] == "PAGE_DATA"
    assert by_off[0x9297] == "X86_PV_VCPU_BASIC"
    assert by_off[0xA6D7] == "END" and by_off[0xA6DF] == "END"


@pytest.mark.parametrize("name", ["realxc-save-hvm-nonlive.iofd.bin",
                                  "realxc-save-hvm-live.iofd.bin"])
def test_real_libxc_capture(name: str) -> None:
    """Bytes written by Debian's real xc_domain_save (16-page guest, pfns
    0xa and 0xb absent)."""
    report = scan_path(str(HELPER / name))
    assert report.error is None, report.error
    assert report.layer == "libxc"
    assert names(report) == ["X86_CPUID_POLICY", "X86_MSR_POLICY", "STATIC_DATA_END",
                             "PAGE_DATA", "X86_TSC_INFO", "HVM_CONTEXT", "HVM_PARAMS", "END"]
    offsets = {r.name: (r.offset, r.length) for r in report.records}
    assert offsets["X86_CPUID_POLICY"] == (0x28, 96)
    assert offsets["PAGE_DATA"] == (0xC0, 57480)
    assert offsets["HVM_PARAMS"] == (0xE1A0, 72)
    assert offsets["END"][0] == 0xE1F0
    pages = report.pages
    assert (pages.pfns, pages.with_data, pages.holes) == (16, 14, 2)
    params = next(r for r in report.records if r.name == "HVM_PARAMS").detail
    assert "[1]=0xf" in params and "[17]=0xe" in params


@pytest.mark.parametrize("name", ["shim-save-sigterm-while-waiting.iofd.bin",
                                  "shim-save-stdin-eof.iofd.bin",
                                  "shim-save-suspend-refused.iofd.bin"])
def test_cut_helper_streams_are_truncated(name: str) -> None:
    report = scan_path(str(HELPER / name))
    assert isinstance(report.error, TruncatedStream)
    assert report.error.offset == 0xB8
    assert names(report)[-1] == "X86_PV_P2M_FRAMES"


def test_empty_stream_is_truncated() -> None:
    report = scan_path(str(HELPER / "pure-save.iofd.bin"))
    assert isinstance(report.error, TruncatedStream)
    assert report.error.offset == 0


def test_remus_stream_needs_checkpointed_mode() -> None:
    path = str(HELPER / "shim-save-remus-one-checkpoint.iofd.bin")
    plain = scan_path(path)
    assert isinstance(plain.error, StreamError)
    assert plain.error.offset == 0xA588
    assert "CHECKPOINT in a non-checkpointed stream" in str(plain.error)
    remus = scan_path(path, checkpointed=True)
    assert remus.error is None, remus.error
    assert remus.checkpoints == 1
    assert names(remus)[-1] == "CHECKPOINT"


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_pipe_scan_matches_file_scan(name: str) -> None:
    path = STREAMS / name
    from_file = scan_path(str(path))
    from_pipe = scan_pipe(path.read_bytes())
    assert from_pipe.error is None
    assert from_pipe.size is None
    assert [(r.name, r.offset, r.length) for r in from_pipe.records] == \
        [(r.name, r.offset, r.length) for r in from_file.records]
    assert from_pipe.pages == from_file.pages


@pytest.mark.skipif(not verifier_available(), reason="Debian verify-stream-v2 not installed")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_debian_verifier_agrees_on_vectors(name: str) -> None:
    rc, out = run_verifier(STREAMS / name, name.rsplit(".", 1)[1])
    assert rc == 0, out
