"""The future-like surface every pyxl operation shares (save, restore, migrate).

``done()``, ``result()``, ``exception()``, ``add_done_callback()`` and
``await op``: enough for :func:`pyxl.wait`, asyncio and a toolstack's own loop,
without tying operations to any one of them.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Generator, Generic, List, Optional, TypeVar

from pyxl.errors import OperationError
from pyxl.loop import AsyncioLoop, Loop, SelectorLoop, default_loop

#: Covariant: users only read a result, so an ``Operation[SaveResult]`` is an
#: ``Operation[object]``, and a list of a save and a restore is typed without help.
T_co = TypeVar("T_co", covariant=True)


class _ExitTracked(type):
    """Registers each operation for the exit's clean-up once its constructor
    has returned: one whose constructor raised (no such domain) has nothing
    to clean up, and would never finish if cancelled."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        op = super().__call__(*args, **kwargs)
        op._cancel_at_exit()
        return op


class LoopFuture(Generic[T_co], metaclass=_ExitTracked):
    """Settled once, from the loop it runs on, with a ``T_co`` or an :class:`OperationError`."""

    kind = "operation"
    #: The loop whose callbacks make progress (set by the subclass).
    loop: Loop

    def __init__(self) -> None:
        self._done = False
        self._result: Optional[T_co] = None
        self._exception: Optional[OperationError] = None
        self._done_cbs: List[Callable[[Any], None]] = []

    def done(self) -> bool:
        return self._done

    def result(self) -> T_co:
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

    def __await__(self) -> Generator[Any, None, T_co]:
        """asyncio's semantics: cancelling the awaiting task cancels the
        operation, and the CancelledError propagates once its clean-up is done
        (helper reaped, temp file removed, guest resumed or half-made domain
        destroyed); its own ``Cancelled`` outcome stays on the operation.  One
        that completed before the cancel could stop it returns its result.

        An operation whose loop is not the running asyncio loop (pyxl's
        SelectorLoop, or an AsyncioLoop of another asyncio loop) raises
        RuntimeError at once: nothing would make it progress while this waits."""
        return self._on_asyncio().__await__()

    async def _on_asyncio(self) -> T_co:
        import asyncio     # here: a CLI run never imports asyncio
        running = asyncio.get_running_loop()
        if not self._done and not self._runs_on(running):
            raise RuntimeError(f"{self._what()} runs on {type(self.loop).__name__}, not on "
                               "the running asyncio loop: nothing would make it progress "
                               "(start it with loop=pyxl.AsyncioLoop(asyncio.get_running_loop()), "
                               "or use pyxl.aio)")
        done: "asyncio.Future[None]" = running.create_future()

        def finished(_op: Any) -> None:
            if not done.done():
                done.set_result(None)

        self.add_done_callback(finished)
        try:
            # shield: a cancel of this task must not cancel ``done``, still needed below
            await asyncio.shield(done)
        except asyncio.CancelledError:
            self.cancel()
            await done          # the clean-up; its Cancelled outcome stays on the op
            if self._exception is not None:
                raise
            # It finished before the cancel could stop it: the save is on disk, the
            # domain gone.  Hiding that would be a lie; asyncio.wait_for returns it.
        return self.result()

    def _runs_on(self, running: Any) -> bool:
        """Whether the running asyncio loop makes this operation progress: an
        AsyncioLoop must be over it; pyxl's SelectorLoop never is; a HookLoop's
        hooks may be (the application's own loop), so it is trusted."""
        loop = getattr(self, "loop", None)
        if isinstance(loop, AsyncioLoop):
            return loop.loop is running
        return not isinstance(loop, SelectorLoop)

    def _what(self) -> str:
        return self.kind

    def _cancel_at_exit(self) -> None:
        """Called once constructed (:class:`_ExitTracked`): an operation on pyxl's default
        loop, still running when the interpreter exits (an uncaught exception,
        ``sys.exit()``, the script's end), is cancelled then and the loop run
        until its clean-up is done (:func:`_exiting`): no temporary file, no
        suspended guest, no half-made domain is left.  On another loop the
        application drives it, and cancels it before that loop stops."""
        if self._done or getattr(self, "loop", None) is not default_loop():
            return
        global _exit_hooked
        if not _exit_hooked:
            import atexit
            atexit.register(_exiting)
            _exit_hooked = True
        _in_flight[id(self)] = self

    def _set_outcome(self, result: Any, exc: Optional[OperationError]) -> bool:
        # ``result`` is a T_co (a covariant type cannot be a parameter's: the
        # subclasses that settle it pass their own result type)
        """Settle once and run the done callbacks; False if already settled."""
        if self._done:
            return False
        self._done = True
        self._result, self._exception = result, exc
        _in_flight.pop(id(self), None)
        cbs, self._done_cbs = self._done_cbs, []
        # Every callback runs, even after one raised (another may be an
        # ``await op`` waiting to wake); the first exception then goes up
        # through the loop, as any of the application's callbacks' does.
        raised: Optional[BaseException] = None
        for cb in cbs:
            try:
                cb(self)
            except BaseException as exc:  # the application's code
                raised = raised or exc
        if raised is not None:
            raise raised
        return True


#: Operations on the default loop that have not finished (see _cancel_at_exit).
_in_flight: Dict[int, "LoopFuture[Any]"] = {}
_exit_hooked = False
#: How long the exit waits for their clean-up: cancel()'s SIGTERM, then SIGKILL
#: after its 5 s grace, the guest's resume or the domain's destroy.
EXIT_GRACE = 10.0


def _exiting() -> None:
    """atexit: cancel what still runs on the default loop and let it clean up."""
    ops = [op for op in _in_flight.values() if not op.done()]
    if not ops:
        return
    loop = default_loop()
    for op in ops:
        try:
            op.cancel()
        except Exception:   # a broken backend: the others still get theirs
            pass
    try:
        loop.run_until(lambda: all(op.done() for op in ops), EXIT_GRACE)
    except Exception:   # a closed loop: exit anyway
        return
