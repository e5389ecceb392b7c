"""Save and restore operations: the part of libxl's domain save/restore that
surrounds the helper, as objects an event loop drives.

An :class:`Operation` is future-like: ``done()``, ``result()``, ``exception()``,
``add_done_callback()``, ``cancel()``, and ``await op`` under asyncio.  It
starts at once (files opened, headers written, helper spawned) and then makes
progress only when its loop dispatches events, so one thread can run many.
"""

from __future__ import annotations

import collections
import fcntl
import inspect
import logging
import os
import signal
import stat
import time
from dataclasses import dataclass, field
from typing import (Any, Awaitable, Callable, Deque, Dict, List, Optional,
                    Sequence, Tuple, Union)

from pyxl.stream import framing as stream_common

from pyxl.stream import libxc as stream_libxc

from pyxl.stream import libxl as stream_libxl

from pyxl.stream import xl as stream_xl
from pyxl._paths import helper_path
from pyxl.backends import Backend, SimBackend, default_backend
from pyxl.errors import (Cancelled, HelperDied, HelperExited, HelperFailed, HelperProtocolError,
                     MissingComplete, MissingRestoreResults, OperationError, PrecopyAborted,
                     StartupError, Timeout)
from pyxl.ops.future import LoopFuture
from pyxl.ops.helper_process import HelperProcess, restore_argv, save_argv
from pyxl.fdio import is_regular, write_all, write_from_loop
from pyxl.loop import Loop, Timer, default_loop
from pyxl.stream.libxl import LibxlRecordType as RecordType
from pyxl.wire.codec import (Complete, Log, Message, Progress, RestoreResults, Suspend,
                             SwitchQemuLogdirty, cbflags_for)

__all__ = ["CallbackRequest", "Operation", "ProgressEvent", "RestoreOperation", "RestoreResult",
           "SaveOperation", "SaveResult", "restore", "save", "wait"]

XCFLAGS_LIVE = 1
XCFLAGS_DEBUG = 2

#: Log context of pyxl's helper's precopy policy (its ERROR line when it aborts).
PRECOPY_LOG_CONTEXT = "pyxl-precopy"

# xentoollog level -> logging level.  The xentoollog-only levels get numbers
# between the standard ones so that filtering keeps their order.
_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG + 2, 3: logging.DEBUG + 5, 4: logging.INFO - 2,
           5: logging.INFO, 6: logging.INFO + 5, 7: logging.WARNING, 8: logging.ERROR,
           9: logging.CRITICAL}
for _xtl, _name in ((2, "VERBOSE"), (3, "DETAIL"), (4, "PROGRESS"), (6, "NOTICE")):
    logging.addLevelName(_LEVELS[_xtl], _name)

#: What a callback answers when its handler failed (libxc reads these as failure).
_FAILURE_REPLY = {"suspend": 0, "postcopy": 0, "checkpoint": 0, "wait_checkpoint": 0,
                  "switch_qemu_logdirty": -1, "static_data_done": -1}

SAVE_CALLBACKS = ("suspend", "switch_qemu_logdirty")
RESTORE_CALLBACKS = ("static_data_done", "restore_results")
# Checkpointed (Remus) streams add these, as libxl does: save CBFLAGS 184, restore 800.
REMUS_SAVE_CALLBACKS = SAVE_CALLBACKS + ("postcopy", "checkpoint")
REMUS_RESTORE_CALLBACKS = RESTORE_CALLBACKS + ("checkpoint",)
STREAM_PLAIN, STREAM_REMUS = 0, 1

PathOrFd = Union[str, "os.PathLike[str]", int]
Handler = Callable[["CallbackRequest"], Union[int, bool, None, Awaitable[int]]]


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


@dataclass
class SaveResult:
    domid: int
    path: Optional[str]
    bytes_written: Optional[int]
    duration: float
    iterations: int
    downtime: Optional[float]  # suspend reply -> end of stream (seconds)
    retval: int = 0
    errnoval: int = 0
    checkpoints: int = 0       # Remus: checkpoints sent


@dataclass
class RestoreResult:
    domid: int
    store_gfn: int
    console_gfn: int
    config: Dict[str, Any]
    duration: float
    retval: int = 0
    errnoval: int = 0
    emulator_records: List[Tuple[int, bytes]] = field(default_factory=list)
    checkpoints: int = 0       # Remus: checkpoints received
    failover: bool = False     # Remus: the stream ended without END (restored at the last one)


