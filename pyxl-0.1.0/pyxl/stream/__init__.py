"""The save-stream codecs, without I/O.  This package owns the three formats
nested in a saved or migrating domain's byte stream -- the xl save-file header
(``xl``), the libxl v2 stream (``libxl``, walked by ``libxl_scan``) and the
libxc v2/v3 stream inside it (``libxc``, walked by ``libxc_scan``) -- the
record framing the two inner ones share and the ``Source`` that scanners read
through (``framing``), and the whole-stream scan (``scan``) with the inspection
report it fills (``report``, shown by ``pyxl inspect``).  Its modules check and
produce bytes and read only from a file object handed to a ``Source``; outside the
package they may import only ``pyxl.errors`` and no I/O module of the standard
library.  File descriptors, paths and file sizes are ``pyxl.streamio``'s.
"""

from pyxl.stream.framing import (REC_HEADER, Source, StreamError, TruncatedStream,
                                 UnsupportedStream, frame_record, pad_len, roundup8)
from pyxl.stream.libxc import DomainHeader, ImageHeader, LibxcRecordType, PageType
from pyxl.stream.libxc_scan import LibxcScanner
from pyxl.stream.libxl import LibxlHeader, LibxlRecord, LibxlRecordType
from pyxl.stream.libxl_scan import LibxlScanner
from pyxl.stream.report import PageStats, RecordInfo, Scanner, StreamReport
from pyxl.stream.scan import detect_layer, scan_source
from pyxl.stream.xl import XlHeader

__all__ = [
    "REC_HEADER", "Source", "StreamError", "TruncatedStream", "UnsupportedStream",
    "frame_record", "pad_len", "roundup8",
    "DomainHeader", "ImageHeader", "LibxcRecordType", "PageType", "LibxcScanner",
    "LibxlHeader", "LibxlRecord", "LibxlRecordType", "LibxlScanner",
    "PageStats", "RecordInfo", "Scanner", "StreamReport",
    "detect_layer", "scan_source", "XlHeader",
]
