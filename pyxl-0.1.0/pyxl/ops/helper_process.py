"""One run of a save/restore helper, driven from an event loop.

This is pyxl's equivalent of libxl's ``libxl_save_callout.c``: spawn the helper
with Xen 4.17's argv, feed its stdout to the sans-I/O :class:`Conversation`,
hand messages to the owner, write replies, and watch the child's exit through a
pidfd.  It never blocks: the pipes are non-blocking and every wait is an fd
watch or a timer on the caller's loop.
"""

from __future__ import annotations

import errno
import os
import signal
from typing import Callable, Dict, List, Optional, Sequence

from pyxl.fdio import close_quietly, set_nonblocking
from pyxl.loop import Loop, Timer, ignore
from pyxl.errors import ProtocolError, RemoteProtocolError
from pyxl.spawn import Child, inherited_stderr
from pyxl.wire.codec import Complete, Conversation, Log, Message, Progress, RestoreResults

# Bytes to read per readiness event, one read per event: a helper that floods
# its stdout (libxc reports progress per batch of 1024 pfns, about 100
# messages per 4 KiB) costs the loop a bounded slice (about 1 ms) and other
# fds get their turn.  A longer frame is kept by the decoder until complete.
_READ_SIZE = 1 << 12

#: Seconds a helper may live on after closing its stdout (without sending
#: ``complete``) before it is killed: it can no longer talk to us, and one that
#: is exiting has long been reaped by then.
EOF_GRACE = 1.0


def save_argv(helper: str, io_fd: int, back_fd: int, domid: int, xcflags: int,
              cbflags: int, stream_type: int = 0) -> List[str]:
    return [helper, "--save-domain", str(io_fd), str(back_fd), str(domid), str(xcflags),
            str(cbflags), str(stream_type)]


def restore_argv(helper: str, io_fd: int, back_fd: int, domid: int, store_evtchn: int,
                 store_domid: int, console_evtchn: int, console_domid: int, cbflags: int,
                 stream_type: int = 0) -> List[str]:
    return [helper, "--restore-domain", str(io_fd), str(back_fd), str(domid), str(store_evtchn),
            str(store_domid), str(console_evtchn), str(console_domid), str(cbflags),
            str(stream_type)]


