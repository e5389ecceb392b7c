"""argparse types and options shared by the subcommands (one parser each).

May import: pyxl._units, pyxl.errors; the library only inside functions (the
parser is built on every start, so it stays light).
"""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start)
if TYPE_CHECKING:
    from typing import Any, Callable, NoReturn, TypeVar

    from pyxl.backends.base import Backend
    N = TypeVar("N", int, float)

def _as_written(message: str) -> str:
    return message


def words_as_written() -> "Callable[[], None]":
    """Have argparse use its own words as written until the returned function
    is called (pyxl's ``main`` does, around one command; the rest of a process
    that imports pyxl keeps gettext).

    argparse passes each of its words ("usage: ", "show this help message and
    exit", ...) through gettext on every use, and each call looks the catalog up
    again: the locale variables, locale.normalize (whose first use imports
    locale) and a stat per candidate file, 2.5 ms of every start.  Python ships
    no catalog for argparse, and pyxl's own messages are English."""
    saved = argparse._  # type: ignore[attr-defined]
    argparse._ = _as_written  # type: ignore[attr-defined]

    def restore() -> None:
        argparse._ = saved  # type: ignore[attr-defined]
    return restore


class _Formatter(argparse.HelpFormatter):
    """argparse's formatter, sized without ``shutil``: argparse imports it to size
    the terminal whenever a parser gets an argument (2 ms of every start).  The
    same rule: $COLUMNS, else the terminal on stdout, else 80; minus 2."""

    def __init__(self, prog: str, indent_increment: int = 2, max_help_position: int = 24,
                 width: "int | None" = None) -> None:
        if width is None:
            import os
            try:
                width = int(os.environ["COLUMNS"])
            except (KeyError, ValueError):
                stdout = sys.__stdout__
                try:
                    width = (os.get_terminal_size(stdout.fileno()).columns if stdout
                             else 0) or 80
                except (ValueError, OSError):
                    width = 80
            width -= 2
        super().__init__(prog, indent_increment, max_help_position, width)


class Parser(argparse.ArgumentParser):
    """argparse with pyxl's one error style: the (sub)command's usage, then
    ``pyxl: error: [COMMAND: ]MESSAGE``, exit 2.  Subparsers are of this class too."""

    def __init__(self, *args: "Any", **kwargs: "Any") -> None:
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> "NoReturn":
        self.print_usage(sys.stderr)
        words = self.prog.split()[1:]           # "pyxl sim info" -> "sim info"
        where = f"{' '.join(words)}: " if words else ""
        self.exit(2, f"pyxl: error: {where}{message}\n")


#: Xen's guest domain ids stop below DOMID_FIRST_RESERVED (pyxl.backends.base.DOMID_LIMIT).
_DOMID_LIMIT = 0x7FF0
#: The longest --timeout and other deadlines: a day.
MAX_SECONDS = 86400


def domain_arg(text: str) -> str:
    """argparse type for DOMAIN: a domain id or a domain name, as xl takes it.  The
    name is looked up when the command runs (:func:`resolve_domain`)."""
    if text.isdigit():
        if int(text, 10) >= _DOMID_LIMIT:
            raise argparse.ArgumentTypeError(f"domain id out of range: {int(text, 10)}")
        return text
    if not text.strip() or text.startswith("-") or "/" in text:
        raise argparse.ArgumentTypeError(f"not a domain id or name: {text!r}")
    return text


#: The old name: every DOMID argument now takes a name too.
domid_arg = domain_arg


def resolve_domain(backend: "Backend", name_or_id: str) -> int:
    """The domid of what the user typed, through the backend (``pyxl.StartupError``,
    exit 2, for an unknown or ambiguous name)."""
    from pyxl.backends.base import domid_of
    return domid_of(backend, name_or_id)


def bounded(convert: "Callable[[str], N]", what: str, ok: "Callable[[N], bool]",
            bounds: str) -> "Callable[[str], N]":
    """An argparse type: ``convert`` the text, then check it (``ok``)."""
    def parse(text: str) -> "N":
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value != value or not ok(value):      # NaN is no number of seconds
            raise argparse.ArgumentTypeError(f"must be {bounds}, not {text}")
        return value
    return parse


def name_arg(text: str) -> str:
    """A domain name a user gives (``sim create --name``, ``sim rename``): the
    rules a restore applies to a saved config's, so that what the simulator
    makes can be saved and restored; and not digits only, which read as a
    domain id wherever a domain is taken."""
    from pyxl.backends.configcheck import check_name
    from pyxl.errors import ConfigError
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"not valid UTF-8: {text!r}") from None
    if text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} reads as a domain id: a name needs more "
                                         f"than digits")
    try:
        check_name(text, "name")
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} {exc.problem}") from None
    return text


def dir_arg(text: str) -> str:
    """A directory a user names (``--sim-dir``): not empty, which would
    otherwise quietly mean the default."""
    if not text:
        raise argparse.ArgumentTypeError("empty: name a directory, or leave the option out "
                                         "for the default")
    return text


def size_arg(least: int, most: int) -> "Callable[[str], int]":
    """An argparse type: a size such as 64M or 1G, from ``least`` to ``most`` bytes."""
    from pyxl._units import format_size, parse_size

    def parse(text: str) -> int:
        try:
            value = parse_size(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
        if not least <= value <= most:
            raise argparse.ArgumentTypeError(
                f"must be from {format_size(least)} to {format_size(most)}, not {text}")
        return value
    return parse


#: --timeout, --header-timeout, ...: more than 0, at most a day.
seconds_arg = bounded(float, "a number of seconds", lambda v: 0 < v <= MAX_SECONDS,
                      f"more than 0 and at most {MAX_SECONDS} seconds")


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--helper", metavar="PATH",
                   help="helper to run (default: $PYXL_SAVE_HELPER, else pyxl's own); "
                        "e.g. /usr/lib/xen-4.17/bin/libxl-save-helper")
    p.add_argument("--sim-dir", metavar="DIR", type=dir_arg,
                   help="fakexen state directory (default: "
                   "$PYXL_SIM_DIR, else /dev/shm/pyxl-sim-$UID)")
    p.add_argument("--timeout", type=seconds_arg, metavar="SECONDS",
                   help=f"give up after this long (more than 0, at most {MAX_SECONDS})")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no summary line on success")
    p.add_argument("--json", action="store_true",
                   help="machine-readable output: the summary's numbers as one JSON object")
