"""A restored domain's disks and NICs on a Xen host, made and removed as libxl 4.17 does.

Adding (libxl_disk.c device_disk_add, libxl_nic.c libxl__set_xenstore_nic,
libxl_device.c libxl__device_add_async/libxl__wait_device_connection/
device_hotplug, libxl_linux.c get_hotplug_env): the frontend, backend and
``/libxl`` nodes in one transaction (:func:`pyxl.backends.xenbuild.device_generic_add`);
for a dom0 kernel backend (vbd, vif) a wait of up to 10 s for the backend's
``state`` to reach 2 (InitWait), then Xen's hotplug script with stdin
/dev/null, libxl's environment (``script``, ``XENBUS_TYPE``, ``XENBUS_PATH``,
``XENBUS_BASE_PATH``; for a vif ``netdev``, ``vif`` and for an emulated one
``INTERFACE``), 40 s at most: ``block add``; ``vif-bridge online
type_if=vif`` and, for a vif_ioemu NIC, ``vif-bridge add type_if=tap`` too.
A QEMU backend (qdisk) needs neither.  Disks go before the device model,
NICs after it (domcreate_launch_dm, domcreate_attach_devices).

Everything waits on the loop: XenStore rounds (:mod:`~pyxl.backends.xsasync`: nothing
waits on xenstored in a callback), watches (:class:`~pyxl.backends.xswatch.XsWait`),
the script's output pipe and pidfd, timers.  :class:`DeviceSteps` runs them
one after the other and stops at the first failure.

Removing (libxl__devices_destroy with force, libxl__initiate_device_generic_remove,
device_hotplug, libxl__device_destroy): :class:`DevicesRemoval` takes every
``/libxl/D/device/KIND/N``: the frontend goes, the backend gets ``online=0``
and ``state=5``; once it says 6 (10 s at most; after that the script runs
all the same, unlike libxl, and the removal is reported failed) the script
runs with ``remove``/``offline``; then the nodes are cleaned up with their
empty parents.  A console, or a QEMU backend whose QEMU is gone, only has its nodes
removed.

May import: pyxl.backends.libxlcfg, pyxl.backends.xenbuild, pyxl.backends.xenstore,
pyxl.backends.xsasync, pyxl.backends.xswatch, pyxl.fdio, pyxl.loop, pyxl.spawn.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from pyxl._log import get_logger
from pyxl.backends import libxlcfg, xenbuild
from pyxl.backends.libxlcfg import Disk, Nic
from pyxl.backends.xenstore import (XS_DIRECTORY, XS_READ, XS_RM, XS_TRANSACTION_END,
                                    XS_TRANSACTION_START, XS_WRITE, Batch, XenStore,
                                    XenStoreError, check_batch)
from pyxl.backends.xsasync import (TRANSACTION_ATTEMPTS, Reply, XsScript, XsTask, entries,
                                   missing, ok, reason, transaction)
from pyxl.backends.xswatch import XsWait, node_is
from pyxl.fdio import read_ready
from pyxl.loop import Loop, Timer
from pyxl.spawn import Child

__all__ = ["DeviceSteps", "DevicesRemoval", "Script", "add_disk", "add_nic", "check_bridges",
           "path_cleanup", "HOTPLUG_TIMEOUT", "INIT_TIMEOUT", "DESTROY_TIMEOUT"]

_log = get_logger("pyxl.xen")

#: LIBXL_INIT_TIMEOUT, LIBXL_HOTPLUG_TIMEOUT, LIBXL_DESTROY_TIMEOUT (seconds)
INIT_TIMEOUT, HOTPLUG_TIMEOUT, DESTROY_TIMEOUT = 10.0, 40.0, 10.0
XENBUS_INITIALISING, XENBUS_INITWAIT, XENBUS_CLOSING, XENBUS_CLOSED = 1, 2, 5, 6
#: Device kinds whose backend is QEMU (libxl's QEMU_BACKEND).
QEMU_KINDS = ("qdisk", "vfb", "qusb", "9pfs", "vkbd")

#: Where the kernel lists network interfaces (a bridge has a ``bridge/`` directory).
SYS_CLASS_NET = "/sys/class/net"


def check_bridges(nics: Sequence[Nic]) -> Optional[str]:
    """Why a NIC cannot be attached, or None.  ``vif-bridge`` fails only once
    the domain, its memory and (HVM) its QEMU exist, after minutes under
    load, with "Could not find bridge device"; a restore checks first, so that
    nothing is made for a guest whose bridge is missing."""
    for nic in nics:
        if nic.backend_domid != 0 or os.path.basename(nic.script) != "vif-bridge":
            continue
        if not os.path.isdir(os.path.join(SYS_CLASS_NET, nic.bridge, "bridge")):
            return f"NIC {nic.devid} ({nic.mac}): bridge {nic.bridge!r} does not exist on this host"
    return None


#: ``step(next)``: start one step; ``next(None)`` when it is done, ``next(why)`` if not.
Step = Callable[[Callable[[Optional[str]], None]], Any]


#: The longest line of a hotplug script's output kept (a script that writes
#: no newline is not buffered without bound).
_MAX_LINE = 4096


class Script:
    """One hotplug script, run from the loop: started by :mod:`pyxl.spawn`'s
    spawner (the loop does not wait for its fork and exec; its own process
    group: Ctrl-C is pyxl's to handle), stdin /dev/null, its output (stdout
    and stderr) logged line by line, SIGKILLed after ``timeout``.
    ``done(why)``: None when it exited 0."""

    def __init__(self, loop: Loop, argv: Sequence[str], env: Dict[str, str], timeout: float,
                 done: Callable[[Optional[str]], None]) -> None:
        self.loop, self.argv, self._done = loop, list(argv), done
        self.what = " ".join(self.argv[:2])
        self.output: List[str] = []
        self._buf = b""
        self.finished = False
        self.timer: Optional[Timer] = None
        self.child: Optional[Child] = None
        self.out, w = os.pipe2(os.O_CLOEXEC)
        try:
            self.child = Child(loop, self.argv, self._exited, fds={1: w, 2: w},
                               env=dict(os.environ, **env))
        except OSError as exc:      # not on PATH, or no spawner
            os.close(self.out)
            self.out = -1
            why = f"cannot run {self.what}: {exc.strerror or exc}"
            self.timer = loop.call_later(0, lambda: self._finish(why))
            return
        finally:
            os.close(w)
        os.set_blocking(self.out, False)
        loop.add_reader(self.out, self._readable)
        self.timer = loop.call_later(timeout, self._timed_out)

    def _readable(self) -> None:
        data, eof = read_ready(self.out)
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        if len(self._buf) > _MAX_LINE:     # no newline for long: a line of its own, cut
            lines.append(self._buf[:_MAX_LINE] + b"...")
            self._buf = b""
        for line in lines:
            text = line.decode(errors="replace").rstrip()
            self.output.append(text)
            _log.debug("%s: %s", self.what, text)
        del self.output[:-20]
        if eof:
            self._close_out()

    def _close_out(self) -> None:
        if self.out >= 0:
            self.loop.remove_reader(self.out)
            os.close(self.out)
            self.out = -1

    def _exited(self, status: Optional[int]) -> None:
        if self.out >= 0:
            self._readable()        # what it wrote just before it exited
        child = self.child
        assert child is not None
        if child.start_error is not None:
            self._finish(f"cannot run {self.what}: {child.start_error.strerror}")
        elif status == 0:
            self._finish(None)
        else:
            tail = "; ".join(self.output[-3:])
            self._finish(f"{self.what} failed (exit status "
                         f"{'unknown' if status is None else status})"
                         + (f": {tail}" if tail else ""))

    def _timed_out(self) -> None:
        self.timer = None
        self._finish(f"{self.what} did not finish within {HOTPLUG_TIMEOUT:g} s")

    def cancel(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self.timer is not None:
            self.timer.cancel()
        self._close_out()
        if self.child is not None:
            self.child.forget()
            self.child.kill()       # a no-op once it has gone; reaped from the loop

    def _finish(self, why: Optional[str]) -> None:
        if self.finished:
            return
        self.cancel()
        self._done(why)


class DeviceSteps:
    """Steps run one after the other on the loop; ``done(ok, why)`` after the
    last one, or at the first that fails."""

    def __init__(self, loop: Loop, steps: Sequence[Step], done: Callable[[bool, str], None]) -> None:
        self.loop, self.steps, self._done = loop, list(steps), done
        self.current: Any = None
        self.finished = False
        self.current = loop.call_later(0, lambda: self._next(None))

    def _next(self, why: Optional[str]) -> None:
        if self.finished:
            return
        if why is not None or not self.steps:
            self.finished = True
            self._done(why is None, why or "")
            return
        step = self.steps.pop(0)
        self.current = step(self._next)

    def cancel(self) -> None:
        self.finished = True
        if self.current is not None:
            self.current.cancel()


def _hotplug_env(script: str, bkind: str, domid: int, devid: int, gatewaydev: str,
                 nictype: Optional[str] = None) -> Dict[str, str]:
    """libxl's get_hotplug_env (``gatewaydev``: the backend's node of that name)."""
    env = {"script": script, "XENBUS_TYPE": bkind,
           "XENBUS_PATH": f"backend/{bkind}/{domid}/{devid}", "XENBUS_BASE_PATH": "backend"}
    if bkind == "vif":
        env["netdev"] = gatewaydev
        if nictype == "vif_ioemu":
            env["INTERFACE"] = f"vif{domid}.{devid}-emu"
        env["vif"] = f"vif{domid}.{devid}"
    return env


def _text(reply: Reply) -> str:
    """A read's value as text ("" for a missing node)."""
    return "" if missing(reply) else ok(reply).decode(errors="replace")


