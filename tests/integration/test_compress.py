"""zstd-compressed images (issue 19): ``save(compress=True)``, ``pyxl save --compress``.

A compressed image is one zstd frame, with its content checksum, of the plain
xl image: Debian's ``zstd -d`` gives back a stream ``pyxl inspect`` passes, and
pyxl restores the compressed file itself to byte-identical memory.  A restore
checks the whole frame -- no truncation, no corruption, the checksum, nothing
after the frame and nothing after the stream's END inside it -- before the
domain may run: every bad image is a :class:`pyxl.CorruptImage`, with no
domain, child or fd left behind.  A compressed image on a pipe is refused with
the fix (:class:`pyxl.CompressedImage`).  A compressor that dies fails the
save: the guest runs again and no file is left.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import zstandard

import pyxl
from conftest import ROOT, children, domids, open_fds
from pyxl import sim
from pyxl.backends import SimBackend
from pyxl.errors import CompressedImage, CorruptImage, OperationError, StartupError
from pyxl.loop import SelectorLoop
from pyxl.stream.xl import XL_MAGIC, ZSTD_MAGIC

PYXL = [sys.executable, "-m", "pyxl"]


def _save(sim_dir, dom, target, **kw):
    target = target if isinstance(target, int) else str(target)
    return pyxl.wait(pyxl.save(dom, target, backend=SimBackend(sim_dir), **kw))[0]


def _compressed_image(sim_dir, tmp_path, content="typical", size=32 << 20):
    """A compressed image of a fresh guest (destroyed by the save); its digest."""
    dom = sim.create(size, name="g", sim_dir=sim_dir, content=content)
    want = sim.digest(dom, sim_dir=sim_dir)
    path = tmp_path / "g.zsave"
    res = _save(sim_dir, dom, path, compress=True)
    assert res.compressed and res.bytes_written == path.stat().st_size
    return path, want


@pytest.mark.parametrize("content", ["zero", "text", "random", "typical"])
def test_compressed_image_restores_byte_identical(sim_dir, tmp_path, content):
    """Every content profile: a zstd frame with a checksum, restored whole;
    its size against the plain image's says what compression bought."""
    before_fds = open_fds()
    path, want = _compressed_image(sim_dir, tmp_path, content)
    head = path.read_bytes()[:5]
    assert head[:4] == ZSTD_MAGIC and head[4] & 0x04        # content checksum flag
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(path.read_bytes())
    assert plain.startswith(XL_MAGIC)
    ratio = path.stat().st_size / len(plain)
    assert ratio < {"zero": 0.05, "text": 0.5, "random": 1.01, "typical": 0.5}[content]
    if content == "random":     # incompressible RAM (the rest: zero pages of the HVM layout)
        assert ratio > 0.75
    back = pyxl.wait(pyxl.restore(str(path), backend=SimBackend(sim_dir), paused=True))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want
    assert children() == [] and open_fds() == before_fds


