r"""The machinery every helper-driven operation shares (save and restore).

An :class:`Operation` is future-like (:class:`~pyxl.ops.future.LoopFuture`):
``done()``, ``result()``, ``exception()``, ``add_done_callback()``, ``cancel()``,
and ``await op`` under asyncio.  It starts at once (files opened, headers
written, helper spawned) and then makes progress only when its loop dispatches
events, so one thread can run many.  This module turns the helper's messages
into log records, progress events and :class:`CallbackRequest`\ s, answers the
callbacks (the toolstack's handler or the operation's default), and decides the
outcome by libxl's rules when the helper exits.  :mod:`pyxl.ops.save` and
:mod:`pyxl.ops.restore` add what is specific to each direction.
"""

from __future__ import annotations

import collections
import inspect
import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import (Any, Awaitable, Callable, Deque, Dict, List, Optional, Sequence, TypeVar, Union)

from pyxl._log import get_logger, log_failure
from pyxl.backends.base import Cancellable
from pyxl.errors import (CallbackError, Cancelled, HelperDied, HelperExited, HelperFailed, HelperProtocolError,
                         MissingComplete, MissingRestoreResults, OperationError, PrecopyAborted,
                         StartupError, Timeout)
from pyxl.fdio import set_nonblocking
from pyxl.loop import Loop, default_loop
from pyxl.ops.future import LoopFuture
from pyxl.ops.helper_process import HelperProcess
from pyxl.ops.jobstats import JobStats, memory_of, snapshot, stream_offset
from pyxl.wire.codec import Complete, Log, Message, Progress, RestoreResults

__all__ = ["CallbackRequest", "Handler", "Operation", "PathOrFd", "ProgressEvent"]

T_co = TypeVar("T_co", covariant=True)

XCFLAGS_LIVE = 1
XCFLAGS_DEBUG = 2

#: Log context of pyxl's helper's precopy policy (its ERROR line when it aborts).
PRECOPY_LOG_CONTEXT = "pyxl-precopy"
#: At most one progress frame per this many ms from pyxl's helper (its
#: PYXL_PROGRESS_INTERVAL_MS; the first and last of each phase always come).
PROGRESS_INTERVAL_MS = 50
#: How many of the helper's ERROR lines an operation keeps (the first and the last ones).
HELPER_ERRORS = 8

# xentoollog level -> logging level.  The xentoollog-only levels get numbers
# between the standard ones so that filtering keeps their order.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG + 2, 3: logging.DEBUG + 5, 4: logging.INFO - 2,
           5: logging.INFO, 6: logging.INFO + 5, 7: logging.WARNING, 8: logging.ERROR,
           9: logging.CRITICAL}
for _xtl, _name in ((2, "VERBOSE"), (3, "DETAIL"), (4, "PROGRESS"), (6, "NOTICE")):
    logging.addLevelName(_LEVELS[_xtl], _name)

#: What a callback answers when its handler failed (libxc reads these as failure).
FAILURE_REPLY = {"suspend": 0, "postcopy": 0, "checkpoint": 0, "wait_checkpoint": 0,
                  "switch_qemu_logdirty": -1, "static_data_done": -1}

SAVE_CALLBACKS = ("suspend", "switch_qemu_logdirty")
RESTORE_CALLBACKS = ("static_data_done", "restore_results")
# Checkpointed (Remus) streams add these, as libxl does: save CBFLAGS 184, restore 800.
REMUS_SAVE_CALLBACKS = SAVE_CALLBACKS + ("postcopy", "checkpoint")
REMUS_RESTORE_CALLBACKS = RESTORE_CALLBACKS + ("checkpoint",)
STREAM_PLAIN, STREAM_REMUS = 0, 1

PathOrFd = Union[str, "os.PathLike[str]", int]
Handler = Callable[["CallbackRequest"], Union[int, bool, None, Awaitable[int]]]


def _exc_text(exc: BaseException) -> str:
    """An exception as the one line of a failure names it: its repr, bounded."""
    text = repr(exc)
    return text if len(text) <= 200 else text[:197] + "..."


