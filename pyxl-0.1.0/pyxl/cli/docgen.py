"""Shell completion and the man page, both generated from pyxl's own parser.

One source of truth: the argparse parser that runs the commands also says what
``pyxl completion bash`` completes and what ``pyxl.1`` documents, so neither
can drift from the options that exist (``make man`` writes ``build/pyxl.1``;
``python -m pyxl.cli.docgen man|bash`` prints either).

May import: argparse, pyxl (its version), pyxl.cli.main (the parser).
"""

from __future__ import annotations

import argparse
import sys
import textwrap
from typing import Dict, Iterator, List, Tuple

__all__ = ["bash_completion", "man_page", "walk"]

#: metavars that name a file or a directory: completed from the file system
_FILES = {"FILE", "PATH", "FILE|-"}
_DIRS = {"DIR"}


def _subparsers(parser: argparse.ArgumentParser) -> Dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def walk(parser: argparse.ArgumentParser, path: str = ""
         ) -> Iterator[Tuple[str, argparse.ArgumentParser]]:
    """Every (command path, parser): "" for pyxl itself, "save", "sim create", ..."""
    yield path, parser
    for name, sub in _subparsers(parser).items():
        yield from walk(sub, f"{path} {name}".strip())


def _full_parser() -> argparse.ArgumentParser:
    from pyxl.cli.main import build_parser
    return build_parser()


# ---- bash --------------------------------------------------------------------------------------


def _case(rows: List[Tuple[str, str]]) -> str:
    return "\n".join(f'        "{key}") echo "{value}" ;;' for key, value in rows)


def bash_completion(parser: "argparse.ArgumentParser | None" = None) -> str:
    """A bash completion script for ``pyxl``: commands, options, option values
    (choices, files, directories) and domain names (``xl list`` on a Xen host,
    else ``pyxl sim list``)."""
    parser = parser or _full_parser()
    Rows = List[Tuple[str, str]]
    subs: Rows = []
    opts: Rows = []
    valued: Rows = []
    kinds: Rows = []
    positional: Rows = []
    for path, p in walk(parser):
        subs.append((path, " ".join(_subparsers(p))))
        names: List[str] = []
        takes: List[str] = []
        for a in p._actions:
            if a.option_strings:
                names += [o for o in a.option_strings if o.startswith("--") or len(o) == 2]
                if a.nargs != 0:
                    takes += a.option_strings
                    for o in a.option_strings:
                        if a.choices:
                            kinds.append((f"{path}|{o}", "words " + " ".join(map(str, a.choices))))
                        elif a.metavar in _FILES:
                            kinds.append((f"{path}|{o}", "files"))
                        elif a.metavar in _DIRS:
                            kinds.append((f"{path}|{o}", "dirs"))
            elif not isinstance(a, argparse._SubParsersAction):
                # the n-th positional of this command: pyxl save DOMAIN FILE
                n = sum(1 for k, _ in positional if k.startswith(f"{path}|#"))
                kind = ("words " + " ".join(map(str, a.choices)) if a.choices
                        else "files" if a.metavar in _FILES
                        else "domains" if a.metavar == "DOMAIN" else "")
                positional.append((f"{path}|#{n}", kind))
        opts.append((path, " ".join(names)))
        valued.append((path, " ".join(takes)))
    return f"""\
# bash completion for pyxl, generated from its parser: pyxl completion bash
# Install: pyxl completion bash > /etc/bash_completion.d/pyxl

_pyxl_subs() {{
    case $1 in
{_case(subs)}
    esac
}}
_pyxl_opts() {{
    case $1 in
{_case(opts)}
    esac
}}
_pyxl_valued() {{
    case $1 in
{_case(valued)}
    esac
}}
_pyxl_kind() {{
    case $1 in
{_case(kinds + [(p, k) for p, k in positional if k])}
    esac
}}
_pyxl_domains() {{
    if command -v xl > /dev/null 2>&1 && [ -e /dev/xen/privcmd ]; then
        xl list 2> /dev/null | awk 'NR > 1 {{print $1}}'
    else
        pyxl sim list ${{1:+--sim-dir "$1"}} 2> /dev/null | awk 'NR > 1 {{print $2}}'
    fi
}}
_pyxl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} prev=${{COMP_WORDS[COMP_CWORD-1]}}
    local path="" w i kind npos=0 simdir=""
    for ((i = 1; i < COMP_CWORD; i++)); do
        w=${{COMP_WORDS[i]}}
        case $w in -*) continue ;; esac
        if [[ ${{COMP_WORDS[i-1]}} == --sim-dir ]]; then simdir=$w; fi
        case " $(_pyxl_valued "$path") " in *" ${{COMP_WORDS[i-1]}} "*) continue ;; esac
        case " $(_pyxl_subs "$path") " in
            *" $w "*) path="${{path:+$path }}$w"; npos=0 ;;
            *) npos=$((npos + 1)) ;;
        esac
    done
    if [[ $prev == -* ]] && [[ " $(_pyxl_valued "$path") " == *" $prev "* ]]; then
        kind=$(_pyxl_kind "$path|$prev")
    elif [[ $cur == -* ]]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_pyxl_opts "$path")" -- "$cur")
        return
    elif [ -n "$(_pyxl_subs "$path")" ]; then
        mapfile -t COMPREPLY < <(compgen -W "$(_pyxl_subs "$path")" -- "$cur")
        return
    else
        kind=$(_pyxl_kind "$path|#$npos")
    fi
    case $kind in
        words\\ *) mapfile -t COMPREPLY < <(compgen -W "${{kind#words }}" -- "$cur") ;;
        files) mapfile -t COMPREPLY < <(compgen -f -- "$cur") ;;
        dirs) mapfile -t COMPREPLY < <(compgen -d -- "$cur") ;;
        domains) mapfile -t COMPREPLY < <(compgen -W "$(_pyxl_domains "$simdir")" -- "$cur") ;;
        *) COMPREPLY=() ;;
    esac
}}
complete -F _pyxl pyxl
"""


