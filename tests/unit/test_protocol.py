"""pyxl.wire.codec against bytes captured from Debian's helper, and its strictness."""

import re
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pyxl.wire import codec as protocol
from pyxl.errors import LocalProtocolError
from pyxl.wire.codec import Conversation, Decoder, ProtocolError, encode, encode_reply

from conftest import HELPER_VECTORS, SLOW

LINE = re.compile(r"^#(\d+) @(0x[0-9a-f]+) len=(\d+)\s+msg (\d+) (\w+)\((.*?)\)(\s+\[.*\])?$")


def render(msg: protocol.Message) -> str:
    """The capture's own notation for a decoded message."""
    parts = []
    for arg, wtype in msg.ARGS:
        v = getattr(msg, arg)
        if arg == "level":
            parts.append(f"level={v}({protocol.LOG_LEVELS[v]})")
        elif wtype == "string":
            parts.append(f"{arg}={v!r}")
        elif arg.endswith("_gfn"):
            parts.append(f"{arg}={v:#x}")
        else:
            parts.append(f"{arg}={v}")
    return f"{msg.NAME}({', '.join(parts)})"


def expected(decoded_txt):
    out = []
    for line in decoded_txt.read_text().splitlines():
        m = LINE.match(line)
        if m:
            out.append((int(m.group(2), 16), int(m.group(4)), f"{m.group(5)}({m.group(6)})"))
    return out


CAPTURES = sorted(p for p in HELPER_VECTORS.glob("*.stdout.bin"))


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name.split(".")[0])
def test_capture_decodes_as_recorded_and_reencodes(path):
    data = path.read_bytes()
    want = expected(path.with_name(path.name.replace(".stdout.bin", ".decoded.txt")))
    msgs = Decoder().feed(data)
    assert [(m.NUMBER, render(m)) for m in msgs] == [(n, s) for _, n, s in want]
    assert b"".join(encode(m) for m in msgs) == data


@pytest.mark.parametrize("path", CAPTURES, ids=lambda p: p.name.split(".")[0])
def test_capture_decodes_byte_by_byte(path):
    data = path.read_bytes()
    d = Decoder()
    got = []
    for i in range(len(data)):
        got += d.feed(data[i:i + 1])
    d.eof()
    assert got == Decoder().feed(data)


def test_capture_replies_match_encode_reply():
    # libxl's replies in the live save: logdirty-on 0, suspend 1, logdirty-off 0, complete 0
    data = (HELPER_VECTORS / "shim-save-hvm-live-file.stdin.bin").read_bytes()
    assert data == b"".join(encode_reply(v) for v in (0, 1, 0, 0))


def frame(body: bytes) -> bytes:
    return struct.pack("<H", len(body)) + body


def test_unknown_message_number_names_offset():
    data = encode(protocol.Suspend()) + frame(struct.pack("<H", 12))
    with pytest.raises(ProtocolError) as e:
        Decoder().feed(data)
    assert e.value.offset == 4 and "unknown message number 12" in str(e.value)


def test_precopy_round_only_when_negotiated():
    """pyxl's extension message is refused unless the host asked for it: a helper
    speaking Xen's protocol (Debian's) is held to exactly Xen's messages."""
    from pyxl.wire.codec import Conversation, PrecopyRound
    msg = PrecopyRound(iteration=1, sent_pages=10, dirty_pages=5, dirty_rate=100,
                       bandwidth=1000, predicted_us=500, elapsed_us=20000)
    with pytest.raises(ProtocolError, match="not negotiated"):
        Conversation("save").receive(encode(msg))
    conv = Conversation("save", extensions=frozenset({"precopy_round"}))
    assert conv.receive(encode(msg)) == [msg]
    assert conv.reply(1) == struct.pack("<i", 1)
    with pytest.raises(ProtocolError):     # a save-only message
        Conversation("restore", extensions=frozenset({"precopy_round"})).receive(encode(msg))


@pytest.mark.parametrize("body,reason", [
    (struct.pack("<HI", 10, 0), "length 6 impossible"),               # complete missing errnoval
    (struct.pack("<Hiii", 10, 0, 0, 0), "length 14 impossible"),      # one int too many
    (struct.pack("<H", 3) + b"\0", "length 3 impossible"),             # suspend + junk
    (struct.pack("<HI", 1, 1), "length 6 impossible"),                # log: no room for its strings
    (struct.pack("<HIII", 1, 1, 0, 0) + bytes(6), "size 0"),          # log with empty string
    (struct.pack("<HIII", 1, 1, 0, 2) + b"ab" + struct.pack("<I", 1) + b"\0", "NUL"),
    (struct.pack("<HIII", 1, 1, 0, 99) + b"ab\0" + bytes(3), "overruns"),
    (b"\x05", "no message number"),
])
def test_malformed_bodies(body, reason):
    with pytest.raises(ProtocolError) as e:
        Decoder().feed(frame(body))
    assert reason in str(e.value)
    assert e.value.offset == 0


