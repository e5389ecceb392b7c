"""Hypothesis over helper frames: structured, mutated, and fed three ways.

1. to the sans-I/O :class:`~pyxl.wire.codec.Conversation`, in random splits;
2. through a real pipe from a scripted helper to a :class:`HelperProcess`;
3. through a real pipe to save and restore *operations* (a stand-in backend,
   so that thousands of examples stay cheap).

Streams start as what a real helper says (the order of Xen 4.17's save and
restore), then get mutated: bit flips, forged lengths and message numbers,
cut or padded bodies, forged string sizes, messages of the other mode,
callbacks not in CBFLAGS, messages after ``complete``, duplicated, dropped or
swapped frames, and a helper that does not wait for its reply.

Properties: only :class:`ProtocolError` (a typed :class:`OperationError` at
the operation level), never a hang, bounded buffering; and where the outcome
is determined by the bytes, exactly that outcome.  ``PYXL_SLOW=1`` runs
10,000 examples through the codec and conversation, and 1,000 / 300 through
real helper processes and operations (each example spawns a process, so
10,000 there would take CI most of an hour).
"""

from __future__ import annotations

import os
import shutil
import signal
import struct
import tempfile
import time
import tracemalloc
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyxl
from pyxl.backends import NoDeviceModel
from pyxl.wire import codec as protocol
from pyxl.stream import libxl as stream_libxl
from pyxl.stream import xl as stream_xl
from pyxl.ops.helper_process import HelperProcess
from pyxl.ops.operation import RESTORE_CALLBACKS, SAVE_CALLBACKS
from pyxl.wire.codec import (BY_NAME, Conversation, Decoder, Message, ProtocolError, cbflags_for,
                           encode)

from conftest import SLOW, children, open_fds

CBFLAGS = {"save": cbflags_for(SAVE_CALLBACKS), "restore": cbflags_for(RESTORE_CALLBACKS)}
MAX_FRAME = 2 + 0xFFFF
CLASSES = sorted(BY_NAME.values(), key=lambda c: c.NUMBER)

# ---------------------------------------------------------------------------
# strategies

_INTS = {"uint16": st.integers(0, 2**16 - 1), "uint32": st.integers(0, 2**32 - 1),
         "int32": st.integers(-2**31, 2**31 - 1), "uint64": st.integers(0, 2**64 - 1)}
_TEXT = st.one_of(
    st.binary(max_size=30),
    st.sampled_from([b"", b"xc", b"libxl-save-helper", b"Frames iteration 3",
                     b"Frames iteration x", b"\xff\xfe not utf-8", "\u00e9t\u00e9".encode()]),
    st.integers(1000, 30000).map(lambda n: b"L" * n),      # long strings, near the frame limit
).map(lambda b: b.replace(b"\0", b"").decode("utf-8", "surrogateescape"))


@st.composite
def messages(draw: Any, cls: Optional[type] = None) -> Message:
    if cls is None:
        cls = draw(st.sampled_from(CLASSES))
    args = [draw(_TEXT if wtype == "string" else _INTS[wtype]) for _, wtype in cls.ARGS]
    msg = cls(*args)
    try:
        encode(msg)
    except ValueError:  # two long strings over 64 KiB: shorten
        msg = cls(*[a[:100] if isinstance(a, str) else a for a in args])
    return msg


def _logs(draw: Any, n: int) -> List[Message]:
    return [draw(messages(protocol.Log)) for _ in range(draw(st.integers(0, n)))]


@st.composite
def conversations(draw: Any, mode: str) -> List[Message]:
    """What a real helper of ``mode`` says, in Xen 4.17's order."""
    P = protocol
    ok = draw(st.sampled_from([0, 0, 0, -1]))
    if mode == "save":
        out = _logs(draw, 3) + [P.SwitchQemuLogdirty(draw(_INTS["uint32"]), 1)]
        out += [draw(messages(P.Progress)) for _ in range(draw(st.integers(0, 3)))]
        out += [P.Suspend()] + [draw(messages(P.Progress)) for _ in range(draw(st.integers(0, 3)))]
        out += [P.SwitchQemuLogdirty(0, 0)] + _logs(draw, 2)
    else:
        out = _logs(draw, 3) + [P.StaticDataDone(draw(st.sampled_from([0, 1, 3])))]
        out += _logs(draw, 3) + [draw(messages(P.RestoreResults))] + _logs(draw, 1)
    out.append(P.Complete(ok, 0 if ok == 0 else draw(st.integers(1, 130))))
    return out


