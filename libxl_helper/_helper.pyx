# cython: language_level=3
"""pyxl-save-helper: Xen 4.17's libxl-save-helper, rebuilt as Cython over the real libxc.

Theory of operation
-------------------
libxl runs the helper as a child process so that the long, blocking
``xc_domain_save()`` / ``xc_domain_restore()`` calls of libxenguest happen
outside its event loop.  The helper is a thin, single-threaded shell around one
of those two calls:

* fd 1 carries helper -> libxl messages, fd 0 carries libxl's replies (a bare
  4-byte int for each message that waits for one).  The framing and every
  message come from the one table, pyxl/_msgtable.py; the marshalling code is
  generated into ``_messages.pxi`` (see libxl_helper/genmsgs.py) and included
  below.  This file holds the hand-written frame runtime that code calls.
* libxc's log lines and progress reports reach libxl through a xentoollog
  logger whose vmessage/progress functions turn them into ``log`` and
  ``progress`` messages.
* Each callback libxl asked for (a CBFLAGS bit) gets a stub in libxc's
  callbacks struct that sends the message and blocks for the reply.
* When the call returns: ``restore_results`` (restore only, always, 0/0 on
  failure), a DEBUG log "complete r=%d", ``complete(retval, errnoval)``, wait
  for its reply, ``xc_interface_close()``, exit 0.

Everything from argv parsing onwards behaves as Debian's 4.17 helper does,
message for message and exit status for exit status (tests/test_helper*.py run
both side by side: without a hypervisor, over an LD_PRELOAD stand-in for
xc_domain_save/restore, and with real libxc on fakexen).  Exit statuses: 0 after complete; 255 when start-up fails
(xc_interface_open, /dev/null, signal set-up) or writing fd 1 fails; 254 when
reading a reply hits EOF, an error or EINTR.  Deliberate differences, all for
input libxl never produces:

* **Bad command line.**  Xen's helper ``assert()``s on a missing/extra argument
  or unknown mode and dies of SIGABRT, and parses numbers with atoi/strtoul,
  so "x5" is 0 and 65536 is a domid of 0.  We print one line on stderr, write
  nothing on fd 1 and exit 2 (EXIT_USAGE); non-decimal or out-of-range numbers
  are usage errors too.
* **Over-long log texts.**  Xen's helper asserts that a frame body is < 64 KiB
  and dies of SIGABRT.  We shorten the longest string argument of the message
  until the frame fits, cut at a UTF-8 character boundary, and end it with
  TRUNCATED_MARK, so libxl still gets a (shortened) message.
* **NULL context.**  Xen's helper would crash on strlen(NULL); we send "".
* **EINTR on fd 1.**  Xen's helper treats a write to fd 1 interrupted by the
  save-mode SIGTERM handler as fatal (exit 255); we retry, so SIGTERM has its
  intended effect (libxc's next stream write fails, complete(-1, errno) is
  still reported).
* **logger destroy.**  Xen's aborts; libxc never destroys a caller's logger,
  and ours is a no-op.
* **Environment.**  Xen's helper reads none; main.c reads
  PYXL_HELPER_PYTHONMALLOC (CPython's allocator, for valgrind).  CPython
  itself runs isolated and ignores PYTHON* variables.
* **Precopy policy** (save mode).  Xen's helper leaves libxc's
  ``precopy_policy`` NULL: stop-and-copy below 50 dirty pages or at round 5.
  So does ours unless PYXL_PRECOPY says otherwise:

  ======================  ====================================================
  PYXL_PRECOPY            ``xen`` (or unset/empty): libxc's built-in policy,
                          and no other variable below is read.  ``downtime``:
                          the downtime-target policy (see "Precopy policy"
                          below).
  PYXL_DOWNTIME_MS        target downtime in ms (default 300; 0.001-3600000)
  PYXL_MAX_ITERATIONS     rounds before giving up (default 30; counted as
                          Xen's 5: iterations 0..N-1 are sent live)
  PYXL_PRECOPY_ON_FAIL    ``abort`` (default): fail the save with an ERROR
                          log line from context "pyxl-precopy", the guest
                          still running; ``stop``: force stop-and-copy anyway
                          (WARN line)
  ======================  ====================================================

  A bad value is a usage error (one line on stderr, exit 2), as a bad argv.

Strategy notes: nothing below ``pyxl_helper_main``'s argv parsing touches a
Python object.  The logger, the stubs and the SIGTERM handler are
``noexcept nogil`` functions, i.e. plain C that libxc can call at any point.
The helper never starts a thread (nor does libxenctrl/libxenguest/libpython
here), and it links no libxl.
"""

