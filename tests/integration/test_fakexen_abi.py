"""libfakexen.so's hypercall ABI, called directly through ctypes (no libxc in between):
the corner cases the reference (fakexen-hypercalls.md) pins down."""

import ctypes
import errno
import mmap
import os
import struct
import time

import pytest

from conftest import private_sim_dir
from pyxl import sim

MiB = 1 << 20
#: fakexen simulates the Xen of the libxenctrl loaded in its process (none: 4.17)
DOMCTL_VERSION = {17: 0x15, 20: 0x17}
HC_MEMORY_OP, HC_MULTICALL, HC_XEN_VERSION, HC_HVM_OP, HC_SYSCTL, HC_DOMCTL = 12, 13, 17, 34, 35, 36
XTAB = 0xF0000000

pytestmark = pytest.mark.skipif(not os.path.exists(sim.libfakexen_path()),
                                reason="libfakexen.so not built")


class Fake:
    """libfakexen loaded into this process, pointed at one state directory."""

    def __init__(self, sim_dir):
        self.lib = ctypes.CDLL(sim.libfakexen_path(), use_errno=True)
        L = self.lib
        L.xencall_open.restype = ctypes.c_void_p
        L.xencall_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        for n in (1, 2):
            f = getattr(L, f"xencall{n}")
            f.restype = ctypes.c_int
            f.argtypes = [ctypes.c_void_p, ctypes.c_uint] + [ctypes.c_uint64] * n
        L.xenforeignmemory_open.restype = ctypes.c_void_p
        L.xenforeignmemory_open.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        L.xenforeignmemory_map.restype = ctypes.c_void_p
        L.xenforeignmemory_map.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                           ctypes.c_size_t, ctypes.POINTER(ctypes.c_uint64),
                                           ctypes.POINTER(ctypes.c_int)]
        L.xenforeignmemory_unmap.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t]
        L.xenforeignmemory_map_resource.restype = ctypes.c_void_p
        L.xenforeignmemory_map_resource.argtypes = [
            ctypes.c_void_p, ctypes.c_uint16, ctypes.c_uint, ctypes.c_uint, ctypes.c_ulong,
            ctypes.c_ulong, ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, ctypes.c_int]
        L.xenforeignmemory_unmap_resource.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        L.xencall_buffers_never_fault.argtypes = [ctypes.c_void_p]
        os.environ["PYXL_SIM_DIR"] = sim_dir
        try:
            L.pyxl_fakexen_reset()
            self.xc = L.xencall_open(None, 0)
            self.fm = L.xenforeignmemory_open(None, 0)
            L.pyxl_fakexen_release.restype = ctypes.c_uint
            self.release = L.pyxl_fakexen_release()
        finally:
            del os.environ["PYXL_SIM_DIR"]
        assert self.release in DOMCTL_VERSION

    def call(self, op, a1, a2=0):
        ctypes.set_errno(0)
        rc = self.lib.xencall2(self.xc, op, a1, a2)
        return rc, ctypes.get_errno() if rc < 0 else 0

    def domctl(self, cmd, domid, payload=b"", version=None):
        if version is None:
            version = DOMCTL_VERSION[self.release]
        buf = ctypes.create_string_buffer(144)
        struct.pack_into("<IIH", buf, 0, cmd, version, domid)
        buf[16:16 + len(payload)] = payload
        rc, err = self.call(HC_DOMCTL, ctypes.addressof(buf))
        return rc, err, buf

    def memory_op(self, cmd, arg_addr):
        entry = ctypes.create_string_buffer(64)
        struct.pack_into("<QQQQ", entry, 0, HC_MEMORY_OP, 0, cmd, arg_addr)
        rc, err = self.call(HC_MULTICALL, ctypes.addressof(entry), 1)
        assert (rc, err) == (0, 0)
        (res,) = struct.unpack_from("<q", entry, 8)
        return res

    def map(self, domid, prot, gfns, with_err=True):
        arr = (ctypes.c_uint64 * len(gfns))(*gfns)
        errs = (ctypes.c_int * len(gfns))() if with_err else None
        ctypes.set_errno(0)
        addr = self.lib.xenforeignmemory_map(self.fm, domid, prot, len(gfns), arr, errs)
        return addr, (list(errs) if errs is not None else None), ctypes.get_errno()


@pytest.fixture(scope="module")
def fxdir():
    with private_sim_dir(prefix="pyxl-fx-abi-") as d:
        yield d


