"""Restoring a domain: xl's ``restore`` around the helper.

The xl header (with the domain's config) and the start of the libxl stream are
read first -- at once from a regular file, from the loop as they arrive from a
pipe, socket or FIFO (under the timeout) -- the config is checked
(:mod:`pyxl.backends.configcheck`: it is untrusted), the backend builds the
empty target domain, and the helper reads libxc's stream from the very next
byte of the same fd.  After the helper, the
libxl records that end the stream (the device model's, END) are read -- from
the loop as they arrive when the fd is a pipe or socket, within
:class:`~pyxl.ops.trailer.TrailerLimits` -- the device model
gets its state, the backend finishes the domain, and it is unpaused unless
asked not to be.  A failed restore destroys the half-made domain.  A
checkpointed (Remus) stream that ends without END after a complete checkpoint
is a failover: the domain is restored at that checkpoint.
"""

from __future__ import annotations

import fcntl
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from pyxl._log import get_logger
from pyxl._paths import helper_path, xen_release
from pyxl.backends.base import (Backend, start_create_restore_target, start_destroy,
                                start_restore_done, start_unpause)
from pyxl.backends.configcheck import MAX_GIVEN_NAME, check_config, check_name
from pyxl.errors import (Cancelled, CorruptImage, HelperFailed, OperationError, StartupError,
                         StreamTooLarge, Timeout, TruncatedStream)
from pyxl.fdio import CHUNK, is_regular, is_stream, make_pipe, pending_bytes, set_nonblocking
from pyxl.loop import Loop, Timer, default_loop
from pyxl.ops.helper_process import restore_argv
from pyxl.ops.operation import (REMUS_RESTORE_CALLBACKS, RESTORE_CALLBACKS, STREAM_PLAIN,
                                STREAM_REMUS, CallbackRequest, Handler, Operation, PathOrFd,
                                ProgressEvent)
from pyxl.ops.streamhead import HeadParser, read_head
from pyxl.ops.trailer import LoopReader, TrailerLimits, TrailerReader, TrailerTooLarge, read_trailer
from pyxl.stream.libxl import LibxlRecordType as RecordType
from pyxl.stream.xl import XlHeader
from pyxl.wire.codec import cbflags_for
from pyxl.zstdstage import ZstdStage, is_zstd

__all__ = ["RestoreOperation", "RestoreOptions", "RestoreResult"]


@dataclass(frozen=True)
class RestoreOptions:
    """How to restore.  ``paused``: leave the new domain paused.  ``helper``: the
    helper to run.  ``timeout``: give up (helper killed, domain destroyed) after
    this many seconds.  ``name``: the new domain's name instead of the saved
    config's (a migration receiver's ``NAME--incoming``).
    ``stream_type=STREAM_REMUS`` (1): a checkpointed stream: at each checkpoint
    libxl's records up to CHECKPOINT_END are read (``checkpoint_records``) and
    libxc applies the previous checkpoint.  ``compressed``: the source (a pipe or
    socket) carries a zstd-compressed image: it is decompressed as it arrives,
    and the frame's checksum is checked before the domain may run.  A regular
    file's magic says whether it is compressed, whatever ``compressed`` says (a
    plain image restores as one)."""

    paused: bool = False
    helper: Optional[str] = None
    timeout: Optional[float] = None
    name: Optional[str] = None
    stream_type: int = STREAM_PLAIN
    compressed: bool = False

    def __post_init__(self) -> None:
        for flag in ("paused", "compressed"):      # paused="no" would restore it paused
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, not {getattr(self, flag)!r}")
        if self.compressed and self.stream_type != STREAM_PLAIN:
            raise ValueError("a compressed stream is a plain one (not checkpointed)")
        if self.stream_type not in (STREAM_PLAIN, STREAM_REMUS):
            raise ValueError(f"stream_type must be 0 (plain) or 1 (Remus), not {self.stream_type}")
        if self.timeout is not None and not self.timeout > 0:
            raise ValueError(f"timeout must be a positive number of seconds, not {self.timeout!r}")


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



