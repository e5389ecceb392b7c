"""pyxl's host operations end to end: real helpers (ours and Debian's), real pipes, fakexen."""

import asyncio
import fcntl
import os
import selectors
import subprocess
import time

import pytest

import pyxl
from pyxl import sim
from pyxl.loop import HookLoop

from conftest import HELPERS, children, open_fds

MB = 1 << 20


@pytest.mark.parametrize("saver,restorer", [("ours", "ours"), ("debian", "debian"),
                                            ("ours", "debian"), ("debian", "ours")])
def test_nonlive_save_restore_byte_exact(sim_dir, tmp_path, saver, restorer, any_loop):
    d = sim.create(64 * MB, dirty_rate=2 * MB, sim_dir=sim_dir)
    sim.pause(d, sim_dir=sim_dir)
    before = sim.digest(d, sim_dir=sim_dir)
    path = tmp_path / "guest.save"
    res = any_loop.run_until(pyxl.save(d, path, helper=HELPERS[saver], sim_dir=sim_dir,
                                       loop=any_loop.loop))
    assert res.path == str(path) and res.bytes_written == path.stat().st_size
    assert path.stat().st_mode & 0o777 == 0o600
    assert d not in [i.domid for i in sim.list_domains(sim_dir=sim_dir)], "xl's default: destroyed"
    rres = any_loop.run_until(pyxl.restore(path, paused=True, helper=HELPERS[restorer],
                                           sim_dir=sim_dir, loop=any_loop.loop))
    assert rres.domid != d
    assert sim.digest(rres.domid, sim_dir=sim_dir) == before
    assert sim.info(rres.domid, sim_dir=sim_dir).state == "paused"
    assert rres.config["c_info"]["name"] == sim.info(rres.domid, sim_dir=sim_dir).name


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_live_save_of_dirtying_guest(sim_dir, tmp_path, helper):
    d = sim.create(64 * MB, dirty_rate=40 * MB, sim_dir=sim_dir)
    time.sleep(0.2)
    phases = []
    op = pyxl.save(d, tmp_path / "g", live=True, leave="paused", helper=HELPERS[helper],
                   sim_dir=sim_dir, on_progress=lambda ev: phases.append(ev.phase))
    res = pyxl.wait(op)[0]
    rounds = {p for p in phases if p.startswith("Frames iteration")}
    assert len(rounds) >= 2, phases
    assert res.iterations >= 2 and res.downtime is not None
    assert sim.info(d, sim_dir=sim_dir).state == "paused"
    src = sim.digest(d, sim_dir=sim_dir)
    rres = pyxl.wait(pyxl.restore(tmp_path / "g", paused=True, sim_dir=sim_dir, name="copy"))[0]
    assert sim.digest(rres.domid, sim_dir=sim_dir) == src
    check = sim.check_guest(rres.domid, sim_dir=sim_dir)
    assert check.consistent, check
    # The workload's rate is the simulator's knob, not guest state: set it again.
    sim.set_dirty_rate(rres.domid, 40 * MB, sim_dir=sim_dir)
    sim.unpause(rres.domid, sim_dir=sim_dir)
    time.sleep(0.3)
    sim.pause(rres.domid, sim_dir=sim_dir)
    after = sim.check_guest(rres.domid, sim_dir=sim_dir)
    assert after.consistent and after.pages_written > check.pages_written, (check, after)


def test_wait_returns_a_tuple_in_the_order_given(sim_dir, tmp_path):
    """pyxl.wait's results are a tuple, one per operation in the order given
    (what its overloads promise mypy: ``saved, restored = pyxl.wait(s, r)``)."""
    a = sim.create(32 * MB, sim_dir=sim_dir)
    b = sim.create(32 * MB, sim_dir=sim_dir)
    pyxl.wait(pyxl.save(b, tmp_path / "b", sim_dir=sim_dir))
    results = pyxl.wait(pyxl.save(a, tmp_path / "a", leave="running", sim_dir=sim_dir),
                        pyxl.restore(tmp_path / "b", paused=True, sim_dir=sim_dir))
    assert isinstance(results, tuple) and len(results) == 2
    saved, restored = results
    assert isinstance(saved, pyxl.SaveResult) and saved.path == str(tmp_path / "a")
    assert isinstance(restored, pyxl.RestoreResult)
    assert sim.info(restored.domid, sim_dir=sim_dir).state == "paused"
    assert pyxl.wait() == ()


