"""Which Xen release pyxl takes this host for: by libxenctrl's soname, one place
(pyxl._paths), and the ctypes backend refuses a release whose layouts it does
not know, in one line."""

from __future__ import annotations

import pytest

import pyxl._paths as paths
from pyxl.backends import xenctrl
from pyxl.errors import StartupError


def libdir(monkeypatch, tmp_path, *names):
    for n in names:
        (tmp_path / n).write_bytes(b"")
    monkeypatch.setattr(paths, "LIB_DIRS", (str(tmp_path / "absent"), str(tmp_path)))


@pytest.mark.parametrize("names,release", [
    (["libxenctrl.so.4.17", "libxenctrl.so.4.17.0"], "4.17"),
    (["libxenctrl.so.4.20", "libxenctrl.so.4.20.0", "libxenctrl.so"], "4.20"),
    (["libxenctrl.so.4.17", "libxenctrl.so.4.20"], "4.20"),      # the newer one
    (["libxenctrl.so.4.19"], None),
    ([], None),
])
def test_release_by_soname(monkeypatch, tmp_path, names, release):
    libdir(monkeypatch, tmp_path, *names)
    assert paths.xen_release() == release


def test_unknown_release_is_refused_in_one_line(monkeypatch, tmp_path):
    libdir(monkeypatch, tmp_path, "libxenctrl.so.4.19", "libxenctrl.so.4.19.0")
    assert paths.xenctrl_releases() == ("4.19",)
    monkeypatch.setattr(xenctrl, "xen_release", paths.xen_release)
    monkeypatch.setattr(xenctrl, "xenctrl_releases", paths.xenctrl_releases)
    with pytest.raises(StartupError) as info:
        xenctrl.Xc()
    text = str(info.value)
    assert "Xen 4.19" in text and "4.17 and 4.20" in text and "\n" not in text


def test_no_libxenctrl_is_refused(monkeypatch, tmp_path):
    libdir(monkeypatch, tmp_path)
    monkeypatch.setattr(xenctrl, "xen_release", paths.xen_release)
    monkeypatch.setattr(xenctrl, "xenctrl_releases", paths.xenctrl_releases)
    with pytest.raises(StartupError, match="cannot find libxenctrl"):
        xenctrl.Xc()


def test_debian_helper_is_the_hosts_release():
    rel = paths.xen_release()
    assert rel in paths.XEN_RELEASES    # make test installs one
    assert paths.DEBIAN_HELPER == f"/usr/lib/xen-{rel}/bin/libxl-save-helper"
