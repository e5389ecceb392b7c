"""A callback of the application's that raises fails its operation clearly: a
``CallbackError`` whose ``__cause__`` is the callback's exception and whose one
line names it, the guest reported (``guest_state``) and left as the save found
it, no temporary file, no child left; never a hang, never only a log line.
Real helper, fakexen, pyxl's loop and asyncio."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Dict

import pytest

import pyxl
import pyxl.aio
from conftest import children
from pyxl import sim
from pyxl.backends.sim import SimBackend

MB = 1 << 20


class Boom(Exception):
    """The application's bug."""


def _failed(op: pyxl.Operation[object], timeout: float = 30) -> pyxl.CallbackError:
    start = time.monotonic()
    assert pyxl.default_loop().run_until(op.done, timeout), "the operation hung"
    assert time.monotonic() - start < 10
    exc = op.exception()
    assert isinstance(exc, pyxl.CallbackError), repr(exc)
    assert isinstance(exc.__cause__, Boom)
    assert "\n" not in str(exc) and "Boom(" in str(exc)
    assert children() == []
    return exc


def _no_file(tmp_path) -> None:
    assert [p.name for p in tmp_path.iterdir()] == []


@pytest.mark.parametrize("before", ["running", "paused"])
def test_a_raising_suspend_handler_fails_the_save_with_its_exception(sim_dir, tmp_path, before):
    """It used to be answered with failure and only logged: the save failed with
    libxc's "HelperFailed ... suspend() failed: Internal error", no cause."""
    d = sim.create(32 * MB, sim_dir=sim_dir)
    if before == "paused":
        sim.pause(d, sim_dir=sim_dir)

    def handler(req: pyxl.CallbackRequest) -> int:
        raise Boom("handler exploded")
    op = pyxl.save(d, tmp_path / "g.save", leave="running", sim_dir=sim_dir,
                   callbacks={"suspend": handler})
    exc = _failed(op)
    assert exc.callback == "suspend handler"
    assert str(exc).startswith(f"save of domain {d} failed: the application's suspend handler "
                               "raised Boom('handler exploded')")
    assert exc.guest_state == before == sim.state(d, sim_dir=sim_dir)
    _no_file(tmp_path)


class _SuspendRaises(SimBackend):
    """A backend whose suspend call raises (a toolstack's own backend, or one
    whose XenStore went away)."""

    def start_suspend(self, loop: Any, domid: int, timeout: float, done: Any) -> Any:
        raise Boom("xenstored went away")


def test_a_backend_raising_in_pyxls_own_handler_is_not_blamed_on_the_application(
        sim_dir, tmp_path):
    """No handler of the application's ran: the failure says pyxl's answer to
    the helper raised, as an OperationError (not a CallbackError naming "the
    application's suspend handler"), and the guest is reported as left."""
    d = sim.create(32 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", leave="running", backend=_SuspendRaises(sim_dir))
    assert pyxl.default_loop().run_until(op.done, 30), "the operation hung"
    exc = op.exception()
    assert type(exc) is pyxl.OperationError, repr(exc)
    assert str(exc).startswith(f"save of domain {d} failed: answering the helper's suspend "
                               "raised Boom('xenstored went away')"), exc
    assert "application" not in str(exc) and "\n" not in str(exc)
    assert isinstance(exc.__cause__, Boom)
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)
    assert children() == []
    _no_file(tmp_path)


def test_a_suspend_handler_that_suspends_then_raises_gets_its_guest_resumed(sim_dir, tmp_path):
    d = sim.create(32 * MB, sim_dir=sim_dir)

    def handler(req: pyxl.CallbackRequest) -> int:
        sim.suspend(d, sim_dir=sim_dir)
        raise Boom("suspended, then exploded")
    op = pyxl.save(d, tmp_path / "g.save", live=True, leave="destroy", sim_dir=sim_dir,
                   callbacks={"suspend": handler})
    exc = _failed(op)
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)
    _no_file(tmp_path)


@pytest.mark.parametrize("answer", [object(), "yes", None.__class__, 1e400])
def test_a_suspend_handler_answering_no_number_fails_the_save_and_resumes_its_guest(
        sim_dir, tmp_path, answer):
    """A handler that suspends the guest and answers something int() refuses
    (an object, a word, a class, an infinite float): the helper was left
    waiting for an answer that never came, the guest suspended."""
    d = sim.create(32 * MB, sim_dir=sim_dir)

    def handler(req: pyxl.CallbackRequest) -> Any:
        sim.suspend(d, sim_dir=sim_dir)
        return answer
    op = pyxl.save(d, tmp_path / "g.save", live=True, leave="destroy", sim_dir=sim_dir,
                   callbacks={"suspend": handler})
    assert pyxl.default_loop().run_until(op.done, 30), "the operation hung"
    exc = op.exception()
    assert isinstance(exc, pyxl.CallbackError), repr(exc)
    assert exc.callback == "suspend handler" and "not a number" in str(exc)
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)
    assert children() == []
    _no_file(tmp_path)


def _aio_save_failure(d: int, tmp_path: Any, sim_dir: str, leave: Any,
                      callbacks: Dict[str, Any]) -> pyxl.CallbackError:
    """A live save through pyxl.aio whose callbacks raise Boom: its CallbackError."""
    async def main() -> pyxl.CallbackError:
        with pytest.raises(pyxl.CallbackError) as info:
            await asyncio.wait_for(pyxl.aio.save(d, str(tmp_path / "g.save"), live=True,
                                                 leave=leave, sim_dir=sim_dir,
                                                 callbacks=callbacks), 30)
        return info.value
    exc = asyncio.run(main())
    assert isinstance(exc.__cause__, Boom)
    return exc


