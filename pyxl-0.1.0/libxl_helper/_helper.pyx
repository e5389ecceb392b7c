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
  message come from the one table, pyxl/wire/table.py; the marshalling code is
  generated into ``_messages.pxi`` at build time (libxl_helper/genmsgs.py) and
  included below, after the hand-written frame runtime it calls.
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
* **Progress rate.**  Xen's helper sends every progress report libxc makes
  (some 1,000 per save, one per batch of pfns).  So does ours unless
  PYXL_PROGRESS_INTERVAL_MS asks for at most one per interval, plus the first
  and last of each phase (``_progress.pxi``); pyxl's host library asks for 50 ms.
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

Files (all compiled into this one module, ``_helper``, which main.c registers
as a built-in module):

* ``xen.pxd``        the Xen C API the helper uses (libxentoollog,
                     libxenctrl, libxenguest): declarations only.
* ``_frame.pxi``     the frame runtime: building frames, writing them to fd 1,
                     reading replies on fd 0.
* ``_messages.pxi``  generated: a send function per message, the callback
                     stubs libxc calls, install_<mode>_callbacks().
* ``_precopy.pxi``   the downtime-driven precopy policy and its environment.
* this file          the logger, signals, the two modes and the command line.

Strategy notes: nothing below ``pyxl_helper_main``'s argv parsing touches a
Python object.  The logger, the stubs and the SIGTERM handler are
``noexcept nogil`` functions, i.e. plain C that libxc can call at any point.
The helper never starts a thread (nor does libxenctrl/libxenguest/libpython
here), and it links no libxl.
"""

from libc.errno cimport errno, EINTR
from libc.stdlib cimport exit, abort
from libc.string cimport memset
from libc.stdio cimport perror
from posix.fcntl cimport open as c_open, fcntl, O_RDONLY
from posix.unistd cimport write, dup2

from xen cimport (
    uint16_t, uint32_t, int32_t, uint64_t, va_list,
    xentoollog_level, xentoollog_logger, XTL_DEBUG, XTL_ERROR, xtl_log,
    xc_interface, xc_interface_open, xc_interface_close,
    save_callbacks, restore_callbacks, xc_stream_type_t, xc_domain_save, xc_domain_restore,
)


# ---------------------------------------------------------------------------
# C declarations beyond Xen's API (which is in xen.pxd): only what the helper uses.

cdef extern from * nogil:
    """
    #include <errno.h>
    static inline void pyxl_set_errno(int value) { errno = value; }
    """
    # Cython cannot assign to the cimported errno (it would become a local).
    void set_errno "pyxl_set_errno"(int value)

cdef extern from "<fcntl.h>" nogil:
    enum: F_GETPIPE_SZ, F_SETPIPE_SZ

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


# ---------------------------------------------------------------------------
# Constants.

cdef enum:
    EXIT_OK = 0
    EXIT_USAGE = 2          # ours; Xen's helper aborts (SIGABRT) on a bad argv
    EXIT_REPLY_LOST = 254   # Xen's exit(-2): EOF/error/EINTR reading a reply
    EXIT_FAIL = 255         # Xen's exit(-1): start-up failed, or fd 1 broke
    LOGBUF_SIZE = 0x10000   # > FRAME_BODY_MAX, so vsnprintf cuts imply frame cuts

# The log context of the helper's own messages: libxl and the vectors expect
# Xen's program name here, not ours.
cdef const char *PROGRAM = "libxl-save-helper"


# ---------------------------------------------------------------------------
# The frame runtime, then the generated messages that use it.

include "_frame.pxi"
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
    if _progress_due(doing_what, done, total):
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
# Precopy policy (live saves): configure_precopy(), _precopy_policy().

include "_precopy.pxi"

# ---------------------------------------------------------------------------
# How often progress reports go out: configure_progress(), _progress_due().

include "_progress.pxi"


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


cdef public int pyxl_helper_main(int argc, char **argv) except -1:
    """Entry point called by main.c; returns the exit status.

    A usage error prints one line on stderr and returns 2, with nothing written
    to fd 1.  Otherwise this runs Xen's helper flow and returns 0 after
    ``complete`` or 255 if start-up failed; the 254 (lost reply) and write-
    failure exits happen from inside libxc's call, straight through exit().
    """
    try:
        mode, v = parse_argv([argv[i] for i in range(1, argc)])
        configure_progress()
        if mode == "save":
            configure_precopy()
    except UsageError as exc:
        _say("%s: %s\n" % (NAME, exc))
        return EXIT_USAGE
    if mode == "save":
        return _run_save(v[0], v[1], v[2], v[3], v[4], v[5])
    return _run_restore(v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8])
