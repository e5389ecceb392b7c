"""``pyxl completion bash``: print a bash completion script generated from the parser.

May import: pyxl.cli.docgen.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence


def add_parser(subparsers: Any, argv: "Optional[Sequence[str]]" = None) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "completion", help="print a shell completion script (bash)",
        description="Print a bash completion script for pyxl, generated from its parser: "
                    "pyxl completion bash > /etc/bash_completion.d/pyxl")
    p.add_argument("shell", choices=["bash"], help="the shell (bash)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from pyxl.cli.docgen import bash_completion
    sys.stdout.write(bash_completion())
    return 0