@pytest.mark.parametrize("head,reason", [
    (b"this is not the helper protocol\n", "unknown message number 29545"),
    (struct.pack("<HH", 4000, 10), "length 4000 impossible"),         # complete, 4000 bytes
    (struct.pack("<HH", 100, 3), "length 100 impossible"),            # suspend has no arguments
])
def test_a_frame_that_can_never_be_valid_fails_on_its_first_four_bytes(head, reason):
    """Text on the helper's stdout must not leave us waiting for the 26 KB
    body its first two bytes announce: the head alone already rules it out."""
    for cut in (4, len(head)):
        with pytest.raises(ProtocolError, match=reason) as e:
            Decoder(mode="save").feed(head[:cut])
        assert e.value.offset == 0


def test_a_valid_head_waits_for_its_body():
    data = encode(protocol.Log(8, 0, "xc", "x" * 1000))
    d = Decoder(mode="save")
    assert d.feed(data[:4]) == [] and d.feed(data[4:-1]) == []
    assert d.feed(data[-1:]) == [protocol.Log(8, 0, "xc", "x" * 1000)]


def test_cut_frame_at_eof():
    d = Decoder()
    data = encode(protocol.Complete(0, 0))
    assert d.feed(data[:-3]) == []
    with pytest.raises(ProtocolError, match="ended inside a frame body"):
        d.eof()


def test_poisoned_after_error():
    d = Decoder()
    with pytest.raises(ProtocolError):
        d.feed(frame(struct.pack("<H", 0)))
    with pytest.raises(ProtocolError):
        d.feed(encode(protocol.Suspend()))


def test_mode_checks_sender():
    with pytest.raises(ProtocolError, match="not sent by a save helper"):
        Decoder("save").feed(encode(protocol.StaticDataDone(0)))
    assert Decoder("restore").feed(encode(protocol.StaticDataDone(3))) == [protocol.StaticDataDone(3)]


def test_conversation_rules():
    c = Conversation("save", cbflags=136)
    assert c.receive(encode(protocol.Suspend())) == [protocol.Suspend()]
    with pytest.raises(ProtocolError, match="still awaits its reply"):
        c.receive(encode(protocol.Log(1, 0, "x", "y")))
    c = Conversation("save", cbflags=136)
    with pytest.raises(ProtocolError, match="not enabled in CBFLAGS"):
        c.receive(encode(protocol.Checkpoint()))
    c = Conversation("save", cbflags=136)
    c.receive(encode(protocol.Complete(0, 0)))
    assert c.reply(0) == b"\0\0\0\0"
    with pytest.raises(LocalProtocolError):
        c.reply(0)
    with pytest.raises(ProtocolError, match="after complete"):
        c.receive(encode(protocol.Log(1, 0, "x", "y")))


def test_cbflags_for():
    assert protocol.cbflags_for(("suspend", "switch_qemu_logdirty")) == 136
    assert protocol.cbflags_for(("static_data_done", "restore_results")) == 768
    with pytest.raises(ValueError):
        protocol.cbflags_for(("log",))


def test_non_utf8_text_roundtrips():
    msg = protocol.Log(8, -1, "xc", b"bad \xff byte".decode("utf-8", "surrogateescape"))
    assert Decoder().feed(encode(msg)) == [msg]


@settings(max_examples=10000 if SLOW else 300, deadline=None)
@given(st.lists(st.binary(max_size=300), max_size=8))
def test_arbitrary_bytes_only_protocol_error(chunks):
    d = Decoder()
    try:
        for c in chunks:
            d.feed(c)
        d.eof()
    except ProtocolError:
        pass
    assert d.pending <= 2 + 0xFFFF


def test_error_keeps_the_valid_messages_before_it():
    log = protocol.Log(8, -1, "xc", "Save failed")
    data = encode(log) + frame(struct.pack("<H", 42))
    with pytest.raises(ProtocolError) as e:
        Decoder().feed(data)
    assert e.value.before == [log] and e.value.offset == len(encode(log))
    c = Conversation("save", cbflags=136)
    with pytest.raises(ProtocolError, match="not enabled in CBFLAGS") as e:
        c.receive(encode(log) + encode(protocol.Checkpoint()) + frame(struct.pack("<H", 42)))
    assert e.value.before == [log]
