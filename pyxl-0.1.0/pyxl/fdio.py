"""Raw file-descriptor I/O shared by the operations: the only place pyxl
writes bytes to a pipe, socket or file it does not own a codec for.

* :func:`read_exact` / :func:`write_all` -- blocking, exact, unbuffered.  The
  restore fd is one open file description shared with the helper: libxl's
  records are read up to the very byte where the helper's libxc stream starts,
  so never one byte too far (no Python-level buffering, no read-ahead).  Used
  before a helper starts and after it ended, never from a loop callback on a
  pipe that could stall.
* :class:`FdWriter` -- a non-blocking writer driven by the loop: queue bytes,
  get told when they are out (or that the fd broke).  Handshake messages,
  libxl's checkpoint records and trailers all go through it.
* small fd utilities (:func:`set_nonblocking`, :func:`close_quietly`,
  :func:`is_regular`, :func:`make_pipe`, :func:`pipe_size`,
  :func:`open_save_target`).

May import: pyxl.errors, pyxl.loop.
"""

from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
from typing import Callable, List, Optional, Tuple

from pyxl.errors import StartupError, TruncatedStream
from pyxl.loop import Loop

#: Largest single read: bounded so a forged length never becomes one allocation.
CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
_F_GETPIPE_SZ = 1032


def make_pipe(size: int, nonblocking: bool = False) -> Tuple[int, int]:
    """A close-on-exec pipe (read end, write end), grown or shrunk to ``size``
    bytes if the kernel lets us (it may refuse: then its default); both ends
    O_NONBLOCK if ``nonblocking``."""
    r, w = os.pipe2(os.O_CLOEXEC | (os.O_NONBLOCK if nonblocking else 0))
    try:
        fcntl.fcntl(w, _F_SETPIPE_SZ, size)
    except OSError:
        pass
    return r, w


def read_ready(fd: int) -> Tuple[bytes, bool]:
    """What a non-blocking ``fd`` has now: (bytes, whether it reached EOF; a
    read error counts as EOF).  For a loop's reader of a child's small pipes."""
    chunks: List[bytes] = []
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            return b"".join(chunks), False
        except OSError:
            return b"".join(chunks), True
        if not data:
            return b"".join(chunks), True
        chunks.append(data)


def pending_bytes(fd: int) -> int:
    """Bytes waiting to be read from the pipe or socket ``fd`` (FIONREAD)."""
    import array
    buf = array.array("i", [0])
    fcntl.ioctl(fd, 0x541B, buf)     # FIONREAD (termios is not imported for one constant)
    return buf[0]


def pipe_size(fd: int) -> int:
    """The capacity of the pipe ``fd`` in bytes."""
    return fcntl.fcntl(fd, _F_GETPIPE_SZ)


def set_nonblocking(fd: int, on: bool = True) -> int:
    """Set or clear O_NONBLOCK on ``fd``; return the flags it had before."""
    flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    want = flags | os.O_NONBLOCK if on else flags & ~os.O_NONBLOCK
    if want != flags:
        fcntl.fcntl(fd, fcntl.F_SETFL, want)
    return flags


def close_quietly(fd: int) -> None:
    """Close ``fd``, ignoring errors (clean-up paths, where the fd may be gone)."""
    try:
        os.close(fd)
    except OSError:
        pass


def is_regular(fd: int) -> bool:
    return stat.S_ISREG(os.fstat(fd).st_mode)


def is_stream(fd: int) -> bool:
    """A pipe, a FIFO or a socket: what a loop can wait on (epoll refuses
    regular files and devices such as /dev/zero)."""
    mode = os.fstat(fd).st_mode
    return stat.S_ISFIFO(mode) or stat.S_ISSOCK(mode)


def check_channel(fds: Tuple[int, int]) -> None:
    """StartupError unless (read fd, write fd) are pipes or sockets: a
    migration comes over a channel (ssh's stdin and stdout, a socket), and a
    file or /dev/null on stdin is a mistake to say at once."""
    for fd, end in zip(fds, ("read", "write")):
        try:
            ok = is_stream(fd)
        except OSError as exc:
            raise StartupError(f"the {end} fd {fd}: {exc.strerror}") from exc
        if not ok:
            raise StartupError(f"the {end} fd {fd} is not a pipe or a socket: a migration "
                               f"comes over a channel (ssh, a socket)")


