"""xl's migration handshake, sans-I/O (pyxl.migrate.handshake): both roles fed
each exchange whole, byte by byte and with trailing bytes; bad peers; the
exact bytes xl sends and expects.  No processes, no sockets."""

from __future__ import annotations

import ast
import struct
from typing import Any, Callable, Iterator, List, Union

import pytest

from pyxl.errors import LocalProtocolError, MigrationError, MigrationProtocolError
from pyxl.migrate import handshake as hs
from pyxl.migrate.handshake import (CHOSEN, NEED_DATA, RESTORED, Banner, ClearedToUnpause,
                                    CompressionChosen, ConnectionClosed, DomainReceived,
                                    ReceiverFailed, ReceiverHandshake, ReceiverProgress,
                                    SenderHandshake, StreamHead, StreamStart, UnpauseResult)
from pyxl.stream import xl as stream_xl
from pyxl.stream.xl import XL_OPTIONAL_PYXL_ZSTD, xl_header

# Xen 4.17, tools/xl/xl_migrate.c: the banner is written without its NUL
# (sizeof - 1), the other three with it (sizeof); the status is one byte.
XL_BANNER = b"xl migration receiver ready, send binary domain data.\n"
XL_READY = b"domain received, ready to unpause\x00"
XL_GO = b"domain is yours, you are cleared to unpause\x00"
XL_REPORT = b"my copy unpause results are as follows\x00"
PYXL_FAILED = b"domain receive failed: "

CONFIG = {"c_info": {"name": "web1", "type": "pv"}, "b_info": {"max_vcpus": 1}}
HEAD = stream_xl.save_prologue(CONFIG)   # xl header + libxl header + LIBXC_CONTEXT

Event = Union[hs.Event, Any]


def split(data: bytes, how: str) -> Iterator[bytes]:
    if how == "whole":
        yield data
    else:
        for i in range(len(data)):
            yield data[i:i + 1]


def feed(machine: Any, data: bytes, how: str = "whole") -> List[Event]:
    """Feed ``data`` (whole or byte by byte), collecting every event."""
    events: List[Event] = []
    for chunk in split(data, how):
        machine.receive_data(chunk)
        while True:
            ev = machine.next_event()
            if ev is NEED_DATA:
                break
            events.append(ev)
            if isinstance(ev, ConnectionClosed):
                return events
    return events


def eof(machine: Any) -> Event:
    machine.receive_data(b"")
    return machine.next_event()


# ---- the bytes -------------------------------------------------------------------------------


def test_constants_are_xls_bytes():
    assert hs.BANNER == XL_BANNER
    assert hs.READY == XL_READY
    assert hs.GO == XL_GO
    assert hs.REPORT == XL_REPORT
    assert hs.FAILED == PYXL_FAILED
    assert hs.MESSAGE_MAX == 4096 and hs.HEAD_MAX == 512 << 10


def test_bytes_each_role_sends():
    rx, tx = ReceiverHandshake(), SenderHandshake()
    assert rx.send(Banner()) == XL_BANNER
    assert feed(tx, XL_BANNER) == [Banner()]
    assert feed(rx, HEAD)[0].data == HEAD
    tx.stream_sent()
    assert rx.send(DomainReceived()) == XL_READY
    assert feed(tx, XL_READY) == [DomainReceived()]
    assert tx.send(ClearedToUnpause()) == XL_GO
    assert feed(rx, XL_GO) == [ClearedToUnpause()]
    assert rx.send(UnpauseResult(0)) == XL_REPORT + b"\x00"
    assert feed(tx, XL_REPORT + b"\x00") == [UnpauseResult(0)]
    assert tx.state == SenderHandshake.DONE and rx.state == ReceiverHandshake.DONE


def test_failed_message_bytes():
    rx = ReceiverHandshake()
    rx.send(Banner())
    assert rx.send(ReceiverFailed("restore failed: no memory")) == \
        PYXL_FAILED + b"restore failed: no memory\x00"


