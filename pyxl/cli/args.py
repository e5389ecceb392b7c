"""argparse types and options shared by the subcommands (one parser each)."""

from __future__ import annotations

import argparse


def domid_arg(text: str) -> int:
    """argparse type for a domain id (shared by every subcommand)."""
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a domain id: {text!r}") from None
    if not 0 <= value < 0x7FF0:
        raise argparse.ArgumentTypeError(f"domain id out of range: {value}")
    return value


def common_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--helper", metavar="PATH",
                   help="helper to run (default: $PYXL_SAVE_HELPER, else pyxl's own); "
                        "e.g. /usr/lib/xen-4.17/bin/libxl-save-helper")
    p.add_argument("--sim-dir", metavar="DIR", help="fakexen state directory (default: "
                   "$PYXL_SIM_DIR, else /dev/shm/pyxl-sim-$UID)")
    p.add_argument("--timeout", type=float, metavar="SECONDS", help="give up after this long")
    p.add_argument("--json", action="store_true", help="machine-readable output")