# ---- man ---------------------------------------------------------------------------------------


def _roff(text: str) -> str:
    """Plain text for roff: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line[:1] in (".", "'") else line
                     for line in text.splitlines())


def _option_label(a: argparse.Action) -> str:
    names = ", ".join(f"\\fB{_roff(o)}\\fR" for o in a.option_strings)
    if a.nargs == 0:
        return names
    value = a.metavar or ("{" + ",".join(map(str, a.choices)) + "}" if a.choices
                          else a.dest.upper())
    return f"{names} \\fI{_roff(str(value))}\\fR"


EXIT_STATUS = [
    ("0", "success"),
    ("1", "the operation failed: the helper, libxc, the guest, a timeout, a stream Xen would "
          "refuse"),
    ("2", "bad arguments or unusable input: an unknown domain, a number out of range, "
          "a missing or unreadable file, a config pyxl will not build, a name in use"),
    ("130", "interrupted (SIGINT), after cancelling the operation and cleaning up"),
    ("143", "terminated (SIGTERM or SIGHUP), likewise"),
]
ENVIRONMENT = [
    ("PYXL_SAVE_HELPER", "the helper to run instead of pyxl's own (e.g. Debian's "
                         "libxl-save-helper); --helper overrides it"),
    ("PYXL_SIM_DIR", "a fakexen state directory: act on simulated domains"),
    ("PYXL_DEBUG", "set to 1: show a traceback with an error"),
]


def _help_text(a: argparse.Action) -> str:
    """An action's help as ``--help`` shows it (``%(default)s`` and the like filled in)."""
    text = " ".join((a.help or "").split())
    try:
        return text % {**vars(a), "prog": "pyxl"}
    except (KeyError, ValueError, TypeError):
        return text


def man_page(parser: "argparse.ArgumentParser | None" = None) -> str:
    """``pyxl.1``: every command's usage, description and options, the exit
    statuses and the environment."""
    from pyxl import __version__
    parser = parser or _full_parser()
    out = [f'.TH PYXL 1 "" "pyxl {__version__}" "User Commands"',
           ".SH NAME", "pyxl \\- save, restore and live\\-migrate Xen domains",
           ".SH SYNOPSIS", ".B pyxl", "[\\fB\\-v\\fR|\\fB\\-vv\\fR] \\fICOMMAND\\fR ...",
           ".SH DESCRIPTION",
           "pyxl saves, restores and live\\-migrates Xen domains as xl does, without blocking "
           "the program that drives it: it runs Xen's save helper (its own or Debian's libxl\\-save\\-helper) in a child "
           "process and speaks Xen's helper protocol with it; the save files and migration "
           "streams are xl's.",
           ".SH COMMANDS"]
    for path, p in walk(parser):
        if not path or _subparsers(p):
            continue
        usage = " ".join(p.format_usage().split())
        usage = usage[len("usage: "):] if usage.startswith("usage: ") else usage
        usage = textwrap.fill(usage, 78, subsequent_indent="    ", break_on_hyphens=False)
        out += [f".SS {_roff(path)}", ".nf", _roff(usage), ".fi"]
        if p.description:
            out += [".PP", _roff(" ".join(p.description.split()))]
        for a in p._actions:
            if isinstance(a, argparse._HelpAction) or a.help == argparse.SUPPRESS:
                continue
            label = (_option_label(a) if a.option_strings
                     else f"\\fI{_roff(str(a.metavar or a.dest))}\\fR")
            out += [".TP", label, _roff(_help_text(a))]
    out += [".SH EXIT STATUS"]
    for code, text in EXIT_STATUS:
        out += [".TP", f"\\fB{code}\\fR", _roff(text)]
    out += [".SH ENVIRONMENT"]
    for name, text in ENVIRONMENT:
        out += [".TP", f"\\fB{name}\\fR", _roff(text)]
    out += [".SH SEE ALSO", "\\fBxl\\fR(1), \\fBxl.cfg\\fR(5)"]
    return "\n".join(out) + "\n"


def main(argv: "List[str] | None" = None) -> int:
    what = (argv if argv is not None else sys.argv[1:]) or [""]
    if what[0] == "man":
        sys.stdout.write(man_page())
    elif what[0] == "bash":
        sys.stdout.write(bash_completion())
    else:
        sys.stderr.write("usage: python -m pyxl.cli.docgen man|bash\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
