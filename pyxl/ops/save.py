"""Saving a domain: xl's ``save`` around the helper.

The xl header and the libxl stream's start are written first, then the helper
writes libxc's stream on the same fd; it calls back to suspend the guest (the
backend asks it, from the loop) and to switch the device model's log-dirty
mode.  Then the libxl records that end the stream (the device model's, END)
are written, a short child fsyncs the file and renames it over the target
(:mod:`pyxl.childproc`; with ``fsync`` it starts with the save and flushes the
file as it grows), and the domain is left as asked: destroyed (xl's default),
paused or running (:mod:`pyxl.ops.aftersave`).  A failed save never touches
an existing file and lets a suspended guest run again.  Checkpointed (Remus)
streams repeat the suspend, the libxl checkpoint records and the resume per
checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from pyxl._paths import helper_path
from pyxl.backends.base import (Backend, Cancellable, EmulatorRecord, start_destroy,
                                start_domain_config, start_resume)
from pyxl.backends.domainlock import DomainLock
from pyxl.childproc import FileFinisher, finish_file, remove_in_child
from pyxl.errors import Cancelled, HelperDied, OperationError, StartupError, Timeout
from pyxl.fdio import close_quietly, make_pipe, open_save_target, pipe_size, write_all, write_from_loop
from pyxl.loop import Loop
from pyxl.ops.aftersave import leave_saved, resume_after_failure
from pyxl.ops.helper_process import save_argv
from pyxl.ops.operation import (REMUS_SAVE_CALLBACKS, SAVE_CALLBACKS, STREAM_REMUS,
                                XCFLAGS_DEBUG, XCFLAGS_LIVE, CallbackRequest, Handler, Operation,
                                PathOrFd, ProgressEvent)
from pyxl.ops.saveoptions import Leave, SaveOptions, SaveResult
from pyxl.stream import libxc as stream_libxc
from pyxl.stream import libxl as stream_libxl
from pyxl.stream import xl as stream_xl
from pyxl.wire.codec import Suspend, SwitchQemuLogdirty, cbflags_for
from pyxl.zstdstage import ZstdStage

__all__ = ["Leave", "SaveOperation", "SaveOptions", "SaveResult"]

#: The compressor's input pipe: the stream's head goes in before anyone reads it.
HEAD_ROOM = 1 << 20


class SaveOperation(Operation[SaveResult]):
    kind = "save"

    def __init__(self, domid: int, target: PathOrFd, options: SaveOptions = SaveOptions(), *,
                 backend: Backend, loop: Optional[Loop] = None,
                 callbacks: Optional[Dict[str, Handler]] = None,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 on_resume: Optional[Callable[[int], None]] = None,
                 config: Optional[Dict[str, Any]] = None,
                 emulator_records: Optional[Sequence[EmulatorRecord]] = None,
                 write_trailer: Optional[Callable[[bytes], None]] = None,
                 xl_header: bool = True,
                 before_suspend: Optional[Callable[[Callable[[], None]], None]] = None) -> None:
        """Save ``domid`` into ``target`` (a path, written atomically, or an fd).

        ``config``: the xl header's domain config (default: the backend's).
        ``emulator_records``: the device model's libxl records (default: the
        backend's :meth:`~pyxl.Backend.save_device_model` once the guest is
        suspended).  ``write_trailer``: for an fd the caller drains
        asynchronously (a relay pipe), called with the libxl records that end
        the stream instead of writing them to the fd, so a full pipe never blocks
        the loop (with ``compress``, they go to the compressor, and
        ``write_trailer(b"")`` says that the compressed stream has ended).
        ``on_resume(domid)``: a failed save's resume.  ``xl_header=False``: the stream starts
        at libxl's header (a migration sender wrote the xl header itself).
        ``before_suspend(go)``: the default suspend waits for ``go()`` (a
        compressed migration's receiver catching up)."""
        super().__init__(domid, loop, options.timeout, callbacks, on_progress)
        self.options = options
        self.backend = backend
        self.live, self.leave = options.live, options.leave
        self.on_resume = on_resume
        self.before_suspend = before_suspend
        self.suspend_timeout = options.suspend_timeout
        self.fsync = options.fsync
        self.emulator_records = list(emulator_records or ())
        # Without records of the caller's, the backend's device model supplies them.
        self._dm_from_backend = emulator_records is None
        self.write_trailer = write_trailer
        self.stream_type = options.stream_type
        self.max_checkpoints = options.checkpoints
        self.checkpoint_interval = options.checkpoint_interval
        self.checkpoints, self.suspended = 0, False
        self.suspended_at: Optional[float] = None
        self._suspend_cancel: Optional[Cancellable] = None
        self._held: Optional[OperationError] = None  # failure waiting for a suspend in flight
        self.path: Optional[str] = None
        self._tmp: Optional[str] = None
        self._fd, self._own_fd = -1, False
        self._dest = ""                 # the file renamed over (a symlink's target)
        self._device_fd = -1            # a FIFO or device opened by path
        self._placing: Optional[Cancellable] = None   # the short child putting the file in place
        self._finisher: Optional[FileFinisher] = None   # fsync: flushes the file as it grows
        self._finisher_due: Optional[Cancellable] = None  # its start, due on the loop
        self._launch: Optional[Cancellable] = None      # the helper's start, due on the loop
        self._launch_fd = -1                            # its stream fd, while it is due
        self._ending: Optional[Cancellable] = None      # the stream's end, being written
        # compress: _wfd is a pipe that a zstd child (_zstd) reads at _zin, into _fd.
        self._wfd = self._zin = -1
        self._zstd: Optional[ZstdStage] = None

        self.backend.check_domain(domid)
        # One save (or migration) of a domain at a time: two would share its
        # log-dirty bitmap and both "succeed" with stale pages (domainlock).
        self._lock = DomainLock(backend, domid, ("live " if options.live else "") + "save")
        # A failed save gives the guest back as it found it: a paused one stays paused
        # (a toolstack paused it for a reason).  Read from the loop as the helper
        # starts (see _start): nothing of ours has touched the guest before that.
        self._was_paused = False
        # The config (a real host's XenStore round) and the stream's head come
        # from the loop, before the helper starts: the caller waits only for the
        # checks it should see fail at once (no such domain, no file).
        self.config: Dict[str, Any] = config if config is not None else {}
        self._config_given = config is not None
        self._xl_header = xl_header
        try:
            if isinstance(target, int):
                self._fd = self._borrow_fd(target)
            else:
                self.path = os.fspath(target)
                self._fd, self._tmp, self._dest = open_save_target(self.path)
                # a FIFO or a device is written into, like a caller's fd, and closed at the end
                self._own_fd = self._tmp is not None
                self._device_fd = -1 if self._own_fd else self._fd
            self._wfd = self._fd
            if options.compress:
                self._zin, self._wfd = make_pipe(HEAD_ROOM)
            cbflags = cbflags_for(REMUS_SAVE_CALLBACKS if self.stream_type else SAVE_CALLBACKS)
            xcflags = (XCFLAGS_LIVE if options.live else 0) | (XCFLAGS_DEBUG if options.debug else 0)
            io_fd = self._wfd if self._wfd > 2 else fcntl.fcntl(self._wfd, fcntl.F_DUPFD_CLOEXEC, 3)
            # libxl passes a dup of its own stdin as BACK_FD (zero-initialised
            # state); it is only read for COLO streams, so we pass -1.
            argv = save_argv(helper_path(options.helper), io_fd, -1, domid, xcflags, cbflags,
                             self.stream_type)
            if io_fd != self._wfd:
                self._launch_fd = io_fd
            # The helper (and the file's flushing child) start from the loop, not
            # here: a fork+exec waits for the child's exec, 2-4 ms each, and a
            # toolstack starting 16 saves would be blocked for all of them.  One
            # start per loop callback keeps both the caller and the loop free.
            # (Its environment is built there too: a copy of os.environ.)
            self._launch = self.loop.call_later(0, lambda: self._start(argv, cbflags, io_fd))
        except BaseException as exc:
            self._close_launch_fd()
            self._discard()
            self._lock.release()
            self._give_back_fd()
            if self._device_fd >= 0:
                close_quietly(self._device_fd)
            if isinstance(exc, OSError):
                raise StartupError(f"cannot write save stream: {exc.strerror}") from exc
            raise

    def _start(self, argv: List[str], cbflags: int, io_fd: int) -> None:
        """From the loop: the domain's config (a real host's XenStore round,
        on the loop), then :meth:`_launch_helper`.  Until the helper starts,
        ``_launch`` holds what a cancel calls off."""
        self._launch = None
        self._was_paused = self._state_now() == "paused"
        if self._config_given:
            self._launch_helper(argv, cbflags, io_fd)
            return
        answered = []

        def configured(config: Optional[Dict[str, Any]], exc: Optional[StartupError]) -> None:
            answered.append(True)
            self._launch = None
            if config is None:
                assert exc is not None
                if exc.op is None:
                    exc.op = self
                self._close_launch_fd()
                self._fail_after_helper(exc)
                return
            self.config = config
            self._launch_helper(argv, cbflags, io_fd)
        pending = start_domain_config(self.backend, self.loop, self.domid, configured)
        if not answered:
            self._launch = pending

    def _launch_helper(self, argv: List[str], cbflags: int, io_fd: int) -> None:
        """The stream's head, then the compressor, the helper and the flushing child."""
        try:
            self._write_head()
            try:
                env = self.backend.helper_env()
                env.update(self.options.helper_env)
            except Exception as exc:   # a backend is the caller's code (any toolstack's)
                raise StartupError(f"the backend gave no helper environment: {exc}",
                                   op=self) from exc
            if self._zin >= 0:
                try:
                    self._zstd = ZstdStage(self.loop, "compress", self._zin, self._fd,
                                           self._zstd_failed, self.options.compress_level)
                except OSError as exc:
                    raise StartupError(f"cannot start the zstd compressor: {exc.strerror}",
                                       op=self) from exc
                os.close(self._zin)
                self._zin = -1
            self._spawn(argv, "save", cbflags, [io_fd], env)
        except StartupError as exc:   # e.g. the helper is gone, or no fds left
            self._close_launch_fd()
            self._fail_after_helper(exc)
            return
        self._close_launch_fd()
        if self._tmp is not None and self.fsync:
            # in a callback of its own: each start is a request to the
            # spawner, and the loop's longest stretch should be one of them
            self._finisher_due = self.loop.call_later(0, self._start_finisher)

    def _write_head(self) -> None:
        """The xl header (the domain's config), libxl's header and its libxc
        context record: what precedes the helper's output."""
        try:
            head = stream_xl.xl_header(self.config) if self._xl_header else b""
        except ValueError as exc:
            raise StartupError(f"cannot write domain {self.domid}'s config: {exc}",
                               op=self) from exc
        head += stream_libxl.libxl_header() + stream_libxl.libxc_context_record()
        if self._zin >= 0 and len(head) > pipe_size(self._wfd):
            raise StartupError(f"the domain's config is too large to compress a save of "
                               f"it ({len(head)} bytes)", op=self)
        try:
            write_all(self._wfd, head)    # a pipe's is empty and of HEAD_ROOM: never blocks
        except OSError as exc:
            raise StartupError(f"cannot write save stream: {exc.strerror}", op=self) from exc

    def _close_launch_fd(self) -> None:
        if self._launch_fd >= 0:
            os.close(self._launch_fd)
            self._launch_fd = -1

    def cancel(self, grace: float = 5.0) -> bool:
        if self._done:
            return False
        cancelled = Cancelled(f"{self.kind} of domain {self.domid} cancelled", op=self)
        if self._launch is not None:
            # Not started yet (due, or reading the config): nothing ran and the
            # domain was not touched.
            self._launch.cancel()
            self._launch = None
            self._close_launch_fd()
            self._discard()
            self._finish(exc=cancelled)
            return True
        if self._ending is not None:    # the helper is gone; a slow reader has the end
            self._stop_ending()
            self._fail_after_helper(cancelled)
            return True
        return super().cancel(grace)

    def _start_finisher(self) -> None:
        """The flushing child, started once the helper runs (so a failed start
        leaves no child to wait for).  Had the stream ended first, the file
        is finished without it (:func:`finish_file`)."""
        self._finisher_due = None
        assert self._tmp is not None and self.path is not None and self.helper is not None
        try:
            self._finisher = FileFinisher(self.loop, self._tmp, self._dest, self._finisher_failed)
        except OSError as exc:
            self._fail_soon(OperationError(
                f"cannot start the file finisher: {exc.strerror}", op=self))
            self.helper.kill()

    def _zstd_failed(self, why: str) -> None:
        """The compressor failed while the helper wrote (its target broke, or
        it was killed): stop the save now."""
        self._stage_failed(f"compressing the save stream failed: {why}")

    def _finisher_failed(self, why: str) -> None:
        """The flushing child failed while the helper wrote (an I/O error, or
        it was killed): the save cannot be made durable, so stop it now."""
        self._stage_failed(f"flushing the save file failed: {why}")

    def _stage_failed(self, message: str) -> None:
        self._fail_soon(OperationError(message, op=self))
        if self.helper is not None and self.helper.running:
            self.helper.kill()

    def _discard(self, then: Optional[Callable[[], None]] = None) -> bool:
        """Close the stream's fds and remove the temporary file.  With ``then``,
        a short child removes the file (True; ``then()`` from the loop once it
        is gone); else, or with no file, it goes here (False)."""
        for name in ("_wfd", "_zin"):
            fd = getattr(self, name)
            if fd >= 0 and fd != self._fd:
                os.close(fd)
            setattr(self, name, -1)
        self._no_finisher_due()
        if self._finisher is not None:
            self._finisher.cancel()     # it exits without renaming; the file goes below
            self._finisher = None
        fd, tmp = -1, self._tmp
        self._tmp = None
        if self._own_fd and self._fd >= 0:
            self._note_stream_end()
            fd, self._fd = self._fd, -1
        if tmp is not None and fd >= 0 and then is not None:
            remove_in_child(self.loop, tmp, fd, then)
            return True
        close_quietly(fd)
        if tmp is not None:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        return False

    def _default_handler(self, name: str) -> Handler:
        own = {"suspend": self._default_suspend, "switch_qemu_logdirty": self._default_logdirty,
               "postcopy": self._default_postcopy, "checkpoint": self._default_checkpoint}
        return own.get(name) or super()._default_handler(name)

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
        records = stream_libxl.records_and(self.emulator_records,
                                           stream_libxl.checkpoint_end_record())

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
            self.suspended = False   # being resumed: a failure meanwhile does not do it twice
            start_resume(self.backend, self.loop, self.domid, resumed)

        def resumed(ok: bool, why: str) -> None:
            if not ok:
                self.suspended = True
                self.logger.error("could not resume domain %d after checkpoint %d: %s",
                                  self.domid, self.checkpoints, why)
                req.reply(0)
                return
            req.reply(1)

        # The helper waits for this answer, so the fd is ours for the moment
        # (and no longer once it has gone: its exit cancels the write).
        self._aux.append(write_from_loop(self.loop, self._wfd, records, written))

    def _default_checkpoint(self, req: CallbackRequest) -> None:
        """Remus: another checkpoint after the interval, until enough were taken."""
        self._aux.clear()   # the last checkpoint's steps have answered (see restore's)
        more = self.max_checkpoints is None or self.checkpoints < self.max_checkpoints
        if not more:
            return req.reply(0)   # a graceful end of the stream
        self._aux.append(self.loop.call_later(self.checkpoint_interval,
                                              lambda: req.reply(1) if not req.answered else None))
        return None

    @property
    def raw_streamed(self) -> Optional[int]:
        """With ``compress``: the raw stream bytes the compressor has taken so far."""
        return self._zstd.raw if self._zstd is not None else None

    def _default_suspend(self, req: CallbackRequest) -> None:
        if self.before_suspend is not None:
            def go() -> None:
                if not self._done and not req.answered:
                    self._suspend_now(req)
            try:
                self.before_suspend(go)
            except Exception as exc:  # the caller's
                self._callback_raised("before_suspend", exc)
                if not req.answered:
                    req.reply(0)
            return
        self._suspend_now(req)

    def _handler_failed(self, what: str, err: OperationError) -> None:
        """A suspend handler raised (the application's, or the backend's call in
        pyxl's): it may have stopped the guest first.  A suspended guest is
        resumed like any a failed save leaves (``guest_state`` then says how);
        one it did not stop is reported as it is ("running" or "paused")."""
        if what != "suspend handler" or self.suspended:
            return
        state = self._state_now()
        if state == "suspended":
            self.suspended = True
        else:
            err.guest_state = state

    def _suspend_now(self, req: CallbackRequest) -> None:
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
                    self._resume_after_failure(lambda: self._finish(exc=exc), exc)
                else:
                    self._finish(exc=exc)
            elif not req.answered:
                req.reply(1 if ok else 0)

        # Not in self._aux: if the helper dies meanwhile, the suspend goes on
        # (the guest was asked already) and _conclude waits for it.
        self._suspend_cancel = self.backend.start_suspend(self.loop, self.domid,
                                                          self.suspend_timeout, done)

    def _finish(self, result: Optional[SaveResult] = None,
                exc: Optional[OperationError] = None) -> None:
        why = getattr(self, "_suspend_failed", None)
        if exc is not None and why and why not in str(exc):
            # The helper's failure is only the consequence ("Save failed"):
            # say why first, e.g. a guest that did not answer the request.
            exc.args = (f"the guest did not suspend: {why}; {exc.args[0] if exc.args else exc}",
                        ) + tuple(exc.args[1:])
        self._lock.release()
        if self._device_fd >= 0:
            os.close(self._device_fd)
            self._device_fd = -1
        super()._finish(result, exc)

    def _answer(self, req: CallbackRequest, value: int) -> None:
        if (isinstance(req.message, Suspend) and value and self._dm_from_backend
                and req is self._pending and self.helper is not None and self.helper.running):
            # libxl saves the device model inside the suspend callback, once the
            # guest is stopped (and again at every Remus checkpoint); the helper
            # hears "suspended" only after that.
            self.suspended = True
            self.suspended_at = time.monotonic()

            def saved(records: Optional[List[EmulatorRecord]], why: str) -> None:
                if records is None:
                    self._fail_soon(OperationError(
                        f"saving domain {self.domid}'s device model failed: {why}", op=self))
                    super(SaveOperation, self)._answer(req, 0)
                    return
                self.emulator_records = list(records)
                super(SaveOperation, self)._answer(req, value)

            try:
                self._aux.append(self.backend.start_save_device_model(
                    self.loop, self.domid, self.live, saved))
            except Exception as exc:  # a backend is the caller's code (any toolstack's)
                saved(None, str(exc))
            return
        super()._answer(req, value)

    def _answered(self, req: CallbackRequest, value: int) -> None:
        if isinstance(req.message, Suspend) and value:
            self.suspended = True
            self.suspended_at = self.suspended_at or time.monotonic()

    def _answered_late(self, req: CallbackRequest, value: int) -> None:
        if isinstance(req.message, Suspend) and value:
            # A toolstack's suspend handler finished after the save had failed:
            # its guest is suspended now, and nobody else will resume it.
            self._resume_after_failure(lambda: None)

    def _conclude(self) -> None:
        exc = self._helper_outcome() if self.helper is not None else self._failure
        if exc is None:
            try:
                self._complete_stream()
            except OSError as err:
                exc = OperationError(f"writing the end of the save stream failed: {err.strerror}",
                                     op=self)
            else:
                return    # _committed finishes, once the image is in place
        self._fail_after_helper(exc)

    def _fail_after_helper(self, exc: OperationError) -> None:
        self._no_finisher_due()      # a failing save starts no flushing child
        if self._zstd is not None:
            # The compressor is killed (no well-formed end for a failed
            # stream) and reaped before the failure is reported.
            zstd, self._zstd = self._zstd, None

            def reaped() -> None:
                err = exc
                if isinstance(exc, HelperDied) and exc.signum == 13:   # SIGPIPE
                    # The compressor went first; the helper only wrote into its
                    # closed pipe: say what failed.
                    err = OperationError("compressing the save stream failed: the compressor "
                                         f"ended first ({zstd.why or zstd.status})", op=self)
                self._fail_after_helper(err)
            zstd.stop(reaped)
            return
        if self._finisher is not None:
            # Report once the flushing child is gone (at its stdin's EOF, without
            # renaming).  Its descriptor is the file's last: freeing a GiB of it
            # (180 ms on ext4) is its exit's, not the loop's unlink's.
            finisher, self._finisher = self._finisher, None
            self._discard()
            finisher.abandon(lambda: self._fail_after_helper(exc))
            return
        if self._discard(then=lambda: self._fail_after_helper(exc)):
            return      # no flushing child (fsync=False): a short one removes the file
        if self._suspend_cancel is not None:
            self._held = exc  # a suspend is on its way: finish once it has landed
            return
        if self.suspended:   # reported once the guest runs again (or could not)
            self._resume_after_failure(lambda: self._finish(exc=exc), exc)
            return
        self._finish(exc=exc)

    def _no_finisher_due(self) -> None:
        if self._finisher_due is not None:
            self._finisher_due.cancel()
            self._finisher_due = None

    def _complete_stream(self) -> None:
        """Write the end of the stream; then put the file in place from a short child
        (fsync, rename, directory fsync take as long as the disk) and leave the domain."""
        self._no_finisher_due()
        end = time.monotonic()
        if self.stream_type == STREAM_REMUS:
            # libxc 4.17 omits its END after the last CHECKPOINT (whose emulator
            # records went with it): the receiver's libxc completes on ours.
            trailer = stream_libxc.end_record() + stream_libxl.end_record()
        else:
            trailer = stream_libxl.records_and(self.emulator_records, stream_libxl.end_record())
        if self.write_trailer is not None and self._zstd is None:
            if self._trailer_to_caller(trailer):
                self._stream_written(end)
            return

        def written(err: Optional[OSError]) -> None:
            self._stop_ending()
            if self._zstd is not None:      # the compressor's pipe: its EOF, then its exit
                os.close(self._wfd)
                self._wfd = -1
            if err is not None:
                self._fail_after_helper(OperationError(
                    f"writing the end of the save stream failed: {err.strerror}", op=self))
            elif self._zstd is not None:
                self._zstd.wait(compressed)
            else:
                self._stream_written(end)

        def compressed(why: Optional[str]) -> None:
            if why is not None:
                self._fail_after_helper(OperationError(
                    f"compressing the save stream failed: {why}", op=self))
                return
            self._zstd = None
            if self._trailer_to_caller(b""):    # the relay: the stream has ended
                self._stream_written(time.monotonic())

        # The helper has exited: the fd is ours.  A pipe, FIFO or socket is written
        # from the loop (its reader may be slow; a cancel stops it), a file at once.
        ending = write_from_loop(self.loop, self._wfd, trailer, written)
        if ending.active:
            self._ending = ending
            if self._timer_due is not None:     # the operation's timeout bounds it too
                self._timer = self.loop.call_later(max(0.0, self._timer_due - time.monotonic()),
                                                   self._ending_timed_out)

    def _stop_ending(self) -> None:
        """The stream's end is written, or given up: no write, no timer."""
        if self._ending is not None:
            self._ending.cancel()
            self._ending = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _ending_timed_out(self) -> None:
        self._timer = None
        self._stop_ending()
        self._fail_after_helper(Timeout(
            f"{self.kind} of domain {self.domid} timed out after {self._timeout:g}s: the "
            "stream's end waited for its reader", op=self))

    def _trailer_to_caller(self, data: bytes) -> bool:
        """``write_trailer(data)``, if given; False if it raised (the save then fails)."""
        if self.write_trailer is None:
            return True
        try:
            self.write_trailer(data)
        except Exception as exc:  # the caller's
            err = self._callback_raised("write_trailer", exc)
            assert err is not None
            self._fail_after_helper(err)
            return False
        return True

    def _stream_written(self, end: float) -> None:
        """The whole stream is in the target: put a file in place, then commit."""
        size = os.fstat(self._fd).st_size if self._own_fd else None
        result = SaveResult(self.domid, self.path, size, end - self.started, self.iterations,
                            None if self.suspended_at is None else end - self.suspended_at,
                            checkpoints=self.checkpoints, compressed=self.options.compress)
        if not self._own_fd:
            self._committed(result)
            return
        if self._wfd == self._fd:
            self._wfd = -1          # the same fd (no compressor): closed here
        self._note_stream_end()
        os.close(self._fd)
        self._fd = -1
        assert self._tmp is not None and self.path is not None

        def placed(why: Optional[str]) -> None:
            if why is not None:
                self._fail_after_helper(OperationError(
                    f"putting the save file in place failed: {why}", op=self))
                return
            self._tmp = None
            self._committed(result)

        if self._finisher is not None:
            self._finisher.commit(placed)
        else:
            try:
                self._placing = finish_file(self.loop, self._tmp, self._dest, self.fsync, placed)
            except OSError as exc:      # no child (EMFILE, EAGAIN): failed, not escaped
                placed(f"cannot start it: {exc.strerror}")

    def _committed(self, result: SaveResult) -> None:
        """The image is safe: leave the domain as asked, then finish."""
        if self.leave != "destroy":
            leave_saved(self.backend, self.loop, self.domid, self.leave,
                        was_paused=self._was_paused, suspended=self.suspended,
                        logger=self.logger, then=lambda: self._finish(result))
            return

        def destroyed(ok: bool, why: str) -> None:
            if not ok:
                self.logger.error("saved domain %d, but could not destroy it: %s",
                                  self.domid, why)
            self._finish(result)

        start_destroy(self.backend, self.loop, self.domid, destroyed)

    def _state_now(self) -> Optional[str]:
        try:
            return self.backend.state(self.domid)
        except Exception:   # a backend is the caller's code; unknown: not paused
            return None

    def _resume_after_failure(self, then: Callable[[], None],
                              exc: Optional[OperationError] = None) -> None:
        resume_after_failure(self.backend, self.loop, self.domid, was_paused=self._was_paused,
                             on_resume=self.on_resume, logger=self.logger, then=then, exc=exc)
