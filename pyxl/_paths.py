"""Where pyxl's native artefacts live, and how the helper can be overridden."""

from __future__ import annotations

import os
from typing import Optional

_PKG = os.path.dirname(os.path.abspath(__file__))

HELPER_NAME = "pyxl-save-helper"
DEBIAN_HELPER = "/usr/lib/xen-4.17/bin/libxl-save-helper"


def helper_path(override: Optional[str] = None) -> str:
    """The helper executable to run.

    Precedence, like libxl's ``LIBXL_SAVE_HELPER``: an explicit argument, then
    the ``PYXL_SAVE_HELPER`` environment variable, then the helper built into
    this package.
    """
    if override:
        return override
    env = os.environ.get("PYXL_SAVE_HELPER")
    if env:
        return env
    return os.path.join(_PKG, HELPER_NAME)


def package_file(name: str) -> str:
    return os.path.join(_PKG, name)
