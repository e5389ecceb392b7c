"""pyxl: save, restore and live-migrate Xen domains from Python.

The heavy lifting runs in a separate helper process speaking Xen 4.17's
save/restore helper protocol (ours, ``pyxl-save-helper``, or Debian's own
``libxl-save-helper``); pyxl drives it from any event loop without blocking.
"""

from ._paths import DEBIAN_HELPER, helper_path

__all__ = ["DEBIAN_HELPER", "helper_path"]
__version__ = "0.1.0"
