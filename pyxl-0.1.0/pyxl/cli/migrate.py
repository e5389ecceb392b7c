"""``pyxl migrate`` and ``pyxl migrate-receive``: host-to-host migration (xl migrate).

    pyxl migrate [--live] [--downtime MS [--max-iterations N] [--on-fail abort|stop]
                 [--auto-converge]]
                 [--remus [--checkpoints N] [--interval S]]
                 [--max-bandwidth BYTES/S] [--command CMD]
                 [--tls-cert FILE --tls-key FILE --tls-ca FILE [--tls-name NAME]]
                 [--handshake-timeout S] [--idle-timeout S] [--helper PATH]
                 [--sim-dir DIR] [--timeout S] [--json] DOMID [HOST:PORT]
    pyxl migrate-receive [--listen ADDR:PORT [--insecure]
                 [--tls-cert FILE --tls-key FILE --tls-ca FILE [--tls-allow NAME]...]]
                 [--header-timeout S] [--idle-timeout S] [--paused] [--remus]
                 [--helper PATH] [--sim-dir DIR] [--timeout S] [--json]

The sender connects to HOST:PORT, or runs CMD through the shell and talks to
its stdin/stdout (``--command "ssh host pyxl migrate-receive"``).  The
receiver takes one migration on ``--listen`` (port 0: any; it says
"listening on ADDR:PORT" on stderr) or, without ``--listen``, uses its
stdin/stdout -- then ``--json`` goes to stderr, stdout being the channel.
With ``--tls-*`` both ends speak mutual TLS; a receiver listening for plain
TCP on an address that is not loopback is refused (exit 2) unless
``--insecure``.  A listening receiver drops connections that fail TLS, are
not on ``--tls-allow``, send garbage or say nothing within
``--header-timeout`` (default 60 s), and listens on for the real sender.

JSON: sender ``{"domid", "digest", "downtime_ms", "iterations", "bytes_sent",
"seconds"}`` (+ ``"checkpoints"`` with --remus, ``"throttle"``, the lowest CPU
cap in percent, 0 for none, with --auto-converge, ``"compressed"`` with
--compress: whether the receiver took it); receiver ``{"domid", "digest",
"seconds"}`` (+ ``"checkpoints", "failover"`` with --remus, ``"compressed":
true`` for a zstd stream).  Exit codes as
``pyxl``'s: 0 migrated, 1 failed (the source runs on; "in doubt": paused),
2 bad arguments or unusable input, 130 interrupted (SIGINT), 143 terminated
(SIGTERM, SIGHUP): the migration is cancelled first.
"""

from __future__ import annotations

import argparse
import sys

from pyxl._units import parse_size
from pyxl.cli.args import bounded, common_options as _common, domain_arg, resolve_domain, seconds_arg
from pyxl.cli.runner import ProgressBar, run, size_text, summarize
from pyxl.errors import PyxlError

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Optional, Sequence, Tuple, TypeVar
    N = TypeVar("N", int, float)

    from pyxl.migrate import TlsOptions

EXIT_OK = 0


def _size(text: str) -> int:
    try:
        value = parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be positive")
    return value


def _address(listen: bool) -> Any:
    def parse(text: str) -> Any:
        from pyxl.migrate.address import parse_address
        try:
            return parse_address(text, listen=listen)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return parse


_positive_ms = bounded(float, "a number of milliseconds", lambda v: 0.001 <= v <= 3600000,
                        "from 0.001 to 3600000 ms")
_positive_s = bounded(float, "a number of seconds", lambda v: 0 < v <= 3600,
                       "from 0 (excluded) to 3600 seconds")
_deadline_s = seconds_arg
_iterations = bounded(lambda t: int(t, 10), "a whole number", lambda v: 1 <= v <= 1000000,
                       "from 1 to 1000000")


def _tls(args: argparse.Namespace, allow: Tuple[str, ...] = (),
         name: Optional[str] = None) -> Optional[TlsOptions]:
    """TlsOptions from --tls-cert/--tls-key/--tls-ca (all three or none)."""
    from pyxl.migrate import TlsOptions
    files = (args.tls_cert, args.tls_key, args.tls_ca)
    if all(f is None for f in files):
        if allow or name is not None or args.tls_crl is not None:
            args.usage_error("--tls-allow, --tls-name and --tls-crl go with --tls-cert, "
                                    "--tls-key and --tls-ca")
        return None
    if any(f is None for f in files):
        args.usage_error("mutual TLS needs all of --tls-cert, --tls-key and --tls-ca")
    return TlsOptions(args.tls_cert, args.tls_key, args.tls_ca, allow=allow, server_name=name,
                      crl=args.tls_crl)


