"""Suspending a guest on a Xen host, as libxl's domain_suspend_callback_common.

The request: for an HVM guest without PV drivers (HVM_PARAM_CALLBACK_IRQ 0)
or in an ACPI sleep state, ``xc_domain_shutdown(SHUTDOWN_suspend)``; for every
other guest "suspend" in ``/local/domain/D/control/shutdown``, which its PV
drivers pick up.  Then a XenStore watch on ``@releaseDomain`` (its own
xenstored connection, its fd on the operation's loop) wakes us on every
domain state change, and ``xc_domain_getinfolist`` tells whether D has shut
down with reason suspend.  A timer bounds the wait; on timeout a request the
guest never picked up is withdrawn, so it cannot suspend later behind our back.
Nothing here waits on xenstored: the watch (:class:`XsWait`) and the
request's write (:mod:`xsasync`, a connection of its own) are round trips on
the loop.

May import: pyxl.backends.xenctrl, pyxl.backends.xenstore, pyxl.backends.xsasync,
pyxl.backends.xswatch, pyxl.loop.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Optional

from pyxl._log import get_logger
from pyxl.backends.xenctrl import SHUTDOWN_suspend
from pyxl.backends.xenstore import XS_READ, XS_WRITE
from pyxl.backends.xsasync import XsScript, XsTask, missing, ok, reason
from pyxl.backends.xswatch import Outcome, XsWait
from pyxl.loop import Loop, Timer

__all__ = ["Suspend", "HVM_PARAM_ACPI_S_STATE", "HVM_PARAM_CALLBACK_IRQ"]

_log = get_logger("pyxl.xen")

HVM_PARAM_CALLBACK_IRQ, HVM_PARAM_ACPI_S_STATE = 0, 14


class Suspend:
    """One suspend in flight.  ``be`` has ``xc`` (getinfo, shutdown) and
    ``_open_xs()``; ``via_shutdown``: ask Xen, not the guest's PV drivers."""

    def __init__(self, be: Any, loop: Loop, domid: int, timeout: float,
                 done: Callable[[bool, str], None], via_shutdown: bool = False) -> None:
        self.be, self.domid, self.timeout = be, domid, timeout
        self._done_cb = done
        self.started = time.monotonic()
        self.events = 0
        self.via_shutdown = via_shutdown
        self._failing: Optional[Timer] = None
        self._asking: Optional[XsTask[None]] = None
        self.wait = XsWait(loop, be._open_xs, ["@releaseDomain"], self._check, timeout,
                           self._finish, f"suspend of domain {domid}",
                           on_timeout=self._timed_out)
        if not via_shutdown:
            # Bounded like the wait: a xenstored that never takes the request
            # fails the suspend (the request may still land later, as it
            # could behind any timeout).  Sent alongside the watch's
            # registration: a guest that suspends before the watch is set is
            # seen by the check that follows the registration.
            self._asking = XsTask(loop, be._open_xs, _ask(domid), self._asked,
                                  f"asking domain {domid} to suspend", timeout)
            return
        try:
            be.xc.shutdown(domid, SHUTDOWN_suspend)
        except OSError as exc:
            why = f"cannot ask domain {domid} to suspend: {exc}"
            self.wait.cancel()
            self._failing = loop.call_later(0, lambda: self._finish(False, why))

    def _asked(self, exc: Optional[Exception]) -> None:
        self._asking = None
        if exc is not None and not self.wait.finished:
            self.wait.cancel()
            self._finish(False, f"cannot ask domain {self.domid} to suspend: {reason(exc)}")

    def cancel(self) -> None:
        self.wait.cancel()
        if self._asking is not None:
            self._asking.cancel()
            self._asking = None
        if self._failing is not None:
            self._failing.cancel()

    def _finish(self, ok: bool, why: str) -> None:
        if self._asking is not None:    # suspended or failed before xenstored answered
            self._asking.cancel()
            self._asking = None
        _log.info("domain %d %s after %.3f s (%d @releaseDomain events)", self.domid,
                  "suspended" if ok else f"did not suspend ({why})",
                  time.monotonic() - self.started, self.events)
        self._done_cb(ok, why)

    def _state(self) -> Optional[str]:
        """None while the guest is still on its way; "" once suspended; else why not."""
        info = self.be.xc.getinfo(self.domid)
        if info is None or info.dying:
            return f"domain {self.domid} disappeared while suspending"
        if info.suspended:
            return ""
        if info.shutdown:
            return f"domain {self.domid} shut down with reason {info.shutdown_reason}, not suspend"
        return None

    def _check(self) -> Outcome:
        self.events += 1
        why = self._state()
        return None if why is None else (why == "", why)

    def _timed_out(self) -> XsScript[Outcome]:
        """The last look: a request the guest never picked up is withdrawn
        (so it cannot suspend later behind our back), then its state read."""
        if not self.via_shutdown:
            path = f"/local/domain/{self.domid}/control/shutdown"
            [reply] = yield [(XS_READ, f"{path}\0".encode(), 0)]
            if not missing(reply) and ok(reply) == b"suspend":
                ok((yield [(XS_WRITE, f"{path}\0".encode(), 0)])[0])
        try:
            why = self._state()
        except OSError:
            why = None
        if why == "":
            return True, ""
        if why:
            return False, why
        return False, (f"guest did not suspend within {self.timeout:g}s"
                       + ("" if self.via_shutdown else
                          " (no PV drivers answering control/shutdown?)"))


def _ask(domid: int) -> XsScript[None]:
    """The request the guest's PV drivers watch for."""
    [reply] = yield [(XS_WRITE, f"/local/domain/{domid}/control/shutdown\0suspend".encode(), 0)]
    ok(reply)
