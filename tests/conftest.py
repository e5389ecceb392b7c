"""Shared by tests/unit and tests/integration.

pytest's ``pythonpath = ["tests"]`` (pyproject.toml) puts this directory on
sys.path, so test modules in both folders can ``from conftest import ...`` the
plain helpers below, and ``import stream_support``.

Paths:      ROOT, VECTORS / HELPER_VECTORS / STREAM_VECTORS, OUR_HELPER,
            DEBIAN_HELPER, HELPERS ({"ours", "debian"}), VERIFY_STREAM,
            XEN_PYTHONPATH, SLOW, needs_debian.
Leaks:      open_fds(), children(cmdline=False).
fakexen:    new_sim_dir() / fixture ``sim_dir`` (lenient cleanup: destroy, remove),
            private_sim_dir() / fixture ``fxdir`` (strict: no vCPU process may be left),
            fixture ``hosts`` (two state dirs: source, destination), domids(),
            vcpu_processes(), mounted_tmpfs().
Loops:      fixture ``any_loop``: the same test on SelectorLoop, HookLoop (driven
            by a poll()-based toolstack loop) and AsyncioLoop (see LoopDriver).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Iterator, List, Tuple, Union

import pytest

from pyxl._paths import xen_release
from pyxl.spawn import spawner_pid, start_spawner

ROOT = pathlib.Path(__file__).resolve().parent.parent
# Captured from Debian's real helper and libxenguest (see tests/vectors/*/INDEX.md);
# kept in the repo so CI on a fresh clone has them.
VECTORS = ROOT / "tests" / "vectors"
HELPER_VECTORS = VECTORS / "xen-4.17-helper"
STREAM_VECTORS = VECTORS / "xen-4.17-streams"
if not STREAM_VECTORS.is_dir():  # pragma: no cover - fall back to the shared copy
    HELPER_VECTORS = pathlib.Path("/work/shared/vectors/xen-4.17-helper")
    STREAM_VECTORS = pathlib.Path("/work/shared/vectors/xen-4.17-streams")
# Debian's helper, stream verifier and the Python path the verifier needs, from
# xen-utils-4.NN of this host's Xen release (4.17 on Debian 12, 4.20 on 13).
XEN_RELEASE = xen_release() or "4.17"
XEN_LIBEXEC = f"/usr/lib/xen-{XEN_RELEASE}"
DEBIAN_HELPER = f"{XEN_LIBEXEC}/bin/libxl-save-helper"
VERIFY_STREAM = f"{XEN_LIBEXEC}/bin/verify-stream-v2"
XEN_PYTHONPATH = f"{XEN_LIBEXEC}/lib/python"
SLOW = bool(os.environ.get("PYXL_SLOW"))
# memcheck's leak check of the helper; CPython 3.12+ leaves its immortal
# interned strings allocated at exit: suppressed there (see the file).
MEMCHECK_LEAK_OPTS = ["--leak-check=full", "--show-leak-kinds=definite",
                      "--errors-for-leak-kinds=definite"] + (
    [f"--suppressions={ROOT / 'libxl_helper' / 'cpython-immortal.supp'}"]
    if sys.version_info >= (3, 12) else [])

OUR_HELPER = str(ROOT / "pyxl" / "pyxl-save-helper")
HELPERS = {"ours": OUR_HELPER, "debian": DEBIAN_HELPER}

needs_debian = pytest.mark.skipif(
    not os.access(DEBIAN_HELPER, os.X_OK),
    reason=f"Debian's helper not installed ({DEBIAN_HELPER}; apt xen-utils-{XEN_RELEASE})")


@pytest.fixture
def vectors() -> pathlib.Path:
    return VECTORS


# ---- a hung test fails alone; a passed test's files go at once ------------------------------

#: A test running longer than this fails (pytest-timeout, pyproject.toml), with
#: the stacks of where it waited, and the suite goes on.  A hang used to hold the
#: suite until CI's own limit: on a disk that earlier runs had filled, a save's
#: pipe reader died of ENOSPC while the test still held the pipe's read end, and
#: the save waited for a reader forever.  The slow lane's runs take longer.
SLOW_TEST_TIMEOUT = 1800


def pytest_collection_modifyitems(items: List[pytest.Item]) -> None:
    if SLOW:
        for item in items:
            if item.get_closest_marker("timeout") is None:
                item.add_marker(pytest.mark.timeout(SLOW_TEST_TIMEOUT))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when == "call":
        item.stash[_PASSED] = report.passed


_PASSED = pytest.StashKey[bool]()


@pytest.fixture(autouse=True)
def _tmp_path_freed(request: pytest.FixtureRequest) -> Iterator[None]:
    """A passed test's ``tmp_path`` is removed as it ends, not with the session:
    the suite writes some 12 GiB of save files, and kept to the end they need
    that much free disk (twice, with ``make test-debian13``'s run after).  A
    failed test's stays, to be looked at.  Defined first of the autouse
    fixtures, so it runs after their clean-ups."""
    yield
    path = request.node.funcargs.get("tmp_path") if hasattr(request.node, "funcargs") else None
    if path is not None and request.node.stash.get(_PASSED, False):
        shutil.rmtree(path, ignore_errors=True)


#: Long-running CLI processes a test started (a migrate-receive): whatever is
#: still running when the test ends -- it failed before waiting for them -- is
#: killed and reaped, so one failure does not leave a listener behind for the
#: rest of the run.
SPAWNED: List["subprocess.Popen[str]"] = []


@pytest.fixture(autouse=True)
def _reap_spawned() -> Iterator[None]:
    yield
    while SPAWNED:
        proc = SPAWNED.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


# ---- fakexen state directories -------------------------------------------------------------


@contextlib.contextmanager
def new_sim_dir(prefix: str = "pyxl-test-") -> Iterator[str]:
    """A fresh fakexen state directory under /dev/shm; afterwards every domain left
    in it is destroyed and the directory removed."""
    from pyxl import sim

    d = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    try:
        yield d
    finally:
        sim.remove_dir(d)


@pytest.fixture
def sim_dir() -> Iterator[str]:
    """A private fakexen state directory; every domain left in it is destroyed after the test."""
    with new_sim_dir() as d:
        yield d


@pytest.fixture
def hosts() -> Iterator[Tuple[str, str]]:
    """Two simulated hosts (two fakexen state dirs): (source, destination)."""
    with new_sim_dir("pyxl-test-a-") as a, new_sim_dir("pyxl-test-b-") as b:
        yield a, b


def vcpu_processes(sim_dir: str) -> List[int]:
    """pids of pyxl-sim-vcpu processes working in `sim_dir`."""
    out = []
    key = os.path.abspath(sim_dir).encode() + b"/"
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
            with open(f"/proc/{pid}/stat") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if not zombie and argv and argv[0].endswith(b"pyxl-sim-vcpu") and \
                any(a.startswith(key) for a in argv[1:]):
            out.append(int(pid))
    return out


@contextlib.contextmanager
def private_sim_dir(prefix: str = "pyxl-fx-") -> Iterator[str]:
    """A fresh state directory under /dev/shm; afterwards every domain in it is destroyed,
    no vCPU process may be left, and the directory is removed."""
    from pyxl import sim

    d = tempfile.mkdtemp(prefix=prefix, dir="/dev/shm")
    try:
        yield d
    finally:
        for info in sim.list_domains(d):
            try:
                sim.destroy(info.domid, d)
            except sim.SimError:
                pass
        deadline = time.monotonic() + 5
        while vcpu_processes(d) and time.monotonic() < deadline:
            time.sleep(0.01)
        left = vcpu_processes(d)
        shutil.rmtree(d, ignore_errors=True)
        assert not left, f"vCPU processes left behind in {d}: {left}"


@pytest.fixture
def fxdir() -> Iterator[str]:
    """A strict private state directory (see private_sim_dir)."""
    with private_sim_dir() as d:
        yield d


def domids(sim_dir: str) -> List[int]:
    """The domids living in a state directory, sorted."""
    from pyxl import sim

    return sorted(i.domid for i in sim.list_domains(sim_dir=sim_dir))


@contextlib.contextmanager
def mounted_tmpfs(size: str, prefix: str = "pyxl-tmpfs-", lazy: bool = True) -> Iterator[str]:
    """A small tmpfs mounted for the test (root only; skips the test otherwise).
    Domains left in it are destroyed, then it is unmounted (``lazy=False``: a plain
    umount that must succeed -- nothing may still hold a file in it) and its mount
    point removed."""
    from pyxl import sim

    mnt = tempfile.mkdtemp(prefix=prefix, dir="/tmp")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", mnt],
                       capture_output=True, text=True)
    if r.returncode != 0:
        os.rmdir(mnt)
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        for info in sim.list_domains(mnt):
            try:
                sim.destroy(info.domid, mnt)
            except sim.SimError:
                pass
        if lazy:
            subprocess.run(["umount", "-l", mnt], check=False)
        else:
            subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


# ---- leak checks ---------------------------------------------------------------------------


def open_fds() -> List[int]:
    import gc

    import pyxl

    pyxl.default_loop()  # its selector is a long-lived fd of its own
    start_spawner()      # and so is the spawner's socket
    # Objects of earlier tests (pipes of finished Popens, files) would
    # otherwise be closed by the cyclic GC in the middle of a comparison.
    gc.collect()
    return sorted(int(f) for f in os.listdir("/proc/self/fd"))


def children(cmdline: bool = False) -> List[Tuple[int, Union[str, bytes]]]:
    """Live (or zombie) children of this process: (pid, state letter), or with
    ``cmdline=True`` (pid, raw /proc/PID/cmdline -- comm if that is empty).
    Those that outlive tests by design (``_LONG_LIVED``) are left out, so a
    comparison does not depend on which tests ran before."""
    out: List[Tuple[int, Union[str, bytes]]] = []
    me = str(os.getpid())
    spawner = str(spawner_pid())     # pyxl's own, for the life of the process
    for pid in os.listdir("/proc"):
        if pid.isdigit() and pid != spawner:
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
                if fields[1] != me:
                    continue
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read()
                if not cmd:
                    with open(f"/proc/{pid}/comm", "rb") as f:
                        cmd = f.read()
            except OSError:
                continue
            if not any(name in cmd for name in _LONG_LIVED):
                out.append((int(pid), cmd if cmdline else fields[0]))
    return out


# ---- the three loops -----------------------------------------------------------------------


class LoopDriver:
    """Runs pyxl operations on one of its three loop integrations.

    ``loop``: pass it as ``pyxl.save(..., loop=driver.loop)``.
    ``run_until(op)``: run until the operation is done; its result (or its error, raised).
    ``run_until(predicate, timeout)``: run until ``predicate()`` is true; False on timeout.
    ``wait(*ops, timeout=None)``: like :func:`pyxl.wait` -- run until every op is done,
    raise the first failure, else the results in order.
    """

    name = ""
    loop: object

    def _run(self, done, timeout):   # -> bool
        raise NotImplementedError

    def run_until(self, what, timeout=None):
        if hasattr(what, "done") and hasattr(what, "result"):
            return self.wait(what, timeout=timeout)[0]
        return self._run(what, timeout)

    def wait(self, *ops, timeout=None):
        first = []
        for op in ops:
            op.add_done_callback(lambda o: first.append(o) if o.exception() is not None else None)
        if not self._run(lambda: all(op.done() for op in ops), timeout):
            raise TimeoutError(f"{self.name}: operations still running after {timeout:g}s")
        if first:
            first[0].result()
        return [op.result() for op in ops]

    def close(self):
        pass


class SelectorDriver(LoopDriver):
    """pyxl's own SelectorLoop -- the default loop, as :func:`pyxl.wait` and the CLI use it."""

    name = "selector"

    def __init__(self):
        import pyxl

        self.loop = pyxl.default_loop()

    def _run(self, done, timeout):
        return self.loop.run_until(done, timeout)

    def wait(self, *ops, timeout=None):
        import pyxl

        return pyxl.wait(*ops, timeout=timeout)


class PollToolstack:
    """A xend-style toolstack's main loop over ``select.poll()``: fd watches that call
    ``ready(events)``, and timers; pyxl plugs into it through :class:`pyxl.HookLoop`'s hooks
    (README, "Your own event loop")."""

    def __init__(self):
        import itertools
        import select

        self.select = select
        self.poll = select.poll()
        self.fds = {}                     # fd (the token) -> [selectors mask, ready]
        self.timers = {}                  # token -> (deadline, fire)
        self.tokens = itertools.count(1)

    def _mask(self, events):
        import selectors

        s = self.select
        return (s.POLLIN if events & selectors.EVENT_READ else 0) | \
            (s.POLLOUT if events & selectors.EVENT_WRITE else 0)

    # the hooks HookLoop calls
    def fd_register(self, fd, events, ready):
        assert fd not in self.fds, f"fd {fd} registered twice"
        self.fds[fd] = [events, ready]
        self.poll.register(fd, self._mask(events))
        return fd

    def fd_modify(self, token, events):
        self.fds[token][0] = events
        self.poll.modify(token, self._mask(events))

    def fd_deregister(self, token):
        del self.fds[token]
        self.poll.unregister(token)

    def timeout_register(self, delay, fire):
        token = next(self.tokens)
        self.timers[token] = (time.monotonic() + delay, fire)
        return token

    def timeout_cancel(self, token):
        self.timers.pop(token, None)

    def run_once(self, timeout):
        import selectors

        s = self.select
        if self.timers:
            timeout = min(timeout, max(0.0, min(t for t, _ in self.timers.values()) - time.monotonic()))
        ready = self.poll.poll(timeout * 1000)
        # What was registered when poll() answered: a callback may drop (and another
        # re-register) an fd before its turn.
        entries = [(fd, revents, self.fds.get(fd)) for fd, revents in ready]
        for fd, revents, entry in entries:
            if entry is None or self.fds.get(fd) is not entry:
                continue
            if revents & s.POLLNVAL:
                raise RuntimeError(f"poll: fd {fd} is still watched but was closed")
            events, ready_cb = entry
            fired = 0
            if events & selectors.EVENT_READ and revents & (s.POLLIN | s.POLLPRI | s.POLLHUP | s.POLLERR):
                fired |= selectors.EVENT_READ
            if events & selectors.EVENT_WRITE and revents & (s.POLLOUT | s.POLLHUP | s.POLLERR):
                fired |= selectors.EVENT_WRITE
            if fired:
                ready_cb(fired)
        now = time.monotonic()
        for token, (deadline, fire) in sorted(self.timers.items(), key=lambda kv: kv[1][0]):
            if deadline <= now and self.timers.pop(token, None) is not None:
                fire()


class HookDriver(LoopDriver):
    """:class:`pyxl.HookLoop` on a :class:`PollToolstack`."""

    name = "hook"

    def __init__(self):
        import pyxl

        self.toolstack = ts = PollToolstack()
        self.loop = pyxl.HookLoop(ts.fd_register, ts.fd_modify, ts.fd_deregister,
                                  ts.timeout_register, ts.timeout_cancel)

    def _run(self, done, timeout):
        deadline = None if timeout is None else time.monotonic() + timeout
        while not done():
            left = 1.0 if deadline is None else deadline - time.monotonic()
            if left <= 0:
                return False
            self.toolstack.run_once(min(left, 1.0))
        return True

    def close(self):
        # What README's hook example checks too: a finished operation leaves no watch behind.
        ts = self.toolstack
        assert not ts.fds, f"HookLoop: fds still watched after the test: {sorted(ts.fds)}"
        assert not ts.timers, f"HookLoop: timers still pending after the test: {len(ts.timers)}"


class AsyncioDriver(LoopDriver):
    """:class:`pyxl.AsyncioLoop` on a fresh asyncio event loop, run with run_until_complete."""

    name = "asyncio"

    def __init__(self):
        import asyncio

        import pyxl

        self.asyncio = asyncio
        self.aloop = asyncio.new_event_loop()
        self.loop = pyxl.AsyncioLoop(self.aloop)

    def _run(self, done, timeout):
        asyncio = self.asyncio

        async def until():
            while not done():
                await asyncio.sleep(0.001)

        try:
            self.aloop.run_until_complete(asyncio.wait_for(until(), timeout))
        except asyncio.TimeoutError:
            return False
        return True

    def close(self):
        self.aloop.close()


LOOP_DRIVERS = {"selector": SelectorDriver, "hook": HookDriver, "asyncio": AsyncioDriver}


@pytest.fixture(params=sorted(LOOP_DRIVERS))
def any_loop(request) -> Iterator[LoopDriver]:
    """The test once per loop integration: ``any_loop.loop`` for ``pyxl.save(..., loop=)``,
    ``any_loop.run_until(op_or_predicate)`` and ``any_loop.wait(*ops)`` to run it."""
    driver = LOOP_DRIVERS[request.param]()
    try:
        yield driver
    finally:
        driver.close()


@pytest.fixture(scope="module", autouse=True)
def _gc_frozen_before_each_module() -> Iterator[None]:
    """The leak checks (open_fds) run a full gc.collect() around every operation.
    What earlier modules left alive is not the current module's to scan hundreds of
    times (in the slow lane that cost most of the run): collect once, then freeze it
    (gc.freeze) for the module, so a collection costs what the module's own objects
    cost.  Garbage of earlier modules is collected here, before the freeze."""
    import gc

    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


#: Children that outlive tests by design: multiprocessing's resource tracker
#: (started by the first test that uses multiprocessing, for the whole run).
_LONG_LIVED = (b"multiprocessing.resource_tracker",)


def _leftovers() -> Tuple[List[Tuple[int, Union[str, bytes]]], List[int]]:
    import pyxl.loop
    kids = children(cmdline=True)
    loop = pyxl.loop._default
    return kids, sorted(loop._sel.get_map()) if loop is not None else []


@pytest.fixture(autouse=True)
def _nothing_left_running() -> Iterator[None]:
    """Every test: no child process of ours (pyxl's helpers, stages, device
    models, vCPUs; the test's own) and no watch on the default loop outlives it,
    so a leak fails the test that made it, not a later one.  A child still
    exiting gets a few seconds (the default loop runs meanwhile, to reap it);
    one still there is killed, reaped, and named in the failure."""
    import signal

    import pyxl.loop
    yield
    kids, watches = _leftovers()
    deadline = time.monotonic() + 5
    while (kids or watches) and time.monotonic() < deadline:
        if pyxl.loop._default is not None:
            pyxl.loop._default.run_once(0.05)
        else:
            time.sleep(0.05)
        kids, watches = _leftovers()
    for pid, _ in kids:
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except (ChildProcessError, ProcessLookupError):
            pass
    for fd in watches:    # named below, then dropped: one leak fails one test, not the rest
        assert pyxl.loop._default is not None
        pyxl.loop._default.remove_reader(fd)
        pyxl.loop._default.remove_writer(fd)
    assert not kids and not watches, f"left running: children {kids}, loop watches {watches}"
