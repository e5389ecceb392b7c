"""asyncio front end: ``await pyxl.aio.save(...)``, ``restore``, ``migrate``, ``receive``.

Each takes exactly the keywords of its synchronous twin (``pyxl.save``,
``pyxl.restore``, ``pyxl.migrate.migrate``, ``pyxl.migrate.receive``; type
checkers and ``help()`` see them), except ``loop``: the operation runs on the
running asyncio loop (``add_reader``/``call_later``), and callback handlers may be
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
import functools
from typing import Any, Callable, Coroutine, ParamSpec, TypeVar

from pyxl.loop import AsyncioLoop
from pyxl.migrate import api as _migrate_api
from pyxl.ops import api
from pyxl.ops.future import LoopFuture

__all__ = ["migrate", "receive", "restore", "run", "save"]

P = ParamSpec("P")
R = TypeVar("R")


async def run(op: "LoopFuture[R]") -> R:
    """Await an operation started on this asyncio loop (``loop=AsyncioLoop(...)``):
    ``await op`` itself; cancelling the awaiting task cancels it and waits for
    its clean-up (:meth:`pyxl.ops.future.LoopFuture.__await__`)."""
    return await op


def _on_the_running_loop(start: "Callable[P, LoopFuture[R]]") -> "Callable[P, Coroutine[Any, Any, R]]":
    """``start``'s signature (and docs), as a coroutine function on the running loop."""
    @functools.wraps(start)
    async def on_asyncio(*args: P.args, **kwargs: P.kwargs) -> R:
        if kwargs.get("loop") is not None:
            raise TypeError(f"pyxl.aio.{start.__name__} runs on the running asyncio loop; "
                            "loop= is for the synchronous API")
        kwargs["loop"] = AsyncioLoop(asyncio.get_running_loop())
        return await run(start(*args, **kwargs))
    return on_asyncio


#: ``await pyxl.aio.save(domid, path, live=..., leave=...)`` -> :class:`pyxl.SaveResult`
save = _on_the_running_loop(api.save)
#: ``await pyxl.aio.restore(path, paused=...)`` -> :class:`pyxl.RestoreResult`
restore = _on_the_running_loop(api.restore)
#: ``await pyxl.aio.migrate(domid, "HOST:PORT", live=...)`` -> ``MigrateResult``
migrate = _on_the_running_loop(_migrate_api.migrate)
#: ``await pyxl.aio.receive(listen_socket_or_address, ...)`` -> ``ReceiveResult``
receive = _on_the_running_loop(_migrate_api.receive)
