"""Short child processes run from the loop: the work a loop must not do itself.

Some steps of an operation block in the kernel for as long as the disk or the
page allocator takes: ``fsync`` of a file just written, renaming it over an
old image (whose pages the rename frees), removing a domain's memory files.
Measured on a 285 MB save, those were 85 + 57 + 57 ms inside one loop
callback.  pyxl runs such a step in a short child process instead (threads
are not used; ``subprocess`` spawns with vfork semantics, so the parent is
not copied and waits only until the exec), watches the child's exit through
a pidfd like any other fd, and reports ``done(status, error_text)`` from the
loop.  No SIGCHLD handler: the child is reaped with ``WNOHANG`` once its pidfd
is readable, and an application that set SIGCHLD to SIG_IGN (the kernel then
reaps for it, and ``waitpid`` fails with ECHILD) still gets an outcome: the
child's last words on its stderr pipe decide it.

:func:`finish_file` puts a saved image in place without flushing it (rename;
with ``fsync``, fsync before and the directory's after).  :class:`FileFinisher`
is the flushing one, started together with a save: it follows the growing file
and starts its writeback every 8 MiB (``sync_file_range``), so the disk writes
while the helper does, and at :meth:`FileFinisher.commit` it fsyncs what is
left, renames the file into place and fsyncs the directory.  Measured on ext4
(1 GiB): the fsync started after the helper had finished was 30-40 % of the save.

May import: pyxl.loop, pyxl.fdio.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Callable, Dict, List, Optional, Sequence

from pyxl.fdio import close_quietly, read_ready
from pyxl.loop import Loop

__all__ = ["FileFinisher", "ShortChild", "finish_file"]

#: ``done(exit_status, stderr_text)``: called once, from the loop.  A status of
#: -N is death by signal N (as ``subprocess``); stderr is the child's, trimmed.
ChildDone = Callable[[int, str], None]

_MAX_STDERR = 4096
#: What the child prints last on success: an application that set SIGCHLD to
#: SIG_IGN leaves no exit status to collect, so success is said, not assumed.
_OK = b"\nok\n"


class ShortChild:
    """Run ``argv`` without waiting for it; ``done(status, stderr)`` from ``loop``."""

    def __init__(self, loop: Loop, argv: Sequence[str], done: ChildDone, *,
                 env: Optional[Dict[str, str]] = None, stdin: bool = False,
                 stdin_from: int = -1, stdout_to: int = -1, pass_fds: Sequence[int] = ()) -> None:
        """``stdin``: give the child a pipe on its stdin (``stdin_fd``, non-blocking,
        closed when the child is reaped or by :meth:`close_stdin`).
        ``stdin_from``/``stdout_to``: an fd of ours as its stdin/stdout instead
        (a stage of a stream: :mod:`pyxl.zstdstage`); ``pass_fds``: fds it
        inherits under the same numbers (e.g. a progress pipe)."""
        self.loop, self._done = loop, done
        self.finished = False
        self._err: List[bytes] = []
        self._err_open = True
        # close_fds: the child holds nothing of ours (an fd it kept open
        # would keep a pipe or a socket of some operation alive).
        child_in = stdin_from if stdin_from >= 0 else (subprocess.PIPE if stdin
                                                         else subprocess.DEVNULL)
        self.proc = subprocess.Popen(list(argv), stdin=child_in,
                                     stdout=stdout_to if stdout_to >= 0 else subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, pass_fds=tuple(pass_fds),
                                     close_fds=True, env=env,
                                     process_group=0)   # Ctrl-C is pyxl's to handle
        self.stdin_fd = -1
        if self.proc.stdin is not None:
            self.stdin_fd = self.proc.stdin.fileno()
            os.set_blocking(self.stdin_fd, False)
        assert self.proc.stderr is not None
        self._errfd = self.proc.stderr.fileno()
        os.set_blocking(self._errfd, False)
        self._pidfd = os.pidfd_open(self.proc.pid)
        loop.add_reader(self._errfd, self._read_err)
        loop.add_reader(self._pidfd, self._exited)

    def _read_err(self) -> None:
        if not self._err_open:
            return
        data, eof = read_ready(self._errfd)
        if data and sum(map(len, self._err)) < _MAX_STDERR:
            self._err.append(data)
        if eof:
            self._close_err()

    def _close_err(self) -> None:
        if self._err_open:
            self._err_open = False
            self.loop.remove_reader(self._errfd)
            assert self.proc.stderr is not None
            self.proc.stderr.close()

    def _exited(self) -> None:
        try:
            pid, status = os.waitpid(self.proc.pid, os.WNOHANG)
        except ChildProcessError:
            # Reaped by the kernel (SIGCHLD ignored) or by someone else.
            pid, status = self.proc.pid, -1
        if pid == 0:
            return        # a spurious wake-up: not gone yet
        self.loop.remove_reader(self._pidfd)
        close_quietly(self._pidfd)
        self._pidfd = -1
        self._read_err()  # what it wrote just before it exited
        self._close_err()
        self.close_stdin()
        text = b"".join(self._err)
        if status == -1:
            code = 0 if text.endswith(_OK) else 1
        else:
            code = os.waitstatus_to_exitcode(status)
        self.proc.returncode = code   # keep Popen from reaping again
        if text.endswith(_OK):
            text = text[:-len(_OK)]
        self.finished = True
        self._done(code, text.decode("utf-8", "replace").strip()[-1000:])

    def close_stdin(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()   # closes stdin_fd
            self.proc.stdin = None
            self.stdin_fd = -1

    def kill(self) -> None:
        """SIGKILL, unless it was reaped (its pid is ours until then); ``done``
        still comes, from the loop."""
        if not self.finished and self._pidfd >= 0:
            import signal   # here: only a failed stage is killed
            try:
                # Through the pidfd: Popen.kill() would poll, and so reap the
                # child behind the pidfd watch's back.
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def cancel(self) -> None:
        """No callback.  The child is left to finish its step (a half-done
        rename is worse than a finished one) and is still reaped when it ends."""
        self._done = lambda status, err: None


# The end both children's programs share (inside their try): the rename into
# place, the directory's fsync (if SYNC is "1"), errors in one line, _OK.
_PLACE = r"""
    step = "rename to " + dest
    os.rename(tmp, dest)
    if sync == "1":
        step = "fsync of directory " + d
        fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
