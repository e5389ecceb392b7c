"""What every pyxl subcommand shares: exit codes, the one-line error, a progress
bar, and :func:`run`, which drives one operation on the default loop and turns
SIGINT/SIGTERM/SIGHUP into a clean cancel.

May import: the library (pyxl.loop, pyxl.ops); imported by every cli module.
"""

from __future__ import annotations

import os
import signal
import sys
import time

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, List

    from pyxl.ops.operation import ProgressEvent

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED, EXIT_TERMINATED = 0, 1, 2, 130, 143


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, SIGTERM or SIGHUP stopped an operation, which was cancelled and cleaned
    up (temporary file removed, guest resumed, half-restored domain destroyed)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


class ProgressBar:
    """A one-line progress display on a TTY; silent otherwise."""

    def __init__(self, label: str, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.label = label
        self._last = 0.0
        self._shown = False

    def __call__(self, ev: ProgressEvent) -> None:
        if not self.enabled or not ev.total:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and ev.done != ev.total:
            return
        self._last = now
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
    if caught and op.exception() is not None:
        raise Interrupted(caught[0])
    return op.result()



def fail(exc: BaseException, internal: bool = False) -> None:
    if os.environ.get("PYXL_DEBUG"):
        import traceback
        traceback.print_exc()
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    prefix = "internal error: " if internal else ""
    print(f"pyxl: error: {prefix}{text}".splitlines()[0], file=sys.stderr)
