"""Which backend an operation uses when the caller names none."""

from __future__ import annotations

import os
from typing import Optional

from pyxl.backends.base import Backend
from pyxl.backends.sim import SimBackend


def default_backend(sim_dir: Optional[str] = None) -> Backend:
    """fakexen's :class:`SimBackend`, unless this is a Xen host (``/dev/xen/privcmd``)
    and no simulation directory was asked for (``sim_dir``, ``$PYXL_SIM_DIR``):
    then :class:`~pyxl.backends.xen.XenBackend`."""
    if os.path.exists("/dev/xen/privcmd") and sim_dir is None and not os.environ.get("PYXL_SIM_DIR"):
        from pyxl.backends.xen import XenBackend  # ctypes loads libxenctrl: only on a Xen host
        return XenBackend()
    return SimBackend(sim_dir)
