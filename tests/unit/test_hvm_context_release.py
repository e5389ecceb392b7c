"""inspect names the Xen release an HVM stream came from where the stream
tells it: Xen 4.20.1 grew the LAPIC save record from 24 to 32 bytes (4.20
loads either; 4.17 refuses the longer one), so a 32-byte record is flagged."""

from __future__ import annotations

import struct

import pytest

from pyxl.stream.libxc import LibxcRecordType
from stream_support import hvm_chunks, scan


def context(lapic_len: int) -> bytes:
    def rec(code: int, payload: bytes) -> bytes:
        return struct.pack("<HHI", code, 0, len(payload)) + payload
    header = struct.pack("<IIQII", 0x54381286, 1, 0, 0x306C3, 2400000)
    return b"".join([rec(1, header), rec(2, bytes(1032)), rec(5, bytes(lapic_len)),
                     rec(6, bytes(1024)), rec(0, b"")])


def hvm_context_detail(blob: bytes):
    rep = scan(b"".join(hvm_chunks(hvm_context=blob)), layer="libxc")
    assert rep.error is None, rep.error
    (rec,) = [r for r in rep.records if r.rtype == LibxcRecordType.HVM_CONTEXT]
    return rec.detail, rep.warnings


@pytest.mark.parametrize("lapic,says,warned", [
    (24, "LAPIC 24 bytes: Xen 4.17 to 4.20.0", False),
    (32, "LAPIC 32 bytes: Xen 4.20.1 or later", True),
])
def test_lapic_record_names_the_release(lapic, says, warned):
    detail, warnings = hvm_context_detail(context(lapic))
    assert detail == f"5 save records; {says}"
    assert any("Xen 4.17 cannot restore it" in w for w in warnings) == warned


def test_a_context_without_records_is_only_counted():
    detail, warnings = hvm_context_detail(bytes(range(40)))
    assert "LAPIC" not in detail and warnings == []