def cmd_migrate(args: argparse.Namespace) -> int:
    from pyxl.migrate import migrate
    if (args.target is None) == (args.command is None):
        args.usage_error("give HOST:PORT or --command CMD (one of them)")
    if args.command is not None and not args.command.strip():
        args.usage_error("argument --command: empty (a command that runs a receiver: "
                         "ssh HOST pyxl migrate-receive)")
    tls = _tls(args, name=args.tls_name)
    if tls is not None and args.command is not None:
        args.usage_error("--tls-* is for HOST:PORT; --command is its own channel "
                                "(ssh)")
    if args.insecure and (tls is not None or args.command is not None):
        args.usage_error("--insecure is for plain TCP to HOST:PORT; --tls-* authenticates the "
                         "receiver, and --command is its own channel (ssh)")
    if args.downtime is None and (args.max_iterations is not None or args.on_fail is not None):
        args.usage_error("--max-iterations and --on-fail go with --downtime")
    if args.downtime is not None and not args.live:
        args.usage_error("--downtime needs --live")
    if args.auto_converge and args.downtime is None:
        args.usage_error("--auto-converge goes with --downtime")
    if args.remus and not args.live:
        args.usage_error("--remus needs --live")
    if args.remus and args.compress:
        args.usage_error("--compress is for a plain migration, not --remus")
    if not args.remus and (args.checkpoints is not None or args.interval is not None):
        args.usage_error("--checkpoints and --interval go with --remus")
    from pyxl.backends import default_backend
    backend = default_backend(args.sim_dir)
    domid = resolve_domain(backend, args.domid)
    backend.check_domain(domid)               # "no such domain: 7", exit 2
    config = backend.domain_config(domid)     # for the summary: the source is gone after
    bar = ProgressBar(f"migrating domain {args.domid}")
    try:
        op = migrate(domid, args.target, backend=backend, command=args.command, live=args.live,
                     downtime_ms=args.downtime, max_iterations=args.max_iterations,
                     on_fail=args.on_fail or "abort", max_bandwidth=args.max_bandwidth,
                     helper=args.helper, timeout=args.timeout,
                     digest=args.json, on_progress=bar, remus=args.remus,
                     checkpoints=args.checkpoints,
                     checkpoint_interval=0.1 if args.interval is None else args.interval,
                     tls=tls, handshake_timeout=args.handshake_timeout,
                     idle_timeout=args.idle_timeout, auto_converge=args.auto_converge,
                     compress=args.compress, insecure=args.insecure)
        bar.op = op    # the bar shows the bytes sent, the rate and the time left (op.stats())
        try:
            res = run(op)
        finally:
            bar.close()
    except PyxlError as exc:
        from pyxl.migrate.connection import PLAIN_TCP_ADVICE
        _in_flags(exc, PLAIN_TCP_ADVICE, SENDER_CLI_ADVICE)  # the refusal may come through the op
        raise
    numbers = {"domid": res.domid, "digest": res.digest,
               "downtime_ms": None if res.downtime is None else round(res.downtime * 1000, 3),
               "iterations": res.iterations, "bytes_sent": res.bytes_sent}
    if args.remus:
        numbers["checkpoints"] = res.checkpoints
    if args.auto_converge:
        numbers["throttle"] = res.throttle
    if args.compress:
        numbers["compressed"] = res.compressed
    from pyxl.migrate.address import format_address
    to = args.command if args.command is not None else format_address(*args.target)
    downtime = "" if res.downtime is None else f", downtime {res.downtime * 1000:.0f} ms"
    summarize(args, "migrated", config, res.domid, f"to {to}", res.duration, numbers,
              extra=f" ({size_text(res.bytes_sent)} sent{_how(args, res)}{downtime})")
    return EXIT_OK


def _how(args: argparse.Namespace, res: Any) -> str:
    if res.compressed:
        return ", zstd"
    return ", plain: the receiver did not take --compress" if args.compress else ""


RECEIVER_CLI_ADVICE = ("use mutual TLS (--tls-cert/--tls-key/--tls-ca), ssh (pyxl migrate "
                     "--command \"ssh HOST pyxl migrate-receive\"), a loopback address, or "
                     "--insecure on a trusted network")