class CallbackRequest:
    """A helper callback waiting for the toolstack's answer.

    A handler may return the answer (an int or bool), return an awaitable that
    produces it (asyncio), or return None and call :meth:`reply` later.
    """

    def __init__(self, op: "Operation", message: Message) -> None:
        self.op = op
        self.message = message
        self.answered = False

    @property
    def name(self) -> str:
        return self.message.NAME

    def reply(self, value: Union[int, bool]) -> None:
        if self.answered:
            raise RuntimeError(f"{self.name} already answered")
        self.answered = True
        self.op._answer(self, int(value))


class Operation(LoopFuture):
    """One save or restore in progress."""

    kind = "operation"

    def __init__(self, domid: int, loop: Optional[Loop], timeout: Optional[float],
                 callbacks: Optional[Dict[str, Handler]],
                 on_progress: Optional[Callable[[ProgressEvent], None]]) -> None:
        super().__init__()
        self.domid = domid
        self.loop: Loop = loop if loop is not None else default_loop()
        self.logger = logging.getLogger(f"pyxl.domain.{domid}")
        self.callbacks: Dict[str, Handler] = dict(callbacks or {})
        self.helper: Optional[HelperProcess] = None
        self.helper_errors: Deque[str] = collections.deque(maxlen=8)
        self.started = time.monotonic()
        self.iterations = 0
        self._progress_cbs: List[Callable[[ProgressEvent], None]] = []
        if on_progress is not None:
            self._progress_cbs.append(on_progress)
        self._failure: Optional[OperationError] = None  # decided before the helper exits
        self._timer: Optional[Timer] = None
        self._timeout = timeout
        self._pending: Optional[CallbackRequest] = None
        self._aux: List[Timer] = []

    # -- future protocol (LoopFuture) and progress ------------------------

    def _what(self) -> str:
        return f"{self.kind} of domain {self.domid}"

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
        try:
            self.helper = HelperProcess(self.loop, argv, mode, cbflags, pass_fds,
                                        self._on_message, self._on_helper_exit, env=env)
        except OSError as exc:
            raise StartupError(f"cannot run helper {argv[0]}: {exc.strerror}") from exc
        self.logger.debug("helper [%d] started: %s", self.helper.pid, " ".join(argv))
        self._start_timer()

    def _on_message(self, msg: Message) -> None:
        if isinstance(msg, Log):
            self.logger.log(_LEVELS.get(msg.level, logging.INFO), "%s: %s", msg.context,
                            msg.formatted)
            if msg.level >= 8:
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
        for cb in self._progress_cbs:
            cb(event)

    def _callback(self, msg: Message) -> None:
        req = CallbackRequest(self, msg)
        self._pending = req
        handler = self.callbacks.get(msg.NAME) or self._default_handler(msg.NAME)
        try:
            answer = handler(req)
        except Exception as exc:  # a toolstack handler bug must not wedge the helper
            self.logger.error("%s handler raised %r", msg.NAME, exc)
            if not req.answered:
                req.reply(_FAILURE_REPLY.get(msg.NAME, -1))
            return
        if answer is None or req.answered:
            return
        if inspect.isawaitable(answer):
            self._await_answer(req, answer)
        else:
            req.reply(int(answer))

    def _await_answer(self, req: CallbackRequest, aw: Awaitable[int]) -> None:
        import asyncio
        task = asyncio.ensure_future(aw)

        def done(t: "asyncio.Future[int]") -> None:
            if req.answered:
                return
            if t.cancelled() or t.exception() is not None:
                self.logger.error("%s handler failed: %r", req.name,
                                  None if t.cancelled() else t.exception())
                req.reply(_FAILURE_REPLY.get(req.name, -1))
            else:
                req.reply(int(t.result()))

        task.add_done_callback(done)

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
        return lambda req: _FAILURE_REPLY.get(name, -1)

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
        if h.protocol_error is not None:
            return HelperProtocolError(f"{what} broke the protocol: {h.protocol_error}",
                                       h.protocol_error, op=self, helper_errors=errs)
        st = h.wait_status
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
        if not self._done and exc is not None:
            self.logger.error("%s", exc)
        self._set_outcome(result, exc)




