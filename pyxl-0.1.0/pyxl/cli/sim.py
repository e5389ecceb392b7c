"""``pyxl sim``: create and control simulated Xen domains (fakexen).

    pyxl sim create --memory 1G [--dirty-rate 50M] [--content PROFILE [--seed N]] [--name N]
                    [--paused] [--json]
    pyxl sim create-empty --max-mem 1G [--name N] [--json]
    pyxl sim list [--json]
    pyxl sim info DOMID [--json]
    pyxl sim pause|unpause|suspend|resume|destroy DOMID
    pyxl sim digest DOMID
    pyxl sim check DOMID [--json]
    pyxl sim set-rate DOMID RATE
    pyxl sim rename DOMID NAME
    pyxl sim env

Every subcommand takes ``--sim-dir DIR`` (default: $PYXL_SIM_DIR, else
/dev/shm/pyxl-sim-$UID).  Sizes take K, M, G suffixes.  Handlers return an exit
code: 0 ok, 1 the operation failed, 2 bad arguments or no such domain; errors
are one line on stderr.
"""

from __future__ import annotations

import argparse
import sys

from pyxl.cli.args import (Parser, bounded, dir_arg, domain_arg, name_arg, resolve_domain, seconds_arg,
                           size_arg)
from pyxl._text import shown

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Callable, List, Optional, Sequence, Tuple

    from pyxl import sim

    Subcommand = Tuple[str, Callable[[argparse.Namespace], int], str, bool, bool,
                       Callable[[argparse.ArgumentParser], None]]

# pyxl.sim is imported by each command, not here: building the parser stays cheap
# (``pyxl --version`` and every other subcommand parse these definitions too).

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


#: A guest's memory: two pages (fakexen's least) to Xen 4.17's 16 TiB.
_memory = size_arg(8 << 10, 16 << 40)
#: A dirty rate, bytes/s: 0 (idle) to 1 TiB/s, beyond any guest's.
_rate = size_arg(0, 1 << 40)
_seed = bounded(int, "an integer", lambda v: 0 <= v < 1 << 64, "from 0 to 2**64-1")


_domid = domain_arg


def _err(msg: str) -> None:
    print(f"pyxl: error: {msg}", file=sys.stderr)


