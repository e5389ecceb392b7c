"""pyxl.qmp.codec: QMP's client side, sans I/O -- fed whole, byte by byte, with
trailing bytes, and with garbage."""

from __future__ import annotations

import json

import pytest

from pyxl.errors import BackendError, DeviceModelError
from pyxl.qmp.codec import (NEED_DATA, Closed, Error, Event, Greeting, QmpConnection,
                            QmpLocalProtocolError, QmpRemoteProtocolError, Return)

GREETING = (b'{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, '
            b'"package": "Debian 1:7.2+dfsg-7+deb12u18"}, "capabilities": ["oob"]}}\r\n')


def events(conn: QmpConnection):
    out = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)
        if isinstance(ev, Closed):
            return out


def feed(conn: QmpConnection, data: bytes, bytewise: bool = False):
    if not bytewise or not data:
        conn.receive_data(data)
        return events(conn)
    out = []
    for i in range(len(data)):
        conn.receive_data(data[i:i + 1])
        out += events(conn)
    return out


def ready(conn: QmpConnection = None) -> QmpConnection:
    conn = conn or QmpConnection()
    assert feed(conn, GREETING) == [Greeting(
        {"qemu": {"micro": 0, "minor": 2, "major": 7},
         "package": "Debian 1:7.2+dfsg-7+deb12u18"}, ("oob",))]
    cid, data = conn.send_command("qmp_capabilities")
    assert json.loads(data) == {"execute": "qmp_capabilities", "id": cid}
    assert data.endswith(b"\r\n") and data.count(b"\n") == 1
    assert feed(conn, b'{"return": {}, "id": %d}\r\n' % cid) == [Return(cid, {}, "qmp_capabilities")]
    assert conn.state == "ready"
    return conn


def test_errors_are_device_model_errors():
    assert issubclass(QmpRemoteProtocolError, DeviceModelError)
    assert issubclass(QmpLocalProtocolError, DeviceModelError)
    assert issubclass(DeviceModelError, BackendError)


@pytest.mark.parametrize("bytewise", [False, True], ids=["whole", "bytewise"])
def test_a_save_conversation(bytewise):
    conn = QmpConnection()
    assert conn.state == "greeting" and conn.next_event() is NEED_DATA
    got = feed(conn, GREETING, bytewise)
    assert [type(e) for e in got] == [Greeting] and conn.state == "negotiating"
    cap, _ = conn.send_command("qmp_capabilities")
    got = feed(conn, b'{"return": {}, "id": %d}\r\n' % cap, bytewise)
    assert got == [Return(cap, {}, "qmp_capabilities")] and conn.state == "ready"
    stop, data = conn.send_command("stop")
    assert json.loads(data) == {"execute": "stop", "id": stop}
    add, data = conn.send_command("add-fd", {})
    assert json.loads(data) == {"execute": "add-fd", "arguments": {}, "id": add}
    save, data = conn.send_command("xen-save-devices-state",
                                   {"filename": "/dev/fdset/0", "live": False})
    assert json.loads(data)["arguments"] == {"filename": "/dev/fdset/0", "live": False}
    assert len({cap, stop, add, save}) == 4
    assert conn.pending == {stop: "stop", add: "add-fd", save: "xen-save-devices-state"}
    wire = (b'{"timestamp": {"seconds": 1700000000, "microseconds": 250000}, "event": "STOP"}\r\n'
            b'{"return": {}, "id": %d}\r\n'
            b'{"return": {"fdset-id": 0, "fd": 25}, "id": %d}\r\n'
            b'{"error": {"class": "GenericError", "desc": "disk full"}, "id": %d}\r\n'
            % (stop, add, save))
    assert feed(conn, wire, bytewise) == [
        Event("STOP", {}, 1700000000.25),
        Return(stop, {}, "stop"),
        Return(add, {"fdset-id": 0, "fd": 25}, "add-fd"),
        Error(save, "GenericError", "disk full", "xen-save-devices-state"),
    ]
    assert conn.pending == {}
    assert feed(conn, b"", bytewise) == [Closed()]
    assert conn.state == "closed"
    assert conn.next_event() == Closed()        # and stays closed


def test_answers_in_any_order_and_plain_newlines():
    conn = ready()
    a, _ = conn.send_command("query-status")
    b, _ = conn.send_command("cont")
    got = feed(conn, b'{"return": {}, "id": %d}\n\n  \r\n{"id": %d, "return": {"status": "running", '
                     b'"running": true}}\n' % (b, a))
    assert got == [Return(b, {}, "cont"),
                   Return(a, {"status": "running", "running": True}, "query-status")]


def test_trailing_bytes_wait_for_their_line():
    conn = ready()
    a, _ = conn.send_command("stop")
    got = feed(conn, b'{"return": {}, "id": %d}\r\n{"event": "RES' % a)
    assert got == [Return(a, {}, "stop")]
    assert conn.trailing_data == b'{"event": "RES'
    assert feed(conn, b'UME"}\r\n') == [Event("RESUME", {}, None)]
    assert conn.trailing_data == b""


