"""The functions most callers need: :func:`save`, :func:`restore`, :func:`wait`.

Each starts an operation and returns it at once; run the loop
(``pyxl.wait(op)``, asyncio, or your own) to make progress.  Every option is a
keyword, so a misspelt one is a ``TypeError`` and ``help(pyxl.save)`` lists them.
"""

from __future__ import annotations

from typing import (Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar,
                    overload)

from pyxl.backends import Backend, default_backend
from pyxl.backends.base import EmulatorRecord
from pyxl.loop import Loop, default_loop
from pyxl.ops.future import LoopFuture
from pyxl.ops.operation import STREAM_PLAIN, Handler, PathOrFd, ProgressEvent
from pyxl.ops.restore import RestoreOperation, RestoreOptions
from pyxl.ops.save import Leave, SaveOperation, SaveOptions
from pyxl.zstdstage import DEFAULT_LEVEL

__all__ = ["restore", "save", "wait"]


def save(domid: int, path_or_fd: PathOrFd, *, live: bool = False, leave: Leave = "destroy",
         helper: Optional[str] = None, timeout: Optional[float] = None,
         callbacks: Optional[Dict[str, Handler]] = None,
         on_progress: Optional[Callable[[ProgressEvent], None]] = None,
         on_resume: Optional[Callable[[int], None]] = None, loop: Optional[Loop] = None,
         backend: Optional[Backend] = None, sim_dir: Optional[str] = None,
         suspend_timeout: float = 30.0, debug: bool = False, fsync: bool = True,
         config: Optional[Dict[str, Any]] = None,
         emulator_records: Optional[Sequence[EmulatorRecord]] = None,
         helper_env: Optional[Mapping[str, str]] = None,
         write_trailer: Optional[Callable[[bytes], None]] = None,
         stream_type: int = STREAM_PLAIN, checkpoints: Optional[int] = None,
         checkpoint_interval: float = 0.1, compress: bool = False,
         compress_level: int = DEFAULT_LEVEL, xl_header: bool = True,
         before_suspend: Optional[Callable[[Callable[[], None]], None]] = None) -> SaveOperation:
    """Start saving ``domid`` into a file (written atomically) or an fd.

    ``leave`` says what becomes of the domain after a successful save:
    "destroy" (xl's default), "paused" or "running".  ``compress``: a zstd
    image (``restore`` and ``inspect`` recognise it).  The options are
    :class:`~pyxl.ops.save.SaveOptions`'; ``backend`` is where the domain lives
    (default: fakexen in ``sim_dir``, or the Xen host this runs on).
    """
    options = SaveOptions(live=live, leave=leave, helper=helper, timeout=timeout,
                          suspend_timeout=suspend_timeout, debug=debug, fsync=fsync,
                          helper_env=dict(helper_env or {}), stream_type=stream_type,
                          checkpoints=checkpoints, checkpoint_interval=checkpoint_interval,
                          compress=compress, compress_level=compress_level)
    return SaveOperation(domid, path_or_fd, options, backend=backend or default_backend(sim_dir),
                         loop=loop, callbacks=callbacks, on_progress=on_progress,
                         on_resume=on_resume, config=config, emulator_records=emulator_records,
                         write_trailer=write_trailer, xl_header=xl_header,
                         before_suspend=before_suspend)


def restore(path_or_fd: PathOrFd, *, paused: bool = False, helper: Optional[str] = None,
            timeout: Optional[float] = None, callbacks: Optional[Dict[str, Handler]] = None,
            on_progress: Optional[Callable[[ProgressEvent], None]] = None,
            loop: Optional[Loop] = None, backend: Optional[Backend] = None,
            sim_dir: Optional[str] = None, name: Optional[str] = None,
            stream_type: int = STREAM_PLAIN, compressed: bool = False,
            config_check: Optional[Callable[[Dict[str, Any]], None]] = None) -> RestoreOperation:
    """Start restoring an xl save file (or stream on an fd) into a new domain.

    ``name``: the new domain's, instead of the saved config's.  ``paused``: leave
    it paused.  ``compressed``: a pipe or socket that carries a zstd image (a
    regular file's magic says whether it is one, whatever ``compressed`` says).
    ``config_check(config)``: the host's own policy on the stream's config
    (its disk paths, bridges, ...), after pyxl's checks and before anything is
    built; a :class:`~pyxl.ConfigError` it raises refuses the stream.  See
    :class:`~pyxl.ops.restore.RestoreOptions`.
    """
    options = RestoreOptions(paused=paused, helper=helper, timeout=timeout, name=name,
                             stream_type=stream_type, compressed=compressed)
    return RestoreOperation(path_or_fd, options, backend=backend or default_backend(sim_dir),
                            loop=loop, callbacks=callbacks, on_progress=on_progress,
                            config_check=config_check)


T1 = TypeVar("T1")
T2 = TypeVar("T2")
T3 = TypeVar("T3")
T4 = TypeVar("T4")
T = TypeVar("T")


# Typed per position for one to four operations (``sent, got = pyxl.wait(tx, rx)``
# gives a MigrateResult and a ReceiveResult), as typeshed types asyncio.gather;
# more give a tuple of their common supertype.
@overload
def wait(op1: "LoopFuture[T1]", /, *, timeout: Optional[float] = None) -> Tuple[T1]: ...
@overload
def wait(op1: "LoopFuture[T1]", op2: "LoopFuture[T2]", /, *,
         timeout: Optional[float] = None) -> Tuple[T1, T2]: ...
@overload
def wait(op1: "LoopFuture[T1]", op2: "LoopFuture[T2]", op3: "LoopFuture[T3]", /, *,
         timeout: Optional[float] = None) -> Tuple[T1, T2, T3]: ...
@overload
def wait(op1: "LoopFuture[T1]", op2: "LoopFuture[T2]", op3: "LoopFuture[T3]",
         op4: "LoopFuture[T4]", /, *, timeout: Optional[float] = None) -> Tuple[T1, T2, T3, T4]: ...
@overload
def wait(*ops: "LoopFuture[T]", timeout: Optional[float] = None) -> Tuple[T, ...]: ...


def wait(*ops: "LoopFuture[Any]", timeout: Optional[float] = None) -> Tuple[Any, ...]:
    """Run the default loop until every op is done; raise the first failure.

    Returns a tuple of their results, in the order given (``a, b =
    pyxl.wait(save_op, restore_op)``; typed per position up to four
    operations).  All operations run to completion even when one fails, so
    that nothing is left half-done.  ``timeout`` bounds the wait (the ops keep
    running).
    """
    loop = default_loop()
    for op in ops:
        if op.loop is not loop:
            raise ValueError("pyxl.wait drives the default loop; this op runs on another loop")
    first: List["LoopFuture[Any]"] = []
    for op in ops:
        op.add_done_callback(lambda o: first.append(o) if o._exception is not None else None)
    if not loop.run_until(lambda: all(op.done() for op in ops), timeout):
        raise TimeoutError(f"pyxl.wait: operations still running after {timeout:g}s")
    if first:
        first[0].result()
    return tuple(op.result() for op in ops)
