"""One save or migration of a domain at a time, across processes.

Two saves of one domain share its log-dirty bitmap: each one's "clean"
hides pages from the other, and both end in success with images that restore
stale pages (measured: 1 to 523 stale pages a run, on a 128 MiB guest).  On a
real host libxc makes it worse: a save that finds log-dirty mode on turns it
off and on again, under the other's feet.  Nothing in Xen refuses it, so pyxl
does: a save (and so a migration's sender) holds an ``flock`` on a lock file
of its domain while it runs, and a second one, in this process or another,
fails at once with :class:`~pyxl.errors.StartupError` naming the holder.

The lock file lives in the host's directory, :func:`host_dir`: the backend's
``lock_dir()`` (``.locks`` in the sim state directory, so each simulated host
has its own), else ``/run/pyxl`` for root (the real host) or a private
directory of the user's.  The names that processes hold while a domain takes them are locks
of the same kind there (:class:`HostLock`, :mod:`pyxl.backends.names`).  A
lock file holds the holder's pid and what it does, for the error, and is
removed when the lock is let go.  Opening and locking a file on tmpfs never
waits: ``LOCK_NB``.

May import: pyxl._paths, pyxl.errors.
"""

from __future__ import annotations

import errno
import fcntl
import os
from typing import Any, Callable, Optional

from pyxl._paths import unsafe_dir
from pyxl.errors import StartupError

__all__ = ["DomainLock", "HostLock", "default_lock_dir", "host_dir"]


def default_lock_dir() -> str:
    """``/run/pyxl`` for root (a Xen host's toolstack), else a directory of
    the user's own under ``$XDG_RUNTIME_DIR`` (or ``/tmp``)."""
    uid = os.geteuid()
    if uid == 0:
        return "/run/pyxl"
    base = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(base, "pyxl") if base else f"/tmp/pyxl-{uid}"


def host_dir(backend: Any) -> str:
    """The directory of the host ``backend``'s domains live on (absolute;
    not created here): its ``lock_dir()``, else :func:`default_lock_dir`."""
    lock_dir = getattr(backend, "lock_dir", None)
    return os.path.abspath(lock_dir() if callable(lock_dir) else default_lock_dir())


def _private_dir(path: str) -> str:
    """Create ``path`` (0700) if missing; refuse one another user could
    write into, so that nobody can hold, or fake, our locks."""
    try:
        try:
            problem = unsafe_dir(path, "lock directory")   # one lstat: every save's
        except FileNotFoundError:
            os.makedirs(path, 0o700, exist_ok=True)
            problem = unsafe_dir(path, "lock directory")
    except OSError as exc:
        raise StartupError(f"lock directory {path}: {exc.strerror}") from exc
    if problem:
        raise StartupError(problem)
    return path


class HostLock:
    """An ``flock`` on ``name``, a file of ``directory`` (a host's:
    :func:`host_dir`), held from construction until :meth:`release`
    (idempotent).  ``holder``: what the file says while held (for a
    newcomer's error); ``busy(holder)``: the error a newcomer gets while it
    is held; ``cannot``: the start of the error when the file cannot be
    opened or locked."""

    def __init__(self, directory: str, name: str, holder: str,
                 busy: Callable[[str], Exception], cannot: str) -> None:
        self.path = os.path.join(_private_dir(directory), name)
        self._fd: Optional[int] = None
        # A holder removes the file as it lets go; one who opened it just
        # before then locks a file no longer in the directory, so the lock
        # counts only if the path still names the file locked (up to 3 tries).
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600)
            except OSError as exc:
                raise StartupError(f"{cannot}: {self.path}: {exc.strerror}") from exc
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                held_by = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
                os.close(fd)
                if exc.errno != errno.EWOULDBLOCK:
                    raise StartupError(f"{cannot}: {exc.strerror}") from exc
                raise busy(held_by) from None
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                break
            os.close(fd)
        else:
            raise StartupError(f"{cannot}: {self.path} keeps changing")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{holder} by process {os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            # Removed while still locked: a newcomer then finds no file, or
            # a new one (see __init__), never ours unlocked.
            try:
                os.unlink(self.path)
            except OSError:
                pass
            os.close(self._fd)
            self._fd = None


class DomainLock(HostLock):
    """One save or migration of ``domid`` at a time (see the module)."""

    def __init__(self, backend: Any, domid: int, what: str) -> None:
        super().__init__(
            host_dir(backend), f".lock-d{domid}", f"a {what}",
            lambda holder: StartupError(f"domain {domid} is busy: {holder or 'another save'} "
                                        "is in flight"),
            f"cannot lock domain {domid}")
