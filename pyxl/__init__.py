"""pyxl: save, restore and live-migrate Xen domains from Python.

The heavy lifting runs in a separate helper process speaking Xen 4.17's
save/restore helper protocol (ours, ``pyxl-save-helper``, or Debian's own
``libxl-save-helper``); pyxl drives it from any event loop without blocking::

    op = pyxl.save(domid, "guest.save", live=True)
    pyxl.wait(op)
"""

from pyxl._paths import DEBIAN_HELPER, helper_path
from pyxl.errors import (Cancelled, HelperDied, HelperExited, HelperFailed, HelperProtocolError,
                     MissingComplete, MissingRestoreResults, OperationError, PrecopyAborted,
                     PyxlError, StartupError, Timeout)
from pyxl.loop import AsyncioLoop, HookLoop, SelectorLoop, default_loop
from pyxl.ops.operation import (CallbackRequest, Operation, ProgressEvent, RestoreOperation,
                        RestoreResult, SaveOperation, SaveResult, restore, save, wait)
from pyxl.wire.codec import ProtocolError

__all__ = [
    "AsyncioLoop", "CallbackRequest", "Cancelled", "DEBIAN_HELPER", "HelperDied",
    "HelperExited", "HelperFailed", "HelperProtocolError", "HookLoop", "MissingComplete",
    "MissingRestoreResults", "Operation", "OperationError", "PrecopyAborted", "ProgressEvent", "ProtocolError",
    "PyxlError", "RestoreOperation", "RestoreResult", "SaveOperation", "SaveResult",
    "SelectorLoop", "StartupError", "Timeout", "default_loop", "helper_path", "restore",
    "save", "wait",
]
__version__ = "0.1.0"
