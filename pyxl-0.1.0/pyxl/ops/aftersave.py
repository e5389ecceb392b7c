"""What becomes of the guest once its save has ended.

After a save that succeeded the guest is left as the caller asked (paused, or
running as it was); after one that failed it runs again (or is paused again,
if it was paused when the save began).  Each step is the backend's, from the
loop; what fails is logged and reported, never raised: by then the save's own
outcome is decided.  (Destroying a saved guest, xl's default, is the
backend's ``start_destroy`` alone.)

May import: pyxl.backends.base, pyxl.errors, pyxl.loop, pyxl.ops.saveoptions.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

from pyxl.backends.base import Backend, start_resume
from pyxl.errors import OperationError
from pyxl.loop import Loop
from pyxl.ops.saveoptions import Leave

__all__ = ["leave_saved", "resume_after_failure"]

def leave_saved(backend: Backend, loop: Loop, domid: int, leave: Leave, *, was_paused: bool,
                suspended: bool, logger: logging.Logger, then: Callable[[], None]) -> None:
    """Leave a saved guest ``leave`` ("paused" or "running"), then ``then()``."""
    def left(ok: bool, why: str) -> None:
        if not ok:  # the image is safe: report it, and go on
            logger.error("saved domain %d, but could not leave it %s: %s", domid, leave, why)
        then()

    try:
        # A guest paused when the save began stays paused (as under xl, whose
        # resume leaves the toolstack's pause in place): "running" means as it
        # was, not unpaused.
        if leave == "running" and not was_paused:
            start_resume(backend, loop, domid, left)
            return
        # Remus: it ran on after the last checkpoint.  xl save -p, or a paused
        # guest: paused first, so it never runs between the suspend and the pause.
        backend.pause(domid)
    except Exception as exc:  # a backend is the caller's code
        left(False, str(exc))
        return
    if suspended:
        start_resume(backend, loop, domid, left)
    else:
        left(True, "")


def resume_after_failure(backend: Backend, loop: Loop, domid: int, *, was_paused: bool,
                         on_resume: Optional[Callable[[int], None]], logger: logging.Logger,
                         then: Callable[[], None], exc: Optional[OperationError] = None) -> None:
    """Let the guest of a failed save run again (the caller's ``on_resume``,
    else the backend's resume), or pause it again if it was paused when the
    save began (pause first, as ``leave="paused"``: it never runs in between);
    then ``then()``.  ``exc``, the failure to report, gets ``guest_state`` and,
    if the guest could not be resumed, says so."""
    restore_pause = was_paused and on_resume is None

    def resumed(ok: bool, why: str) -> None:
        if not ok:  # report it: the failure stands
            logger.error("could not resume domain %d after the failed save: %s", domid, why)
        if exc is not None:
            exc.guest_state = ("paused" if restore_pause else "running") if ok else "suspended"
            if not ok:
                exc.args = (f"{exc.args[0] if exc.args else exc}; domain {domid} is still "
                            f"suspended: resuming it failed: {why}",) + tuple(exc.args[1:])
        then()

    if on_resume is None:
        if restore_pause:
            try:
                backend.pause(domid)
            except Exception as err:  # a backend is the caller's code
                logger.error("could not pause domain %d again after the failed save (it was "
                             "paused): %s", domid, err)
                restore_pause = False
        start_resume(backend, loop, domid, resumed)
        return
    try:
        on_resume(domid)
    except Exception as err:  # the caller's on_resume
        resumed(False, f"on_resume raised {err!r}")
        return
    resumed(True, "")