def _connect(loop: Loop, opener: Callable[[], XenStore], domid: int, bkind: str,
             devid: int, back: str, scripts: List[List[str]], nictype: Optional[str],
             gatewaydev: str, what: str) -> List[Step]:
    """libxl__wait_device_connection + device_hotplug for a dom0 kernel backend."""
    def wait(next_: Callable[[Optional[str]], None]) -> Any:
        return XsWait(loop, opener, [f"{back}/state"],
                      node_is(f"{back}/state", str(XENBUS_INITWAIT).encode()),
                      INIT_TIMEOUT, lambda ok, why: next_(None if ok else f"{what}: {why}"),
                      f"backend {back} reaching state {XENBUS_INITWAIT}")

    def run(argv: List[str]) -> Step:
        def step(next_: Callable[[Optional[str]], None]) -> Any:
            env = _hotplug_env(argv[0], bkind, domid, devid, gatewaydev, nictype)
            _log.info("domain %d: %s: %s", domid, what, " ".join(argv))

            def ran(why: Optional[str]) -> None:
                if why is None:
                    next_(None)
                    return

                def told(exc: Optional[Exception]) -> None:    # the script's own reason
                    err = "" if exc is not None or task.result is None else task.result
                    next_(f"{what}: {why}" + (f" ({err})" if err else ""))
                task = XsTask(loop, opener, _read(f"{back}/hotplug-error"), told, what)
            return Script(loop, argv, env, HOTPLUG_TIMEOUT, ran)
        return step

    return [wait] + [run(a) for a in scripts]