@pytest.fixture(scope="module")
def fake(fxdir):
    return Fake(fxdir)


@pytest.fixture(scope="module")
def guest(fxdir):
    return sim.create(4 * MiB, sim_dir=fxdir, paused=True)


def test_xen_version_and_never_fault(fake):
    assert fake.call(HC_XEN_VERSION, 0) == (0x00040000 | fake.release, 0)
    assert fake.lib.xencall_buffers_never_fault(fake.xc) == 1


def test_interface_version_mismatch_is_eacces(fake, guest):
    rc, err, _ = fake.domctl(5, guest, version=0x14)
    assert (rc, err) == (-1, errno.EACCES)
    buf = ctypes.create_string_buffer(136)
    struct.pack_into("<II", buf, 0, 29, 0x13)
    assert fake.call(HC_SYSCTL, ctypes.addressof(buf)) == (-1, errno.EACCES)
    struct.pack_into("<II", buf, 0, 29, 0x15)
    assert fake.call(HC_SYSCTL, ctypes.addressof(buf)) == (0, 0)
    assert struct.unpack_from("<II", buf, 12) == (120, 2)    # nr_leaves, nr_msrs


def test_getdomaininfo(fake, fxdir, guest):
    rc, err, buf = fake.domctl(5, guest)
    assert (rc, err) == (0, 0)
    dom, flags, tot, maxp = struct.unpack_from("<HxxIQQ", buf, 16)
    assert struct.unpack_from("<H", buf, 8)[0] == guest == dom
    assert flags & 0x2 and flags & 0x8 and not flags & 0x4       # hvm, paused, not shutdown
    assert tot == 1024 + 16 and maxp == 1024 + 256
    sim.suspend(guest, fxdir)
    _, _, buf = fake.domctl(5, guest)
    (flags,) = struct.unpack_from("<I", buf, 20)
    assert flags & 0x4 and flags & 0x8 and (flags >> 16) & 0xFF == 2   # shutdown, suspend
    sim.resume(guest, fxdir)
    sim.pause(guest, fxdir)
    rc, err, buf = fake.domctl(5, 0)
    if fake.release == 17:
        # Xen 4.17 answers with the first domain whose id is >= the one asked for
        assert rc == 0 and struct.unpack_from("<H", buf, 8)[0] == guest
    else:
        # 4.18 and later: that domain or ESRCH
        assert (rc, err) == (-1, errno.ESRCH)
    assert fake.domctl(5, guest + 1000)[:2] == (-1, errno.ESRCH)


def test_getpageframeinfo3(fake, guest):
    gfns = [0, 0x9F, 0xA0, 0xBF, 0xC0, 0xFEFFC, 0xFF000, 1 << 40]
    arr = (ctypes.c_uint64 * len(gfns))(*gfns)
    rc, err, buf = fake.domctl(61, guest, struct.pack("<QQ", len(gfns), ctypes.addressof(arr)))
    assert (rc, err) == (0, 0)
    assert list(arr) == [0, 0, XTAB, XTAB, 0, 0, XTAB, XTAB]
    big = (ctypes.c_uint64 * 1025)()
    rc, err, _ = fake.domctl(61, guest, struct.pack("<QQ", 1025, ctypes.addressof(big)))
    assert (rc, err) == (-1, errno.E2BIG)


def shadow(fake, domid, op, mode=0, bitmap=None, pages=0):
    payload = struct.pack("<IIIxxxxQQ", op, mode, 0,
                          ctypes.addressof(bitmap) if bitmap is not None else 0, pages)
    rc, err, buf = fake.domctl(10, domid, payload)
    dirty_count = struct.unpack_from("<I", buf, 16 + 36)[0]
    pages_out = struct.unpack_from("<Q", buf, 16 + 24)[0]
    return rc, err, dirty_count, pages_out


