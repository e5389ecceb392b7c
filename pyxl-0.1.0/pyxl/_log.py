"""The library's loggers, all under ``pyxl``, whose root has a NullHandler.

A library does not print: operations raise their errors and log through
``pyxl.*`` loggers.  An application that configured no logging would otherwise
get a copy of every warning and error on stderr from logging's last-resort
handler, as well as the exception.  Every pyxl module takes its logger from
:func:`get_logger`, which installs the NullHandler first; ``import pyxl`` does
not import :mod:`logging` at all (the CLI starts faster without it).
May import: the standard library only.
"""

from __future__ import annotations

import logging
from typing import Any

ROOT = "pyxl"

#: A record that logs an operation's outcome carries this attribute (true):
#: the CLI prints that outcome itself (``pyxl: error: ...``), so at ``-v`` it
#: leaves these records out rather than show one failure twice.
OUTCOME = "pyxl_outcome"


def install_null_handler() -> None:
    """Give the ``pyxl`` logger one NullHandler (idempotent)."""
    root = logging.getLogger(ROOT)
    if not any(isinstance(h, logging.NullHandler) for h in root.handlers):
        root.addHandler(logging.NullHandler())


def get_logger(name: str) -> logging.Logger:
    """``logging.getLogger(name)`` for a ``pyxl.*`` name, the NullHandler installed."""
    if name != ROOT and not name.startswith(ROOT + "."):
        raise ValueError(f"not a pyxl logger name: {name!r}")
    install_null_handler()
    return logging.getLogger(name)


def log_failure(logger: logging.Logger, exc: Any) -> None:
    """Log an operation's failure (an OperationError) at ERROR, once: an owner
    that fails with the error one of its operations already logged (a receive
    with its restore's) does not repeat it."""
    if getattr(exc, "logged", False):
        return
    logger.error("%s", exc, extra={OUTCOME: True})
    try:
        exc.logged = True
    except AttributeError:
        pass