@st.composite
def mutated_frame(draw: Any, frame: bytes) -> bytes:
    b = bytearray(frame)
    how = draw(st.sampled_from(["bitflip", "length", "number", "cut", "pad", "strsize", "byte"]))
    if how == "bitflip":
        pos = draw(st.integers(0, len(b) - 1))
        b[pos] ^= 1 << draw(st.integers(0, 7))
    elif how == "length":
        b[0:2] = struct.pack("<H", draw(st.one_of(st.integers(0, 0xFFFF),
                                                  st.integers(0, len(b) + 4))))
    elif how == "number":
        b[2:4] = struct.pack("<H", draw(st.one_of(st.integers(0, 12), st.integers(0, 0xFFFF))))
    elif how == "cut":  # a shorter body, with or without its length fixed
        n = draw(st.integers(2, max(2, len(b) - 1)))
        b = b[:n]
        if draw(st.booleans()) and n >= 2:
            b[0:2] = struct.pack("<H", n - 2)
    elif how == "pad":  # extra bytes, with or without the length fixed
        extra = draw(st.binary(min_size=1, max_size=8))
        b += extra
        if draw(st.booleans()):
            b[0:2] = struct.pack("<H", min(0xFFFF, len(b) - 2))
    elif how == "strsize" and len(b) >= 16:
        # first string size of log (offset 12) / progress (offset 4)
        off = 12 if b[2:4] == b"\x01\x00" else 4
        b[off:off + 4] = struct.pack("<I", draw(st.sampled_from(
            [0, 1, 2, 0xFFFFFFFF, 0x10000, len(b)])))
    else:
        pos = draw(st.integers(0, len(b) - 1))
        b[pos] = draw(st.integers(0, 255))
    return bytes(b)


@dataclass
class Plan:
    """A scripted helper: frames to write, where to wait for our reply, how to end."""

    mode: str
    frames: List[bytes]
    nowait: List[bool]           # True: do not wait for the reply this frame may be owed
    ending: str                  # "exit0", "exit1", "exit255", "kill"
    mutated: bool = False
    pieces: List[Tuple[bytes, bool]] = field(default_factory=list)
    # what the bytes determine (computed by expect())
    error: Optional[ProtocolError] = None
    determined: bool = True
    complete: Optional[Message] = None
    results: Optional[Message] = None
    messages: List[Message] = field(default_factory=list)
    # decoded in the mirror's batch before its error: pyxl delivers them only
    # if its own reads ended before the faulty frame (a write over PIPE_BUF
    # may reach it in pieces), so they may or may not be seen
    maybe: List[Message] = field(default_factory=list)
    truncated: bool = False


@st.composite
def plans(draw: Any, modes: Tuple[str, ...] = ("save", "restore")) -> Plan:
    mode = draw(st.sampled_from(modes))
    msgs = draw(conversations(mode))
    frames = [encode(m) for m in msgs]
    mutated = False
    for _ in range(draw(st.integers(0, 3))):
        if not frames:
            break
        mutated = True
        i = draw(st.integers(0, len(frames) - 1))
        op = draw(st.sampled_from(["frame", "frame", "insert", "drop", "dup", "swap", "tail"]))
        if op == "frame":
            frames[i] = draw(mutated_frame(frames[i]))
        elif op == "insert":  # any message: other mode's, callbacks not in CBFLAGS, ...
            frames.insert(i, encode(draw(messages())))
        elif op == "drop":
            del frames[i]
        elif op == "dup":
            frames.insert(i, frames[i])
        elif op == "swap":
            j = draw(st.integers(0, len(frames) - 1))
            frames[i], frames[j] = frames[j], frames[i]
        else:  # messages after complete
            frames.append(encode(draw(messages())))
    nowait = [draw(st.booleans()) if mutated and draw(st.integers(0, 9)) == 0 else False
              for _ in frames]
    ending = draw(st.sampled_from(["exit0", "exit0", "exit0", "exit1", "exit255", "kill"]))
    plan = Plan(mode, frames, nowait, ending, mutated)
    expect(plan)
    return plan


