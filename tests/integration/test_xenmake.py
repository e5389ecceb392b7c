"""The restore target's hypercalls run in a short child (pyxl.backends.xenmake):
its argv boots from an isolated interpreter, it answers in one line when it
cannot, the parent learns a domid even from a child that failed half way, and
a domain made after a cancel is handed over to be destroyed.  Real children,
the real loop; the libxenctrl beneath is a fake (tests/xenfakes.py)."""

from __future__ import annotations

import subprocess
from typing import Any, List, Optional, Tuple

from pyxl.backends import base, xenmake
from pyxl.backends.xenctrl import MAX_SPEC, Xc
from pyxl.errors import StartupError
from pyxl.loop import SelectorLoop
import test_xenbackend_hvm
from test_xenbackend_steps import CONFIG, host  # noqa: F401  (a fixture)
from xenfakes import RecordingXc, backend

xsd = test_xenbackend_hvm.xsd

SPEC = {"handle": "00" * 16, "create": [0] * 10, "altp2m": 0, "config": CONFIG,
        "store_dom": 0, "console_dom": 0, "userdata_dir": "/nonexistent"}


def test_the_child_boots_isolated_and_refuses_in_one_line():
    """The argv runs pyxl's own module from an interpreter without site or
    user paths; with no Xen release of that name it says so, once, and exits 1."""
    xc = Xc.__new__(Xc)      # its argv only: nothing loaded here
    xc.release = "4.99"
    argv = xc.make_command(SPEC)
    assert argv[1:3] == ["-I", "-S"]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd="/")
    assert run.returncode == 1 and run.stdout == ""
    assert len(run.stderr.splitlines()) == 1 and "4.99" in run.stderr, run.stderr


def test_a_spec_too_large_for_argv_is_refused_before_anything_runs():
    big = dict(SPEC, config={"c_info": {"xsdata": {"k": "x" * (MAX_SPEC + 1)}}})
    xc = Xc.__new__(Xc)
    xc.release = "4.17"
    try:
        xc.make_command(big)
    except StartupError as exc:
        assert "too large" in str(exc)
    else:
        raise AssertionError("a spec over MAX_SPEC was taken")


def test_what_a_child_tells_is_parsed_and_nothing_else():
    assert xenmake.parse("domid 7\nports 1 0 2 0\nstored\n") == (7, (1, 0, 2, 0))
    assert xenmake.parse("domid 7\nports 1 0 2 0\n") == (7, None)   # not all done
    assert xenmake.parse("domid 7\n") == (7, None)
    assert xenmake.parse("noise\ndomid x\nports 1 2\n") == (None, None)


def _run(loop: SelectorLoop, argv: List[str], cancel: bool = False) -> Tuple[list, list]:
    out: List[Tuple[Optional[int], Any, Optional[Exception]]] = []
    orphans: List[int] = []
    child = xenmake.MakeChild(loop, argv, lambda d, p, e: out.append((d, p, e)),
                              orphans.append)
    if cancel:
        child.cancel()
    assert loop.run_until(lambda: child.child.finished, 10)
    return out, orphans


def test_a_half_made_domain_is_told_with_the_builds_failure():
    loop = SelectorLoop()
    out, orphans = _run(loop, ["sh", "-c", 'echo "domid 9"; echo "no memory" >&2; exit 1'])
    (domid, ports, exc), = out
    assert (domid, ports, orphans) == (9, None, [])
    assert str(exc) == "cannot prepare domain 9 for the restore: no memory"
    out, _ = _run(loop, ["sh", "-c", 'echo "Permission denied" >&2; exit 1'])
    assert str(out[0][2]) == "cannot create the domain to restore into: Permission denied"
    out, _ = _run(loop, ["sh", "-c", "kill -9 $$"])        # died without a word
    assert out[0][0] is None and str(out[0][2]).startswith("cannot create the domain")
    loop.close()


def test_a_domain_made_after_a_cancel_is_handed_over_to_be_destroyed():
    loop = SelectorLoop()
    out, orphans = _run(loop, ["sh", "-c", 'sleep 0.2; echo "domid 11"; echo "ports 1 0 2 0"; '
                               'echo stored'], cancel=True)
    assert out == [] and orphans == [11]
    loop.close()


def _build(be: Any) -> Tuple[Optional[int], Optional[Exception]]:
    loop = SelectorLoop()
    out: List[Tuple[Optional[int], Optional[Exception]]] = []
    base.start_create_restore_target(be, loop, CONFIG, lambda d, e: out.append((d, e)))
    assert loop.run_until(lambda: bool(out), 10)
    loop.close()
    (got,) = out
    return got


def test_a_failed_create_is_told_and_nothing_is_destroyed(xsd, host):  # noqa: F811
    class Refusing(RecordingXc):
        def create(self, *args: Any, **kw: Any) -> int:
            raise OSError(13, "Permission denied")

    be = backend(xsd, Refusing())
    domid, exc = _build(be)
    assert domid is None and isinstance(exc, StartupError)
    assert str(exc) == ("cannot create the domain to restore into: [Errno 13] Permission "
                        "denied")
    assert not [c for c in be.xc.log if c[0] == "destroy"] and list(host.iterdir()) == []


def test_a_config_that_cannot_be_stored_fails_the_build_and_the_domain_goes(
        xsd, host, monkeypatch):  # noqa: F811
    monkeypatch.setattr("pyxl.backends.xen.USERDATA_DIR", str(host / "missing"))
    be = backend(xsd, RecordingXc())
    domid, exc = _build(be)
    assert domid is None and str(exc).startswith("cannot prepare domain 7 for the restore: ")
    assert "No such file or directory" in str(exc)
    assert ("destroy", 7) in be.xc.log and not xsd.subtree("/local/domain/7")