def test_greeting_must_come_first_and_once():
    with pytest.raises(QmpRemoteProtocolError, match="before the greeting"):
        feed(QmpConnection(), b'{"return": {}, "id": 1}\r\n')
    with pytest.raises(QmpRemoteProtocolError, match="before the greeting"):
        feed(QmpConnection(), b'{"event": "STOP"}\r\n')
    conn = ready()
    with pytest.raises(QmpRemoteProtocolError, match="second greeting"):
        feed(conn, GREETING)


@pytest.mark.parametrize("greeting", [
    b'{"QMP": {}}\n', b'{"QMP": []}\n', b'{"QMP": {"version": {}, "capabilities": "oob"}}\n',
    b'{"QMP": {"version": 7, "capabilities": []}}\n',
])
def test_malformed_greetings(greeting):
    with pytest.raises(QmpRemoteProtocolError, match="greeting"):
        feed(QmpConnection(), greeting)


def test_capabilities_first_then_commands():
    conn = QmpConnection()
    with pytest.raises(QmpLocalProtocolError, match="no greeting"):
        conn.send_command("qmp_capabilities")
    feed(conn, GREETING)
    with pytest.raises(QmpLocalProtocolError, match="before qmp_capabilities"):
        conn.send_command("stop")
    cid, _ = conn.send_command("qmp_capabilities")
    with pytest.raises(QmpLocalProtocolError, match="before qmp_capabilities has been answered"):
        conn.send_command("stop")
    with pytest.raises(QmpLocalProtocolError, match="sent already"):
        conn.send_command("qmp_capabilities")
    # refused: back to negotiating, it may be tried again
    got = feed(conn, b'{"error": {"class": "GenericError", "desc": "no"}, "id": %d}\n' % cid)
    assert got == [Error(cid, "GenericError", "no", "qmp_capabilities")]
    assert conn.state == "negotiating"
    ready_conn = ready(QmpConnection())
    with pytest.raises(QmpLocalProtocolError, match="negotiated already"):
        ready_conn.send_command("qmp_capabilities")


def test_local_misuse():
    conn = ready()
    with pytest.raises(QmpLocalProtocolError):
        conn.send_command("")
    with pytest.raises(QmpLocalProtocolError, match="arguments are an object"):
        conn.send_command("stop", ["x"])
    with pytest.raises(QmpLocalProtocolError, match="cannot encode"):
        conn.send_command("stop", {"x": object()})
    with pytest.raises(QmpLocalProtocolError, match="cannot encode"):
        conn.send_command("stop", {"x": float("nan")})
    assert conn.pending == {}          # nothing half-sent
    conn.receive_data(b"")
    with pytest.raises(QmpLocalProtocolError, match="after EOF"):
        conn.receive_data(b"x")
    assert events(conn) == [Closed()]
    with pytest.raises(QmpLocalProtocolError, match="closed"):
        conn.send_command("stop")


@pytest.mark.parametrize("line,match", [
    (b"\x00\xff\xfe garbage", "not JSON"),
    (b"{not json}", "not JSON"),
    (b'{"return": NaN, "id": 1}', "not JSON"),
    (b"[1, 2, 3]", "not an object"),
    (b'"QMP"', "not an object"),
    (b"{}", "neither greeting"),
    (b'{"return": {}, "error": {"class": "A", "desc": "b"}, "id": 1}', "neither greeting"),
    (b'{"hello": 1}', "neither greeting"),
    (b'{"return": {}}', "id None"),
    (b'{"return": {}, "id": "1"}', "id '1'"),
    (b'{"return": {}, "id": true}', "id True"),
    (b'{"return": {}, "id": 99}', "id 99, which no command"),
    (b'{"error": {"class": "GenericError", "desc": "JSON parse error"}}', "for no command"),
    (b'{"error": "bad", "id": 1}', "without class and desc"),
    (b'{"event": 5}', "event without a name"),
    (b'{"event": "STOP", "data": []}', "data is not an object"),
    (b"[" * 100000 + b"]" * 100000, "not JSON|line of"),
])
def test_garbage_is_a_typed_error_and_poisons(line, match):
    conn = ready()
    conn.send_command("stop")
    with pytest.raises(QmpRemoteProtocolError, match=match):
        feed(conn, line + b"\r\n")
    assert conn.state == "error"
    with pytest.raises(QmpRemoteProtocolError, match="already failed"):
        conn.next_event()
    with pytest.raises(QmpRemoteProtocolError, match="already failed"):
        conn.receive_data(b"{}\n")
    with pytest.raises(QmpRemoteProtocolError, match="already failed"):
        conn.send_command("cont")