# ---- whole exchanges -------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("status", [0, 1, 255])
def test_full_exchange(how, status):
    """Each side's output fed to the other, whole or a byte at a time."""
    tx, rx = SenderHandshake(), ReceiverHandshake()
    assert tx.state == SenderHandshake.AWAIT_BANNER
    assert feed(tx, rx.send(Banner()), how) == [Banner()]
    assert tx.state == SenderHandshake.STREAMING
    events = feed(rx, HEAD, how)
    assert len(events) == 1 and isinstance(events[0], StreamHead)
    head = events[0]
    assert head.data == HEAD and head.rest == b""
    assert head.header is not None and head.header.config == CONFIG
    assert rx.state == ReceiverHandshake.STREAMING and rx.wanted == 0
    tx.stream_sent()
    assert feed(tx, rx.send(DomainReceived()), how) == [DomainReceived()]
    assert feed(rx, tx.send(ClearedToUnpause()), how) == [ClearedToUnpause()]
    assert feed(tx, rx.send(UnpauseResult(status)), how) == [UnpauseResult(status)]
    assert tx.trailing_data == b"" and rx.trailing_data == b""
    assert eof(tx) == ConnectionClosed() and eof(rx) == ConnectionClosed()


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_receiver_failing_while_streaming(how):
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    assert feed(tx, PYXL_FAILED + "no room for 512 MiB: ü".encode() + b"\0", how) == \
        [ReceiverFailed("no room for 512 MiB: ü")]
    assert tx.state == SenderHandshake.DONE


def test_receiver_failing_after_stream_sent():
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    assert feed(tx, PYXL_FAILED + b"\xff bad\0") == [ReceiverFailed("\ufffd bad")]


