"""The simulated backend: fakexen's domains in a state directory.

Implements :class:`pyxl.backends.base.Backend` over :mod:`pyxl.sim`.  Its guests
have no device model (the hooks are :class:`~pyxl.backends.base.NoDeviceModel`'s),
and the restore helper gets the event channels fakexen's builder allocates.
"""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Dict, Optional

from pyxl import sim
from pyxl.backends.base import Cancellable, NoDeviceModel, RestorePorts
from pyxl.errors import StartupError
from pyxl.loop import Loop, Timer

# How often to look at a simulated guest's run state while it suspends.  A
# timer on the loop, not a sleep: the loop keeps serving other operations.
_SUSPEND_POLL = 0.001


class SimBackend(NoDeviceModel):
    """fakexen domains in a state directory (``PYXL_SIM_DIR`` or /dev/shm)."""

    name = "sim"

    def __init__(self, sim_dir: Optional[str] = None) -> None:
        self.sim_dir = sim_dir

    def helper_env(self) -> Dict[str, str]:
        env = dict(os.environ)
        env.update(sim.helper_env(self.sim_dir))
        return env

    def check_domain(self, domid: int) -> None:
        try:
            sim.info(domid, sim_dir=self.sim_dir)
        except sim.NoSuchDomain as exc:
            raise StartupError(f"no such domain: {domid}") from exc

    def domain_config(self, domid: int) -> Dict[str, Any]:
        return sim.config(domid, sim_dir=self.sim_dir)

    def start_suspend(self, loop: Loop, domid: int, timeout: float,
                      done: Callable[[bool, str], None]) -> Cancellable:
        """Ask the guest to suspend; call ``done(ok, why)`` from the loop when it has."""
        sim.request_suspend(domid, sim_dir=self.sim_dir)
        deadline = time.monotonic() + timeout
        holder: Dict[str, Timer] = {}

        def poll() -> None:
            try:
                state = sim.state(domid, sim_dir=self.sim_dir)
            except sim.SimError as exc:
                done(False, str(exc))
                return
            if state == "suspended":
                done(True, "")
            elif time.monotonic() >= deadline:
                done(False, f"guest did not suspend within {timeout:g}s")
            else:
                holder["t"] = loop.call_later(_SUSPEND_POLL, poll)

        class _Cancel:
            def cancel(self) -> None:
                t = holder.get("t")
                if t is not None:
                    t.cancel()

        holder["t"] = loop.call_later(0, poll)
        return _Cancel()

    def resume(self, domid: int) -> None:
        sim.resume(domid, sim_dir=self.sim_dir)

    def pause(self, domid: int) -> None:
        sim.pause(domid, sim_dir=self.sim_dir)

    def destroy(self, domid: int) -> None:
        sim.destroy(domid, sim_dir=self.sim_dir)

    def create_restore_target(self, config: Dict[str, Any]) -> int:
        b_info = config.get("b_info", {})
        c_info = config.get("c_info", {})
        try:
            max_memkb = int(b_info["max_memkb"])
        except (KeyError, TypeError, ValueError) as exc:
            raise StartupError("saved config has no usable b_info.max_memkb") from exc
        try:
            return sim.create_empty(max_memkb, c_info.get("name") or "restored", config,
                                    sim_dir=self.sim_dir)
        except sim.SimError as exc:
            raise StartupError(f"cannot create the domain to restore into: {exc}") from exc

    def unpause(self, domid: int) -> None:
        sim.unpause(domid, sim_dir=self.sim_dir)

    def rename(self, domid: int, name: str) -> None:
        sim.rename(domid, name, sim_dir=self.sim_dir)

    def state(self, domid: int) -> Optional[str]:
        """'running', 'paused', 'suspended', or None when it cannot be told."""
        try:
            return sim.state(domid, sim_dir=self.sim_dir)
        except sim.SimError:
            return None

    def digest(self, domid: int) -> Optional[str]:
        """sha256 of the stopped guest's memory and context (:func:`pyxl.sim.digest`)."""
        return sim.digest(domid, sim_dir=self.sim_dir)

    def restore_ports(self, domid: int) -> RestorePorts:
        # store 1 and console 2 on backend domain 0, as the simulated domain's
        # builder allocates them
        return (1, 0, 2, 0)

    def restore_done(self, domid: int, store_gfn: int, console_gfn: int) -> None:
        """Nothing to finish: fakexen has no XenStore."""
