"""Typed failures of pyxl operations.

Every operation failure is an :class:`OperationError` carrying what a toolstack
needs to report it: the operation (``op``), the helper's last ERROR-level log
lines (``helper_errors``), and, when known, the helper's exit status and the
``complete`` message's retval/errnoval.
"""

from __future__ import annotations

import errno as _errno
import os
import signal
from typing import TYPE_CHECKING, List, Optional

from pyxl.wire.codec import ProtocolError

if TYPE_CHECKING:
    from pyxl.ops.operation import Operation

__all__ = [
    "Cancelled", "HelperDied", "HelperFailed", "HelperExited", "HelperProtocolError",
    "MissingComplete", "MissingRestoreResults", "OperationError", "PrecopyAborted",
    "PyxlError", "ProtocolError", "StartupError", "Timeout",
]


class PyxlError(Exception):
    """Base class of pyxl's own exceptions."""


class OperationError(PyxlError):
    """A save, restore or migration did not succeed."""

    def __init__(self, message: str, op: "Optional[Operation]" = None,
                 helper_errors: Optional[List[str]] = None) -> None:
        self.op = op
        self.helper_errors = list(helper_errors or [])
        detail = f" (helper: {self.helper_errors[-1]})" if self.helper_errors else ""
        super().__init__(message + detail)
        self.brief = message


class StartupError(OperationError):
    """The operation could not start: bad domain, unwritable file, helper not executable..."""


class HelperFailed(OperationError):
    """The helper ran to ``complete`` but libxc reported failure (retval != 0)."""

    def __init__(self, message: str, retval: int, errnoval: int, **kw: "object") -> None:
        super().__init__(message + (f": {os.strerror(errnoval)}" if errnoval > 0 else ""), **kw)  # type: ignore[arg-type]
        self.retval = retval
        self.errnoval = errnoval
        self.errno_name = _errno.errorcode.get(errnoval, str(errnoval))


class PrecopyAborted(HelperFailed):
    """A live save's precopy policy gave up (pyxl's helper, ``PYXL_PRECOPY=downtime``
    with ``PYXL_PRECOPY_ON_FAIL=abort``): the downtime target was not met within the
    round limit.  The guest was never suspended and keeps running."""


class HelperExited(OperationError):
    """The helper exited with a non-zero status (255: start-up failed; 254: reply pipe EOF)."""

    def __init__(self, message: str, status: int, **kw: "object") -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.status = status


class HelperDied(OperationError):
    """The helper was killed by a signal."""

    def __init__(self, message: str, signum: int, **kw: "object") -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.signum = signum
        try:
            self.signame = signal.Signals(signum).name
        except ValueError:
            self.signame = str(signum)


class MissingComplete(OperationError):
    """The helper exited 0 without sending ``complete``."""


class MissingRestoreResults(OperationError):
    """A restore helper finished without sending ``restore_results``."""


class HelperProtocolError(OperationError):
    """The helper sent something that is not Xen 4.17's protocol; it was killed."""

    def __init__(self, message: str, error: ProtocolError, **kw: "object") -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.protocol_error = error


class Timeout(OperationError):
    """The operation's timeout expired; the helper was killed."""


class Cancelled(OperationError):
    """``cancel()`` was called; the helper was stopped."""