def expect(plan: Plan) -> None:
    """Run the plan's bytes through a mirror Conversation, as pyxl will see
    them: this decides where the scripted helper waits for a reply, and what
    pyxl must conclude wherever the bytes alone decide it."""
    conv = Conversation(plan.mode, CBFLAGS[plan.mode])
    piece = b""
    stopped = False  # after complete, or after an error: no more waits
    for frame, nowait in zip(plan.frames, plan.nowait):
        piece += frame
        if stopped:
            continue
        try:
            plan.messages += conv.receive(frame)
        except ProtocolError as exc:
            stopped = True
            plan.error = exc
            plan.maybe = list(getattr(exc, "before", []))
            # whether the bytes after a callback (or complete) in one write
            # are read in the same batch depends on scheduling
            if "still awaits" in exc.reason or "after complete" in exc.reason:
                plan.determined = False
            continue
        if conv.completed is not None:
            plan.complete, plan.results = conv.completed, conv.results
            stopped = True
            plan.pieces.append((piece, not nowait))
            piece = b""
            if nowait:
                plan.determined = False  # the rest may share the batch with complete
            continue
        if conv.awaiting is not None:
            conv.reply(0)
            plan.pieces.append((piece, not nowait))
            piece = b""
            if nowait:
                plan.determined = False
    if piece:
        plan.pieces.append((piece, False))
    if plan.complete is None:
        plan.results = conv.results
    if not stopped:
        try:
            conv.receive(b"")
        except ProtocolError as exc:
            plan.truncated = True
            plan.error = exc


def write_player(directory: str, plan: Plan) -> str:
    """The scripted helper: /bin/sh, cat and head (cheap to spawn)."""
    lines = ["#!/bin/sh"]
    for i, (data, wait) in enumerate(plan.pieces):
        path = os.path.join(directory, f"piece{i}")
        with open(path, "wb") as f:
            f.write(data)
        lines.append(f"cat {path}")
        if wait:
            lines.append("head -c 4 >/dev/null")
    lines.append({"exit0": "exit 0", "exit1": "exit 1", "exit255": "exit 255",
                  "kill": "kill -9 $$"}[plan.ending])
    path = os.path.join(directory, "helper")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path, 0o755)
    return path


def exited_as_planned(plan: Plan, status: int) -> bool:
    if plan.ending == "kill":
        return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    return os.WIFEXITED(status) and os.WEXITSTATUS(status) == int(plan.ending[4:])


# ---------------------------------------------------------------------------
# 1. sans-I/O


@settings(max_examples=10000 if SLOW else 300, deadline=None)
@given(plan=plans(), cuts=st.lists(st.integers(0, 1 << 17), max_size=6))
def test_frames_only_protocol_error(plan: Plan, cuts: List[int]) -> None:
    """Any split of any plan's bytes: the decoder raises only ProtocolError,
    buffers at most one frame, and what it accepts re-encodes to exactly the
    bytes it consumed; the conversation rules add only ProtocolError."""
    data = b"".join(plan.frames)
    edges = sorted({0, len(data), *[c % (len(data) + 1) for c in cuts]})
    d = Decoder(plan.mode)
    got: List[Message] = []
    try:
        for a, b in zip(edges, edges[1:]):
            got += d.feed(data[a:b])
            assert d.pending <= MAX_FRAME
        d.eof()
    except ProtocolError as exc:
        assert exc.offset == d.offset <= len(data)
    consumed = data[:d.offset]
    assert consumed.startswith(b"".join(encode(m) for m in got))
    assert b"".join(encode(m) for m in Decoder(plan.mode).feed(consumed)) == consumed

    conv = Conversation(plan.mode, CBFLAGS[plan.mode])
    try:
        for a, b in zip(edges, edges[1:]):
            conv.receive(data[a:b])
            if conv.awaiting is not None and conv.completed is None:
                conv.reply(0)
        conv.receive(b"")
    except ProtocolError:
        pass
    if not plan.mutated:
        # a real helper's conversation, fed as a helper sends it, is accepted whole
        assert plan.error is None and plan.complete is not None
        assert [encode(m) for m in plan.messages] == plan.frames


@settings(max_examples=1000 if SLOW else 50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 0xFFFF), st.binary(max_size=64)), min_size=1,
                max_size=20),
       st.integers(1, 4096))
