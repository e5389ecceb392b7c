"""Destroying a domain on a Xen host, in libxl's order (libxl__destroy_domid).

Pause; the device model goes (its XenStore directory, SIGHUP to its recorded
pid, its QMP sockets: :mod:`~pyxl.backends.hvm`); every disk and NIC is
force-removed (:class:`~pyxl.backends.xendevices.DevicesRemoval`: backends
closed, ``block remove``, ``vif-bridge offline``); the XenStore nodes
(``/vm/UUID`` unless the other copy of a local migration still names it,
``/local/domain/D``, ``/libxl/D``, dom0's ``backend/*/D``); libxl's userdata
and the device model's state files; then ``xc_domain_destroy``, in a short
child (Xen frees the domain's memory inside that call: seconds for a large
guest).  Every XenStore exchange is a round on the loop
(:mod:`~pyxl.backends.xsasync`), never one waited for.

May import: pyxl.backends.base, pyxl.backends.hvm, pyxl.backends.xenctrl,
pyxl.backends.xendevices, pyxl.backends.xenstore, pyxl.backends.xsasync,
pyxl.childproc, pyxl.loop.
"""

from __future__ import annotations

import glob
import os
import time
from typing import TYPE_CHECKING, List, Optional, Tuple

from pyxl._log import get_logger
from pyxl.backends import hvm, xendevices, xsasync
from pyxl.backends.base import Cancellable, Done, Finished, Step, Waits, run_steps
from pyxl.backends.xenctrl import DomInfo, XenError
from pyxl.backends.xenstore import XS_DIRECTORY, XS_READ, XS_RM
from pyxl.childproc import ShortChild
from pyxl.loop import Loop, Timer

if TYPE_CHECKING:
    from pyxl.backends.xen import XenBackend

__all__ = ["start_destroy"]

_log = get_logger("pyxl.xen")


def start_destroy(be: "XenBackend", loop: Loop, domid: int, done: Done,
                  userdata_dir: str) -> Cancellable:
    """libxl__destroy_domid: pause; the device model goes (SIGHUP, its
    XenStore node and sockets); every device is force-removed, waiting on
    ``loop`` for the backends to close and the hotplug scripts to run
    (libxl's timeouts bound it); then XenStore, libxl's files and the
    domain itbe.  ``done(ok, why)`` from ``loop``."""
    info = be.xc.getinfo(domid)
    if info is not None:
        try:
            be.xc.pause(domid)
        except XenError:
            pass
    steps = _DestroySteps(done)

    begun = time.monotonic()   # the phases' times, for -vv: a slow destroy says where

    def destroyed(status: int, err: str) -> None:
        _log.debug("domain %d: xc_domain_destroy's child ended (status %d), %.2f s after "
                   "the destroy began", domid, status, time.monotonic() - begun)
        why = err.splitlines()[-1] if err else f"exit status {status}"
        steps.finish(status == 0, "" if status == 0 else f"destroying domain {domid}: {why}")

    def remove_rest() -> None:
        steps.stop()
        _log.debug("domain %d: devices removed, %.2f s after the destroy began", domid,
                   time.monotonic() - begun)
        # Not called off by a cancel: once begun, the domain's nodes all go.
        run_steps(loop, _destroy_rest(be, loop, domid, info, vm[0], userdata_dir), rest_removed)

    def rest_removed(exc: Optional[Exception]) -> None:
        _log.debug("domain %d: its XenStore nodes and files removed, %.2f s after the "
                   "destroy began", domid, time.monotonic() - begun)
        try:
            if exc is not None:
                raise exc
            if info is None:
                steps.finish(True, "")
            else:   # the hypercall that frees its memory, off the loop
                steps.child = ShortChild(loop, be.xc.destroy_command(domid), destroyed)
        except Exception as err:  # a loop callback: the destroy's outcome, not the loop's
            steps.finish(False, f"destroying domain {domid}: {err}")

    vm: List[Optional[str]] = [None]

    def first() -> xsasync.XsScript[Tuple[Optional[str], Optional[int]]]:
        [raw] = yield [(XS_READ, f"/local/domain/{domid}/vm\0".encode(), 0)]
        path = None if xsasync.missing(raw) else xsasync.ok(raw).decode(errors="replace")
        return path, (yield from hvm.forget_device_model(domid))

    def read(exc: Optional[Exception]) -> None:
        pid = None
        if exc is not None:     # the destroy goes on: what can go, goes
            _log.error("domain %d: destroying its device model: %s", domid,
                       xsasync.reason(exc))
        elif task.result is not None:
            vm[0], pid = task.result
        hvm.destroy_device_model(domid, pid, be._dm_procs)
        steps.removal = xendevices.DevicesRemoval(loop, be._open_xs, domid, remove_rest)
        # DevicesRemoval bounds each wait by libxl's timeouts; this bounds them all.
        steps.timer = loop.call_later(xendevices.DESTROY_TIMEOUT
                                      + 2 * xendevices.HOTPLUG_TIMEOUT + 5, remove_rest)
    task = steps.removal = xsasync.XsTask(loop, be._open_xs, first(), read,
                                          f"destroy of domain {domid}")
    return steps



