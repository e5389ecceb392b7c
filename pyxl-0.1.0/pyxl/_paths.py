"""Where pyxl's native artefacts live, how the helper can be overridden, and
which Xen release this host's libraries are (:func:`xen_release`)."""

from __future__ import annotations

import os
import re
import stat

# typing is for mypy only (3 ms of `pyxl sim list`).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Optional, Tuple

_PKG = os.path.dirname(os.path.abspath(__file__))

HELPER_NAME = "pyxl-save-helper"
#: The Xen releases pyxl builds and runs against (Debian 12's and Debian 13's).
#: The helper protocol, its argv and the stream formats are the same in both;
#: the libraries' sonames and one domctl layout are not.
XEN_RELEASES: Tuple[str, ...] = ("4.17", "4.20")
#: Where the dynamic linker finds Debian's libxenctrl (multiarch first).
LIB_DIRS: Tuple[str, ...] = ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu", "/usr/lib64",
                             "/usr/lib")
_SONAME = re.compile(r"libxenctrl\.so\.(4\.\d+)$")


def xenctrl_releases() -> Tuple[str, ...]:
    """The releases of every ``libxenctrl.so.4.NN`` installed here (soname order,
    newest first): the library's own version, not a guess from the distribution."""
    found = set()
    for d in LIB_DIRS:
        try:
            names = os.listdir(d)
        except OSError:
            continue
        for name in names:
            m = _SONAME.match(name)
            if m:
                found.add(m.group(1))
    return tuple(sorted(found, key=lambda r: tuple(map(int, r.split("."))), reverse=True))


def xen_release() -> Optional[str]:
    """The supported Xen release this host's libxenctrl is (the newest if two are
    installed), or None if none of :data:`XEN_RELEASES` is.  A few stat calls:
    cheap enough for import time."""
    for rel in reversed(XEN_RELEASES):
        if any(os.path.exists(f"{d}/libxenctrl.so.{rel}") for d in LIB_DIRS):
            return rel
    return None


#: Debian's own helper (package xen-utils-4.NN) for this host's Xen release.
DEBIAN_HELPER = f"/usr/lib/xen-{xen_release() or XEN_RELEASES[0]}/bin/libxl-save-helper"


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


def unsafe_dir(path: str, what: str) -> Optional[str]:
    """Why the directory ``path`` (``what`` names it in the answer) must not be
    trusted, or None: it must be a directory, not a symlink to one, belong to
    us, and be neither group- nor world-writable, so that nobody else can plant
    files in it (state, locks) or swap it.  OSError from ``lstat`` (a missing
    directory) is the caller's to judge."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        return f"{what} {path} is a symlink: refusing it"
    if not stat.S_ISDIR(st.st_mode):
        return f"{what} {path} is not a directory"
    if st.st_uid != os.geteuid():
        return (f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {os.geteuid()}): "
                f"refusing it")
    if st.st_mode & 0o022:
        return (f"{what} {path} is group- or world-writable (mode {stat.S_IMODE(st.st_mode):04o}): "
                f"refusing it (chmod go-w it)")
    return None
