"""The helper's precopy policies on fakexen, with a guest that keeps dirtying memory.

* Xen's default (no PYXL_PRECOPY, or "xen"): at most 5 rounds sent live, for
  our helper as for Debian's, and not one "pyxl-precopy" log line.
* PYXL_PRECOPY=downtime: stops once the predicted downtime fits the target;
  an infeasible target aborts (PrecopyAborted, the guest still running and
  never suspended, no file) or, with PYXL_PRECOPY_ON_FAIL=stop, forces the
  stop-and-copy at the round limit.
* Every successful save restores byte for byte.
* Bad values are usage errors (exit 2, one line on stderr), read only when
  the downtime policy is selected and only in save mode.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import time
from typing import Dict, List, Optional, Tuple

import pytest

import pyxl
from pyxl import sim

from conftest import HELPERS, MEMCHECK_LEAK_OPTS, OUR_HELPER

MB = 1 << 20
GUEST = 64 * MB


def live_save(sim_dir: str, dom: int, path, env: Optional[Dict[str, str]] = None,
              helper: str = "ours", caplog=None, **kw) -> Tuple[object, List[str]]:
    """Live-save ``dom`` (left paused); return (result or exception, phases in order).

    The phases list has "SUSPEND" where the suspend callback came, so the
    rounds before it are the ones sent live.
    """
    phases: List[str] = []

    def progress(ev: pyxl.ProgressEvent) -> None:
        if not phases or phases[-1] != ev.phase:
            phases.append(ev.phase)

    op = pyxl.save(dom, path, live=True, leave="paused", helper=HELPERS[helper],
                   sim_dir=sim_dir, on_progress=progress, helper_env=env, **kw)

    def suspend(req: pyxl.CallbackRequest) -> None:
        phases.append("SUSPEND")
        return op._default_suspend(req)

    op.callbacks["suspend"] = suspend
    try:
        return pyxl.wait(op)[0], phases
    except pyxl.OperationError as exc:
        return exc, phases


def live_rounds(phases: List[str]) -> List[int]:
    """Iteration numbers of the rounds sent while the guest ran."""
    before = phases[:phases.index("SUSPEND")] if "SUSPEND" in phases else phases
    return [int(p.rsplit(" ", 1)[1]) for p in before if p.startswith("Frames iteration ")]


def restore_matches(sim_dir: str, src: int, path) -> None:
    """The saved (paused) source and its restored copy are identical, and intact."""
    want = sim.digest(src, sim_dir=sim_dir)
    res = pyxl.wait(pyxl.restore(path, paused=True, sim_dir=sim_dir, name="copy"))[0]
    assert sim.digest(res.domid, sim_dir=sim_dir) == want
    check = sim.check_guest(res.domid, sim_dir=sim_dir)
    assert check.consistent, check
    sim.destroy(res.domid, sim_dir=sim_dir)


def precopy_lines(caplog, dom: int, level: int = logging.NOTSET) -> List[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == f"pyxl.domain.{dom}" and r.levelno >= level
            and r.getMessage().startswith("pyxl-precopy: ")]


def downtime_env(ms: float, iterations: int = 30, on_fail: str = "abort") -> Dict[str, str]:
    return {"PYXL_PRECOPY": "downtime", "PYXL_DOWNTIME_MS": str(ms),
            "PYXL_MAX_ITERATIONS": str(iterations), "PYXL_PRECOPY_ON_FAIL": on_fail}


@pytest.fixture
def busy_guest(sim_dir):
    def make(rate_mb: float) -> int:
        dom = sim.create(GUEST, dirty_rate=int(rate_mb * MB), sim_dir=sim_dir)
        time.sleep(0.1)
        return dom
    return make


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_default_policy_is_xens_five_rounds(sim_dir, busy_guest, tmp_path, caplog, helper):
    caplog.set_level(logging.DEBUG)
    dom = busy_guest(200)   # never below 50 dirty pages: the round limit decides
    # PYXL_DOWNTIME_MS alone selects nothing, and is not even read.
    res, phases = live_save(sim_dir, dom, tmp_path / "g", env={"PYXL_DOWNTIME_MS": "junk"},
                            helper=helper)
    assert isinstance(res, pyxl.SaveResult), res
    rounds = live_rounds(phases)
    assert rounds == list(range(len(rounds))) and 2 <= len(rounds) <= 5, phases
    assert phases.index("SUSPEND") < phases.index("Domain now suspended")
    assert not precopy_lines(caplog, dom)
    restore_matches(sim_dir, dom, tmp_path / "g")


def test_explicit_xen_policy_matches_default(sim_dir, busy_guest, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dom = busy_guest(200)
    res, phases = live_save(sim_dir, dom, tmp_path / "g",
                            env={"PYXL_PRECOPY": "xen", "PYXL_MAX_ITERATIONS": "x"})
    assert isinstance(res, pyxl.SaveResult), res
    assert 2 <= len(live_rounds(phases)) <= 5
    assert not precopy_lines(caplog, dom)


def test_downtime_policy_converges(sim_dir, busy_guest, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dom = busy_guest(16)
    res, phases = live_save(sim_dir, dom, tmp_path / "g", env=downtime_env(50))
    assert isinstance(res, pyxl.SaveResult), res
    lines = precopy_lines(caplog, dom)
    # One DETAIL line per policy call, ending in the stop decision...
    assert lines[0].startswith("pyxl-precopy: iteration 0, dirty ")
    assert lines[-1].endswith("within the target 50.0 ms: stop and copy"), lines
    assert not any("target not met" in line for line in lines)
    # ...taken before the round limit, with the guest never touched until then.
    assert 1 <= len(live_rounds(phases)) < 30
    assert res.downtime is not None and res.downtime < 2.0
    restore_matches(sim_dir, dom, tmp_path / "g")


def test_downtime_policy_idle_guest_stops_after_one_round(sim_dir, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dom = sim.create(GUEST, sim_dir=sim_dir)
    res, phases = live_save(sim_dir, dom, tmp_path / "g", env=downtime_env(1))
    assert isinstance(res, pyxl.SaveResult), res
    assert live_rounds(phases) == [0], phases
    restore_matches(sim_dir, dom, tmp_path / "g")


def test_infeasible_target_aborts_and_guest_keeps_running(sim_dir, busy_guest, tmp_path,
                                                          caplog):
    caplog.set_level(logging.DEBUG)
    dom = busy_guest(400)   # rewrites the whole 64 MiB every ~160 ms
    before = sim.counter(dom, sim_dir=sim_dir)
    res, phases = live_save(sim_dir, dom, tmp_path / "g", env=downtime_env(0.001, 3))
    assert isinstance(res, pyxl.PrecopyAborted), res
    assert isinstance(res, pyxl.HelperFailed)   # still the libxc failure it is
    assert "downtime target 0.0 ms not met after 3 iterations" in str(res)
    assert any(e.startswith("pyxl-precopy: downtime target") for e in res.helper_errors)
    assert "SUSPEND" not in phases and live_rounds(phases) == [0, 1, 2]
    assert not (tmp_path / "g").exists() and os.listdir(tmp_path) == []
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    time.sleep(0.1)
    assert sim.counter(dom, sim_dir=sim_dir) > before   # still writing
    sim.pause(dom, sim_dir=sim_dir)
    assert sim.check_guest(dom, sim_dir=sim_dir).consistent


def test_infeasible_target_can_force_stop_and_copy(sim_dir, busy_guest, tmp_path, caplog):
    caplog.set_level(logging.DEBUG)
    dom = busy_guest(400)
    res, phases = live_save(sim_dir, dom, tmp_path / "g", env=downtime_env(0.001, 3, "stop"))
    assert isinstance(res, pyxl.SaveResult), res
    assert live_rounds(phases) == [0, 1, 2], phases
    warns = precopy_lines(caplog, dom, logging.WARNING)
    assert len(warns) == 1 and warns[0].endswith("forcing stop and copy"), warns
    assert not precopy_lines(caplog, dom, logging.ERROR)
    restore_matches(sim_dir, dom, tmp_path / "g")


@pytest.mark.parametrize("name,value,complaint", [
    ("PYXL_PRECOPY", "fast", "PYXL_PRECOPY must be 'xen', 'downtime' or 'host', got 'fast'"),
    ("PYXL_DOWNTIME_MS", "0", "PYXL_DOWNTIME_MS must be a number from 0.001 to 3.6e+06"),
    ("PYXL_DOWNTIME_MS", "nan", "PYXL_DOWNTIME_MS must be a number"),
    ("PYXL_DOWNTIME_MS", "12ms", "PYXL_DOWNTIME_MS must be a number"),
    ("PYXL_MAX_ITERATIONS", "0", "PYXL_MAX_ITERATIONS must be a whole number from 1"),
    ("PYXL_MAX_ITERATIONS", "2.5", "PYXL_MAX_ITERATIONS must be a whole number"),
    ("PYXL_PRECOPY_ON_FAIL", "retry", "PYXL_PRECOPY_ON_FAIL must be 'abort' or 'stop'"),
])
def test_bad_precopy_environment_is_a_usage_error(name, value, complaint):
    env = dict(os.environ, PYXL_PRECOPY="downtime")
    env[name] = value
    r, w = os.pipe()
    try:
        done = subprocess.run([OUR_HELPER, "--save-domain", str(w), "-1", "5", "1", "136", "0"],
                              env=env, pass_fds=(w,), capture_output=True, timeout=30)
    finally:
        os.close(r)
        os.close(w)
    assert done.returncode == 2 and done.stdout == b""
    assert done.stderr.count(b"\n") == 1 and complaint.encode() in done.stderr, done.stderr


def test_precopy_environment_ignored_by_restore_and_default():
    """Without privcmd both helpers stop at xc_interface_open (255): no usage error."""
    junk = {"PYXL_DOWNTIME_MS": "junk", "PYXL_MAX_ITERATIONS": "-1",
            "PYXL_PRECOPY_ON_FAIL": "maybe"}
    env = {k: v for k, v in os.environ.items() if k not in ("LD_PRELOAD", "PYXL_PRECOPY")}
    r, w = os.pipe()
    try:
        for argv, extra in ((["--save-domain", str(w), "-1", "5", "1", "136", "0"], {}),
                            (["--restore-domain", str(r), "-1", "7", "1", "0", "2", "0", "768",
                              "0"], {"PYXL_PRECOPY": "nonsense"})):
            done = subprocess.run([OUR_HELPER] + argv, env=dict(env, **junk, **extra),
                                  pass_fds=(r, w), capture_output=True, timeout=30)
            assert done.returncode == 255, done.stderr
    finally:
        os.close(r)
        os.close(w)


def test_pyxl_save_reports_a_bad_environment(sim_dir, tmp_path):
    dom = sim.create(4 * MB, sim_dir=sim_dir)
    with pytest.raises(pyxl.HelperExited) as info:
        pyxl.wait(pyxl.save(dom, tmp_path / "g", live=True, sim_dir=sim_dir,
                            helper_env={"PYXL_PRECOPY": "downtime", "PYXL_DOWNTIME_MS": "-5"}))
    assert info.value.status == 2
    assert sim.info(dom, sim_dir=sim_dir).state == "running"


@pytest.mark.skipif(not shutil.which("valgrind"), reason="valgrind not installed")
@pytest.mark.parametrize("on_fail", ["abort", "stop"])
def test_downtime_policy_under_memcheck(sim_dir, busy_guest, tmp_path, on_fail):
    """The policy's C paths (clock, /proc/self/io, formatting, both verdicts) are memcheck-clean."""
    import re
    import stat

    log = tmp_path / "vg.log"
    wrapper = tmp_path / "memcheck-helper"
    wrapper.write_text("#!/bin/sh\nexec %s --tool=memcheck %s "
                       "--error-exitcode=99 --log-file=%s %s \"$@\"\n"
                       % (shutil.which("valgrind"), " ".join(MEMCHECK_LEAK_OPTS), log, OUR_HELPER))
    wrapper.chmod(stat.S_IRWXU)
    dom = busy_guest(300)
    env = dict(downtime_env(1, 3, on_fail), PYXL_HELPER_PYTHONMALLOC="malloc0")
    op = pyxl.save(dom, tmp_path / "g", live=True, leave="paused", helper=str(wrapper),
                   sim_dir=sim_dir, helper_env=env, timeout=600)
    try:
        pyxl.wait(op)
    except pyxl.OperationError:
        pass
    exc = op.exception()
    if on_fail == "abort":
        assert isinstance(exc, pyxl.PrecopyAborted), exc
    else:
        assert exc is None, exc
    text = log.read_text()
    assert re.search(r"ERROR SUMMARY: 0 errors", text), text[-2000:]
    assert re.search(r"definitely lost: 0 bytes|no leaks are possible", text), text[-2000:]
