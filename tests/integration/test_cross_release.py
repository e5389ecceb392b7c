"""A stream from a newer Xen on this host's Xen, on fakexen (which simulates
the release of the libxenctrl it runs beneath: 4.17 on Debian 12, 4.20 on 13).

Xen 4.20.1 grew the LAPIC save record from 24 to 32 bytes.  Rewritten that way,
a saved guest's image is what a 4.20.1 host writes: Xen 4.17 refuses it (the
restore fails as a typed error and leaves nothing), 4.20 loads it, and
``pyxl inspect`` says which Xen wrote it."""

from __future__ import annotations

import json
import pathlib
import struct
import subprocess

import pyxl
from pyxl import sim
from pyxl._paths import xen_release
from pyxl.stream.framing import REC_HEADER, roundup8
from pyxl.stream.libxc import LibxcRecordType
from pyxl.streamio import scan_stream

from conftest import ROOT

PYXL = [str(ROOT / ".venv" / "bin" / "python"), "-m", "pyxl"]


def widen_lapic(path: pathlib.Path, out: pathlib.Path) -> None:
    """Copy the xl save file ``path`` to ``out`` with its LAPIC save records
    grown to 4.20.1's 32 bytes (``pending_esr`` = 0)."""
    data = path.read_bytes()
    with open(path, "rb") as f:
        rep = scan_stream(f)
    assert rep.error is None, rep.error
    (hc,) = [r for r in rep.records if r.layer == "libxc" and r.rtype == LibxcRecordType.HVM_CONTEXT]
    body = data[hc.offset + REC_HEADER.size:hc.offset + REC_HEADER.size + hc.length]
    pos, parts = 0, []
    while pos < len(body):
        code, inst, length = struct.unpack_from("<HHI", body, pos)
        payload = body[pos + 8:pos + 8 + length]
        if code == 5:
            payload += bytes(8)
        parts.append(struct.pack("<HHI", code, inst, len(payload)) + payload)
        pos += 8 + length
        if code == 0:
            break
    blob = b"".join(parts)
    rec = REC_HEADER.pack(LibxcRecordType.HVM_CONTEXT, len(blob)) + blob
    rec += bytes(roundup8(len(blob)) - len(blob))
    end = hc.offset + REC_HEADER.size + roundup8(hc.length)
    out.write_bytes(data[:hc.offset] + rec + data[end:])


def test_a_stream_from_xen_4_20_1(sim_dir, tmp_path):
    dom = sim.create(16 << 20, sim_dir=sim_dir)
    saved = tmp_path / "g.save"
    pyxl.wait(pyxl.save(dom, saved, sim_dir=sim_dir), timeout=60)
    newer = tmp_path / "g-4.20.1.save"
    widen_lapic(saved, newer)

    report = json.loads(subprocess.run(PYXL + ["inspect", "--json", str(newer)], check=True,
                                       capture_output=True, text=True).stdout)
    assert any("written by Xen 4.20.1 or later" in w and "Xen 4.17 cannot restore it" in w
               for w in report["warnings"]), report["warnings"]

    op = pyxl.restore(newer, sim_dir=sim_dir)
    if xen_release() == "4.17":
        try:
            pyxl.wait(op, timeout=60)
        except pyxl.OperationError:
            pass
        exc = op.exception()
        assert isinstance(exc, pyxl.OperationError), exc
        assert isinstance(exc, pyxl.HelperFailed) and "Xen 4.17 refused the stream's HVM context" in str(exc) \
            and "4.20.1 or later" in str(exc), str(exc)
        assert sim.list_domains(sim_dir=sim_dir) == []
    else:
        (res,) = pyxl.wait(op, timeout=60)
        assert [i.state for i in sim.list_domains(sim_dir=sim_dir)] == ["running"]
        assert res.domid >= 0
