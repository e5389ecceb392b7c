"""Bring your own domains: a toolstack that builds the restore target itself and lets
pyxl run the helper, its callbacks and the stream.

pyxl asks everything of the place domains live through a backend: any object with
the methods of :class:`pyxl.Backend` (a ``typing.Protocol``; mypy checks it).  A
toolstack that owns its domains -- its own naming policy, its own inventory, its
own devices -- supplies its own, here by extending fakexen's backend so that the
example runs on any machine.  On a Xen host you would extend
``pyxl.backends.xen.XenBackend`` the same way, or write all the methods yourself.

Run it::

    python examples/own_domains.py            # on fakexen, in a temporary state directory
"""

from __future__ import annotations

import os
import sys
import tempfile
from typing import Any, Dict, List, Optional

import pyxl
from pyxl import sim
from pyxl.backends import Cancellable, SimBackend
from pyxl.backends.base import Done
from pyxl.loop import Loop


class Toolstack(SimBackend):
    """A toolstack's backend: fakexen's hypervisor access, the toolstack's own builder.

    * restore targets get the toolstack's names (``restored-<name>``) and its own
      "devices": one disk image per disk of the saved config, made before the
      guest runs and removed when the domain is destroyed;
    * it keeps an inventory of the domains it built, and of what became of them.
    """

    name = "toolstack-example"

    def __init__(self, sim_dir: str, disk_dir: str) -> None:
        super().__init__(sim_dir)
        self.disk_dir = disk_dir
        self.inventory: Dict[int, Dict[str, Any]] = {}

    def create_restore_target(self, config: Dict[str, Any]) -> int:
        c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
        max_memkb = int(b_info["max_memkb"])
        name = f"restored-{c_info.get('name') or 'guest'}"
        domid = sim.create_empty(max_memkb, name, config, sim_dir=self.sim_dir)
        disks: List[str] = []
        try:
            for i, _disk in enumerate(config.get("disks") or []):
                path = os.path.join(self.disk_dir, f"{name}-{i}.img")
                with open(path, "wb") as f:
                    f.truncate(1 << 20)
                disks.append(path)
        except BaseException:
            self._remove_disks(disks)
            sim.destroy(domid, sim_dir=self.sim_dir)
            raise
        self.inventory[domid] = {"name": name, "disks": disks, "state": "restoring"}
        return domid

    def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
        super().restore_done(domid, store_gfn, console_gfn)
        self.inventory[domid]["state"] = "restored"

    def start_destroy(self, loop: Loop, domid: int, done: Done) -> Cancellable:
        # pyxl destroys through this (a failed restore, ``leave="destroy"``), and
        # ``destroy()`` runs it to the end: extending it extends both.
        def gone(ok: bool, why: str) -> None:
            entry = self.inventory.get(domid)
            if entry is not None:
                self._remove_disks(entry["disks"])
                entry["state"] = "destroyed"
            done(ok, why)

        return super().start_destroy(loop, domid, gone)

    @staticmethod
    def _remove_disks(paths: List[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def main(sim_dir: Optional[str] = None, work_dir: Optional[str] = None) -> Dict[str, Any]:
    """Save a busy simulated guest, restore it through the toolstack's backend, and
    report what happened (the test checks it)."""
    own_sim = sim_dir is None
    sim_dir = sim_dir or tempfile.mkdtemp(prefix="pyxl-example-", dir="/dev/shm")
    work_dir = work_dir or tempfile.mkdtemp(prefix="pyxl-example-")
    toolstack = Toolstack(sim_dir, work_dir)
    backend: pyxl.Backend = toolstack          # mypy checks the protocol here
    try:
        source = sim.create(16 << 20, dirty_rate=1 << 20, name="web1", sim_dir=sim_dir)
        config = sim.config(source, sim_dir=sim_dir)
        config["disks"] = [{"vdev": "xvda", "pdev_path": "/srv/web1.img"}]
        image = os.path.join(work_dir, "web1.save")
        pyxl.wait(pyxl.save(source, image, live=True, leave="paused", backend=backend,
                            config=config))
        restored = pyxl.wait(pyxl.restore(image, paused=True, backend=backend))[0].domid
        entry = toolstack.inventory[restored]
        out = {"restored": restored, "name": sim.info(restored, sim_dir=sim_dir).name,
               "identical": sim.digest(restored, sim_dir=sim_dir)
               == sim.digest(source, sim_dir=sim_dir),
               "disks": list(entry["disks"]),
               "disks_made": all(os.path.exists(p) for p in entry["disks"])}
        backend.destroy(restored)
        sim.destroy(source, sim_dir=sim_dir)
        out["state"] = entry["state"]
        out["disks_left"] = [p for p in entry["disks"] if os.path.exists(p)]
        return out
    finally:
        if own_sim:
            sim.remove_dir(sim_dir)


if __name__ == "__main__":
    out = main()
    print(f"restored as domain {out['restored']} ({out['name']}), "
          f"{'byte-identical' if out['identical'] else 'DIFFERENT'}, "
          f"{len(out['disks'])} disk(s) made and removed")
    sys.exit(0 if out["identical"] and not out["disks_left"] else 1)
