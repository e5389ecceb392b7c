"""pyxl: save, restore and live-migrate Xen domains from Python.

The heavy lifting runs in a separate helper process speaking Xen 4.17's
save/restore helper protocol (ours, ``pyxl-save-helper``, or Debian's own
``libxl-save-helper``); pyxl drives it from any event loop without blocking::

    op = pyxl.save(domid, "guest.save", live=True)
    pyxl.wait(op)

Only the errors are imported by ``import pyxl`` (not even :mod:`logging`: the
library's loggers come from ``pyxl._log``, which gives them their NullHandler); every other
public name is imported on first use (module ``__getattr__``), so that the
command line (``pyxl --version``, ``pyxl sim list``) starts without loading the
whole library.  The ``TYPE_CHECKING`` block gives type checkers the same names.
"""

import importlib as _importlib

from pyxl.errors import (BackendError, CallbackError, Cancelled, CompressedImage, ConfigError, CorruptImage,
                         HelperDied, HelperExited,
                         HelperFailed,
                         HelperProtocolError, LocalProtocolError, MigrationError, MigrationInDoubt,
                         MigrationProtocolError,
                         MissingComplete, MissingRestoreResults, OperationError, PrecopyAborted,
                         PrecopyPolicyError,
                         ProtocolError, PyxlError, RemoteProtocolError, StartupError, StreamError,
                         StreamTooLarge, Timeout, TruncatedStream, UnsupportedStream)

TYPE_CHECKING = False   # typing is not imported at run time (a faster CLI start)
if TYPE_CHECKING:
    from typing import Any

    from pyxl._paths import DEBIAN_HELPER, helper_path
    from pyxl.backends import Backend
    from pyxl.loop import AsyncioLoop, HookLoop, SelectorLoop, default_loop
    from pyxl.ops import (CallbackRequest, Operation, ProgressEvent, RestoreOperation,
                          RestoreOptions, RestoreResult, SaveOperation, SaveOptions, SaveResult)
    from pyxl.ops.api import restore, save, wait

__all__ = [
    "AsyncioLoop", "Backend", "BackendError", "CallbackError", "CallbackRequest", "Cancelled", "CompressedImage",
    "ConfigError", "CorruptImage",
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

#: name -> the module that defines it, imported on first access.
_LAZY = {
    "DEBIAN_HELPER": "pyxl._paths", "helper_path": "pyxl._paths",
    "Backend": "pyxl.backends",
    "AsyncioLoop": "pyxl.loop", "HookLoop": "pyxl.loop", "SelectorLoop": "pyxl.loop",
    "default_loop": "pyxl.loop",
    **{name: "pyxl.ops" for name in (
        "CallbackRequest", "Operation", "ProgressEvent", "RestoreOperation", "RestoreOptions",
        "RestoreResult", "SaveOperation", "SaveOptions", "SaveResult", "restore", "save",
        "wait")},
}


def __getattr__(name: str) -> "Any":
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pyxl' has no attribute {name!r}")
    value = getattr(_importlib.import_module(module), name)
    globals()[name] = value          # the next access skips __getattr__
    return value


def __dir__() -> "list[str]":
    return sorted(set(globals()) | set(__all__))

