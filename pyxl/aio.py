"""asyncio front end: ``await pyxl.aio.save(...)``, ``restore``, ``migrate``, ``receive``.

Each takes exactly the keywords of its synchronous twin (``pyxl.save``,
``pyxl.restore``, ``pyxl.migrate.migrate``, ``pyxl.migrate.receive``), except
``loop``, which neither type checkers nor ``help()`` nor a call accept (the
signatures are written out; tests/unit/test_typing.py keeps them the twins'):
the operation runs on the running asyncio loop (``add_reader``/``call_later``), and callback handlers may be
coroutines.  Cancelling the awaiting task (``task.cancel()``,
``asyncio.wait_for``) cancels the operation and waits for its clean-up (helper
reaped, temp file removed, guest resumed or half-made domain destroyed) before the
``CancelledError`` propagates; the operation's own ``Cancelled`` outcome is
consumed, so asyncio never reports "Task exception was never retrieved".  An
operation that completed before the cancel could stop it returns its result.

May import: pyxl.loop, pyxl.ops, pyxl.migrate.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple, TypeVar, Union

from pyxl.backends import Backend
from pyxl.backends.base import EmulatorRecord
from pyxl.loop import AsyncioLoop
from pyxl.migrate import api as _migrate_api
from pyxl.migrate.converge import Policy
from pyxl.migrate.precopy import OnFail
from pyxl.migrate.receiver import HEADER_TIMEOUT, IDLE_TIMEOUT, MAX_PENDING, ReceiveResult
from pyxl.migrate.sender import MigrateResult
from pyxl.migrate.tls import TlsOptions
from pyxl.ops import api
from pyxl.ops.future import LoopFuture
from pyxl.ops.operation import STREAM_PLAIN, Handler, PathOrFd, ProgressEvent
from pyxl.ops.restore import RestoreResult
from pyxl.ops.saveoptions import Leave, SaveResult
from pyxl.zstdstage import DEFAULT_LEVEL

__all__ = ["migrate", "receive", "restore", "run", "save"]

R = TypeVar("R")


async def run(op: "LoopFuture[R]") -> R:
    """Await an operation started on this asyncio loop (``loop=AsyncioLoop(...)``):
    ``await op`` itself; cancelling the awaiting task cancels it and waits for
    its clean-up (:meth:`pyxl.ops.future.LoopFuture.__await__`)."""
    return await op


def _here(start: Callable[..., "LoopFuture[R]"], args: Dict[str, Any]) -> "LoopFuture[R]":
    """``start(**args)`` on the running asyncio loop (``args``: the caller's locals(),
    its parameters exactly)."""
    return start(**args, loop=AsyncioLoop(asyncio.get_running_loop()))


async def save(domid: int, path_or_fd: PathOrFd, *, live: bool = False, leave: Leave = "destroy",
               helper: Optional[str] = None, timeout: Optional[float] = None,
               callbacks: Optional[Dict[str, Handler]] = None,
               on_progress: Optional[Callable[[ProgressEvent], None]] = None,
               on_resume: Optional[Callable[[int], None]] = None,
               backend: Optional[Backend] = None, sim_dir: Optional[str] = None,
               suspend_timeout: float = 30.0, debug: bool = False, fsync: bool = True,
               config: Optional[Dict[str, Any]] = None,
               emulator_records: Optional[Sequence[EmulatorRecord]] = None,
               helper_env: Optional[Mapping[str, str]] = None,
               write_trailer: Optional[Callable[[bytes], None]] = None,
               stream_type: int = STREAM_PLAIN, checkpoints: Optional[int] = None,
               checkpoint_interval: float = 0.1, compress: bool = False,
               compress_level: int = DEFAULT_LEVEL, xl_header: bool = True,
               before_suspend: Optional[Callable[[Callable[[], None]], None]] = None
               ) -> SaveResult:
    """:func:`pyxl.save` on the running asyncio loop: its :class:`pyxl.SaveResult`."""
    return await _here(api.save, locals())


async def restore(path_or_fd: PathOrFd, *, paused: bool = False, helper: Optional[str] = None,
                  timeout: Optional[float] = None,
                  callbacks: Optional[Dict[str, Handler]] = None,
                  on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                  backend: Optional[Backend] = None, sim_dir: Optional[str] = None,
                  name: Optional[str] = None, stream_type: int = STREAM_PLAIN,
                  compressed: bool = False,
                  config_check: Optional[Callable[[Dict[str, Any]], None]] = None
                  ) -> RestoreResult:
    """:func:`pyxl.restore` on the running asyncio loop: its :class:`pyxl.RestoreResult`."""
    return await _here(api.restore, locals())


async def migrate(domid: int, target: Optional[Union[str, Tuple[str, int]]] = None, *,
                  command: Optional[str] = None, live: bool = False,
                  downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
                  on_fail: OnFail = "abort", max_bandwidth: Optional[int] = None,
                  helper: Optional[str] = None, timeout: Optional[float] = None,
                  sim_dir: Optional[str] = None, backend: Optional[Backend] = None,
                  digest: bool = False,
                  on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                  handshake_timeout: float = 60.0, remus: bool = False,
                  checkpoints: Optional[int] = None, checkpoint_interval: float = 0.1,
                  tls: Optional[TlsOptions] = None, idle_timeout: Optional[float] = 60.0,
                  auto_converge: bool = False, policy: Optional[Policy] = None,
                  policy_deadline: float = 5.0, compress: bool = False,
                  insecure: bool = False) -> MigrateResult:
    """:func:`pyxl.migrate.migrate` on the running asyncio loop: its ``MigrateResult``."""
    return await _here(_migrate_api.migrate, locals())


async def receive(listen: Optional[Union[str, Tuple[str, int], socket.socket]] = None, *,
                  fds: Optional[Tuple[int, int]] = None, paused: bool = False,
                  helper: Optional[str] = None, timeout: Optional[float] = None,
                  sim_dir: Optional[str] = None, backend: Optional[Backend] = None,
                  digest: bool = False, remus: bool = False, tls: Optional[TlsOptions] = None,
                  insecure: bool = False, header_timeout: Optional[float] = HEADER_TIMEOUT,
                  idle_timeout: Optional[float] = IDLE_TIMEOUT,
                  max_pending: int = MAX_PENDING, compress: bool = True,
                  config_check: Optional[Callable[[Dict[str, Any]], None]] = None
                  ) -> ReceiveResult:
    """:func:`pyxl.migrate.receive` on the running asyncio loop: its ``ReceiveResult``."""
    return await _here(_migrate_api.receive, locals())
