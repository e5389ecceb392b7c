"""Content profiles for simulated guests (issue 19): `pyxl sim create --content`.

Each profile's page statistics are measured on the guest's memory file: the
fraction of zero pages, and compressibility with a real compressor (zlib,
level 6, over the populated pages in order).  Same seed, same bytes; another
seed, other bytes.  A save and restore keeps each profile's digest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib

import pytest

import pyxl
from pyxl import sim
from pyxl.backends import SimBackend

ZERO = bytes(4096)
_TEXT_BYTES = b"abcdefghijklmnopqrstuvwxyz \n"


def _pages(dom, sim_dir):
    """The guest's RAM pages, in pfn order: not pfn 0 (the simulated vCPU's own
    state) nor the special pages (0xfeff0-0xfefff, Xen's)."""
    out = []
    with open(os.path.join(sim_dir, f"d{dom}", "mem"), "rb") as f:
        for start, count in sim.populated_runs(dom, sim_dir=sim_dir):
            f.seek(start * 4096)
            data = f.read(count * 4096)
            out.extend(data[i:i + 4096] for i in range(0, len(data), 4096)
                       if start + i // 4096 != 0 and not 0xFEFF0 <= start + i // 4096 < 0xFF000)
    return out


def _stats(pages):
    zero = sum(p == ZERO for p in pages) / len(pages)
    data = b"".join(pages)
    return zero, len(data) / len(zlib.compress(data, 6))


@pytest.mark.parametrize("profile, zero_lo, zero_hi, ratio_lo, ratio_hi", [
    ("zero", 0.99, 1.0, 100, None),
    ("text", 0.0, 0.01, 2.6, 3.6),        # "compressible about 3x"
    ("random", 0.0, 0.01, 0.95, 1.02),    # incompressible
    # 50 % zero, 30 % text, 20 % random: compressed about 0.3/3 + 0.2 of the size
    ("typical", 0.46, 0.54, 2.8, 4.2),
])
def test_profile_statistics(sim_dir, profile, zero_lo, zero_hi, ratio_lo, ratio_hi):
    dom = sim.create(16 << 20, sim_dir=sim_dir, paused=True, content=profile, seed=7)
    pages = _pages(dom, sim_dir)
    assert len(pages) >= 4096 - 64
    zero, ratio = _stats(pages)
    assert zero_lo <= zero <= zero_hi, (profile, zero)
    assert ratio >= ratio_lo and (ratio_hi is None or ratio <= ratio_hi), (profile, ratio)
    if profile == "typical":
        # the non-zero pages split 30:20 between text and random
        text = sum(1 for p in pages if not p.translate(None, _TEXT_BYTES))
        rnd = sum(1 for p in pages if len(zlib.compress(p, 6)) >= 4096)
        assert abs(text / len(pages) - 0.30) < 0.04 and abs(rnd / len(pages) - 0.20) < 0.04
    if profile == "text":
        assert not b"".join(pages).translate(None, _TEXT_BYTES)     # words, spaces, newlines


def test_same_seed_same_bytes(sim_dir):
    a = sim.create(4 << 20, sim_dir=sim_dir, paused=True, content="typical", seed=3)
    b = sim.create(4 << 20, sim_dir=sim_dir, paused=True, content="typical", seed=3)
    c = sim.create(4 << 20, sim_dir=sim_dir, paused=True, content="typical", seed=4)
    assert _pages(a, sim_dir) == _pages(b, sim_dir) != _pages(c, sim_dir)


def test_bad_profile_is_one_line_error(sim_dir):
    with pytest.raises(ValueError, match="unknown content profile 'lots'"):
        sim.create(4 << 20, sim_dir=sim_dir, content="lots")
    r = subprocess.run([sys.executable, "-m", "pyxl", "sim", "create", "--sim-dir", sim_dir,
                        "--memory", "4M", "--content", "lots"], capture_output=True, text=True)
    assert r.returncode == 2 and "--content" in r.stderr and "lots" in r.stderr
    assert sim.list_domains(sim_dir=sim_dir) == []


def test_cli_creates_a_profiled_guest(sim_dir):
    r = subprocess.run([sys.executable, "-m", "pyxl", "sim", "create", "--sim-dir", sim_dir,
                        "--memory", "8M", "--content", "text", "--seed", "5", "--paused",
                        "--json"], capture_output=True, text=True, check=True)
    dom = json.loads(r.stdout)["domid"]
    zero, ratio = _stats(_pages(dom, sim_dir))
    assert zero == 0 and 2.6 <= ratio <= 3.6


@pytest.mark.parametrize("profile", ["zero", "text", "random", "typical"])
def test_save_restore_keeps_the_digest(sim_dir, tmp_path, profile):
    """A live save while the vCPU keeps dirtying, then a restore: byte-identical."""
    dom = sim.create(32 << 20, sim_dir=sim_dir, content=profile, seed=11,
                     dirty_rate=10_000_000)
    path = str(tmp_path / "g.save")
    pyxl.wait(pyxl.save(dom, path, backend=SimBackend(sim_dir), live=True, leave="paused"))
    want = sim.digest(dom, sim_dir=sim_dir)
    back = pyxl.wait(pyxl.restore(path, backend=SimBackend(sim_dir), paused=True,
                                  name="copy"))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want