SENDER_CLI_ADVICE = ("use mutual TLS (--tls-cert/--tls-key/--tls-ca), ssh (--command \"ssh "
                     "HOST pyxl migrate-receive\"), or --insecure on a trusted network")


def _in_flags(exc: PyxlError, library_advice: str, cli_advice: str) -> None:
    """A refusal of plain TCP, its advice (given in the library's arguments)
    rewritten in place in this command's flags; any other error is left as it is."""
    brief = getattr(exc, "brief", None)
    if isinstance(brief, str) and brief.endswith(library_advice):
        setattr(exc, "brief", brief[:-len(library_advice)] + cli_advice)
        exc.args = (getattr(exc, "brief"),) + exc.args[1:]


def cmd_receive(args: argparse.Namespace) -> int:
    from pyxl.migrate import receive
    tls = _tls(args, allow=tuple(args.tls_allow or ()))
    deadlines = dict(header_timeout=args.header_timeout, idle_timeout=args.idle_timeout)
    if args.insecure and tls is not None:   # one would silently not apply
        args.usage_error("--insecure is for plain TCP; with --tls-* the peer is authenticated")
    if args.listen is not None:
        from pyxl.errors import StartupError
        from pyxl.migrate.address import format_address
        from pyxl.migrate.receiver import PLAIN_TCP_ADVICE
        try:
            op = receive(args.listen, paused=args.paused, helper=args.helper,
                         timeout=args.timeout, sim_dir=args.sim_dir, digest=args.json,
                         remus=args.remus, tls=tls, insecure=args.insecure,
                         compress=not args.no_compress, **deadlines)
        except StartupError as exc:
            _in_flags(exc, PLAIN_TCP_ADVICE, RECEIVER_CLI_ADVICE)
            raise
        where = op.address or args.listen
        print(f"listening on {format_address(*where)}", file=sys.stderr, flush=True)
        out = sys.stdout
    else:
        if tls is not None or args.insecure:
            args.usage_error("--tls-* and --insecure go with --listen (without it, "
                                    "stdin/stdout is the channel: ssh)")
        op = receive(fds=(0, 1), paused=args.paused, helper=args.helper, timeout=args.timeout,
                     sim_dir=args.sim_dir, digest=args.json, remus=args.remus,
                     compress=not args.no_compress, **deadlines)
        out = sys.stderr   # stdout is the channel back to the sender
    res = run(op)
    got = {"domid": res.domid, "digest": res.digest}
    if args.remus:
        got.update(checkpoints=res.checkpoints, failover=res.failover)
    if op.compressed:
        got["compressed"] = True
    from pyxl.migrate.domain import INCOMING
    # the config restored is NAME--incoming; the domain has its own name back by now
    config = dict(res.restore.config)
    c_info = config.get("c_info")
    if isinstance(c_info, dict) and isinstance(c_info.get("name"), str):
        config["c_info"] = dict(c_info, name=c_info["name"].removesuffix(INCOMING))
    summarize(args, "received", config, res.domid, f"as domain {res.domid}",
              res.duration, got, out=out)
    return EXIT_OK


def _tls_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tls-cert", metavar="FILE",
                   help="mutual TLS: this end's certificate (PEM; with --tls-key, --tls-ca)")
    p.add_argument("--tls-key", metavar="FILE", help="mutual TLS: this end's private key (PEM)")
    p.add_argument("--tls-ca", metavar="FILE",
                   help="mutual TLS: the CA the peer's certificate must chain to (PEM)")
    p.add_argument("--tls-crl", metavar="FILE",
                   help="mutual TLS: refuse a peer whose certificate this CRL revokes (PEM, "
                        "from the peer certificate's issuer)")