from libc.errno cimport errno, EINTR
from libc.stdlib cimport exit, abort, getenv, strtoull
from libc.string cimport memcpy, memset, strlen, strstr
from libc.stdio cimport perror
from posix.fcntl cimport open as c_open, fcntl, O_RDONLY, O_CLOEXEC
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC
from posix.unistd cimport read, write, dup2, pread


# ---------------------------------------------------------------------------
# C declarations: only what the helper uses.

cdef extern from "<stdint.h>" nogil:
    # Declared here rather than cimported from libc.stdint: Cython's copy says
    # uint64_t is unsigned long long, but on x86-64 glibc it is unsigned long,
    # the type of libxc's xen_pfn_t, and the generated stubs must match
    # libxc's callback signatures exactly.
    ctypedef unsigned short uint16_t
    ctypedef unsigned int uint32_t
    ctypedef signed int int32_t
    ctypedef unsigned long uint64_t

cdef extern from * nogil:
    """
    #include <errno.h>
    static inline void pyxl_set_errno(int value) { errno = value; }
    """
    # Cython cannot assign to the cimported errno (it would become a local).
    void set_errno "pyxl_set_errno"(int value)

cdef extern from "<fcntl.h>" nogil:
    enum: F_GETPIPE_SZ, F_SETPIPE_SZ

cdef extern from "<stdarg.h>" nogil:
    ctypedef void *va_list "va_list"   # only ever passed through to vsnprintf

cdef extern from "<stdio.h>" nogil:
    int vsnprintf(char *buf, size_t size, const char *fmt, va_list al)
    int snprintf(char *buf, size_t size, const char *fmt, ...)

cdef extern from "<signal.h>" nogil:
    ctypedef struct sigset_t:
        pass
    ctypedef void (*sighandler_t)(int) noexcept nogil
    cdef struct sigaction_t "sigaction":
        sighandler_t sa_handler
        sigset_t sa_mask
        int sa_flags
    sighandler_t SIG_DFL
    enum: SIGTERM
    enum: SIG_UNBLOCK
    int sigaction(int signum, const sigaction_t *act, sigaction_t *oldact)
    int sigemptyset(sigset_t *mask)
    int sigaddset(sigset_t *mask, int signum)
    int sigprocmask(int how, const sigset_t *mask, sigset_t *old)

cdef extern from "xentoollog.h" nogil:
    ctypedef enum xentoollog_level:
        XTL_NONE
        XTL_DEBUG
        XTL_DETAIL
        XTL_INFO
        XTL_WARN
        XTL_ERROR
    cdef struct xentoollog_logger:
        void (*vmessage)(xentoollog_logger *logger, xentoollog_level level, int errnoval,
                         const char *context, const char *format, va_list al) noexcept nogil
        void (*progress)(xentoollog_logger *logger, const char *context, const char *doing_what,
                         int percent, unsigned long done, unsigned long total) noexcept nogil
        void (*destroy)(xentoollog_logger *logger) noexcept nogil
    void xtl_log(xentoollog_logger *logger, xentoollog_level level, int errnoval,
                 const char *context, const char *format, ...)

cdef extern from "xenctrl.h" nogil:
    ctypedef struct xc_interface:
        pass
    ctypedef unsigned long xen_pfn_t
    xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                    unsigned int open_flags)
    int xc_interface_close(xc_interface *xch)

