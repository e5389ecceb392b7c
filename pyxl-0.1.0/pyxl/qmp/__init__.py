"""QMP, the QEMU Machine Protocol, as a toolstack speaks it to a guest's device model.

``codec`` is the sans-I/O client codec (bytes in, events out: greeting,
capabilities negotiation, commands, answers, events; bounded and strict) and
holds every QMP error (under :class:`pyxl.errors.DeviceModelError`); ``client``
drives it on a :class:`pyxl.loop.Loop` over a UNIX socket, never blocking, with
descriptors passed by SCM_RIGHTS.  ``codec`` may import pyxl.errors only;
``client`` also pyxl.loop -- nothing above them (no backends, no operations).
"""

from pyxl.qmp.client import Connected, QmpClient, Reply
from pyxl.qmp.codec import (MAX_LINE, NEED_DATA, Closed, Error, Event, Greeting, QmpCommandError,
                            QmpConnection, QmpConnectionError, QmpEvent, QmpLocalProtocolError,
                            QmpProtocolError, QmpRemoteProtocolError, QmpTimeout, Return)

__all__ = [
    "Closed", "Connected", "Error", "Event", "Greeting", "MAX_LINE", "NEED_DATA", "QmpClient",
    "QmpCommandError", "QmpConnection", "QmpConnectionError", "QmpEvent",
    "QmpLocalProtocolError", "QmpProtocolError", "QmpRemoteProtocolError", "QmpTimeout",
    "Reply", "Return",
]