def read_exact(fd: int, n: int, *, offset: int = 0, what: str = "data",
               where: str = "stream") -> bytes:
    """Read exactly ``n`` bytes from ``fd`` and never more.

    Raises :class:`TruncatedStream` (offset = ``offset`` + bytes already
    read) if the fd reaches EOF first.  The caller must have bounded ``n``.
    A non-blocking fd is waited on with select() instead of failing.
    """
    if n < 0:
        raise ValueError(f"negative read size {n}")
    parts: List[bytes] = []
    got = 0
    while got < n:
        try:
            chunk = os.read(fd, min(n - got, CHUNK))
        except BlockingIOError:
            select.select([fd], [], [])
            continue
        if not chunk:
            raise TruncatedStream(
                offset + got, f"end of stream after {got} of {n} bytes of {what}", where)
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to ``fd`` with ``os.write`` (no buffering); a
    non-blocking fd is waited on with select()."""
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            select.select([], [fd], [])
            continue
        view = view[n:]


class FdWriter:
    """Bytes written to a non-blocking fd from the loop, in order.

    ``send(data, then)`` queues ``data`` and calls ``then()`` once it is all
    written; ``on_error(exc)`` is called once if a write fails, after which the
    writer is closed and drops what it holds.  ``close()`` stops watching the
    fd (it does not close it).  The fd must already be non-blocking.
    """

    def __init__(self, loop: Loop, fd: int, on_error: Callable[[OSError], None]) -> None:
        self.loop, self.fd, self.on_error = loop, fd, on_error
        self.data = bytearray()
        self.flushed: List[Callable[[], None]] = []
        self.active = True
        self._watching = False

    def send(self, data: bytes, then: Optional[Callable[[], None]] = None) -> None:
        self.data += data
        if then is not None:
            self.flushed.append(then)
        self._flush()

    def _flush(self) -> None:
        while self.active and self.data:
            try:
                n = os.write(self.fd, self.data)
            except BlockingIOError:
                if not self._watching:
                    self.loop.add_writer(self.fd, self._flush)
                    self._watching = True
                return
            except OSError as exc:
                self.close()
                self.on_error(exc)
                return
            del self.data[:n]
        if not self.active:
            return
        self._unwatch()
        cbs, self.flushed = self.flushed, []
        for cb in cbs:
            cb()

    def _unwatch(self) -> None:
        if self._watching:
            self.loop.remove_writer(self.fd)
            self._watching = False

    def close(self) -> None:
        if self.active:
            self.active = False
            self._unwatch()
            self.data.clear()
            self.flushed.clear()


class LoopWrite:
    """A :func:`write_from_loop` under way.  ``cancel()`` stops it (``done``
    is not called) and gives the fd its flags back; once it has ended, a
    no-op."""

    def __init__(self, loop: Loop, fd: int, data: bytes,
                 done: Callable[[Optional[OSError]], None]) -> None:
        self.fd, self._done = fd, done
        self._flags = set_nonblocking(fd, True)
        self._writer: Optional[FdWriter] = FdWriter(loop, fd, self._failed)
        self._writer.send(data, self._written)

    @property
    def active(self) -> bool:
        return self._writer is not None

    def cancel(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            try:
                set_nonblocking(self.fd, bool(self._flags & os.O_NONBLOCK))
            except OSError:     # closed meanwhile
                pass

    def _failed(self, exc: OSError) -> None:
        self.cancel()
        self._done(exc)

    def _written(self) -> None:
        self.cancel()
        self._done(None)


class _Written:
    active = False

    def cancel(self) -> None:
        pass


def write_from_loop(loop: Loop, fd: int, data: bytes,
                    done: Callable[[Optional[OSError]], None]) -> "LoopWrite | _Written":
    """Write ``data`` to ``fd``, then ``done(None)``, or ``done(OSError)``;
    returns a handle whose ``cancel()`` stops the write (the fd is then
    watched no more, and has its flags back).

    A regular file is written at once.  A pipe or socket is written from the
    loop, non-blocking meanwhile (its flags restored before ``done``) -- only
    for an fd no helper writes to right now (it waits for a callback's answer,
    or has exited).
    """
    if not is_regular(fd):
        return LoopWrite(loop, fd, data, done)
    try:
        write_all(fd, data)
    except OSError as exc:
        done(exc)
    else:
        done(None)
    return _Written()


def open_save_target(path: str) -> Tuple[int, Optional[str], str]:
    """Where a save to ``path`` writes: ``(fd, tmp, dest)``.

    A new or regular file is written as a private temporary file beside it
    (``tmp``), to be renamed over ``dest`` once whole; through a symlink,
    ``dest`` is the file it names, so the link stays a link.  A FIFO or a
    character device (``/dev/null``, to time a save) is written into, as xl
    does: ``tmp`` is None.  Anything else is refused, before anything ran,
    naming ``path`` -- the user's file, never the hidden one: renaming a file
    over a device node or a FIFO would replace it.

    A save often runs as root into a directory others may write to, so what
    is decided is what the kernel opened, not a second look by name: a name
    that is not a symlink is replaced as a name (a symlink swapped in later is
    replaced, never followed); a symlink is followed by the kernel (its
    protected_symlinks rules apply) and its file must be the one a resolved
    path names; a FIFO or a device must still be one once opened."""
    if not path:
        raise StartupError("the save file name is empty")
    if path.endswith("/"):
        raise StartupError(f"{path}: not a file name (it ends in '/')")
    try:
        st = os.lstat(path)
        dest = path
        if stat.S_ISLNK(st.st_mode):
            st, dest = _follow(path)
    except FileNotFoundError:
        return _create_beside(path, path)
    except OSError as exc:
        raise StartupError(f"cannot create {path}: {exc.strerror}") from exc
    if stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{path}: is a directory")
    if stat.S_ISREG(st.st_mode):
        return _create_beside(path, dest)
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISCHR(st.st_mode):
        try:
            # O_NONBLOCK: a FIFO nobody reads fails (ENXIO) instead of
            # holding the caller until a reader comes
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            why = "a FIFO nobody reads" if exc.errno == errno.ENXIO else exc.strerror
            raise StartupError(f"cannot write to {path}: {why}") from exc
        opened = os.fstat(fd)
        if not (stat.S_ISFIFO(opened.st_mode) or stat.S_ISCHR(opened.st_mode)):
            os.close(fd)          # swapped for a file since: never written in place
            raise StartupError(f"{path}: changed while it was being opened")
        os.set_blocking(fd, True)      # the helper's writes wait, as into any pipe
        return fd, None, path
    raise StartupError(f"{path}: not a regular file, a FIFO or a character device")


def _follow(path: str) -> Tuple[os.stat_result, str]:
    """A symlink's file, as the kernel follows it, and a resolved path naming
    that same file.  FileNotFoundError for a dangling one is turned into the
    user's error here; another OSError is the caller's."""
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except FileNotFoundError:
        raise StartupError(f"{path}: a symlink to {os.readlink(path)}, which does not "
                           "exist") from None
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    dest = os.path.realpath(path)
    try:
        same = os.path.samestat(os.stat(dest), st)
    except OSError:
        same = False
    if not same:
        raise StartupError(f"{path}: changed while it was being opened")
    return st, dest


def _create_beside(path: str, dest: str) -> Tuple[int, Optional[str], str]:
    # Both absolute now: the rename comes later, from a child, and the
    # caller's working directory may have changed by then.
    dest = os.path.abspath(dest)
    d, base = os.path.split(dest)
    for i in range(100):
        tmp = os.path.join(d, f".{base}.pyxl-{os.getpid()}-{i}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), \
                tmp, dest
        except FileExistsError:
            continue
        except OSError as exc:
            raise StartupError(f"cannot create {path}: {exc.strerror}") from exc
    raise StartupError(f"cannot create a temporary file next to {path}")