# xenguest.h does not include xenctrl.h: this block must come second.
cdef extern from "xenguest.h" nogil:
    cdef struct precopy_stats:
        unsigned int iteration
        unsigned long total_written
        long dirty_count
    ctypedef int (*precopy_policy_t)(precopy_stats stats, void *data) noexcept nogil
    enum:
        XGS_POLICY_ABORT
        XGS_POLICY_CONTINUE_PRECOPY
        XGS_POLICY_STOP_AND_COPY
    cdef struct save_callbacks:
        int (*suspend)(void *data) noexcept nogil
        precopy_policy_t precopy_policy
        int (*postcopy)(void *data) noexcept nogil
        int (*checkpoint)(void *data) noexcept nogil
        int (*wait_checkpoint)(void *data) noexcept nogil
        int (*switch_qemu_logdirty)(uint32_t domid, unsigned int enable, void *data) noexcept nogil
        void *data
    cdef struct restore_callbacks:
        int (*static_data_done)(unsigned int missing, void *data) noexcept nogil
        int (*suspend)(void *data) noexcept nogil
        int (*postcopy)(void *data) noexcept nogil
        int (*checkpoint)(void *data) noexcept nogil
        int (*wait_checkpoint)(void *data) noexcept nogil
        void (*restore_results)(xen_pfn_t store_gfn, xen_pfn_t console_gfn, void *data) noexcept nogil
        void *data
    ctypedef enum xc_stream_type_t:
        XC_STREAM_PLAIN
        XC_STREAM_REMUS
        XC_STREAM_COLO
    int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom, uint32_t flags,
                       save_callbacks *callbacks, xc_stream_type_t stream_type, int recv_fd)
    int xc_domain_restore(xc_interface *xch, int io_fd, uint32_t dom,
                          unsigned int store_evtchn, unsigned long *store_mfn,
                          uint32_t store_domid, unsigned int console_evtchn,
                          unsigned long *console_mfn, uint32_t console_domid,
                          xc_stream_type_t stream_type, restore_callbacks *callbacks,
                          int send_back_fd)


# ---------------------------------------------------------------------------
# Constants.

cdef enum:
    EXIT_OK = 0
    EXIT_USAGE = 2          # ours; Xen's helper aborts (SIGABRT) on a bad argv
    EXIT_REPLY_LOST = 254   # Xen's exit(-2): EOF/error/EINTR reading a reply
    EXIT_FAIL = 255         # Xen's exit(-1): start-up failed, or fd 1 broke
    FRAME_BODY_MAX = 0xFFFF # u16 length prefix; Xen asserts body < 64 KiB
    LOGBUF_SIZE = 0x10000   # > FRAME_BODY_MAX, so vsnprintf cuts imply frame cuts

# The log context of the helper's own messages: libxl and the vectors expect
# Xen's program name here, not ours.
cdef const char *PROGRAM = "libxl-save-helper"
# Appended to a string shortened to fit the 64 KiB frame.
cdef const char *TRUNCATED_MARK = "...[truncated]"


# ---------------------------------------------------------------------------
# Frame runtime, called by the generated _messages.pxi.  One static frame
# buffer: the helper is single-threaded and never nests messages (the signal
# handler sends nothing).

cdef unsigned char _frame[2 + FRAME_BODY_MAX]


cdef inline unsigned char *_put_uint16(unsigned char *p, uint16_t v) noexcept nogil:
    memcpy(p, &v, 2)   # host byte order, as Xen's helper (little-endian on x86)
    return p + 2


cdef inline unsigned char *_put_uint32(unsigned char *p, uint32_t v) noexcept nogil:
    memcpy(p, &v, 4)
    return p + 4


cdef inline unsigned char *_put_int32(unsigned char *p, int32_t v) noexcept nogil:
    memcpy(p, &v, 4)
    return p + 4


cdef inline unsigned char *_put_uint64(unsigned char *p, uint64_t v) noexcept nogil:
    memcpy(p, &v, 8)
    return p + 8


cdef inline size_t _string_len(const char *s) noexcept nogil:
    return strlen(s) if s != NULL else 0


cdef void _fit_strings(size_t *lens, int count, size_t fixed) noexcept nogil:
    """Shorten string lengths, longest first, until the body fits one frame.

    ``fixed`` counts every other body byte (message number, fixed-size
    arguments, each string's u32 size and NUL).  Only ever shortens.
    """
    cdef size_t budget = FRAME_BODY_MAX - fixed
    cdef size_t total = 0
    cdef size_t cut
    cdef int i, longest
    for i in range(count):
        total += lens[i]
    while total > budget:
        longest = 0
        for i in range(1, count):
            if lens[i] > lens[longest]:
                longest = i
        cut = total - budget
        if cut > lens[longest]:
            cut = lens[longest]
        lens[longest] -= cut
        total -= cut