def test_xl_receiver_that_just_exits():
    """xl's receiver has no FAILED: it exits, which is EOF between messages."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    assert eof(tx) == ConnectionClosed()
    assert eof(tx) == ConnectionClosed()   # and stays so


def test_trailing_bytes_sender():
    """Bytes after a message are kept for the next one (or as trailing data)."""
    tx = SenderHandshake()
    assert feed(tx, XL_BANNER + XL_READY[:5]) == [Banner()]
    assert tx.trailing_data == XL_READY[:5]
    tx.stream_sent()
    assert feed(tx, XL_READY[5:]) == [DomainReceived()]
    tx.send(ClearedToUnpause())
    assert feed(tx, XL_REPORT + b"\x00" + b"extra") == [UnpauseResult(0)]
    assert tx.trailing_data == b"extra" and tx.next_event() is NEED_DATA
    assert eof(tx) == ConnectionClosed()


def test_trailing_bytes_receiver_head_and_go():
    rx = ReceiverHandshake()
    rx.send(Banner())
    events = feed(rx, HEAD + b"libxc stream")
    assert events == [StreamHead(HEAD, events[0].header, b"libxc stream")]
    assert rx.trailing_data == b""   # the rest belongs to the stream, not the handshake
    rx.send(DomainReceived())
    assert feed(rx, XL_GO + b"junk") == [ClearedToUnpause()]
    assert rx.trailing_data == b"junk"


def test_receiver_exact_reads():
    """``wanted`` never asks past the head, so the rest stays for the relay."""
    rx = ReceiverHandshake()
    assert rx.wanted == stream_xl.XL_HEADER.size
    rx.send(Banner())
    got = b""
    while rx.state == ReceiverHandshake.AWAIT_HEAD:
        n = rx.wanted
        assert 0 < n <= len(HEAD) - len(got)
        rx.receive_data(HEAD[len(got):len(got) + n])
        got += HEAD[len(got):len(got) + n]
        ev = rx.next_event()
    assert got == HEAD and isinstance(ev, StreamHead) and ev.rest == b""
    assert rx.wanted == 0


def test_head_without_config_or_with_bad_config():
    rx = ReceiverHandshake()
    rx.send(Banner())
    head = stream_xl.save_prologue(None)
    (ev,) = feed(rx, head)
    assert ev.data == head and ev.header is not None and ev.header.config is None
    # A config that does not parse: the head is still handed on (the restore says why).
    optdata = struct.pack("=I", 4) + b"{x}\0"
    xlh = stream_xl.XL_HEADER.pack(stream_xl.XL_MAGIC, stream_xl.XL_BYTEORDER, 3, 0,
                                   len(optdata))
    bad = xlh + optdata + HEAD[len(stream_xl.xl_header(CONFIG)):]
    rx = ReceiverHandshake()
    rx.send(Banner())
    (ev,) = feed(rx, bad)
    assert ev.data == bad and ev.header is None


# ---- bad peers -------------------------------------------------------------------------------


def poisoned(machine: Any) -> None:
    """After a protocol error every next_event raises, whatever comes."""
    with pytest.raises(MigrationProtocolError, match="already failed"):
        machine.next_event()
    assert machine.state == "error"


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("reply", [b"HTTP/1.1 400 Bad Request\r\n\r\n",
                                   XL_BANNER[:-1] + b"\0",
                                   b"SSH-2.0-OpenSSH_9.2p1\r\n"])
def test_sender_wrong_banner(how, reply):
    tx = SenderHandshake()
    with pytest.raises(MigrationProtocolError, match="not a migration receiver: it said") as ei:
        feed(tx, reply, how)
    assert isinstance(ei.value, MigrationError)
    poisoned(tx)
    with pytest.raises(LocalProtocolError):
        tx.send(ClearedToUnpause())


def test_sender_wrong_banner_seen_at_first_wrong_byte():
    tx = SenderHandshake()
    tx.receive_data(b"xl migration sender")
    with pytest.raises(MigrationProtocolError, match=r"it said b'xl migration sender'"):
        tx.next_event()


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_sender_oversized_message(how):
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    with pytest.raises(MigrationProtocolError, match="the receiver sent garbage"):
        feed(tx, b"A" * hs.MESSAGE_MAX, how)
    poisoned(tx)


def test_sender_message_at_the_limit_is_fine():
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    reason = "r" * (hs.MESSAGE_MAX - len(PYXL_FAILED) - 1)
    assert feed(tx, PYXL_FAILED + reason.encode() + b"\0") == \
        [ReceiverFailed(reason[:hs.REASON_MAX - 1] + "…")]      # kept: its start


def test_sender_oversized_nul_message_in_one_read():
    """The NUL must come within the limit, however the bytes arrive."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    with pytest.raises(MigrationProtocolError, match="garbage"):
        feed(tx, PYXL_FAILED + b"r" * hs.MESSAGE_MAX + b"\0")


@pytest.mark.parametrize("state", ["banner", "streaming", "report"])
def test_sender_eof_mid_message(state):
    tx = SenderHandshake()
    partial = XL_BANNER[:10]
    if state != "banner":
        feed(tx, XL_BANNER)
        partial = XL_READY[:10]
    if state == "report":
        tx.stream_sent()
        feed(tx, XL_READY)
        tx.send(ClearedToUnpause())
        partial = XL_REPORT
    tx.receive_data(partial)
    assert tx.next_event() is NEED_DATA
    with pytest.raises(MigrationProtocolError,
                       match="the receiver closed the connection in the middle of a message"):
        eof(tx)
    poisoned(tx)


def test_sender_ready_before_stream_sent_waits_for_it():
    """A compressed stream's END can reach the receiver before the sender's
    relay saw its pipe's EOF: READY is held until stream_sent(), not lost."""
    tx = SenderHandshake()
    assert feed(tx, XL_BANNER) == [Banner()]
    tx.receive_data(XL_READY)
    assert tx.next_event() is NEED_DATA and tx.state == SenderHandshake.STREAMING
    tx.stream_sent()
    assert isinstance(tx.next_event(), DomainReceived)


