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

OUR_HELPER = str(ROOT / "pyxl" / "pyxl-save-helper")
HELPERS = {"ours": OUR_HELPER, "debian": DEBIAN_HELPER}


@pytest.fixture
def sim_dir(tmp_path_factory):
    """A private fakexen state directory; every domain left in it is destroyed after the test."""
    import tempfile

    from pyxl.sim import domains as sim

    d = tempfile.mkdtemp(prefix="pyxl-test-", dir="/dev/shm")
    try:
        yield d
    finally:
        sim.remove_dir(d)


def open_fds():
    import gc

    import pyxl

    pyxl.default_loop()  # its selector is a long-lived fd of its own
    # Objects of earlier tests (pipes of finished Popens, files) would
    # otherwise be closed by the cyclic GC in the middle of a comparison.
    gc.collect()
    return sorted(int(f) for f in os.listdir("/proc/self/fd"))


def children():
    """Live (or zombie) children of this process."""
    out = []
    me = str(os.getpid())
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[1] == me:
                out.append((int(pid), fields[0]))
    return out