def _read(path: str) -> XsScript[str]:
    [reply] = yield [(XS_READ, f"{path}\0".encode(), 0)]
    return _text(reply)


def add_disk(loop: Loop, opener: Callable[[], XenStore], domid: int, disk: Disk,
             protocol: Optional[str] = None) -> List[Step]:
    """The steps adding one disk (``protocol``: a PV guest's native ABI, for old frontends)."""
    bkind = "qdisk" if disk.backend == "qdisk" else "vbd"
    back_entries: List[Tuple[str, Any]] = []
    if bkind == "vbd":
        script = disk.script or "block"
        script = script if script.startswith("/") else f"{libxlcfg.XEN_SCRIPT_DIR}/{script}"
        back_entries += [("params", disk.pdev_path), ("script", script)]
    else:
        fmt = {"raw": "aio", "empty": "aio"}.get(disk.format, disk.format)
        back_entries += [("params", f"{fmt}:{disk.pdev_path}")]
    dtype = "cdrom" if disk.is_cdrom else "disk"
    back_entries += [("frontend-id", domid), ("online", 1), ("removable", int(disk.removable)),
                     ("bootable", 1), ("state", XENBUS_INITIALISING), ("dev", disk.vdev),
                     ("type", disk.backend), ("mode", "w" if disk.readwrite else "r"),
                     ("device-type", dtype), ("discard-enable", int(disk.discard_enable)),
                     ("specification", "xen")]
    front: List[Tuple[str, Any]] = [("backend-id", disk.backend_domid),
                                    ("state", XENBUS_INITIALISING),
                                    ("virtual-device", disk.devid), ("device-type", dtype),
                                    ("trusted", int(disk.trusted))]
    if protocol:
        front.append(("protocol", protocol))
    back = f"/local/domain/{disk.backend_domid}/backend/{bkind}/{domid}/{disk.devid}"
    what = f"disk {disk.vdev}"

    def nodes(next_: Callable[[Optional[str]], None]) -> Any:
        return _write_nodes(loop, opener, domid, "vbd", disk.devid, bkind, disk.backend_domid,
                            back_entries, front, [], next_, what)

    if bkind == "qdisk":
        return [nodes]
    return [nodes] + _connect(loop, opener, domid, "vbd", disk.devid, back,
                              [[dict(back_entries)["script"], "add"]], None, "", what)


