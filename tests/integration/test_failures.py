"""Every way a helper can fail becomes a typed error; nothing leaks, nothing is lost."""

import os
import sys
import textwrap
import time

import pytest

import pyxl
from pyxl import sim

from conftest import ROOT, children, open_fds

MB = 1 << 20


def script(tmp_path, body):
    """A misbehaving helper: a real process on real pipes, speaking pyxl.wire.codec's frames."""
    path = tmp_path / "helper"
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f"""\
        import os, sys, time, signal
        sys.path.insert(0, {str(ROOT)!r})
        from pyxl.wire import codec as p
        def send(m): os.write(1, p.encode(m))
        def reply(): return int.from_bytes(os.read(0, 4), "little", signed=True)
        """) + textwrap.dedent(body))
    path.chmod(0o755)
    return str(path)


CASES = {
    "exit3": ("sys.exit(3)", pyxl.HelperExited),
    "segv": ("os.kill(os.getpid(), signal.SIGSEGV)", pyxl.HelperDied),
    "nocomplete": ("send(p.Log(8, -1, 'xc', 'boom'))\nsys.exit(0)", pyxl.MissingComplete),
    "garbage": ("os.write(1, b'\\x04\\x00\\x63\\x00\\x00\\x00')\ntime.sleep(30)", pyxl.HelperProtocolError),
    "failed": ("send(p.Log(8, -1, 'xc', 'Save failed (5 = Input/output error)'))\n"
               "send(p.Complete(-1, 5)); reply()", pyxl.HelperFailed),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_typed_failures_leave_file_and_domain(sim_dir, tmp_path, case, any_loop):
    body, exc_type = CASES[case]
    d = sim.create(16 * MB, sim_dir=sim_dir)
    target = tmp_path / "existing.save"
    target.write_bytes(b"precious")
    fds, kids = open_fds(), children()
    op = pyxl.save(d, target, helper=script(tmp_path, body), sim_dir=sim_dir, timeout=20,
                   loop=any_loop.loop)
    t0 = time.monotonic()
    with pytest.raises(exc_type) as e:
        any_loop.run_until(op)
    assert time.monotonic() - t0 < 10
    assert target.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["existing.save", "helper"]
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    assert open_fds() == fds and children() == kids
    if case in ("nocomplete", "failed"):
        assert e.value.helper_errors and "xc:" in e.value.helper_errors[-1]
    if case == "failed":
        assert e.value.errnoval == 5


def test_the_first_helper_error_is_quoted_and_kept(sim_dir, tmp_path):
    """libxc logs the cause first and its summary last ("Save failed ... Internal
    error"): the message quotes the first; helper_errors keeps it and the last
    ones, however many came in between."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    helper = script(tmp_path, """\
        send(p.Log(8, -1, 'xc', 'Failed to write page data: the cause'))
        for i in range(20):
            send(p.Log(8, -1, 'xc', f'consequence {i}'))
        send(p.Log(8, -1, 'xc', 'Save failed (0 = Success): Internal error'))
        send(p.Complete(-1, 0)); reply()
        """)
    op = pyxl.save(d, tmp_path / "g.save", helper=helper, sim_dir=sim_dir)
    assert pyxl.default_loop().run_until(op.done, 30)
    exc = op.exception()
    assert isinstance(exc, pyxl.HelperFailed), exc
    assert str(exc).endswith("(helper: xc: Failed to write page data: the cause)"), exc
    assert exc.helper_errors[0] == "xc: Failed to write page data: the cause"
    assert exc.helper_errors[-1] == "xc: Save failed (0 = Success): Internal error"
    assert len(exc.helper_errors) == 8 and exc.helper_errors[1] == "xc: consequence 14"
    assert sim.info(d, sim_dir=sim_dir).state == "running"


def test_failure_after_suspend_resumes_guest(sim_dir, tmp_path):
    d = sim.create(16 * MB, dirty_rate=1 * MB, sim_dir=sim_dir)
    helper = script(tmp_path, """\
        send(p.Suspend()); assert reply() == 1
        sys.exit(1)
        """)
    resumed = []
    op = pyxl.save(d, tmp_path / "x", helper=helper, sim_dir=sim_dir,
                   on_resume=lambda domid: (resumed.append(domid), sim.resume(domid, sim_dir=sim_dir)))
    with pytest.raises(pyxl.HelperExited):
        pyxl.wait(op)
    assert resumed == [d]
    assert sim.info(d, sim_dir=sim_dir).state == "running"


def test_timeout_kills_stopped_helper(sim_dir, tmp_path, any_loop):
    d = sim.create(16 * MB, sim_dir=sim_dir)
    kids = children()
    helper = script(tmp_path, "os.kill(os.getpid(), signal.SIGSTOP)")
    op = pyxl.save(d, tmp_path / "x", helper=helper, sim_dir=sim_dir, timeout=0.5,
                   loop=any_loop.loop)
    t0 = time.monotonic()
    with pytest.raises(pyxl.Timeout):
        any_loop.run_until(op)
    assert time.monotonic() - t0 < 5
    assert children() == kids


def test_cancel_sigterm_then_sigkill(sim_dir, tmp_path, any_loop):
    d = sim.create(16 * MB, sim_dir=sim_dir)
    helper = script(tmp_path, """\
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        send(p.Log(1, 0, 'libxl-save-helper', 'starting save'))
        time.sleep(60)
        """)
    op = pyxl.save(d, tmp_path / "x", helper=helper, sim_dir=sim_dir, loop=any_loop.loop)
    # Cancel only once the helper ignores SIGTERM (it logs right after),
    # however slowly it starts on a loaded machine.
    assert any_loop.run_until(lambda: op.helper is not None
                              and op.helper.conv.decoder.offset > 0, timeout=30)
    t0 = time.monotonic()
    op.cancel(grace=0.3)
    with pytest.raises(pyxl.Cancelled):
        any_loop.run_until(op)
    assert 0.25 < time.monotonic() - t0 < 5


def test_failed_restore_destroys_new_domain(sim_dir, tmp_path):
    d = sim.create(16 * MB, sim_dir=sim_dir)
    pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))
    data = (tmp_path / "g").read_bytes()
    (tmp_path / "cut").write_bytes(data[: len(data) // 2])
    before = [i.domid for i in sim.list_domains(sim_dir=sim_dir)]
    with pytest.raises(pyxl.OperationError):
        pyxl.wait(pyxl.restore(tmp_path / "cut", sim_dir=sim_dir))
    assert [i.domid for i in sim.list_domains(sim_dir=sim_dir)] == before


def test_missing_domain_is_startup_error(sim_dir, tmp_path):
    with pytest.raises(pyxl.StartupError, match="no such domain"):
        pyxl.save(4242, tmp_path / "x", sim_dir=sim_dir)
    assert os.listdir(tmp_path) == []


def test_a_helpers_error_line_in_the_read_that_breaks_the_protocol_is_kept(sim_dir, tmp_path):
    """An ERROR line and a broken frame in one read: the line is the helper's
    last word on what went wrong, and was dropped with the frame."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    helper = script(tmp_path, """\
        os.write(1, p.encode(p.Log(8, -1, 'xc', 'the real cause')) + b'\\x04\\x00\\x63\\x00\\x00\\x00')
        time.sleep(30)
        """)
    op = pyxl.save(d, tmp_path / "g.save", helper=helper, sim_dir=sim_dir, timeout=20)
    assert pyxl.default_loop().run_until(op.done, 30)
    exc = op.exception()
    assert isinstance(exc, pyxl.HelperProtocolError), exc
    assert exc.helper_errors == ["xc: the real cause"]