def test_a_raising_done_callback_does_not_keep_the_others_from_running(sim_dir, tmp_path):
    """The application's done callbacks all run, one raising or not (another may
    be an ``await op``); the first exception goes up through the loop."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    loop = pyxl.SelectorLoop()
    op = pyxl.save(d, tmp_path / "g.save", leave="running", sim_dir=sim_dir, loop=loop)
    seen = []

    def broken(_op):
        seen.append("broken")
        raise ZeroDivisionError("the application's bug")
    op.add_done_callback(broken)
    op.add_done_callback(lambda o: seen.append(("after", o.done())))
    with pytest.raises(ZeroDivisionError, match="the application's bug"):
        loop.run_until(op.done, 60)
    assert seen == ["broken", ("after", True)]
    op.result()
    loop.close()

    async def main():     # asyncio: an awaiting task still wakes
        op = pyxl.save(d, tmp_path / "h.save", leave="running", sim_dir=sim_dir,
                       loop=pyxl.AsyncioLoop(asyncio.get_running_loop()))
        op.add_done_callback(broken)
        return await asyncio.wait_for(op, 60)
    assert asyncio.run(main()).path == str(tmp_path / "h.save")


def test_a_flag_that_is_not_a_bool_is_a_type_error(sim_dir, tmp_path):
    """paused="no" used to restore paused (a truthy string), live="no" to save
    live: mypy rejects them, and now so does the call, before anything happens."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    with pytest.raises(TypeError, match=r"^live must be True or False, not 'no'$"):
        pyxl.save(d, tmp_path / "g", live="no", sim_dir=sim_dir)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == [] and sim.state(d, sim_dir=sim_dir) == "running"
    pyxl.wait(pyxl.save(d, tmp_path / "g", sim_dir=sim_dir))
    for flag in ("paused", "compressed"):
        with pytest.raises(TypeError, match=rf"^{flag} must be True or False, not 'no'$"):
            pyxl.restore(tmp_path / "g", sim_dir=sim_dir, **{flag: "no"})
    assert sim.list_domains(sim_dir) == []


def test_leave_running_and_logs(sim_dir, tmp_path, caplog):
    d = sim.create(32 * MB, sim_dir=sim_dir)
    caplog.set_level("DEBUG", logger=f"pyxl.domain.{d}")
    pyxl.wait(pyxl.save(d, tmp_path / "g", leave="running", sim_dir=sim_dir))
    assert sim.info(d, sim_dir=sim_dir).state == "running"
    texts = [r.getMessage() for r in caplog.records if r.name == f"pyxl.domain.{d}"]
    assert any("starting save" in t for t in texts)
    assert any("Saving domain" in t for t in texts)


def test_eight_at_once_in_one_thread(sim_dir, tmp_path, any_loop):
    fds, kids = open_fds(), children()
    doms = []
    for i in range(4):
        d = sim.create(32 * MB, dirty_rate=4 * MB, sim_dir=sim_dir)
        doms.append(d)
    # four existing images to restore while the four saves run
    images = []
    for i in range(4):
        d = sim.create(32 * MB, sim_dir=sim_dir)
        sim.pause(d, sim_dir=sim_dir)
        images.append((tmp_path / f"old{i}", sim.digest(d, sim_dir=sim_dir)))
        pyxl.wait(pyxl.save(d, images[-1][0], sim_dir=sim_dir))
    fds, kids = open_fds(), children()
    answered = []

    def slow_suspend(req):
        # answer later, from a timer, while the other helpers keep streaming
        answered.append(req.op.domid)
        any_loop.loop.call_later(0.05, lambda: (sim.suspend(req.op.domid, sim_dir=sim_dir),
                                                req.reply(1)))

    saves = [pyxl.save(d, tmp_path / f"new{d}", live=True, leave="paused", sim_dir=sim_dir,
                       callbacks={"suspend": slow_suspend}, loop=any_loop.loop) for d in doms]
    restores = [pyxl.restore(p, paused=True, sim_dir=sim_dir, loop=any_loop.loop,
                             name=f"copy{i}") for i, (p, _) in enumerate(images)]
    results = any_loop.wait(*saves, *restores)
    assert sorted(answered) == sorted(doms)
    for (path, digest), res in zip(images, results[4:]):
        assert sim.digest(res.domid, sim_dir=sim_dir) == digest
    for d in doms:
        src = sim.digest(d, sim_dir=sim_dir)
        r = any_loop.run_until(pyxl.restore(tmp_path / f"new{d}", paused=True, sim_dir=sim_dir,
                                            loop=any_loop.loop, name=f"new{d}"))
        assert sim.digest(r.domid, sim_dir=sim_dir) == src
    assert open_fds() == fds
    assert children() == kids


def test_hook_loop_example(sim_dir, tmp_path):
    """README: driving pyxl from a toolstack's own loop through hooks."""
    sel = selectors.DefaultSelector()
    timers = {}
    tokens = iter(range(1, 10**6))

    def fd_register(fd, events, ready):
        sel.register(fd, events, ready)
        return fd

    def fd_modify(token, events):
        sel.modify(token, events, sel.get_key(token).data)

    def fd_deregister(token):
        sel.unregister(token)

    def timeout_register(delay, fire):
        t = next(tokens)
        timers[t] = (time.monotonic() + delay, fire)
        return t

    def timeout_cancel(token):
        timers.pop(token, None)

    loop = HookLoop(fd_register, fd_modify, fd_deregister, timeout_register, timeout_cancel)
    d = sim.create(32 * MB, sim_dir=sim_dir)
    op = pyxl.save(d, tmp_path / "g", loop=loop, sim_dir=sim_dir)
    deadline = time.monotonic() + 30
    while not op.done():
        assert time.monotonic() < deadline
        wait = min((t for t, _ in timers.values()), default=time.monotonic() + 1) - time.monotonic()
        for key, events in sel.select(max(0, wait)):
            key.data(events)
        now = time.monotonic()
        for tok, (t, fire) in list(timers.items()):
            if t <= now:
                del timers[tok]
                fire()
    assert op.result().path == str(tmp_path / "g")
    assert not sel.get_map(), "every watch removed"


