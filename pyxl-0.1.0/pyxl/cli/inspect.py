"""``pyxl inspect FILE [--json]``: show and check a saved-domain stream.

Detects the outermost layer (xl save file, libxl stream or bare libxc
stream), lists the headers, every record (runs of PAGE_DATA are folded into
one line unless ``--all-records``) and page counts, and checks everything
Xen 4.17's restore path would check (see ``pyxl.stream.libxc_scan``,
``pyxl.stream.libxl`` and ``pyxl.stream.xl`` for the rules).

``--verify`` also refuses what Xen tolerates but neither xl nor pyxl ever
writes (non-zero reserved bits and padding, bytes after END ...): in an image
on disk each is a sign of corruption, reported with its offset.  A
zstd-compressed pyxl image is decompressed (its frame and content checksum
checked) and the stream inside is inspected.

Exit codes: 0 the stream passes; 1 Xen would refuse it (the reason is one
line on stderr, ``pyxl: error: refused: <where> at <offset>: <rule>``);
2 usage or I/O errors (missing or unreadable file, a directory).  FILE may
be ``-`` for standard input; nothing bulky is read into memory.
"""

from __future__ import annotations

import argparse
import sys

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Dict, List, Optional, Sequence, TextIO

    from pyxl.stream.report import RecordInfo, StreamReport

__all__ = ["add_parser", "run", "main", "format_report"]

EXIT_OK, EXIT_REFUSED, EXIT_USAGE = 0, 1, 2
PROG = "pyxl inspect"
DESCRIPTION = ("Show and check a saved-domain stream: an xl save file, a libxl stream or a "
               "bare libxc stream, plain or zstd-compressed.")


def add_parser(subparsers: Any, argv: "Optional[Sequence[str]]" = None) -> argparse.ArgumentParser:
    """Register ``inspect`` on an ``add_subparsers()`` object; the handler
    is ``args.func(args) -> int``."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "inspect", help="show and check a save file or migration stream",
        description=DESCRIPTION)
    _arguments(p)
    p.set_defaults(func=run)
    return p


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="stream to inspect ('-' for stdin)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--layer", choices=("auto", "xl", "libxl", "libxc"), default="auto",
                   help="outermost layer (default: detect from the magic)")
    p.add_argument("--checkpointed", action="store_true",
                   help="the stream is a Remus/COLO checkpointed stream")
    p.add_argument("--all-records", action="store_true",
                   help="list every PAGE_DATA record instead of folding runs")
    p.add_argument("--verify", action="store_true",
                   help="also refuse what Xen tolerates but xl and pyxl never write (reserved "
                        "bits, padding, bytes after END): signs of corruption, by offset")


def run(args: argparse.Namespace) -> int:
    """Handler for ``pyxl inspect``; returns the exit code."""
    from pyxl.streamio import scan_path, scan_stream
    layer = None if args.layer == "auto" else args.layer
    compressed: Optional[Dict[str, Any]] = None
    try:
        if args.file == "-":
            report = scan_stream(sys.stdin.buffer, layer=layer, checkpointed=args.checkpointed,
                                 strict=args.verify)
        else:
            compressed = _compressed(args.file)
            if compressed is not None:
                report = _scan_compressed(args.file, compressed, layer, args.checkpointed,
                                          args.verify)
            else:
                report = scan_path(args.file, layer=layer, checkpointed=args.checkpointed,
                                   strict=args.verify)
    except OSError as exc:
        from pyxl.errors import os_error_text
        print(f"pyxl: error: {os_error_text(exc)}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if compressed is not None and not args.json:
            print(f"{args.file}: zstd-compressed pyxl image, {compressed['bytes']} bytes, "
                  f"checksum {compressed['checksum']}; xl restores it only after "
                  f"`zstd -d {args.file}`; the stream inside:")
        _emit(report, args, compressed)
    except BrokenPipeError:
        return EXIT_USAGE
    except Exception as exc:  # a bug in pyxl: still one line, no traceback
        print(f"pyxl: error: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_REFUSED
    if report.error is not None:
        print(f"pyxl: error: refused: {report.error}", file=sys.stderr)
        return EXIT_REFUSED
    return EXIT_OK


def _compressed(path: str) -> Optional[Dict[str, Any]]:
    """A zstd image's facts (magic, size), or None for any other file."""
    import os
    from pyxl.zstdstage import is_zstd
    with open(path, "rb") as f:
        if not is_zstd(f.read(4)):
            return None
        return {"format": "zstd", "bytes": os.fstat(f.fileno()).st_size, "checksum": "?"}


