"""A blocking, test-only stand-in for libxl around one save/restore helper run on fakexen.

It spawns a helper (Debian's ``libxl-save-helper`` or pyxl's ``pyxl-save-helper``)
with libxl's exact argv and fakexen preloaded (:func:`pyxl.sim.helper_env`),
answers its callbacks the way libxl does for a plain save or restore, and
collects what the helper said.  pyxl's real host library, with an event loop,
lives elsewhere; this exists only to exercise fakexen.

    save:    --save-domain IO_FD BACK_FD DOMID XCFLAGS 136 0
    restore: --restore-domain IO_FD -1 DOMID 1 0 2 0 768 0

Callbacks: switch_qemu_logdirty -> 0; suspend -> suspend the simulated guest
(pyxl.sim.suspend) then 1 (0 if that failed); static_data_done -> 0;
complete -> 0.
"""

from __future__ import annotations

import os
import selectors
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl import sim

from conftest import (DEBIAN_HELPER, OUR_HELPER, VERIFY_STREAM, XEN_PYTHONPATH,  # noqa: F401
                      private_sim_dir, vcpu_processes)

XCFLAGS_LIVE = 1
XCFLAGS_DEBUG = 2
SAVE_CBFLAGS = 136      # suspend + switch_qemu_logdirty
RESTORE_CBFLAGS = 768   # static_data_done + restore_results
STORE_EVTCHN, CONSOLE_EVTCHN = 1, 2

LOG_ERROR = 8


def our_helper_available() -> bool:
    """True once pyxl-save-helper is a real build (it links libxenguest's save/restore)."""
    try:
        with open(OUR_HELPER, "rb") as f:
            data = f.read()
    except OSError:
        return False
    return b"xc_domain_save" in data and b"xc_domain_restore" in data


def available_helpers() -> List[str]:
    helpers = [DEBIAN_HELPER] if os.access(DEBIAN_HELPER, os.X_OK) else []
    if our_helper_available():
        helpers.append(OUR_HELPER)
    return helpers


# ---- frame decoding ---------------------------------------------------------------------

# number -> (name, argument types); Xen 4.14-4.17 numbering.
_TABLE: Dict[int, Tuple[str, Tuple[Tuple[str, str], ...]]] = {
    1: ("log", (("level", "I"), ("errnoval", "i"), ("context", "s"), ("formatted", "s"))),
    2: ("progress", (("context", "s"), ("doing_what", "s"), ("done", "Q"), ("total", "Q"))),
    3: ("suspend", ()),
    4: ("postcopy", ()),
    5: ("checkpoint", ()),
    6: ("wait_checkpoint", ()),
    7: ("switch_qemu_logdirty", (("domid", "I"), ("enable", "I"))),
    8: ("static_data_done", (("missing", "I"),)),
    9: ("restore_results", (("store_gfn", "Q"), ("console_gfn", "Q"))),
    10: ("complete", (("retval", "i"), ("errnoval", "i"))),
}
_WAITS = {"suspend", "postcopy", "checkpoint", "wait_checkpoint", "switch_qemu_logdirty",
          "static_data_done", "complete"}


@dataclass
class Msg:
    name: str
    args: Dict[str, Any]

    def __getattr__(self, key: str) -> Any:
        try:
            return self.args[key]
        except KeyError:
            raise AttributeError(key) from None


class _LocalDecoder:
    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> List[Msg]:
        self.buf += data
        out = []
        while len(self.buf) >= 2:
            (n,) = struct.unpack_from("<H", self.buf)
            if len(self.buf) < 2 + n:
                break
            body, self.buf = self.buf[2:2 + n], self.buf[2 + n:]
            (num,) = struct.unpack_from("<H", body)
            name, argspec = _TABLE[num]
            pos, args = 2, {}
            for arg, t in argspec:
                if t == "s":
                    (size,) = struct.unpack_from("<I", body, pos)
                    args[arg] = body[pos + 4:pos + 4 + size - 1].decode("utf-8", "replace")
                    pos += 4 + size
                else:
                    args[arg] = struct.unpack_from("<" + t, body, pos)[0]
                    pos += struct.calcsize(t)
            out.append(Msg(name, args))
        return out


class _Decoder:
    """pyxl.wire.codec.Decoder when present, else a local struct-based one."""

    def __init__(self, mode: str) -> None:
        self._proto: Any = None
        try:
            from pyxl.wire import codec as protocol
            self._proto = protocol.Decoder(mode)
        except Exception:
            self._local = _LocalDecoder()

    def feed(self, data: bytes) -> List[Msg]:
        if self._proto is None:
            return self._local.feed(data)
        out = []
        for m in self._proto.feed(data):
            name = getattr(type(m), "NAME", None) or getattr(m, "name")
            spec = next(s for n, s in _TABLE.values() if n == name)
            out.append(Msg(name, {arg: getattr(m, arg) for arg, _ in spec}))
        return out