cdef unsigned char *_put_string(unsigned char *p, const char *s, size_t n) noexcept nogil:
    """Put the first n bytes of s as a wire string: u32 size incl. NUL, bytes, NUL.

    n < strlen(s) means _fit_strings shortened it: then the text is cut at a
    UTF-8 character boundary and ends in TRUNCATED_MARK, within n bytes.
    """
    cdef size_t keep = n
    cdef size_t mark = 0
    if s == NULL:
        keep = 0
    elif s[n] != 0:
        mark = strlen(TRUNCATED_MARK)
        if n < mark:
            mark = 0
        keep = n - mark
        while keep > 0 and (<unsigned char>s[keep] & 0xC0) == 0x80:
            keep -= 1   # s[keep] continues a multi-byte character: drop it whole
    p = _put_uint32(p, <uint32_t>(keep + mark + 1))
    if keep:
        memcpy(p, s, keep)
    if mark:
        memcpy(p + keep, TRUNCATED_MARK, mark)
    p[keep + mark] = 0
    return p + keep + mark + 1


cdef inline unsigned char *_msg_begin(uint16_t number) noexcept nogil:
    return _put_uint16(_frame + 2, number)


cdef void _write_all(int fd, const unsigned char *buf, size_t len) noexcept nogil:
    """Write all of buf, retrying short writes and EINTR; exit 255 on error.

    errno is preserved: libxc's progress path does not save it, and the helper's
    complete() reports errno from the failed save/restore.
    """
    cdef int saved = errno
    cdef ssize_t r
    while len:
        r = write(fd, buf, len)
        if r < 0:
            if errno == EINTR:
                continue
            perror("write")   # Xen's helper: perror("write"); exit(-1)
            exit(EXIT_FAIL)
        buf += r
        len -= <size_t>r
    set_errno(saved)


cdef void _msg_send(unsigned char *end) noexcept nogil:
    cdef size_t body = <size_t>(end - (_frame + 2))
    if body > FRAME_BODY_MAX:
        abort()   # can't happen: the generator and _fit_strings bound every body
    _put_uint16(_frame, <uint16_t>body)
    _write_all(1, _frame, body + 2)   # one write: header and body together


cdef int _get_reply() noexcept nogil:
    """Block for the 4-byte reply on fd 0.

    EOF (even mid-reply), a read error or EINTR -- e.g. SIGTERM in save mode --
    exits 254, as Xen's helper does.  No retry on EINTR: that is how SIGTERM
    gets a save unstuck while libxl is not answering.
    """
    cdef int32_t value = 0
    cdef size_t got = 0
    cdef ssize_t r
    while got < 4:
        r = read(0, (<char *>&value) + got, 4 - got)
        if r <= 0:
            exit(EXIT_REPLY_LOST)
        got += <size_t>r
    return value


include "_messages.pxi"


# ---------------------------------------------------------------------------
# The xentoollog logger handed to xc_interface_open (as both loggers, like
# Xen's helper): libxc's messages and progress become log/progress frames.

cdef char _logbuf[LOGBUF_SIZE]
cdef xentoollog_logger _logger


cdef void _logger_vmessage(xentoollog_logger *logger, xentoollog_level level, int errnoval,
                           const char *context, const char *format, va_list al) noexcept nogil:
    # Format into a static buffer: a text longer than the buffer is cut by
    # vsnprintf and then, since the buffer is larger than a frame, marked as
    # truncated by _put_string.
    if vsnprintf(_logbuf, LOGBUF_SIZE, format, al) < 0:
        perror("formatting a log message failed")   # Xen's helper: exit(-1) too
        exit(EXIT_FAIL)
    send_log(<uint32_t>level, errnoval, context, _logbuf)


cdef void _logger_progress(xentoollog_logger *logger, const char *context,
                           const char *doing_what, int percent,
                           unsigned long done, unsigned long total) noexcept nogil:
    # percent is not sent: libxl recomputes it from done/total.
    send_progress(context, doing_what, done, total)


cdef void _logger_destroy(xentoollog_logger *logger) noexcept nogil:
    pass   # libxc only destroys loggers it created itself


# ---------------------------------------------------------------------------
# Signals.  In save mode a SIGTERM (libxl aborting the operation) must make
# libxc take its error path, which puts the guest back in order: the handler
# dup2()s a read-only /dev/null over the stream fd, so libxc's next write fails
# (EBADF), and a blocked write or reply read returns early (no SA_RESTART).
# In restore mode SIGTERM keeps its default action and kills the helper.

