"""Every libxenctrl/libxenguest function pyxl's ctypes backend binds exists in the
Debian library of this host's Xen release it binds it from (a wrong library is
only found on a real Xen host otherwise: xc_domain_get_native_protocol is
libxenguest's), and the createdomain layout the backend packs for that release
is the one the installed headers (libxen-dev) give."""

from __future__ import annotations

import ctypes
import pathlib
import re
import struct
import subprocess

import pytest

from pyxl._paths import xen_release
from pyxl.backends.xenctrl import CREATEDOMAIN

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "pyxl" / "backends" / "xenctrl.py"
RELEASE = xen_release() or "none"
LIBS = {"ctrl": f"libxenctrl.so.{RELEASE}", "guest": f"libxenguest.so.{RELEASE}"}


def bindings() -> set[tuple[str, str]]:
    text = SOURCE.read_text()
    found = {(lib, fn) for lib, fn in re.findall(r"self\.(ctrl|guest)\.(xc_\w+)", text)}
    # ``c = self.ctrl`` then ``c.xc_...``
    found |= {("ctrl", fn) for fn in re.findall(r"\bc\.(xc_\w+)", text)}
    return found


def test_the_scan_sees_the_bindings():
    names = {fn for _lib, fn in bindings()}
    assert {"xc_domain_create", "xc_domain_resume", "xc_domain_get_native_protocol"} <= names


@pytest.mark.parametrize("lib,fn", sorted(bindings()))
def test_symbol_is_in_the_library_it_is_bound_from(lib, fn):
    try:
        handle = ctypes.CDLL(LIBS[lib])
    except OSError as exc:   # make test installs libxen-dev; without it this is a setup bug
        pytest.fail(f"{LIBS[lib]} not loadable: {exc}")
    assert hasattr(handle, fn), f"{fn} is not exported by {LIBS[lib]}"


OFFSETS_C = r"""
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#define F(m) printf("%s %zu %zu\n", #m, offsetof(struct xen_domctl_createdomain, m), sizeof(((struct xen_domctl_createdomain *)0)->m));
int main(void)
{
    printf("size %zu 0\n", sizeof(struct xen_domctl_createdomain));
    F(ssidref) F(handle) F(flags) F(iommu_opts) F(max_vcpus) F(max_evtchn_port)
    F(max_grant_frames) F(max_maptrack_frames) F(grant_opts)
#ifdef XEN_DOMCTL_ALTP2M_mode_mask
    F(altp2m_opts)
#endif
    F(vmtrace_size) F(cpupool_id) F(arch.emulation_flags) F(arch.misc_flags)
    return 0;
}
"""


def test_createdomain_layout_is_the_installed_headers(tmp_path):
    """The fields pyxl packs, in order, at the offsets and sizes the installed
    xen/domctl.h gives (compiled here: the headers are those of the libraries)."""
    assert RELEASE in CREATEDOMAIN, f"libxenctrl of no supported release here ({RELEASE})"
    src, exe = tmp_path / "offsets.c", tmp_path / "offsets"
    src.write_text(OFFSETS_C)
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    rows = [line.split() for line in subprocess.run([str(exe)], check=True, capture_output=True,
                                                    text=True).stdout.splitlines()]
    size = int(rows[0][1])
    fields = [(int(off), int(n)) for _name, off, n in rows[1:]]
    layout = CREATEDOMAIN[RELEASE]
    assert layout.size == size
    # struct.Struct("=...") packs without padding: walk its codes to offsets
    ours, at = [], 0
    for count, letter in re.findall(r"(\d*)([a-zA-Z])", layout.format.lstrip("=")):
        n = struct.calcsize("=" + count + letter)
        ours.append((at, n))
        at += n
    assert ours == fields


SCHED_C = r"""
#define __XEN_TOOLS__ 1
#include <stddef.h>
#include <stdio.h>
#include <stdint.h>
#include <xen/xen.h>
#include <xen/domctl.h>
#define F(s, m) printf("%s %zu %zu\n", #s "." #m, offsetof(struct s, m), sizeof(((struct s *)0)->m));
int main(void)
{
    printf("credit %zu credit2 %zu\n", sizeof(struct xen_domctl_sched_credit),
           sizeof(struct xen_domctl_sched_credit2));
    F(xen_domctl_sched_credit, weight) F(xen_domctl_sched_credit, cap)
    F(xen_domctl_sched_credit2, weight) F(xen_domctl_sched_credit2, cap)
    return 0;
}
"""


def test_sched_cap_functions_and_layout_are_the_installed_ones(tmp_path):
    """The scheduler-cap domctls pyxl binds by name exist in libxenctrl, and the
    {weight, cap} struct it packs is the installed headers' for both schedulers."""
    from pyxl.backends.xenctrl import SCHED_CAP_FUNCS, SCHED_PARAMS
    handle = ctypes.CDLL(LIBS["ctrl"])
    for _sched, get, set_ in SCHED_CAP_FUNCS:
        assert hasattr(handle, get) and hasattr(handle, set_), (get, set_)
    src, exe = tmp_path / "sched.c", tmp_path / "sched"
    src.write_text(SCHED_C)
    subprocess.run(["cc", "-o", str(exe), str(src)], check=True)
    lines = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout.split("\n")
    assert lines[0].split() == ["credit", str(SCHED_PARAMS.size), "credit2", str(SCHED_PARAMS.size)]
    rows = [line.split() for line in lines[1:] if line]
    assert [(int(off), int(n)) for _name, off, n in rows] == [(0, 2), (2, 2)] * 2
    assert SCHED_PARAMS.unpack(SCHED_PARAMS.pack(256, 25)) == (256, 25)
    assert struct.calcsize("=H") == 2 and SCHED_PARAMS.format.lstrip("=") == "HH"   # weight, cap