def test_decoder_buffers_at_most_one_frame(frames: List[Tuple[int, bytes]], step: int) -> None:
    """Frames that claim big bodies, fed in small steps: at most one frame is
    ever buffered, and memory stays bounded."""
    data = b"".join(struct.pack("<HH", n, 1) + body for n, body in frames)
    data += b"\xff\xff" + bytes(0xFFFF)  # a maximal (unknown-number) frame at the end
    d = Decoder("save")
    tracemalloc.start()
    try:
        for i in range(0, len(data), step):
            try:
                d.feed(data[i:i + step])
            except ProtocolError:
                break
            assert d.pending <= MAX_FRAME
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the input itself was allocated before tracing started: what is counted
    # is the decoder's buffer (with bytearray growth) and one frame's copy, and
    # whatever else the process allocated meanwhile (tracemalloc sees it all:
    # hypothesis's own bookkeeping once took the peak 268 bytes over 6 frames)
    assert peak < 7 * MAX_FRAME


# ---------------------------------------------------------------------------
# 2. a HelperProcess on a real pipe


def run_helper_process(argv: List[str], mode: str) -> Tuple[HelperProcess, List[Message]]:
    loop = pyxl.default_loop()
    seen: List[Message] = []
    done: List[HelperProcess] = []
    holder: Dict[str, HelperProcess] = {}

    def on_message(msg: Message) -> None:
        seen.append(msg)
        if msg.WAITS_FOR_REPLY:
            holder["hp"].reply(0)

    hp = HelperProcess(loop, argv, mode, CBFLAGS[mode], [], on_message, done.append)
    holder["hp"] = hp
    assert loop.run_until(lambda: bool(done), timeout=30), "pyxl hung on the helper"
    return hp, seen


def check_helper_outcome(plan: Plan, hp: HelperProcess, seen: List[Message]) -> None:
    assert hp.protocol_error is None or isinstance(hp.protocol_error, ProtocolError)
    # at most one partial frame; after a protocol error the poisoned decoder
    # keeps the rest of the read it failed in (one more read's worth)
    assert hp.conv.decoder.pending <= MAX_FRAME + (0 if hp.protocol_error is None else 1 << 16)
    if not plan.determined:
        return
    if plan.error is not None and not plan.truncated:
        err = hp.protocol_error
        assert err is not None
        # Known limitation of pyxl.wire.codec: when a frame fails to decode, of
        # the messages decoded before it in the same read only the leading logs
        # and progress are delivered (HelperProcess), and a later decode error
        # can be reported instead of an earlier conversation-rule error.
        assert err.offset >= plan.error.offset
        if err.offset == plan.error.offset:
            assert str(err) == str(plan.error)
        assert seen == (plan.messages + plan.maybe)[:len(seen)]
        return
    assert seen == plan.messages
    assert hp.complete == plan.complete and hp.results == plan.results
    if plan.complete is None:
        # it wrote everything and ended as planned
        assert exited_as_planned(plan, hp.wait_status), (plan.ending, hp.wait_status)
        if plan.truncated:
            assert (hp.protocol_error is not None) == (plan.ending == "exit0")
        else:
            assert hp.protocol_error is None
    else:
        assert hp.protocol_error is None


