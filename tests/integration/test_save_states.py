"""How a failed save leaves its guest, once it was suspended: as it was before
the save (a paused guest paused, a running one running), and, when the resume
itself fails, an error that says the guest is still suspended
(``guest_state``).  Real helper, fakexen."""

from __future__ import annotations

import pytest

import pyxl
from pyxl import sim
from pyxl.backends.sim import SimBackend

MB = 1 << 20


def cancelled_after_the_suspend(d: int, sim_dir: str, tmp_path, backend=None) -> pyxl.SaveOperation:
    """A live save whose suspend handler suspends the guest, then cancels the save."""
    loop = pyxl.default_loop()

    def suspend_then_cancel(req: pyxl.CallbackRequest) -> int:
        sim.suspend(d, sim_dir=sim_dir)
        loop.call_later(0, op.cancel)
        return 1
    op = pyxl.save(d, tmp_path / "g.save", live=True, leave="running", sim_dir=sim_dir,
                   backend=backend, callbacks={"suspend": suspend_then_cancel})
    assert loop.run_until(op.done, 60)
    return op


@pytest.mark.parametrize("before", ["running", "paused"])
def test_a_save_cancelled_after_the_suspend_leaves_the_guest_as_it_found_it(
        sim_dir, tmp_path, before):
    d = sim.create(64 * MB, dirty_rate=1 * MB, sim_dir=sim_dir)
    if before == "paused":
        sim.pause(d, sim_dir=sim_dir)
    op = cancelled_after_the_suspend(d, sim_dir, tmp_path)
    exc = op.exception()
    assert isinstance(exc, pyxl.Cancelled), exc
    assert op.suspended
    assert sim.state(d, sim_dir=sim_dir) == before
    assert exc.guest_state == before
    assert "still suspended" not in str(exc)
    assert list(tmp_path.iterdir()) == []


def test_a_failure_before_the_suspend_says_nothing_of_the_guest(sim_dir, tmp_path):
    d = sim.create(64 * MB, sim_dir=sim_dir)
    sim.pause(d, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", helper="/bin/false", sim_dir=sim_dir)
    assert pyxl.default_loop().run_until(op.done, 60)
    assert isinstance(op.exception(), pyxl.HelperExited)
    assert op.exception().guest_state is None
    assert sim.state(d, sim_dir=sim_dir) == "paused"


class BrokenResume(SimBackend):
    """fakexen, but its resume fails (a toolstack's backend that lost its host)."""

    def resume(self, domid: int) -> None:
        raise pyxl.BackendError("resume broken")


def test_a_failed_resume_is_in_the_error(sim_dir, tmp_path):
    d = sim.create(64 * MB, dirty_rate=1 * MB, sim_dir=sim_dir)
    op = cancelled_after_the_suspend(d, sim_dir, tmp_path, backend=BrokenResume(sim_dir))
    exc = op.exception()
    assert isinstance(exc, pyxl.Cancelled), exc
    assert exc.guest_state == "suspended"
    assert f"domain {d} is still suspended: resuming it failed: resume broken" in str(exc), exc
    assert "\n" not in str(exc)
    assert sim.state(d, sim_dir=sim_dir) == "suspended"
    sim.resume(d, sim_dir=sim_dir)


@pytest.mark.parametrize("before", ["running", "paused"])
@pytest.mark.parametrize("live", [False, True])
def test_a_checkpoint_save_leaves_the_guest_as_it_found_it(sim_dir, tmp_path, before, live):
    """``leave="running"`` (``xl save -c``) resumes the guest as it was: one a
    toolstack had paused stays paused (xl's resume keeps that pause too), and
    the image is still a whole guest."""
    d = sim.create(64 * MB, dirty_rate=1 * MB if live else 0, sim_dir=sim_dir)
    if before == "paused":
        sim.pause(d, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", live=live, leave="running", sim_dir=sim_dir)
    assert pyxl.default_loop().run_until(op.done, 60)
    op.result()
    assert sim.state(d, sim_dir=sim_dir) == before
    sim.destroy(d, sim_dir=sim_dir)
    r = pyxl.restore(tmp_path / "g.save", paused=True, sim_dir=sim_dir)
    assert pyxl.default_loop().run_until(r.done, 60)
    sim.check_guest(r.result().domid, sim_dir=sim_dir)


class LostHost(SimBackend):
    """fakexen, but its host directory is gone by the time a restore names its domain."""

    def lock_dir(self) -> str:
        raise pyxl.BackendError("the host's directory went away")


def test_a_backend_failing_to_name_its_host_fails_the_restore_not_the_loop(sim_dir, tmp_path):
    d = sim.create(16 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g.save", sim_dir=sim_dir)
    assert pyxl.default_loop().run_until(op.done, 60)
    op.result()
    r = pyxl.restore(tmp_path / "g.save", backend=LostHost(sim_dir))
    assert pyxl.default_loop().run_until(r.done, 60)     # the loop was not left by a raise
    assert "the host's directory went away" in str(r.exception())
    assert sim.list_domains(sim_dir) == []