class SaveOperation(Operation):
    kind = "save"

    def __init__(self, domid: int, target: PathOrFd, *, live: bool = False,
                 leave: str = "destroy", helper: Optional[str] = None,
                 timeout: Optional[float] = None, loop: Optional[Loop] = None,
                 callbacks: Optional[Dict[str, Handler]] = None,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 on_resume: Optional[Callable[[int], None]] = None,
                 backend: Optional[Backend] = None, sim_dir: Optional[str] = None,
                 suspend_timeout: float = 30.0, debug: bool = False, fsync: bool = True,
                 config: Optional[Dict[str, Any]] = None,
                 emulator_records: Optional[Sequence[Tuple[int, bytes]]] = None,
                 helper_env: Optional[Dict[str, str]] = None,
                 write_trailer: Optional[Callable[[bytes], None]] = None,
                 stream_type: int = STREAM_PLAIN, checkpoints: Optional[int] = None,
                 checkpoint_interval: float = 0.1) -> None:
        """``helper_env``: extra environment variables for the helper (e.g. the
        precopy policy's PYXL_PRECOPY & co.).  ``write_trailer``: for an fd the
        caller drains asynchronously (a relay pipe), called with the libxl
        records that end the stream instead of writing them to the fd, so a
        full pipe never blocks the loop.

        ``stream_type=STREAM_REMUS`` (1): a checkpointed stream (libxl's Remus;
        use it with ``live=True``).  After each checkpoint the default
        ``postcopy`` handler writes libxl's checkpoint records (the emulator
        records, CHECKPOINT_END) and resumes the guest; the default
        ``checkpoint`` handler waits ``checkpoint_interval`` seconds and asks
        for another checkpoint until ``checkpoints`` were taken (None: until
        cancelled), then ends the stream gracefully.  After the last of
        ``checkpoints`` the guest is not resumed: the stream ends with the guest
        as it is, and ``leave`` applies as for a save.  (A ``checkpoint``
        handler of yours that ends the stream early leaves it running.)"""
        if leave not in ("destroy", "paused", "running"):
            raise ValueError(f"leave must be 'destroy', 'paused' or 'running', not {leave!r}")
        super().__init__(domid, loop, timeout, callbacks, on_progress)
        self.backend = backend or default_backend(sim_dir)
        self.live, self.leave = live, leave
        self.on_resume = on_resume
        self.suspend_timeout = suspend_timeout
        self.fsync = fsync
        self.emulator_records = list(emulator_records or ())
        # Without records of the caller's, the backend's device model supplies them.
        self._dm_from_backend = emulator_records is None
        self.write_trailer = write_trailer
        if stream_type not in (STREAM_PLAIN, STREAM_REMUS):
            raise ValueError(f"stream_type must be 0 (plain) or 1 (Remus), not {stream_type}")
        self.stream_type = stream_type
        self.max_checkpoints = checkpoints
        self.checkpoint_interval = checkpoint_interval
        self.checkpoints = 0
        self.suspended = False
        self.suspended_at: Optional[float] = None
        self._suspend_cancel: Optional[Timer] = None
        self._held: Optional[OperationError] = None  # failure waiting for a suspend in flight
        self.path: Optional[str] = None
        self._tmp: Optional[str] = None
        self._fd = -1
        self._own_fd = False

        self.backend.check_domain(domid)
        if config is None:
            config = self.backend.domain_config(domid)
        self.config = config
        if isinstance(target, int):
            self._fd = target
        else:
            self.path = os.fspath(target)
            self._open_temp()
        try:
            write_all(self._fd, stream_xl.xl_header(config) + stream_libxl.libxl_header()
                       + stream_libxl.libxc_context_record())
            cbflags = cbflags_for(REMUS_SAVE_CALLBACKS if stream_type else SAVE_CALLBACKS)
            xcflags = (XCFLAGS_LIVE if live else 0) | (XCFLAGS_DEBUG if debug else 0)
            io_fd = self._fd if self._fd > 2 else self._dup_high(self._fd)
            # libxl passes a dup of its own stdin as BACK_FD (zero-initialised
            # state); it is only read for COLO streams, so we pass -1.
            argv = save_argv(helper_path(helper), io_fd, -1, domid, xcflags, cbflags,
                             stream_type)
            try:
                env = self.backend.helper_env()
                env.update(helper_env or {})
                self._spawn(argv, "save", cbflags, [io_fd], env)
            finally:
                if io_fd != self._fd:
                    os.close(io_fd)
        except BaseException as exc:
            self._discard()
            if isinstance(exc, OSError):
                raise StartupError(f"cannot write save stream: {exc.strerror}") from exc
            raise

    @staticmethod
    def _dup_high(fd: int) -> int:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)

    def _open_temp(self) -> None:
        assert self.path is not None
        d = os.path.dirname(os.path.abspath(self.path))
        base = os.path.basename(self.path)
        if os.path.isdir(self.path):
            raise StartupError(f"{self.path}: is a directory")
        for i in range(100):
            tmp = os.path.join(d, f".{base}.pyxl-{os.getpid()}-{i}.tmp")
            try:
                self._fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            except OSError as exc:
                raise StartupError(f"cannot create {tmp}: {exc.strerror}") from exc
            self._tmp = tmp
            self._own_fd = True
            return
        raise StartupError(f"cannot create a temporary file next to {self.path}")

    def _discard(self) -> None:
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        if self._tmp is not None:
            try:
                os.unlink(self._tmp)
            except FileNotFoundError:
                pass
            self._tmp = None

    def _default_handler(self, name: str) -> Handler:
        if name == "suspend":
            return self._default_suspend
        if name == "switch_qemu_logdirty":
            return self._default_logdirty
        if name == "postcopy":
            return self._default_postcopy
        if name == "checkpoint":
            return self._default_checkpoint
        return super()._default_handler(name)

    def _default_logdirty(self, req: CallbackRequest) -> None:
        """libxc asks the device model to track (or stop tracking) the pages it
        writes; the backend knows the device model.  Answers 0 or -1, as libxl."""
        assert isinstance(req.message, SwitchQemuLogdirty)
        enable = bool(req.message.enable)

        def done(ok: bool, why: str) -> None:
            if not ok:
                self.logger.error("log-dirty %s for domain %d's device model failed: %s",
                                  "on" if enable else "off", self.domid, why)
            if not req.answered:
                req.reply(0 if ok else -1)

        self._aux.append(self.backend.start_logdirty(self.loop, self.domid, enable, done))

    def _default_postcopy(self, req: CallbackRequest) -> None:
        """Remus, after a checkpoint's libxc records: libxl's records for it,
        then the guest runs again until the next checkpoint."""
        records = b"".join(stream_libxl.libxl_record(rtype, body)
                           for rtype, body in self.emulator_records)
        records += stream_libxl.checkpoint_end_record()

        def written(err: Optional[OSError]) -> None:
            if err is not None:
                self.logger.error("writing checkpoint records failed: %s", err.strerror)
                req.reply(0)
                return
            self.checkpoints += 1
            if self.max_checkpoints is not None and self.checkpoints >= self.max_checkpoints:
                # The last one: the guest stays suspended, so that the stream
                # ends with the guest as it is (``leave`` applies, as for a save).
                req.reply(1)
                return
            try:
                self.backend.resume(self.domid)
            except Exception as exc:
                self.logger.error("could not resume domain %d after checkpoint %d: %s",
                                  self.domid, self.checkpoints, exc)
                req.reply(0)
                return
            self.suspended = False
            req.reply(1)

        # The helper waits for this answer, so the fd is ours for the moment.
        write_from_loop(self.loop, self._fd, records, written)

    def _default_checkpoint(self, req: CallbackRequest) -> None:
        """Remus: another checkpoint after the interval, until enough were taken."""
        more = self.max_checkpoints is None or self.checkpoints < self.max_checkpoints
        if not more:
            return req.reply(0)   # a graceful end of the stream
        self._aux.append(self.loop.call_later(self.checkpoint_interval,
                                              lambda: req.reply(1) if not req.answered else None))
        return None

    def _default_suspend(self, req: CallbackRequest) -> None:
        def done(ok: bool, why: str) -> None:
            self._suspend_cancel = None
            if not ok:
                self.logger.error("suspend of domain %d failed: %s", self.domid, why)
                self._suspend_failed = why
            if self._held is not None:
                # The helper died while the guest was suspending; the failure
                # waited for the suspend to land so the guest can be resumed.
                exc, self._held = self._held, None
                if ok:
                    self._resume_after_failure()
                self._finish(exc=exc)
            elif not req.answered:
                req.reply(1 if ok else 0)

        # Not in self._aux: if the helper dies meanwhile, the suspend goes on
        # (the guest was asked already) and _conclude waits for it.
        self._suspend_cancel = self.backend.start_suspend(self.loop, self.domid,
                                                          self.suspend_timeout, done)

    def _finish(self, result: Any = None, exc: Optional[OperationError] = None) -> None:
        why = getattr(self, "_suspend_failed", None)
        if exc is not None and why and why not in str(exc):
            # The helper's failure is only the consequence ("Save failed"):
            # say why first, e.g. a guest that did not answer the request.
            exc.args = (f"the guest did not suspend: {why}; {exc.args[0] if exc.args else exc}",
                        ) + tuple(exc.args[1:])
        super()._finish(result, exc)

    def _answered(self, req: CallbackRequest, value: int) -> None:
        if isinstance(req.message, Suspend) and value:
            self.suspended = True
            self.suspended_at = time.monotonic()
            if self._dm_from_backend:
                # The guest is stopped: so is its device model's state (libxl saves
                # it here too, once per checkpoint for Remus).
                try:
                    self.emulator_records = self.backend.save_device_model(self.domid)
                except Exception as exc:  # a backend is the caller's code (any toolstack's)
                    self._fail_soon(OperationError(
                        f"saving domain {self.domid}'s device model failed: {exc}", op=self))

    def _answered_late(self, req: CallbackRequest, value: int) -> None:
        if isinstance(req.message, Suspend) and value:
            # A toolstack's suspend handler finished after the save had failed:
            # its guest is suspended now, and nobody else will resume it.
            self._resume_after_failure()

    def _conclude(self) -> None:
        exc = self._helper_outcome() if self.helper is not None else self._failure
        if exc is None:
            try:
                result = self._complete_stream()
            except OSError as err:
                exc = OperationError(f"writing the end of the save stream failed: {err.strerror}",
                                     op=self)
            else:
                self._finish(result)
                return
        self._discard()
        assert exc is not None
        if self._suspend_cancel is not None:
            self._held = exc  # a suspend is on its way: finish once it has landed
            return
        if self.suspended:
            self._resume_after_failure()
        self._finish(exc=exc)

    def _complete_stream(self) -> SaveResult:
        end = time.monotonic()
        if self.stream_type == STREAM_REMUS:
            # libxc 4.17 ends a checkpointed stream after the last CHECKPOINT
            # (its emulator records went with each one): add the libxc END it
            # omits, so the receiver's libxc completes on it, then libxl's END.
            trailer = stream_libxc.end_record() + stream_libxl.end_record()
        else:
            trailer = b"".join(stream_libxl.libxl_record(rtype, body)
                               for rtype, body in self.emulator_records)
            trailer += stream_libxl.end_record()
        if self.write_trailer is not None:
            self.write_trailer(trailer)
        else:
            # The helper has exited, so nobody else writes to this description.
            write_all(self._fd, trailer)
        size = None
        if self._own_fd:
            size = os.fstat(self._fd).st_size
            if self.fsync:
                os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1
            assert self._tmp is not None and self.path is not None
            os.rename(self._tmp, self.path)
            self._tmp = None
            if self.fsync:
                dfd = os.open(os.path.dirname(os.path.abspath(self.path)), os.O_RDONLY)
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
        self._leave_domain()
        return SaveResult(self.domid, self.path, size, end - self.started, self.iterations,
                          None if self.suspended_at is None else end - self.suspended_at,
                          checkpoints=self.checkpoints)

    def _leave_domain(self) -> None:
        try:
            if self.leave == "destroy":
                self.backend.destroy(self.domid)
            elif self.leave == "running":
                self.backend.resume(self.domid)
            elif not self.suspended:
                self.backend.pause(self.domid)   # Remus: it ran on after the last checkpoint
            else:
                # xl save -p: pause first, so the guest never runs between
                # the suspend and the pause.
                self.backend.pause(self.domid)
                self.backend.resume(self.domid)
        except Exception as exc:  # the image is safe; report, don't lose it
            self.logger.error("saved domain %d, but could not leave it %s: %s", self.domid,
                              self.leave, exc)

    def _resume_after_failure(self) -> None:
        try:
            if self.on_resume is not None:
                self.on_resume(self.domid)
            else:
                self.backend.resume(self.domid)
        except Exception as exc:
            self.logger.error("could not resume domain %d after the failed save: %s",
                              self.domid, exc)


