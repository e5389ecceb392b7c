"""XenBackend builds a restore target, and removes a destroyed domain's nodes, in
steps, so the application's loop runs between them: the create hypercall and
the build's hypercalls and libxl's stored config are a child's work (the loop
runs while it does it), then the XenStore transaction runs on the loop.  A half-made domain is destroyed on the same loop.  The
operation's side: a restore that times out or is cancelled while its domain
is being built fails once it is built, with the domain destroyed.

Fakes of libxenctrl and xenstored (tests/xenfakes.py); real pyxl loop, real
fakexen for the operation."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Tuple

import pytest

import pyxl
from pyxl import sim
from pyxl.backends import base, xenbuild, xenmake, xenstore
from pyxl.backends.sim import SimBackend
from pyxl.errors import StartupError
from pyxl.loop import Loop, SelectorLoop, default_loop
import test_xenbackend_hvm
from xenfakes import RecordingXc, backend

from conftest import domids

UUID = "00010203-0405-0607-0809-0a0b0c0d0e0f"
CONFIG = {"c_info": {"type": "pvh", "name": "g1", "uuid": UUID},
          "b_info": {"max_vcpus": 1, "max_memkb": 131072, "target_memkb": 131072,
                     "tsc_mode": "native", "shadow_memkb": 2048}}
MB = 1 << 20

xsd = test_xenbackend_hvm.xsd    # the fake xenstored, with dom0's backend directories


@pytest.fixture
def host(tmp_path, monkeypatch):
    monkeypatch.setattr("pyxl.backends.xen.USERDATA_DIR", str(tmp_path))
    monkeypatch.setattr("pyxl.backends.hvm.LIB_DIR", str(tmp_path))
    return tmp_path


class Timeline:
    """What happened, in order: the fakes' calls and a ticker's ticks (a
    callback of the application's, due at every loop iteration)."""

    def __init__(self, loop: Loop) -> None:
        self.events: List[str] = []
        self.loop = loop
        self.running = True
        self._tick()

    def _tick(self) -> None:
        if self.running:
            self.events.append("tick")
            self.loop.call_later(0, self._tick)

    def steps(self) -> List[str]:
        """The events with runs of the same one made one."""
        out: List[str] = []
        for e in self.events:
            if not out or out[-1] != e:
                out.append(e)
        return out


def traced(monkeypatch, line: Timeline, xc_class: Any = RecordingXc) -> RecordingXc:
    class Xc(xc_class):   # type: ignore[misc,valid-type]
        def create(self, *args: Any, **kw: Any) -> int:
            line.events.append("create")
            return super().create(*args, **kw)

        def call(self, fn: str, *args: Any) -> int:
            line.events.append("build")
            return super().call(fn, *args)

    for module, name, label in ((xenbuild, "make_xenstore", "store"),
                                (xenmake, "write_userdata", "userdata")):
        real = getattr(module, name)
        monkeypatch.setattr(module, name,
                            lambda *a, _r=real, _l=label: (line.events.append(_l), _r(*a))[1])
    return Xc()


class SlowMake(RecordingXc):
    """The child that makes the hypercalls takes 0.3 s (a busy Xen)."""

    def make_command(self, spec: Dict[str, Any]) -> List[str]:
        return ["sh", "-c", 'sleep 0.3; exec "$0" "$@"', *super().make_command(spec)]


def test_a_restore_target_is_built_in_steps_with_its_hypercalls_in_a_child(
        xsd, host, monkeypatch):
    loop = SelectorLoop()
    line = Timeline(loop)
    be = backend(xsd, traced(monkeypatch, line, SlowMake))
    out: List[Tuple[Optional[int], Optional[Exception]]] = []
    t0 = time.monotonic()
    base.start_create_restore_target(be, loop, CONFIG, lambda d, e: out.append((d, e)))
    assert loop.run_until(lambda: bool(out), 10)
    line.running = False
    assert out == [(7, None)] and time.monotonic() - t0 >= 0.3
    steps = line.steps()
    assert [e for e in steps if e != "tick"] == ["create", "build", "userdata", "store"]
    # the loop ran all the while the child made the hypercalls and stored the config
    made = line.events.index("userdata")
    assert line.events[made + 1:line.events.index("store")].count("tick") > 20
    # what the child told: the build's event channels are the helper's ports
    assert be.restore_ports(7) == (1, 0, 2, 0)
    assert ("xc_set_paging_mempool_size", 7, 2048 << 10) in be.xc.log
    assert (host / f"userdata-d.7.{UUID}.libxl-json").exists()
    assert xsd.nodes["/local/domain/7/name"] == b"g1"
    loop.close()


def test_a_half_made_domain_is_destroyed_on_the_loop_before_the_failure_is_told(
        xsd, host, monkeypatch):
    """The build fails after the domain exists: its destroy (XenStore, then
    xc_domain_destroy in a child that here takes 0.3 s) runs on the caller's
    loop, which ticks meanwhile; the failure comes once the domain is gone."""
    class Failing(RecordingXc):
        def call(self, fn: str, *args: Any) -> int:
            if fn == "xc_set_paging_mempool_size":
                raise OSError(12, "Cannot allocate memory")
            return super().call(fn, *args)

        def destroy_command(self, domid: int) -> List[str]:
            super().destroy_command(domid)
            return ["sleep", "0.3"]

    loop = SelectorLoop()
    line = Timeline(loop)
    be = backend(xsd, traced(monkeypatch, line, Failing))
    out: List[Tuple[Optional[int], Optional[Exception]]] = []
    t0 = time.monotonic()
    base.start_create_restore_target(be, loop, CONFIG, lambda d, e: out.append((d, e)))
    assert loop.run_until(lambda: bool(out), 10)
    took = time.monotonic() - t0
    line.running = False
    (domid, exc), = out
    assert domid is None and isinstance(exc, StartupError)
    assert str(exc) == ("cannot prepare domain 7 for the restore: [Errno 12] Cannot allocate "
                        "memory")
    assert took >= 0.3 and ("destroy", 7) in be.xc.log
    assert line.events.count("tick") > 20, "the loop ran while the child destroyed it"
    assert not xsd.subtree("/local/domain/7") and list(host.iterdir()) == []
    loop.close()


def test_a_destroyed_domains_nodes_go_without_holding_the_loop(xsd, host):
    """After the devices: the domain's XenStore nodes, in libxl's order
    (backends, /vm, /local/domain/D, /libxl/D), as one round on the loop,
    which ticks on while xenstored takes 0.1 s per removal; then the
    files, then the hypercall."""
    be = backend(xsd, RecordingXc())
    be.create_restore_target(CONFIG)
    xsd.nodes["/local/domain/0/backend/vbd/7/51712/state"] = b"6"
    loop = SelectorLoop()
    ticks: List[float] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not out:
            loop.call_later(0.005, tick)
    out: List[Tuple[bool, str]] = []
    xsd.delay = {xenstore.XS_RM: 0.1}
    be.start_destroy(loop, 7, lambda ok, why: out.append((ok, why)))
    loop.call_later(0, tick)
    assert loop.run_until(lambda: bool(out), 30)
    assert out == [(True, "")]
    rms = [p[0].decode() for m, _tx, p in xsd.log if m == xenstore.XS_RM]
    assert rms[-4:] == ["/local/domain/0/backend/vbd/7", f"/vm/{UUID}", "/local/domain/7",
                        "/libxl/7"], rms
    gaps = [b - a for a, b in zip(ticks, ticks[1:])]
    assert max(gaps) < 0.08, max(gaps)
    assert not [p for p in xsd.nodes if p.startswith(("/local/domain/7", "/vm/0001", "/libxl/7",
                                                      "/local/domain/0/backend/vbd/7"))]
    assert not list(host.glob("userdata-d.7.*"))
    loop.close()


def test_a_resume_tells_xenstored_without_holding_the_loop(xsd, host):
    """A failed save's resume: the hypercall, then XS_RESUME as a round on the
    loop, which ticks on while xenstored takes 0.5 s (it was a request on the
    backend's blocking connection inside the loop's callback)."""
    be = backend(xsd, RecordingXc())
    be.create_restore_target(CONFIG)
    loop = SelectorLoop()
    ticks: List[float] = []
    out: List[Tuple[bool, str]] = []

    def tick() -> None:
        ticks.append(time.monotonic())
        if not out:
            loop.call_later(0.005, tick)
    xsd.delay = {xenstore.XS_RESUME: 0.5}
    be.start_resume(loop, 7, lambda ok, why: out.append((ok, why)))
    loop.call_later(0, tick)
    assert loop.run_until(lambda: bool(out), 30)
    assert out == [(True, "")]
    assert [p[0] for m, _tx, p in xsd.log if m == xenstore.XS_RESUME] == [b"7"]
    assert ticks[-1] - ticks[0] >= 0.45 and max(b - a for a, b in zip(ticks, ticks[1:])) < 0.1
    loop.close()


class SlowBuild(SimBackend):
    """A toolstack's backend whose domain build takes 0.6 s of loop time."""

    def start_create_restore_target(self, loop: Loop, config: Dict[str, Any],
                                    done: base.Created) -> None:
        domid = self.create_restore_target(config)
        loop.call_later(0.6, lambda: done(domid, None))


@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_a_restore_ended_while_its_domain_is_built_destroys_it(sim_dir, tmp_path, how):
    dom = sim.create(16 * MB, sim_dir=sim_dir)
    saved = tmp_path / "g.save"
    pyxl.wait(pyxl.save(dom, saved, sim_dir=sim_dir, leave="destroy"))
    assert domids(sim_dir) == []
    op = pyxl.restore(saved, backend=SlowBuild(sim_dir), timeout=0.3 if how == "timeout" else 30)
    loop = default_loop()
    if how == "cancel":
        loop.call_later(0.2, op.cancel)
    loop.run_until(lambda: domids(sim_dir) != [], 10)   # being built
    assert not op.done()
    assert loop.run_until(op.done, 30)
    exc = op.exception()
    assert isinstance(exc, pyxl.Timeout if how == "timeout" else pyxl.Cancelled), exc
    assert "while its domain was being built" in str(exc)
    assert domids(sim_dir) == [], "the domain it was building is gone when it says so"


def test_run_steps_stops_at_the_first_failure_and_a_cancel_stops_it_quietly():
    loop = SelectorLoop()
    ran: List[str] = []
    out: List[Optional[Exception]] = []

    def fail() -> None:
        ran.append("b")
        raise ValueError("no")

    base.run_steps(loop, [lambda: ran.append("a"), fail, lambda: ran.append("c")], out.append)
    assert ran == [] and loop.run_until(lambda: bool(out), 5)
    assert ran == ["a", "b"] and isinstance(out[0], ValueError)
    ran.clear()
    out.clear()
    handle = base.run_steps(loop, [lambda: ran.append("a"), lambda: handle.cancel(),
                                   lambda: ran.append("c")], out.append)
    loop.run_until(lambda: False, 0.2)
    assert ran == ["a"] and out == []
    loop.close()


def test_a_vm_node_shared_with_another_domain_stays(xsd, host):
    """After a migration on one host both copies name /vm/UUID: a destroy
    removes it only with the last domain that names it (their /vm nodes read
    in one pipelined round)."""
    be = backend(xsd, RecordingXc())
    be.create_restore_target(CONFIG)
    xsd.nodes["/local/domain/9/vm"] = f"/vm/{UUID}".encode()
    xsd.nodes["/local/domain/9/name"] = b"g1--incoming"
    assert be.domain_names() == {7: "g1", 9: "g1--incoming"}
    be.destroy(7)
    assert xsd.nodes[f"/vm/{UUID}/uuid"] == UUID.encode()
    assert not [p for p in xsd.nodes if p.startswith("/local/domain/7")]


def test_a_toolstacks_override_of_a_waited_for_form_is_not_bypassed(xsd, host):
    """The loop forms (start_restore_done, start_rename, start_create_restore_target,
    ...) are used unless the toolstack overrode the waited-for form below them:
    its restore_done runs; a class that overrides both gets its start_ form."""
    calls: List[str] = []

    class Mine(type(backend(xsd, RecordingXc()))):   # type: ignore[misc]
        def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
            calls.append("restore_done")
            super().restore_done(domid, store_gfn, console_gfn)

    class Both(Mine):
        def start_restore_done(self, loop: Loop, domid: int, s: int, c: int, done: Any) -> Any:
            calls.append("start_restore_done")
            return super().start_restore_done(loop, domid, s, c, done)

    for cls, expected in ((Mine, ["restore_done"]), (Both, ["start_restore_done"])):
        be = backend(xsd, RecordingXc())
        be.__class__ = cls
        domid = be.create_restore_target(dict(CONFIG, c_info=dict(CONFIG["c_info"],
                                                                   name=cls.__name__)))
        loop = SelectorLoop()
        out: List[Tuple[bool, str]] = []
        base.start_restore_done(be, loop, domid, 1, 2, lambda ok, why: out.append((ok, why)))
        assert loop.run_until(lambda: bool(out), 10) and out == [(True, "")]
        assert calls == expected
        calls.clear()
        loop.close()
    # set on the instance: the instance's
    be = backend(xsd, RecordingXc())
    be.rename = lambda domid, name: calls.append(f"rename {name}")  # type: ignore[method-assign]
    base.start_rename(be, SelectorLoop(), 7, "x", lambda ok, why: None)
    assert calls == ["rename x"]