cdef int _io_fd = -1
cdef int _unwriteable_fd = -1


cdef void _save_sigterm(int signum) noexcept nogil:
    # Async-signal-safe: two C ints, dup2(), abort().  Nothing may be written
    # to fd 1 here -- it could land in the middle of a frame.
    cdef int saved = errno
    if dup2(_unwriteable_fd, _io_fd) != _io_fd:
        abort()
    set_errno(saved)


cdef int _fail(int errnoval, const char *what) noexcept nogil:
    """Log an ERROR from the helper itself; the caller then exits 255."""
    xtl_log(&_logger, XTL_ERROR, errnoval, PROGRAM, "%s", what)
    return EXIT_FAIL


cdef int _setup_signals(sighandler_t handler) noexcept nogil:
    global _unwriteable_fd
    cdef sigaction_t sa
    cdef sigset_t mask
    _unwriteable_fd = c_open("/dev/null", O_RDONLY)
    if _unwriteable_fd < 0:
        return _fail(errno, "open /dev/null for reading")
    memset(&sa, 0, sizeof(sa))
    sa.sa_handler = handler
    sigemptyset(&sa.sa_mask)
    if sigaction(SIGTERM, &sa, NULL) != 0:
        return _fail(errno, "sigaction SIGTERM failed")
    sigemptyset(&mask)
    sigaddset(&mask, SIGTERM)
    if sigprocmask(SIG_UNBLOCK, &mask, NULL) != 0:
        return _fail(errno, "sigprocmask unblock SIGTERM failed")
    return EXIT_OK


# ---------------------------------------------------------------------------
# The two modes, in Xen's order: callbacks, "starting ...", xc_interface_open,
# signals, the libxc call, (restore_results), complete.

cdef xc_interface *_xch = NULL
cdef save_callbacks _save_cbs
cdef restore_callbacks _restore_cbs


# ---------------------------------------------------------------------------
# The stream pipe.  libxc moves guest memory in batches of up to 4 MiB (one
# writev per batch when saving).  Through a pipe of the kernel's default
# 64 KiB that is 64 round trips between writer and reader per batch, each a
# wake-up and a context switch.  At 256 KiB it is 16, and a save into a pipe
# runs 5-10 % faster on one vCPU.  Not more: at 1 MiB it is no faster, and
# the longer copies inside the kernel (which a preempt=none kernel does not
# interrupt) make everything else on a busy host wait longer for a CPU (16
# saves on 2 vCPUs: a 1 ms timer's p99 lateness 3 -> 5.5 ms).  Only a pipe of
# the default size is grown: one its creator sized keeps that size (pyxl's
# bandwidth-capped migration wants a small one, so that the precopy policy
# feels the cap early).  Not a pipe (a file, a socket), or the kernel refuses
# (the user's pipe memory is over pipe-user-pages-soft): the stream goes
# through the fd as it is.

cdef enum:
    DEFAULT_PIPE_SIZE = 64 << 10
    STREAM_PIPE_SIZE = 256 << 10

cdef void _grow_stream_pipe(int fd) noexcept nogil:
    cdef int saved = errno
    if fcntl(fd, F_GETPIPE_SZ) == DEFAULT_PIPE_SIZE:
        fcntl(fd, F_SETPIPE_SZ, <int>STREAM_PIPE_SIZE)
    set_errno(saved)


cdef int _startup(const char *op) noexcept nogil:
    global _xch
    # A fresh C program starts with errno 0; ours comes out of CPython's start-up
    # with leftovers (ENOTTY from isatty() on the pipes).  libxc does not always
    # set errno before failing, and complete() reports it, so start clean: a
    # failed restore of a bad stream reports complete(-1, 0), as Xen's helper does.
    set_errno(0)
    _logger.vmessage = _logger_vmessage
    _logger.progress = _logger_progress
    _logger.destroy = _logger_destroy
    xtl_log(&_logger, XTL_DEBUG, 0, PROGRAM, "starting %s", op)
    _xch = xc_interface_open(&_logger, &_logger, 0)
    if _xch == NULL:
        return _fail(errno, "xc_interface_open failed")
    return EXIT_OK


