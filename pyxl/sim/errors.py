"""The simulator's errors (all :class:`pyxl.BackendError`)."""


from __future__ import annotations


from pyxl.errors import BackendError

__all__ = [
    "DEFAULT_SIM_DIR", "DomainInfo", "DomainStateError", "GuestCheck", "InsufficientResources",
    "NoSuchDomain", "SimError", "SimTimeout", "check_guest", "config", "counter", "create",
    "create_empty", "destroy", "digest", "format_size", "helper_env", "info",
    "libfakexen_path", "list_domains", "parse_size", "pause", "remove_dir", "rename", "request_suspend", "resume",
    "set_dirty_rate", "sim_dir_path", "state", "suspend", "unpause", "vcpu_path",
]


# ---- errors -------------------------------------------------------------------------------


class SimError(BackendError):
    """A simulator operation failed; the message says why."""


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


