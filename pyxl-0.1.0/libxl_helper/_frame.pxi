# _frame.pxi -- the helper's frame runtime (included by _helper.pyx).
#
# Owns the wire framing of the helper -> libxl direction and the replies:
# building a frame (u16 body length, u16 message number, the arguments in host
# byte order, strings as u32 size + bytes + NUL), shortening over-long strings
# so a frame always fits 64 KiB, writing it to fd 1 in one write, and blocking
# for libxl's 4-byte reply on fd 0.  The generated _messages.pxi calls only
# what is defined here (_msg_begin, _put_<wire type>, _string_len,
# _fit_strings, _msg_send, _get_reply).  One static frame buffer: the helper
# is single-threaded and never nests messages (the signal handler sends
# nothing).  Exits with EXIT_FAIL / EXIT_REPLY_LOST (defined by _helper.pyx)
# as Xen's helper does.

from libc.errno cimport errno, EINTR
from libc.stdlib cimport exit, abort
from libc.string cimport memcpy, strlen
from libc.stdio cimport perror
from posix.unistd cimport read, write

from xen cimport uint16_t, uint32_t, int32_t, uint64_t


cdef enum:
    FRAME_BODY_MAX = 0xFFFF # u16 length prefix; Xen asserts body < 64 KiB

# Appended to a string shortened to fit the 64 KiB frame.
cdef const char *TRUNCATED_MARK = "...[truncated]"


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