@pytest.mark.skipif(shutil.which("zstd") is None, reason="Debian's zstd is installed by make setup")
def test_debian_zstd_gives_back_the_xl_image(sim_dir, tmp_path):
    """`zstd -d` (Debian's CLI, which checks the checksum) gives a plain xl
    image that inspect passes and restores like any other."""
    path, want = _compressed_image(sim_dir, tmp_path)
    plain = tmp_path / "g.save"
    subprocess.run(["zstd", "-q", "-d", str(path), "-o", str(plain)], check=True)
    assert plain.read_bytes().startswith(XL_MAGIC)
    r = subprocess.run(PYXL + ["inspect", str(plain)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    back = pyxl.wait(pyxl.restore(str(plain), backend=SimBackend(sim_dir), paused=True))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want


def test_compressed_true_on_a_plain_file_restores_it(sim_dir, tmp_path):
    """A regular file's magic decides: ``compressed=True`` on a plain image (by
    path or as a file's fd) restores it as plain, where it used to fail from
    the loop with the decompressor's "not a zstd frame" (CorruptImage).  A file
    that is neither is refused by pyxl.restore() itself, as without the flag."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir, content="text")
    want = sim.digest(dom, sim_dir=sim_dir)
    plain = tmp_path / "plain.save"
    _save(sim_dir, dom, str(plain))
    assert plain.read_bytes().startswith(XL_MAGIC)
    before_fds = open_fds()
    back = pyxl.wait(pyxl.restore(str(plain), backend=SimBackend(sim_dir), paused=True,
                                  compressed=True))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want
    sim.destroy(back.domid, sim_dir=sim_dir)
    fd = os.open(plain, os.O_RDONLY)
    try:
        back = pyxl.wait(pyxl.restore(fd, backend=SimBackend(sim_dir), paused=True,
                                      compressed=True))[0]
    finally:
        os.close(fd)
    assert sim.digest(back.domid, sim_dir=sim_dir) == want
    junk = tmp_path / "junk.save"
    junk.write_bytes(b"not an xl image at all" * 200)
    with pytest.raises(StartupError, match=r"junk.save: xl header at 0x0: wrong magic"):
        pyxl.restore(str(junk), backend=SimBackend(sim_dir), compressed=True)
    assert children() == [] and open_fds() == before_fds


def _bad_images(path, tmp_path):
    data = path.read_bytes()
    plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)

    def write(name, content):
        p = tmp_path / name
        p.write_bytes(content)
        return p

    flip = bytearray(data)
    flip[len(data) // 2] ^= 0x40
    last = bytearray(data)
    last[-1] ^= 0x01                      # the checksum's last byte
    zc = zstandard.ZstdCompressor(level=1, write_checksum=True)
    return {
        "truncated": (write("t", data[: len(data) * 2 // 3]), r"truncated"),
        "corrupt": (write("c", bytes(flip)), r"corrupt"),
        "checksum": (write("k", bytes(last)), r"checksum"),
        "after-frame": (write("a", data + b"\0" * 8), r"bytes follow the compressed image's"),
        "no-checksum": (write("n", zstandard.ZstdCompressor(level=1).compress(plain)),
                        r"no content checksum"),
        "after-END": (write("e", zc.compress(plain + b"\0" * 4096)),
                      r"decompresses to more than its stream"),
    }


def test_bad_compressed_images_are_refused(sim_dir, tmp_path):
    """Each bad image: CorruptImage naming the fault, no domain, child or fd left."""
    path, _ = _compressed_image(sim_dir, tmp_path)
    before_fds = open_fds()
    for name, (bad, why) in _bad_images(path, tmp_path).items():
        op = pyxl.restore(str(bad), backend=SimBackend(sim_dir))
        with pytest.raises(CorruptImage, match=why):
            pyxl.wait(op)
        assert domids(sim_dir) == [], name
        assert children() == [] and open_fds() == before_fds, name


def test_cli_restore_and_inspect_of_bad_images(sim_dir, tmp_path):
    """`pyxl restore` exits 1 with one line; `pyxl inspect` refuses (exit 1) and says why."""
    path, _ = _compressed_image(sim_dir, tmp_path)
    env = dict(os.environ, PYXL_SIM_DIR=sim_dir)
    r = subprocess.run(PYXL + ["inspect", str(path)], capture_output=True, text=True)
    assert r.returncode == 0 and "zstd-compressed pyxl image" in r.stdout
    assert "checksum OK" in r.stdout and "zstd -d" in r.stdout
    for name, (bad, why) in _bad_images(path, tmp_path).items():
        r = subprocess.run(PYXL + ["restore", str(bad)], capture_output=True, text=True, env=env)
        assert r.returncode == 1 and len(r.stderr.splitlines()) == 1, (name, r.stderr)
        assert "pyxl: error:" in r.stderr
        if name != "after-END":     # inspect reads the stream, not past END
            r = subprocess.run(PYXL + ["inspect", str(bad)], capture_output=True, text=True)
            assert r.returncode == 1, (name, r.stdout)
    assert domids(sim_dir) == []


def test_compressed_image_on_a_pipe_is_refused_with_the_fix(sim_dir, tmp_path):
    path, _ = _compressed_image(sim_dir, tmp_path)
    r, w = os.pipe()
    with open(path, "rb") as f:
        os.write(w, f.read(65536))
    os.close(w)
    op = pyxl.restore(r, backend=SimBackend(sim_dir))
    with pytest.raises(StartupError, match=r"zstd-compressed image.*zstd -d"):
        pyxl.wait(op)
    os.close(r)
    assert isinstance(op.exception().__cause__, CompressedImage) or \
        "zstd-compressed" in str(op.exception())
    assert domids(sim_dir) == []


def test_compressed_save_to_an_fd(sim_dir, tmp_path):
    """An fd target (the caller's) gets the compressed stream; restorable from a file."""
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir, content="text")
    want = sim.digest(dom, sim_dir=sim_dir)
    path = tmp_path / "fd.zsave"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        res = _save(sim_dir, dom, fd, compress=True, leave="paused")
    finally:
        os.close(fd)
    assert res.bytes_written is None and res.compressed
    sim.destroy(dom, sim_dir=sim_dir)
    back = pyxl.wait(pyxl.restore(str(path), backend=SimBackend(sim_dir), paused=True))[0]
    assert sim.digest(back.domid, sim_dir=sim_dir) == want


def test_compressor_killed_mid_save_fails_the_save(sim_dir, tmp_path):
    """The zstd child dies while the helper writes: the save fails with that
    reason, the guest runs again, no file and no child is left."""
    before_fds = open_fds()
    dom = sim.create(256 << 20, name="g", sim_dir=sim_dir, dirty_rate=20_000_000,
                     content="random")
    loop = SelectorLoop()
    op = pyxl.save(dom, str(tmp_path / "g.zsave"), backend=SimBackend(sim_dir), loop=loop,
                   live=True, compress=True)
    loop.run_until(lambda: op._zstd is not None or op.done(), 30)
    stage = op._zstd
    assert stage is not None
    loop.call_later(0.05, lambda: stage.child.kill())
    assert loop.run_until(op.done, 120)
    with pytest.raises(OperationError, match=r"compressing the save stream failed"):
        op.result()
    loop.close()
    assert sim.info(dom, sim_dir=sim_dir).state == "running"
    assert os.listdir(tmp_path) == []
    assert children() == [] and open_fds() == before_fds


def test_cli_save_compress(sim_dir, tmp_path):
    env = dict(os.environ, PYXL_SIM_DIR=sim_dir)
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir, content="typical")
    want = sim.digest(dom, sim_dir=sim_dir)
    path = tmp_path / "g.zsave"
    r = subprocess.run(PYXL + ["save", "--compress", "--json", "g", str(path)],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert '"compressed": true' in r.stdout
    r = subprocess.run(PYXL + ["restore", "-p", str(path)], capture_output=True, text=True,
                       env=env)
    assert r.returncode == 0, r.stderr
    assert sim.digest(int(r.stdout.split()[0]), sim_dir=sim_dir) == want


def _plain_image(sim_dir, tmp_path):
    dom = sim.create(16 << 20, name="g", sim_dir=sim_dir)
    path = tmp_path / "g.save"
    _save(sim_dir, dom, path)
    return path


def _page_data_offsets(path):
    r = subprocess.run(PYXL + ["inspect", "--json", "--all-records", str(path)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    import json
    return [rec["offset"] for rec in json.loads(r.stdout)["records"]
            if rec["name"] == "PAGE_DATA"]


@pytest.mark.parametrize("damage", ["reserved", "pfn-bits", "after-END"])
def test_inspect_verify_finds_a_corrupted_record_by_offset(sim_dir, tmp_path, damage):
    """A bit that libxc would ignore (PAGE_DATA's reserved field, pfn bits
    52-59) or bytes after END: plain inspect passes with a warning,
    --verify refuses and names the record's offset."""
    path = _plain_image(sim_dir, tmp_path)
    data = bytearray(path.read_bytes())
    offset = _page_data_offsets(path)[2]
    if damage == "reserved":
        data[offset + 8 + 4] ^= 0x01             # record header, count, then reserved
    elif damage == "pfn-bits":
        data[offset + 8 + 8 + 6] ^= 0x20         # the first pfn word's bit 53
    else:
        offset = len(data)
        data += b"\0" * 64
    bad = tmp_path / "bad.save"
    bad.write_bytes(bytes(data))
    r = subprocess.run(PYXL + ["inspect", str(bad)], capture_output=True, text=True)
    assert r.returncode == 0 and "warning:" in r.stdout
    r = subprocess.run(PYXL + ["inspect", "--verify", str(bad)], capture_output=True, text=True)
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1 and f"at {offset:#x}:" in r.stderr, r.stderr
    r = subprocess.run(PYXL + ["inspect", "--verify", str(path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_inspect_verify_checks_a_compressed_image(sim_dir, tmp_path):
    path, _ = _compressed_image(sim_dir, tmp_path)
    r = subprocess.run(PYXL + ["inspect", "--verify", "--json", str(path)], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    import json
    out = json.loads(r.stdout)
    assert out["compressed"] == {"format": "zstd", "bytes": path.stat().st_size,
                                 "checksum": "OK"}


def test_decompressor_memory_is_bounded_whatever_the_ratio(tmp_path):
    """A frame of 1 GiB of zeros is 33 KB (RLE blocks): the decompressor
    hands zstd whole blocks, at most 1 MiB of output per call, so its
    memory stays small while it streams the GiB out."""
    from pyxl.zstdstage import stage_argv
    bomb = tmp_path / "bomb.zst"
    c = zstandard.ZstdCompressor(level=-1, write_checksum=True).compressobj()
    zeros = bytes(1 << 20)    # fed a MiB at a time: this process stays small (the child's
    bomb.write_bytes(b"".join(c.compress(zeros) for _ in range(1024)) + c.flush())  # fork)
    assert bomb.stat().st_size < 100_000
    # Measured from a small parent: a child's peak RSS counts its parent's
    # pages from before its exec, and pytest's are many.
    probe = ("import os, resource, subprocess, sys\n"
             "p = subprocess.Popen(sys.argv[1:], stdin=open(os.environ['BOMB'], 'rb'),\n"
             "                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)\n"
             "n = sum(len(b) for b in iter(lambda: p.stdout.read(1 << 20), b''))\n"
             "print(p.wait(), n, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    r = subprocess.run([sys.executable, "-c", probe] + stage_argv("decompress-file"),
                       capture_output=True, text=True, env=dict(os.environ, BOMB=str(bomb)))
    status, n, maxrss_kib = map(int, r.stdout.split())
    assert status == 0 and n == 1 << 30
    assert maxrss_kib < 100 << 10          # under 100 MiB while it streams the GiB out


def test_bad_block_header_is_refused_by_offset(tmp_path):
    from pyxl.zstdstage import stage_argv
    frame = bytearray(zstandard.ZstdCompressor(level=1, write_checksum=True)
                      .compress(b"pyxl" * 10000))
    head = zstandard.frame_header_size(bytes(frame))     # the first block header is here
    frame[head] |= 0x06                          # block type 3: reserved
    bad = tmp_path / "bad.zst"
    bad.write_bytes(bytes(frame))
    with open(bad, "rb") as f:
        r = subprocess.run(stage_argv("decompress-file"), stdin=f, capture_output=True)
    assert r.returncode == 1
    assert r.stderr.decode().strip().endswith(f"a bad block header at offset {head}")


def test_compress_options_are_checked():
    from pyxl.ops.operation import STREAM_REMUS
    with pytest.raises(ValueError, match="not a checkpointed one"):
        pyxl.SaveOptions(compress=True, stream_type=STREAM_REMUS, live=True)
    with pytest.raises(ValueError, match="zstd level from -7 to 19"):
        pyxl.SaveOptions(compress=True, compress_level=42)
    with pytest.raises(ValueError, match="a compressed stream is a plain one"):
        pyxl.RestoreOptions(compressed=True, stream_type=STREAM_REMUS)