def _guarded(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Turn simulator errors into one-line messages and exit codes."""
    def run(args: argparse.Namespace) -> int:
        from pyxl import sim
        from pyxl.errors import StartupError
        try:
            if isinstance(getattr(args, "domid", None), str):
                args.domid = _domid_of(args)
            return fn(args)
        except (sim.NoSuchDomain, sim.UnsafeSimDir, sim.InsufficientResources,
                StartupError) as exc:      # (no room: exit 2, as for a restore)
            _err(str(exc))
            return EXIT_USAGE
        except (sim.SimError, ValueError, OSError) as exc:
            _err(str(exc))
            return EXIT_FAILED
    run.__name__ = fn.__name__
    run.__doc__ = fn.__doc__
    return run


def _domid_of(args: argparse.Namespace) -> int:
    """DOMAIN as an id: digits are one; a name is looked up through fakexen's backend
    (an unknown name: pyxl.StartupError, exit 2)."""
    if args.domid.isdigit():
        return int(args.domid, 10)
    from pyxl.backends.sim import SimBackend
    return resolve_domain(SimBackend(args.sim_dir), args.domid)


def _print_info(i: sim.DomainInfo) -> None:
    from pyxl import sim
    rate = f", writing {sim.format_size(i.dirty_rate)}/s" if i.dirty_rate else ""
    pid = f", vcpu pid {i.vcpu_pid}" if i.vcpu_pid else ""
    print(f"domain {i.domid} {i.name!r}: {i.state}, {sim.format_size(i.memory)}, "
          f"{i.tot_pages} pages populated, max gpfn {i.max_gpfn:#x}{rate}{pid}")


@_guarded
def cmd_create(args: argparse.Namespace) -> int:
    from pyxl import sim
    if args.content is not None and args.content not in sim.CONTENT_PROFILES:
        args.usage_error(f"argument --content: invalid choice: {args.content!r} "
                         f"(choose from {', '.join(sim.CONTENT_PROFILES)})")
    if args.seed is not None and args.content is None:   # the stamped pattern has none
        args.usage_error("argument --seed: goes with --content PROFILE")
    _name_free(args)
    domid = sim.create(args.memory, dirty_rate=args.dirty_rate, name=args.name,
                       sim_dir=args.sim_dir, paused=args.paused, content=args.content,
                       seed=args.seed or 0)
    return _created(args, domid)


@_guarded
def cmd_create_empty(args: argparse.Namespace) -> int:
    from pyxl import sim
    _name_free(args)
    domid = sim.create_empty(args.max_mem // 1024, args.name, sim_dir=args.sim_dir)
    return _created(args, domid)


def _name_free(args: argparse.Namespace) -> None:
    """Names are unique (as xl's): a second domain of a name is refused, as a
    restore of it is, not made to leave both ambiguous."""
    from pyxl import sim
    from pyxl.errors import StartupError
    if args.name is None:
        return
    for domid, name in sim.names(args.sim_dir).items():
        if name == args.name:
            raise StartupError(f"domain {args.name!r} already exists (domid {domid})")


def _created(args: argparse.Namespace, domid: int) -> int:
    """A new domain's id, or with --json its info."""
    if args.json:
        import json
        from pyxl import sim
        print(json.dumps(sim.info(domid, sim_dir=args.sim_dir).to_json()))
    else:
        print(domid)
    return EXIT_OK


@_guarded
def cmd_list(args: argparse.Namespace) -> int:
    import os

    from pyxl import sim
    from pyxl.errors import StartupError
    where = sim.sim_dir_path(args.sim_dir)
    if (args.sim_dir or os.environ.get("PYXL_SIM_DIR")) and not os.path.isdir(where):
        # named, and mistyped, as likely as not: say so rather than list nothing
        # (the default directory is made by the first `sim create`)
        raise StartupError(f"the sim state directory {where} does not exist")
    doms = sim.list_domains(where)
    if args.json:
        import json   # here: the table needs none of it
        print(json.dumps([d.to_json() for d in doms]))
        return EXIT_OK
    print(f"{'DOMID':>5}  {'NAME':<20} {'STATE':<10} {'MEMORY':>10} {'DIRTY/S':>10}  VCPU")
    for d in doms:
        print(f"{d.domid:>5}  {shown(d.name)[:20]:<20} {d.state:<10} {sim.format_size(d.memory):>10} "
              f"{sim.format_size(d.dirty_rate) if d.dirty_rate else '-':>10}  "
              f"{d.vcpu_pid or '-'}")
    return EXIT_OK


@_guarded
def cmd_info(args: argparse.Namespace) -> int:
    import json
    from pyxl import sim
    i = sim.info(args.domid, sim_dir=args.sim_dir)
    if args.json:
        print(json.dumps(i.to_json()))
    else:
        _print_info(i)
    return EXIT_OK


def _action(name: str, *extra: str) -> Callable[[argparse.Namespace], int]:
    """A subcommand that calls ``pyxl.sim.<name>(domid, *args.<extra>, sim_dir=...)``,
    prints nothing."""
    @_guarded
    def cmd(args: argparse.Namespace) -> int:
        from pyxl import sim
        fn: Callable[..., None] = getattr(sim, name)
        fn(args.domid, *(getattr(args, e) for e in extra), sim_dir=args.sim_dir)
        return EXIT_OK
    return cmd


@_guarded
def cmd_suspend(args: argparse.Namespace) -> int:
    from pyxl import sim
    sim.suspend(args.domid, sim_dir=args.sim_dir, timeout=args.timeout)
    return EXIT_OK


@_guarded
def cmd_digest(args: argparse.Namespace) -> int:
    from pyxl import sim
    print(sim.digest(args.domid, sim_dir=args.sim_dir))
    return EXIT_OK


@_guarded
def cmd_check(args: argparse.Namespace) -> int:
    import json
    from pyxl import sim
    c = sim.check_guest(args.domid, sim_dir=args.sim_dir)
    if args.json:
        d: Any = dict(c.__dict__, consistent=c.consistent)
        print(json.dumps(d))
    else:
        print(f"domain {args.domid}: lap {c.lap}, cursor {c.cursor:#x}, "
              f"{c.pages_written} page writes, {c.boots} vCPU boots; "
              f"{c.ok}/{c.checked} RAM pages intact, {c.torn} torn, {c.stale} stale, "
              f"{c.foreign} misplaced, {c.unstamped} blank")
    return EXIT_OK if c.consistent else EXIT_FAILED



@_guarded
def cmd_env(args: argparse.Namespace) -> int:
    import shlex
    from pyxl import sim
    for key, val in sim.helper_env(args.sim_dir).items():
        print(f"{key}={shlex.quote(val)}")
    return EXIT_OK


def _create_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--memory", type=_memory, required=True, metavar="SIZE",
                    help="guest RAM, e.g. 256M or 1G")
    sp.add_argument("--dirty-rate", type=_rate, default=0, metavar="RATE",
                    help="bytes/s the guest writes, e.g. 50M (default 0: idle)")
    sp.add_argument("--name", type=name_arg, metavar="NAME", help="domain name (default simN)")
    sp.add_argument("--paused", action="store_true", help="do not start the guest's vCPU")
    sp.add_argument("--content", metavar="PROFILE",     # checked in cmd_create (lazy import)
                    help="fill memory from a profile: zero, text (about 3x compressible), "
                         "random, typical (50%% zero, 30%% text, 20%% random pages); "
                         "default: the stamped test pattern")
    sp.add_argument("--seed", type=_seed, metavar="N",
                    help="with --content: the profile's seed (default 0): same seed, same bytes")


def _create_empty_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--max-mem", type=_memory, required=True, metavar="SIZE",
                    help="the most memory a restore may populate")
    sp.add_argument("--name", type=name_arg, metavar="NAME", help="domain name")