def add_nic(loop: Loop, opener: Callable[[], XenStore], domid: int, nic: Nic) -> List[Step]:
    """The steps adding one NIC (libxl__set_xenstore_nic's nodes, vif-bridge)."""
    back_entries: List[Tuple[str, Any]] = [
        ("frontend-id", domid), ("online", 1), ("state", XENBUS_INITIALISING),
        ("script", nic.script)]
    if nic.ifname:
        back_entries.append(("vifname", nic.ifname))
    back_entries.append(("mac", nic.mac))
    for key, val in (("ip", nic.ip), ("gatewaydev", nic.gatewaydev), ("rate", nic.rate)):
        if val:
            back_entries.append((key, val))
    if nic.mtu != 1500:
        back_entries.append(("mtu", nic.mtu))
    back_entries += [("bridge", nic.bridge), ("handle", nic.devid), ("type", nic.nictype),
                     ("hotplug-status", "")]
    front: List[Tuple[str, Any]] = [("backend-id", nic.backend_domid),
                                    ("state", XENBUS_INITIALISING), ("handle", nic.devid),
                                    ("mac", nic.mac), ("trusted", int(nic.trusted))]
    back = f"/local/domain/{nic.backend_domid}/backend/vif/{domid}/{nic.devid}"
    what = f"nic {nic.devid}"

    def nodes(next_: Callable[[Optional[str]], None]) -> Any:
        return _write_nodes(loop, opener, domid, "vif", nic.devid, "vif", nic.backend_domid,
                            back_entries, front, [("mtu", nic.mtu)], next_, what)

    scripts = [[nic.script, "online", "type_if=vif"]]
    if nic.nictype == "vif_ioemu":
        scripts.append([nic.script, "add", "type_if=tap"])
    return [nodes] + _connect(loop, opener, domid, "vif", nic.devid, back, scripts,
                              nic.nictype, nic.gatewaydev or "", what)


