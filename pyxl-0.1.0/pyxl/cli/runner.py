"""What every pyxl subcommand shares: exit codes, the one-line error, a progress
bar, and :func:`run`, which drives one operation on the default loop and turns
SIGINT/SIGTERM/SIGHUP into a clean cancel.

May import: the library (pyxl.loop, pyxl.ops); imported by every cli module.
"""

from __future__ import annotations

import os
import sys
import time

from pyxl._text import shown

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Dict, List, Optional, Tuple

    from pyxl.ops.operation import ProgressEvent

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped an operation, which was cancelled and cleaned
    up (temporary file removed, guest resumed, half-restored domain destroyed)."""

    def __init__(self, signum: int, detail: "Optional[str]" = None) -> None:
        super().__init__(signum)
        self.signum = signum
        #: what the user must know beyond "interrupted": a migration whose
        #: source was not simply left running (a Remus failover, in doubt)
        self.detail = detail


#: Seconds into an operation, or bytes moved, before the progress line shows a
#: rate and an ETA.
_RATE_AFTER, _RATE_AFTER_BYTES = 0.5, 4 << 20


class ProgressBar:
    """A one-line progress display on a TTY; silent otherwise."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self._last = 0.0
        self._shown = False
        #: the operation, once started: its ``stats()`` give bytes, rate and ETA
        self.op: Any = None

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled or not ev.total:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and ev.done != ev.total:
            return
        self._last = now
        st = self.op.stats() if hasattr(self.op, "stats") else None
        if st is not None and st.bytes is not None:
            # bytes of the stream, not libxc's fraction of the whole pfn space
            text = f"{self.label} {ev.phase:<22.22} {size_text(st.bytes):>10}"
            if st.memory and st.bytes < st.memory:
                # (the stream outgrows the memory: pfn lists, pages sent again)
                text += f" of ~{size_text(st.memory)}"
            # A rate over the first kilobytes says nothing (146 KiB/s, ETA 1793 s)
            if st.rate and (st.bytes >= _RATE_AFTER_BYTES or st.elapsed >= _RATE_AFTER):
                text += f", {size_text(int(st.rate))}/s"
                if st.eta is not None:
                    text += f", ETA {st.eta:.0f} s"
            if st.dirty_rate:
                text += f", dirtying {size_text(int(st.dirty_rate))}/s"
            self.stream.write(f"\r{text:<79}")
        else:
            frac = min(1.0, ev.done / ev.total)
            width = 30
            bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
            self.stream.write(f"\r{self.label} {ev.phase:<22.22} [{bar}] {frac * 100:5.1f}%")
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\n")
            self.stream.flush()
            self._shown = False


def run(op: Any) -> Any:
    """Drive one operation on the default loop; SIGINT, SIGTERM and SIGHUP cancel it.

    The signals only wake the loop (a wakeup fd): the cancel happens from the
    loop, never in the middle of a callback, and the loop runs on until the
    clean-up is done (temp file removed, guest resumed, half-made domain
    destroyed).  Then :class:`Interrupted` carries the signal to ``main``.
    """
    import signal
    import threading

    from pyxl.loop import default_loop
    loop = default_loop()
    if threading.current_thread() is not threading.main_thread():
        loop.run_until(op.done)
        return op.result()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    caught: List[int] = []

    def on_signal() -> None:
        try:
            caught.extend(os.read(r, 64))
        except BlockingIOError:
            pass
        if caught and not op.done():
            op.cancel()

    sigs = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {sig: signal.signal(sig, lambda *_: None) for sig in sigs}
    old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
    loop.add_reader(r, on_signal)
    try:
        loop.run_until(op.done)
    finally:
        loop.remove_reader(r)
        signal.set_wakeup_fd(old_fd)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        os.close(r)
        os.close(w)
    exc = op.exception()
    if caught and exc is not None:
        state = getattr(exc, "source_state", None)
        raise Interrupted(caught[0], str(exc) if state not in (None, "running") else None)
    return op.result()



def domain_of(config: "Optional[Dict[str, Any]]") -> "Tuple[Optional[str], Optional[int]]":
    """(name, memory in bytes) of a libxl domain config, each None if it does not say."""
    c_info = config.get("c_info") if isinstance(config, dict) else None
    b_info = config.get("b_info") if isinstance(config, dict) else None
    name = c_info.get("name") if isinstance(c_info, dict) else None
    kb = b_info.get("max_memkb") if isinstance(b_info, dict) else None
    return (name if isinstance(name, str) and name else None,
            kb * 1024 if isinstance(kb, int) and kb > 0 else None)


def size_text(n: int) -> str:
    """512 MiB, 1 GiB, 1.5 GiB: whole units without a decimal."""
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            value = n / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.1f} {unit}"
    return f"{n} B"


def summarize(args: Any, verb: str, config: "Optional[Dict[str, Any]]", domid: int,
              where: str, seconds: float, numbers: "Dict[str, Any]",
              extra: str = "", out: Any = None) -> None:
    """The line a successful command ends with, on stderr (stdout may be a result or a
    channel): ``saved web1 (512 MiB) to web1.save in 1.6 s``; ``-q``: none.  With
    ``--json``, the same numbers as one JSON object on ``out`` (stdout) instead."""
    name, memory = domain_of(config)
    if args.json:
        import json
        result(json.dumps({"name": name, "memory": memory, **numbers,
                           "seconds": round(seconds, 6)}), f"{verb} domain {domid}", out)
        return
    if getattr(args, "quiet", False):
        return
    who = shown(name) if name else f"domain {domid}"
    size = f" ({size_text(memory)})" if memory else ""
    print(f"{verb} {who}{size} {shown(where)} in {seconds:.1f} s{extra}", file=sys.stderr,
          flush=True)


def result(text: str, verb: str, out: Any = None) -> None:
    """Print a successful operation's result (a domid, a JSON object).  If
    stdout fails (a full disk, a closed pipe), the error says that the
    operation itself succeeded: a script must not retry a restore that ran."""
    stream = out or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except OSError as exc:
        from pyxl.errors import PyxlError
        try:
            # What stays buffered would fail again at exit ("Exception ignored
            # on flushing sys.stdout", and Python 3.13 exits 120 for it): the
            # fd goes to /dev/null, so that flush succeeds and says nothing.
            devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
            os.dup2(devnull, stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass
        raise PyxlError(f"{verb} (the operation succeeded), but its result could not be "
                        f"written: {exc.strerror or exc}") from exc


def fail(exc: BaseException, internal: bool = False) -> None:
    if os.environ.get("PYXL_DEBUG"):
        import traceback
        traceback.print_exc()
    from pyxl.errors import os_error_text
    text = (os_error_text(exc) if isinstance(exc, OSError) else str(exc)) or type(exc).__name__
    prefix = "internal error: " if internal else ""
    # Its first line, made safe: an error can quote what a peer or a file said.
    print(f"pyxl: error: {prefix}{shown(text.splitlines()[0] if text else '')}",
          file=sys.stderr)