class RestoreOperation(Operation[RestoreResult]):
    kind = "restore"

    def __init__(self, source: PathOrFd, options: RestoreOptions = RestoreOptions(), *,
                 backend: Backend, loop: Optional[Loop] = None,
                 callbacks: Optional[Dict[str, Handler]] = None,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 config_check: Optional[Callable[[Dict[str, Any]], None]] = None) -> None:
        """Restore the stream at ``source`` (a path or an fd) into a new domain that
        ``backend`` builds (:meth:`~pyxl.Backend.create_restore_target`).

        A regular file's head is read and its config checked at once: their
        errors raise here.  Any other source (a pipe, a socket, a FIFO) is read
        from the loop as its bytes arrive, so nothing here waits for a writer,
        and the head's errors (a bad stream, a bad config, the timeout) are the
        operation's outcome.  Either way the backend builds the domain and the
        helper starts from the loop: ``domid`` is -1 until the new domain
        exists, and the build's errors are the operation's outcome.
        ``config_check(config)``: the owner's own check of the stream's config
        (a migration receiver's), after pyxl's and before the domain is built
        or renamed; an OperationError it raises is the restore's outcome."""
        self.options = options
        self._config_check = config_check
        self.stream_type = options.stream_type
        self.checkpoints = 0
        self.failed_over = False
        self.checkpoint_records: List[Tuple[int, bytes]] = []
        self.backend = backend
        self.limits = TrailerLimits.for_backend(backend)
        self.paused = options.paused
        self.path: Optional[str] = None
        self.config: Dict[str, Any] = {}
        self._trailer: Optional[TrailerReader] = None
        self._head: Optional[LoopReader] = None
        self._launch: Optional[Timer] = None      # a file's domain build, due on the loop
        self._creating = False                    # the backend is building the domain
        self._timer_armed = False
        self._unzstd: Optional[ZstdStage] = None
        self._fd, self._own_fd = self._open(source)
        try:
            self._begin(self._fd, loop, callbacks, on_progress)
        except BaseException:
            self._give_back_fd()    # a caller's fd is refused with its flags as they were
            raise

    def _begin(self, fd: int, loop: Optional[Loop], callbacks: Optional[Dict[str, Handler]],
               on_progress: Optional[Callable[[ProgressEvent], None]]) -> None:
        """The constructor's rest, once the source is open: read a file's head
        now, another source's from the loop."""
        options = self.options
        try:
            regular = is_regular(fd)
            if not regular and not is_stream(fd):
                # (epoll refuses a device: a raw EPERM otherwise)
                self._close()
                raise StartupError(f"{self._where()}: not a regular file, a pipe or a socket")
            # A regular file's magic decides (compressed= or not: a plain image
            # given as compressed was "not a zstd frame" from the decompressor);
            # only a pipe's or a socket's bytes cannot be looked at first.
            if (is_zstd(os.pread(fd, 4, os.lseek(fd, 0, os.SEEK_CUR))) if regular
                    else options.compressed):
                # A compressed image: restored from the decompressor's pipe,
                # read from the loop like any pipe.
                loop = loop if loop is not None else default_loop()
                fd = self._decompress(loop, fd, "decompress-file" if regular else "decompress")
                regular = False
        except OSError as exc:
            self._close()
            raise StartupError(f"{self._where()}: {exc.strerror}") from exc
        if not regular:
            # The head comes when its writer writes it: read it from the loop,
            # under the operation's timeout, and build the domain then.
            super().__init__(-1, loop, options.timeout, callbacks, on_progress)
            self.logger = get_logger("pyxl.restore")
            self._start_timer()
            parser = HeadParser()
            try:
                self._head = LoopReader(self.loop, fd, parser,
                                        lambda err: self._head_read(parser, err))
            except BaseException:
                self._cancel_timer()
                self._close()
                raise
            return
        try:
            header = read_head(fd)
            config = self._checked_config(header)
        except (ValueError, OSError) as exc:
            self._close()
            raise StartupError(f"{self._where()}: {exc}") from exc
        except BaseException:
            self._close()
            raise
        # The stream and its config are good: the backend builds the domain and
        # the helper starts from the loop, not here (a backend's domain build
        # may take a while; the caller may be starting many restores).
        super().__init__(-1, loop, options.timeout, callbacks, on_progress)
        self.logger = get_logger("pyxl.restore")
        self._start_timer()
        self._launch = self.loop.call_later(0, lambda: self._build(config))

    def _open(self, source: PathOrFd) -> Tuple[int, bool]:
        """(fd, whether it is ours to close).  A path is opened non-blocking, so
        that a FIFO without a writer does not block here (its head is then read
        from the loop, under the timeout); a regular file is made blocking again."""
        if isinstance(source, int):
            try:
                return self._borrow_fd(source), False
            except OSError as exc:
                raise StartupError(f"cannot read fd {source}: {exc.strerror}") from exc
        self.path = os.fspath(source)
        if os.path.isdir(self.path):
            raise StartupError(f"{self.path}: is a directory")
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except OSError as exc:
            raise StartupError(f"cannot open {self.path}: {exc.strerror}") from exc
        try:
            if is_regular(fd):
                set_nonblocking(fd, False)
        except OSError as exc:
            os.close(fd)
            raise StartupError(f"cannot open {self.path}: {exc.strerror}") from exc
        return fd, True

    def _decompress(self, loop: Loop, fd: int, mode: str) -> int:
        """Start a zstd child reading the image at ``fd``; the read end of its pipe.
        (A stream that is not a file ends at its frame's end: what follows on a
        connection is the migration handshake.)"""
        r, w = make_pipe(CHUNK)
        try:
            self._unzstd = ZstdStage(loop, mode, fd, w, lambda why: None)
        except BaseException:
            os.close(r)
            raise
        finally:
            os.close(w)
        self._close()          # the child has the image now
        self._fd, self._own_fd = r, True
        return r

    @property
    def raw_taken(self) -> Optional[int]:
        """A compressed source: the raw stream bytes the helper has read so far
        (the decompressor's output less what waits in its pipe); else None."""
        if self._unzstd is None or self._fd < 0:
            return None
        try:
            return max(0, self._unzstd.raw - pending_bytes(self._fd))
        except OSError:
            return None

    def _where(self) -> str:
        return self.path or "stream"

    def _what(self) -> str:
        return super()._what() if self.domid >= 0 else self.kind

    def _checked_config(self, header: XlHeader) -> Dict[str, Any]:
        """The config to build the new domain from, checked (it is untrusted:
        :mod:`pyxl.backends.configcheck`) and renamed if asked."""
        if header.config is None:
            raise StartupError(f"{self._where()}: the xl header carries no domain "
                               "config to build the new domain from")
        config = header.config
        check_config(config)
        if self._config_check is not None:
            self._config_check(config)
        if self.options.name is not None:
            check_name(self.options.name, "name", MAX_GIVEN_NAME)
            c_info = config.get("c_info")
            config["c_info"] = dict(c_info if isinstance(c_info, dict) else {},
                                    name=self.options.name)
        self.config = config
        return config

    def _build(self, config: Dict[str, Any]) -> None:
        """From the loop: the backend builds the empty domain (in steps of its
        own, on the loop), then the helper starts."""
        self._launch = None
        self._creating = True
        start_create_restore_target(self.backend, self.loop, config, self._built)

    def _built(self, domid: Optional[int], exc: Optional[Exception]) -> None:
        self._creating = False
        if exc is not None or domid is None:
            if not isinstance(exc, OperationError):
                exc = StartupError(f"cannot create the domain to restore into: "
                                   f"{type(exc).__name__}: {exc}", op=self)
            if self._failure is not None:   # timed out or cancelled meanwhile: that is told
                self.logger.warning("%s", exc)
            self._head_failed(self._failure or exc)
            return
        self.domid = domid
        self.logger = get_logger(f"pyxl.domain.{domid}")
        try:
            if self._failure is not None:   # timed out or cancelled while it was built
                raise self._failure
            self._start_helper()
        except Exception as err:
            self._close()
            self._cancel_timer()
            if not isinstance(err, OperationError):
                err = StartupError(f"cannot start the restore: {type(err).__name__}: {err}",
                                   op=self)
            self._fail_and_destroy(err)

    def _start_helper(self) -> None:
        fd = self._fd
        cbflags = cbflags_for(REMUS_RESTORE_CALLBACKS if self.stream_type else RESTORE_CALLBACKS)
        io_fd = fd if fd > 2 else fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        try:
            # Event channels (store port, store domain, console port, console
            # domain), as the backend allocated them for the new domain.
            store_port, store_dom, console_port, console_dom = self.backend.restore_ports(
                self.domid)
            argv = restore_argv(helper_path(self.options.helper), io_fd, -1, self.domid,
                                store_port, store_dom, console_port, console_dom, cbflags,
                                self.stream_type)
            self._spawn(argv, "restore", cbflags, [io_fd], self.backend.helper_env())
        finally:
            if io_fd != fd:
                os.close(io_fd)

    def _head_read(self, parser: HeadParser, err: Optional[Exception]) -> None:
        """From the loop: the head is in (or could not be read)."""
        self._head = None
        if err is not None:
            self._head_failed(StartupError(f"{self._where()}: {err}", op=self))
            return
        assert parser.header is not None
        try:
            if self._own_fd:
                set_nonblocking(self._fd, False)   # the helper reads it with blocking reads
            config = self._checked_config(parser.header)
        except OperationError as exc:
            self._head_failed(exc)
            return
        except Exception as exc:  # untrusted input
            self._head_failed(StartupError(f"cannot restore from {self._where()}: "
                                           f"{type(exc).__name__}: {exc}", op=self))
            return
        self._build(config)

    def _head_failed(self, exc: OperationError) -> None:
        """No domain exists yet: close, stop the clock, report."""
        if self._head is not None:
            self._head.cancel()
            self._head = None
        if self._launch is not None:
            self._launch.cancel()
            self._launch = None
        self._close()
        self._cancel_timer()
        self._finish(exc=exc)

    def _start_timer(self) -> None:
        """Once: a restore read from the loop starts its clock at the head."""
        if not self._timer_armed:
            self._timer_armed = True
            super()._start_timer()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _timed_out(self) -> None:
        if self._creating:   # a domain build is not called off: it fails once built
            self._timer = None
            self._fail_soon(Timeout(f"{self.kind} timed out after {self._timeout:g}s while "
                                    "its domain was being built", op=self))
            return
        if self._head is not None or self._launch is not None:
            self._timer = None
            self._head_failed(Timeout(f"{self.kind} timed out after {self._timeout:g}s waiting "
                                      f"for the stream's head ({self._where()})", op=self))
            return
        super()._timed_out()

    def _close(self) -> None:
        if self._own_fd and self._fd >= 0:
            self._note_stream_end()
            os.close(self._fd)
        self._fd = -1

    def _fail_and_destroy(self, exc: OperationError) -> None:
        """From the loop: destroy what was restored, then report ``exc`` (so
        that when the failure is seen, nothing of the domain is left)."""
        def destroyed(ok: bool, why: str) -> None:
            if not ok:
                self.logger.error("could not destroy half-restored domain %d: %s",
                                  self.domid, why)
            self._finish(exc=exc)

        start_destroy(self.backend, self.loop, self.domid, destroyed)

    def _default_checkpoint(self, req: CallbackRequest) -> None:
        """libxc read a CHECKPOINT: read libxl's records of that checkpoint (the
        helper waits for our answer, so the fd is ours meanwhile), then go on."""
        # The last checkpoint's steps have all answered (the helper goes on
        # only after that): their handles go, or each checkpoint's would stay,
        # its records and all.
        self._aux.clear()

        def read(records: List[Tuple[int, bytes]], err: Optional[Exception]) -> None:
            if isinstance(err, TruncatedStream):
                # The sender died while we buffered this checkpoint: as libxl
                # (a failure in its buffering phase), answer failover; libxc then
                # runs the domain from the last complete checkpoint, if it has
                # one, and fails the restore if not.
                self.logger.warning("checkpoint %d: the stream ended in its libxl records: "
                                    "failover to checkpoint %d", self.checkpoints + 1,
                                    self.checkpoints)
                req.reply(2)   # XGR_CHECKPOINT_FAILOVER
                return
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
                records = read_trailer(self._fd, RecordType.CHECKPOINT_END, limits=self.limits)
            except (ValueError, OSError) as exc:
                read([], exc)
            else:
                read(records, None)
            return
        self._aux.append(TrailerReader(self.loop, self._fd, read,
                                       end=RecordType.CHECKPOINT_END, limits=self.limits))

    def _default_handler(self, name: str) -> Handler:
        if name == "checkpoint" and self.stream_type == STREAM_REMUS:
            return self._default_checkpoint
        if name == "static_data_done":
            # missing CPUID/MSR policy (v2 streams) would be rebuilt the legacy
            # way by libxl; the simulated domain keeps its default policy.
            return lambda req: 0
        return super()._default_handler(name)

    def _helper_outcome(self) -> Optional[OperationError]:
        exc = super()._helper_outcome()
        if isinstance(exc, HelperFailed) and xen_release() == "4.17" and any(
                "Unable to restore HVM context" in e for e in exc.helper_errors):
            # The one known way a well-formed stream fails here: Xen 4.20.1
            # grew the LAPIC save record, and 4.17 refuses the longer one.
            return HelperFailed(
                f"{self.kind} of domain {self.domid} failed: Xen 4.17 refused the stream's HVM "
                "context (a stream written by Xen 4.20.1 or later has a longer LAPIC record "
                "that 4.17 cannot load; `pyxl inspect` names the Xen that wrote it)",
                exc.retval, exc.errnoval, op=self, helper_errors=exc.helper_errors)
        return exc

    def _conclude(self) -> None:
        exc = self._helper_outcome() if self.helper is not None else self._failure
        records: List[Tuple[int, bytes]] = []
        if exc is None and not is_regular(self._fd):
            # A pipe or socket (migration): the records after the libxc stream
            # may still be on their way.  Read them as they arrive, not blocking
            # the loop; the helper has exited, so the fd is ours alone.
            self._trailer = TrailerReader(self.loop, self._fd, self._trailer_read,
                                          limits=self.limits, offset=self.raw_taken or 0)
            if self._timeout is not None:
                left = max(0.0, self._timeout - (time.monotonic() - self.started))
                self._aux.append(self.loop.call_later(left, self._trailer_timed_out))
            return
        if exc is None:
            try:
                records = self._read_trailer()
            except (ValueError, OSError) as err:
                exc = self._trailer_error(err)
        self._finish_restore(records, exc)

    def _trailer_read(self, records: List[Tuple[int, bytes]],
                      err: Optional[Exception]) -> None:
        self._trailer = None
        if isinstance(err, TruncatedStream) and self._failover():
            records, err = list(self.checkpoint_records), None
        for t in self._aux:
            t.cancel()
        exc: Optional[OperationError] = None
        if self._failure is not None:
            exc = self._failure
        elif err is not None:
            exc = self._trailer_error(err)
        self._finish_restore(records, exc)

    def _trailer_error(self, err: Exception) -> OperationError:
        text = f"{self._where()}: after the libxc stream: {err}"
        exc = (StreamTooLarge(text, err.bound, op=self) if isinstance(err, TrailerTooLarge)
               else OperationError(text, op=self))
        exc.__cause__ = err     # the StreamError, with its .offset
        return exc

    def _stop_trailer(self, exc: OperationError) -> None:
        if self._trailer is not None:
            self._fail_soon(exc)
            self._trailer.stop()

    def _trailer_timed_out(self) -> None:
        self._stop_trailer(Timeout(f"{self.kind} of domain {self.domid} timed out after "
                                   f"{self._timeout:g}s waiting for the end of the stream",
                                   op=self))

    def cancel(self, grace: float = 5.0) -> bool:
        if self._creating and not self._done:
            self._fail_soon(Cancelled(f"{self.kind} cancelled while its domain was being built",
                                      op=self))
            return True
        if (self._head is not None or self._launch is not None) and not self._done:
            self._head_failed(Cancelled(f"{self.kind} cancelled waiting for the stream's head",
                                        op=self))
            return True
        if self._trailer is not None and not self._done:
            self._stop_trailer(Cancelled(f"{self.kind} of domain {self.domid} cancelled",
                                         op=self))
            return True
        return super().cancel(grace)

    def _finish_restore(self, records: List[Tuple[int, bytes]],
                        exc: Optional[OperationError]) -> None:
        if exc is None and self._unzstd is not None and self._fd >= 0:
            # A compressed image is checked to its end (no more bytes, the
            # checksum) before anything of it runs.
            def checked(why: Optional[str]) -> None:
                self._close()
                self._finish_restore(records, None if why is None else CorruptImage(
                    f"{self._where()}: {why}", op=self))
            self._unzstd.finish_reading(self.loop, self._fd, checked)
            return
        self._close()
        if exc is not None:
            self._fail_and_destroy(exc)
            return
        assert self.helper is not None and self.helper.results is not None
        res = self.helper.results
        if not records and self.stream_type == STREAM_REMUS:
            # A checkpointed stream carries the device model's state with each
            # checkpoint; the domain stands at the last one.
            records = list(self.checkpoint_records)

        def finished(ok: bool, why: str) -> None:
            if not self._went_on(ok, why):
                return
            try:
                self._aux.append(self.backend.start_restore_device_model(self.loop, self.domid,
                                                                         records, running))
            except Exception as err:  # a backend is the caller's code (any toolstack's)
                running(False, str(err))

        def running(ok: bool, why: str) -> None:
            if not self._went_on(ok, f"its device model did not start: {why}"):
                return
            if self.paused:
                unpaused(True, "")
                return
            handle = start_unpause(self.backend, self.loop, self.domid, unpaused)
            if handle is not None:
                self._aux.append(handle)

        def unpaused(ok: bool, why: str) -> None:
            if not self._went_on(ok, why):
                return
            self._finish(RestoreResult(self.domid, res.store_gfn, res.console_gfn, self.config,
                                       time.monotonic() - self.started, emulator_records=records,
                                       checkpoints=self.checkpoints, failover=self.failed_over))

        # As libxl: the domain is finished (a real host: XenStore nodes,
        # introduction to xenstored with the restored store page) before its
        # device model starts on the saved state.
        handle = start_restore_done(self.backend, self.loop, self.domid, res.store_gfn,
                                    res.console_gfn, finished)
        if handle is not None:
            self._aux.append(handle)

    def _finish(self, result: Optional[RestoreResult] = None,
                exc: Optional[OperationError] = None) -> None:
        stage = self._unzstd
        if stage is None or (exc is None and stage.finished):
            super()._finish(result, exc)
            return
        # A failure (the domain is gone already): the decompressor is reaped
        # first, and if the image was what failed, it says why.
        self._unzstd = None
        self._close()

        def settled() -> None:
            err = exc
            if stage.refused and not isinstance(exc, CorruptImage):
                err = CorruptImage(f"{self._where()}: {stage.why}", op=self)
            super(RestoreOperation, self)._finish(result, err)

        stage.settle(self.loop, 2.0, settled)

    def _went_on(self, ok: bool, why: str) -> bool:
        """After one of the steps that start a restored domain: whether the
        next may run.  If not, the restore has failed -- cancelled or timed out
        meanwhile, or the step failed (``why``) -- and its domain goes."""
        if self._failure is not None:
            self._fail_and_destroy(self._failure)
            return False
        if not ok:
            self._wont_start(why)
            return False
        return True

    def _wont_start(self, why: object) -> None:
        self._fail_and_destroy(OperationError(f"restored domain {self.domid} would not start: {why}",
                                              op=self))

    def _read_trailer(self) -> List[Tuple[int, bytes]]:
        """libxl records after the libxc stream, up to END."""
        try:
            return read_trailer(self._fd, RecordType.END, limits=self.limits)
        except TruncatedStream:
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


