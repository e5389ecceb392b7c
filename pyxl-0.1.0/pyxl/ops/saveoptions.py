"""A save's choices and its result: :class:`SaveOptions`, :class:`SaveResult`
(re-exported by :mod:`pyxl.ops.save`, which runs the save).

May import: pyxl.ops.operation (its stream types), pyxl.zstdstage (its levels).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

from pyxl.ops.operation import STREAM_PLAIN, STREAM_REMUS
from pyxl.zstdstage import DEFAULT_LEVEL

__all__ = ["Leave", "SaveOptions", "SaveResult"]

#: What becomes of the domain after a successful save.
Leave = Literal["destroy", "paused", "running"]


@dataclass(frozen=True)
class SaveOptions:
    """How to save: the choices a caller makes, checked when made.

    ``live``: pre-copy while the guest runs.  ``leave``: "destroy" (xl's default),
    "paused" or "running".  ``helper``: the helper to run (default
    :func:`pyxl.helper_path`).  ``timeout``: give up (helper killed) after this
    many seconds.  ``suspend_timeout``: how long the guest may take to suspend.
    ``debug``: libxc's XCFLAGS_DEBUG (resend every page for verification).
    ``fsync``: flush a file and its directory before the rename.  ``helper_env``:
    extra environment for the helper (e.g. the precopy policy's ``PYXL_PRECOPY``).
    ``stream_type=STREAM_REMUS`` (1): a checkpointed stream (libxl's Remus; use
    it with ``live=True``): after each checkpoint libxl's checkpoint records go
    out and the guest resumes; another checkpoint is asked for after
    ``checkpoint_interval`` seconds until ``checkpoints`` were taken (None: until
    cancelled).  After the last one the guest stays as it is and ``leave``
    applies as for a save.  ``compress``: the image is one zstd frame (level
    ``compress_level``, with zstd's content checksum) of the xl image, made by
    a child between the helper and the target (:mod:`pyxl.zstdstage`);
    ``zstd -d`` gives back what xl restores.
    """

    live: bool = False
    leave: Leave = "destroy"
    helper: Optional[str] = None
    timeout: Optional[float] = None
    suspend_timeout: float = 30.0
    debug: bool = False
    fsync: bool = True
    helper_env: Mapping[str, str] = field(default_factory=dict)
    stream_type: int = STREAM_PLAIN
    checkpoints: Optional[int] = None
    checkpoint_interval: float = 0.1
    compress: bool = False
    compress_level: int = DEFAULT_LEVEL

    def __post_init__(self) -> None:
        for flag in ("live", "debug", "fsync", "compress"):   # live="no" would be live
            if not isinstance(getattr(self, flag), bool):
                raise TypeError(f"{flag} must be True or False, not {getattr(self, flag)!r}")
        if self.leave not in ("destroy", "paused", "running"):
            raise ValueError(f"leave must be 'destroy', 'paused' or 'running', not {self.leave!r}")
        if self.stream_type not in (STREAM_PLAIN, STREAM_REMUS):
            raise ValueError(f"stream_type must be 0 (plain) or 1 (Remus), not {self.stream_type}")
        for name in ("timeout", "suspend_timeout", "checkpoint_interval"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of seconds, not {value!r}")
        if self.checkpoints is not None and self.checkpoints < 1:
            raise ValueError(f"checkpoints must be at least 1, not {self.checkpoints}")
        if self.checkpoints is not None and self.stream_type != STREAM_REMUS:
            # a plain stream has no checkpoints: the number would be ignored
            raise ValueError("checkpoints is for a checkpointed stream "
                             "(stream_type=STREAM_REMUS), not a plain one")
        if self.compress and self.stream_type != STREAM_PLAIN:
            raise ValueError("compress is for a plain stream, not a checkpointed one (a Remus "
                             "stream's end is a failover, not a whole zstd frame)")
        if not -7 <= self.compress_level <= 19:
            raise ValueError(f"compress_level must be a zstd level from -7 to 19, "
                             f"not {self.compress_level}")


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
    compressed: bool = False   # bytes_written are zstd's