cdef int _complete(int retval, int saved_errno) noexcept nogil:
    cdef int errnoval = saved_errno if retval else 0   # as Xen: drop irrelevant errnos
    xtl_log(&_logger, XTL_DEBUG, errnoval, PROGRAM, "complete r=%d", retval)
    stub_complete(retval, errnoval, NULL)   # the reply's value is not used
    xc_interface_close(_xch)
    return EXIT_OK


# ---------------------------------------------------------------------------
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

cdef enum:
    POLICY_XEN = 0
    POLICY_DOWNTIME = 1
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


cdef precopy_policy_t _precopy_policy() noexcept nogil:
    """The live-migration precopy policy handed to libxc.

    NULL selects libxc's built-in policy (stop-and-copy below 50 dirty pages or
    after 5 rounds), as Xen's helper does; PYXL_PRECOPY=downtime selects
    _downtime_policy (configured by _configure_precopy from the environment).
    """
    if _pc.kind == POLICY_DOWNTIME:
        return _downtime_policy
    return NULL


cdef int _run_save(int io_fd, int back_fd, uint32_t dom, uint32_t xcflags,
                   unsigned int cbflags, unsigned int stream_type) noexcept nogil:
    global _io_fd
    cdef int r, rc, saved_errno
    memset(&_save_cbs, 0, sizeof(_save_cbs))
    install_save_callbacks(&_save_cbs, cbflags)
    _save_cbs.precopy_policy = _precopy_policy()
    _io_fd = io_fd
    _grow_stream_pipe(io_fd)
    rc = _startup("save")
    if rc != EXIT_OK:
        return rc
    rc = _setup_signals(_save_sigterm)
    if rc != EXIT_OK:
        return rc
    r = xc_domain_save(_xch, io_fd, dom, xcflags, &_save_cbs,
                       <xc_stream_type_t>stream_type, back_fd)
    saved_errno = errno
    return _complete(r, saved_errno)


cdef int _run_restore(int io_fd, int back_fd, uint32_t dom, unsigned int store_evtchn,
                      uint32_t store_domid, unsigned int console_evtchn,
                      uint32_t console_domid, unsigned int cbflags,
                      unsigned int stream_type) noexcept nogil:
    global _io_fd
    cdef int r, rc, saved_errno
    cdef unsigned long store_gfn = 0
    cdef unsigned long console_gfn = 0
    memset(&_restore_cbs, 0, sizeof(_restore_cbs))
    install_restore_callbacks(&_restore_cbs, cbflags)
    _io_fd = io_fd
    _grow_stream_pipe(io_fd)
    rc = _startup("restore")
    if rc != EXIT_OK:
        return rc
    rc = _setup_signals(SIG_DFL)
    if rc != EXIT_OK:
        return rc
    r = xc_domain_restore(_xch, io_fd, dom, store_evtchn, &store_gfn, store_domid,
                          console_evtchn, &console_gfn, console_domid,
                          <xc_stream_type_t>stream_type, &_restore_cbs, back_fd)
    saved_errno = errno
    # Always, whatever CBFLAGS says and even on failure (then both are 0):
    # libxl treats a restore without results as failed.
    send_restore_results(store_gfn, console_gfn)
    return _complete(r, saved_errno)


# ---------------------------------------------------------------------------
# Command line.  Xen's helper asserts; we explain (see the module docstring).

NAME = "pyxl-save-helper"
INT_MAX = 0x7FFFFFFF
U32_MAX = 0xFFFFFFFF

# (name, lowest, highest) per argument, in order.  libxl prints fds with %d
# (BACK_FD may be -1) and everything else with %lu; the ranges are those of the
# C variables Xen's helper stores them in.
SAVE_ARGS = (
    ("IO_FD", 0, INT_MAX), ("BACK_FD", -1, INT_MAX), ("DOMID", 0, U32_MAX),
    ("XCFLAGS", 0, U32_MAX), ("CBFLAGS", 0, U32_MAX), ("STREAM_TYPE", 0, 2),
)
RESTORE_ARGS = (
    ("IO_FD", 0, INT_MAX), ("BACK_FD", -1, INT_MAX), ("DOMID", 0, U32_MAX),
    ("STORE_EVTCHN", 0, U32_MAX), ("STORE_DOMID", 0, 0xFFFF),
    ("CONSOLE_EVTCHN", 0, U32_MAX), ("CONSOLE_DOMID", 0, 0xFFFF),
    ("CBFLAGS", 0, U32_MAX), ("STREAM_TYPE", 0, 2),
)
MODES = {b"--save-domain": ("save", SAVE_ARGS), b"--restore-domain": ("restore", RESTORE_ARGS)}