@pytest.fixture(scope="module")
def workdir():
    d = tempfile.mkdtemp(prefix="pyxl-fuzz-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@settings(max_examples=1000 if SLOW else 150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=plans())
def test_helper_process_on_a_pipe(workdir: str, plan: Plan) -> None:
    argv = [write_player(workdir, plan), "--fuzz"]
    hp, seen = run_helper_process(argv, plan.mode)
    check_helper_outcome(plan, hp, seen)


def test_helper_process_lane_leaks_nothing(workdir: str) -> None:
    """After many scripted helpers: no fd and no child left behind."""
    fds, kids = open_fds(), children()

    @settings(max_examples=60, deadline=None, database=None)
    @given(plan=plans())
    def inner(plan: Plan) -> None:
        hp, seen = run_helper_process([write_player(workdir, plan)], plan.mode)
        check_helper_outcome(plan, hp, seen)

    inner()
    assert open_fds() == fds and children() == kids


# ---------------------------------------------------------------------------
# 3. save and restore operations on a real pipe

CONFIG = {"c_info": {"name": "fuzz", "type": "hvm"}, "b_info": {"max_memkb": 16384}}


class StandInBackend(NoDeviceModel):
    """What pyxl does around the helper, recorded instead of done (no fakexen:
    thousands of examples must stay cheap).  A complete pyxl.Backend (mypy checks it
    where it is passed as one)."""

    name = "stand-in"

    def __init__(self) -> None:
        self.created: List[int] = []
        self.destroyed: List[int] = []
        self.resumed: List[int] = []
        self.unpaused: List[int] = []

    def helper_env(self) -> Dict[str, str]:
        return dict(os.environ)

    def check_domain(self, domid: int) -> None:
        pass

    def domain_config(self, domid: int) -> Dict[str, Any]:
        return CONFIG

    def start_suspend(self, loop: Any, domid: int, timeout: float, done: Any) -> Any:
        return loop.call_later(0, lambda: done(True, ""))

    def resume(self, domid: int) -> None:
        self.resumed.append(domid)

    def pause(self, domid: int) -> None:
        pass

    def destroy(self, domid: int) -> None:
        self.destroyed.append(domid)

    def start_destroy(self, loop: Any, domid: int, done: Any) -> Any:
        self.destroyed.append(domid)
        return loop.call_later(0, lambda: done(True, ""))

    def create_restore_target(self, config: Dict[str, Any]) -> int:
        self.created.append(100 + len(self.created))
        return self.created[-1]

    def unpause(self, domid: int) -> None:
        self.unpaused.append(domid)

    def rename(self, domid: int, name: str) -> None:
        pass

    def state(self, domid: int) -> Optional[str]:
        return None

    def digest(self, domid: int) -> Optional[str]:
        return None

    def restore_ports(self, domid: int) -> Tuple[int, int, int, int]:
        return (1, 0, 2, 0)

    def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
        pass


def restore_source(path: str) -> None:
    with open(path, "wb") as f:
        f.write(stream_xl.xl_header(CONFIG) + stream_libxl.libxl_header()
                + stream_libxl.libxc_context_record() + stream_libxl.end_record())


@settings(max_examples=300 if SLOW else 80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=plans())
def test_operation_on_a_pipe(workdir: str, plan: Plan) -> None:
    helper = write_player(workdir, plan)
    backend = StandInBackend()
    out = os.path.join(workdir, "out")
    os.makedirs(out, exist_ok=True)
    target = os.path.join(out, "existing.save")
    with open(target, "wb") as f:
        f.write(b"precious")
    if plan.mode == "save":
        op: pyxl.Operation = pyxl.save(7, target, helper=helper, backend=backend, fsync=False,
                                       timeout=30)
    else:
        src = os.path.join(workdir, "source.save")
        restore_source(src)
        op = pyxl.restore(src, helper=helper, backend=backend, timeout=30)
    t0 = time.monotonic()
    assert pyxl.default_loop().run_until(op.done, timeout=40), "pyxl hung"
    assert time.monotonic() - t0 < 30, "only the operation timeout may end it"
    exc = op.exception()
    assert exc is None or isinstance(exc, pyxl.OperationError)
    assert not isinstance(exc, pyxl.Timeout), "a helper that ended was noticed"
    if isinstance(exc, pyxl.HelperProtocolError):
        assert isinstance(exc.protocol_error, ProtocolError)
    if exc is not None:
        if plan.mode == "save":
            assert open(target, "rb").read() == b"precious"
            assert os.listdir(out) == ["existing.save"]
        else:
            assert backend.destroyed == backend.created, "the new domain is destroyed"
    else:
        assert plan.ending != "kill" and plan.complete is not None
        assert plan.complete.retval == 0
        if plan.mode == "save":
            assert os.listdir(out) == ["existing.save"]
            with open(target, "rb") as f:
                assert f.read(8) != b"precious"
        else:
            assert backend.destroyed == [] and backend.unpaused == backend.created
    if plan.determined:
        clean = (plan.error is None and plan.complete is not None and plan.complete.retval == 0
                 and plan.ending == "exit0" and (plan.mode == "save" or plan.results is not None))
        assert (exc is None) == clean, (exc, plan)
        if plan.error is not None and not plan.truncated:
            assert isinstance(exc, pyxl.HelperProtocolError)


def test_conversation_errors_name_the_offending_frame() -> None:
    """A conversation rule broken in the middle of a batch points at that frame."""
    P = protocol
    data = encode(P.Log(5, 0, "xc", "a")) + encode(P.Postcopy()) + encode(P.Log(5, 0, "xc", "b"))
    with pytest.raises(ProtocolError) as e:
        Conversation("save", CBFLAGS["save"]).receive(data)
    assert e.value.offset == len(encode(P.Log(5, 0, "xc", "a")))
    assert e.value.message == "postcopy"
    first = encode(P.Suspend())
    with pytest.raises(ProtocolError, match="still awaits") as e:
        Conversation("save", CBFLAGS["save"]).receive(first + encode(P.Log(5, 0, "xc", "a")))
    assert e.value.offset == len(first)
