"""``pyxl restore`` (API and CLI) of broken save files, on real helpers and fakexen.

tests/unit/test_stream_mutations.py covers what ``pyxl inspect`` says about broken
streams; this file restores them: a real image of a 16 MiB guest, truncated
at record boundaries and inside records, with bit flips in every header and
record header, huge lengths, records reordered, duplicated or dropped, and
streams of the wrong layer.  What ``pyxl inspect`` says of each mutated xl
file must match what the real restore did.  Every case: a typed error (or, where libxc
accepts the change, a restored domain), the half-made domain destroyed, no
fd, child or domain leaked, bounded time and bounded memory in pyxl; on the
CLI a non-zero exit and one line on stderr, never a traceback.

Quick lane: a representative subset with pyxl's helper (a few with Debian's).
``PYXL_SLOW=1``: every record boundary and every header bit, both helpers.
"""

from __future__ import annotations

import os
import struct
import subprocess
import sys
import tempfile
import time
import tracemalloc
from typing import Dict, List, Optional, Tuple

import pytest

import pyxl
from pyxl.cli import main as cli
from pyxl import sim
from pyxl import streamio
from pyxl.stream.framing import roundup8
from pyxl.stream.report import RecordInfo

from conftest import HELPERS, ROOT, SLOW, children, domids, new_sim_dir, open_fds

MB = 1 << 20
BOUND = 15.0


