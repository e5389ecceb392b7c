"""The future-like surface every pyxl operation shares (save, restore, migrate).

``done()``, ``result()``, ``exception()``, ``add_done_callback()`` and
``await op``: enough for :func:`pyxl.wait`, asyncio and a toolstack's own loop,
without tying operations to any one of them.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Generic, List, Optional, TypeVar

from pyxl.errors import OperationError
from pyxl.loop import Loop

T = TypeVar("T")


class LoopFuture(Generic[T]):
    """Settled once, from the loop it runs on, with a ``T`` or an :class:`OperationError`."""

    kind = "operation"
    #: The loop whose callbacks make progress (set by the subclass).
    loop: Loop

    def __init__(self) -> None:
        self._done = False
        self._result: Optional[T] = None
        self._exception: Optional[OperationError] = None
        self._done_cbs: List[Callable[[Any], None]] = []

    def done(self) -> bool:
        return self._done

    def result(self) -> T:
        if not self._done:
            raise RuntimeError(f"{self._what()} is still running (use pyxl.wait or await it)")
        if self._exception is not None:
            raise self._exception
        return self._result  # type: ignore[return-value]  # set with the outcome

    def exception(self) -> Optional[OperationError]:
        if not self._done:
            raise RuntimeError(f"{self._what()} is still running")
        return self._exception

    def cancel(self) -> bool:
        """Stop the operation and clean up; False if it is already done."""
        raise NotImplementedError

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if self._done:
            fn(self)
        else:
            self._done_cbs.append(fn)

    def __await__(self) -> Generator[Any, None, T]:
        import asyncio
        fut: "asyncio.Future[T]" = asyncio.get_running_loop().create_future()

        def transfer(op: "LoopFuture[T]") -> None:
            if fut.cancelled():
                return
            if op._exception is not None:
                fut.set_exception(op._exception)
            else:
                fut.set_result(op._result)  # type: ignore[arg-type]  # settled with a T

        self.add_done_callback(transfer)
        return fut.__await__()

    def _what(self) -> str:
        return self.kind

    def _set_outcome(self, result: Optional[T], exc: Optional[OperationError]) -> bool:
        """Settle once and run the done callbacks; False if already settled."""
        if self._done:
            return False
        self._done = True
        self._result, self._exception = result, exc
        cbs, self._done_cbs = self._done_cbs, []
        for cb in cbs:
            cb(self)
        return True
