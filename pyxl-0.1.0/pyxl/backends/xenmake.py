"""The restore target's hypercalls, in a short child of their own.

libxl__domain_make's ``xc_domain_create`` and libxl__build_pre's dozen
hypercalls (vCPUs, memory, event channels, HVM params, the paging pool) take
milliseconds on hardware, but Xen may make any of them wait (the paging pool is
allocated inside the call), and under an emulated CPU they took 10-100 ms: not
something for the caller's event loop.  So they run in a child, as
``xc_domain_destroy`` does, and the loop only reads its answer.

The child (:func:`main`; its argv is :meth:`~pyxl.backends.xenctrl.Xc.make_command`'s)
takes the Xen release and a JSON *spec* (:func:`spec`: the create arguments,
the saved config, the store's and console's domains, which the parent read
from XenStore, and where libxl's stored config goes) and prints, as it goes::

    domid D                 once the domain exists
    ports SP SD CP CD       once it is built (the helper's store/console ports)
    stored                  once libxl's stored config is written

then exits 0; or a one-line reason on stderr (libxenctrl's own log lines may
come before it) and exit 1.  The parent
(:class:`MakeChild`) learns the domid even from a child that failed half way,
so a half-made domain is always destroyed.

May import: pyxl.backends.libxlcfg, pyxl.backends.xenbuild,
pyxl.backends.xenctrl (only the child loads libxenctrl), pyxl.childproc,
pyxl.errors, pyxl.fdio, pyxl.loop.
"""

from __future__ import annotations

import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Sequence, Tuple

from pyxl.backends.libxlcfg import to_int
from pyxl.backends.xenbuild import (Ports, XcCalls, altp2m_mode, build_pre, create_flags,
                                    write_userdata)
from pyxl.backends.xenctrl import Xc
from pyxl.errors import StartupError

if TYPE_CHECKING:
    from pyxl.loop import Loop

__all__ = ["MakeChild", "Spec", "main", "make_domain", "parse", "spec"]

#: What the child is told: ``handle`` (hex), ``create`` (xc_domain_create's
#: arguments after the handle), ``altp2m``, ``config``, ``store_dom``,
#: ``console_dom``, ``userdata_dir``.
Spec = Dict[str, Any]

Made = Callable[[Optional[int], Optional[Ports], Optional[Exception]], None]


def spec(config: Dict[str, Any], handle: bytes, store_dom: int, console_dom: int,
         userdata_dir: str) -> Spec:
    """What the child needs to make the domain of ``config`` (libxl's
    xc_domain_create arguments for it, libxl__domain_make) and store the
    config where libxl keeps it (``userdata_dir``)."""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    flags, emu, misc = create_flags(config)
    grant_version = to_int(b_info.get("max_grant_version"), -1)
    if grant_version < 0:
        grant_version = 2
    return {"handle": handle.hex(),
            "create": [flags, to_int(b_info.get("max_vcpus"), 1),
                       to_int(b_info.get("event_channels"), 1023),
                       to_int(b_info.get("max_grant_frames"), -1),
                       to_int(b_info.get("max_maptrack_frames"), -1), grant_version & 0xF,
                       to_int(c_info.get("poolid"), 0), emu, misc, to_int(c_info.get("ssidref"), 0)],
            "altp2m": altp2m_mode(config), "config": config,
            "store_dom": store_dom, "console_dom": console_dom, "userdata_dir": userdata_dir}


def make_domain(xc: XcCalls, spec: Spec, tell: Callable[[str], None]) -> None:
    """Create the domain and build it (libxl__domain_make's hypercall, then
    libxl__build_pre's), then write libxl's stored config (a file and a
    rename: not for the loop either), telling each result as soon as it is known."""
    (flags, vcpus, evtchn_port, grant_frames, maptrack_frames, grant_opts, cpupool, emu, misc,
     ssidref) = spec["create"]
    domid = xc.create(bytes.fromhex(spec["handle"]), flags, vcpus, evtchn_port, grant_frames,
                      maptrack_frames, grant_opts, cpupool, emu, misc, ssidref,
                      altp2m=spec["altp2m"])
    tell(f"domid {domid}")
    config = spec["config"]
    ports = build_pre(xc, domid, config, spec["store_dom"], spec["console_dom"])
    tell("ports " + " ".join(map(str, ports)))
    write_userdata(spec["userdata_dir"], domid, config["c_info"]["uuid"], config)
    tell("stored")


def parse(out: str) -> Tuple[Optional[int], Optional[Ports]]:
    """The domid and ports a child told (None for what it did not; the
    ports only once the config is stored too: the child's whole work)."""
    domid: Optional[int] = None
    ports: Optional[Ports] = None
    told: Optional[Ports] = None
    for line in out.splitlines():
        key, _, rest = line.partition(" ")
        try:
            if key == "domid":
                domid = int(rest)
            elif key == "ports":
                sp, sd, cp, cd = (int(x) for x in rest.split())
                told = (sp, sd, cp, cd)
            elif key == "stored":
                ports = told
        except ValueError:
            continue        # not ours (nothing else prints here)
    return domid, ports


def main(argv: Sequence[str]) -> int:
    """The child (argv from :meth:`Xc.make_command`): ``RELEASE SPEC``."""
    def tell(line: str) -> None:
        print(line, flush=True)
    try:
        release, text = argv
        make_domain(Xc(release), json.loads(text), tell)
    except Exception as exc:  # the child's outcome: one line for the parent
        print(str(exc) or type(exc).__name__, file=sys.stderr)
        return 1
    return 0


class MakeChild:
    """Run a make child from ``loop``; ``done(domid, ports, exc)`` once it ended
    (``domid`` set whenever a domain was made, even if ``exc`` says the build
    failed: the caller destroys it).  A cancel does not stop the child (its
    hypercalls take milliseconds): what it made goes to ``orphan(domid)``."""

    def __init__(self, loop: "Loop", argv: Sequence[str], done: Made,
                 orphan: Callable[[int], None]) -> None:
        from pyxl.childproc import ShortChild   # the parent's side only: the child starts faster
        self._done: Optional[Made] = done
        self._orphan = orphan
        # its stdout: a few dozen bytes, far below a pipe's size, read once it ended
        self._out, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._out, False)
        try:
            self.child = ShortChild(loop, argv, self._ended, stdout_to=w)
        except BaseException:
            os.close(self._out)
            raise
        finally:
            os.close(w)

    def _ended(self, status: int, err: str) -> None:
        from pyxl.fdio import close_quietly, read_ready
        out, _ = read_ready(self._out)      # all there: the child has exited
        close_quietly(self._out)
        domid, ports = parse(out.decode(errors="replace"))
        done, self._done = self._done, None
        if done is None:            # cancelled: nobody wants what it made
            if domid is not None:
                self._orphan(domid)
            return
        exc: Optional[Exception] = None
        if status != 0 or domid is None or ports is None:
            lines = err.strip().splitlines()
            why = lines[-1] if lines else f"exit status {status}"
            exc = StartupError(f"cannot create the domain to restore into: {why}"
                               if domid is None else
                               f"cannot prepare domain {domid} for the restore: {why}")
        done(domid, ports, exc)

    def cancel(self) -> None:
        self._done = None