def test_asyncio_example(sim_dir, tmp_path):
    """README: asyncio, with a coroutine suspend handler."""
    import pyxl.aio

    async def main():
        d = sim.create(32 * MB, dirty_rate=4 * MB, sim_dir=sim_dir)

        async def suspend(req):
            await asyncio.sleep(0.01)
            sim.suspend(d, sim_dir=sim_dir)
            return 1

        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.001)
                ticks += 1

        t = asyncio.ensure_future(ticker())
        res = await pyxl.aio.save(d, tmp_path / "g", live=True, leave="paused", sim_dir=sim_dir,
                                  callbacks={"suspend": suspend})
        src = sim.digest(d, sim_dir=sim_dir)
        rres = await pyxl.aio.restore(tmp_path / "g", paused=True, sim_dir=sim_dir, name="copy")
        t.cancel()
        return res, src, sim.digest(rres.domid, sim_dir=sim_dir), ticks

    res, src, dst, ticks = asyncio.run(main())
    assert src == dst and res.iterations >= 1
    assert ticks > 10, "the loop kept running during the save"


@pytest.mark.parametrize("helper", ["ours", "debian"])
@pytest.mark.parametrize("initial", [0, 128 << 10, MB])
def test_our_helper_grows_a_default_stream_pipe_only(sim_dir, tmp_path, helper, initial):
    """Ours grows a stream pipe of the kernel's default 64 KiB to 256 KiB (fewer
    round trips per 4 MiB batch), save and restore alike; a pipe its creator
    sized keeps its size; Debian's helper leaves the pipe as it is."""
    d = sim.create(16 * MB, sim_dir=sim_dir, paused=True)
    before = sim.digest(d, sim_dir=sim_dir)
    grown = 256 << 10 if helper == "ours" and not initial else (initial or 64 << 10)
    path = tmp_path / "stream"
    r, w = os.pipe()
    try:
        if initial:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, initial)
        with open(path, "wb") as out:
            reader = subprocess.Popen(["cat"], stdin=r, stdout=out)
        os.close(r)     # cat's alone: if it dies (a full disk), the save gets EPIPE, not a wait
        pyxl.wait(pyxl.save(d, w, helper=HELPERS[helper], sim_dir=sim_dir), timeout=60)
        assert fcntl.fcntl(w, fcntl.F_GETPIPE_SZ) == grown
    finally:
        os.close(w)
    assert reader.wait(10) == 0
    r, w = os.pipe()
    try:
        if initial:
            fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, initial)
        writer = subprocess.Popen(["cat", str(path)], stdout=w)
        os.close(w)
        res = pyxl.wait(pyxl.restore(r, paused=True, helper=HELPERS[helper], sim_dir=sim_dir),
                        timeout=60)[0]
        assert fcntl.fcntl(r, fcntl.F_GETPIPE_SZ) == grown
    finally:
        os.close(r)
    assert writer.wait(10) == 0
    assert sim.digest(res.domid, sim_dir=sim_dir) == before


def test_our_helper_reports_progress_at_most_every_50_ms(sim_dir, tmp_path):
    """pyxl asks its helper for one progress frame per 50 ms (plus each phase's
    first and last): libxc's report per 1024 pfns is ~1,000 frames for a guest
    with a 4 GiB pfn space, each decoded on the loop.  Debian's helper sends them
    all (it ignores the variable); a caller's own helper_env value stands."""
    events = {}
    for name, helper, env in (("ours", HELPERS["ours"], {}), ("debian", HELPERS["debian"], {}),
                              ("every", HELPERS["ours"], {"PYXL_PROGRESS_INTERVAL_MS": "0"})):
        if not os.access(helper, os.X_OK):
            pytest.skip("Debian's helper is not installed")
        d = sim.create(64 * MB, sim_dir=sim_dir, paused=True)
        seen = []
        t0 = time.monotonic()
        pyxl.wait(pyxl.save(d, tmp_path / name, helper=helper, sim_dir=sim_dir,
                            helper_env=env, on_progress=seen.append))
        events[name] = (seen, time.monotonic() - t0)
    (ours, took), (theirs, _), (every, _) = events["ours"], events["debian"], events["every"]
    assert len(theirs) > 500 and len(every) > 500
    phases = {e.phase for e in ours}
    assert len(ours) <= took / 0.05 + 2 * len(phases) + 1, (len(ours), took, phases)
    assert phases == {e.phase for e in theirs}
    last = {e.phase: e for e in ours}
    assert all(e.done == e.total for e in last.values()), last   # every phase's end came
