"""Stream builders shared by the stream/inspect tests (a helper module, no tests of its own;
imported by tests/unit and tests/integration -- pytest's ``pythonpath`` puts tests/ on sys.path).

Streams are built as lists of *chunks* -- one per header or record -- so
tests can drop, duplicate, reorder or corrupt individual records and know
every record boundary.
"""

from __future__ import annotations

import io
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import threading
from typing import Any, Dict, List, Optional, Sequence, Tuple

from pyxl.stream import libxc as xc
from pyxl.stream import libxl as xl2
from pyxl.stream import xl as xl1
from pyxl.stream.report import StreamReport
from pyxl.streamio import scan_stream
from pyxl.stream.libxc import LibxcRecordType as T

from conftest import HELPER_VECTORS as HELPER  # noqa: F401  (re-exported to the stream tests)
from conftest import STREAM_VECTORS as STREAMS  # noqa: F401
from conftest import VERIFY_STREAM as VERIFIER
from conftest import XEN_PYTHONPATH as VERIFIER_PYTHONPATH

PAGE = 4096
HVM_CONFIG: Dict[str, Any] = {
    "c_info": {"type": "hvm", "name": "test-hvm", "uuid": "5e2a0c61-6a1e-4c33-9d4b-3f0a1b2c3d4e"},
    "b_info": {"max_vcpus": 2, "max_memkb": 32768, "target_memkb": 32768, "type.hvm": {}},
}
PV_CONFIG: Dict[str, Any] = {
    "c_info": {"type": "pv", "name": "test-pv", "uuid": "5e2a0c61-6a1e-4c33-9d4b-3f0a1b2c3d4e"},
    "b_info": {"max_vcpus": 2, "max_memkb": 32768, "target_memkb": 32768, "type.pv": {}},
}
CPUID = bytes(48)  # 2 leaves
MSR = bytes(32)  # 2 entries


def page(n: int) -> bytes:
    return bytes([n & 0xFF]) * PAGE


def hvm_chunks(version: int = 3, *, holes: Sequence[int] = (10, 11),
               npages: int = 16, hvm_context: bytes = bytes(range(40))) -> List[bytes]:
    """A small valid HVM libxc stream, the way the 4.17 saver orders it."""
    out = [xc.image_header(version) + xc.domain_header(xc.DHDR_TYPE_X86_HVM)]
    if version >= 3:
        out += [xc.libxc_record(T.X86_CPUID_POLICY, CPUID),
                xc.libxc_record(T.X86_MSR_POLICY, MSR),
                xc.libxc_record(T.STATIC_DATA_END)]
    entries = [(p, xc.PageType.XTAB if p in holes else xc.PageType.NOTAB)
               for p in range(npages)]
    first, second = entries[:8], entries[8:]
    for batch in (first, second):
        if batch:
            out.append(xc.page_data(batch, [page(p) for p, t in batch
                                            if t == xc.PageType.NOTAB]))
    out += [xc.tsc_info(0, 2400000, 123456789, 0),
            xc.libxc_record(T.HVM_CONTEXT, hvm_context),
            xc.hvm_params({1: 0xF, 5: 0xD, 6: 0xC, 17: 0xE}),
            xc.end_record()]
    return out


def pv_chunks(version: int = 3, *, width: int = 8) -> List[bytes]:
    """A small valid 64-bit (or 32-bit) PV libxc stream: 9 pfns, pfn 8 XTAB."""
    levels = 4 if width == 8 else 3
    out = [xc.image_header(version) + xc.domain_header(xc.DHDR_TYPE_X86_PV),
           xc.pv_info(width, levels)]
    if version >= 3:
        out += [xc.libxc_record(T.X86_CPUID_POLICY, CPUID),
                xc.libxc_record(T.X86_MSR_POLICY, MSR),
                xc.libxc_record(T.STATIC_DATA_END)]
    out.append(xc.p2m_frames(0, 8, [7]))
    P = xc.PageType
    batch = [(0, P.NOTAB), (1, P.L4TAB_PINNED), (2, P.L3TAB), (3, P.L2TAB), (4, P.L1TAB),
             (5, P.NOTAB), (6, P.NOTAB), (7, P.NOTAB)]
    out.append(xc.page_data(batch, [page(p) for p, _ in batch]))
    out.append(xc.page_data([(8, P.XTAB)], b""))
    out += [xc.tsc_info(0, 2400000, 123456789, 0),
            xc.libxc_record(T.SHARED_INFO, bytes(PAGE)),
            xc.vcpu_record(T.X86_PV_VCPU_BASIC, 0, bytes(xc.VCPU_CONTEXT_SIZE[width])),
            xc.end_record()]
    return out


def libxl_chunks(libxc: List[bytes], *, emulator_context: Optional[bytes] = None,
                 xenstore: Optional[Dict[str, str]] = None) -> List[bytes]:
    out = [xl2.libxl_header(), xl2.libxc_context_record()] + libxc
    if xenstore:
        out.append(xl2.emulator_xenstore_record(xenstore))
    if emulator_context is not None:
        out.append(xl2.emulator_context_record(emulator_context))
    out.append(xl2.end_record())
    return out


def xl_chunks(config: Any, libxl: List[bytes]) -> List[bytes]:
    return [xl1.xl_header(config)] + libxl


def hvm_stream(layer: str = "xl", **kw: Any) -> List[bytes]:
    libxc = hvm_chunks(**kw)
    if layer == "libxc":
        return libxc
    libxl = libxl_chunks(libxc, emulator_context=b"QEVM" + bytes(60))
    return libxl if layer == "libxl" else xl_chunks(HVM_CONFIG, libxl)


def pv_stream(layer: str = "xl", **kw: Any) -> List[bytes]:
    libxc = pv_chunks(**kw)
    if layer == "libxc":
        return libxc
    libxl = libxl_chunks(libxc)
    return libxl if layer == "libxl" else xl_chunks(PV_CONFIG, libxl)


def boundaries(chunks: Sequence[bytes]) -> List[int]:
    """Offsets where each chunk starts, plus the total length."""
    out = [0]
    for c in chunks:
        out.append(out[-1] + len(c))
    return out


def scan(data: bytes, **kw: Any) -> StreamReport:
    return scan_stream(io.BytesIO(data), **kw)


def scan_pipe(data: bytes, **kw: Any) -> StreamReport:
    """Scan ``data`` through a real pipe (unsized, unseekable source)."""
    r, w = os.pipe()

    def feed() -> None:
        try:
            view = memoryview(data)
            while view:
                n = os.write(w, view[:65536])
                view = view[n:]
        except BrokenPipeError:
            pass
        finally:
            os.close(w)

    t = threading.Thread(target=feed, daemon=True)
    t.start()
    try:
        with open(r, "rb", buffering=0) as f:
            return scan_stream(f, **kw)
    finally:
        t.join(timeout=10)


def set_u32(data: bytes, offset: int, value: int) -> bytes:
    return data[:offset] + struct.pack("<I", value) + data[offset + 4:]


def rec(rtype: int, body: bytes = b"") -> bytes:
    return xc.libxc_record(rtype, body)


def _python3() -> str:
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else (
        shutil.which("python3") or sys.executable)


def verifier_available() -> bool:
    return os.path.exists(VERIFIER)


def run_verifier(path: pathlib.Path, fmt: str) -> Tuple[int, str]:
    """Debian's verify-stream-v2 (needs PYTHONPATH; see the verifier notes)."""
    env = dict(os.environ, PYTHONPATH=VERIFIER_PYTHONPATH)
    proc = subprocess.run([_python3(), VERIFIER, "-f", fmt, "-i", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr
