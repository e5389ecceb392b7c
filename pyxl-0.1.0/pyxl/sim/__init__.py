"""Control of fakexen, pyxl's simulated Xen hypervisor (x86 HVM save/restore).

A simulated domain lives in a state directory (``/dev/shm/pyxl-sim-$UID``, mode 0700, unless
``sim_dir`` or ``$PYXL_SIM_DIR`` says otherwise) as ``d<domid>/`` holding a
control block and a sparse guest-memory file (layout: ``fakexen/simctl.h``).
Three parties share it:

* this module (the toolstack's view: create, pause, suspend, destroy, ...);
* ``libfakexen.so``, preloaded into a save/restore helper (:func:`helper_env`),
  which answers the hypercalls of Debian's libxenctrl/libxenguest 4.17;
* ``pyxl-sim-vcpu``, one detached process per running domain, which writes
  guest memory at ``dirty_rate`` bytes/s and marks the pages it dirties.

Guests are built in the libxl HVM layout: RAM from pfn 0 with the VGA hole
0xa0-0xbf left out, RAM beyond 3.75 GiB above 4 GiB, and the 16 special
pages at 0xfeff0-0xfefff.

Modules: ``layout`` (the shared control block, mirroring ``fakexen/simctl.h``;
sizes; a new guest's default state), ``statedir`` (creating domains), ``control``
(queries and run state), ``memory`` (digests and checks), ``errors``,
``devicemodel`` (the device model process a guest may have: QMP on a UNIX
socket, as QEMU) and ``dmcontrol`` (starting, checking and killing it).  Only the
standard library and pyxl.errors are used.  Every call is synchronous; the
non-blocking pair :func:`request_suspend` + :func:`state` lets an event loop
poll for suspension with a timer.
"""

from pyxl.sim.control import (MAX_NAME_BYTES, DomainInfo, bury, config, cpu_cap, destroy, info, list_domains, names, pause, remove_dir,
                              rename, request_suspend, resume, set_cpu_cap, set_dirty_rate, start_unpause,
                              state, suspend, unpause, unpause_failed)
from pyxl.sim.errors import (DomainStateError, InsufficientResources, NoSuchDomain, SimError,
                             SimTimeout, UnsafeSimDir)
from pyxl.sim.layout import (DEFAULT_SIM_DIR, PAGE_SIZE, SAVED_PARAMS, bit_runs, format_size,
                             check_sim_dir, helper_env, libfakexen_path, parse_size, ram_runs, sim_dir_path,
                             vcpu_path)
from pyxl.sim.memory import (GuestCheck, check_guest, counter, digest, grant_entries,
                             hvm_context, hvm_params, populated_runs)
from pyxl.sim.statedir import CONTENT_PROFILES, Creation, create, create_empty, empty_creation

__all__ = [
    "CONTENT_PROFILES", "Creation",
    "DEFAULT_SIM_DIR", "DomainInfo", "DomainStateError", "GuestCheck", "InsufficientResources",
    "MAX_NAME_BYTES", "NoSuchDomain", "PAGE_SIZE", "SAVED_PARAMS", "SimError", "SimTimeout", "UnsafeSimDir", "bit_runs",
    "bury", "check_guest", "check_sim_dir", "config", "counter", "cpu_cap", "create", "create_empty", "destroy", "digest",
    "empty_creation",
    "format_size", "grant_entries", "helper_env", "hvm_context", "hvm_params", "info",
    "libfakexen_path", "list_domains", "names", "parse_size", "pause", "populated_runs", "ram_runs",
    "remove_dir", "rename", "request_suspend", "resume", "set_cpu_cap", "set_dirty_rate", "sim_dir_path",
    "start_unpause", "state", "suspend", "unpause", "unpause_failed", "vcpu_path",
]
