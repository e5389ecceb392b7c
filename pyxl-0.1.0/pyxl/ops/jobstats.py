"""A live snapshot of one operation, like ``virsh domjobinfo``: :class:`JobStats`.

libxc's progress counts pages of the whole pfn space (a 256 MiB guest's save is
"6 %" for most of its run, then jumps to 100 %), so the figures a user wants --
bytes moved, rate, time left -- come from the stream itself: the offset of the
stream's file description, which the helper shares with pyxl (one ``lseek``, no
I/O; a pipe or a socket has none), against the guest's memory from its config.
May import: the standard library only.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from typing import Any, Dict, Optional

__all__ = ["JobStats", "memory_of", "snapshot", "stream_offset"]


@dataclass(frozen=True)
class JobStats:
    """Where an operation is.  ``bytes`` and the figures from it are None when the
    stream is not a regular file (a pipe, a socket)."""

    phase: str                    # libxc's last "doing what" ("" before its first report)
    iteration: Optional[int]      # precopy round of a live save, from 0
    pages_done: int               # as libxc reports, for the current phase
    pages_total: int
    elapsed: float                # seconds since the operation started
    bytes: Optional[int]          # stream bytes written (save) or read (restore) so far
    memory: Optional[int]         # the guest's memory: what a first pass moves, about
    rate: Optional[float]         # bytes per second, since the start
    eta: Optional[float]          # seconds until ``memory`` bytes have moved, at ``rate``
    #: live migration with a switch-over policy (pyxl's helper reports each precopy
    #: round): the guest's dirty rate, bytes per second, and the downtime of
    #: stopping now, seconds, as of the last round; None otherwise
    dirty_rate: Optional[float] = None
    predicted_downtime: Optional[float] = None

    def to_json(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def stream_offset(fd: int) -> Optional[int]:
    """The file description's offset: bytes the helper has written or read so far,
    None for a pipe or a socket (or no fd)."""
    if fd < 0:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_CUR)
    except OSError as exc:
        if exc.errno in (errno.ESPIPE, errno.EBADF):
            return None
        raise


def memory_of(config: Optional[Dict[str, Any]]) -> Optional[int]:
    """Bytes of guest memory in a libxl config (``b_info.max_memkb``), or None."""
    b_info = config.get("b_info") if isinstance(config, dict) else None
    kb = b_info.get("max_memkb") if isinstance(b_info, dict) else None
    return kb * 1024 if isinstance(kb, int) and kb > 0 else None


def snapshot(phase: str, iteration: Optional[int], done: int, total: int, elapsed: float,
             nbytes: Optional[int], memory: Optional[int], *,
             dirty_rate: Optional[float] = None,
             predicted_downtime: Optional[float] = None) -> JobStats:
    """The figures derived from what the operation knows (``nbytes``: the offset, or
    a migration's bytes on the connection)."""
    moved = nbytes
    rate = moved / elapsed if moved is not None and elapsed > 0 else None
    eta = None
    if rate and memory is not None and moved is not None and moved < memory:
        eta = (memory - moved) / rate
    return JobStats(phase, iteration, done, total, elapsed, moved, memory, rate, eta,
                    dirty_rate, predicted_downtime)