def add_parser(subparsers: Any, argv: "Optional[Sequence[str]]" = None) -> None:
    """Register ``migrate`` and ``migrate-receive``; each sets ``func``."""
    p = subparsers.add_parser("migrate", help="migrate a domain to another host (xl migrate)",
                              description="Migrate a domain to a pyxl migrate-receive "
                              "(over TCP, or through --command).")
    p.add_argument("--live", action="store_true", help="pre-copy while the guest runs")
    p.add_argument("--downtime", type=_positive_ms, metavar="MS",
                   help="target downtime: pyxl's helper's downtime policy instead of Xen's "
                        "(stop below 50 dirty pages or after 5 rounds)")
    p.add_argument("--max-iterations", type=_iterations, metavar="N",
                   help="with --downtime: rounds before giving up (default 30)")
    p.add_argument("--on-fail", choices=("abort", "stop"),
                   help="with --downtime, if the target is not met in time: abort the "
                        "migration (default; the guest keeps running) or stop and copy anyway")
    p.add_argument("--auto-converge", action="store_true",
                   help="with --downtime: cap the guest's CPU step by step while it dirties "
                        "memory too fast to meet the target (needs pyxl's helper; the cap is "
                        "lifted afterwards, whatever happens)")
    p.add_argument("--max-bandwidth", type=_size, metavar="BYTES/S",
                   help="cap the stream's bandwidth, e.g. 100M")
    p.add_argument("--remus", action="store_true",
                   help="checkpointed stream (Remus, stream type 1): with --checkpoints N, "
                        "migrate after N checkpoints; without, replicate until stopped (the "
                        "receiver takes over if the stream ends)")
    p.add_argument("--checkpoints", type=_iterations, metavar="N",
                   help="with --remus: checkpoints before the switch-over")
    p.add_argument("--interval", type=_positive_s, metavar="SECONDS",
                   help="with --remus: time between checkpoints (default 0.1)")
    p.add_argument("--compress", action="store_true",
                   help="offer the receiver a zstd-compressed stream: a pyxl receiver takes "
                        "it, an xl one (which never answers) gets it plain after 2 s")
    p.add_argument("--command", metavar="CMD",
                   help="run CMD (through the shell) and send over its stdin/stdout, "
                        "e.g. \"ssh host pyxl migrate-receive\"")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP to an address that is not loopback, and to another "
                        "local user's receiver on loopback: whoever answers gets the guest "
                        "(without it: refused)")
    _tls_options(p)
    p.add_argument("--tls-name", metavar="NAME",
                   help="with TLS: the name the receiver's certificate must carry "
                        "(default: HOST)")
    p.add_argument("--handshake-timeout", type=_deadline_s, metavar="SECONDS", default=60.0,
                   help="give up on a receiver that says nothing for this long: its banner "
                        "(connect and TLS included), its \"ready\", its status (default 60)")
    p.add_argument("--idle-timeout", type=_deadline_s, metavar="SECONDS", default=60.0,
                   help="fail if the stream does not move for this long (default 60)")
    p.add_argument("domid", type=domain_arg, metavar="DOMAIN", help="domain id or name")
    p.add_argument("target", nargs="?", type=_address(False), metavar="HOST:PORT")
    _common(p)
    p.set_defaults(func=cmd_migrate, usage_error=p.error)

    p = subparsers.add_parser("migrate-receive",
                              help="receive a migrating domain (xl migrate-receive)",
                              description="Receive one migrating domain, on --listen or on "
                              "stdin/stdout.")
    p.add_argument("--listen", type=_address(True), metavar="ADDR:PORT",
                   help="listen here for one migration (port 0: any; plain TCP only on "
                        "loopback unless --insecure); default: stdin/stdout")
    p.add_argument("--insecure", action="store_true",
                   help="allow plain TCP on an address that is not loopback, and any local "
                        "user's connections on loopback: anyone who can connect can send a "
                        "domain (without it: refused, resp. only this user's)")
    _tls_options(p)
    p.add_argument("--tls-allow", action="append", metavar="NAME",
                   help="with TLS: accept only a peer whose certificate names NAME (a DNS "
                        "subjectAltName; the subject CN if it has none; any case); repeatable")
    p.add_argument("--header-timeout", type=_deadline_s, metavar="SECONDS", default=60.0,
                   help="drop a connection that has not sent its stream's head (TLS "
                        "included) within this long (default 60)")
    p.add_argument("--idle-timeout", type=_deadline_s, metavar="SECONDS", default=60.0,
                   help="fail if the stream moves less than 64 KiB in this long (a trickle "
                        "counts as stopped), or the sender does not clear the unpause "
                        "(default 60)")
    p.add_argument("--paused", action="store_true", help="leave the received domain paused")
    p.add_argument("--no-compress", action="store_true",
                   help="answer a pyxl sender's compression offer with 'none' (its stream "
                        "comes plain)")
    p.add_argument("--remus", action="store_true",
                   help="expect a checkpointed stream (pyxl migrate --remus); take over at the "
                        "last checkpoint if it ends without its end")
    _common(p)
    p.set_defaults(func=cmd_receive, usage_error=p.error)