def test_shadow_logdirty(fake, fxdir):
    dom = sim.create(4 * MiB, sim_dir=fxdir, dirty_rate=16 * MiB)
    try:
        assert shadow(fake, dom, 2)[:2] == (0, 0)                     # ENABLE_LOGDIRTY
        assert shadow(fake, dom, 2)[:2] == (-1, errno.EINVAL)         # already on
        time.sleep(0.05)
        pages = 1001                                                  # not a multiple of 8
        bm = ctypes.create_string_buffer(b"\xAA" * 200)
        rc, err, count, pages_out = shadow(fake, dom, 11, 0, bm, pages)
        assert (rc, err, pages_out) == (0, 0, pages)                  # pages left unchanged
        raw = bm.raw
        assert raw[126:200] == b"\xAA" * 74                           # exactly ceil(1001/8) bytes
        bits = int.from_bytes(raw[:126], "little") & ((1 << pages) - 1)
        assert raw[125] & ~1 == 0                                     # bits >= 1001 cleared
        assert count == bin(bits).count("1") > 0                      # dirty_count = bits returned
        assert bits & 1                                               # the guest's state page
        assert shadow(fake, dom, 11, 2, bm, pages)[:2] == (-1, errno.EINVAL)   # bad mode
        sim.pause(dom, fxdir)
        shadow(fake, dom, 11, 1, bm, pages)                           # FINAL, drains
        rc, _, count, _ = shadow(fake, dom, 12, 0, bm, pages)         # PEEK after stop
        assert rc == 0 and count == 0 and bm.raw[:125] == bytes(125)
        assert shadow(fake, dom, 0)[:2] == (0, 0)                     # OFF
        assert shadow(fake, dom, 0)[:2] == (0, 0)                     # OFF again is fine
    finally:
        sim.destroy(dom, fxdir)


def test_map_is_a_shared_contiguous_view(fake, fxdir, guest):
    addr, errs, _ = fake.map(guest, mmap.PROT_READ, [0x9F, 0xC0, 0xC1])
    assert addr and errs == [0, 0, 0]
    heads = [struct.unpack_from("<QQ", ctypes.string_at(addr + i * 4096, 16)) for i in range(3)]
    assert [pfn for _, pfn in heads] == [0x9F, 0xC0, 0xC1]
    assert fake.lib.xenforeignmemory_unmap(fake.fm, addr, 3) == 0
    # a hole inside the batch: that page fails, the others map
    addr, errs, _ = fake.map(guest, mmap.PROT_READ, [0x9E, 0xA0, 0x9F])
    assert addr and errs == [0, -errno.ENOENT, 0]
    assert struct.unpack_from("<Q", ctypes.string_at(addr + 2 * 4096 + 8, 8))[0] == 0x9F
    fake.lib.xenforeignmemory_unmap(fake.fm, addr, 3)
    # without an err array any failure fails the call
    addr, errs, e = fake.map(guest, mmap.PROT_READ, [0x9F, 0xA0], with_err=False)
    assert not addr and e == errno.ENOENT
    # writes land in guest memory even when released by plain munmap (xc_clear_domain_page)
    addr, _, _ = fake.map(guest, mmap.PROT_WRITE, [0xFEFFA], with_err=False)
    ctypes.memmove(addr, b"\x5A" * 4096, 4096)
    libc = ctypes.CDLL(None)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    assert libc.munmap(addr, 4096) == 0
    with open(os.path.join(fxdir, f"d{guest}", "mem"), "rb") as f:
        assert os.pread(f.fileno(), 4096, 0xFEFFA * 4096) == b"\x5A" * 4096
        f.seek(0)


def _perms(addr):
    """The permissions of the mapping holding addr in this process, e.g. 'r--p'."""
    with open("/proc/self/maps") as f:
        for line in f:
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            if lo <= addr < hi:
                return line.split()[1]
    return None


def _pfn_at(addr, i=0):
    """The pfn a simulated guest page carries at offset 8 (sim's page pattern)."""
    return struct.unpack_from("<Q", ctypes.string_at(addr + i * 4096 + 8, 8))[0]


def test_read_only_map_is_a_read_only_copy_in_a_reused_buffer(fake, fxdir, guest):
    """PYXL_SIM_ROCOPY=1 (default): a PROT_READ map copies the pages at map time."""
    mem = os.path.join(fxdir, f"d{guest}", "mem")
    fd = os.open(mem, os.O_RDWR)
    saved = os.pread(fd, 8, 0xC0 * 4096)
    try:
        addr, errs, _ = fake.map(guest, mmap.PROT_READ, [0x9F, 0xC0, 0xC1])
        assert addr and errs == [0, 0, 0]
        assert [_pfn_at(addr, i) for i in range(3)] == [0x9F, 0xC0, 0xC1]
        assert _perms(addr).startswith("r--")        # a store through it faults, as in Xen
        # a store to guest memory after the map is not seen through the copy ...
        os.pwrite(fd, b"\xA5" * 8, 0xC0 * 4096)
        assert ctypes.string_at(addr + 4096, 8) == saved
        assert fake.lib.xenforeignmemory_unmap(fake.fm, addr, 3) == 0
        # ... and is in the next one, made in the same (reused) buffer
        addr2, errs, _ = fake.map(guest, mmap.PROT_READ, [0xC0])
        assert addr2 == addr and errs == [0]
        assert ctypes.string_at(addr2, 8) == b"\xA5" * 8
        assert fake.lib.xenforeignmemory_unmap(fake.fm, addr2, 1) == 0
    finally:
        os.pwrite(fd, saved, 0xC0 * 4096)
        os.close(fd)