def test_an_answer_counts_once():
    conn = ready()
    cid, _ = conn.send_command("stop")
    feed(conn, b'{"return": {}, "id": %d}\n' % cid)
    with pytest.raises(QmpRemoteProtocolError, match="no command is waiting"):
        feed(conn, b'{"return": {}, "id": %d}\n' % cid)


def test_line_limit():
    conn = QmpConnection(max_line=1024)
    conn.receive_data(b" " * 1024)
    assert conn.next_event() is NEED_DATA            # at the limit: still waiting
    conn.receive_data(b" ")
    with pytest.raises(QmpRemoteProtocolError, match="more than 1024 bytes"):
        conn.next_event()
    # a too-long line that arrives whole, newline included
    conn = ready(QmpConnection(max_line=1024))
    cid, _ = conn.send_command("query-status")
    with pytest.raises(QmpRemoteProtocolError, match="a line of"):
        feed(conn, b'{"return": "%s", "id": %d}\n' % (b"x" * 2000, cid))
    with pytest.raises(ValueError):
        QmpConnection(max_line=10)


def test_default_limit_is_a_mebibyte():
    conn = ready()
    cid, _ = conn.send_command("query-status")
    big = b'{"return": "%s", "id": %d}\n' % (b"x" * 1000000, cid)
    assert feed(conn, big) == [Return(cid, "x" * 1000000, "query-status")]
    conn.receive_data(b"x" * (1 << 20) + b"x")
    with pytest.raises(QmpRemoteProtocolError, match="more than 1048576"):
        conn.next_event()


@pytest.mark.parametrize("tail", [b"{", b'{"return": {}, "id": 2}', b"garbage"])
def test_eof_in_the_middle_of_a_message(tail):
    conn = ready()
    conn.send_command("stop")
    conn.receive_data(tail)
    conn.receive_data(b"")
    with pytest.raises(QmpRemoteProtocolError, match="closed in the middle"):
        conn.next_event()


def test_eof_between_messages_with_commands_pending():
    conn = ready()
    conn.send_command("stop")
    assert feed(conn, b"\r\n") == []
    assert feed(conn, b"") == [Closed()]
    assert conn.pending       # the client's business: it fails what still waits


def test_events_with_data_and_odd_timestamps():
    conn = ready()
    got = feed(conn, b'{"event": "SHUTDOWN", "data": {"guest": true, "reason": "host-qmp"}, '
                     b'"timestamp": {"seconds": -1, "microseconds": -1}}\n'
                     b'{"event": "X", "timestamp": "now"}\n')
    assert got == [Event("SHUTDOWN", {"guest": True, "reason": "host-qmp"}, -1.000001),
                   Event("X", {}, None)]
    # a device model's timestamp that no float holds: no time, not an untyped error
    assert feed(conn, b'{"event": "Y", "timestamp": {"seconds": ' + b"9" * 400
                + b', "microseconds": 0}}\n') == [Event("Y", {}, None)]


def test_a_device_models_words_are_escaped_and_bounded():
    """An error's class and desc and an event's name reach logs and terminals."""
    conn = ready()
    cid = conn.send_command("stop")[0]
    desc = "\x1b]0;owned\x07\nforged line\u202e" + "d" * 2000
    (err,) = feed(conn, json.dumps({"id": cid, "error": {"class": "\x1bC" * 100,
                                                          "desc": desc}}).encode() + b"\n")
    assert err.cls.isprintable() and len(err.cls) == 64 and err.cls.startswith("\\x1bC")
    assert err.desc.startswith("\\x1b]0;owned\\x07\\nforged line\\u202eddd")
    assert err.desc.isprintable() and len(err.desc) == 500
    (ev,) = feed(conn, b'{"event": "STOP\\u001b[2K", "data": {}}\n')
    assert ev.name == "STOP\\x1b[2K"


def test_every_chunking_of_a_conversation_gives_the_same_events():
    """A client that reacts as it goes (capabilities on the greeting, a command once
    they are negotiated) sees the same events however the bytes are cut."""
    wire = (GREETING + b'{"return": {}, "id": 1}\r\n{"event": "STOP"}\r\n'
            b'{"return": {}, "id": 2}\r\n')
    want = [Greeting, Return, Event, Return, Closed]
    for size in range(1, len(wire) + 1):
        conn = QmpConnection()
        got = []
        for i in range(0, len(wire) + 1, size):
            conn.receive_data(wire[i:i + size])      # the last one is b"": EOF
            while not got or not isinstance(got[-1], Closed):
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                got.append(ev)
                if isinstance(ev, Greeting):
                    assert conn.send_command("qmp_capabilities")[0] == 1
                elif isinstance(ev, Return) and ev.command == "qmp_capabilities":
                    assert conn.send_command("stop")[0] == 2
        if len(wire) % size:
            conn.receive_data(b"")
            got += events(conn)
        assert [type(e) for e in got] == want, size
        assert got[3] == Return(2, {}, "stop")