def _scan_compressed(path: str, facts: Dict[str, Any], layer: Optional[str],
                     checkpointed: bool, strict: bool) -> StreamReport:
    """Scan what the image decompresses to, through pyxl's own zstd child
    (which checks the frame and its checksum, as a restore does)."""
    import subprocess
    from pyxl.streamio import scan_stream
    from pyxl.zstdstage import stage_argv
    with open(path, "rb") as f:
        proc = subprocess.Popen(stage_argv("decompress-file"), stdin=f, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    report = scan_stream(proc.stdout, layer=layer,  # type: ignore[arg-type]
                         checkpointed=checkpointed, strict=strict)
    proc.stdout.close()          # what the scan left unread: the child ends on EPIPE
    err = proc.stderr.read().decode("utf-8", "replace").strip()
    status = proc.wait()
    if status == 0:
        facts["checksum"] = "OK"
    elif status in (1, 3) or report.error is None:
        facts["checksum"] = "not verified"
        why = err.splitlines()[-1] if err else f"zstd exited with status {status}"
        if report.error is None or status in (1, 3):
            from pyxl.errors import StreamError
            report.error = StreamError(0, why, "zstd frame")
    return report


def _emit(report: StreamReport, args: argparse.Namespace,
          compressed: Optional[Dict[str, Any]] = None) -> None:
    import json
    if args.json:
        out = report.to_json()
        out["file"] = args.file
        if compressed is not None:
            out["compressed"] = compressed
        json.dump(out, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        format_report(report, args.file, sys.stdout, all_records=args.all_records)
    sys.stdout.flush()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Stand-alone entry point (``python -m pyxl.cli.inspect FILE``)."""
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION)
    _arguments(parser)
    try:
        args = parser.parse_args(list(argv) if argv is not None else None)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(args)


# ---------------------------------------------------------------------------
# Human-readable output


def _fold(records: List[RecordInfo], all_records: bool) -> List[RecordInfo]:
    """Fold runs of consecutive PAGE_DATA records into one line."""
    if all_records:
        return records
    out: List[RecordInfo] = []
    run: List[RecordInfo] = []

    def flush() -> None:
        if len(run) == 1:
            out.append(run[0])
        elif run:
            first = run[0]
            pfns = sum(r.pfns for r in run)
            data = sum(r.with_data for r in run)
            from pyxl.stream.report import RecordInfo
            out.append(RecordInfo(first.layer, first.rtype, f"PAGE_DATA x{len(run)}",
                                  first.offset, sum(r.length for r in run),
                                  f"{pfns} pfns, {data} with data (folded)", pfns, data))
        run.clear()

    for rec in records:
        if rec.layer == "libxc" and rec.name == "PAGE_DATA":
            run.append(rec)
            continue
        flush()
        out.append(rec)
    flush()
    return out


def _config_summary(report: StreamReport) -> str:
    cfg = report.config
    if not isinstance(cfg, dict):
        return ""
    c_info: Dict[str, Any] = cfg["c_info"] if isinstance(cfg.get("c_info"), dict) else {}
    b_info: Dict[str, Any] = cfg["b_info"] if isinstance(cfg.get("b_info"), dict) else {}
    parts = []
    if c_info.get("name"):
        parts.append(f"name {c_info['name']}")
    if c_info.get("type"):
        parts.append(f"type {c_info['type']}")
    if b_info.get("max_vcpus"):
        parts.append(f"{b_info['max_vcpus']} vcpus")
    if b_info.get("max_memkb"):
        parts.append(f"{b_info['max_memkb']} KiB")
    return ", ".join(str(p) for p in parts)


def _hex(n: int, width: int) -> str:
    return f"{n:#x}".ljust(width)


def format_report(report: StreamReport, name: str, out: TextIO, *,
                  all_records: bool = False) -> None:
    w = out.write
    size = f", {report.size} bytes" if report.size is not None else ""
    w(f"{name}: {report.layer} stream{size}"
      f"{' (checkpointed)' if report.checkpointed else ''}\n")
    xl = report.xl_header
    if xl is not None:
        flags = [n for bit, n in ((1, "JSON"), (2, "STREAMv2")) if xl.mandatory_flags & bit]
        w(f"  xl header     0x0       flags {xl.mandatory_flags:#x} ({', '.join(flags) or '-'}),"
          f" optional data {xl.optional_data_len} bytes, config {xl.config_len} bytes\n")
        summary = _config_summary(report)
        if summary:
            w(f"  config                  {summary}\n")
    if report.libxl_header is not None:
        lh = report.libxl_header
        legacy = " (from legacy converter)" if lh.legacy else ""
        w(f"  libxl header  {_hex(report.libxl_offset or 0, 9)} version {lh.version}, "
          f"options {lh.options:#x}{legacy}\n")
    if report.libxc_header is not None:
        ih = report.libxc_header
        dom = ""
        dh = report.domain_header
        if dh is not None:
            src = ("legacy converter v%d" % dh.xen_minor if dh.legacy_converted
                   else f"Xen {dh.xen_major}.{dh.xen_minor}")
            dom = f", {dh.type_name} from {src}"
        w(f"  libxc header  {_hex(report.libxc_offset or 0, 9)} version {ih.version}{dom}\n")
    records = _fold(report.records, all_records)
    if records:
        w("  records:\n")
        w(f"    {'OFFSET':<10} {'LAYER':<6} {'TYPE':<11} {'NAME':<26} {'LENGTH':>9}  DETAIL\n")
        for rec in records:
            w(f"    {_hex(rec.offset, 10)} {rec.layer:<6} {_hex(rec.rtype, 11)} {rec.name:<26} "
              f"{rec.length:>9}  {rec.detail}\n".rstrip() + "\n")
        if report.records_omitted:
            w(f"    ... {report.records_omitted} more records not listed\n")
    pg = report.pages
    if pg.records:
        w(f"  pages: {pg.pfns} pfns in {pg.records} PAGE_DATA records: {pg.with_data} with data,"
          f" {pg.without_data} without ({pg.holes} holes/XTAB)\n")
        w("    by type: " + ", ".join(f"{k} {v}" for k, v in sorted(pg.by_type.items())) + "\n")
    if report.checkpoints:
        w(f"  checkpoints: {report.checkpoints}\n")
    for text in report.warnings:
        w(f"  warning: {text}\n")
    if report.error is None:
        w("  result: OK (Xen 4.17 would accept this stream)\n")
    else:
        w(f"  result: REFUSED: {report.error}\n")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