def test_read_only_copies_outstanding_at_once_and_plain_munmap(fake, guest):
    libc = ctypes.CDLL(None, use_errno=True)
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    # more at once than the pool keeps: each its own buffer, each right
    maps = [fake.map(guest, mmap.PROT_READ, [0xC0 + i, 0xC8 + i])[0] for i in range(7)]
    assert all(maps) and len(set(maps)) == 7
    for i, a in enumerate(maps):
        assert (_pfn_at(a, 0), _pfn_at(a, 1)) == (0xC0 + i, 0xC8 + i)
    for a in maps:
        assert fake.lib.xenforeignmemory_unmap(fake.fm, a, 2) == 0
    # a copy released by plain munmap is never written again behind the caller's back,
    # even when the kernel hands its address to a new mapping
    for _ in range(6):
        a, _, _ = fake.map(guest, mmap.PROT_READ, [0xC2])
        assert _pfn_at(a) == 0xC2
        assert libc.munmap(a, 4096) == 0
    view, _, _ = fake.map(guest, mmap.PROT_READ | mmap.PROT_WRITE, [0xC3])
    before = ctypes.string_at(view, 4096)
    for pfn in (0xC4, 0xC5):
        a, _, _ = fake.map(guest, mmap.PROT_READ, [pfn])
        assert _pfn_at(a) == pfn and a != view
        fake.lib.xenforeignmemory_unmap(fake.fm, a, 1)
    assert ctypes.string_at(view, 4096) == before and _pfn_at(view) == 0xC3
    fake.lib.xenforeignmemory_unmap(fake.fm, view, 1)


def test_rocopy_0_read_only_map_is_a_shared_view(fxdir, guest):
    os.environ["PYXL_SIM_ROCOPY"] = "0"
    try:
        f0 = Fake(fxdir)
    finally:
        del os.environ["PYXL_SIM_ROCOPY"]
    mem = os.path.join(fxdir, f"d{guest}", "mem")
    fd = os.open(mem, os.O_RDWR)
    saved = os.pread(fd, 8, 0xC0 * 4096)
    try:
        addr, errs, _ = f0.map(guest, mmap.PROT_READ, [0xC0])
        assert addr and errs == [0]
        os.pwrite(fd, b"\x5A" * 8, 0xC0 * 4096)
        assert ctypes.string_at(addr, 8) == b"\x5A" * 8     # a live view
        assert f0.lib.xenforeignmemory_unmap(f0.fm, addr, 1) == 0
    finally:
        os.pwrite(fd, saved, 0xC0 * 4096)
        os.close(fd)
        Fake(fxdir)                                       # the defaults again


def test_populate_physmap_and_maximum_gpfn(fake, fxdir):
    dom = sim.create_empty(64, sim_dir=fxdir)            # 16 pages + 256 slack
    domid_buf = ctypes.c_uint16(dom)
    assert fake.memory_op(14, ctypes.addressof(domid_buf)) == 0
    gfns = (ctypes.c_uint64 * 10)(*range(100, 110))
    res = struct.pack("<QQIIH", ctypes.addressof(gfns), 10, 0, 0, dom)
    rbuf = ctypes.create_string_buffer(res, 32)
    assert fake.memory_op(6, ctypes.addressof(rbuf)) == 10
    assert list(gfns) == list(range(100, 110))           # left untouched (translated guest)
    assert fake.memory_op(14, ctypes.addressof(domid_buf)) == 109
    assert sim.populated_runs(dom, fxdir) == [(100, 10)]
    assert sim.info(dom, fxdir).tot_pages == 10
    # over max_pages (16 + 256): a short count, as Xen's partial success
    many = (ctypes.c_uint64 * 300)(*range(1000, 1300))
    rbuf = ctypes.create_string_buffer(struct.pack("<QQIIH", ctypes.addressof(many), 300, 0, 0,
                                                   dom), 32)
    assert fake.memory_op(6, ctypes.addressof(rbuf)) == 0
    # populated pages are zero and mappable
    addr, errs, _ = fake.map(dom, mmap.PROT_READ, list(range(100, 110)))
    assert errs == [0] * 10 and ctypes.string_at(addr, 40960) == bytes(40960)
    fake.lib.xenforeignmemory_unmap(fake.fm, addr, 10)
    sim.destroy(dom, fxdir)


