"""The ``pyxl`` command line, modelled on xl's save/restore.

Exit codes: 0 success; 1 the operation failed (helper, libxc, guest, or a
stream Xen would refuse); 2 bad arguments or unusable input (argparse errors,
unreadable or missing files, unknown domain); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), after cancelling the operation and cleaning up.  Errors
are one line on stderr, never a traceback (``PYXL_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, List, Optional

from . import __version__
from .errors import PyxlError, StartupError
from .loop import default_loop
from .operation import ProgressEvent, restore, save

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


def cmd_save(args: argparse.Namespace) -> int:
    leave = "running" if args.c else "paused" if args.p else "destroy"
    bar = ProgressBar(f"saving domain {args.domid}")
    op = save(args.domid, args.file, live=args.live, leave=leave, helper=args.helper,
              timeout=args.timeout, on_progress=bar, sim_dir=args.sim_dir, debug=args.debug)
    try:
        res = run(op)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"domid": res.domid, "file": res.path, "bytes": res.bytes_written,
                          "seconds": round(res.duration, 6), "iterations": res.iterations,
                          "downtime_ms": None if res.downtime is None
                          else round(res.downtime * 1000, 3)}))
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    bar = ProgressBar("restoring")
    op = restore(args.file, paused=args.p, helper=args.helper, timeout=args.timeout,
                 on_progress=bar, sim_dir=args.sim_dir)
    try:
        res = run(op)
    finally:
        bar.close()
    if args.json:
        print(json.dumps({"domid": res.domid, "store_gfn": res.store_gfn,
                          "console_gfn": res.console_gfn, "seconds": round(res.duration, 6)}))
    else:
        print(res.domid)
    return EXIT_OK


def domid_arg(text: str) -> int:
    """argparse type for a domain id (shared by every subcommand)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a domain id: {text!r}") from None
    if not 0 <= value < 0x7FF0:
        raise argparse.ArgumentTypeError(f"domain id out of range: {value}")
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--helper", metavar="PATH",
                   help="helper to run (default: $PYXL_SAVE_HELPER, else pyxl's own); "
                        "e.g. /usr/lib/xen-4.17/bin/libxl-save-helper")
    p.add_argument("--sim-dir", metavar="DIR", help="fakexen state directory (default: "
                   "$PYXL_SIM_DIR, else /dev/shm/pyxl-sim)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyxl", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pyxl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show helper logs (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("save", help="save a domain to a file (xl save)")
    p.add_argument("-c", action="store_true", help="leave the domain running after the save")
    p.add_argument("-p", action="store_true", help="leave the domain paused after the save")
    p.add_argument("--live", action="store_true", help="pre-copy while the guest runs")
    p.add_argument("--debug", action="store_true", help="resend all pages for verification")
    p.add_argument("domid", type=domid_arg, metavar="DOMID")
    p.add_argument("file", metavar="FILE")
    _common(p)
    p.set_defaults(func=cmd_save)

    p = sub.add_parser("restore", help="restore a domain from a save file (xl restore)")
    p.add_argument("-p", action="store_true", help="leave the restored domain paused")
    p.add_argument("file", metavar="FILE")
    _common(p)
    p.set_defaults(func=cmd_restore)

    for name, module in (("inspect", "inspect_cli"), ("sim", "sim_cli"), ("demo", "demo"),
                         ("migrate", "migrate_cli")):
        mod = __import__(f"pyxl.{module}", fromlist=["add_parser"])
        mod.add_parser(sub)
    return parser


def _configure_logging(verbose: int) -> None:
    level = logging.CRITICAL + 1 if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    # -vv: debugging, where the time since the command started tells what was slow.
    fmt = "%(name)s: %(levelname)s: %(message)s"
    if verbose >= 2:
        fmt = "+%(relativeCreated)6.0fms " + fmt
    logging.basicConfig(level=level, format=fmt)


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "p", False) and getattr(args, "c", False):
        parser.error("-c and -p are mutually exclusive")
    _configure_logging(args.verbose)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Interrupted as exc:
        if exc.signum != signal.SIGINT:
            print("pyxl: terminated", file=sys.stderr)
            return EXIT_TERMINATED
        print("pyxl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("pyxl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StartupError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        _fail(exc)
        return EXIT_USAGE
    except (PyxlError, OSError, ValueError) as exc:
        _fail(exc)
        return EXIT_FAILED
    except Exception as exc:  # still one line: a toolstack parses our stderr
        _fail(exc, internal=True)
        return EXIT_FAILED


def _fail(exc: BaseException, internal: bool = False) -> None:
    if os.environ.get("PYXL_DEBUG"):
        import traceback
        traceback.print_exc()
    text = str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename and exc.strerror:
        text = f"{exc.filename}: {exc.strerror}"
    prefix = "internal error: " if internal else ""
    print(f"pyxl: error: {prefix}{text}".splitlines()[0], file=sys.stderr)


if __name__ == "__main__":
    # Run the importable pyxl.cli, not this __main__ copy: the subcommand
    # modules import pyxl.cli, and two copies would mean two Interrupted classes.
    from pyxl.cli import main as _main
    sys.exit(_main())
