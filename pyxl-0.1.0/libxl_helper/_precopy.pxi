# _precopy.pxi -- the downtime-driven precopy policy (included by _helper.pyx).
#
# Owns everything PYXL_PRECOPY selects in save mode: reading PYXL_PRECOPY,
# PYXL_DOWNTIME_MS, PYXL_MAX_ITERATIONS and PYXL_PRECOPY_ON_FAIL
# (configure_precopy; a bad value is a UsageError), the policy's state, its
# measurements (CLOCK_MONOTONIC, wchar of /proc/self/io) and its decisions
# (_downtime_policy, logged through the helper's _logger), and
# _precopy_policy(), the function pointer _run_save hands libxc: NULL, i.e.
# libxc's built-in policy as in Xen's helper, unless PYXL_PRECOPY=downtime.
# Uses _decimal, _show and UsageError from _helper.pyx's command-line code.

from libc.errno cimport errno
from libc.stdlib cimport getenv, strtoull
from libc.string cimport memset, strstr
from posix.fcntl cimport open as c_open, O_RDONLY, O_CLOEXEC
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport pread

from xen cimport (
    XTL_DETAIL, XTL_INFO, XTL_WARN, XTL_ERROR, xtl_log,
    precopy_stats, precopy_policy_t,
    XGS_POLICY_ABORT, XGS_POLICY_CONTINUE_PRECOPY, XGS_POLICY_STOP_AND_COPY,
)


# Precopy policy (live saves).  Unless PYXL_PRECOPY=downtime, the helper hands
# libxc NULL, i.e. libxc's built-in policy, exactly as Xen's helper does.
#
# How libxc 4.17 consults a policy (seen on fakexen): before round 0 with
# iteration 0 and dirty_count = p2m_size (holes included); then after each
# round k twice: first with iteration k+1 and dirty_count -1 (the round was
# sent, nothing was fetched yet), then -- if that said continue -- after the
# log-dirty CLEAN with the count it returned.  CONTINUE goes on (the CLEAN,
# or sending the counted pages).  STOP_AND_COPY at a counted call still sends
# those pages live; at a -1 call it suspends at once.  Either way the pages
# dirtied since the last CLEAN are then sent with the guest suspended: that
# is the downtime.  ABORT fails the save ("Abort precopy loop") with the guest
# still running.  Xen's own policy stops at a count below 50 or at iteration 5.
#
# The downtime policy measures with CLOCK_MONOTONIC:
#   * the send bandwidth B (pages/s), over all rounds so far: bytes this
#     process wrote (wchar of /proc/self/io, i.e. the stream, whatever the
#     fd) per second, in pages of PAGE_COST bytes; without /proc, pages sent
#     per second, round 0 left out (its count includes the p2m holes);
#   * the dirty rate r (pages/s): each CLEAN's count over the time since the
#     previous CLEAN (or since round 0 began, for the first).
# It predicts the downtime of stopping now -- at a -1 call, the r*t pages
# dirtied in the t seconds since the last CLEAN, sent at B; at a counted
# call, the r*D/B pages dirtied while the D counted pages go out live -- and
# stops as soon as that fits the target (or nothing is dirty).  At iteration
# max_iterations (a -1 call, like Xen's limit) without a fit it aborts, with
# an ERROR line naming the target, the round and the prediction, or, with
# on_fail=stop, forces stop-and-copy with a WARN line.  Each decision is
# logged at DETAIL.  Fixed costs of the switch-over (suspending, device
# state, the receiver's restore and handshake) are not in the prediction.

# PYXL_PRECOPY=host (pyxl's extension of the callback protocol, see
# pyxl/wire/table.py message 11): the same measurements, but at each counted
# call (once per round, after the CLEAN) the helper sends them to the host as
# precopy_round and does what the reply says; at the -1 calls it continues (on
# to the CLEAN).  A reply that is not a libxc decision aborts, with an ERROR.

cdef enum:
    POLICY_XEN = 0
    POLICY_DOWNTIME = 1
    POLICY_HOST = 2
    PAGE_COST = 4096 + 8     # a page and its pfn word in a PAGE_DATA record
    IOBUF_SIZE = 1024


cdef struct _PrecopyState:
    int kind
    double target            # seconds
    unsigned int max_iterations
    int on_fail              # XGS_POLICY_ABORT or XGS_POLICY_STOP_AND_COPY
    double clean_time        # when the last counted call came (just after a CLEAN); 0: none yet
    double round_start       # when the round now being timed began
    long long round_wchar    # wchar then; -1: /proc/self/io unavailable
    long round_pages         # pages sent in that round (its counted call's dirty_count)
    unsigned int round_iteration
    double rate              # pages/s dirtied, from the last CLEAN; < 0: unknown
    double sent_pages        # measured so far (for the bandwidth)
    double sent_time
    int io_fd                # /proc/self/io, opened at the first call; -2: not yet
    double start             # the first call (host policy: elapsed time)