def _reply(value: int) -> bytes:
    return struct.pack("<i", value)


# ---- one helper run ---------------------------------------------------------------------


@dataclass
class HelperRun:
    argv: List[str]
    status: Optional[int] = None
    messages: List[Msg] = field(default_factory=list)
    replies: List[Tuple[str, int]] = field(default_factory=list)
    stderr: str = ""
    elapsed: float = 0.0
    complete: Optional[Tuple[int, int]] = None
    restore_results: Optional[Tuple[int, int]] = None

    @property
    def ok(self) -> bool:
        return self.status == 0 and self.complete is not None and self.complete[0] == 0

    @property
    def logs(self) -> List[Tuple[int, str, str]]:
        return [(m.level, m.context, m.formatted) for m in self.messages if m.name == "log"]

    @property
    def errors(self) -> List[str]:
        return [text for level, _, text in self.logs if level >= LOG_ERROR]

    @property
    def progress(self) -> List[Tuple[str, int, int]]:
        return [(m.doing_what, m.done, m.total) for m in self.messages if m.name == "progress"]

    @property
    def phases(self) -> List[str]:
        """Progress phases in order of first appearance."""
        seen: List[str] = []
        for what, _, _ in self.progress:
            if what not in seen:
                seen.append(what)
        return seen

    @property
    def iterations(self) -> List[str]:
        return [p for p in self.phases if p.startswith("Frames iteration")]

    def text(self) -> str:
        """Everything the helper said, for assertion messages."""
        lines = [" ".join(self.argv), f"status {self.status} complete {self.complete}"]
        for m in self.messages:
            if m.name == "log":
                lines.append(f"  log[{m.level}] {m.context}: {m.formatted}")
            elif m.name != "progress":
                lines.append(f"  {m.name} {m.args}")
        lines.append("  phases: " + ", ".join(self.phases))
        if self.stderr:
            lines.append("  stderr: " + self.stderr.strip().replace("\n", "\n          "))
        return "\n".join(lines)


class HelperTimeout(Exception):
    pass