def _destroy_rest(be: "XenBackend", loop: Loop, domid: int, info: Optional[DomInfo],
                  vm: Optional[str], userdata_dir: str) -> List[Step]:
    """What is left of a domain once its devices are gone: its XenStore
    nodes (a script on the loop, :mod:`~pyxl.backends.xsasync`), then its files."""
    def nodes() -> xsasync.XsScript[None]:
        listings = yield [(XS_DIRECTORY, b"/local/domain/0/backend\0", 0),
                          (XS_DIRECTORY, b"/local/domain\0", 0)]
        btypes, domains = ([] if xsasync.missing(r) else xsasync.entries(xsasync.ok(r))
                           for r in listings)
        removals = [f"/local/domain/0/backend/{btype}/{domid}" for btype in btypes]
        # /vm/UUID is shared with the other copy after a migration on this
        # host (same uuid): it goes with the last domain that names it.
        if vm and vm.startswith("/vm/"):
            others = [int(d) for d in domains if d.isdigit() and int(d) != domid]
            paths = yield [(XS_READ, f"/local/domain/{d}/vm\0".encode(), 0) for d in others]
            if vm.encode() not in paths:
                removals.append(vm)
        removals += [f"/local/domain/{domid}", f"/libxl/{domid}"]
        replies = yield [(XS_RM, f"{path}\0".encode(), 0) for path in removals]
        for reply in replies:
            if not xsasync.missing(reply):
                xsasync.ok(reply)

    def store(finished: Finished) -> Cancellable:
        return xsasync.XsTask(loop, be._open_xs, nodes(), finished,
                              f"domain {domid}'s XenStore nodes")

    def files() -> None:
        uuid = info.uuid if info is not None else "*"
        for f in glob.glob(os.path.join(userdata_dir, f"userdata-d.{domid}.{uuid}.*")):
            try:
                os.unlink(f)
            except OSError:
                pass
        hvm.remove_state_files(domid)
        for key in [k for k in be._types if k[0] == domid]:
            del be._types[key]
        be._restoring.pop(domid, None)
        be._ports.pop(domid, None)

    return [Waits(store), files]


class _DestroySteps:
    """A destroy in flight: the device removal and its overall bound."""

    def __init__(self, done: Done) -> None:
        self._done: Optional[Done] = done
        #: the device model's XenStore round, then the devices' removal
        self.removal: Optional[Cancellable] = None
        self.timer: Optional[Timer] = None
        self.child: Optional[ShortChild] = None    # xc_domain_destroy, once it runs

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.removal is not None:
            self.removal.cancel()
            self.removal = None

    def finish(self, ok: bool, why: str) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(ok, why)

    def cancel(self) -> None:
        """No callback; what was started (backends closing, scripts, the
        hypercall) runs out."""
        self._done = None
        self.stop()
        if self.child is not None:
            self.child.cancel()