cdef _PrecopyState _pc
cdef char _iobuf[IOBUF_SIZE]
cdef char _predbuf[64]


cdef const char *_ms(double seconds) noexcept nogil:
    """A predicted downtime for the log: "12.3 ms", or "unknown" (negative)."""
    if seconds < 0:
        return "unknown"
    snprintf(_predbuf, sizeof(_predbuf), "%.1f ms", seconds * 1e3)
    return _predbuf


cdef double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <double>ts.tv_sec + <double>ts.tv_nsec * 1e-9


cdef long long _wchar() noexcept nogil:
    """Bytes this process has written so far (any fd), or -1 if unknown."""
    cdef ssize_t n
    cdef char *p
    cdef int saved = errno
    if _pc.io_fd == -2:
        _pc.io_fd = c_open("/proc/self/io", O_RDONLY | O_CLOEXEC)
    if _pc.io_fd < 0:
        set_errno(saved)
        return -1
    n = pread(_pc.io_fd, _iobuf, IOBUF_SIZE - 1, 0)
    set_errno(saved)
    if n <= 0:
        return -1
    _iobuf[n] = 0
    p = strstr(_iobuf, "wchar:")
    if p == NULL:
        return -1
    return <long long>strtoull(p + 6, NULL, 10)


cdef int _downtime_policy(precopy_stats stats, void *data) noexcept nogil:
    cdef double now = _now()
    cdef long long wchar = _wchar()
    cdef double bw = 0.0, predicted = -1.0, pending = -1.0
    cdef long dirty = stats.dirty_count
    cdef int decision = XGS_POLICY_CONTINUE_PRECOPY
    cdef bint fits, failed = False
    if _pc.start == 0:
        _pc.start = now
    if dirty < 0:
        # After a round: time it.
        if now > _pc.round_start:
            if wchar >= 0 and _pc.round_wchar >= 0:
                _pc.sent_pages += <double>(wchar - _pc.round_wchar) / PAGE_COST
                _pc.sent_time += now - _pc.round_start
            elif _pc.round_iteration > 0 and _pc.round_pages > 0:
                _pc.sent_pages += <double>_pc.round_pages
                _pc.sent_time += now - _pc.round_start
    else:
        # Just after a CLEAN (or before round 0): the dirty rate since the last one.
        if _pc.clean_time > 0 and now > _pc.clean_time:
            _pc.rate = <double>dirty / (now - _pc.clean_time)
        _pc.clean_time = now
    if _pc.sent_time > 0 and _pc.sent_pages > 0:
        bw = _pc.sent_pages / _pc.sent_time
    if bw > 0 and _pc.rate >= 0:
        if dirty < 0:
            pending = _pc.rate * (now - _pc.clean_time)
        else:
            pending = _pc.rate * (<double>dirty / bw)
        predicted = pending / bw
    if _pc.kind == POLICY_HOST:
        return _ask_host(stats.iteration, dirty, bw, predicted, now)
    fits = dirty == 0 or (predicted >= 0 and predicted <= _pc.target)
    if fits:
        decision = XGS_POLICY_STOP_AND_COPY
    elif dirty < 0 and stats.iteration >= _pc.max_iterations:
        decision, failed = _pc.on_fail, True
    xtl_log(&_logger, XTL_DETAIL, -1, "pyxl-precopy",
            "iteration %u, %s %ld pages: %.0f pages/s sent, %.0f pages/s dirtied, "
            "predicted downtime %s (target %.1f ms): %s",
            stats.iteration, "dirty" if dirty >= 0 else "sent", dirty if dirty >= 0
            else _pc.round_pages, bw, _pc.rate if _pc.rate > 0 else 0.0, _ms(predicted),
            _pc.target * 1e3,
            "target not met" if failed else "stop and copy" if fits else "continue")
    if failed:
        xtl_log(&_logger, XTL_ERROR if decision == XGS_POLICY_ABORT else XTL_WARN, -1,
                "pyxl-precopy", "downtime target %.1f ms not met after %u iterations "
                "(predicted %s for about %.0f dirty pages): %s", _pc.target * 1e3,
                stats.iteration, _ms(predicted), pending if pending > 0 else 0.0,
                "aborting the live save, the guest keeps running"
                if decision == XGS_POLICY_ABORT else "forcing stop and copy")
    elif fits:
        xtl_log(&_logger, XTL_INFO, -1, "pyxl-precopy",
                "iteration %u: predicted downtime %.1f ms for about %.0f dirty pages is "
                "within the target %.1f ms: stop and copy", stats.iteration, predicted * 1e3,
                pending if dirty < 0 else <double>dirty, _pc.target * 1e3)
    if dirty >= 0 and decision != XGS_POLICY_ABORT:
        # libxc sends these pages next (even when stopping): time that round.
        _pc.round_start = _now()    # the policy's own logging is not send time
        _pc.round_wchar = _wchar()
        _pc.round_pages = dirty
        _pc.round_iteration = stats.iteration
    return decision


cdef int _ask_host(unsigned int iteration, long dirty, double bw, double predicted,
                   double now) noexcept nogil:
    """POLICY_HOST: the host decides, once per round (see the comment above)."""
    cdef int reply
    if dirty < 0:
        return XGS_POLICY_CONTINUE_PRECOPY
    reply = stub_precopy_round(iteration, <uint64_t>(_pc.round_pages if iteration > 0 else 0),
                               <uint64_t>dirty, <uint64_t>(_pc.rate if _pc.rate > 0 else 0.0),
                               <uint64_t>bw,
                               <uint64_t>(predicted * 1e6) if predicted >= 0 else <uint64_t>-1,
                               <uint64_t>((now - _pc.start) * 1e6), NULL)
    if reply not in (XGS_POLICY_CONTINUE_PRECOPY, XGS_POLICY_STOP_AND_COPY, XGS_POLICY_ABORT):
        xtl_log(&_logger, XTL_ERROR, -1, "pyxl-precopy",
                "the host's precopy decision %d is none of libxc's: aborting", reply)
        return XGS_POLICY_ABORT
    xtl_log(&_logger, XTL_DETAIL, -1, "pyxl-precopy", "iteration %u, dirty %ld pages: host says %s",
            iteration, dirty, "stop and copy" if reply == XGS_POLICY_STOP_AND_COPY
            else "abort" if reply == XGS_POLICY_ABORT else "continue")
    if reply != XGS_POLICY_ABORT:
        _pc.round_start = _now()
        _pc.round_wchar = _wchar()
        _pc.round_pages = dirty
        _pc.round_iteration = iteration
    return reply


cdef precopy_policy_t _precopy_policy() noexcept nogil:
    """The live-migration precopy policy handed to libxc.

    NULL selects libxc's built-in policy (stop-and-copy below 50 dirty pages or
    after 5 rounds), as Xen's helper does; PYXL_PRECOPY=downtime selects
    _downtime_policy (configured by configure_precopy from the environment).
    """
    if _pc.kind == POLICY_DOWNTIME or _pc.kind == POLICY_HOST:
        return _downtime_policy
    return NULL


# Environment of the precopy policy (save mode only; see the module docstring).
PRECOPY_POLICIES = {b"xen": POLICY_XEN, b"downtime": POLICY_DOWNTIME, b"host": POLICY_HOST}
PRECOPY_ON_FAIL = {b"abort": XGS_POLICY_ABORT, b"stop": XGS_POLICY_STOP_AND_COPY}
DEFAULT_DOWNTIME_MS = 300.0
DEFAULT_MAX_ITERATIONS = 30


cdef object _getenv(const char *name):
    cdef const char *value = getenv(name)
    return None if value == NULL else <bytes>value


def _env_number(name, text, lo, hi, integer):
    try:
        if integer:
            value = _decimal(text)
            if value is None:
                raise ValueError
        else:
            value = float(text.decode("ascii"))
    except (ValueError, UnicodeDecodeError):
        value = None
    if value is None or not lo <= value <= hi:   # also refuses nan
        raise UsageError("%s must be %s from %g to %g, got %s" % (
            name, "a whole number" if integer else "a number", lo, hi, _show(text)))
    return value


def configure_precopy():
    """Read PYXL_PRECOPY & co. into _pc; UsageError if a value is bad.

    PYXL_PRECOPY unset, empty or "xen" leaves libxc's own policy in place and
    the other variables unread, so the helper is Xen's.
    """
    memset(&_pc, 0, sizeof(_pc))
    _pc.io_fd = -2
    _pc.round_wchar = -1
    _pc.rate = -1.0
    policy = _getenv(b"PYXL_PRECOPY")
    if not policy:
        policy = b"xen"
    if policy not in PRECOPY_POLICIES:
        raise UsageError("PYXL_PRECOPY must be 'xen', 'downtime' or 'host', got %s"
                         % _show(policy))
    _pc.kind = PRECOPY_POLICIES[policy]
    if _pc.kind != POLICY_DOWNTIME:
        return
    text = _getenv(b"PYXL_DOWNTIME_MS")
    ms = DEFAULT_DOWNTIME_MS if not text else _env_number(
        "PYXL_DOWNTIME_MS", text, 0.001, 3600000.0, False)
    text = _getenv(b"PYXL_MAX_ITERATIONS")
    iterations = DEFAULT_MAX_ITERATIONS if not text else _env_number(
        "PYXL_MAX_ITERATIONS", text, 1, 1000000, True)
    text = _getenv(b"PYXL_PRECOPY_ON_FAIL")
    if not text:
        text = b"abort"
    if text not in PRECOPY_ON_FAIL:
        raise UsageError("PYXL_PRECOPY_ON_FAIL must be 'abort' or 'stop', got %s" % _show(text))
    _pc.target = ms / 1000.0
    _pc.max_iterations = iterations
    _pc.on_fail = PRECOPY_ON_FAIL[text]
