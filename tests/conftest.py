import os
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Captured from Debian's real helper and libxenguest (see tests/vectors/*/INDEX.md);
# kept in the repo so CI on a fresh clone has them.
VECTORS = ROOT / "tests" / "vectors"
HELPER_VECTORS = VECTORS / "xen-4.17-helper"
STREAM_VECTORS = VECTORS / "xen-4.17-streams"
DEBIAN_HELPER = "/usr/lib/xen-4.17/bin/libxl-save-helper"
SLOW = bool(os.environ.get("PYXL_SLOW"))


@pytest.fixture
def vectors() -> pathlib.Path:
    return VECTORS
