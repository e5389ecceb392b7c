"""The :class:`Backend` protocol: everything pyxl asks of the place domains live.

libxc never pauses, suspends, resumes, creates or destroys a domain, and never
touches the device model; the toolstack does, in the helper's callbacks and
around the helper run.  pyxl's operations do that through a backend:

* :class:`pyxl.backends.sim.SimBackend` -- fakexen's simulated domains;
* :class:`pyxl.backends.xen.XenBackend` -- the Xen host this runs on (ctypes over
  libxenctrl, XenStore), doing what libxl would;
* your toolstack's own: any object with these methods (structural typing; no
  base class to inherit).  Pass it as ``backend=`` to ``pyxl.save``,
  ``pyxl.restore``, ``pyxl.migrate.migrate`` and ``pyxl.migrate.receive``.

Optional: ``cpu_cap(domid) -> int`` and ``set_cpu_cap(domid, cap)`` (the scheduler
cap, percent of one CPU, 0 = uncapped) -- only live migration with auto-converge
uses them, and refuses to start without them.  ``start_unpause(loop, domid,
done)``: :meth:`Backend.unpause` for a backend whose unpause may take a while
(fakexen starts a vCPU process); without it, ``unpause`` is called
(:func:`start_unpause`); ``start_resume(loop, domid, done)`` likewise for
``resume`` (:func:`start_resume`).  ``start_create_restore_target(loop, config, done)``:
:meth:`Backend.create_restore_target` as steps on the loop, ``done(domid,
None)`` or ``done(None, exc)`` once the domain is ready or gone again
(:func:`start_create_restore_target`); XenBackend's runs each hypercall batch
and XenStore transaction in a callback of its own (:func:`run_steps`).
``start_domain_config(loop, domid, done)``: :meth:`Backend.domain_config` on
the loop, ``done(config, None)`` or ``done(None, exc)``
(:func:`start_domain_config`); XenBackend's reads XenStore in one round.
``lock_dir() -> str``: the host's directory, one per host: a save holds its
domain's lock there (:mod:`pyxl.backends.domainlock`), and the names this
process holds while a domain takes them are held per host directory
(:mod:`pyxl.backends.names`); SimBackend's is ``.locks`` in its state directory;
without it,
``/run/pyxl`` for root.

Calls are made from the operation's event loop, so each must return quickly;
the ones that wait on the guest or its device model (``start_*``) are
asynchronous: they start the work and report through ``done`` from the loop.  A backend reports failure by raising
(:class:`pyxl.BackendError` preferably, any exception is contained): the
operation fails cleanly or, after the image is safe, logs and goes on.

May import: pyxl.errors, pyxl.loop, pyxl.backends.names.
"""

from __future__ import annotations

from typing import (Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple, Union,
                    runtime_checkable)

from pyxl.backends import names
from pyxl.errors import BackendError, StartupError
from pyxl.loop import Loop, run_private

__all__ = ["Backend", "Cancellable", "ConfigRead", "Configured", "Created", "Done", "EmulatorRecord", "Finished",
           "NoDeviceModel", "RestorePorts", "SavedState", "Step", "Waits", "domid_of",
           "name_owner", "owner_of", "run_steps", "run_to_end", "start_create_restore_target",
           "start_destroy", "start_domain_config", "start_rename", "start_restore_done", "start_resume",
           "start_unpause"]

#: Xen's domain ids for guests: 0 is dom0, DOMID_FIRST_RESERVED (0x7FF0) and up are special.
DOMID_LIMIT = 0x7FF0

#: ``done(ok, why)``: the outcome of an asynchronous backend step, called from the loop.
Done = Callable[[bool, str], None]
#: (store event channel, store's backend domain, console event channel, console's
#: backend domain): the restore helper's argv, as libxl allocates them.
RestorePorts = Tuple[int, int, int, int]
#: A libxl EMULATOR_XENSTORE_DATA or EMULATOR_CONTEXT record: (type, body).
EmulatorRecord = Tuple[int, bytes]
#: ``done(records, why)``: the device model's saved state, or None and why not.
SavedState = Callable[[Optional[List[EmulatorRecord]], str], None]
#: ``done(domid, None)``: the restore target is ready; ``done(None, exc)``: it
#: could not be made (and nothing of it is left).
Created = Callable[[Optional[int], Optional[Exception]], None]
#: ``done(config, None)``: the domain's libxl config; ``done(None, exc)``: why not.
Configured = Callable[[Optional[Dict[str, Any]], Optional[Exception]], None]
#: What :func:`start_domain_config` reports: a failure is always a StartupError.
ConfigRead = Callable[[Optional[Dict[str, Any]], Optional[StartupError]], None]


