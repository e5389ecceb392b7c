"""pyxl's exceptions: one tree under :class:`PyxlError`.

::

    PyxlError
    +-- ProtocolError            the helper protocol (pyxl.wire)
    |   +-- RemoteProtocolError      the helper sent bytes that are not Xen's protocol
    |   +-- LocalProtocolError       pyxl asked the codec for something the protocol forbids
    +-- StreamError              a save stream breaks a rule (pyxl.stream); also a ValueError
    |   +-- TruncatedStream, UnsupportedStream (CompressedImage)
    +-- BackendError             the place domains live refused or failed (pyxl.backends, pyxl.sim)
    |   +-- DeviceModelError         a guest's device model (QEMU, fakexen's) failed or broke QMP
    +-- OperationError           a save, restore or migration did not succeed (pyxl.ops, pyxl.migrate)
        +-- StartupError (ConfigError), HelperExited, HelperDied, HelperFailed (PrecopyAborted),
        |   MissingComplete, MissingRestoreResults, HelperProtocolError, Timeout, Cancelled,
        |   StreamTooLarge, CorruptImage, CallbackError
        +-- MigrationError (MigrationInDoubt, MigrationProtocolError, PrecopyPolicyError)

Every operation failure carries what a toolstack needs to report it: the
operation (``op``), the helper's ERROR-level log lines (``helper_errors``: the
first, quoted in the message, and the last ones),
and, when known, the helper's exit status and the ``complete`` message's
retval/errnoval.  Stream errors carry the byte offset of what broke a rule.

This module is the bottom of the import graph: it imports nothing from pyxl.
"""

from __future__ import annotations

import errno as _errno
import os

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start);
if TYPE_CHECKING:       # type checkers take this branch
    from typing import Any, Dict, List, Optional

__all__ = [
    "BackendError", "CallbackError", "Cancelled", "CompressedImage", "ConfigError", "CorruptImage", "DeviceModelError", "HelperDied", "HelperFailed", "HelperExited",
    "HelperProtocolError", "LocalProtocolError", "MigrationError", "MigrationInDoubt",
    "MigrationProtocolError", "PrecopyPolicyError",
    "MissingComplete", "MissingRestoreResults", "OperationError", "PrecopyAborted",
    "ProtocolError", "PyxlError", "RemoteProtocolError", "StartupError", "StreamError",
    "StreamTooLarge", "Timeout", "TruncatedStream", "UnsupportedStream", "os_error_text",
]


def os_error_text(exc: OSError) -> str:
    """An OSError in one line, naming its file: ``FILE: strerror`` (once, if
    the text names it already), or ``str(exc)`` when it has no file."""
    if exc.filename and exc.strerror:
        name = str(exc.filename)
        return exc.strerror if name in exc.strerror else f"{name}: {exc.strerror}"
    return str(exc)


class PyxlError(Exception):
    """Base class of pyxl's own exceptions."""


# ---- the helper protocol ------------------------------------------------------------------


class ProtocolError(PyxlError):
    """Bytes on the helper's pipes that are not Xen 4.17's helper protocol.

    Raised as :class:`RemoteProtocolError` when the helper sent them (the codec
    cannot decode a frame) and as :class:`LocalProtocolError` when pyxl itself
    asked the codec for something the protocol forbids (a reply nobody waits
    for, an over-long frame).

    ``offset`` is the byte offset in the helper's stdout stream of the frame at
    fault; ``message`` the message name when the number was known.
    """

    def __init__(self, reason: str, offset: int, message: Optional[str] = None) -> None:
        where = f"{message} frame" if message else "frame"
        super().__init__(f"{where} at offset {offset:#x}: {reason}")
        self.reason = reason
        self.offset = offset
        self.message = message
        #: Valid messages that came before the fault in the same batch (for
        #: example the helper's last ERROR logs), so the I/O layer loses nothing.
        self.before: List[Any] = []


class RemoteProtocolError(ProtocolError):
    """The helper sent a frame that is not a valid Xen 4.17 helper message."""


class LocalProtocolError(ProtocolError):
    """pyxl tried to send something the protocol forbids (a bug in the caller)."""

    def __init__(self, reason: str) -> None:
        PyxlError.__init__(self, reason)
        self.reason = reason
        self.offset = -1
        self.message = None
        self.before = []


