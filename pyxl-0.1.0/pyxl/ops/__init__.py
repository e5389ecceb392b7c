"""Operations: a save or a restore driven from an event loop around one helper.

``helper_process`` spawns the helper with Xen's argv and speaks the wire
protocol on its pipes; ``operation`` is what save and restore share (callbacks,
logs, progress, libxl's exit rules); ``save`` and ``restore`` add each
direction's stream layers and domain handling; ``trailer`` reads the libxl
records after the libxc stream; ``api`` has the functions most callers use.
May import: pyxl.errors, pyxl.loop, pyxl.fdio, pyxl.wire, pyxl.stream,
pyxl.backends -- never pyxl.migrate or pyxl.cli.
"""

from pyxl.ops.api import restore, save, wait
from pyxl.ops.operation import CallbackRequest, Operation, ProgressEvent
from pyxl.ops.restore import RestoreOperation, RestoreOptions, RestoreResult
from pyxl.ops.save import SaveOperation, SaveOptions, SaveResult

__all__ = ["CallbackRequest", "Operation", "ProgressEvent", "RestoreOperation", "RestoreOptions",
           "RestoreResult", "SaveOperation", "SaveOptions", "SaveResult", "restore", "save",
           "wait"]
