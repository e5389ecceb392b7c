"""Domain names reserved by this process while a domain takes them.

Names are unique on a host, as libxl keeps them; libxl checks a name inside the
transaction that creates or renames the domain.  pyxl's backends check it in
one loop step and make the domain (or write the new name) in later ones, so two
restores, receives or renames of one name in one process would both pass the
check.  Each therefore holds the name here, keyed by the host (the backend's
``host_id()``: fakexen's state directory, the Xen host), from before its check
until the domain has the name or the attempt failed; a second one meanwhile
fails as if the domain existed.  Other processes are not covered (neither are
they by a check without a lock: xl's own race).

May import: pyxl.errors.
"""

from __future__ import annotations

from typing import Any, Callable, Hashable, List, Set, Tuple

from pyxl.errors import StartupError

__all__ = ["host_of", "reserve"]

_held: Set[Tuple[Hashable, str]] = set()


def host_of(backend: Any) -> Hashable:
    """The host a backend's domains live on: its ``host_id()`` if it has one,
    else the backend object itself (names are then reserved per object)."""
    host_id = getattr(backend, "host_id", None)
    return host_id() if callable(host_id) else ("object", id(backend))


def reserve(backend: Any, name: str) -> Callable[[], None]:
    """Hold ``name`` on the backend's host; return the call that releases it
    (idempotent).  Raises :class:`StartupError` if this process holds it already."""
    key = (host_of(backend), name)
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
