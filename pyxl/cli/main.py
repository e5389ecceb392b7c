"""The ``pyxl`` command line, modelled on xl's save/restore.

Exit codes: 0 success; 1 the operation failed (helper, libxc, guest, or a
stream Xen would refuse); 2 bad arguments or unusable input (argparse errors,
unreadable or missing files, unknown domain); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), after cancelling the operation and cleaning up.  Errors
are one line on stderr, never a traceback (``PYXL_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import Callable, List, Optional

from pyxl import __version__
from pyxl.cli import demo, inspect, migrate, saverestore, sim
from pyxl.cli.runner import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE,
                             Interrupted, fail)
from pyxl.errors import PyxlError, StartupError
from pyxl.sim.errors import UnsafeSimDir

#: Every subcommand module, in ``pyxl --help`` order; each has ``add_parser(sub)``.
SUBCOMMANDS = (saverestore, inspect, sim, demo, migrate)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyxl", description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--version", action="version", version=f"pyxl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show helper logs (-v info, -vv debug)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for module in SUBCOMMANDS:
        module.add_parser(sub)
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
    except (StartupError, UnsafeSimDir, FileNotFoundError, PermissionError,
            IsADirectoryError) as exc:
        fail(exc)
        return EXIT_USAGE
    except (PyxlError, OSError, ValueError) as exc:
        fail(exc)
        return EXIT_FAILED
    except Exception as exc:  # still one line: a toolstack parses our stderr
        fail(exc, internal=True)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