class Cancellable(Protocol):
    """Something in flight that can be called off (a loop timer, a suspend)."""

    def cancel(self) -> None: ...


@runtime_checkable
class Backend(Protocol):
    """What pyxl's save, restore and migration operations need from a host."""

    #: Short name for logs and errors ("sim", "xen", your toolstack's).
    name: str

    # -- the helper ---------------------------------------------------------

    def helper_env(self) -> Dict[str, str]:
        """The environment the helper runs in (fakexen: its LD_PRELOAD)."""
        ...

    # -- saving a domain ----------------------------------------------------

    def check_domain(self, domid: int) -> None:
        """Raise (e.g. :class:`pyxl.StartupError`) unless ``domid`` can be saved."""
        ...

    def domain_names(self) -> Dict[int, str]:
        """Every domain's id and name (``xl list``); for :func:`domid_of`."""
        ...

    def domain_config(self, domid: int) -> Dict[str, Any]:
        """The domain's libxl config (``libxl_domain_config`` as JSON), for the xl header."""
        ...

    def start_suspend(self, loop: Loop, domid: int, timeout: float, done: Done) -> Cancellable:
        """Ask the guest to suspend; call ``done(ok, why)`` from ``loop`` once it has
        (or could not within ``timeout`` seconds).  Returns a handle to call it off."""
        ...

    def start_logdirty(self, loop: Loop, domid: int, enable: bool, done: Done) -> Cancellable:
        """The helper's ``switch_qemu_logdirty``: make the device model track (or stop
        tracking) the pages it writes, then ``done(ok, why)``.  No device model:
        ``done(True, "")`` at once."""
        ...

    def start_save_device_model(self, loop: Loop, domid: int, live: bool,
                                done: SavedState) -> Cancellable:
        """After the guest is suspended: stop the device model and save its state
        (QMP ``stop``, ``xen-save-devices-state``); then ``done(records, "")`` with
        the libxl records for the end of the stream (EMULATOR_XENSTORE_DATA,
        EMULATOR_CONTEXT), or ``done(None, why)``.  No device model: ``done([], "")``."""
        ...

    def resume(self, domid: int) -> None:
        """Let a suspended guest run again (xl's cooperative resume)."""
        ...

    def pause(self, domid: int) -> None: ...

    def unpause(self, domid: int) -> None: ...

    def start_destroy(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        """Destroy the domain and everything the toolstack made for it (device
        model, devices, files); ``done(ok, why)`` from ``loop`` once it is gone.
        What takes time (backends closing, hotplug scripts, freeing memory)
        runs while the loop goes on: pyxl's operations destroy through this."""
        ...

    def destroy(self, domid: int) -> None:
        """:meth:`start_destroy`, waited for: for scripts and command lines.
        (pyxl's backends implement it with :func:`run_to_end`, so a subclass
        that extends ``start_destroy`` changes both.)"""
        ...

    def rename(self, domid: int, name: str) -> None: ...

    def state(self, domid: int) -> Optional[str]:
        """'running', 'paused', 'suspended', or None when it cannot be told."""
        ...

    def digest(self, domid: int) -> Optional[str]:
        """A digest of the stopped guest's memory and context, where the backend can
        make one (fakexen); None otherwise.  Migration compares both ends' digests."""
        ...

    # -- restoring a domain -------------------------------------------------

    def create_restore_target(self, config: Dict[str, Any]) -> int:
        """Build the empty, paused domain the helper restores into; return its domid."""
        ...

    def restore_ports(self, domid: int) -> RestorePorts:
        """The event channels the restore helper is given for ``domid``."""
        ...

    def start_restore_device_model(self, loop: Loop, domid: int, records: List[EmulatorRecord],
                                   done: Done) -> Cancellable:
        """After the helper: start the device model on the saved state (the stream's
        emulator records) and call ``done(ok, why)`` once it runs.  No device
        model: ``done(True, "")``."""
        ...

    def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
        """After the helper, before the device model starts: finish the domain
        (XenStore nodes, introduction to xenstored with the restored store page)."""
        ...


class NoDeviceModel:
    """The device-model hooks of a backend whose guests have none (PV, PVH)."""

    def start_logdirty(self, loop: Loop, domid: int, enable: bool, done: Done) -> Cancellable:
        return loop.call_later(0, lambda: done(True, ""))

    def start_save_device_model(self, loop: Loop, domid: int, live: bool,
                                done: SavedState) -> Cancellable:
        return loop.call_later(0, lambda: done([], ""))

    def start_restore_device_model(self, loop: Loop, domid: int, records: List[EmulatorRecord],
                                   done: Done) -> Cancellable:
        return loop.call_later(0, lambda: done(True, ""))


def start_unpause(backend: Backend, loop: Loop, domid: int, done: Done) -> Optional[Cancellable]:
    """Unpause ``domid`` from ``loop``: through the backend's optional
    ``start_unpause`` (``done`` later, from the loop), else its ``unpause``
    (``done`` before this returns; None).  A backend's exception is ``done(False, why)``."""
    return _start_or_call(backend, "unpause", loop, domid, (), done)


def start_resume(backend: Backend, loop: Loop, domid: int, done: Done) -> Optional[Cancellable]:
    """:meth:`Backend.resume` from ``loop``, as :func:`start_unpause` does it:
    the optional ``start_resume`` (an HVM guest's QMP ``cont`` is an exchange
    with its QEMU), else ``resume``."""
    return _start_or_call(backend, "resume", loop, domid, (), done)


def _start_form(backend: Backend, name: str) -> Any:
    """The backend's optional ``start_<name>``, unless the waited-for
    ``<name>`` is overridden below it: a toolstack that extends a backend's
    ``restore_done`` (say) must not be bypassed by the loop form it inherits."""
    start = getattr(backend, f"start_{name}", None)
    if start is None:
        return None
    mine = vars(backend)
    if name in mine and f"start_{name}" not in mine:
        return None         # set on the instance itself
    mro = type(backend).__mro__
    waited = next((k for k in mro if name in vars(k)), None)
    started = next((k for k in mro if f"start_{name}" in vars(k)), None)
    if waited is not None and started is not None and waited is not started \
            and issubclass(waited, started):
        return None
    return start


def _start_or_call(backend: Backend, name: str, loop: Loop, domid: int,
                   args: Tuple[Any, ...], done: Done) -> Optional[Cancellable]:
    """``start_<name>(loop, domid, *args, done)`` if the backend has that form
    (:func:`_start_form`), else ``<name>(domid, *args)`` and ``done`` at once."""
    start = _start_form(backend, name)
    try:
        if start is not None:
            return start(loop, domid, *args, done)   # type: ignore[no-any-return]
        getattr(backend, name)(domid, *args)
    except Exception as exc:  # a backend is the caller's code (any toolstack's)
        done(False, str(exc) or type(exc).__name__)
        return None
    done(True, "")
    return None


def start_restore_done(backend: Backend, loop: Loop, domid: int, store_gfn: int,
                       console_gfn: int, done: Done) -> Optional[Cancellable]:
    """:meth:`Backend.restore_done` from ``loop``, as :func:`start_unpause`
    does it: the optional ``start_restore_done`` (a real host's XenStore
    rounds, read on the loop), else ``restore_done``."""
    return _start_or_call(backend, "restore_done", loop, domid, (store_gfn, console_gfn), done)


def start_rename(backend: Backend, loop: Loop, domid: int, name: str,
                 done: Done) -> Optional[Cancellable]:
    """:meth:`Backend.rename` from ``loop``, as :func:`start_unpause` does it:
    the optional ``start_rename`` (a real host's XenStore rounds, read on the
    loop), else ``rename``.  The new name is held in this process until the
    rename ends (:mod:`pyxl.backends.names`): a second rename, restore or
    receive to it meanwhile fails as if the domain had it already."""
    try:
        release = names.reserve(backend, name)
    except StartupError as exc:
        done(False, str(exc))
        return None

    def renamed(ok: bool, why: str) -> None:
        release()
        done(ok, why)
    return _start_or_call(backend, "rename", loop, domid, (name,), renamed)


def start_domain_config(backend: Backend, loop: Loop, domid: int,
                        done: ConfigRead) -> Optional[Cancellable]:
    """:meth:`Backend.domain_config` from ``loop``: through the backend's
    optional ``start_domain_config`` (``done`` later, from the loop), else
    the waited-for call (``done`` before this returns; None).  A failure is
    ``done(None, StartupError)``, a backend's other exceptions wrapped in one."""
    def finished(config: Optional[Dict[str, Any]], exc: Optional[Exception]) -> None:
        if config is not None:
            done(config, None)
        elif isinstance(exc, StartupError):
            done(None, exc)
        else:
            done(None, StartupError(f"cannot read domain {domid}'s config: {exc}"))

    start = _start_form(backend, "domain_config")
    try:
        if start is not None:
            return start(loop, domid, finished)   # type: ignore[no-any-return]
        config = backend.domain_config(domid)
    except Exception as exc:  # a backend is the caller's code (any toolstack's)
        finished(None, exc)
        return None
    finished(config, None)
    return None


def start_create_restore_target(backend: Backend, loop: Loop, config: Dict[str, Any],
                                done: Created) -> None:
    """:meth:`Backend.create_restore_target` from an operation's loop: through the
    backend's optional ``start_create_restore_target`` (``done`` later, from the
    loop), else the waited-for call (``done`` before this returns).  Not called
    off once begun: a half-made domain is destroyed before ``done`` says so.
    A backend's exception is ``done(None, exc)``.

    The config's name is held in this process (:mod:`pyxl.backends.names`)
    from before the backend's name check until ``done``: the domain then has
    it, or is gone.  A second restore or receive of that name meanwhile is
    ``done(None, StartupError("domain 'NAME' already exists ..."))``."""
    c_info = config.get("c_info")
    name = (c_info.get("name") if isinstance(c_info, dict) else None) or "restored"
    try:
        release = names.reserve(backend, str(name))
    except Exception as exc:  # taken, or the backend's lock_dir() failed (the caller's code)
        done(None, exc)
        return

    def created(domid: Optional[int], exc: Optional[Exception]) -> None:
        release()
        done(domid, exc)
    start = _start_form(backend, "create_restore_target")
    try:
        if start is not None:
            start(loop, config, created)
            return
        domid = backend.create_restore_target(config)
    except Exception as exc:  # a backend is the caller's code (any toolstack's)
        created(None, exc)
        return
    created(domid, None)


Finished = Callable[[Optional[Exception]], None]


class Waits:
    """A step of :func:`run_steps` that waits for something (a XenStore
    exchange, a child): ``start(done)`` begins it from the loop and returns
    its Cancellable; it ends with ``done(None)`` or ``done(exc)``."""

    def __init__(self, start: Callable[[Finished], Cancellable]) -> None:
        self.start = start
        self.__name__ = getattr(start, "__name__", "wait")


Step = Union[Callable[[], None], Waits]


def run_steps(loop: Loop, steps: Sequence[Step], done: Finished) -> Cancellable:
    """Run ``steps`` one per loop callback, in order, so that the loop's longest
    stretch is the longest step, not their sum (a :class:`Waits` step takes
    no callback of its own while it waits); then ``done(None)``, or
    ``done(exc)`` after the first step that raised or failed (the rest do not
    run).  Cancelling runs no further step and calls nothing."""
    return _Steps(loop, steps, done)


class _Steps:
    def __init__(self, loop: Loop, steps: Sequence[Step], done: Finished) -> None:
        self._loop, self._done = loop, done
        self._pending = list(reversed(steps))
        self._timer: Optional[Cancellable] = loop.call_later(0, self._next)

    def _next(self) -> None:
        self._timer = None
        if not self._pending:
            self._done(None)
            return
        step = self._pending.pop()
        try:
            if isinstance(step, Waits):
                self._timer = step.start(self._waited)
                return
            step()
        except Exception as exc:  # the step's failure is the sequence's outcome
            self._pending.clear()
            self._done(exc)
            return
        if self._done is not _cancelled:    # the step may have cancelled the rest
            self._timer = self._loop.call_later(0, self._next)

    def _waited(self, exc: Optional[Exception]) -> None:
        if exc is not None:
            self._timer = None
            self._pending.clear()
            self._done(exc)
            return
        if self._done is not _cancelled:
            self._timer = self._loop.call_later(0, self._next)

    def cancel(self) -> None:
        self._done = _cancelled
        self._pending.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _cancelled(exc: Optional[Exception]) -> None:
    pass


def start_destroy(backend: Backend, loop: Loop, domid: int, done: Done) -> Optional[Cancellable]:
    """:meth:`Backend.start_destroy` from an operation: a backend's exception
    becomes ``done(False, why)`` (before this returns; None), so the operation
    always hears how its destroy ended."""
    try:
        handle: Cancellable = backend.start_destroy(loop, domid, done)
        return handle
    except Exception as exc:  # a backend is the caller's code (any toolstack's)
        done(False, f"{type(exc).__name__}: {exc}")
        return None


def run_to_end(start: Callable[[Loop, Done], Cancellable], what: str,
               timeout: Optional[float] = None) -> None:
    """Run an asynchronous backend step (``start(loop, done)``) on a private
    loop until it is done (:func:`pyxl.loop.run_private`): the blocking form,
    for scripts and command lines (never from an operation's loop).  Raises
    BackendError if it failed or did not finish within ``timeout``."""
    def begin(loop: Loop, done: Callable[[Tuple[bool, str]], None]) -> Cancellable:
        return start(loop, lambda ok, why: done((ok, why)))
    try:
        ok, why = run_private(begin, timeout)
    except TimeoutError:
        raise BackendError(f"{what} did not finish within {timeout:g} s") from None
    if not ok:
        raise BackendError(why or f"{what} failed")


def domid_of(backend: Backend, name_or_id: "str | int") -> int:
    """A domain's id from what a user typed, as xl takes it: an id (digits) or a name.

    An id is only range-checked (the operation says "no such domain" if it does not
    exist); a name is looked up through ``backend.domain_names()`` and must name
    exactly one domain.  Raises :class:`pyxl.StartupError` (one line) otherwise.
    """
    text = str(name_or_id).strip()
    if text.isdigit():
        domid = int(text, 10)
        if domid >= DOMID_LIMIT:
            raise StartupError(f"domain id out of range: {domid}")
        return domid
    if not text:
        raise StartupError("empty domain name")
    found = sorted(d for d, n in backend.domain_names().items() if n == text)
    if not found:
        raise StartupError(f"no such domain: {text!r}")
    if len(found) > 1:
        raise StartupError(f"domain name {text!r} is ambiguous: domids "
                           + ", ".join(map(str, found)))
    return found[0]


NamesRead = Callable[[Optional[Dict[int, str]], Optional[Exception]], None]


def start_domain_names(backend: Backend, loop: Loop, done: NamesRead) -> Optional[Cancellable]:
    """:meth:`Backend.domain_names` from ``loop``: through the backend's optional
    ``start_domain_names`` (``done`` later, from the loop: a real host's
    XenStore round), else the waited-for call (``done`` before this returns;
    None).  A backend's exception is ``done(None, exc)``."""
    start = _start_form(backend, "domain_names")
    try:
        if start is not None:
            return start(loop, done)   # type: ignore[no-any-return]
        names = backend.domain_names()
    except Exception as exc:  # a backend is the caller's code (any toolstack's)
        done(None, exc)
        return None
    done(names, None)
    return None


def name_owner(backend: Backend, name: str, but: Optional[int] = None) -> Optional[int]:
    """The domain, other than ``but``, that is already called ``name``, or None.

    Names are unique on a host as libxl keeps them: it refuses to create or
    rename a domain into a name in use.  A backend checks this before it
    creates a restore target and before a rename (a migration receiver's
    ``NAME--incoming`` -> ``NAME``).
    """
    return owner_of(backend.domain_names(), name, but)


def owner_of(names: Dict[int, str], name: str, but: Optional[int] = None) -> Optional[int]:
    """The lowest domid, other than ``but``, that ``names`` (domid -> name) calls ``name``."""
    return next((d for d, n in sorted(names.items()) if n == name and d != but), None)
