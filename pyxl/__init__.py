"""pyxl: save, restore and live-migrate Xen domains from Python.

The heavy lifting runs in a separate helper process speaking Xen 4.17's
save/restore helper protocol (ours, ``pyxl-save-helper``, or Debian's own
``libxl-save-helper``); pyxl drives it from any event loop without blocking::

    op = pyxl.save(domid, "guest.save", live=True)
    pyxl.wait(op)
"""

import logging as _logging

from pyxl._paths import DEBIAN_HELPER, helper_path
from pyxl.backends import Backend
from pyxl.errors import (BackendError, Cancelled, ConfigError, HelperDied, HelperExited,
                         HelperFailed,
                         HelperProtocolError, LocalProtocolError, MigrationError, MigrationInDoubt,
                         MigrationProtocolError,
                         MissingComplete, MissingRestoreResults, OperationError, PrecopyAborted,
                         PrecopyPolicyError,
                         ProtocolError, PyxlError, RemoteProtocolError, StartupError, StreamError,
                         StreamTooLarge, Timeout, TruncatedStream, UnsupportedStream)
from pyxl.loop import AsyncioLoop, HookLoop, SelectorLoop, default_loop
from pyxl.ops import (CallbackRequest, Operation, ProgressEvent, RestoreOperation, RestoreOptions,
                      RestoreResult, SaveOperation, SaveOptions, SaveResult, restore, save, wait)

__all__ = [
    "AsyncioLoop", "Backend", "BackendError", "CallbackRequest", "Cancelled", "ConfigError",
    "DEBIAN_HELPER",
    "HelperDied", "HelperExited", "HelperFailed", "HelperProtocolError", "HookLoop",
    "LocalProtocolError", "MigrationError", "MigrationInDoubt", "MigrationProtocolError",
    "MissingComplete",
    "MissingRestoreResults", "Operation", "OperationError", "PrecopyAborted", "PrecopyPolicyError",
    "ProgressEvent",
    "ProtocolError", "PyxlError", "RemoteProtocolError", "RestoreOperation", "RestoreOptions",
    "RestoreResult", "SaveOperation", "SaveOptions", "SaveResult", "SelectorLoop",
    "StartupError", "StreamError", "StreamTooLarge", "Timeout", "TruncatedStream",
    "UnsupportedStream",
    "default_loop", "helper_path", "restore", "save", "wait",
]
__version__ = "0.1.0"

# A library does not print: operations raise their errors and log through
# "pyxl.*" loggers, and an application that configured no logging gets no
# copy of them on stderr (logging's last-resort handler) as well.
_logging.getLogger("pyxl").addHandler(_logging.NullHandler())