class Image:
    """The bytes of a real save file and where its pieces are."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        path = tempfile.mktemp(dir="/dev/shm")
        with open(path, "wb") as f:
            f.write(data)
        try:
            report = streamio.scan_path(path)
        finally:
            os.unlink(path)
        assert report.ok, report.error
        self.report = report
        self.libxl = report.libxl_offset
        self.libxc = report.libxc_offset
        self.records: List[RecordInfo] = report.records
        self.libxc_records = [r for r in self.records if r.layer == "libxc"]

    def span(self, rec: RecordInfo) -> Tuple[int, int]:
        return rec.offset, rec.offset + 8 + roundup8(rec.length)

    def named(self, name: str, layer: str = "libxc", nth: int = 0) -> RecordInfo:
        return [r for r in self.records if r.name == name and r.layer == layer][nth]

    def boundaries(self, every: bool) -> List[int]:
        """Record boundaries (each record's start, and the end of the last).
        Unless ``every``: all boundaries around records other than PAGE_DATA,
        and the first and last few PAGE_DATA records."""
        out = {0, self.libxl, self.libxc, self.libxc + 24}
        pages = [r for r in self.records if r.name == "PAGE_DATA"]
        keep = pages if every else pages[:4] + pages[-2:]
        for r in self.records:
            if r.name != "PAGE_DATA" or r in keep:
                out.update(self.span(r))
        out.discard(len(self.data))
        return sorted(out)

    def inside(self) -> List[int]:
        """Cut points inside records: within each kind's header and body."""
        out = set()
        seen = set()
        for r in self.records:
            if (r.layer, r.name) in seen:
                continue
            seen.add((r.layer, r.name))
            a, b = self.span(r)
            out.add(a + 4)
            if b - a > 8:
                out.add(a + 8 + (b - a - 8) // 2)
                out.add(b - 1)
        out.update({10, 40, self.libxl + 8, self.libxc + 12, self.libxc + 30})
        return sorted(out)

    def header_bytes(self) -> List[Tuple[str, int]]:
        """(what, offset) of the bytes of the fixed headers and record headers."""
        out = [("xl-header", i) for i in range(48)]
        out += [("libxl-header", self.libxl + i) for i in range(16)]
        out += [("libxc-image-header", self.libxc + i) for i in range(24)]
        out += [("libxc-domain-header", self.libxc + 24 + i) for i in range(16)]
        for name in ("LIBXC_CONTEXT", "END"):
            r = self.named(name, "libxl")
            out += [(f"libxl-{name}", r.offset + i) for i in range(8)]
        seen = set()
        for r in self.libxc_records:
            if r.name in seen:
                continue
            seen.add(r.name)
            out += [(f"libxc-{r.name}", r.offset + i) for i in range(8)]
        return out

    def cut(self, *spans: Tuple[int, int]) -> bytes:
        data = self.data
        for a, b in sorted(spans, reverse=True):
            data = data[:a] + data[b:]
        return data

    def record_bytes(self, rec: RecordInfo) -> bytes:
        a, b = self.span(rec)
        return self.data[a:b]


@pytest.fixture(scope="module")
def image() -> Image:
    with new_sim_dir() as d:
        path = os.path.join(d, "guest.save")
        dom = sim.create(16 * MB, dirty_rate=4 * MB, sim_dir=d)
        pyxl.wait(pyxl.save(dom, path, sim_dir=d))
        with open(path, "rb") as f:
            return Image(f.read())


def set_u32(data: bytes, offset: int, value: int, fmt: str = "<I") -> bytes:
    return data[:offset] + struct.pack(fmt, value) + data[offset + 4:]


def mutations(img: Image) -> Dict[str, Tuple[bytes, bool]]:
    """name -> (bytes, whether any restore of it must fail)."""
    d = img.data
    r = img.named
    out: Dict[str, Tuple[bytes, bool]] = {}
    # huge lengths
    for name in ("X86_CPUID_POLICY", "PAGE_DATA", "HVM_CONTEXT", "HVM_PARAMS"):
        for value in (0xFFFFFFF8, 0x7FFFFFF8, 1 << 30):
            out[f"huge-{name}-{value:#x}"] = (set_u32(d, r(name).offset + 4, value), True)
    pd = r("PAGE_DATA", nth=1)
    out["huge-page-count"] = (set_u32(d, pd.offset + 8, 0xFFFFFFFF), True)
    out["page-count-too-big-for-record"] = (set_u32(d, pd.offset + 8, 2048), True)
    out["huge-libxl-LIBXC_CONTEXT"] = (set_u32(d, r("LIBXC_CONTEXT", "libxl").offset + 4,
                                               0xFFFFFFF8), True)
    end = r("END", "libxl")
    for value in (0xFFFFFFF8, 100 * MB):
        # the libxl END turned into an emulator record of enormous length
        out[f"huge-trailer-{value:#x}"] = (
            d[:end.offset] + struct.pack("<II", 2, value) + struct.pack("<II", 0, 0), True)
    out["huge-xl-optional-data"] = (set_u32(d, 44, 0xFFFFFFF0, "=I"), True)
    # reordered, duplicated, dropped
    cpuid, msr, sde = r("X86_CPUID_POLICY"), r("X86_MSR_POLICY"), r("STATIC_DATA_END")
    ctx, params, xend = r("HVM_CONTEXT"), r("HVM_PARAMS"), r("END")
    rb = img.record_bytes
    out["swap-cpuid-msr"] = (d[:cpuid.offset] + rb(msr) + rb(cpuid) + d[img.span(msr)[1]:], False)
    out["context-before-static-data-end"] = (
        img.cut(img.span(ctx))[:sde.offset] + rb(ctx) + img.cut(img.span(ctx))[sde.offset:], False)
    p0, p1 = r("PAGE_DATA", nth=0), r("PAGE_DATA", nth=1)
    out["swap-page-data"] = (d[:p0.offset] + rb(p1) + rb(p0) + d[img.span(p1)[1]:], False)
    out["dup-page-data"] = (d[:p1.offset] + rb(p1) + d[p1.offset:], False)
    out["dup-static-data-end"] = (d[:sde.offset] + rb(sde) + d[sde.offset:], False)
    out["dup-hvm-context"] = (d[:ctx.offset] + rb(ctx) + d[ctx.offset:], False)
    out["dup-cpuid"] = (d[:cpuid.offset] + rb(cpuid) + d[cpuid.offset:], False)
    out["drop-hvm-context"] = (img.cut(img.span(ctx)), False)
    out["drop-hvm-params"] = (img.cut(img.span(params)), False)
    out["drop-static-data-end"] = (img.cut(img.span(sde)), False)
    out["drop-libxc-end"] = (img.cut(img.span(xend)), True)
    out["drop-libxl-end"] = (img.cut(img.span(end)), True)
    out["libxc-end-early"] = (d[:p0.offset] + rb(xend) + d[p0.offset:], False)
    out["libxl-end-early"] = (d[:img.libxc] + rb(end) + d[img.libxc:], True)
    out["trailing-garbage"] = (d + os.urandom(4096), False)
    out["unknown-libxl-record-in-trailer"] = (
        d[:end.offset] + struct.pack("<II", 0x77, 8) + bytes(8) + rb(end), True)
    # wrong layer
    libxc_stream = d[img.libxc:end.offset]
    out["libxc-only"] = (libxc_stream, True)
    out["libxl-only"] = (d[img.libxl:], True)
    out["xl-then-libxc"] = (d[:img.libxl] + libxc_stream, True)
    out["xl-header-only"] = (d[:img.libxl], True)
    out["empty"] = (b"", True)
    out["random"] = (os.urandom(64 << 10), True)
    out["libxc-stream-twice"] = (d[:end.offset] + libxc_stream + rb(end), False)
    return out


def restore_api(sim_dir: str, path: str, helper: str) -> Tuple[Optional[Exception], float, int]:
    """Restore through the API: (error or None, seconds, peak bytes pyxl allocated)."""
    before = domids(sim_dir)
    t0 = time.monotonic()
    tracemalloc.start()
    err: Optional[Exception] = None
    try:
        try:
            op = pyxl.restore(path, paused=True, helper=helper, sim_dir=sim_dir, timeout=60)
        except pyxl.OperationError as exc:
            err = exc
        else:
            try:
                pyxl.wait(op, timeout=BOUND * 2)
            except pyxl.OperationError as exc:
                err = exc
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    took = time.monotonic() - t0
    after = domids(sim_dir)
    if err is None:
        assert len(after) == len(before) + 1
        for new in set(after) - set(before):
            sim.destroy(new, sim_dir=sim_dir)
    else:
        assert after == before, f"half-made domain left behind after {err!r}"
    return err, took, peak


@pytest.fixture(scope="module")
def muts(image: Image) -> Dict[str, Tuple[bytes, bool]]:
    return mutations(image)


@pytest.fixture
def scratch(sim_dir: str) -> str:
    """Where the broken files go: tmpfs (25 MB each, hundreds of them)."""
    return sim_dir


def check_api(sim_dir: str, scratch: str, data: bytes, must_fail: bool,
              helper: str = "ours") -> Optional[Exception]:
    path = os.path.join(scratch, "broken.save")
    with open(path, "wb") as f:
        f.write(data)
    # An OperationError and its operation refer to each other, and its
    # traceback holds this frame: without this, every 25 MB copy would live
    # until the cyclic GC happens to run.
    del data
    fds, kids = open_fds(), children()
    err, took, peak = restore_api(sim_dir, path, HELPERS[helper])
    assert err is None or isinstance(err, pyxl.OperationError), repr(err)
    if must_fail:
        assert err is not None, "restored a stream that must be refused"
    assert took < BOUND, f"took {took:.1f}s"
    assert peak < 64 * MB, f"pyxl allocated {peak} bytes"
    assert open_fds() == fds and children() == kids
    return err


def check_cli(sim_dir: str, path: str, must_fail: bool, capsys, helper: str = "ours") -> None:
    """The CLI in-process: exit status and exactly one stderr line."""
    before = domids(sim_dir)
    code = cli.main(["restore", "-p", "-q", "--helper", HELPERS[helper], "--sim-dir", sim_dir,
                     "--timeout", "60", path])
    out, err = capsys.readouterr()
    if code == 0:
        assert not must_fail
        assert out.strip().isdigit() and err == ""
        sim.destroy(int(out), sim_dir=sim_dir)
    else:
        assert code in (1, 2), code
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("pyxl: error: "), err
        assert "Traceback" not in err and "internal error" not in err, err
    assert domids(sim_dir) == before


# ---------------------------------------------------------------------------


def test_truncated_at_record_boundaries(sim_dir, scratch, image) -> None:
    cuts = image.boundaries(every=SLOW)
    assert len(cuts) >= 20
    for n in cuts:
        check_api(sim_dir, scratch, image.data[:n], must_fail=True)


def test_truncated_inside_records(sim_dir, scratch, image) -> None:
    for n in image.inside():
        check_api(sim_dir, scratch, image.data[:n], must_fail=True)


@pytest.mark.skipif(not SLOW, reason="PYXL_SLOW=1: every record boundary with Debian's helper")
def test_truncated_at_every_boundary_debian(sim_dir, scratch, image) -> None:
    for n in image.boundaries(every=True):
        check_api(sim_dir, scratch, image.data[:n], must_fail=True, helper="debian")


def test_header_bit_flips(sim_dir, scratch, image) -> None:
    """Bit flips in the xl, libxl and libxc headers and in record headers.
    Quick lane: one bit of every fifth header byte (rotating); slow lane: every bit."""
    for i, (what, off) in enumerate(image.header_bytes()):
        if not SLOW and i % 5:
            continue
        bits = range(8) if SLOW else [i // 5 % 8]
        for bit in bits:
            data = bytearray(image.data)
            data[off] ^= 1 << bit
            # only the config text of the xl header may change harmlessly;
            # a flip in a magic number must be refused
            magic = ((what == "xl-header" and off < 32)
                     or (what == "libxl-header" and off - image.libxl < 8)
                     or (what == "libxc-image-header" and off - image.libxc < 12))
            check_api(sim_dir, scratch, bytes(data), must_fail=magic)


@pytest.mark.parametrize("helper", ["ours", "debian"])
def test_mutated_streams(sim_dir, scratch, muts, helper) -> None:
    names = sorted(muts)
    if helper == "debian" and not SLOW:
        names = [n for n in names if n.startswith(("huge-PAGE", "huge-page", "drop-libxc",
                                                   "swap", "libxc-end"))]
    for name in names:
        data, must_fail = muts[name]
        try:
            err = check_api(sim_dir, scratch, data, must_fail, helper)
            # pyxl inspect refuses exactly what a real restore refuses (for
            # xl save files; restore needs the xl layer, inspect does not)
            report = streamio.scan_path(os.path.join(scratch, "broken.save"))
            if report.layer == "xl":
                assert report.ok == (err is None), (report.error, err)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


def test_cli_one_line_errors(sim_dir, scratch, image, muts, capsys) -> None:
    """The CLI on broken files: exit 1 or 2, one line on stderr."""
    cases = dict(muts)
    cases.update({f"cut-{n}": (image.data[:n], True) for n in image.inside()[::3 if SLOW else 6]})
    path = os.path.join(scratch, "broken.save")
    for name, (data, must_fail) in sorted(cases.items()):
        with open(path, "wb") as f:
            f.write(data)
        try:
            check_cli(sim_dir, path, must_fail, capsys)
        except AssertionError as exc:
            raise AssertionError(f"{name}: {exc}") from exc


@pytest.mark.parametrize("name", ["empty", "random", "libxc-only", "huge-PAGE_DATA-0xfffffff8",
                                  "huge-trailer-0x6400000", "drop-libxl-end"])
def test_cli_process_never_prints_a_traceback(sim_dir, tmp_path, muts, name) -> None:
    """The real ``pyxl`` process: non-zero exit, one line, no traceback."""
    data, _ = muts[name]
    path = tmp_path / "broken.save"
    path.write_bytes(data)
    before = domids(sim_dir)
    r = subprocess.run([sys.executable, "-m", "pyxl", "restore", "--sim-dir", sim_dir,
                        str(path)], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT))
    assert r.returncode in (1, 2), (r.returncode, r.stderr)
    assert r.stdout == ""
    assert len(r.stderr.splitlines()) == 1 and r.stderr.startswith("pyxl: error: "), r.stderr
    assert domids(sim_dir) == before