class HelperProcess:
    """A running helper.  ``on_message(msg)`` sees every message; callbacks are
    answered with :meth:`reply`.  ``on_exit(self)`` runs once, after the child
    was reaped and its stdout is finished; read the outcome from
    ``wait_status``, ``complete``, ``results`` and ``protocol_error``.
    """

    def __init__(self, loop: Loop, argv: Sequence[str], mode: str, cbflags: int,
                 pass_fds: Sequence[int], on_message: Callable[[Message], None],
                 on_exit: Callable[["HelperProcess"], None],
                 env: Optional[Dict[str, str]] = None) -> None:
        self.loop = loop
        self.argv = list(argv)
        # pyxl's extension (precopy_round) only when the host asked for it.
        host_policy = (env or {}).get("PYXL_PRECOPY") == "host"
        self.conv = Conversation(mode, cbflags,
                                 frozenset({"precopy_round"}) if host_policy else frozenset())
        self._on_message = on_message
        self._on_exit = on_exit
        self.wait_status: Optional[int] = None
        #: reaped by someone else: ``wait_status`` 0 stands for "unknown"
        self.status_unknown = False
        self.protocol_error: Optional[ProtocolError] = None
        #: stdout ended inside a frame; a protocol error only if the helper
        #: then exits 0 (a helper that died or failed explains the cut itself)
        self.truncated: Optional[ProtocolError] = None
        self._eof_timer: Optional[Timer] = None
        self._replies = bytearray()
        self._stdout_open = True
        self._completed = False
        self._exited = False
        self._reported = False
        self._kill_timer: Optional[Timer] = None
        #: the helper never ran (its program missing, no fds): why
        self.start_error: Optional[OSError] = None
        # The child gets only its stdin/stdout pipes, pass_fds and our stderr,
        # as libxl's CLOEXEC discipline leaves it.  It leads its own process
        # group, so a terminal's Ctrl-C (SIGINT to the foreground group) reaches
        # pyxl only, which cancels once and cleanly.  Started by the spawner
        # (pyxl.spawn): this call only sends the request, it never waits.
        in_r, self._in = os.pipe2(os.O_CLOEXEC)
        self._out, out_w = os.pipe2(os.O_CLOEXEC)
        try:
            fds = {0: in_r, 1: out_w, **inherited_stderr()}
            fds.update((fd, fd) for fd in pass_fds)
            self.child = Child(loop, self.argv, self._child_exited, fds=fds, env=env,
                               started=self._started)
        except BaseException:
            os.close(self._in)
            os.close(self._out)
            raise
        finally:
            os.close(in_r)
            os.close(out_w)
        set_nonblocking(self._in)
        set_nonblocking(self._out)

    def _started(self) -> None:
        # Its messages are read once its pid is known: a callback that acts on
        # one (or a test that signals the helper then) always has the pid.
        if self._stdout_open:
            self.loop.add_reader(self._out, self._readable)

    @property
    def pid(self) -> int:
        """The helper's pid (-1 until the spawner has started it)."""
        return self.child.pid

    # -- stdout -----------------------------------------------------------

    def _readable(self) -> None:
        self._drain(until_eof=False)

    def _drain(self, until_eof: bool) -> None:
        while self._stdout_open:
            try:
                data = os.read(self._out, _READ_SIZE)
            except BlockingIOError:
                if until_eof:
                    # The helper is gone but something (a grandchild?) still
                    # holds the pipe: stop reading rather than wait.
                    self._close_stdout()
                return
            except OSError as exc:
                self._fail_protocol(RemoteProtocolError(f"read error: {exc}", self.conv.decoder.offset))
                return
            if self._completed:
                # After complete, Xen's helper (and ours) still calls
                # xc_interface_close(), which on real Xen logs (hypercall
                # buffer statistics).  libxl keeps reading until the helper
                # exits; closing the pipe here killed the helper with SIGPIPE.
                # Nothing after complete is interpreted: drained until EOF.
                if not data:
                    self._close_stdout()
                    return
                continue
            try:
                msgs = self.conv.receive(data)
            except ProtocolError as exc:
                for msg in getattr(exc, "before", None) or ():
                    # Its last words may say why: the logs (and progress) up to
                    # the first message that would be acted on are delivered.
                    if not isinstance(msg, (Log, Progress)):
                        break
                    self._on_message(msg)
                if data:
                    self._fail_protocol(exc)
                else:
                    self.truncated = exc
                    self._stdout_ended()
                return
            if not data:
                self._stdout_ended()
                return
            for msg in msgs:
                self._on_message(msg)
                if isinstance(msg, Complete):
                    # Nothing after complete is interpreted (see above).
                    self._completed = True
                    break
            if not until_eof:
                return

    def _close_stdout(self) -> None:
        if self._stdout_open:
            self._stdout_open = False
            self.loop.remove_reader(self._out)
            os.close(self._out)
            self._maybe_report()

    def _stdout_ended(self) -> None:
        """EOF on stdout.  A helper that lives on without it can only hang (it
        waits for replies to messages we never saw): kill it after a grace."""
        self._close_stdout()
        if not self._exited and self._eof_timer is None:
            self._eof_timer = self.loop.call_later(EOF_GRACE, self._silent_but_alive)

    def _silent_but_alive(self) -> None:
        self._eof_timer = None
        if not self._exited:
            self._fail_protocol(self.truncated or RemoteProtocolError(
                f"helper closed its stdout but did not exit within {EOF_GRACE:g}s",
                self.conv.decoder.offset))

    def _fail_protocol(self, exc: ProtocolError) -> None:
        if self.protocol_error is None:
            self.protocol_error = exc
        self._close_stdout()
        self.kill()

    # -- replies ----------------------------------------------------------

    @property
    def awaiting(self) -> Optional[Message]:
        return self.conv.awaiting

    def reply(self, value: int) -> None:
        """Answer the callback the helper is blocked on."""
        self._replies += self.conv.reply(value)
        self._flush()

    def _flush(self) -> None:
        while self._replies:
            try:
                n = os.write(self._in, self._replies)
            except BlockingIOError:
                self.loop.add_writer(self._in, self._writable)
                return
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.EBADF):
                    raise
                self._replies.clear()  # the helper is gone; its exit tells the story
                return
            del self._replies[:n]
        self.loop.remove_writer(self._in)

    def _writable(self) -> None:
        self._flush()

    # -- exit -------------------------------------------------------------

    def _child_exited(self, code: Optional[int]) -> None:
        if self.child.start_error is not None:
            self.start_error = self.child.start_error
            self.wait_status = 127 << 8
        elif self.child.wait_status is None:
            # Reaped already: the application set SIGCHLD to SIG_IGN (the
            # kernel reaps) or ran waitpid(-1) itself.  The exit status is lost;
            # what the helper said decides (_helper_outcome): complete, or not.
            self.wait_status = 0
            self.status_unknown = True
        else:
            self.wait_status = self.child.wait_status
        self._exited = True
        if self._kill_timer is not None:
            self._kill_timer.cancel()
        if self._eof_timer is not None:
            self._eof_timer.cancel()
            self._eof_timer = None
        # Frames written just before exit are still in the pipe.
        self._drain(until_eof=True)
        self._maybe_report()

    def _maybe_report(self) -> None:
        if self._exited and not self._stdout_open and not self._reported:
            self._reported = True
            if self.truncated is not None and self.protocol_error is None and self.wait_status == 0:
                self.protocol_error = self.truncated
            self.loop.remove_writer(self._in)
            close_quietly(self._in)
            on_exit, self._on_exit = self._on_exit, ignore
            # nothing more to tell the operation: let go of it (it holds us),
            # so that refcounting frees both once the application does
            self._on_message = ignore
            on_exit(self)

    @property
    def running(self) -> bool:
        return not self._exited

    def signal(self, signum: int) -> None:
        if not self._exited:
            self.child.signal(signum)

    def kill(self) -> None:
        self.signal(signal.SIGKILL)

    def terminate(self, grace: float) -> None:
        """SIGTERM now (save: libxc's next write fails; restore: it dies), SIGKILL after ``grace``."""
        self.signal(signal.SIGTERM)
        if not self._exited and self._kill_timer is None:
            self._kill_timer = self.loop.call_later(grace, self.kill)

    @property
    def complete(self) -> Optional[Complete]:
        return self.conv.completed

    @property
    def results(self) -> Optional[RestoreResults]:
        return self.conv.results

