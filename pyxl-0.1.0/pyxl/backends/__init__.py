"""Where domains live: the :class:`Backend` protocol and its implementations.

``base`` defines :class:`Backend`, everything pyxl's operations ask of a host
(suspend, resume, pause, destroy, rename, config, the restore target and its
ports, the device-model hooks); ``sim`` implements it over fakexen, ``xen`` over
a real Xen host (ctypes over libxenctrl, ``xenstore`` for XenStore); ``default``
picks one.  A toolstack may bring its own.  May import: pyxl.errors, pyxl.loop,
pyxl.sim -- never the operations above it.
"""

from pyxl.backends.base import Backend, Cancellable, NoDeviceModel
from pyxl.backends.default import default_backend
from pyxl.backends.sim import SimBackend

__all__ = ["Backend", "Cancellable", "NoDeviceModel", "SimBackend", "default_backend"]
