"""Every libxenctrl/libxenguest function pyxl's ctypes backend binds exists in the
Debian 4.17 library it binds it from (a wrong library is only found on a real
Xen host otherwise: xc_domain_get_native_protocol is libxenguest's)."""

from __future__ import annotations

import ctypes
import pathlib
import re

import pytest

SOURCE = pathlib.Path(__file__).resolve().parents[2] / "pyxl" / "backends" / "xenctrl.py"
LIBS = {"ctrl": "libxenctrl.so.4.17", "guest": "libxenguest.so.4.17"}


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
