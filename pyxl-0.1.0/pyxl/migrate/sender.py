"""The sending side of a migration: :class:`MigrateOperation` (:func:`pyxl.migrate.migrate` starts one).

This module owns the sender's decisions: when to start the save (the
receiver's banner), where its stream goes (a pipe that a
:class:`~pyxl.migrate.relay.SpliceRelay` empties into the connection), when
to clear the receiver (its READY, after renaming the source
``NAME--migratedaway``), and what becomes of the source on every outcome --
destroyed after the receiver's status 0, running after any failure before
"cleared to unpause", paused when in doubt.  Bytes go through
:class:`~pyxl.migrate.handshake.SenderHandshake`; the channel is
:class:`~pyxl.migrate.connection.ReceiverChannel`.  It may import the
handshake, relay, connection, domain, future, precopy, converge, sendoptions, tls and tlsstage
modules of this package, pyxl.ops (SaveOperation), pyxl.backends, pyxl.errors, pyxl.fdio
and pyxl.loop; the receiver's module never.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional, Set, Tuple, Union

from pyxl._log import get_logger, log_failure
from pyxl._paths import helper_path
from pyxl.backends import Backend, default_backend
from pyxl.backends.base import start_destroy, start_domain_config, start_rename, start_unpause
from pyxl.errors import (MigrationAuthError, MigrationError, MigrationInDoubt,
                         MigrationProtocolError, OperationError, StartupError)
from pyxl.fdio import FdWriter, close_quietly, set_nonblocking, write_from_loop
from pyxl.loop import Loop, Timer
from pyxl.migrate.connection import ReceiverChannel
from pyxl.migrate.converge import PAGE, Policy, PolicyDriver, target_policy
from pyxl.migrate.domain import AWAY, digest_or_none, domain_name
from pyxl.migrate.future import MigrationFuture
from pyxl.migrate.handshake import (NEED_DATA, OFFER_WAIT, Banner, ClearedToUnpause,
                                    CompressionChosen, DomainReceived, ReceiverFailed,
                                    ReceiverProgress, SenderHandshake, UnpauseResult)
from pyxl.migrate.precopy import OnFail, precopy_env
from pyxl.migrate.relay import CAPPED_PIPE, CHUNK, IDLE_MIN_BYTES, SpliceRelay, make_pipe
from pyxl.migrate.sendoptions import MigrateResult, check_send_args
from pyxl.migrate.tls import TlsOptions
from pyxl.migrate.tlsstage import CLOSED_EARLY
from pyxl.ops.api import save
from pyxl.ops.operation import STREAM_PLAIN, STREAM_REMUS, ProgressEvent
from pyxl.ops.jobstats import JobStats
from pyxl.ops.save import SaveOperation, SaveResult
from pyxl.stream import xl as stream_xl
from pyxl.stream.xl import XL_OPTIONAL_PYXL_ZSTD

__all__ = ["MigrateOperation", "MigrateResult"]

CATCH_UP = 8 << 20    # raw bytes a compressed stream's receiver may be behind at the switch-over
#: A receiver's reason when it refused the sender's certificate (its allow-list, or
#: its TLS check: pyxl.migrate.reasons.peer_reason of a MigrationAuthError).
NOT_AUTHORIZED = "not authorized"
HOLD_MAX = 30.0       # s the switch-over waits for it at most


class MigrateOperation(MigrationFuture[MigrateResult]):
    """Migrate one domain to a receiver; see :func:`migrate`.

    Who keeps the guest:

    * The source is destroyed only after the receiver reported that its copy
      runs (status 0).
    * Any failure before "cleared to unpause" was sent leaves the source
      running: libxc's error path during precopy; the save's own resume after
      the suspend; an explicit unpause when the save had finished (the source
      is kept paused until the receiver answers).  A status byte != 0 means
      the receiver destroyed its copy, so the source runs again too.
    * If the connection is lost after "cleared to unpause" and before the
      status, the receiver may or may not run the guest: the source is left
      paused (never two running copies) and :class:`MigrationInDoubt` says so.
    * Remus: a stream that breaks after a complete checkpoint makes the
      receiver fail over to it; the source is paused (in doubt) too.
    """

    def __init__(self, domid: int, target: Optional[Union[str, Tuple[str, int]]] = None, *,
                 command: Optional[str] = None, live: bool = False,
                 downtime_ms: Optional[float] = None, max_iterations: Optional[int] = None,
                 on_fail: OnFail = "abort", max_bandwidth: Optional[int] = None,
                 helper: Optional[str] = None, timeout: Optional[float] = None,
                 loop: Optional[Loop] = None, sim_dir: Optional[str] = None,
                 backend: Optional[Backend] = None, digest: bool = False,
                 on_progress: Optional[Callable[[ProgressEvent], None]] = None,
                 handshake_timeout: float = 60.0, remus: bool = False,
                 checkpoints: Optional[int] = None, checkpoint_interval: float = 0.1,
                 tls: Optional[TlsOptions] = None,
                 idle_timeout: Optional[float] = 60.0, auto_converge: bool = False,
                 policy: Optional[Policy] = None, policy_deadline: float = 5.0,
                 compress: bool = False, insecure: bool = False) -> None:
        check_send_args(target, command, tls, insecure, handshake_timeout, idle_timeout, live,
                        remus, compress, checkpoints, downtime_ms, max_bandwidth)
        self.handshake_timeout, self.idle_timeout = handshake_timeout, idle_timeout
        self._idle_mark = -1
        self.compress = compress
        self.compressed = False           # the receiver took the offer
        self._config: Optional[Dict[str, Any]] = None
        # The offer: "" (none made), "writing" the xl header that makes it,
        # "waiting" for the answer, "answered" (the save may start once written).
        self._offer = ""
        self._offer_written = False
        # A compressed stream: the receiver's restore progress (raw bytes), and
        # the suspend that waits for it to catch up.
        self._restored: Optional[int] = None
        self._held_suspend: Optional[Callable[[], None]] = None
        self.remus, self.checkpoints = remus, checkpoints
        self.checkpoint_interval = checkpoint_interval
        if auto_converge:
            if downtime_ms is None or policy is not None:
                raise ValueError("auto_converge needs a downtime target (and no policy of yours)")
            policy = target_policy(downtime_ms, max_rounds=max_iterations or 30,
                                   on_fail=on_fail, auto_converge=True)
            downtime_ms = max_iterations = None
        if policy is not None:
            if not live or remus:
                raise ValueError("a switch-over policy needs a live, non-Remus migration")
            if downtime_ms is not None:
                raise ValueError("give a downtime target or a policy, not both")
            if os.path.basename(helper_path(helper)) != "pyxl-save-helper":
                raise ValueError(f"a switch-over policy needs pyxl's helper (the precopy_round "
                                 f"extension); {helper_path(helper)} speaks Xen's protocol only")
        self.env = precopy_env(downtime_ms, max_iterations, on_fail)
        if policy is not None:
            self.env = {"PYXL_PRECOPY": "host"}
        if self.env and os.path.basename(helper_path(helper)) != "pyxl-save-helper":
            get_logger("pyxl.migrate").warning(
                "helper %s may not implement PYXL_PRECOPY: it may use Xen's default policy",
                helper_path(helper))
        self.domid = domid
        self.kind = f"migration of domain {domid}"
        self.logger = get_logger(f"pyxl.migrate.{domid}")
        self.backend = backend or default_backend(sim_dir)
        self.backend.check_domain(domid)
        self.live, self.helper, self.max_bandwidth = live, helper, max_bandwidth
        self.want_digest = digest
        self.on_progress = on_progress
        self.driver: Optional[PolicyDriver] = None
        if policy is not None:   # checked before anything that needs undoing
            self.driver = PolicyDriver(loop, self.backend, domid, policy,
                                       deadline=policy_deadline, fail=self._policy_failed)
        super().__init__(loop, timeout)
        if self.driver is not None:
            self.driver.loop = self.loop
        self.handshake = SenderHandshake()
        self.channel: Optional[ReceiverChannel] = None
        self.save: Optional[SaveOperation] = None
        self.relay: Optional[SpliceRelay] = None
        self.outbox: Optional[FdWriter] = None
        self._error: Optional[OperationError] = None
        self._rounds: Set[int] = set()
        self._pipe_w = -1
        self._pipe_r = -1
        self.rfd = self.wfd = -1
        self._stream_sent = False
        self._save_result: Optional[SaveResult] = None
        self._source_paused = False   # by us, after a finished save
        self._go_sent = False
        self._name: Optional[str] = None   # the source's while it is NAME--migratedaway
        self._renaming = False             # to NAME--migratedaway, on the loop
        self._teardown_waits: Optional[bool] = None   # for the rename: its resume argument
        self._reading = False
        self._done_pending: Optional[Tuple[Any, Optional[OperationError]]] = None
        self._handshake_timer: Optional[Timer] = self.loop.call_later(
            handshake_timeout, self._no_banner)
        self._timers.append(self._handshake_timer)
        self._plain_tcp = target is not None and tls is None   # for a hint on a silent peer
        self._listening = target is not None   # not a command: one that hangs up early is full
        try:
            self.channel = ReceiverChannel(self.loop, target, command, self._ready_transport,
                                           self._channel_failed, tls=tls, insecure=insecure)
        except BaseException as exc:
            self._close_transport()
            for t in self._timers:
                t.cancel()
            if isinstance(exc, OSError):
                raise StartupError(f"cannot reach the receiver: "
                                   f"{exc.strerror or exc}") from exc
            raise

    # -- transport --

    def _ready_transport(self, rfd: int, wfd: int) -> None:
        self.rfd, self.wfd = rfd, wfd
        set_nonblocking(self.rfd, True)
        set_nonblocking(self.wfd, True)
        self.outbox = FdWriter(self.loop, self.wfd, self._write_failed)
        self._reading = True
        self.loop.add_reader(self.rfd, self._readable)

    def _close_transport(self) -> None:
        if self._reading:
            self.loop.remove_reader(self.rfd)
            self._reading = False
        if self.outbox is not None:
            self.outbox.close()
        if self.relay is not None:
            self.relay.close()
        if self.channel is not None:
            self.channel.close()

    # -- receiver's messages --

    def _readable(self) -> None:
        try:
            data = os.read(self.rfd, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            early = f" ({CLOSED_EARLY})" if self._early() else ""
            self._lost(f"reading from the receiver failed: {exc.strerror}{early}")
            return
        self.handshake.receive_data(data)
        self._process()

    def _early(self) -> bool:
        """Before its banner, a listening receiver that hangs up is full or
        refuses us (a command's own exit status says why it ended instead).
        Over TLS too: TLS 1.3's client is done with its handshake a flight
        before the server, which may still drop it as pending."""
        return self._listening and self.handshake.state == SenderHandshake.AWAIT_BANNER

    def _process(self) -> None:
        received = False
        while not self._done and self._error is None:
            try:
                event = self.handshake.next_event()
            except MigrationProtocolError as exc:
                if self._go_sent:
                    self._in_doubt(exc.brief, cause=exc)
                else:
                    self._fail(exc)
                return
            if event is NEED_DATA:
                if received:
                    # Only now: whatever came with "ready" has been parsed (a
                    # status sent before we clear it must not be taken after).
                    self._send_go()
                return
            if isinstance(event, Banner):
                problem = self.channel.unauthenticated_receiver() if self.channel else None
                if problem is not None:
                    self._fail(MigrationAuthError(problem))
                    return
                self._start_stream()
            elif isinstance(event, CompressionChosen):
                self._offer_answered(event.name)
            elif isinstance(event, ReceiverProgress):
                self._receiver_caught_up(event.restored)
            elif isinstance(event, DomainReceived):
                received = True
            elif isinstance(event, UnpauseResult):
                self._reported(event.status)
                return
            elif isinstance(event, ReceiverFailed):
                if event.reason == NOT_AUTHORIZED:      # its allow-list refused our certificate
                    self._fail(MigrationAuthError(f"the receiver failed: {event.reason} (this "
                                                  "sender's certificate names are not on its "
                                                  "allow-list)"))
                else:
                    self._fail(MigrationError(f"the receiver failed: {event.reason}"))
                return
            else:   # ConnectionClosed
                self._lost(CLOSED_EARLY if self._early() else "the receiver closed the connection")
                return

    # -- the save --

    def _no_banner(self) -> None:
        self._handshake_timer = None
        if self.handshake.state == SenderHandshake.AWAIT_BANNER:
            # A TLS receiver waits, silent, for a TLS client's first words.
            hint = " (a receiver that wants TLS waits for it: give the sender --tls-*)" \
                if self._plain_tcp else ""
            self._fail(MigrationError("no migration receiver answered within the handshake "
                                      f"timeout{hint}"))

    def _start_stream(self) -> None:
        """The banner came: the relay, then the save -- or first, with
        ``compress``, the offer (:mod:`.handshake`) and its answer."""
        if self._handshake_timer is not None:
            self._handshake_timer.cancel()
            self._handshake_timer = None
        r, w = make_pipe(CAPPED_PIPE if self.max_bandwidth else CHUNK)
        self._pipe_r, self._pipe_w = r, w
        self.relay = SpliceRelay(self.loop, r, self.wfd, self.max_bandwidth, self._relayed,
                                 self._write_failed)
        if not self.compress:
            self._start_save()
            return
        # the config for the offer's xl header (a real host's XenStore round, on the loop)
        pending = start_domain_config(self.backend, self.loop, self.domid, self._offer_config)
        if pending is not None:
            self._timers.append(pending)

    def _offer_config(self, config: Optional[Dict[str, Any]],
                      exc: Optional[StartupError]) -> None:
        """The compression offer: an xl header with pyxl's optional flag, sent
        alone; the save starts once it is written and the receiver answered."""
        if self._done or self._error is not None:
            return
        if config is None:
            assert exc is not None
            self._fail(exc)
            return
        self._config = config
        try:
            head = stream_xl.xl_header(config, optional_flags=XL_OPTIONAL_PYXL_ZSTD)
        except ValueError as err:
            self._fail(StartupError(f"cannot write domain {self.domid}'s config: {err}"))
            return
        w = self._pipe_w
        self._offer = "waiting"
        self.handshake.offer_sent()
        self._timers.append(self.loop.call_later(OFFER_WAIT, lambda: self._offer_answered(None)))

        def written(err: Optional[OSError]) -> None:
            if err is not None:
                self._write_failed(err)
                return
            self._offer_written = True
            if self._offer == "answered" and self.save is None:
                self._start_save()            # the answer came while it was written

        write_from_loop(self.loop, w, head, written)

    def _offer_answered(self, name: Optional[str]) -> None:
        """The receiver's answer (None: none within OFFER_WAIT, an xl receiver)."""
        if self._offer != "waiting" or self._done or self._error is not None:
            if name is not None:
                self.logger.debug("the receiver answered %r after the stream had started", name)
            return
        if name is None:
            self.logger.warning("no answer to the compression offer within %gs (an xl receiver?): "
                             "sending the stream uncompressed", OFFER_WAIT)
        self.compressed = name == "zstd"
        self._offer = "answered"
        if self._offer_written:
            self._start_save()

    def _hold_suspend(self, go: Callable[[], None]) -> None:
        """Compressed: suspend only once the receiver's restore is within
        CATCH_UP of what we have compressed (memory that compresses a
        hundredfold outruns any restore, and what waits in buffers at the
        switch-over would be downtime).  Not without a word from it yet, and
        never longer than HOLD_MAX."""
        if self._restored is None:
            go()
            return
        self._held_suspend = go
        self.logger.debug("suspend held: the receiver is %d bytes behind", self._behind())
        self._timers.append(self.loop.call_later(HOLD_MAX, self._release_suspend))
        self._receiver_caught_up(self._restored)

    def _behind(self) -> int:
        sent = self.save.raw_streamed if self.save is not None else None
        return 0 if sent is None or self._restored is None else sent - self._restored

    def _receiver_caught_up(self, restored: int) -> None:
        self._restored = restored
        if self._held_suspend is not None and self._behind() <= CATCH_UP:
            self._release_suspend()

    def _release_suspend(self) -> None:
        go, self._held_suspend = self._held_suspend, None
        if go is not None:
            self._phase(f"suspend released ({self._behind()} bytes behind)")
            go()

    def _start_save(self) -> None:
        try:
            offered = self.compress
            self.save = save(self.domid, self._pipe_w, live=self.live, leave="paused",
                             compress=self.compressed, xl_header=not offered or self.compressed,
                             config=self._config,
                             before_suspend=self._hold_suspend if self.compressed else None,
                             helper=self.helper, loop=self.loop, backend=self.backend,
                             helper_env=self.env,
                             write_trailer=self.relay.finish if self.relay else None,
                             on_progress=self._progress,
                             stream_type=STREAM_REMUS if self.remus else STREAM_PLAIN,
                             checkpoints=self.checkpoints,
                             checkpoint_interval=self.checkpoint_interval,
                             callbacks={"precopy_round": self.driver} if self.driver else None)
        except OperationError as exc:
            self._fail(exc)
            return
        self.save.add_done_callback(self._saved)
        self._arm_idle()

    def _arm_idle(self) -> None:
        """Stream inactivity: a receiver that takes nothing for ``idle_timeout``
        (the save helper then blocks, maybe with the source suspended) fails
        the migration; the source runs on.  A Remus stream is quiet between
        checkpoints: there only a relay held up by the receiver counts (a
        checkpoint it stopped reading keeps the source suspended)."""
        if self.idle_timeout is not None:
            self._timers.append(self.loop.call_later(self.idle_timeout, self._idle_check))

    def _idle_check(self) -> None:
        relay = self.relay
        if (self._done or self._error is not None or relay is None or relay.finished
                or self.handshake.state != SenderHandshake.STREAMING):
            return
        moved = relay.sent - self._idle_mark      # the first check only takes the mark
        # Nothing moved (and not a Remus stream between checkpoints), or the
        # receiver takes a trickle while bytes wait for it: that keeps the
        # source suspended as surely as taking nothing (not our own cap).
        if self._idle_mark >= 0 and ((moved == 0 and not self.remus) or
                                     (moved < IDLE_MIN_BYTES and relay.waiting_on_peer)):
            self._fail(MigrationError(
                f"the stream did not move for {self.idle_timeout:g}s" if moved == 0 else
                f"the receiver took under {IDLE_MIN_BYTES >> 10} KiB in {self.idle_timeout:g}s"))
            return
        self._idle_mark = relay.sent
        self._arm_idle()

    def stats(self) -> JobStats:
        """A live snapshot (``virsh domjobinfo``): the save's phase, precopy round and
        pages, the stream bytes sent to the receiver so far, rate and time left for
        a first pass over the guest's memory; with a switch-over policy (or
        ``auto_converge``) also the dirty rate and predicted downtime of the last
        round."""
        last = self.driver.rounds[-1] if self.driver is not None and self.driver.rounds else None
        return self._job_stats(
            self.save, self.relay.sent if self.relay is not None else 0,
            dirty_rate=None if last is None else last.dirty_rate * PAGE,
            predicted_downtime=None if last is None else last.predicted_downtime)

    def _phase(self, what: str) -> None:
        """Debug timeline of the switch-over (ms since the suspend)."""
        t = self.save.suspended_at if self.save is not None else None
        if t is not None:
            self.logger.debug("+%.1f ms after suspend: %s", (time.monotonic() - t) * 1e3, what)
        else:
            self.logger.debug("%s", what)

    def _progress(self, ev: ProgressEvent) -> None:
        if ev.iteration is not None and self.save is not None and not self.save.suspended:
            self._rounds.add(ev.iteration)
        if self.on_progress is not None:
            self.on_progress(ev)

    def _saved(self, op: Any) -> None:
        close_quietly(self._pipe_w)
        self._pipe_w = -1
        exc = op.exception()
        if exc is not None:
            # The save put the source back (libxc's error path, or its resume).
            if self.relay is not None:
                self.relay.close()
            self._fail(self._error or exc)
            return
        self._save_result = op.result()
        self._source_paused = True
        self._phase("save done (helper exited)")
        if self._error is not None:
            self._teardown()

    def _relayed(self) -> None:
        self._phase(f"stream sent ({self.relay.sent if self.relay else 0} bytes)")
        self._stream_sent = True
        if self.handshake.state == SenderHandshake.STREAMING:
            self.handshake.stream_sent()
            self._deadline(SenderHandshake.AWAIT_READY, "no \"ready\" from the receiver")
            self._process()

    def _deadline(self, state: str, what: str) -> None:
        """Fail if the handshake still waits in ``state`` after handshake_timeout."""
        def check() -> None:
            if not self._done and self.handshake.state == state:
                self._lost(f"{what} within {self.handshake_timeout:g}s")
        self._timers.append(self.loop.call_later(self.handshake_timeout, check))

    def _send_go(self) -> None:
        self._phase("receiver ready; clearing it to unpause")
        assert self.outbox is not None and self.save is not None
        name = domain_name(self.save.config)
        if name is None:
            self._clear_to_unpause()
            return

        def renamed(ok: bool, why: str) -> None:
            self._renaming = False
            if ok:
                self._name = name
            if self._teardown_waits is not None:
                # Failed meanwhile: the teardown waited for this rename.
                resume, self._teardown_waits = self._teardown_waits, None
                self._restore_name(lambda: self._teardown(resume))
            elif self._done or self._done_pending is not None:
                self._restore_name(lambda: None)   # ended meanwhile, without a teardown
            elif not ok:
                self._fail(MigrationError(f"cannot rename domain {self.domid} to "
                                          f"{name}{AWAY}: {why}"))
            else:
                self._clear_to_unpause()

        # Free the name for the receiver's copy (both may run on one host).
        self._renaming = True
        start_rename(self.backend, self.loop, self.domid, f"{name}{AWAY}", renamed)

    def _clear_to_unpause(self) -> None:
        assert self.outbox is not None
        if self._done or self._error is not None or \
                self.handshake.state != SenderHandshake.MAY_CLEAR:
            return      # failed while the source was renamed (the receiver said so)
        go = self.handshake.send(ClearedToUnpause())
        self._go_sent = True
        self.outbox.send(go)
        self._deadline(SenderHandshake.AWAIT_REPORT, "no unpause status from the receiver")

    def _reported(self, status: int) -> None:
        end = time.monotonic()
        self._phase(f"receiver reports status {status}")
        save = self.save
        assert save is not None and self._save_result is not None
        if status != 0:
            exc = MigrationError(f"the receiver could not start its copy (status {status}); it "
                                 "destroyed it")
            self._error = self._error or exc    # what a failure meanwhile must not replace
            self._restore_name(lambda: self._fail(exc, resume=True))
            return
        digest = digest_or_none(self.backend, self.logger, self.domid) \
            if self.want_digest else None
        self._source_paused = False
        downtime = None if save.suspended_at is None else end - save.suspended_at
        assert self.relay is not None
        result = MigrateResult(self.domid, downtime, len(self._rounds), self.relay.sent,
                               end - self.started, digest, self._save_result,
                               self._save_result.checkpoints,
                               min(self.driver.caps, default=0) if self.driver else 0,
                               self.compressed)
        self._close_transport()
        self._done_pending = (result, None)

        def destroyed(ok: bool, why: str) -> None:
            if not ok:   # the guest runs at the destination: report, go on
                self.logger.error("migrated domain %d, but could not destroy the source: %s",
                                  self.domid, why)
            self._maybe_finish()

        # The source goes on the loop's terms (its devices' hotplug scripts, a
        # large domain's memory): the migration is done once it is gone.
        # Not called off by a timeout: a destroy, once begun, goes to its end.
        start_destroy(self.backend, self.loop, self.domid, destroyed)

    # -- failures --

    def _restore_name(self, then: Callable[[], None]) -> None:
        """Give the source its name back, on the loop, then ``then()`` (a teardown waits)."""
        name = self._name
        if name is None:
            then()
            return

        def back(ok: bool, why: str) -> None:
            self._renaming, self._teardown_waits = False, None   # ``then`` is the one that waited
            if not ok:
                self.logger.error("could not rename domain %d back to %s: %s", self.domid, name, why)
            self._name = None if ok else name
            then()
        self._renaming = True
        start_rename(self.backend, self.loop, self.domid, name, back)

    def _channel_failed(self, exc: OperationError) -> None:
        """The channel broke (no connection, TLS refused or broken): once the
        receiver was cleared, that is a lost status like any other."""
        if self._go_sent:
            self._in_doubt(exc.brief, cause=exc)
        else:
            self._fail(exc)

    def _write_failed(self, exc: OSError) -> None:
        self._lost(f"writing to the receiver failed: {exc.strerror}")

    def _lost(self, why: str) -> None:
        if self._go_sent:
            self._in_doubt(why)
        else:
            self._fail(MigrationError(why))

    def _in_doubt(self, why: str, cause: Optional[BaseException] = None) -> None:
        doubt = MigrationInDoubt(
            f"{why} after clearing the receiver to unpause: domain {self.domid} may run "
            "there; the source is left paused", source_state="paused")
        doubt.__cause__ = cause
        self._fail(doubt)

    def _policy_failed(self, exc: OperationError) -> None:
        """The policy misbehaved or aborted: the helper is told to abort, and its
        failure is reported as this."""
        if self._error is None:
            self._error = exc

    def _fail(self, exc: OperationError, resume: bool = False) -> None:
        if self._done or self._done_pending is not None:
            return
        if self._go_sent and not resume and not isinstance(exc, MigrationInDoubt):
            # Whatever ends it now (a timeout, a cancel, the caller's own
            # callback) ends it with the receiver cleared to run the guest.
            self._in_doubt(exc.brief, cause=exc)
            return
        if self._error is None:
            self._error = exc
        self._teardown(resume=resume)

    def _teardown(self, resume: bool = False) -> None:
        if self._reading:
            self.loop.remove_reader(self.rfd)
            self._reading = False
        if self.relay is not None and not self.relay.finished:
            self.relay.abandon()
        if self.save is not None and not self.save.done():
            self.save.cancel(grace=5.0)   # _saved() comes back here
            return
        if self._renaming:
            self._teardown_waits = resume   # the rename's end comes back here
            return
        if self.driver is not None:
            self.driver.restore()        # the guest runs on uncapped
        exc = self._error
        assert exc is not None
        state = None
        taken = self.save.checkpoints if self.save is not None else 0
        if self.remus and taken and self._save_result is None:
            # The stream broke after a complete checkpoint: the receiver fails
            # over to it and runs the guest.  The source must not run too.
            try:
                self.backend.pause(self.domid)
                state = "paused"
            except Exception as err:
                self.logger.error("could not pause domain %d: %s", self.domid, err)
            doubt = MigrationInDoubt(
                f"{exc.brief if isinstance(exc, OperationError) else exc}; the stream ended "
                f"after checkpoint {taken}: the receiver takes over from it (failover); "
                "the source is left paused", source_state=state)
            doubt.__cause__ = exc
            exc = self._error = doubt
        elif self._source_paused and (not self._go_sent or resume):
            self._done_pending = (None, exc)   # a failure meanwhile is not torn down again

            def unpaused(ok: bool, why: str) -> None:
                if ok:
                    self._source_paused = False
                else:
                    self.logger.error("could not unpause domain %d after the failed migration: "
                                      "%s", self.domid, why)
                self._failed(exc, "running" if ok else None)
            start_unpause(self.backend, self.loop, self.domid, unpaused)
            return
        elif self._source_paused:
            state = "paused"
        else:
            state = self.backend.state(self.domid)
        self._failed(exc, state)

    def _failed(self, exc: OperationError, state: Optional[str]) -> None:
        """The end of a failure: the source is left in ``state``; report ``exc``."""
        exc.source_state = exc.source_state or state   # a save's error too
        self._close_transport()
        close_quietly(self._pipe_r)
        self._pipe_r = -1
        log_failure(self.logger, exc)   # once: not again if it is its save's
        self._done_pending = (None, exc)
        self._maybe_finish()

    def _maybe_finish(self) -> None:
        # A command (ssh ...) exits once its pipes close; wait for it.
        if self.channel is not None:
            self.channel.when_gone(self._really_finish)
        else:
            self._really_finish()

    def _really_finish(self) -> None:
        if self._done or self._done_pending is None:
            return
        close_quietly(self._pipe_r)
        self._pipe_r = -1
        result, exc = self._done_pending
        ended = self.channel.command_ended() if self.channel is not None else ""
        if exc is not None and ended:   # ssh's 255, a receiver's 2: the user's next clue
            exc.brief = f"{exc.brief} ({ended})"
            exc.args = (f"{exc.args[0]} ({ended})",) + tuple(exc.args[1:])
        if self.driver is not None:
            self.driver.restore()
        self._finish(result, exc)

