"""The received copy's name: xl's ``NAME--incoming`` scheme, and collisions.

xl's receiver restores a guest as ``NAME--incoming`` and takes ``NAME`` only
once the sender has cleared it, by which time a sender on the same host has
renamed its source ``NAME--migratedaway``: a migration to the same host works
where names are unique.  So a receiver that finds ``NAME`` taken cannot refuse
at once -- the holder may be the source itself -- and xl finds a collision
only after the whole stream was restored.

This module decides what can be decided early.  A same-host source is the
same guest as the offered config: libxl creates the copy with the config's
uuid, so source and copy share it.  A domain that holds ``NAME`` with
*another* uuid is therefore not the migrating source, and the receive is
refused before the stream moves (:func:`start_name_check`); when the uuids
match, or either cannot be read, the receive goes on and a collision at the
rename is reported as one (:func:`start_name_taken`).  Both are
:class:`~pyxl.errors.StartupError`\\ s (exit 2, as a restore's taken name),
and the sender is told only that the name is taken.  A compressed offer's
image must name the domain its offer named (:func:`check_image_name`).

May import: pyxl.backends, pyxl.errors, pyxl.loop and .domain of this package.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Optional

from pyxl.backends import Backend
from pyxl.backends.base import owner_of, start_domain_config, start_domain_names
from pyxl.errors import MigrationProtocolError, OperationError, StartupError
from pyxl.loop import Loop
from pyxl.migrate.domain import domain_name

__all__ = ["check_image_name", "config_checks", "start_name_check", "start_name_taken"]

#: What the sender is told when the name is taken on the receiving host.
TAKEN = "a domain of that name, not the migrating one, already exists on the receiving host"


def _uuid(config: Optional[Dict[str, Any]]) -> Optional[str]:
    c_info = config.get("c_info") if isinstance(config, dict) else None
    uuid = c_info.get("uuid") if isinstance(c_info, dict) else None
    return uuid.lower() if isinstance(uuid, str) and uuid else None


def start_name_check(backend: Backend, loop: Loop, config: Optional[Dict[str, Any]],
                     done: Callable[[Optional[OperationError]], None]) -> None:
    """``done(None)``: go on; ``done(StartupError)``: the offered name is held
    here by a domain that is not the migrating source (another uuid).  The
    names and the holder's config are read from the loop (a real host's
    XenStore rounds), never waited for."""
    name, offered = domain_name(config), _uuid(config)
    if name is None or offered is None:
        done(None)
        return

    def listed(names: Optional[Dict[int, str]], exc: Optional[Exception]) -> None:
        owner = owner_of(names, name) if names is not None else None
        if owner is None:       # free, or cannot tell: the rename will
            done(None)
            return

        def read(held: Optional[Dict[str, Any]], exc: Optional[Exception]) -> None:
            theirs = _uuid(held) if exc is None else None
            if theirs is None or theirs == offered:
                done(None)      # maybe the source itself (same host): see at the rename
                return
            err = StartupError(f"domain {name!r} already exists here (domid {owner}, uuid "
                               f"{theirs}), and it is not the migrating domain (uuid "
                               f"{offered}): refused before the stream")
            err.peer_text = TAKEN
            done(err)
        start_domain_config(backend, loop, owner, read)

    start_domain_names(backend, loop, listed)


def start_name_taken(backend: Backend, loop: Loop, domid: int, name: str,
                     done: Callable[[Optional[StartupError]], None]) -> None:
    """The received copy ``domid`` could not be renamed ``name``: ``done(err)``
    for a collision (another domain has it: the error to fail with), or
    ``done(None)`` (another cause, or cannot tell)."""
    def listed(names: Optional[Dict[int, str]], exc: Optional[Exception]) -> None:
        owner = owner_of(names, name, but=domid) if names is not None else None
        if owner is None:
            done(None)
            return
        err = StartupError(f"received domain {domid} would not start: domain {name!r} already "
                           f"exists (domid {owner}); the received copy was destroyed")
        err.peer_text = TAKEN
        done(err)
    start_domain_names(backend, loop, listed)


def config_checks(offered: Optional[str], compressed: bool,
                  policy: Optional[Callable[[Dict[str, Any]], None]]
                  ) -> Callable[[Dict[str, Any]], None]:
    """A receiver's checks of the stream's config, after pyxl's own: a
    compressed image names the domain its offer named; then the host's
    ``config_check`` policy, if any."""
    def check(config: Dict[str, Any]) -> None:
        if compressed:
            check_image_name(offered, config)
        if policy is not None:
            policy(config)
    return check


def check_image_name(offered: Optional[str], config: Dict[str, Any]) -> None:
    """A compressed stream: the image's own xl header (checked by the restore
    before it builds anything) names the domain the offer's header named."""
    inner = domain_name(config)
    if inner != offered:
        raise MigrationProtocolError(
            f"the compressed image's xl header names another domain (c_info.name) than the "
            f"offer's: {inner!r}, not {offered!r}")