def test_sender_compression_answer():
    tx = _streaming(offered=True)
    tx.receive_data(CHOSEN + b"zstd\0")
    assert tx.next_event() == CompressionChosen("zstd")
    with pytest.raises(MigrationProtocolError, match="unknown compression 'lz4'"):
        feed(_streaming(offered=True), CHOSEN + b"lz4\0")
    _refused_unasked(CHOSEN + b"zstd\0")


def _streaming(offered: bool) -> SenderHandshake:
    """A sender past the banner (that offered compression, or not)."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    if offered:
        tx.offer_sent()
    return tx


def _refused_unasked(message: bytes) -> None:
    with pytest.raises(MigrationProtocolError, match="unexpected message"):
        feed(_streaming(offered=False), message)


OFFER_HEAD = xl_header({"c_info": {"name": "g"}}, optional_flags=XL_OPTIONAL_PYXL_ZSTD)


def _answered(name: str, start: bytes) -> ReceiverHandshake:
    """A receiver that got an offer, answered ``name`` and was fed ``start``."""
    rx = ReceiverHandshake()
    rx.send(Banner())
    rx.receive_data(OFFER_HEAD)
    ev = rx.next_event()
    assert isinstance(ev, StreamHead) and ev.offered and ev.data == OFFER_HEAD
    assert rx.wanted == 0 and rx.state == ReceiverHandshake.CHOOSING
    assert rx.send(CompressionChosen(name)) == CHOSEN + name.encode() + b"\0"
    assert rx.wanted == 4
    rx.receive_data(start)
    return rx


def test_progress_of_a_compressed_stream():
    rx = _answered("zstd", b"\x28\xb5\x2f\xfd")
    rx.next_event()
    assert rx.send(ReceiverProgress(123456)) == RESTORED + b"123456\0"
    plain = _answered("none", b"Libx")
    plain.next_event()
    with pytest.raises(LocalProtocolError):
        plain.send(ReceiverProgress(1))          # only a compressed stream reports
    tx = _streaming(offered=True)
    assert feed(tx, CHOSEN + b"zstd\0" + RESTORED + b"42\0") == [CompressionChosen("zstd"),
                                                                  ReceiverProgress(42)]
    with pytest.raises(MigrationProtocolError, match="bad progress"):
        feed(tx, RESTORED + b"-1\0")
    _refused_unasked(RESTORED + b"42\0")


def test_receiver_offer_answer_and_start():
    zstd = b"\x28\xb5\x2f\xfd"
    assert _answered("zstd", zstd).next_event() == StreamStart(zstd, True)
    assert _answered("none", b"Libx").next_event() == StreamStart(b"Libx", False)
    with pytest.raises(MigrationProtocolError, match="neither a zstd frame nor a libxl"):
        _answered("zstd", b"XXXX").next_event()


def test_sender_unexpected_message():
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    with pytest.raises(MigrationProtocolError, match="unexpected message from the receiver"):
        feed(tx, b"domain received, ready to unpause NOW\0")


@pytest.mark.parametrize("how", ["whole", "bytewise"])
@pytest.mark.parametrize("reply", [b"my copy unpause results are as followz\0\0",
                                   PYXL_FAILED + b"timeout\0"])
def test_sender_unexpected_report(how, reply):
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    feed(tx, XL_READY)
    tx.send(ClearedToUnpause())
    with pytest.raises(MigrationProtocolError, match="unexpected reply"):
        feed(tx, reply, how)
    poisoned(tx)


def test_receiver_not_an_xl_stream():
    rx = ReceiverHandshake()
    rx.send(Banner())
    with pytest.raises(MigrationProtocolError, match="not a migration stream: xl header"):
        feed(rx, b"GET / HTTP/1.0\r\n" + b"\0" * 64)
    poisoned(rx)


def test_receiver_head_over_the_limit():
    rx = ReceiverHandshake()
    rx.send(Banner())
    xlh = stream_xl.XL_HEADER.pack(stream_xl.XL_MAGIC, stream_xl.XL_BYTEORDER, 3, 0,
                                   hs.HEAD_MAX + 1)
    with pytest.raises(MigrationProtocolError, match="not a migration stream.*exceeds"):
        feed(rx, xlh)
    small = ReceiverHandshake(head_max=16)
    small.send(Banner())
    with pytest.raises(MigrationProtocolError, match="exceeds pyxl's limit 0x10"):
        feed(small, HEAD)


def test_receiver_eof_before_and_in_the_head():
    rx = ReceiverHandshake()
    rx.send(Banner())
    assert eof(rx) == ConnectionClosed()
    rx = ReceiverHandshake()
    rx.send(Banner())
    feed(rx, HEAD[:60])
    with pytest.raises(MigrationProtocolError,
                       match="the sender closed the connection in the middle of a message"):
        eof(rx)


def go_state() -> ReceiverHandshake:
    rx = ReceiverHandshake()
    rx.send(Banner())
    feed(rx, HEAD)
    rx.send(DomainReceived())
    return rx


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_receiver_wrong_go(how):
    rx = go_state()
    with pytest.raises(MigrationProtocolError,
                       match="unexpected message from the sender: b'domain is o"):
        feed(rx, b"domain is ours, you are cleared to unpause\0", how)
    poisoned(rx)
    # The receiver may still say why it gives up (and only once).
    assert rx.send(ReceiverFailed("bad sender")) == PYXL_FAILED + b"bad sender\0"
    with pytest.raises(LocalProtocolError):
        rx.send(ReceiverFailed("again"))


def test_receiver_eof_before_and_in_go():
    rx = go_state()
    assert eof(rx) == ConnectionClosed()
    rx = go_state()
    feed(rx, XL_GO[:-1])
    with pytest.raises(MigrationProtocolError, match="in the middle of a message"):
        eof(rx)


def test_receiver_after_failed_drops_input():
    rx = go_state()
    rx.send(ReceiverFailed("x"))
    assert feed(rx, b"whatever the sender says") == []
    assert rx.trailing_data == b""
    assert eof(rx) == ConnectionClosed()


# ---- what pyxl sends -------------------------------------------------------------------------


def test_failed_reason_is_one_bounded_message():
    rx = ReceiverHandshake()
    rx.send(Banner())
    msg = rx.send(ReceiverFailed("a\0b" + "é" * 5000))
    assert msg.startswith(PYXL_FAILED + b"a b") and msg.endswith("é".encode() + b"\0")
    assert len(msg) <= hs.MESSAGE_MAX and msg.count(b"\0") == 1
    msg.decode("utf-8")   # not cut inside a character
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    (ev,) = feed(tx, msg)
    assert isinstance(ev, ReceiverFailed) and ev.reason.startswith("a b") and "\ufffd" not in ev.reason


def test_a_receivers_reason_is_made_safe_as_it_is_received():
    """Escapes, separators and bidi overrides escaped, the length bounded: the
    reason goes into errors, logs and terminals as it is."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    said = "\x1b[1A\x1b[2Kmigrated\nforged: ERROR\u2028x\u202eevil\x07" + "A" * 3000
    (ev,) = feed(tx, PYXL_FAILED + said.encode() + b"\0")
    assert isinstance(ev, ReceiverFailed)
    assert ev.reason.startswith("\\x1b[1A\\x1b[2Kmigrated\\nforged: ERROR\\u2028x\\u202eevil\\x07AAA")
    assert ev.reason.isprintable() and len(ev.reason) == hs.REASON_MAX and ev.reason[-1] == "…"
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    assert feed(tx, PYXL_FAILED + b"\0") == [ReceiverFailed("(no reason given)")]


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_a_status_before_the_receiver_is_cleared_is_a_protocol_error(how):
    """A status now would come before the receiver could know it may run the
    guest: the source must not be given up on its word."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    with pytest.raises(MigrationProtocolError, match="spoke before it was cleared to unpause"):
        feed(tx, XL_READY + XL_REPORT + b"\x00", how)
    with pytest.raises(LocalProtocolError):
        tx.send(ClearedToUnpause())


@pytest.mark.parametrize("how", ["whole", "bytes"])
def test_a_receiver_may_fail_before_it_is_cleared(how):
    """pyxl's receiver gives up waiting to be cleared with its "failed": the
    sender takes it, and has nobody to clear."""
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    assert feed(tx, XL_READY + PYXL_FAILED + b"gave up waiting\0", how) == \
        [DomainReceived(), ReceiverFailed("gave up waiting")]
    assert tx.state == SenderHandshake.DONE
    with pytest.raises(LocalProtocolError):
        tx.send(ClearedToUnpause())
    tx = SenderHandshake()
    feed(tx, XL_BANNER)
    tx.stream_sent()
    feed(tx, XL_READY + PYXL_FAILED[:5])
    tx.receive_data(b"")
    with pytest.raises(MigrationProtocolError, match="in the middle of a message"):
        tx.next_event()


@pytest.mark.parametrize("bad", [
    lambda tx, rx: tx.send(ClearedToUnpause()),               # before READY
    lambda tx, rx: tx.send(Banner()),                         # not the sender's to send
    lambda tx, rx: tx.stream_sent(),                          # before the banner
    lambda tx, rx: rx.send(DomainReceived()),                 # before the banner and head
    lambda tx, rx: rx.send(ClearedToUnpause()),
    lambda tx, rx: rx.send(UnpauseResult(0)),                 # before GO
])
def test_sending_out_of_turn_is_a_local_error(bad: Callable[[Any, Any], Any]):
    with pytest.raises(LocalProtocolError):
        bad(SenderHandshake(), ReceiverHandshake())


def test_status_must_be_a_byte():
    rx = go_state()
    feed(rx, XL_GO)
    with pytest.raises(LocalProtocolError):
        rx.send(UnpauseResult(256))
    assert rx.send(UnpauseResult(1)) == XL_REPORT + b"\x01"


def test_data_after_eof_is_a_local_error():
    tx = SenderHandshake()
    tx.receive_data(b"")
    with pytest.raises(LocalProtocolError):
        tx.receive_data(b"x")


def test_events_are_frozen():
    with pytest.raises(Exception):
        ReceiverFailed("x").reason = "y"   # type: ignore[misc]


def test_handshake_does_no_io():
    """The module imports no os, select, socket, subprocess (nor the loop)."""
    tree = ast.parse(open(hs.__file__).read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.add(node.module or "")
    banned = {"os", "select", "socket", "subprocess", "pyxl.loop", "pyxl.fdio", "asyncio"}
    assert not names & banned, names & banned


def test_certificate_names_are_rfc6125_dns_names():
    """The allow-list's view of a certificate: DNS subjectAltNames (the CN only
    without them), lower-cased; matched without regard to case."""
    from pyxl.migrate.tls import allowed
    from pyxl.migrate.tlsstage import peer_names
    both = {"subject": ((("commonName", "src.example"),),),
            "subjectAltName": (("DNS", "Other.Example"), ("IP Address", "10.0.0.1"))}
    assert peer_names(both) == ["other.example"]
    cn_only = {"subject": ((("commonName", "SRC.example"),),), "subjectAltName": ()}
    assert peer_names(cn_only) == ["src.example"]
    assert peer_names(None) == []
    assert allowed(["src.example"], ("SRC.Example",)) and allowed(["x"], ())
    assert not allowed(peer_names(both), ("src.example",))