class UsageError(Exception):
    """The command line is not one libxl would produce (text: one line, no program name)."""


def _usage_line():
    return "usage: %s %s | %s" % (NAME, *(
        " ".join([mode.decode()] + [name for name, _, _ in spec]) for mode, (_, spec) in MODES.items()))


def _show(arg):
    return repr(arg.decode("utf-8", "surrogateescape"))


cdef object _decimal(bytes arg):
    """[-]digits (ASCII) -> int, else None.  Beyond 18 significant digits: 10**18.

    Computed in C rather than with int(): CPython 3.11's int("0") reads an
    uninitialised digit (gh-119022), which would make memcheck runs noisy.
    """
    cdef bint negative = arg[:1] == b"-"
    cdef bytes digits = arg[1:] if negative else arg
    cdef long long value = 0
    cdef unsigned char c
    if not digits or not digits.isdigit():   # bytes.isdigit(): ASCII digits only
        return None
    digits = digits.lstrip(b"0")
    if len(digits) > 18:
        return 10 ** 18   # out of every range, without overflowing
    for c in digits:
        value = value * 10 + (c - 48)
    return -value if negative else value


def parse_argv(args):
    """``args`` (bytes, without argv[0]) -> (mode, [int values]); UsageError if bad.

    Stricter than Xen's atoi/strtoul: plain decimal only (a '-' only where a
    negative value is in range), within the range of the C variable.
    """
    if not args:
        raise UsageError("no mode given; " + _usage_line())
    mode = args[0]
    if mode not in MODES:
        raise UsageError("unknown mode %s (expected --save-domain or --restore-domain); %s"
                         % (_show(mode), _usage_line()))
    name_of_mode, spec = MODES[mode]
    given = args[1:]
    if len(given) != len(spec):
        raise UsageError("%s takes %d arguments (%s), got %d" % (
            mode.decode(), len(spec), " ".join(name for name, _, _ in spec), len(given)))
    values = []
    for (name, lo, hi), arg in zip(spec, given):
        value = _decimal(arg)
        if value is None or not lo <= value <= hi:
            raise UsageError("%s: %s must be a decimal number from %d to %d, got %s"
                             % (mode.decode(), name, lo, hi, _show(arg)))
        values.append(value)
    return name_of_mode, values


cdef void _say(str line) noexcept:
    cdef bytes data = line.encode("utf-8", "surrogateescape")
    cdef const char *p = data
    cdef Py_ssize_t left = len(data)
    cdef ssize_t r
    while left > 0:
        r = write(2, p, <size_t>left)
        if r < 0:
            if errno == EINTR:
                continue
            return
        p += r
        left -= r


# Environment of the precopy policy (save mode only; see the module docstring).
PRECOPY_POLICIES = {b"xen": POLICY_XEN, b"downtime": POLICY_DOWNTIME}
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
        raise UsageError("PYXL_PRECOPY must be 'xen' or 'downtime', got %s" % _show(policy))
    _pc.kind = PRECOPY_POLICIES[policy]
    if _pc.kind == POLICY_XEN:
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


cdef public int pyxl_helper_main(int argc, char **argv) except -1:
    """Entry point called by main.c; returns the exit status.

    A usage error prints one line on stderr and returns 2, with nothing written
    to fd 1.  Otherwise this runs Xen's helper flow and returns 0 after
    ``complete`` or 255 if start-up failed; the 254 (lost reply) and write-
    failure exits happen from inside libxc's call, straight through exit().
    """
    try:
        mode, v = parse_argv([argv[i] for i in range(1, argc)])
        if mode == "save":
            configure_precopy()
    except UsageError as exc:
        _say("%s: %s\n" % (NAME, exc))
        return EXIT_USAGE
    if mode == "save":
        return _run_save(v[0], v[1], v[2], v[3], v[4], v[5])
    return _run_restore(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8])
