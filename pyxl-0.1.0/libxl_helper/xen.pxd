# xen.pxd -- the Xen 4.17 C API the helper calls (cimported by _helper.pyx).
#
# Owns the declarations of libxentoollog, libxenctrl and libxenguest, and
# only the names the helper (its hand-written .pyx/.pxi files and the
# generated _messages.pxi) uses: declare a name here when the helper starts
# using it.  Extern declarations only, so cimporting this adds no run-time
# import: it all compiles into the one _helper module.  The generated C
# includes Debian's real headers, so the C compiler checks every use against
# them; setup.py's -Werror=incompatible-pointer-types makes a callback or
# pointer type that disagrees with them a build error.

cdef extern from "<stdint.h>" nogil:
    # Declared here rather than cimported from libc.stdint: Cython's copy says
    # uint64_t is unsigned long long, but on x86-64 glibc it is unsigned long,
    # the type of libxc's xen_pfn_t, and the generated stubs must match
    # libxc's callback signatures exactly.
    ctypedef unsigned short uint16_t
    ctypedef unsigned int uint32_t
    ctypedef signed int int32_t
    ctypedef unsigned long uint64_t

cdef extern from "<stdarg.h>" nogil:
    ctypedef void *va_list "va_list"   # only ever passed through to vsnprintf

cdef extern from "xentoollog.h" nogil:
    ctypedef enum xentoollog_level:
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
        long dirty_count
    ctypedef int (*precopy_policy_t)(precopy_stats stats, void *data) noexcept nogil
    enum:
        XGS_POLICY_ABORT
        XGS_POLICY_CONTINUE_PRECOPY
        XGS_POLICY_STOP_AND_COPY
    # The callbacks' fields: one per table row with a CBFLAGS bit (set by the
    # generated install_<mode>_callbacks) plus the precopy policy.
    cdef struct save_callbacks:
        int (*suspend)(void *data) noexcept nogil
        precopy_policy_t precopy_policy
        int (*postcopy)(void *data) noexcept nogil
        int (*checkpoint)(void *data) noexcept nogil
        int (*wait_checkpoint)(void *data) noexcept nogil
        int (*switch_qemu_logdirty)(uint32_t domid, unsigned int enable, void *data) noexcept nogil
    cdef struct restore_callbacks:
        int (*static_data_done)(unsigned int missing, void *data) noexcept nogil
        int (*suspend)(void *data) noexcept nogil
        int (*postcopy)(void *data) noexcept nogil
        int (*checkpoint)(void *data) noexcept nogil
        int (*wait_checkpoint)(void *data) noexcept nogil
        void (*restore_results)(xen_pfn_t store_gfn, xen_pfn_t console_gfn, void *data) noexcept nogil
    ctypedef enum xc_stream_type_t:
        pass   # only ever cast from the STREAM_TYPE argument (0..2, checked by parse_argv)
    int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom, uint32_t flags,
                       save_callbacks *callbacks, xc_stream_type_t stream_type, int recv_fd)
    int xc_domain_restore(xc_interface *xch, int io_fd, uint32_t dom,
                          unsigned int store_evtchn, unsigned long *store_mfn,
                          uint32_t store_domid, unsigned int console_evtchn,
                          unsigned long *console_mfn, uint32_t console_domid,
                          xc_stream_type_t stream_type, restore_callbacks *callbacks,
                          int send_back_fd)