def run_helper(argv: List[str], io_fd: int, *, mode: str, sim_dir: str,
               callbacks: Optional[Dict[str, Callable[[Msg], int]]] = None,
               close_io_fd: bool = False, timeout: float = 300.0,
               env: Optional[Dict[str, str]] = None) -> HelperRun:
    """Run one helper to completion, answering its callbacks; blocking."""
    child_env = dict(os.environ)
    child_env.update(sim.helper_env(sim_dir))
    if env:
        child_env.update(env)
    run = HelperRun(argv=list(argv))
    cbs: Dict[str, Callable[[Msg], int]] = {
        "switch_qemu_logdirty": lambda m: 0,
        "static_data_done": lambda m: 0,
        "checkpoint": lambda m: 0,
        "postcopy": lambda m: 0,
        "wait_checkpoint": lambda m: 0,
        "complete": lambda m: 0,
    }
    if callbacks:
        cbs.update(callbacks)
    start = time.monotonic()
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, pass_fds=(io_fd,), env=child_env)
    if close_io_fd:
        os.close(io_fd)
    assert proc.stdin and proc.stdout and proc.stderr
    dec = _Decoder(mode)
    errbuf = bytearray()
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    deadline = start + timeout
    try:
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                proc.kill()
                raise HelperTimeout(f"helper did not finish within {timeout}s:\n{run.text()}")
            for key, _ in sel.select(min(left, 1.0)):
                data = os.read(key.fileobj.fileno(), 65536)  # type: ignore[union-attr]
                if not data:
                    sel.unregister(key.fileobj)
                    continue
                if key.data == "err":
                    errbuf += data
                    continue
                for msg in dec.feed(data):
                    run.messages.append(msg)
                    if msg.name == "complete":
                        run.complete = (msg.retval, msg.errnoval)
                    elif msg.name == "restore_results":
                        run.restore_results = (msg.store_gfn, msg.console_gfn)
                    if msg.name in _WAITS:
                        value = cbs[msg.name](msg)
                        run.replies.append((msg.name, value))
                        try:
                            proc.stdin.write(_reply(value))
                            proc.stdin.flush()
                        except BrokenPipeError:
                            pass
        run.status = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        sel.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for f in (proc.stdin, proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
    run.stderr = errbuf.decode(errors="replace")
    run.elapsed = time.monotonic() - start
    return run


def _suspend_cb(domid: int, sim_dir: str,
                hook: Optional[Callable[[], Optional[int]]]) -> Callable[[Msg], int]:
    def cb(msg: Msg) -> int:
        if hook is not None:
            reply = hook()
            if reply is not None:
                return reply
        try:
            sim.suspend(domid, sim_dir, timeout=30.0)
        except sim.SimError:
            return 0
        return 1
    return cb


def save(domid: int, io_fd: int, *, sim_dir: str, live: bool = False, debug: bool = False,
         helper: str = DEBIAN_HELPER, back_fd: int = -1, close_io_fd: bool = False,
         on_suspend: Optional[Callable[[], Optional[int]]] = None, timeout: float = 300.0,
         env: Optional[Dict[str, str]] = None) -> HelperRun:
    """Save `domid` to `io_fd`.  `on_suspend` runs in the suspend callback first; if it
    returns an int, that is the reply and the guest is not suspended by the driver."""
    xcflags = (XCFLAGS_LIVE if live else 0) | (XCFLAGS_DEBUG if debug else 0)
    argv = [helper, "--save-domain", str(io_fd), str(back_fd), str(domid), str(xcflags),
            str(SAVE_CBFLAGS), "0"]
    return run_helper(argv, io_fd, mode="save", sim_dir=sim_dir, close_io_fd=close_io_fd,
                      callbacks={"suspend": _suspend_cb(domid, sim_dir, on_suspend)},
                      timeout=timeout, env=env)


def restore(domid: int, io_fd: int, *, sim_dir: str, helper: str = DEBIAN_HELPER,
            close_io_fd: bool = False, timeout: float = 300.0,
            env: Optional[Dict[str, str]] = None) -> HelperRun:
    argv = [helper, "--restore-domain", str(io_fd), "-1", str(domid), str(STORE_EVTCHN), "0",
            str(CONSOLE_EVTCHN), "0", str(RESTORE_CBFLAGS), "0"]
    return run_helper(argv, io_fd, mode="restore", sim_dir=sim_dir, close_io_fd=close_io_fd,
                      timeout=timeout, env=env)


def save_to_file(domid: int, path: str, **kw: Any) -> HelperRun:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        return save(domid, fd, **kw)
    finally:
        os.close(fd)


def restore_from_file(domid: int, path: str, **kw: Any) -> HelperRun:
    fd = os.open(path, os.O_RDONLY)
    try:
        return restore(domid, fd, **kw)
    finally:
        os.close(fd)


def migrate(src: int, dst: int, *, sim_dir: str, dst_sim_dir: Optional[str] = None,
            live: bool = False, debug: bool = False, save_helper: str = DEBIAN_HELPER,
            restore_helper: str = DEBIAN_HELPER,
            timeout: float = 300.0) -> Tuple[HelperRun, HelperRun]:
    """Save `src` into a pipe that a restore helper reads into `dst`, concurrently."""
    r, w = os.pipe()
    results: Dict[str, Any] = {}

    def do_restore() -> None:
        try:
            results["restore"] = restore(dst, r, sim_dir=dst_sim_dir or sim_dir,
                                         helper=restore_helper, close_io_fd=True,
                                         timeout=timeout)
        except BaseException as exc:  # reported by the caller
            results["restore"] = exc

    t = threading.Thread(target=do_restore, name="restore-helper")
    t.start()
    try:
        results["save"] = save(src, w, sim_dir=sim_dir, live=live, debug=debug,
                               helper=save_helper, close_io_fd=True, timeout=timeout)
    finally:
        t.join(timeout)
    for key in ("save", "restore"):
        if isinstance(results.get(key), BaseException):
            raise results[key]
    return results["save"], results["restore"]


def verify_stream(path: str, fmt: str = "libxc") -> subprocess.CompletedProcess[str]:
    """Debian's verify-stream-v2 on a file (needs PYTHONPATH, system python3)."""
    env = dict(os.environ, PYTHONPATH=XEN_PYTHONPATH)
    return subprocess.run(["/usr/bin/python3", VERIFY_STREAM, "-v", "-f", fmt, "-i", path],
                          capture_output=True, text=True, env=env, timeout=600)



def stream_pipe_cat(sink: str = "/dev/null") -> Tuple[int, "subprocess.Popen[bytes]"]:
    """A pipe whose read end is drained by `cat` (into `sink`); returns (write fd, cat)."""
    r, w = os.pipe()
    with open(sink, "wb") as out:
        cat = subprocess.Popen(["cat"], stdin=r, stdout=out)
    os.close(r)
    return w, cat
