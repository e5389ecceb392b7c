"""The libxl stream scanner: :class:`LibxlScanner` walks a libxl stream,
and the libxc stream inside its LIBXC_CONTEXT record, on a
:class:`~pyxl.stream.framing.Source`, for ``pyxl inspect``.

It applies the rules of :mod:`pyxl.stream.libxl` (Xen's
``docs/specs/libxl-migration-stream.pandoc``, sections "Header" and
"Records") and hands the inline libxc stream to
:class:`~pyxl.stream.libxc_scan.LibxcScanner`.  In a checkpointed stream the
libxc records of each round follow CHECKPOINT_END without a new libxc
header (the libxc spec's "CHECKPOINT").
"""

from __future__ import annotations

from typing import Any, Optional

from pyxl.stream.framing import (REC_HEADER, Source, TruncatedStream, UnsupportedStream,
                                 pad_len, roundup8)
from pyxl.stream.libxc_scan import LibxcScanner
from pyxl.stream.libxl import (EMULATOR_HEADER, LIBXL_HEADER, WHERE_HDR, WHERE_REC,
                               XENSTORE_DATA_MAX, EmulatorId, LibxlRecordType,
                               check_record_order, check_record_type, parse_libxl_header,
                               parse_xenstore_data, record_name)
from pyxl.stream.report import RecordInfo, Scanner, StreamReport

__all__ = ["LibxlScanner", "scan_libxl_on"]


class LibxlScanner(Scanner):
    """Walks a libxl stream, and the libxc stream inside it, on a Source."""

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.libxc: Optional[LibxcScanner] = None
        self.in_checkpoint = False

    @property
    def guest_type(self) -> Optional[int]:
        dhdr = self.report.domain_header
        return dhdr.guest_type if dhdr is not None else self.expected_guest_type

    def run(self) -> None:
        src, rep = self.src, self.report
        rep.checkpointed = self.checkpointed
        off = src.pos
        rep.libxl_header = parse_libxl_header(src.read(LIBXL_HEADER.size, "libxl header",
                                                       WHERE_HDR), off)
        rep.libxl_offset = off
        resume_libxc = False
        while True:
            off = src.pos
            if resume_libxc:
                # After CHECKPOINT_END the next round's libxc records follow
                # (no new libxc header).  EOF here means the sender stopped
                # after a whole checkpoint: the receiver fails over to it.
                if src.at_eof():
                    rep.end_offset = off
                    return
                resume_libxc = False
                self._run_libxc(resume=True)
                continue
            if src.at_eof():
                raise TruncatedStream(off, "stream ends at a record boundary without END "
                                      "(Xen's libxl would read this as END; pyxl refuses)",
                                      WHERE_REC)
            rtype = self._record()
            if rtype == LibxlRecordType.END:
                rep.end_offset = src.pos
                return
            if rtype == LibxlRecordType.CHECKPOINT_END:
                resume_libxc = True

    def _run_libxc(self, *, resume: bool) -> None:
        if not resume:
            self.libxc = LibxcScanner(self.src, self.report, checkpointed=self.checkpointed,
                                      expected_guest_type=self.expected_guest_type,
                                      max_vcpus=self.max_vcpus)
            self.libxc.read_headers()
        assert self.libxc is not None
        if self.libxc.run() == "checkpoint":
            self.in_checkpoint = True

    def _record(self) -> int:
        src, rep = self.src, self.report
        off = src.pos
        rtype: int
        length: int
        rtype, length = REC_HEADER.unpack(src.read(REC_HEADER.size, "libxl record header",
                                                   WHERE_REC))
        check_record_type(rtype, off)
        name = record_name(rtype)
        src.need(roundup8(length), f"{name} body", WHERE_REC, off)
        check_record_order(rtype, length, off, guest_type=self.guest_type,
                           seen_libxc=self.libxc is not None, in_checkpoint=self.in_checkpoint)
        T = LibxlRecordType
        detail = ""
        used = 0
        if rtype in (T.EMULATOR_XENSTORE_DATA, T.EMULATOR_CONTEXT):
            eid, index = EMULATOR_HEADER.unpack(src.read(EMULATOR_HEADER.size,
                                                         f"{name} body", WHERE_REC, off))
            used = EMULATOR_HEADER.size
            try:
                ename = EmulatorId(eid).name
            except ValueError:
                ename = f"emulator {eid}"
                rep.warn(off, f"{name} has unknown emulator_id {eid} (libxl does not check)")
            detail = f"{ename}, index {index}"
            if rtype == T.EMULATOR_XENSTORE_DATA:
                payload_len = length - used
                if payload_len > XENSTORE_DATA_MAX:
                    raise UnsupportedStream(off, f"{name} payload of {payload_len} bytes "
                                            "exceeds pyxl's limit", WHERE_REC)
                pairs = parse_xenstore_data(src.read(payload_len, f"{name} body", WHERE_REC, off),
                                            off)
                used = length
                detail += f", {len(pairs)} keys"
            else:
                detail += f", {length - used} bytes of state"
        elif length and rtype != T.END:
            detail = f"{length}-byte body (ignored by libxl)"
        elif length:
            rep.warn(off, f"END has a {length}-byte body")
        if length - used:
            src.skip(length - used, f"{name} body", WHERE_REC, off)
        pad = pad_len(length)
        if pad and any(src.read(pad, f"{name} padding", WHERE_REC, off)):
            rep.warn(off, f"{name} padding is non-zero (libxl ignores it)")
        rep.add_record(RecordInfo("libxl", rtype, name, off, length, detail))
        if rtype == T.LIBXC_CONTEXT:
            self._run_libxc(resume=False)
        elif rtype == T.CHECKPOINT_END:
            self.in_checkpoint = False
        return rtype


def scan_libxl_on(src: Source, report: StreamReport, *, checkpointed: bool = False,
                  expected_guest_type: Optional[int] = None,
                  max_vcpus: Optional[int] = None) -> None:
    LibxlScanner(src, report, checkpointed=checkpointed,
                 expected_guest_type=expected_guest_type, max_vcpus=max_vcpus).run()
