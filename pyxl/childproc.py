"""Short child processes run from the loop: the work a loop must not do itself.

Some steps of an operation block in the kernel for as long as the disk or the
page allocator takes: ``fsync`` of a file just written, renaming it over an
old image (whose pages the rename frees), removing a domain's memory files.
Measured on a 285 MB save, those were 85 + 57 + 57 ms inside one loop
callback.  pyxl runs such a step in a short child process instead (threads
are not used; :mod:`pyxl.spawn` starts it, so the loop does not even wait
for its exec), watches the child's exit through
a pidfd like any other fd, and reports ``done(status, error_text)`` from the
loop.  No SIGCHLD handler: the child is reaped with ``WNOHANG`` once its pidfd
is readable, and an application that set SIGCHLD to SIG_IGN (the kernel then
reaps for it, and ``waitpid`` fails with ECHILD) still gets an outcome: the
child's last words on its stderr pipe decide it.

:func:`remove_in_child` removes a discarded save file.
:func:`finish_file` puts a saved image in place without flushing it (rename;
with ``fsync``, fsync before and the directory's after).  :class:`FileFinisher`
is the flushing one, started together with a save: it follows the growing file
and starts its writeback every 8 MiB (``sync_file_range``), so the disk writes
while the helper does, and at :meth:`FileFinisher.commit` it fsyncs what is
left, renames the file into place and fsyncs the directory.  Measured on ext4
(1 GiB): the fsync started after the helper had finished was 30-40 % of the save.

Both run ``pyxl-finisher`` (finisher/finisher.c).

May import: pyxl._paths, pyxl.loop, pyxl.fdio, pyxl.spawn.
"""

from __future__ import annotations

import fcntl
import os
from typing import Callable, Dict, List, Optional, Sequence

from pyxl._paths import package_file
from pyxl.fdio import close_quietly, read_ready
from pyxl.loop import Loop, ignore
from pyxl.spawn import Child

__all__ = ["FileFinisher", "ShortChild", "finish_file", "remove_in_child"]

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
        inherits under the same numbers (e.g. a progress pipe).  The child
        holds nothing else of ours (an fd it kept would keep a pipe or a
        socket of some operation alive); it is started by the spawner
        (:mod:`pyxl.spawn`), so this call does not wait for it."""
        self.loop, self._done = loop, done
        self.finished = False
        self._err: List[bytes] = []
        self._err_open = True
        self.stdin_fd = -1
        fds: Dict[int, int] = {fd: fd for fd in pass_fds}
        theirs: List[int] = []      # the child's ends of its pipes: closed here
        self._errfd = -1
        try:
            if stdin_from >= 0:
                fds[0] = stdin_from
            elif stdin:
                r, self.stdin_fd = os.pipe2(os.O_CLOEXEC)
                theirs.append(r)
                fds[0] = r
            if stdout_to >= 0:
                fds[1] = stdout_to
            self._errfd, w = os.pipe2(os.O_CLOEXEC)
            theirs.append(w)
            fds[2] = w
            self.child = Child(loop, argv, self._exited, fds=fds, env=env)
        except BaseException:
            close_quietly(self.stdin_fd)
            close_quietly(self._errfd)
            raise
        finally:
            for fd in theirs:
                os.close(fd)
        if self.stdin_fd >= 0:
            os.set_blocking(self.stdin_fd, False)
        os.set_blocking(self._errfd, False)
        loop.add_reader(self._errfd, self._read_err)

    @property
    def pid(self) -> int:
        """-1 until the spawner has started it."""
        return self.child.pid

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
            os.close(self._errfd)

    def _exited(self, code: Optional[int]) -> None:
        self._read_err()  # what it wrote just before it exited
        self._close_err()
        self.close_stdin()
        text = b"".join(self._err)
        start_error = self.child.start_error
        if start_error is not None:
            code, text = 127, f"cannot run {self.child.argv[0]}: {start_error.strerror}".encode()
        elif code is None:
            # Reaped elsewhere (SIGCHLD ignored): its last words decide.
            code = 0 if text.endswith(_OK) else 1
        if text.endswith(_OK):
            text = text[:-len(_OK)]
        self.finished = True
        done, self._done = self._done, ignore   # its owner, which holds us, is let go
        done(code, text.decode("utf-8", "replace").strip()[-1000:])

    def close_stdin(self) -> None:
        if self.stdin_fd >= 0:
            os.close(self.stdin_fd)
            self.stdin_fd = -1

    def kill(self) -> None:
        """SIGKILL (through its pidfd, never a reused pid); ``done`` still
        comes, from the loop."""
        if not self.finished:
            import signal   # here: only a failed stage is killed
            self.child.signal(signal.SIGKILL)

    def cancel(self) -> None:
        """No callback.  The child is left to finish its step (a half-done
        rename is worse than a finished one) and is still reaped when it ends."""
        self._done = ignore


def remove_in_child(loop: Loop, path: str, fd: int, done: Callable[[], None]) -> None:
    """Remove the file ``path`` whose last descriptor is ``fd`` (closed here)
    in a short child; ``done()`` from the loop once it is gone.  Unlinking a
    file with a GiB of unwritten pages waits for ext4's journal (47-56 ms
    measured on the loop), and the last close frees its blocks: the child's
    ``rm`` and exit do both.  If the child cannot start, or fails, it is
    removed here."""
    def removed(status: int, err: str) -> None:
        if status != 0:
            _unlink_quietly(path)
        done()
    try:
        theirs = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)   # above the child's 0-2
        try:
            ShortChild(loop, ["rm", "-f", "--", path], removed, pass_fds=[theirs])
        finally:
            os.close(theirs)
    except OSError:
        _unlink_quietly(path)
        loop.call_later(0, done)
    finally:
        os.close(fd)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


#: The program both finishers run (finisher/finisher.c): a C program, since
#: every save starts one and an interpreter's start cost ~19 ms of CPU.
FINISHER_NAME = "pyxl-finisher"


def _finisher(*args: str) -> List[str]:
    # Not checked here: a missing program fails its start like any child's
    # ("cannot run ...: No such file or directory"), reported from the loop.
    return [package_file(FINISHER_NAME), *args]


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

    return ShortChild(loop, _finisher("finish", tmp, dest, directory, "1" if fsync else "0"),
                      exited)


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
        self.child = ShortChild(loop, _finisher("follow", tmp, dest, directory),
                                self._exited, stdin=True)

    def _exited(self, status: int, err: str) -> None:
        why = None if status == 0 else (err or f"the file finisher exited with status {status}")
        failed, done = self._failed, self._done
        self._failed, self._done = ignore, ignore    # its last word: let go of the save
        if done is None:
            self._why = why or "the file finisher ended before the save did"
            failed(self._why)
        else:
            done(why)

    def commit(self, done: Callable[[Optional[str]], None]) -> None:
        """The file is complete: fsync it, rename it into place, fsync the directory."""
        if self.child.finished:
            done(self._why)     # it failed already
            return
        self._done = done
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
