# _progress.pxi -- an optional bound on the rate of progress frames (included by _helper.pyx).
#
# libxc reports progress after every batch of 1024 pfns, holes included: some
# 1,000 reports for a save of a guest with a 4 GiB pfn space, whatever its
# memory, each a frame libxl's side decodes on its event loop.  Xen's helper
# forwards every one, and so does ours unless the host asks for fewer:
#
#   PYXL_PROGRESS_INTERVAL_MS   0 (or unset/empty): every report, as Xen's
#                               helper.  N (0-60000): a report is sent if it is
#                               the first of its phase (a new doing_what), the
#                               end of one (done == total), or N ms after the
#                               last one sent; the others are dropped.
#
# pyxl's host library sets it (pyxl.ops.operation: 50 ms); libxl never does.
# Uses _getenv and _env_number from _precopy.pxi.

from libc.string cimport strncmp, strncpy
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC

cdef double _progress_every = 0.0    # seconds; 0: every report
cdef double _progress_last = 0.0
cdef bint _progress_sent = False
cdef char _progress_what[128]


cdef bint _progress_due(const char *doing_what, unsigned long done,
                        unsigned long total) noexcept nogil:
    """Whether this report goes out (always, unless an interval was asked for)."""
    global _progress_last, _progress_sent
    cdef timespec ts
    cdef double now
    if _progress_every <= 0.0:
        return True
    clock_gettime(CLOCK_MONOTONIC, &ts)
    now = <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9
    if doing_what == NULL:
        doing_what = b""
    if (_progress_sent and done != total and now - _progress_last < _progress_every
            and strncmp(doing_what, _progress_what, sizeof(_progress_what) - 1) == 0):
        return False
    _progress_sent = True
    _progress_last = now
    strncpy(_progress_what, doing_what, sizeof(_progress_what) - 1)
    _progress_what[sizeof(_progress_what) - 1] = 0
    return True


def configure_progress():
    """Read PYXL_PROGRESS_INTERVAL_MS; UsageError if it is bad."""
    global _progress_every
    text = _getenv(b"PYXL_PROGRESS_INTERVAL_MS")
    ms = 0.0 if not text else _env_number("PYXL_PROGRESS_INTERVAL_MS", text, 0.0, 60000.0,
                                          False)
    _progress_every = ms / 1000.0
