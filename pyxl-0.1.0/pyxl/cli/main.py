"""The ``pyxl`` command line, modelled on xl's save/restore.

Exit codes: 0 success; 1 the operation failed (helper, libxc, guest, or a
stream Xen would refuse); 2 bad arguments or unusable input (argparse errors,
unreadable or missing files, unknown domain); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), after cancelling the operation and cleaning up.  Errors
are one line on stderr, never a traceback (``PYXL_DEBUG=1`` shows one).
"""

from __future__ import annotations

import argparse
import importlib
import sys

from pyxl import __version__
from pyxl.cli.args import Parser, words_as_written
from pyxl.cli.runner import (EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED, EXIT_USAGE,
                             Interrupted, fail)
from pyxl.errors import BackendError, PyxlError, StartupError

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Callable, Dict, List, Optional, Sequence, Tuple

#: The static dispatch table: command -> (its module in pyxl.cli, its help line), in
#: ``pyxl --help`` order.  A module's ``add_parser(sub)`` registers its commands.  Only
#: the module of the command being run is imported: ``pyxl --version`` imports none,
#: ``pyxl sim list`` only pyxl.cli.sim, and the others appear by name and help line
#: (``add_parser(sub, rest)`` gets the words after the command, or None for everything)
#: (tests/integration/test_cli_startup.py checks these lines are the modules' own).
COMMANDS: "Dict[str, Tuple[str, str]]" = {
    "save": ("saverestore", "save a domain to a file (xl save)"),
    "restore": ("saverestore", "restore a domain from a save file (xl restore)"),
    "inspect": ("inspect", "show and check a save file or migration stream"),
    "sim": ("sim", "create and control simulated Xen domains (fakexen)"),
    "demo": ("demo", "live-save and restore a busy simulated guest, end to end"),
    "migrate": ("migrate", "migrate a domain to another host (xl migrate)"),
    "migrate-receive": ("migrate", "receive a migrating domain (xl migrate-receive)"),
    "completion": ("completion", "print a shell completion script (bash)"),
}


def _command_in(argv: "Sequence[str]") -> "Optional[str]":
    """The subcommand argv names: its first word that is not an option (pyxl's own
    options, -v/--verbose/-T/--timestamps/--version/-h, take no value)."""
    return next((a for a in argv if not a.startswith("-")), None)


#: what ``pyxl --help`` says first (plain text: the man page's NAME line too)
DESCRIPTION = "Save, restore and migrate Xen domains, with xl's commands and streams."


def build_parser(argv: "Optional[Sequence[str]]" = None) -> argparse.ArgumentParser:
    """pyxl's parser: every command in full if ``argv`` is None, else only the one
    ``argv`` runs (the others by name and help line, enough for ``pyxl --help``)."""
    parser = Parser(prog="pyxl", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"pyxl {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="show helper logs (-v info, -vv debug)")
    parser.add_argument("-T", "--timestamps", action="store_true",
                        help="start each log line with the date and time and pyxl's pid "
                             "(xl -T)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    wanted = None if argv is None else _command_in(argv)
    loaded = set()
    # What follows the command, for a module with subcommands to build only the one named.
    rest = None if argv is None or wanted is None else list(argv[list(argv).index(wanted) + 1:])
    for name, (module, helptext) in COMMANDS.items():
        if argv is None or COMMANDS.get(wanted or "", ("",))[0] == module:
            if module not in loaded:
                loaded.add(module)
                importlib.import_module(f"pyxl.cli.{module}").add_parser(sub, rest)
        else:
            sub.add_parser(name, help=helptext, add_help=False)
    return parser


#: Commands that run operations: without -v, pyxl's own warnings still show
#: (a --downtime the helper will ignore, a dropped connection); errors are
#: printed once, by the command, and the helper's log needs -v.
_WARNING_COMMANDS = ("save", "restore", "migrate", "migrate-receive", "demo")


#: -T's prefix, as xl's: the local date and time (to the millisecond) and the pid
_STAMP = "%(asctime)s.%(msecs)03d [%(process)d] "
_STAMP_DATE = "%Y-%m-%d %H:%M:%S"


def _configure_logging(verbose: int, command: "Optional[str]" = None,
                       stamps: bool = False) -> None:
    if verbose == 0 and command not in _WARNING_COMMANDS:
        return   # pyxl's loggers have a NullHandler: silent, and logging not imported
    import logging

    from pyxl._log import get_logger
    stamp = _STAMP if stamps else ""
    if verbose == 0:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter(stamp + "pyxl: warning: %(message)s",
                                               datefmt=_STAMP_DATE))
        handler.addFilter(lambda r: r.levelno == logging.WARNING
                          and not getattr(r, "pyxl_helper", False))
        get_logger("pyxl").addHandler(handler)
        return
    level = logging.INFO if verbose == 1 else logging.DEBUG
    # -vv: debugging, where the time since the command started tells what was slow.
    fmt = "%(name)s: %(levelname)s: %(message)s"
    if verbose >= 2:
        fmt = "+%(relativeCreated)6.0fms " + fmt
    logging.basicConfig(level=level, format=stamp + fmt, datefmt=_STAMP_DATE)
    if verbose == 1:
        # The command prints its outcome (`pyxl: error: ...`): an operation's
        # record of the same failure would say it twice (-vv shows everything).
        from pyxl._log import OUTCOME
        for shown in logging.root.handlers:
            shown.addFilter(lambda r: not getattr(r, OUTCOME, False))


def main(argv: Optional[List[str]] = None) -> int:
    """Run one pyxl command (``argv``, else the process's); its exit status."""
    restore = words_as_written()
    try:
        return _run(sys.argv[1:] if argv is None else argv)
    finally:
        restore()


def _run(argv: List[str]) -> int:
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    _configure_logging(args.verbose, _command_in(argv), args.timestamps)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except Interrupted as exc:
        import signal
        detail = f": {exc.detail}" if exc.detail else ""
        if exc.signum != signal.SIGINT:
            print(f"pyxl: terminated{detail}", file=sys.stderr)
            return EXIT_TERMINATED
        print(f"pyxl: interrupted{detail}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("pyxl: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (StartupError, FileNotFoundError, PermissionError, IsADirectoryError) as exc:
        fail(exc)
        return EXIT_USAGE
    except BackendError as exc:
        from pyxl.sim.errors import InsufficientResources, UnsafeSimDir   # only now: not light
        fail(exc)
        # no room for a new domain is unusable input, as a restore says it
        return EXIT_USAGE if isinstance(exc, (UnsafeSimDir, InsufficientResources)) \
            else EXIT_FAILED
    except (PyxlError, OSError, ValueError) as exc:
        fail(exc)
        return EXIT_FAILED
    except Exception as exc:  # still one line: a toolstack parses our stderr
        fail(exc, internal=True)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