def _suspend_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--timeout", type=seconds_arg, default=10.0, metavar="SECONDS",
                    help="give up after this long (default 10)")


def _rename_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("name", type=name_arg, metavar="NAME")


def _set_rate_arguments(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("rate", type=_rate, metavar="RATE", help="bytes/s, e.g. 20M (0: idle)")


def _no_arguments(sp: argparse.ArgumentParser) -> None:
    pass


#: The subcommands, in ``pyxl sim --help`` order: name, handler, help line, whether
#: it takes DOMAIN, whether it has --json, and its own further arguments.
SUBCOMMANDS: "List[Subcommand]" = [
    ("create", cmd_create, "create a simulated HVM guest; prints its domid",
     False, True, _create_arguments),
    ("create-empty", cmd_create_empty,
     "create an empty paused domain to restore into; prints its domid",
     False, True, _create_empty_arguments),
    ("list", cmd_list, "list simulated domains", False, True, _no_arguments),
    ("info", cmd_info, "show one domain", True, True, _no_arguments),
    ("pause", _action("pause"), "stop the guest's vCPU", True, False, _no_arguments),
    ("unpause", _action("unpause"), "run the guest (starts a vCPU on restored memory)",
     True, False, _no_arguments),
    ("suspend", cmd_suspend, "suspend the guest and wait until it has stopped",
     True, False, _suspend_arguments),
    ("resume", _action("resume"),
     "bring a suspended guest back to running (after a failed save)", True, False, _no_arguments),
    ("destroy", _action("destroy"), "kill the guest and remove the domain",
     True, False, _no_arguments),
    ("rename", _action("rename", "name"), "give the domain a new name",
     True, False, _rename_arguments),
    ("digest", cmd_digest, "print the sha256 of the domain's memory, HVM context and params",
     True, False, _no_arguments),
    ("check", cmd_check, "verify the guest's page pattern (exit 1 if inconsistent)",
     True, True, _no_arguments),
    ("set-rate", _action("set_dirty_rate", "rate"), "change how fast the guest writes memory",
     True, False, _set_rate_arguments),
    ("env", cmd_env, "print the environment that runs a helper on fakexen",
     False, False, _no_arguments),
]


def add_parser(subparsers: Any, argv: "Optional[Sequence[str]]" = None) -> argparse.ArgumentParser:
    """Register ``sim`` and its subcommands on an argparse subparsers object: all of
    them in full, or, given ``argv`` (the words after ``sim``) naming one, that one
    in full and the others by name and help line (a faster start; ``pyxl sim --help``
    still lists them all).

    Each subcommand parser sets ``func``: call ``args.func(args)`` for the exit code.
    """
    p: argparse.ArgumentParser = subparsers.add_parser(
        "sim", help="create and control simulated Xen domains (fakexen)",
        description="Create and control simulated Xen domains (fakexen).")
    common = Parser(add_help=False)   # pyxl's formatter: no shutil import
    common.add_argument("--sim-dir", metavar="DIR", type=dir_arg,
                        help="fakexen state directory (default: $PYXL_SIM_DIR, "
                             "else /dev/shm/pyxl-sim-$UID)")
    sub = p.add_subparsers(dest="sim_command", metavar="COMMAND")
    sub.required = True
    # `sim` itself takes no option but -h: the first word that is not one is the subcommand.
    wanted = None if argv is None else next((a for a in argv if not a.startswith("-")), None)
    if wanted not in {name for name, *_ in SUBCOMMANDS}:
        wanted = None   # --help, or a mistake that argparse's full parser will name
    for name, fn, helptext, domid, json_flag, more in SUBCOMMANDS:
        if wanted is not None and name != wanted:
            sub.add_parser(name, help=helptext, add_help=False)
            continue
        sp: argparse.ArgumentParser = sub.add_parser(name, parents=[common], help=helptext,
                                                     description=helptext)
        if domid:
            sp.add_argument("domid", type=_domid, metavar="DOMAIN", help="domain id or name")
        if json_flag:
            sp.add_argument("--json", action="store_true", help="machine-readable output")
        more(sp)
        sp.set_defaults(func=fn, usage_error=sp.error)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Standalone entry: ``python -m pyxl.cli.sim create --memory 256M``."""
    parser = argparse.ArgumentParser(prog="pyxl")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["sim"] + (sys.argv[1:] if argv is None else argv))
    rc: int = args.func(args)
    return rc


if __name__ == "__main__":
    sys.exit(main())
