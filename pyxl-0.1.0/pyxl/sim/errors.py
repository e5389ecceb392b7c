"""The simulator's errors (all :class:`pyxl.BackendError`)."""


from __future__ import annotations


from pyxl.errors import BackendError



# ---- errors -------------------------------------------------------------------------------


class SimError(BackendError):
    """A simulator operation failed; the message says why."""


class UnsafeSimDir(SimError):
    """The state directory is not safe to use: a symlink, not a directory, someone
    else's, or group- or world-writable (others could plant files in it)."""


class NoSuchDomain(SimError, LookupError):
    """The domain does not exist (never created, or destroyed)."""

    def __init__(self, domid: int, sim_dir: str) -> None:
        super().__init__(f"domain {domid} does not exist in {sim_dir}")
        self.domid = domid
        self.sim_dir = sim_dir


class DomainStateError(SimError):
    """The operation is not valid in the domain's current state."""


class InsufficientResources(SimError):
    """The machine or the state directory cannot back the guest."""


class SimTimeout(SimError):
    """The simulated guest did not reach the requested state in time."""