@dataclass(frozen=True)
class ProgressEvent:
    """A ``progress`` message: ``phase`` is libxc's "doing what" text."""

    domid: int
    context: str
    phase: str
    done: int
    total: int
    iteration: Optional[int]  # N of "Frames iteration N", else None

    @property
    def fraction(self) -> Optional[float]:
        return self.done / self.total if self.total else None


class CallbackRequest:
    """A helper callback waiting for the toolstack's answer.

    A handler may return the answer (an int or bool), return an awaitable that
    produces it (asyncio), or return None and call :meth:`reply` later.
    """

    def __init__(self, op: "Operation[Any]", message: Message) -> None:
        self.op = op
        self.message = message
        self.answered = False

    @property
    def name(self) -> str:
        return self.message.NAME

    def reply(self, value: Union[int, bool]) -> None:
        if self.answered:
            raise RuntimeError(f"{self.name} already answered")
        answer = int(value)     # a value that is no number leaves it unanswered
        self.answered = True
        self.op._answer(self, answer)


class Operation(LoopFuture[T_co]):
    """One save or restore in progress; ``result()`` is a ``T_co``."""

    kind = "operation"
    #: A caller's fd made blocking, and its flags (set before __init__ by a
    #: restore, which opens its source first).
    _lent: Optional[int] = None

    def __init__(self, domid: int, loop: Optional[Loop], timeout: Optional[float],
                 callbacks: Optional[Dict[str, Handler]],
                 on_progress: Optional[Callable[[ProgressEvent], None]]) -> None:
        super().__init__()
        self.domid = domid
        self.loop: Loop = loop if loop is not None else default_loop()
        self.logger = get_logger(f"pyxl.domain.{domid}")
        self.callbacks: Dict[str, Handler] = dict(callbacks or {})
        self.helper: Optional[HelperProcess] = None
        #: The helper's ERROR lines: the first (the root cause, quoted in the
        #: error's message) and the last ones, at most HELPER_ERRORS in all.
        self.helper_errors: Deque[str] = collections.deque()
        self.started = time.monotonic()
        self.iterations = 0
        self._progress_cbs: List[Callable[[ProgressEvent], None]] = []
        self._on_progress = on_progress
        if on_progress is not None:
            self._progress_cbs.append(on_progress)
        self._failure: Optional[OperationError] = None  # decided before the helper exits
        self._app_failed = False     # a callback of the application's raised (CallbackError)
        self._timer: Optional[Cancellable] = None
        self._timer_due: Optional[float] = None     # when the timeout, once started, expires
        self._timeout = timeout
        self._pending: Optional[CallbackRequest] = None
        self._aux: List[Cancellable] = []
        self._last: Optional[ProgressEvent] = None
        # stats() once done: the stream's last offset, noted before pyxl closed
        # it (a closed fd has none), and the end, so that elapsed stops running
        self._final_bytes: Optional[int] = None
        self._ended: Optional[float] = None

    # -- future protocol (LoopFuture) and progress ------------------------

    def _what(self) -> str:
        return f"{self.kind} of domain {self.domid}"

    def stats(self) -> JobStats:
        """A live snapshot (virsh domjobinfo): phase, round, pages as libxc counts them,
        stream bytes so far, rate and time left (see :mod:`pyxl.ops.jobstats`)."""
        ev = self._last
        ended = self._ended if self._done else None
        return snapshot(ev.phase if ev else "", ev.iteration if ev else None,
                        ev.done if ev else 0, ev.total if ev else 0,
                        (time.monotonic() if ended is None else ended) - self.started,
                        self._stream_offset() if ended is None else self._final_bytes,
                        memory_of(getattr(self, "config", None)))

    def _stream_offset(self) -> Optional[int]:
        """Bytes the helper wrote to (save) or read from (restore) a file so far."""
        try:
            return stream_offset(getattr(self, "_fd", -1))
        except OSError:
            return None

    def _borrow_fd(self, fd: int) -> int:
        """A caller's fd, made blocking for the operation: the helper (or a zstd
        child) shares its open file description and does not retry EAGAIN, so
        an asyncio socket failed the operation.  Its flags go back at the end."""
        if set_nonblocking(fd, False) & os.O_NONBLOCK:
            self._lent = fd
        return fd

    def _give_back_fd(self) -> None:
        if self._lent is not None:
            fd, self._lent = self._lent, None
            try:
                set_nonblocking(fd, True)
            except OSError:     # the caller closed it already
                pass

    def _note_stream_end(self) -> None:
        """Before pyxl closes the stream's fd: keep its offset for stats()."""
        if getattr(self, "_fd", -1) >= 0:
            self._final_bytes = self._stream_offset()

    def add_progress_callback(self, fn: Callable[[ProgressEvent], None]) -> None:
        self._progress_cbs.append(fn)

    def cancel(self, grace: float = 5.0) -> bool:
        """Stop the operation: SIGTERM to the helper, SIGKILL after ``grace`` seconds."""
        if self._done:
            return False
        self._fail_soon(Cancelled(f"{self.kind} of domain {self.domid} cancelled", op=self,
                                  helper_errors=list(self.helper_errors)))
        if self.helper is not None:
            self.helper.terminate(grace)
        return True

    # -- machinery shared by save and restore -------------------------------

    def _start_timer(self) -> None:
        if self._timeout is not None:
            self._timer_due = time.monotonic() + self._timeout
            self._timer = self.loop.call_later(self._timeout, self._timed_out)

    def _timed_out(self) -> None:
        self._timer = None
        if self._done:
            return
        self._fail_soon(Timeout(f"{self.kind} of domain {self.domid} timed out after "
                                f"{self._timeout:g}s", op=self,
                                helper_errors=list(self.helper_errors)))
        if self.helper is not None and self.helper.running:
            self.helper.kill()
        else:
            self._conclude()

    def _fail_soon(self, exc: OperationError) -> None:
        """Record the failure; it is reported once the helper has been reaped."""
        if self._failure is None:
            self._failure = exc

    def _spawn(self, argv: List[str], mode: str, cbflags: int, pass_fds: Sequence[int],
               env: Optional[Dict[str, str]]) -> None:
        # pyxl's helper sends at most one progress frame per interval (plus each
        # phase's first and last): libxc reports every 1024 pfns, some 1,000
        # frames per save, which cost this loop ~12 ms of CPU to decode.  Xen's
        # helper ignores the variable.  A caller's own value stands.
        env = dict(os.environ if env is None else env)
        env.setdefault("PYXL_PROGRESS_INTERVAL_MS", str(PROGRESS_INTERVAL_MS))
        try:
            self.helper = HelperProcess(self.loop, argv, mode, cbflags, pass_fds,
                                        self._on_message, self._on_helper_exit, env=env)
        except OSError as exc:
            raise StartupError(f"cannot run helper {argv[0]}: {exc.strerror}") from exc
        self.logger.debug("helper starting: %s", " ".join(argv))
        self._start_timer()

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Log):
            # tagged: the CLI shows the helper's (libxc's) log only when asked (-v)
            self.logger.log(_LEVELS.get(msg.level, logging.INFO), "%s: %s", msg.context,
                            msg.formatted, extra={"pyxl_helper": True})
            if msg.level >= 8:
                if len(self.helper_errors) >= HELPER_ERRORS:
                    del self.helper_errors[1]      # the first stays: what went wrong first
                self.helper_errors.append(f"{msg.context}: {msg.formatted}")
        elif isinstance(msg, Progress):
            self._progress(msg)
        elif isinstance(msg, Complete):
            assert self.helper is not None
            self.helper.reply(0)
        elif isinstance(msg, RestoreResults):
            pass  # kept by the conversation
        elif msg.WAITS_FOR_REPLY:
            self._callback(msg)

    def _progress(self, msg: Progress) -> None:
        iteration = None
        if msg.doing_what.startswith("Frames iteration "):
            try:
                iteration = int(msg.doing_what.rsplit(" ", 1)[1])
            except ValueError:
                pass
            else:
                self.iterations = max(self.iterations, iteration + 1)
        event = ProgressEvent(self.domid, msg.context, msg.doing_what, msg.done, msg.total,
                              iteration)
        self._last = event
        if self._app_failed:
            return          # one raised: the helper is being killed
        for cb in self._progress_cbs:
            try:
                cb(event)
            except Exception as exc:  # the application's: it fails the operation, not the loop
                name = "on_progress" if cb is self._on_progress else "progress callback"
                self._callback_raised(name, exc, kill=True)
                return

    def _callback(self, msg: Message) -> None:
        req = CallbackRequest(self, msg)
        self._pending = req
        if self._app_failed:
            # the operation fails already (a callback raised): nothing more is
            # asked of the guest or the application
            req.reply(FAILURE_REPLY.get(msg.NAME, -1))
            return
        own = self.callbacks.get(msg.NAME)
        handler = own or self._default_handler(msg.NAME)
        try:
            answer = handler(req)
        except Exception as exc:  # a toolstack handler bug must not wedge the helper
            if own is None:   # pyxl's handler: its backend's call raised (or pyxl's bug)
                self._step_raised(msg.NAME, exc)
            else:
                self._callback_raised(f"{msg.NAME} handler", exc)
            if not req.answered:
                req.reply(FAILURE_REPLY.get(msg.NAME, -1))
            return
        if answer is None or req.answered:
            return
        if inspect.isawaitable(answer):
            self._await_answer(req, answer)
        else:
            self._handler_answered(req, answer)

    def _handler_answered(self, req: CallbackRequest, answer: Any) -> None:
        """A handler's answer, which must be a number: anything else is as if
        it had raised (the helper is answered with failure, never left waiting)."""
        try:
            value = int(answer)
        except (TypeError, ValueError, OverflowError):
            self._callback_raised(f"{req.name} handler", TypeError(
                f"it answered a {type(answer).__name__}, not a number"))
            req.reply(FAILURE_REPLY.get(req.name, -1))
            return
        req.reply(value)

    def _await_answer(self, req: CallbackRequest, aw: Awaitable[int]) -> None:
        import asyncio
        task = asyncio.ensure_future(aw)

        def done(t: "asyncio.Future[int]") -> None:
            if req.answered:
                return
            if t.cancelled() or t.exception() is not None:
                exc = asyncio.CancelledError() if t.cancelled() else t.exception()
                assert exc is not None
                self._callback_raised(f"{req.name} handler", exc)
                req.reply(FAILURE_REPLY.get(req.name, -1))
            else:
                self._handler_answered(req, t.result())

        task.add_done_callback(done)

    def _callback_raised(self, what: str, exc: BaseException,
                         kill: bool = False) -> Optional[OperationError]:
        """A callback of the application's (``what``) raised ``exc``: the
        operation fails with a :class:`CallbackError` caused by it (a handler
        is then answered with failure; ``kill``: the helper is killed, for a
        callback that nothing answers)."""
        self.logger.error("%s raised %r", what, exc)
        if self._done:
            return None
        first = not self._app_failed
        self._app_failed = True
        err = CallbackError(f"{self.kind} of domain {self.domid} failed: the application's "
                            f"{what} raised {_exc_text(exc)}", what, op=self)
        err.__cause__ = exc
        self._fail_soon(err)
        if first and self._failure is err:
            self._handler_failed(what, err)
        if kill and self.helper is not None and self.helper.running:
            self.helper.kill()
        return self._failure

    def _step_raised(self, name: str, exc: BaseException) -> None:
        """pyxl's own handler of the helper's ``name`` raised: the backend's
        call in it did (a backend is any toolstack's code), not a callback of
        the application's.  The operation fails with an :class:`OperationError`
        caused by it; the handler is answered with failure."""
        self.logger.error("answering the helper's %s: %r", name, exc)
        if self._done:
            return
        err = OperationError(f"{self.kind} of domain {self.domid} failed: answering the "
                             f"helper's {name} raised {_exc_text(exc)}", op=self)
        err.__cause__ = exc
        self._fail_soon(err)
        if self._failure is err:
            self._handler_failed(f"{name} handler", err)

    def _handler_failed(self, what: str, err: OperationError) -> None:
        """Hook: the operation fails with ``err`` because the handler or callback
        ``what`` raised (a save notes the guest's state)."""

    def _answer(self, req: CallbackRequest, value: int) -> None:
        if req is not self._pending or self.helper is None:
            return
        self._pending = None
        if not self.helper.running:
            self._answered_late(req, value)  # the helper went away meanwhile
            return
        self._answered(req, value)
        if self.helper.awaiting is not None:
            self.helper.reply(value)

    def _answered(self, req: CallbackRequest, value: int) -> None:
        """Hook: a callback was answered with ``value``."""

    def _answered_late(self, req: CallbackRequest, value: int) -> None:
        """Hook: a callback was answered after the helper had gone (the operation failed)."""

    def _default_handler(self, name: str) -> Handler:
        return lambda req: FAILURE_REPLY.get(name, -1)

    def _on_helper_exit(self, helper: HelperProcess) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for t in self._aux:
            t.cancel()
        self._conclude()

    def _helper_outcome(self) -> Optional[OperationError]:
        """libxl's helper_exited rules, plus our protocol strictness."""
        h = self.helper
        assert h is not None and h.wait_status is not None
        errs = list(self.helper_errors)
        what = f"{self.kind} helper for domain {self.domid} [{h.pid}]"
        if self._failure is not None:
            return self._failure
        if h.start_error is not None:
            return StartupError(f"cannot run helper {h.argv[0]}: {h.start_error.strerror}",
                                op=self)
        if h.protocol_error is not None:
            return HelperProtocolError(f"{what} broke the protocol: {h.protocol_error}",
                                       h.protocol_error, op=self, helper_errors=errs)
        st = h.wait_status
        if h.status_unknown and h.complete is None:
            return HelperExited(f"{what} ended without signaling completion, and its exit "
                                "status is lost (it was reaped elsewhere: is SIGCHLD ignored?)",
                                -1, op=self, helper_errors=errs)
        if os.WIFSIGNALED(st):
            sig = os.WTERMSIG(st)
            return HelperDied(f"{what} died due to fatal signal {signal.Signals(sig).name}",
                              sig, op=self, helper_errors=errs)
        code = os.waitstatus_to_exitcode(st)
        if code != 0:
            why = {255: " (start-up failed)", 254: " (reply pipe closed or interrupted)"}
            return HelperExited(f"{what} exited with error status {code}{why.get(code, '')}",
                                code, op=self, helper_errors=errs)
        if self.kind == "restore" and h.results is None:
            return MissingRestoreResults(f"{what} exited without providing results",
                                         op=self, helper_errors=errs)
        if h.complete is None:
            return MissingComplete(f"{what} exited without signaling completion",
                                   op=self, helper_errors=errs)
        if h.complete.retval != 0:
            # pyxl's helper names a precopy policy that gave up (PYXL_PRECOPY=downtime).
            precopy = [e for e in errs if e.startswith(PRECOPY_LOG_CONTEXT + ": ")]
            if precopy:
                return PrecopyAborted(f"live {self.kind} of domain {self.domid} aborted: "
                                      f"{precopy[-1].split(': ', 1)[1]}", h.complete.retval,
                                      h.complete.errnoval, op=self, helper_errors=errs)
            return HelperFailed(f"{self.kind} of domain {self.domid} failed", h.complete.retval,
                                h.complete.errnoval, op=self, helper_errors=errs)
        return None

    def _conclude(self) -> None:
        raise NotImplementedError

    def _finish(self, result: Any = None, exc: Optional[OperationError] = None) -> None:
        if not self._done:
            self._note_stream_end()     # a given fd stays open, and may move on
            self._give_back_fd()
            duration = getattr(result, "duration", None)
            self._ended = (self.started + duration if isinstance(duration, float)
                           else time.monotonic())
        if not self._done and exc is not None:
            log_failure(self.logger, exc)
        self._set_outcome(result, exc)
