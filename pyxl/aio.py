"""asyncio front end: ``await pyxl.aio.save(...)`` / ``await pyxl.aio.restore(...)``.

The operations run on the running asyncio loop (``add_reader``/``call_later``);
callback handlers may be coroutines.  Cancelling the awaiting task cancels the
operation and waits for its clean-up (helper reaped, temp file removed, domain
resumed or destroyed) before the cancellation propagates.
"""

from __future__ import annotations

import asyncio
from typing import Any

from pyxl.ops import api
from pyxl.loop import AsyncioLoop
from pyxl.ops.operation import Operation, PathOrFd
from pyxl.ops.restore import RestoreResult
from pyxl.ops.save import SaveResult

__all__ = ["restore", "save", "run"]


async def run(op: "Operation[Any]") -> Any:
    """Await an operation created with ``loop=AsyncioLoop(...)``."""
    try:
        return await asyncio.shield(_wrap(op))
    except asyncio.CancelledError:
        op.cancel()
        done: "asyncio.Future[None]" = asyncio.get_running_loop().create_future()

        def finished(_op: "Operation[Any]") -> None:
            if not done.done():
                done.set_result(None)

        op.add_done_callback(finished)
        await done
        raise


async def _wrap(op: "Operation[Any]") -> Any:
    return await op


async def save(domid: int, path_or_fd: PathOrFd, **kw: Any) -> SaveResult:
    op = api.save(domid, path_or_fd, loop=AsyncioLoop(asyncio.get_running_loop()), **kw)
    result: SaveResult = await run(op)
    return result


async def restore(path_or_fd: PathOrFd, **kw: Any) -> RestoreResult:
    op = api.restore(path_or_fd, loop=AsyncioLoop(asyncio.get_running_loop()), **kw)
    result: RestoreResult = await run(op)
    return result