# ---- save streams -------------------------------------------------------------------------


class StreamError(PyxlError, ValueError):
    """The stream breaks a rule that Xen 4.17's restore code (or pyxl, where
    documented as stricter) enforces.

    ``offset`` is the byte offset of the offending header or record,
    ``where`` names it ("libxc record", "xl header", ...) and ``reason`` is a
    one-line statement of the rule that failed.  ``str(err)`` is
    ``"<where> at 0x<offset>: <reason>"``.

    Raised by every reader and scanner in ``pyxl.stream``; never raised for
    I/O failures of the underlying file (those stay ``OSError``).
    """

    def __init__(self, offset: int, reason: str, where: str = "stream") -> None:
        self.offset = offset
        self.reason = reason
        self.where = where
        super().__init__(offset, reason, where)  # args round-trip through pickle

    def __str__(self) -> str:
        return f"{self.where} at {self.offset:#x}: {self.reason}"

    @property
    def layer(self) -> str:
        """``"xl"``, ``"libxl"``, ``"libxc"`` or ``"stream"``."""
        return self.where.split(" ", 1)[0]

    def to_json(self) -> Dict[str, Any]:
        return {
            "type": type(self).__name__,
            "layer": self.layer,
            "where": self.where,
            "offset": self.offset,
            "reason": self.reason,
            "message": str(self),
        }


class TruncatedStream(StreamError):
    """The stream ended (EOF) before a header, record or body was complete.

    ``offset`` is where the missing bytes should have been.  Also raised
    *before* reading when a regular file is too short for a declared length.
    """


class UnsupportedStream(StreamError):
    """A well-formed stream that pyxl cannot handle, although Xen might
    (e.g. an xl file without the STREAMv2 flag, which xl would pass to the
    legacy converter)."""


class CompressedImage(UnsupportedStream):
    """A zstd-compressed pyxl image where a plain xl stream was read (from a
    pipe, or by a reader of plain streams): ``pyxl restore FILE`` and ``pyxl
    inspect FILE`` take it; ``zstd -d`` gives the plain image back."""


# ---- backends -----------------------------------------------------------------------------


class BackendError(PyxlError):
    """The place domains live (fakexen, Xen, a toolstack's own backend) refused or failed."""


class DeviceModelError(BackendError):
    """A guest's device model (QEMU, or fakexen's simulated one) failed: it could not be
    reached, broke the QMP protocol, answered a command with an error, did not answer
    in time, or did not start (``pyxl.qmp``, ``pyxl.backends.devicemodel``)."""


# ---- operations ---------------------------------------------------------------------------


class OperationError(PyxlError):
    """A save, restore or migration did not succeed.

    ``guest_state``: a save that failed after its guest was suspended says how
    it left the guest: ``"running"`` or ``"paused"`` (resumed as it was before
    the save), or ``"suspended"`` (the resume failed; the message says so too).
    None: the save never stopped the guest (or not a save).  A
    :class:`CallbackError` of a save's suspend handler always has it: the
    guest as the handler left it (``"running"``, ``"paused"``; one it
    suspended is resumed first)."""

    guest_state: Optional[str] = None
    #: A migration's failure, whatever its type (a :class:`MigrationError`,
    #: or its save's error: a :class:`CallbackError`, a :class:`HelperFailed`
    #: ...): the source domain's state afterwards, when known.
    source_state: Optional[str] = None
    #: What a migration receiver tells its sender instead of the generic reason
    #: for the error's kind (:func:`pyxl.migrate.reasons.peer_reason` checks it
    #: as any reason: no local path, size or free memory).
    peer_text: Optional[str] = None
    #: Set once an operation logged it: an owner that reports the same error
    #: (a receive, its restore's) does not log it again.
    logged: bool = False

    def __init__(self, message: str, op: Optional[Any] = None,
                 helper_errors: Optional[List[str]] = None) -> None:
        self.op = op
        self.helper_errors = list(helper_errors or [])
        # The first ERROR line is the cause ("Failed to read ... Page data");
        # the last is libxc's summary of it ("Restore failed ... Internal error").
        detail = f" (helper: {self.helper_errors[0]})" if self.helper_errors else ""
        super().__init__(message + detail)
        self.brief = message


class StartupError(OperationError):
    """The operation could not start: bad domain, unwritable file, helper not executable..."""


