"""Domain names held while a domain takes them, across processes.

Names are unique on a host, as libxl keeps them; libxl checks a name inside the
transaction that creates or renames the domain.  pyxl's backends check it in
one loop step and make the domain (or write the new name) in later ones, so two
restores, receives or renames of one name would both pass the check.  Each
therefore holds the name, from before its check until the domain has the name
or the attempt failed: in this process (a set), and across processes with a
:class:`~pyxl.backends.domainlock.HostLock` in the host's directory
(:func:`~pyxl.backends.domainlock.host_dir`: fakexen's state directory, the
Xen host's ``/run/pyxl``), a file named by the name's hash.  A second one
meanwhile fails as if the domain existed.  xl's own check, without a lock,
is not covered.

May import: hashlib, pyxl.errors, pyxl.backends.domainlock.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable, List, Set, Tuple

from pyxl.backends.domainlock import HostLock, host_dir
from pyxl.errors import StartupError

__all__ = ["reserve"]

_held: Set[Tuple[str, str]] = set()


def reserve(backend: Any, name: str) -> Callable[[], None]:
    """Hold ``name`` on the backend's host; return the call that releases it
    (idempotent).  Raises :class:`StartupError` if this process, or another,
    holds it already."""
    directory = host_dir(backend)
    key = (directory, name)
    if key in _held:
        raise StartupError(f"domain {name!r} already exists (another operation of this "
                           "process is making it)")
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    lock = HostLock(directory, f".name-{digest}", "a restore or rename",
                    lambda holder: StartupError(f"domain {name!r} already exists "
                                                f"({holder or 'another process'} is making it)"),
                    f"cannot hold the name {name!r}")
    _held.add(key)
    released: List[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            _held.discard(key)
            lock.release()
    return release