class RestoreOperation(Operation):
    kind = "restore"

    def __init__(self, source: PathOrFd, *, paused: bool = False, helper: Optional[str] = None,
                 timeout: Optional[float] = None, loop: Optional[Loop] = None,
                 callbacks: Optional[Dict[str, Handler]] = None,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 backend: Optional[Backend] = None, sim_dir: Optional[str] = None,
                 stream_type: int = STREAM_PLAIN, name: Optional[str] = None) -> None:
        """``name``: the new domain's name instead of the saved config's (a
        migration receiver's ``NAME--incoming``).

        ``stream_type=STREAM_REMUS`` (1): a checkpointed stream.  At each
        checkpoint the default ``checkpoint`` handler reads libxl's records up to
        CHECKPOINT_END (collected in ``emulator_records``) and lets libxc go on;
        libxc applies each checkpoint when the next one is complete.  A stream
        that ends after a complete checkpoint without END (the sender died) is
        a failover: the domain is restored at its last checkpoint."""
        if stream_type not in (STREAM_PLAIN, STREAM_REMUS):
            raise ValueError(f"stream_type must be 0 (plain) or 1 (Remus), not {stream_type}")
        self.stream_type = stream_type
        self.checkpoints = 0
        self.failed_over = False
        self.checkpoint_records: List[Tuple[int, bytes]] = []
        self.backend = backend or default_backend(sim_dir)
        self.paused = paused
        self.path: Optional[str] = None
        own = not isinstance(source, int)
        if isinstance(source, int):
            fd = source
        else:
            self.path = os.fspath(source)
            if os.path.isdir(self.path):
                raise StartupError(f"{self.path}: is a directory")
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as exc:
                raise StartupError(f"cannot open {self.path}: {exc.strerror}") from exc
        self._fd, self._own_fd = fd, own
        self._trailer: Optional[_TrailerReader] = None
        try:
            header = stream_xl.read_xl_header(fd)
            if header.config is None:
                raise StartupError(f"{self.path or 'stream'}: the xl header carries no domain "
                                   "config to build the new domain from")
            self.config: Dict[str, Any] = header.config
            if name is not None:
                c_info = self.config.get("c_info")
                self.config["c_info"] = dict(c_info if isinstance(c_info, dict) else {}, name=name)
            stream_libxl.read_libxl_header(fd)
            rtype, length = stream_libxl.read_libxl_record_header(fd)
            if rtype != RecordType.LIBXC_CONTEXT or length != 0:
                raise StartupError(f"libxl stream starts with record {rtype:#x} "
                                   f"(length {length}), not an empty LIBXC_CONTEXT")
        except (ValueError, OSError, StartupError) as exc:
            self._close()
            if isinstance(exc, StartupError):
                raise
            raise StartupError(f"{self.path or 'stream'}: {exc}") from exc
        try:
            domid = self.backend.create_restore_target(self.config)
        except BaseException:
            self._close()
            raise
        super().__init__(domid, loop, timeout, callbacks, on_progress)
        try:
            cbflags = cbflags_for(REMUS_RESTORE_CALLBACKS if stream_type else RESTORE_CALLBACKS)
            io_fd = fd if fd > 2 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
            # Event channels (store port, store domain, console port, console
            # domain), as the backend allocated them for the new domain.
            store_port, store_dom, console_port, console_dom = self.backend.restore_ports(domid)
            argv = restore_argv(helper_path(helper), io_fd, -1, domid, store_port, store_dom,
                                console_port, console_dom, cbflags, stream_type)
            try:
                self._spawn(argv, "restore", cbflags, [io_fd], self.backend.helper_env())
            finally:
                if io_fd != fd:
                    os.close(io_fd)
        except BaseException:
            self._close()
            self._destroy_target()
            raise

    def _close(self) -> None:
        if self._own_fd and self._fd >= 0:
            os.close(self._fd)
        self._fd = -1

    def _destroy_target(self) -> None:
        try:
            self.backend.destroy(self.domid)
        except Exception as exc:
            self.logger.error("could not destroy half-restored domain %d: %s", self.domid, exc)

    def _default_checkpoint(self, req: CallbackRequest) -> None:
        """libxc read a CHECKPOINT: read libxl's records of that checkpoint (the
        helper waits for our answer, so the fd is ours meanwhile), then go on."""
        def read(records: List[Tuple[int, bytes]], err: Optional[Exception]) -> None:
            if err is not None:
                self.logger.error("checkpoint %d: reading libxl's records failed: %s",
                                  self.checkpoints + 1, err)
                req.reply(0)   # XGR_CHECKPOINT_ERROR
                return
            self.checkpoints += 1
            self.checkpoint_records = records
            req.reply(1)       # XGR_CHECKPOINT_SUCCESS

        if is_regular(self._fd):
            try:
                records = _read_records(self._fd, RecordType.CHECKPOINT_END)
            except (ValueError, OSError) as exc:
                read([], exc)
            else:
                read(records, None)
            return
        self._aux.append(_TrailerReader(self.loop, self._fd, read,
                                        end=RecordType.CHECKPOINT_END))

    def _default_handler(self, name: str) -> Handler:
        if name == "checkpoint" and self.stream_type == STREAM_REMUS:
            return self._default_checkpoint
        if name == "static_data_done":
            # missing CPUID/MSR policy (v2 streams) would be rebuilt the legacy
            # way by libxl; the simulated domain keeps its default policy.
            return lambda req: 0
        return super()._default_handler(name)

    def _conclude(self) -> None:
        exc = self._helper_outcome() if self.helper is not None else self._failure
        records: List[Tuple[int, bytes]] = []
        if exc is None and not is_regular(self._fd):
            # A pipe or socket (migration): the records after the libxc stream
            # may still be on their way.  Read them as they arrive, not blocking
            # the loop; the helper has exited, so the fd is ours alone.
            self._trailer = _TrailerReader(self.loop, self._fd, self._trailer_read)
            if self._timeout is not None:
                left = max(0.0, self._timeout - (time.monotonic() - self.started))
                self._aux.append(self.loop.call_later(left, self._trailer_timed_out))
            return
        if exc is None:
            try:
                records = self._read_trailer()
            except (ValueError, OSError) as err:
                exc = OperationError(f"{self.path or 'stream'}: after the libxc stream: {err}",
                                     op=self)
        self._finish_restore(records, exc)

    def _trailer_read(self, records: List[Tuple[int, bytes]],
                      err: Optional[Exception]) -> None:
        self._trailer = None
        if isinstance(err, stream_common.TruncatedStream) and self._failover():
            records, err = list(self.checkpoint_records), None
        for t in self._aux:
            t.cancel()
        exc: Optional[OperationError] = None
        if self._failure is not None:
            exc = self._failure
        elif err is not None:
            exc = OperationError(f"{self.path or 'stream'}: after the libxc stream: {err}",
                                 op=self)
        self._finish_restore(records, exc)

    def _stop_trailer(self, exc: OperationError) -> None:
        if self._trailer is not None:
            self._fail_soon(exc)
            self._trailer.stop()

    def _trailer_timed_out(self) -> None:
        self._stop_trailer(Timeout(f"{self.kind} of domain {self.domid} timed out after "
                                   f"{self._timeout:g}s waiting for the end of the stream",
                                   op=self))

    def cancel(self, grace: float = 5.0) -> bool:
        if self._trailer is not None and not self._done:
            self._stop_trailer(Cancelled(f"{self.kind} of domain {self.domid} cancelled",
                                         op=self))
            return True
        return super().cancel(grace)

    def _finish_restore(self, records: List[Tuple[int, bytes]],
                        exc: Optional[OperationError]) -> None:
        self._close()
        if exc is not None:
            self._destroy_target()
            self._finish(exc=exc)
            return
        assert self.helper is not None and self.helper.results is not None
        try:
            # The device model takes its saved state, then the backend finishes
            # the domain (a real host: XenStore nodes, introduction to xenstored
            # with the restored store page).
            self.backend.restore_device_model(self.domid, records)
            self.backend.restore_done(self.domid, self.helper.results.store_gfn,
                                      self.helper.results.console_gfn)
            if not self.paused:
                self.backend.unpause(self.domid)
        except Exception as err:
            self._destroy_target()
            self._finish(exc=OperationError(f"restored domain {self.domid} would not start: {err}",
                                            op=self))
            return
        assert self.helper is not None and self.helper.results is not None
        res = self.helper.results
        self._finish(RestoreResult(self.domid, res.store_gfn, res.console_gfn, self.config,
                                   time.monotonic() - self.started, emulator_records=records,
                                   checkpoints=self.checkpoints, failover=self.failed_over))

    def _read_trailer(self) -> List[Tuple[int, bytes]]:
        """libxl records after the libxc stream, up to END."""
        try:
            return _read_records(self._fd, RecordType.END)
        except stream_common.TruncatedStream:
            if self._failover():
                return list(self.checkpoint_records)
            raise

    def _failover(self) -> bool:
        """A checkpointed stream may end without END (its sender died): libxc
        then restored the last complete checkpoint, and so do we."""
        if self.stream_type == STREAM_REMUS and self.checkpoints:
            self.logger.warning("checkpointed stream ended without END after %d checkpoints: "
                                "failover to the last one", self.checkpoints)
            self.failed_over = True
            return True
        return False