def _write_nodes(loop: Loop, opener: Callable[[], XenStore], domid: int, kind: str, devid: int,
                 bkind: str, bdom: int, bents: List[Tuple[str, Any]],
                 fents: List[Tuple[str, Any]], ro: List[Tuple[str, Any]],
                 next_: Callable[[Optional[str]], None], what: str) -> XsTask[bool]:
    """The device's nodes (refused if either end exists already), in one
    transaction, on the loop (:mod:`~pyxl.backends.xsasync`)."""
    front = f"/local/domain/{domid}/device/{kind}/{devid}"
    back = f"/local/domain/{bdom}/backend/{bkind}/{domid}/{devid}"

    def fill(b: Batch, tx: int) -> None:
        xenbuild.device_generic_add(b, tx, domid, kind, devid, bkind, bdom, bents, fents, ro)

    def script() -> XsScript[bool]:
        replies = yield [(XS_READ, f"{front}\0".encode(), 0), (XS_READ, f"{back}\0".encode(), 0)]
        for reply in replies:
            if not missing(reply):
                ok(reply)
                return False
        yield from transaction(fill)
        return True

    def finished(exc: Optional[Exception]) -> None:
        if exc is not None:
            next_(f"{what}: XenStore: {exc}")
        elif not task.result:
            next_(f"{what}: already exists in XenStore ({front})")
        else:
            next_(None)
    task = XsTask(loop, opener, script(), finished, what)
    return task


def path_cleanup(path: str, tx: int = 0) -> XsScript[None]:
    """libxl__xs_path_cleanup: remove ``path``, then each parent left empty
    (no value, no children)."""
    _removed((yield [(XS_RM, f"{path}\0".encode(), tx)])[0])
    parts = path.rstrip("/").split("/")
    while len(parts) > 2:
        parts.pop()
        parent = "/".join(parts).encode() + b"\0"
        value, kids = yield [(XS_READ, parent, tx), (XS_DIRECTORY, parent, tx)]
        if missing(value) or ok(value) or (not missing(kids) and entries(ok(kids))):
            break
        _removed((yield [(XS_RM, parent, tx)])[0])


def _removed(reply: Reply) -> None:
    """An XS_RM's reply: a node missing already is fine."""
    if not missing(reply):
        ok(reply)


def _devices(domid: int) -> XsScript[List[Tuple[str, str, str, str]]]:
    """The domain's devices libxl keeps, in three rounds: [(kind, devid,
    backend path, frontend path)]."""
    base = f"/libxl/{domid}/device"
    [reply] = yield [(XS_DIRECTORY, f"{base}\0".encode(), 0)]
    kinds = [] if missing(reply) else entries(ok(reply))
    listings = yield [(XS_DIRECTORY, f"{base}/{k}\0".encode(), 0) for k in kinds]
    devs = [(k, d) for k, r in zip(kinds, listings) if not missing(r) for d in entries(ok(r))]
    paths = yield [(XS_READ, f"{base}/{k}/{d}/{end}\0".encode(), 0)
                   for k, d in devs for end in ("backend", "frontend")]
    return [(k, d, _text(paths[2 * i]), _text(paths[2 * i + 1])) for i, (k, d) in enumerate(devs)]


#: What a backend told once asked to close: (backend kind, script, nictype, gatewaydev).
Closing = Tuple[str, str, Optional[str], str]


