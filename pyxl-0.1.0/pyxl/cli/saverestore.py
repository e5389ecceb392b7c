"""``pyxl save`` and ``pyxl restore``: xl's save/restore on pyxl's operations."""

from __future__ import annotations

import argparse

from pyxl.cli.args import common_options, domain_arg, resolve_domain
from pyxl.cli.runner import EXIT_OK, ProgressBar, result, run, summarize

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Optional, Sequence

    from pyxl.ops.save import Leave


def cmd_save(args: argparse.Namespace) -> int:
    from pyxl.backends import default_backend
    from pyxl.ops.api import save
    import os
    import sys
    leave: Leave = "running" if args.c else "paused" if args.p else "destroy"
    target: "str | int" = args.file
    if args.file == "-":          # stdout, as inspect reads stdin: `pyxl save web1 - | ssh ...`
        if args.json:
            args.usage_error("--json prints on stdout, which FILE - gives the image")
        if os.isatty(1):
            args.usage_error("FILE -: stdout is a terminal, not a place for a save image")
        sys.stdout.flush()
        target = 1
    backend = default_backend(args.sim_dir)
    domid = resolve_domain(backend, args.domid)
    bar = ProgressBar(f"saving domain {args.domid}")
    op = save(domid, target, live=args.live, leave=leave, helper=args.helper,
              timeout=args.timeout, on_progress=bar, backend=backend, debug=args.debug,
              compress=args.compress)
    bar.op = op
    try:
        res = run(op)
    finally:
        bar.close()
    summarize(args, "saved", op.config, res.domid, f"to {args.file}", res.duration,
              {"domid": res.domid, "file": res.path, "bytes": res.bytes_written,
               "compressed": res.compressed,
               "iterations": res.iterations,
               "downtime_ms": None if res.downtime is None else round(res.downtime * 1000, 3)})
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from pyxl.ops.api import restore
    bar = ProgressBar("restoring")
    op = restore(0 if args.file == "-" else args.file, paused=args.p, helper=args.helper, timeout=args.timeout,
                 on_progress=bar, sim_dir=args.sim_dir)
    bar.op = op
    try:
        res = run(op)
    finally:
        bar.close()
    if not args.json:
        # the result, for scripts: DOMID=$(pyxl restore ...)
        result(str(res.domid), f"restored domain {res.domid}")
    summarize(args, "restored", res.config, res.domid,
              f"from {args.file} as domain {res.domid}", res.duration,
              {"domid": res.domid, "file": args.file, "store_gfn": res.store_gfn,
               "console_gfn": res.console_gfn})
    return EXIT_OK


def add_parser(sub: Any, argv: "Optional[Sequence[str]]" = None) -> None:
    p = sub.add_parser("save", help="save a domain to a file (xl save)")
    after = p.add_mutually_exclusive_group()
    after.add_argument("-c", action="store_true", help="leave the domain running after the save (one that was paused stays paused)")
    after.add_argument("-p", action="store_true", help="leave the domain paused after the save")
    p.add_argument("--live", action="store_true", help="pre-copy while the guest runs")
    p.add_argument("--debug", action="store_true", help="resend all pages for verification")
    p.add_argument("--compress", action="store_true",
                   help="write a zstd-compressed image with a checksum (pyxl restores it; "
                        "xl needs `zstd -d` first)")
    p.add_argument("domid", type=domain_arg, metavar="DOMAIN", help="domain id or name")
    p.add_argument("file", metavar="FILE", help="the image (- for stdout)")
    common_options(p)
    p.set_defaults(func=cmd_save, usage_error=p.error)

    p = sub.add_parser("restore", help="restore a domain from a save file (xl restore)")
    p.add_argument("-p", action="store_true", help="leave the restored domain paused")
    p.add_argument("file", metavar="FILE", help="the image (- for stdin)")
    common_options(p)
    p.set_defaults(func=cmd_restore)
