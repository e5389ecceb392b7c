"""What a migration receiver tells its sender, and how it words a failure
the sender caused.

:func:`peer_reason` is the one place a reason sent to a peer is made: what
failed, by kind -- never a local path, a size or free memory that a full
message may hold (every reason passes :func:`_told`).  :func:`blame_sender`
words a restore that failed because the sender hung up mid-stream.  It may
import pyxl.errors and pyxl._units.
"""

from __future__ import annotations

import logging
import re
from typing import Optional, Sequence

from pyxl._units import format_size
from pyxl.errors import (Cancelled, CorruptImage, HelperDied, HelperExited, HelperFailed,
                         MigrationAuthError, MigrationError, MigrationProtocolError,
                         OperationError, StartupError, Timeout)

__all__ = ["blame_sender", "peer_reason"]


def peer_reason(exc: BaseException) -> str:
    """What the sender is told when a receive fails: what failed, by kind --
    never the local paths, sizes or free memory a full message may hold.
    Every reason a receiver sends comes from here, and passes :func:`_told`."""
    text = getattr(exc, "peer_text", None)
    if isinstance(text, str) and _told(text):
        return text
    if isinstance(exc, MigrationProtocolError):
        reason = exc.brief        # about the peer's own bytes
    elif isinstance(exc, MigrationAuthError):
        reason = "not authorized"
    elif isinstance(exc, HelperExited):
        reason = f"the restore helper exited with error status {exc.status}"
    elif isinstance(exc, HelperDied):
        reason = f"the restore helper died ({exc.signame})"
    elif isinstance(exc, HelperFailed) and exc.errnoval > 0:
        reason = f"the restore failed ({exc.errno_name})"
    elif isinstance(exc, HelperFailed):
        # libxc reports errno 0 (or -1) for a stream it refuses: "(0)" told
        # nothing.  The first ERROR line's words say which check refused it.
        what = _libxc_category(exc.helper_errors)
        reason = "the restore failed: the stream was refused by libxc" + (
            f" ({what})" if what else "")
    elif isinstance(exc, StartupError):
        reason = "the domain could not be created on the receiving host"
    elif isinstance(exc, Timeout):
        reason = "the receiver timed out"
    elif isinstance(exc, Cancelled):
        reason = "the receive was cancelled"
    elif isinstance(exc, MigrationError):
        # The receiver's own messages; what follows a colon may be a local detail.
        reason = exc.brief.split(": ", 1)[0]
    else:
        reason = "the restore failed"
    if _told(reason):
        return reason
    first = reason.split(": ", 1)[0]   # e.g. "not a migration stream: <the parser's words>"
    return first if _told(first) else "the receive failed"


# What a reason sent to a peer may not hold: a path, a size (the receiver's
# memory, a file's), a free-memory figure; and it is one short printable line.
_SIZE = re.compile(r"\d\s*(?:[KMGTP]i?B|[kK]B|bytes?|pages?)\b", re.IGNORECASE)
_LOCAL = re.compile(r"/|\bfree\b|\bmemory\b|\bmemkb\b", re.IGNORECASE)


def _told(reason: str) -> bool:
    """May a receiver send ``reason`` to its peer?  The one check of every reason."""
    return (0 < len(reason) <= 200 and reason.isprintable()
            and not _SIZE.search(reason) and not _LOCAL.search(reason))


def _libxc_category(helper_errors: Sequence[str]) -> str:
    """The kind of check libxc's first ERROR line names, without its numbers:
    ``xc: Record (0x00000001, Page data) length 0xfffffff0 exceeds max
    (0x8000000): Internal error`` -> ``record length exceeds max``; "" when
    there is none, it is not libxc's, or it is not plain words."""
    line = next((e for e in helper_errors if e.startswith("xc: ")), "")
    text = line[len("xc: "):].split(": ", 1)[0]
    text = re.sub(r"\([^()]*\)", " ", text)
    words = [w for w in text.split() if not any(c.isdigit() for c in w)]
    what = " ".join(words)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z_ ,'-]{2,79}", what) or what == "Restore failed":
        return ""
    return what[0].lower() + what[1:] if not what[:2].isupper() else what


def blame_sender(exc: OperationError, eof_at: Optional[int],
                 logger: logging.Logger) -> OperationError:
    """A restore that failed after the sender hung up mid-stream (``eof_at``
    bytes in; None: it did not, or a Remus stream, whose end is a failover)
    failed because of that (a pyxl or xl sender waits for our answer once its
    stream is whole): say so, not what libxc makes of a truncated stream
    ("Restore failed (0 = Success)").  The sender is told no size."""
    if eof_at is None or not isinstance(exc, (HelperFailed, CorruptImage)):
        return exc   # e.g. a config refused (ConfigError): that is the reason
    logger.info("the restore's own error: %s", exc)
    blamed = MigrationError(f"the sender closed the stream after {format_size(eof_at)}, before "
                            "its end (the migration stopped on the sending side: its log says "
                            "why); the half-received domain was destroyed")
    blamed.peer_text = ("the sender closed the stream before its end (the migration stopped "
                        "on the sending side); the half-received domain was destroyed")
    return blamed
