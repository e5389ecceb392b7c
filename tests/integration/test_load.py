"""Load: 64 operations at once in one process and one thread.

32 saves (half live saves of running, dirtying guests, half of paused guests)
and 32 restores (4 images, each restored 8 times at once), all started
before the loop runs.  All complete, the images are byte-exact, and nothing
is left behind: fds, children, simulated domains, temporary files.
``PYXL_SLOW=1`` adds the same load on asyncio with 32 MiB guests and both
helpers mixed.
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Dict, List

import pytest

import pyxl
from pyxl.loop import default_loop
from pyxl import sim

from conftest import HELPERS, SLOW, children, open_fds

MB = 1 << 20


def domids(sim_dir: str) -> List[int]:
    return sorted(i.domid for i in sim.list_domains(sim_dir=sim_dir))


def make_images(sim_dir: str, directory, n: int, size: int) -> List[tuple]:
    out = []
    doms = [sim.create(size, dirty_rate=2 * MB, sim_dir=sim_dir) for _ in range(n)]
    ops = []
    for i, d in enumerate(doms):
        sim.pause(d, sim_dir=sim_dir)
        path = directory / f"image{i}.save"
        out.append((path, sim.digest(d, sim_dir=sim_dir)))
        ops.append(pyxl.save(d, path, sim_dir=sim_dir, fsync=False))
    pyxl.wait(*ops)
    return out


def plan_load(sim_dir: str, tmp_path, size: int, helpers: List[str], **kw):
    """Create the guests; return (save kwargs, restore kwargs, expectations)."""
    images = make_images(sim_dir, tmp_path, 4, size)
    out = tmp_path / "out"
    out.mkdir()
    saves: List[Dict] = []
    for i in range(32):
        live = i % 2 == 0
        d = sim.create(size, dirty_rate=8 * MB if live else 0, sim_dir=sim_dir)
        digest = None
        if not live:
            sim.pause(d, sim_dir=sim_dir)
            digest = sim.digest(d, sim_dir=sim_dir)
        saves.append(dict(domid=d, path=out / f"dom{d}.save", live=live, digest=digest,
                          helper=HELPERS[helpers[i % len(helpers)]]))
    # each copy a name of its own: names are unique (as libxl keeps them)
    restores = [dict(path=images[i % 4][0], digest=images[i % 4][1], name=f"copy{i}",
                     helper=HELPERS[helpers[i % len(helpers)]]) for i in range(32)]
    return saves, restores, out


def check_results(sim_dir: str, saves, restores, save_results, restore_results) -> None:
    for s, res in zip(saves, save_results):
        assert res.path == str(s["path"]) and res.bytes_written == os.path.getsize(s["path"])
        assert s["domid"] not in domids(sim_dir), "saved domain destroyed (xl's default)"
        if s["live"]:
            assert res.downtime is not None and res.iterations >= 1
    for r, res in zip(restores, restore_results):
        assert sim.digest(res.domid, sim_dir=sim_dir) == r["digest"]
        assert sim.info(res.domid, sim_dir=sim_dir).state == "paused"
    assert len({res.domid for res in restore_results}) == 32
    # a sample of the new images restores byte for byte
    for s in [s for s in saves if not s["live"]][:3]:
        rres = pyxl.wait(pyxl.restore(s["path"], paused=True, sim_dir=sim_dir))[0]
        assert sim.digest(rres.domid, sim_dir=sim_dir) == s["digest"]
        sim.destroy(rres.domid, sim_dir=sim_dir)
    live = [s for s in saves if s["live"]][0]
    rres = pyxl.wait(pyxl.restore(live["path"], paused=True, sim_dir=sim_dir))[0]
    assert sim.check_guest(rres.domid, sim_dir=sim_dir).consistent
    sim.destroy(rres.domid, sim_dir=sim_dir)


def test_64_operations_at_once(sim_dir, tmp_path):
    saves, restores, out = plan_load(sim_dir, tmp_path, 16 * MB, ["ours"])
    before = domids(sim_dir)
    fds, kids = open_fds(), children()
    t0 = time.monotonic()
    ops: List[pyxl.Operation] = [
        pyxl.save(s["domid"], s["path"], live=s["live"], helper=s["helper"], sim_dir=sim_dir,
                  timeout=300, fsync=False) for s in saves]
    ops += [pyxl.restore(r["path"], paused=True, helper=r["helper"], sim_dir=sim_dir,
                         timeout=300, name=r["name"]) for r in restores]
    # every helper starts from the loop, through the spawner: once all have, most
    # still run (a small non-live save may be done already on a loaded host)
    default_loop().run_until(
        lambda: all((op.helper is not None and op.helper.pid > 0) or op.done() for op in ops), 60)
    assert sum(op.helper is not None and op.helper.pid > 0 for op in ops) == 64
    assert sum(op.helper is not None and op.helper.running for op in ops) >= 48
    results = pyxl.wait(*ops, timeout=300)
    took = time.monotonic() - t0
    check_results(sim_dir, saves, restores, results[:32], results[32:])
    restored = [res.domid for res in results[32:]]
    for d in restored:
        sim.destroy(d, sim_dir=sim_dir)
    assert domids(sim_dir) == sorted(set(before) - {s["domid"] for s in saves})
    assert sorted(os.listdir(out)) == sorted(f"dom{s['domid']}.save" for s in saves), \
        "no temporary file left"
    assert children() == kids
    assert open_fds() == fds
    print(f"64 operations in {took:.1f}s")


@pytest.mark.skipif(not SLOW, reason="PYXL_SLOW=1: asyncio, 32 MiB guests, both helpers")
def test_64_operations_at_once_asyncio_both_helpers(sim_dir, tmp_path):
    import pyxl.aio

    saves, restores, out = plan_load(sim_dir, tmp_path, 32 * MB, ["ours", "debian"])
    before = domids(sim_dir)
    fds, kids = open_fds(), children()

    async def main():
        coros = [pyxl.aio.save(s["domid"], s["path"], live=s["live"], helper=s["helper"],
                               sim_dir=sim_dir, timeout=600, fsync=False) for s in saves]
        coros += [pyxl.aio.restore(r["path"], paused=True, helper=r["helper"],
                                   sim_dir=sim_dir, timeout=600, name=r["name"])
                  for r in restores]
        return await asyncio.gather(*coros)

    results = asyncio.run(main())
    check_results(sim_dir, saves, restores, results[:32], results[32:])
    for res in results[32:]:
        sim.destroy(res.domid, sim_dir=sim_dir)
    assert domids(sim_dir) == sorted(set(before) - {s["domid"] for s in saves})
    assert sorted(os.listdir(out)) == sorted(f"dom{s['domid']}.save" for s in saves)
    assert children() == kids
    assert open_fds() == fds
