"""The sans-I/O pieces that take untrusted bytes before a restore: the stream
head (pyxl/ops/streamhead.py), the bounded trailer (pyxl/ops/trailer.py) and
the config check (pyxl/backends/configcheck.py).  Each input is fed whole and
one unit at a time; any bytes give a result or a typed error, nothing else."""

from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pyxl
from pyxl.backends.configcheck import check_config
from pyxl.ops.streamhead import HeadParser, read_head
from pyxl.ops.trailer import (MAX_RECORDS, TrailerLimits, TrailerParser, TrailerTooLarge,
                              read_trailer)
from pyxl.stream.libxl import LibxlRecordType as T
from pyxl.stream.libxl import libxl_record
from pyxl.stream.xl import save_prologue

CONFIG = {"c_info": {"type": "hvm", "name": "g0", "uuid": "8c6c3a0e-1c4b-4b8e-9b59-6a3f2b1c0d9e"},
          "b_info": {"max_memkb": 16384, "target_memkb": 16384, "max_vcpus": 2,
                     "avail_vcpus": [0, 1]}}
EMU = struct.pack("<II", 2, 0)


def feed_units(parser, data: bytes) -> bytes:
    """Feed ``data`` in the exact units the parser asks for; the bytes left over."""
    pos = 0
    while parser.need():
        n = parser.need()
        if pos + n > len(data):
            raise parser.eof(len(data) - pos)
        if parser.feed(data[pos:pos + n]):
            pos += n
            break
        pos += n
    return data[pos:]


def from_pipe(data: bytes, fn):
    r, w = os.pipe()
    try:
        os.write(w, data)
        os.close(w)
        w = -1
        return fn(r)
    finally:
        os.close(r)
        if w >= 0:
            os.close(w)


# ---- the stream head ---------------------------------------------------------------------------

def test_head_parser_reads_exactly_the_head():
    head = save_prologue(CONFIG)
    parser = HeadParser()
    assert feed_units(parser, head + b"LIBXC...") == b"LIBXC..."
    assert parser.header is not None and parser.header.config == CONFIG
    assert from_pipe(head, read_head).config == CONFIG


def test_head_without_config():
    parser = HeadParser()
    feed_units(parser, save_prologue(None))
    assert parser.done and parser.header is not None and parser.header.config is None


def test_head_must_start_with_an_empty_libxc_context():
    bad = save_prologue(CONFIG)[:-8] + libxl_record(T.END)
    with pytest.raises(pyxl.StreamError, match="not an empty LIBXC_CONTEXT"):
        feed_units(HeadParser(), bad)


def test_head_truncated_anywhere_is_a_truncated_stream():
    head = save_prologue(CONFIG)
    for cut in (0, 10, 48, 60, len(head) - 20, len(head) - 1):
        with pytest.raises(pyxl.TruncatedStream):
            from_pipe(head[:cut], read_head)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_head_any_bytes_give_a_head_or_a_stream_error(data):
    try:
        feed_units(HeadParser(), save_prologue(CONFIG)[:52] + data)
    except pyxl.StreamError:
        pass


# ---- the trailer -------------------------------------------------------------------------------

def emu(rtype: int, size: int) -> bytes:
    return libxl_record(rtype, EMU + bytes(size - len(EMU)))


def test_trailer_within_bounds():
    data = emu(T.EMULATOR_XENSTORE_DATA, 64) + emu(T.EMULATOR_CONTEXT, 4096) + \
        libxl_record(T.END) + b"handshake"
    parser = TrailerParser()
    assert feed_units(parser, data) == b"handshake"
    assert [(t, len(b)) for t, b in parser.records] == [(2, 64), (3, 4096)]
    assert from_pipe(data, read_trailer) == parser.records


@pytest.mark.parametrize("records,limits,bound", [
    ([emu(T.EMULATOR_CONTEXT, 8)] * (MAX_RECORDS + 1), TrailerLimits(), "records"),
    ([emu(T.EMULATOR_CONTEXT, 600), emu(T.EMULATOR_CONTEXT, 600)],
     TrailerLimits(emulator_context=1000), "EMULATOR_CONTEXT bytes"),
    ([emu(T.EMULATOR_XENSTORE_DATA, 2048)], TrailerLimits(xenstore_data=1024),
     "EMULATOR_XENSTORE_DATA bytes"),
])
def test_trailer_bounds_are_checked_on_the_record_header(records, limits, bound):
    """The record past a bound is refused from its 8-byte header alone: its
    body is never asked for."""
    data = b"".join(records)
    last = len(data) - len(records[-1])
    parser = TrailerParser(limits=limits)
    with pytest.raises(TrailerTooLarge) as info:
        feed_units(parser, data[:last + 8])
    assert info.value.bound == bound
    assert f"bound on {bound}" in str(info.value) and "\n" not in str(info.value)


def test_a_few_mib_of_device_state_by_default():
    """The default bound is a few MiB (QEMU's real state: a few KiB): 4 MiB is
    taken, a byte more is refused from the header."""
    header = struct.pack("<II", T.EMULATOR_CONTEXT, (4 << 20) + 1)
    with pytest.raises(TrailerTooLarge, match="EMULATOR_CONTEXT"):
        TrailerParser().feed(header)
    parser = TrailerParser()
    parser.feed(struct.pack("<II", T.EMULATOR_CONTEXT, 4 << 20))
    assert parser.need() == 4 << 20


class Declares:
    max_emulator_context = 128 << 20


class DeclaresNonsense:
    max_emulator_context = True


def test_backend_declares_its_device_model_state():
    assert TrailerLimits.for_backend(Declares()).emulator_context == 128 << 20
    assert TrailerLimits.for_backend(DeclaresNonsense()) == TrailerLimits()
    assert TrailerLimits.for_backend(object()) == TrailerLimits()


# ---- the config --------------------------------------------------------------------------------

def test_good_configs_pass():
    check_config(CONFIG)
    check_config({"b_info": {"max_memkb": 1}})
    check_config(dict(CONFIG, b_info=dict(CONFIG["b_info"], video_memkb=(1 << 64) - 1)))
    # devices as xl writes them: scripts by name or in the host's script directory
    check_config(dict(CONFIG, disks=[{"vdev": "xvda", "pdev_path": "/srv/a,b.img", "format": "raw",
                                      "script": "block"}],
                      nics=[{"mac": "00:16:3E:00:00:03", "bridge": "xenbr0", "model": "e1000",
                             "script": "/etc/xen/scripts/vif-bridge", "ip": "10.0.0.2 fe80::1/64",
                             "nictype": "vif_ioemu"}],
                      b_info=dict(CONFIG["b_info"], **{"type.hvm": {
                          "serial": "pty", "boot": "cd", "keymap": "en-us"}})))


JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
                    lambda kids: st.lists(kids, max_size=4) |
                    st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=30)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["c_info", "b_info", "x"]), JSON, max_size=3))
def test_any_config_passes_or_is_a_config_error(config):
    try:
        check_config(config)
    except pyxl.ConfigError as exc:
        assert "\n" not in str(exc)