def test_hvm_context(fake, fxdir, guest):
    blob = sim.hvm_context(guest, fxdir)
    rc, err, buf = fake.domctl(33, guest, struct.pack("<IxxxxQ", 0, 0))
    assert (rc, err) == (0, 0) and struct.unpack_from("<I", buf, 16)[0] == len(blob)
    small = ctypes.create_string_buffer(len(blob) - 1)
    rc, err, _ = fake.domctl(33, guest, struct.pack("<IxxxxQ", len(small), ctypes.addressof(small)))
    assert (rc, err) == (-1, errno.ENOSPC)
    out = ctypes.create_string_buffer(len(blob) + 100)
    rc, err, buf = fake.domctl(33, guest, struct.pack("<IxxxxQ", len(out), ctypes.addressof(out)))
    assert rc == 0 and struct.unpack_from("<I", buf, 16)[0] == len(blob)
    assert out.raw[:len(blob)] == blob
    dom = sim.create_empty(64, sim_dir=fxdir)
    assert fake.domctl(34, dom, struct.pack("<IxxxxQ", 0, 0))[:2] == (-1, errno.EINVAL)
    junk = ctypes.create_string_buffer(b"\x07" * 64)
    assert fake.domctl(34, dom, struct.pack("<IxxxxQ", 64, ctypes.addressof(junk)))[:2] == \
        (-1, errno.EINVAL)                               # bad framing, as Xen's hvm_load
    good = ctypes.create_string_buffer(blob)
    assert fake.domctl(34, dom, struct.pack("<IxxxxQ", len(blob), ctypes.addressof(good)))[:2] \
        == (0, 0)
    assert sim.hvm_context(dom, fxdir) == blob
    sim.destroy(dom, fxdir)


def test_hvm_params(fake, guest):
    p = ctypes.create_string_buffer(struct.pack("<HxxIQ", guest, 1, 0), 16)
    assert fake.call(HC_HVM_OP, 1, ctypes.addressof(p)) == (0, 0)
    assert struct.unpack_from("<Q", p, 8)[0] == 0xFEFFC
    bad = ctypes.create_string_buffer(struct.pack("<HxxIQ", guest, 39, 0), 16)
    assert fake.call(HC_HVM_OP, 1, ctypes.addressof(bad)) == (-1, errno.EINVAL)


def test_grant_table_resource(fake, fxdir, guest):
    paddr = ctypes.c_void_p(None)
    res = fake.lib.xenforeignmemory_map_resource(fake.fm, guest, 1, 0, 0, 1,
                                                 ctypes.byref(paddr), 3, 0)
    assert res and paddr.value
    ctypes.memmove(paddr.value, struct.pack("<HHI", 1, 0, 0x1234), 8)
    assert fake.lib.xenforeignmemory_unmap_resource(fake.fm, res) == 0
    assert sim.grant_entries(guest, 1, fxdir) == [(1, 0, 0x1234)]
    ctypes.set_errno(0)
    assert not fake.lib.xenforeignmemory_map_resource(fake.fm, guest, 2, 0, 0, 1,
                                                      ctypes.byref(paddr), 3, 0)
    assert ctypes.get_errno() == errno.EOPNOTSUPP


def test_destroyed_domain_is_esrch(fake, fxdir):
    dom = sim.create(1 * MiB, sim_dir=fxdir, paused=True)
    addr, _, _ = fake.map(dom, mmap.PROT_READ, [0])        # caches the domain
    fake.lib.xenforeignmemory_unmap(fake.fm, addr, 1)
    sim.destroy(dom, fxdir)
    gfns = (ctypes.c_uint64 * 1)(0)
    assert fake.domctl(61, dom, struct.pack("<QQ", 1, ctypes.addressof(gfns)))[:2] == \
        (-1, errno.ESRCH)
    addr, _, e = fake.map(dom, mmap.PROT_READ, [0])
    assert not addr and e == errno.ESRCH
    domid_buf = ctypes.c_uint16(dom)
    assert fake.memory_op(14, ctypes.addressof(domid_buf)) == -errno.ESRCH