class _TrailerReader:
    """The libxl records after the libxc stream, up to END, read from a pipe or
    socket as they arrive: ``done(records, None)`` or ``done([], error)``.

    Reads exactly what each record needs, never a byte beyond END (a migration
    handshake may follow on the same fd).  The fd is non-blocking meanwhile.
    """

    def __init__(self, loop: Loop, fd: int,
                 done: Callable[[List[Tuple[int, bytes]], Optional[Exception]], None],
                 end: int = RecordType.END) -> None:
        self.loop, self.fd, self.done, self.end = loop, fd, done, end
        self.flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, self.flags | os.O_NONBLOCK)
        self.buf = bytearray()
        self.want = stream_common.REC_HEADER.size
        self.rtype: Optional[int] = None
        self.length = 0
        self.records: List[Tuple[int, bytes]] = []
        self.active = True
        loop.add_reader(fd, self._readable)

    def cancel(self) -> None:
        """Stop quietly (as a loop timer would be cancelled)."""
        self._detach()

    def _detach(self) -> bool:
        """Unwatch the fd and give back its flags; False if already done."""
        if not self.active:
            return False
        self.active = False
        self.loop.remove_reader(self.fd)
        try:
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
        except OSError:
            pass
        return True

    def stop(self, records: Optional[List[Tuple[int, bytes]]] = None,
             err: Optional[Exception] = None) -> None:
        if self._detach():
            self.done(records or [], err)

    def _readable(self) -> None:
        while self.active:
            try:
                chunk = os.read(self.fd, self.want - len(self.buf))
            except BlockingIOError:
                return
            except OSError as exc:
                self.stop(err=exc)
                return
            if not chunk:
                self.stop(err=stream_common.TruncatedStream(
                    0, f"end of stream in the libxl records after the libxc stream "
                    f"({len(self.buf)} of {self.want} bytes)", stream_libxl.WHERE_REC))
                return
            self.buf += chunk
            if len(self.buf) == self.want:
                self._unit()

    def _unit(self) -> None:
        data, self.buf = bytes(self.buf), bytearray()
        if self.rtype is None:
            rtype, length = stream_common.REC_HEADER.unpack(data)
            if rtype == self.end:
                self.stop(self.records)
                return
            if rtype not in (RecordType.EMULATOR_XENSTORE_DATA, RecordType.EMULATOR_CONTEXT):
                self.stop(err=ValueError(f"unexpected libxl record {stream_libxl.record_name(rtype)}"
                                         " after the libxc stream"))
                return
            if length > stream_libxl.LIBXL_RECORD_MAX:
                self.stop(err=ValueError(f"{stream_libxl.record_name(rtype)} length {length:#x} "
                                         "exceeds pyxl's limit"))
                return
            self.rtype, self.length = rtype, length
            self.want = stream_common.roundup8(length)
            if self.want:
                return
        self.records.append((self.rtype, data[:self.length]))
        self.rtype = None
        self.want = stream_common.REC_HEADER.size


