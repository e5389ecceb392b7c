"""Domain names reserved by this process while a domain takes them.

Names are unique on a host, as libxl keeps them; libxl checks a name inside the
transaction that creates or renames the domain.  pyxl's backends check it in
one loop step and make the domain (or write the new name) in later ones, so two
restores, receives or renames of one name in one process would both pass the
check.  Each therefore holds the name here, keyed by the host (its directory,
:func:`pyxl.backends.domainlock.host_dir`: fakexen's state directory, the Xen
host's ``/run/pyxl``), from before its check
until the domain has the name or the attempt failed; a second one meanwhile
fails as if the domain existed.  Other processes are not covered (neither are
they by a check without a lock: xl's own race).

May import: pyxl.errors, pyxl.backends.domainlock.
"""

from __future__ import annotations

from typing import Any, Callable, List, Set, Tuple

from pyxl.backends.domainlock import host_dir
from pyxl.errors import StartupError

__all__ = ["reserve"]

_held: Set[Tuple[str, str]] = set()


def reserve(backend: Any, name: str) -> Callable[[], None]:
    """Hold ``name`` on the backend's host; return the call that releases it
    (idempotent).  Raises :class:`StartupError` if this process holds it already."""
    key = (host_dir(backend), name)
    if key in _held:
        raise StartupError(f"domain {name!r} already exists (another operation of this "
                           "process is making it)")
    _held.add(key)
    released: List[bool] = []

    def release() -> None:
        if not released:
            released.append(True)
            _held.discard(key)
    return release
