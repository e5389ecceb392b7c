"""libxl's emulator records as pyxl.backends.devicemodel builds and checks them."""

import struct

import pytest

from pyxl.backends.devicemodel import (EMULATOR_CONTEXT, EMULATOR_XENSTORE_DATA,
                                       emulator_context, emulator_records,
                                       emulator_xenstore_data)
from pyxl.errors import DeviceModelError

HDR = struct.pack("<II", 2, 0)


def test_context_only_without_xenstore_keys():
    assert emulator_records(b"state") == [(EMULATOR_CONTEXT, HDR + b"state")]
    assert emulator_records(b"state", {}) == [(EMULATOR_CONTEXT, HDR + b"state")]
    assert emulator_context(emulator_records(b"state")) == b"state"
    assert emulator_context([]) is None
    assert emulator_xenstore_data(emulator_records(b"s")) == {}


def test_xenstore_data_roundtrip():
    keys = {"physmap/1/start_addr": "f0000000", "physmap/1/size": "800000",
            "physmap/1/name": "vga.vram"}
    recs = emulator_records(b"s", keys)
    assert [t for t, _ in recs] == [EMULATOR_XENSTORE_DATA, EMULATOR_CONTEXT]
    assert recs[0][1] == HDR + b"physmap/1/start_addr\0f0000000\0physmap/1/size\0800000\0" \
                               b"physmap/1/name\0vga.vram\0"
    assert emulator_xenstore_data(recs) == keys


@pytest.mark.parametrize("records,match", [
    ([(EMULATOR_CONTEXT, b"\2\0\0")], "no emulator header"),
    ([(EMULATOR_CONTEXT, struct.pack("<II", 1, 0) + b"x")], "emulator 1 index 0"),
    ([(EMULATOR_CONTEXT, struct.pack("<II", 2, 1) + b"x")], "emulator 2 index 1"),
    ([(EMULATOR_CONTEXT, HDR), (EMULATOR_CONTEXT, HDR)], "2 emulator records"),
])
def test_bad_context_records(records, match):
    with pytest.raises(DeviceModelError, match=match):
        emulator_context(records)


@pytest.mark.parametrize("body,match", [
    (b"k\0v", "not NUL-terminated"),
    (b"k\0v\0k2\0", "without a value"),
    (b"/abs\0v\0", "empty or absolute"),
    (b"\0v\0", "empty or absolute"),
])
def test_bad_xenstore_data(body, match):
    with pytest.raises(DeviceModelError, match=match):
        emulator_xenstore_data([(EMULATOR_XENSTORE_DATA, HDR + body)])