except OSError as exc:
    sys.stderr.write(step + ": " + (exc.strerror or str(exc)) + "\n")
    sys.exit(1)
sys.stderr.write("\nok\n")
"""

# The child's program: small, with no imports beyond os and sys, run with -I -S
# (about 10 ms to start).  argv: TMP DEST DIR FSYNC(0|1).  Errors say what failed
# in one line; success ends with _OK.
_FINISH_FILE = r"""
import os, sys
tmp, dest, d, sync = sys.argv[1:5]
step = "fsync " + tmp
try:
    if sync == "1":
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
""" + _PLACE


def finish_file(loop: Loop, tmp: str, dest: str, fsync: bool,
                done: Callable[[Optional[str]], None]) -> ShortChild:
    """Flush ``tmp`` (if ``fsync``), rename it to ``dest`` and flush the
    directory, in a short child; ``done(None)`` or ``done(why)`` from ``loop``.

    The file is fsynced through a new descriptor: fsync flushes the inode's
    dirty pages whoever wrote them, so the writer's fd can be closed first."""
    directory = os.path.dirname(os.path.abspath(dest))

    def exited(status: int, err: str) -> None:
        if status == 0:
            done(None)
        else:
            done(err or f"the file finisher exited with status {status}")

    return ShortChild(loop, [sys.executable or "python3", "-I", "-S", "-c", _FINISH_FILE,
                             tmp, dest, directory, "1" if fsync else "0"], exited)


# The flushing finisher's program (run with -I -S; ctypes because os has no
# sync_file_range).  argv: TMP DEST DIR.  It polls the file's size every 10 ms
# (or wakes on stdin): each new 8 MiB chunk gets its writeback started, and the
# chunk before it is waited for, so the dirty pages stay bounded and the disk
# is busy while the save runs.  stdin "commit" -> flush the rest, fsync, rename,
# fsync the directory; stdin EOF without it -> the save was abandoned: exit
# without touching anything (the parent removes the file).
_FOLLOW_FILE = r"""
import ctypes, os, select, sys
tmp, dest, d = sys.argv[1:4]
CHUNK = 8 << 20
WAIT_BEFORE, WRITE, WAIT_AFTER = 1, 2, 4
libc = ctypes.CDLL(None, use_errno=True)
sfr = libc.sync_file_range
sfr.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]

def sync_range(fd, off, n, flags):
    if sfr(fd, off, n, flags) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))

step = "open " + tmp
try:
    fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
    started = waited = 0
    commit = False
    step = "writeback of " + tmp
    while not commit:
        if select.select([0], [], [], 0.01)[0]:
            if os.read(0, 64) != b"commit\n":
                sys.exit(0)            # abandoned
            commit = True
        size = os.fstat(fd).st_size
        while size - started >= CHUNK:
            sync_range(fd, started, CHUNK, WRITE)
            if waited < started:
                sync_range(fd, waited, started - waited, WAIT_BEFORE | WRITE | WAIT_AFTER)
                waited = started
            started += CHUNK
    step = "fsync " + tmp
    os.fsync(fd)
    os.close(fd)
    sync = "1"
""" + _PLACE


class FileFinisher:
    """Flush ``tmp`` while it is written, then put it in place as ``dest``.

    Started when the save starts (a short child; the loop only watches it).
    ``failed(why)`` from the loop if the child fails or ends before
    :meth:`commit`; after :meth:`commit`, ``done(None)`` or ``done(why)``.
    :meth:`cancel` abandons the file: the child exits without renaming it and
    the caller removes it."""

    def __init__(self, loop: Loop, tmp: str, dest: str,
                 failed: Callable[[str], None]) -> None:
        self._failed = failed
        self._done: Optional[Callable[[Optional[str]], None]] = None
        self._why: Optional[str] = None
        directory = os.path.dirname(os.path.abspath(dest))
        self.child = ShortChild(loop, [sys.executable or "python3", "-I", "-S", "-c",
                                       _FOLLOW_FILE, tmp, dest, directory],
                                self._exited, stdin=True)

    def _exited(self, status: int, err: str) -> None:
        why = None if status == 0 else (err or f"the file finisher exited with status {status}")
        if self._done is None:
            self._why = why or "the file finisher ended before the save did"
            self._failed(self._why)
        else:
            self._done(why)

    def commit(self, done: Callable[[Optional[str]], None]) -> None:
        """The file is complete: fsync it, rename it into place, fsync the directory."""
        self._done = done
        if self.child.finished:
            done(self._why)     # it failed already
            return
        try:
            os.write(self.child.stdin_fd, b"commit\n")   # 7 bytes into an empty pipe
        except OSError:
            pass            # it is dying: its exit reports why
        self.child.close_stdin()

    def abandon(self, then: Callable[[], None]) -> None:
        """The save failed: the child exits without renaming (stdin EOF);
        ``then()`` from the loop once it is reaped (at once if it was)."""
        if self.child.finished:
            then()
            return
        self._done = lambda why: then()
        self.child.close_stdin()

    def cancel(self) -> None:
        """As :meth:`abandon`, without waiting: the child is reaped when it ends."""
        self.child.cancel()
        self.child.close_stdin()