def test_a_coroutine_suspend_handler_that_suspends_then_raises_gets_its_guest_resumed(
        sim_dir, tmp_path):
    d = sim.create(32 * MB, sim_dir=sim_dir)

    async def handler(req: pyxl.CallbackRequest) -> int:
        await asyncio.sleep(0)              # the answer is owed across a turn of the loop
        sim.suspend(d, sim_dir=sim_dir)
        await asyncio.sleep(0.05)
        raise Boom("suspended, then exploded")

    exc = _aio_save_failure(d, tmp_path, sim_dir, "destroy", {"suspend": handler})
    assert exc.callback == "suspend handler"
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)
    _no_file(tmp_path)


def test_a_raising_coroutine_handler_fails_the_save_with_its_exception(sim_dir, tmp_path):
    d = sim.create(32 * MB, sim_dir=sim_dir)

    async def handler(req: pyxl.CallbackRequest) -> int:
        await asyncio.sleep(0)
        raise Boom("coroutine exploded")

    exc = _aio_save_failure(d, tmp_path, sim_dir, "running", {"switch_qemu_logdirty": handler})
    assert exc.callback == "switch_qemu_logdirty handler"
    assert sim.state(d, sim_dir=sim_dir) == "running"
    assert children() == []
    _no_file(tmp_path)


def test_a_raising_on_progress_fails_the_save_at_once(sim_dir, tmp_path):
    """It used to escape into the loop (out of pyxl.wait), drop the helper's
    other messages of that read, and leave the save running for ever."""
    d = sim.create(64 * MB, dirty_rate=1 * MB, sim_dir=sim_dir)
    seen = []

    def on_progress(ev: pyxl.ProgressEvent) -> None:
        seen.append(ev)
        raise Boom("progress exploded")
    op = pyxl.save(d, tmp_path / "g.save", live=True, sim_dir=sim_dir, on_progress=on_progress)
    exc = _failed(op)
    assert len(seen) == 1, "not called again once it raised"
    assert exc.callback == "on_progress" and exc.guest_state is None    # never stopped
    assert sim.state(d, sim_dir=sim_dir) == "running"
    _no_file(tmp_path)


def test_a_progress_callback_raising_after_the_suspend_resumes_the_guest(sim_dir, tmp_path):
    d = sim.create(64 * MB, dirty_rate=8 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", live=True, leave="destroy", sim_dir=sim_dir)

    def late(ev: pyxl.ProgressEvent) -> None:
        if op.suspended:
            raise Boom("raised with the guest suspended")
    op.add_progress_callback(late)
    exc = _failed(op)
    assert exc.callback == "progress callback"
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)
    _no_file(tmp_path)


def test_a_raising_before_suspend_fails_the_save(sim_dir, tmp_path):
    d = sim.create(32 * MB, sim_dir=sim_dir)

    def before_suspend(go: object) -> None:
        raise Boom("not now")
    op = pyxl.save(d, tmp_path / "g.save", leave="running", sim_dir=sim_dir,
                   before_suspend=before_suspend)
    exc = _failed(op)
    assert exc.callback == "before_suspend"
    assert sim.state(d, sim_dir=sim_dir) == "running"
    _no_file(tmp_path)


def test_a_raising_write_trailer_fails_the_save(sim_dir, tmp_path):
    """write_trailer (an fd target's end, for a caller that drains it) raising
    after the helper finished: the save fails, the guest it suspended runs."""
    d = sim.create(32 * MB, sim_dir=sim_dir)

    def write_trailer(data: bytes) -> None:
        raise Boom("trailer exploded")
    fd = os.open(tmp_path / "g.save", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        op = pyxl.save(d, fd, leave="destroy", sim_dir=sim_dir, write_trailer=write_trailer)
        exc = _failed(op)
    finally:
        os.close(fd)
    assert exc.callback == "write_trailer"
    assert exc.guest_state == "running" == sim.state(d, sim_dir=sim_dir)


def test_a_raising_on_progress_fails_a_migration_at_once(hosts):
    """A migration's on_progress goes to its save: the sender fails with the
    CallbackError (the source runs on), the receiver keeps nothing."""
    from pyxl import migrate
    src, dst = hosts
    d = sim.create(32 * MB, dirty_rate=1 * MB, sim_dir=src)
    rx = migrate.receive("127.0.0.1:0", sim_dir=dst)

    def on_progress(ev: pyxl.ProgressEvent) -> None:
        raise Boom("progress exploded")
    assert rx.address is not None
    tx = migrate.migrate(d, rx.address, live=True, sim_dir=src, on_progress=on_progress)
    assert pyxl.default_loop().run_until(lambda: tx.done() and rx.done(), 30)
    exc = tx.exception()
    assert isinstance(exc, pyxl.CallbackError) and isinstance(exc.__cause__, Boom), repr(exc)
    assert isinstance(rx.exception(), pyxl.MigrationError)
    assert exc.source_state == "running" == sim.state(d, sim_dir=src)
    assert sim.list_domains(dst) == [] and children() == []