def _initiate(domid: int, kind: str, devid: str, back: str, front: str
              ) -> XsScript[Optional[Closing]]:
    """libxl__initiate_device_generic_remove, forced: None if the device's
    nodes are simply gone now (no dom0 kernel backend, or none left), else
    what its scripts need once the backend has closed."""
    lx = f"/libxl/{domid}/device/{kind}/{devid}"
    bparts = back.split("/")
    # Only dom0's own backends: their scripts are dom0's to run (libxl skips a
    # driver domain's; pyxl never makes one).
    if len(bparts) != 8 or bparts[:3] != ["", "local", "domain"] or bparts[3] != "0" \
            or bparts[4] != "backend":
        yield from path_cleanup(lx)
        return None
    bkind = bparts[5]
    if bkind in ("vbd", "vif"):
        # One transaction: the frontend goes, online=0, state=Closing.
        # Removed on its own first, the frontend's disappearance let blkback
        # switch to Closed (staying registered: still online) before our
        # Closing landed on top of it; then nothing moved it again, the wait
        # for Closed timed out and the block script never ran (its loop
        # device stayed).
        for _ in range(TRANSACTION_ATTEMPTS):
            tx = int(ok((yield [(XS_TRANSACTION_START, b"\0", 0)])[0]).rstrip(b"\0"))
            try:
                if front:
                    yield from path_cleanup(front, tx)
                [state] = yield [(XS_READ, f"{back}/state\0".encode(), tx)]
                closing = not missing(state)
                if closing:
                    changes = [(XS_WRITE, f"{back}/online\0".encode() + b"0", tx)]
                    if ok(state).strip() != str(XENBUS_CLOSED).encode():
                        changes.append((XS_WRITE, f"{back}/state\0{XENBUS_CLOSING}".encode(), tx))
                    check_batch(changes, (yield changes))
            except Exception:
                yield [(XS_TRANSACTION_END, b"F\0", tx)]
                raise
            [end] = yield [(XS_TRANSACTION_END, b"T\0", tx)]
            if not (isinstance(end, XenStoreError) and end.errno == errno.EAGAIN):
                ok(end)
                break
        else:
            raise XenStoreError(errno.EAGAIN, "xenstored: the removal's transaction conflicted "
                                f"{TRANSACTION_ATTEMPTS} times")
        if closing:
            script, nictype, gatewaydev = map(_text, (yield [
                (XS_READ, f"{back}/{node}\0".encode(), 0)
                for node in ("script", "type", "gatewaydev")]))
            return bkind, script, nictype if bkind == "vif" else None, gatewaydev
    for p in (front, lx, back):     # console; QEMU backends (QEMU is gone); a backend gone
        if p:
            yield from path_cleanup(p)
    return None


def _cleanup(paths: Sequence[str]) -> XsScript[None]:
    for p in paths:
        if p:
            yield from path_cleanup(p)