class ConfigError(StartupError):
    """The domain config a stream carries (untrusted: a save file, a migration
    peer) is not one pyxl builds a domain from: a wrong type, a number out of
    range, a bad name or uuid, nesting too deep.  Raised before any domain
    exists; the message names the field (``b_info.max_memkb: ...``)."""

    def __init__(self, field: str, problem: str, op: Optional[Any] = None) -> None:
        if len(field) > 120:    # a path through a deeply nested hostile config
            field = field[:117] + "..."
        super().__init__(f"saved config: {field}: {problem}", op=op)
        self.field, self.problem = field, problem


class StreamTooLarge(OperationError):
    """A stream went past one of pyxl's bounds on what it holds in memory (the
    records after the libxc stream: their count, their bytes); ``bound`` names
    it.  The half-made domain is destroyed before this is reported."""

    def __init__(self, message: str, bound: str, op: Optional[Any] = None) -> None:
        super().__init__(message, op=op)
        self.bound = bound


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
            import signal   # here: `import pyxl` stays light (signal builds enums)
            self.signame = signal.Signals(signum).name
        except ValueError:
            self.signame = str(signum)


class MissingComplete(OperationError):
    """The helper exited 0 without sending ``complete``."""


class MissingRestoreResults(OperationError):
    """A restore helper finished without sending ``restore_results``."""


class HelperProtocolError(OperationError):
    """The helper sent something that is not Xen 4.17's protocol; it was killed."""

    def __init__(self, message: str, error: "ProtocolError", **kw: "object") -> None:
        super().__init__(message, **kw)  # type: ignore[arg-type]
        self.protocol_error = error


class CorruptImage(OperationError):
    """A compressed image failed its check while it was restored: truncated,
    corrupt, a content checksum that does not match, no checksum at all, or
    more bytes than its stream (after END, or after the zstd frame).  The
    restored domain never ran and was destroyed before this is reported."""


class CallbackError(OperationError):
    """A callback of the application's raised (a ``callbacks=`` handler, or the
    coroutine it returned; ``on_progress`` or a progress callback;
    ``before_suspend``; ``write_trailer``): the operation failed because of it.
    ``__cause__`` is the callback's exception and ``callback`` names it
    (``"suspend handler"``, ``"on_progress"``, ...).  A raising handler is
    answered with failure, so libxc stops; any other callback that raised kills
    the helper.  A save's ``guest_state`` says how the guest was left."""

    def __init__(self, message: str, callback: str, op: Optional[Any] = None) -> None:
        super().__init__(message, op=op)
        self.callback = callback


class Timeout(OperationError):
    """The operation's timeout expired; the helper was killed."""


class Cancelled(OperationError):
    """``cancel()`` was called; the helper was stopped."""


class MigrationError(OperationError):
    """The migration failed.  Unless it is a :class:`MigrationInDoubt`, the source
    domain runs (it was never stopped, or was resumed) and the destination kept
    nothing.  ``source_state`` is the source's state afterwards, when known
    (as on any error a migration fails with: see :class:`OperationError`)."""

    def __init__(self, message: str, source_state: Optional[str] = None, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.source_state = source_state


class PrecopyPolicyError(MigrationError):
    """The toolstack's switch-over policy raised, did not answer within its deadline,
    answered something that is no decision, or chose to abort.  The helper was told
    to abort precopy: the guest was never suspended, runs, and any CPU cap pyxl set
    was lifted."""


class MigrationInDoubt(MigrationError):
    """The connection was lost after the sender cleared the destination to
    unpause: the guest may run there.  The source was left paused."""


class MigrationProtocolError(MigrationError):
    """The migration peer sent bytes that are not xl's migration handshake (a
    wrong banner, an unexpected or over-long message, EOF in the middle of one,
    a stream head that is not an xl save stream).  Raised by
    ``pyxl.migrate.handshake``, after which that handshake is poisoned; the
    operation reports it as its failure (as a :class:`MigrationInDoubt` once
    the sender cleared the receiver to unpause)."""


class MigrationAuthError(MigrationError):
    """A migration peer failed authentication: the TLS handshake failed (no
    certificate, one from another CA, a wrong name) or its certificate's names
    are not on the receiver's allow-list.  A listening receiver drops such a
    connection and keeps listening; a sender fails with it (its source runs on)."""
