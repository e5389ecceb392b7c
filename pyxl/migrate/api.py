"""The functions most callers need: :func:`migrate` and :func:`receive`.

Each starts one migration's end and returns its operation at once; run the
loop (``pyxl.wait(op)``, asyncio, or your own) to make progress.  Every
option is a keyword, so a misspelt one is a ``TypeError`` and
``help(pyxl.migrate.migrate)`` lists them.  The ends themselves are
:mod:`.sender` and :mod:`.receiver`.

May import: pyxl.migrate.sender, pyxl.migrate.receiver and what their
signatures name.
"""

from __future__ import annotations

import socket
from typing import Any, Callable, Dict, Optional, Tuple, Union

from pyxl.backends import Backend
from pyxl.loop import Loop
from pyxl.migrate.converge import Policy
from pyxl.migrate.precopy import OnFail
from pyxl.migrate.receiver import HEADER_TIMEOUT, IDLE_TIMEOUT, MAX_PENDING, ReceiveOperation
from pyxl.migrate.sender import MigrateOperation
from pyxl.migrate.tls import TlsOptions
from pyxl.ops.operation import ProgressEvent

__all__ = ["migrate", "receive"]


def migrate(domid: int, target: Optional[Union[str, Tuple[str, int]]] = None, *,
            command: Optional[str] = None, live: bool = False,
            downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
            on_fail: OnFail = "abort", max_bandwidth: Optional[int] = None,
            helper: Optional[str] = None, timeout: Optional[float] = None,
            loop: Optional[Loop] = None, sim_dir: Optional[str] = None,
            backend: Optional[Backend] = None, digest: bool = False,
            on_progress: Optional[Callable[[ProgressEvent], None]] = None,
            handshake_timeout: float = 60.0, remus: bool = False,
            checkpoints: Optional[int] = None, checkpoint_interval: float = 0.1,
            tls: Optional[TlsOptions] = None, idle_timeout: Optional[float] = 60.0,
            auto_converge: bool = False, policy: Optional[Policy] = None,
            policy_deadline: float = 5.0, compress: bool = False,
            insecure: bool = False) -> MigrateOperation:
    """Start migrating ``domid`` to a receiver at ``target`` ("HOST:PORT") or
    through ``command`` (its stdin/stdout; e.g. "ssh host pyxl migrate-receive").

    ``live``: precopy while the guest runs.  ``downtime_ms``: the helper's
    downtime-target precopy policy, with ``max_iterations`` and ``on_fail``
    ("abort": the guest runs on; "stop": stop and copy anyway).
    ``max_bandwidth``: bytes/s.  ``helper``, ``timeout`` (overall), ``loop``,
    ``sim_dir``/``backend`` (where the domain lives), ``digest`` (sim digest at
    switch-over), ``on_progress``.  ``remus``: a checkpointed stream, switching
    over after ``checkpoints`` (None: replicate until stopped) every
    ``checkpoint_interval`` seconds.  ``tls``: a
    :class:`~pyxl.migrate.tls.TlsOptions` (mutual TLS to the receiver).
    Plain TCP (neither ``tls`` nor ``command``) authenticates nobody: it goes
    to a loopback address only, to a receiver of this user's (or root's), and
    elsewhere only with ``insecure`` (a :class:`StartupError` otherwise; a
    :class:`MigrationAuthError` for another user's receiver).
    ``handshake_timeout``: connect + TLS + banner, then each wait for "ready"
    and for the status (default 60 s); ``idle_timeout``: a stream that does not
    move (default 60 s, None: none).  ``auto_converge`` (with ``downtime_ms``):
    cap the guest's CPU while the target cannot be met, and lift it after.
    ``policy``: your switch-over policy (:mod:`pyxl.migrate.converge`), asked
    after every round, answering within ``policy_deadline`` seconds.
    ``compress``: offer the receiver a zstd-compressed stream (a pyxl receiver
    takes it; an xl one, which never answers, gets it plain after 2 s).  Returns
    at once; ``pyxl.wait(op)`` or ``await op`` gives a :class:`MigrateResult`.
    """
    return MigrateOperation(domid, target, command=command, live=live, downtime_ms=downtime_ms,
                            max_iterations=max_iterations, on_fail=on_fail,
                            max_bandwidth=max_bandwidth, helper=helper, timeout=timeout,
                            loop=loop, sim_dir=sim_dir, backend=backend, digest=digest,
                            on_progress=on_progress, handshake_timeout=handshake_timeout,
                            remus=remus, checkpoints=checkpoints,
                            checkpoint_interval=checkpoint_interval, tls=tls,
                            idle_timeout=idle_timeout, auto_converge=auto_converge,
                            policy=policy, policy_deadline=policy_deadline, compress=compress,
                            insecure=insecure)


def receive(listen: Optional[Union[str, Tuple[str, int], socket.socket]] = None, *,
            fds: Optional[Tuple[int, int]] = None, paused: bool = False,
            helper: Optional[str] = None, timeout: Optional[float] = None,
            loop: Optional[Loop] = None, sim_dir: Optional[str] = None,
            backend: Optional[Backend] = None, digest: bool = False,
            remus: bool = False, tls: Optional[TlsOptions] = None,
            insecure: bool = False, header_timeout: Optional[float] = HEADER_TIMEOUT,
            idle_timeout: Optional[float] = IDLE_TIMEOUT,
            max_pending: int = MAX_PENDING, compress: bool = True,
            config_check: Optional[Callable[[Dict[str, Any]], None]] = None) -> ReceiveOperation:
    """Start receiving one migration: listen on ``listen`` ("ADDR:PORT", a tuple,
    or a listening socket; port 0 picks one, see ``op.address``) for one
    connection, or use ``fds=(read_fd, write_fd)`` (e.g. (0, 1) under ssh).

    The domain is restored paused and unpaused once the sender clears it
    (unless ``paused``).  Options: ``helper``, ``timeout`` (overall),
    ``loop``, ``sim_dir``, ``digest``; ``tls`` (a :class:`TlsOptions`:
    mutual TLS, ``allow`` names the peers it accepts); ``insecure`` (plain
    TCP on a non-loopback address, refused otherwise with a
    :class:`StartupError`); ``header_timeout`` (per connection, to its stream
    head; default 60 s) and ``idle_timeout`` (stream inactivity -- not for
    Remus -- and the wait for "cleared to unpause"; default 60 s), None for
    no deadline.  While
    listening, connections that fail TLS, are not allowed, send garbage or
    stay silent are dropped, and it listens on for the real sender.
    ``compress``: take a pyxl sender's offer of a zstd stream (default; its
    frame and checksum are checked before the domain may run).
    ``config_check(config)``: the host's own policy on the sender's config (its
    disk paths, bridges, ...), after pyxl's checks and before anything is
    built; a :class:`~pyxl.ConfigError` it raises fails the receive, and the
    sender is told.  ``pyxl.wait(op)`` gives a :class:`ReceiveResult`.
    """
    return ReceiveOperation(listen, fds=fds, paused=paused, helper=helper, timeout=timeout,
                            loop=loop, sim_dir=sim_dir, backend=backend, digest=digest,
                            remus=remus, tls=tls, insecure=insecure,
                            header_timeout=header_timeout, idle_timeout=idle_timeout,
                            max_pending=max_pending, compress=compress,
                            config_check=config_check)