class DevicesRemoval:
    """Remove every device of ``domid`` libxl would (see the module docstring),
    all at once on ``loop``, every XenStore exchange a round on the loop;
    ``done()`` once each is gone (failures are logged: a destroy goes on)."""

    def __init__(self, loop: Loop, opener: Callable[[], XenStore], domid: int,
                 done: Callable[[], None]) -> None:
        self.loop, self.opener, self.domid, self._done = loop, opener, domid, done
        self.pending: Dict[str, Any] = {}
        self.failures: List[str] = []
        self.pending[""] = XsTask(loop, opener, _devices(domid), self._listed,
                                  f"domain {domid}'s devices")

    def _listed(self, exc: Optional[Exception]) -> None:
        listing = self.pending.pop("")
        if exc is not None:     # nothing to remove that we know of: the destroy goes on
            why = f"listing its devices: {reason(exc)}"
            _log.error("domain %d: removing its devices: %s", self.domid, why)
            self.failures.append(why)
        for kind, devid, back, front in listing.result or []:
            key = f"{kind}/{devid}"
            lx = f"/libxl/{self.domid}/device/{key}"
            self.pending[key] = self._task(_initiate(self.domid, kind, devid, back, front),
                                           key, self._then_asked(key, (front, lx, back)))
        self._check_done()

    def _task(self, script: XsScript[Any], key: str, then: Callable[[Any], None]) -> XsTask[Any]:
        """``script`` on the loop; ``then(result)``, or the device's removal failed."""
        def ended(exc: Optional[Exception]) -> None:
            if exc is not None:
                self._failed(key, reason(exc))
            else:
                then(task.result)
        task: XsTask[Any] = XsTask(self.loop, self.opener, script, ended,
                                   f"removing domain {self.domid}'s {key}")
        return task

    def _check_done(self) -> None:
        if not self.pending:
            self._done()

    def _then_asked(self, key: str, paths: Tuple[str, str, str]
                    ) -> Callable[[Optional[Closing]], None]:
        return lambda closing: self._asked(key, closing, paths)

    def _asked(self, key: str, closing: Optional[Closing], paths: Tuple[str, str, str]) -> None:
        if closing is None:     # its nodes are gone already
            self._removed(key)
            return
        bkind, script, nictype, gatewaydev = closing
        back, devid = paths[2], key.split("/")[1]
        argvs: List[List[str]] = []
        if script and bkind == "vbd":
            argvs = [[script, "remove"]]
        elif script:
            argvs = [[script, "offline", "type_if=vif"]]
            if nictype == "vif_ioemu":
                argvs.append([script, "remove", "type_if=tap"])
        steps = [self._script(a, bkind, devid, gatewaydev, nictype) for a in argvs]

        def run_scripts(late: Optional[str]) -> None:
            def scripts_done(ok: bool, why: str) -> None:
                if late is not None or not ok:
                    self._failed(key, "; ".join(w for w in (late, None if ok else why) if w),
                                 paths)
                else:
                    self._gone(key, paths)
            self.pending[key] = DeviceSteps(self.loop, steps, scripts_done)

        def closed(ok: bool, why: str) -> None:
            if ok:
                run_scripts(None)
                return
            # A backend that did not close in time: libxl (forced) then skips
            # the script, and the block script's loop device stays attached for
            # good (seen in the lane: QEMU killed during a restore on a loaded
            # host, blkback slow to close).  pyxl runs it all the same if the
            # add script ran (hotplug-status "connected" is its mark): its losetup -d frees
            # the device as soon as blkback lets go.  The removal is still
            # reported as failed.
            def status(value: str) -> None:
                if value.strip():
                    run_scripts(why)
                else:   # its script never ran: nothing to undo
                    self._failed(key, why, paths)
            self.pending[key] = self._task(_read(f"{back}/hotplug-status"), key, status)

        self.pending[key] = XsWait(self.loop, self.opener, [f"{back}/state"],
                                   node_is(f"{back}/state", str(XENBUS_CLOSED).encode()),
                                   DESTROY_TIMEOUT, closed, f"backend {back} closing")

    def _script(self, argv: List[str], bkind: str, devid: str, gatewaydev: str,
                nictype: Optional[str]) -> Step:
        def step(next_: Callable[[Optional[str]], None]) -> Any:
            env = _hotplug_env(argv[0], bkind, self.domid, int(devid), gatewaydev, nictype)
            _log.info("domain %d: %s", self.domid, " ".join(argv))
            return Script(self.loop, argv, env, HOTPLUG_TIMEOUT, next_)
        return step

    def _failed(self, key: str, why: str, paths: Sequence[str] = ()) -> None:
        _log.error("domain %d: removing %s: %s", self.domid, key, why)
        self.failures.append(f"{key}: {why}")
        self._gone(key, paths)

    def _gone(self, key: str, paths: Sequence[str]) -> None:
        """The device's nodes go, with their empty parents."""
        if not any(paths):
            self._removed(key)
            return

        def cleaned(exc: Optional[Exception]) -> None:
            if exc is not None:
                _log.error("domain %d: removing %s from XenStore: %s", self.domid, key,
                           reason(exc))
            self._removed(key)
        self.pending[key] = XsTask(self.loop, self.opener, _cleanup(paths), cleaned,
                                   f"removing domain {self.domid}'s {key}")

    def _removed(self, key: str) -> None:
        self.pending.pop(key, None)
        self._check_done()

    def cancel(self) -> None:
        for p in list(self.pending.values()):
            p.cancel()
        self.pending.clear()