def _read_records(fd: int, end: int) -> List[Tuple[int, bytes]]:
    """Emulator records from ``fd`` (blocking), up to the ``end`` record."""
    out: List[Tuple[int, bytes]] = []
    while True:
        rec = stream_libxl.read_libxl_record(fd)
        if rec.rtype == end:
            return out
        if rec.rtype in (RecordType.EMULATOR_XENSTORE_DATA, RecordType.EMULATOR_CONTEXT):
            out.append((rec.rtype, rec.body))
            continue
        raise ValueError(f"unexpected libxl record {stream_libxl.record_name(rec.rtype)} "
                         "after the libxc stream")


def save(domid: int, path_or_fd: PathOrFd, live: bool = False, leave: str = "destroy",
         helper: Optional[str] = None, timeout: Optional[float] = None,
         **kw: Any) -> SaveOperation:
    """Start saving ``domid`` into a file (written atomically) or an fd.

    ``leave`` says what becomes of the domain after a successful save:
    "destroy" (xl's default), "paused" or "running".  Returns at once; run the
    loop (``pyxl.wait(op)``, asyncio, or your own) to make progress.
    """
    return SaveOperation(domid, path_or_fd, live=live, leave=leave, helper=helper,
                         timeout=timeout, **kw)


def restore(path_or_fd: PathOrFd, paused: bool = False, helper: Optional[str] = None,
            timeout: Optional[float] = None, **kw: Any) -> RestoreOperation:
    """Start restoring an xl save file (or stream on an fd) into a new domain."""
    return RestoreOperation(path_or_fd, paused=paused, helper=helper, timeout=timeout, **kw)


def wait(*ops: Operation, timeout: Optional[float] = None) -> List[Any]:
    """Run the default loop until every op is done; raise the first failure.

    All operations run to completion even when one fails, so that nothing is
    left half-done.  ``timeout`` bounds the wait (the ops keep running).
    """
    loop = default_loop()
    for op in ops:
        if op.loop is not loop:
            raise ValueError("pyxl.wait drives the default loop; this op runs on another loop")
    first: List[Operation] = []
    for op in ops:
        op.add_done_callback(lambda o: first.append(o) if o._exception is not None else None)
    if not loop.run_until(lambda: all(op.done() for op in ops), timeout):
        raise TimeoutError(f"pyxl.wait: operations still running after {timeout:g}s")
    if first:
        first[0].result()
    return [op.result() for op in ops]
