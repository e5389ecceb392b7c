"""zstd stages: a child process between the helper and the sink, or between
the source and the restore.

A compressed pyxl image is one zstd frame, with zstd's content checksum, of
the plain xl image: ``zstd -d`` turns it back into exactly what ``xl
restore`` reads.  The helper stays Xen's (it writes and reads a plain libxc
stream on a pipe) and the loop never compresses: a short child of
:mod:`pyxl.childproc` does, reading a pipe and writing the file or the
connection (``compress``), or reading the file or the connection and writing
a pipe that the restore reads (``decompress``).  The child is Python with the
``zstandard`` package (libzstd; as fast as Debian's ``zstd`` CLI here, see
bench/README.md), because a decompressor for a migration must stop at the end
of its frame by itself: the connection stays open for the handshake after the
stream, so no EOF ever comes.

A decompressor parses the frame's block headers itself and hands zstd whole
blocks, at most 1 MiB of output per call, so its memory stays bounded
whatever the ratio (4 bytes of RLE block are 128 KiB of output).  It refuses
a frame without a checksum, a truncated or corrupt frame, a checksum that
does not match, and bytes after the frame; it exits 0
only when the whole frame was checked, so a restore unpauses only after
that (:meth:`ZstdStage.wait`).  Errors are one line, from the child.

May import: pyxl.childproc, pyxl.fdio, pyxl.loop, pyxl.stream.xl (the magic).
"""

from __future__ import annotations

import os
import sys
from typing import Callable, List, Optional

from pyxl.childproc import ShortChild
from pyxl.fdio import read_ready, set_nonblocking
from pyxl.loop import Loop
from pyxl.stream.xl import ZSTD_MAGIC as MAGIC

__all__ = ["MAGIC", "DEFAULT_LEVEL", "ZstdStage", "is_zstd", "stage_argv"]

#: zstd level of ``--compress``.  Measured on 1 GiB of ``typical`` guest
#: memory (bench/README.md): -1 compresses as well as 1 (0.332 of the size
#: against 0.331) in 10-20 % less time; higher levels are slower.
DEFAULT_LEVEL = -1
#: zstd's own worker threads in the compressor child (the child's main
#: thread reads and writes; the helper stays single-threaded): 2 cut a 1 GiB
#: ``typical`` save from 1.9 s to 1.4 s here (2 CPUs).
THREADS = 2


def is_zstd(prefix: bytes) -> bool:
    return prefix[:4] == MAGIC


# The child's program, run with -I (no user site, no environment; the venv's
# site-packages, where zstandard is).  argv: MODE PROGRESS_FD [LEVEL THREADS].  MODE: compress,
# decompress (stop at the frame's end: a connection stays open after it) or
# decompress-file (then nothing may follow the frame).  Non-blocking fds
# (a description shared with the loop) are waited for with select.  Errors
# are one line on stderr; success ends with the _OK of pyxl.childproc.
_PROGRAM = r"""
import os, select, sys
mode, pfd = sys.argv[1], int(sys.argv[2])
CHUNK = 1 << 20
IDLE = 0.02      # s without input after which a compressor flushes what it holds
raw = said = 0
def report(final=False):
    # raw (uncompressed) bytes so far, a line per MiB on the progress fd:
    # advisory (a full pipe skips a line)
    global said
    if pfd >= 0 and (raw - said >= 1 << 20 or final and raw != said):
        said = raw
        try:
            os.write(pfd, b"%d\n" % raw)
        except OSError:
            pass
def fail(why, status=1):
    sys.stderr.write(why + "\n")
    sys.exit(status)
try:
    import zstandard
except ImportError:
    fail("zstd needs Python's zstandard package in pyxl's environment (pip install zstandard)", 3)
def read():
    while True:
        try:
            return os.read(0, CHUNK)
        except BlockingIOError:
            select.select([0], [], [])
def write_all(data):
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(1, view):]
        except BlockingIOError:
            select.select([], [1], [])
try:
    if mode == "compress":
        c = zstandard.ZstdCompressor(level=int(sys.argv[3]), threads=int(sys.argv[4]),
                                     write_checksum=True).compressobj()
        held = False     # input taken that zstd (its worker threads) may still hold
        while True:
            if held and not select.select([0], [], [], IDLE)[0]:
                # The writer paused (a precopy round ended, the helper waits
                # for the suspend): flush what zstd holds, so that everything
                # taken so far reaches the receiver and the downtime is not
                # spent in a compressor's buffer.
                write_all(c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK))
                held = False
                report(True)
                continue
            data = read()
            if not data:
                break
            out = c.compress(data)
            if out:
                write_all(out)
            raw += len(data)
            held = True
            report()
        write_all(c.flush())
        report(True)
    else:
        # Whole blocks at a time (RFC 8878's framing, parsed here), at most
        # BATCH of output per call (1 MiB: measured fastest): zstd's
        # decompressobj returns everything a call yields, and 4 bytes of RLE
        # block decompress to 128 KiB (a 1 MiB read fed whole could be 32 GiB).
        # The frame's end is known exactly.
        BATCH = 1 << 20
        d = zstandard.ZstdDecompressor().decompressobj()
        buf = bytearray()
        base = 0         # image offset of buf[0]
        def have(n):
            # at least n bytes in buf, or the image ends inside the frame
            global buf
            while len(buf) < n:
                data = read()
                if not data:
                    fail("the compressed image is truncated: it ends inside its zstd frame, "
                         "after %d bytes" % (base + len(buf)))
                buf += data
        def feed(start, end):
            with memoryview(buf) as mv:
                return d.decompress(mv[start:end])
        have(5)
        if buf[:4] != b"\x28\xb5\x2f\xfd":
            fail("not a zstd frame: the image starts with %s" % bytes(buf[:4]).hex())
        fhd = buf[4]
        if not fhd & 4:
            fail("the compressed image carries no content checksum: pyxl restores "
                 "only checked images (zstd --check)")
        pos = 5 + (0 if fhd & 0x20 else 1) + (0, 1, 2, 4)[fhd & 3] \
            + (1 if fhd & 0x20 else 0, 2, 4, 8)[fhd >> 6]
        have(pos)
        feed(0, pos)
        last = False
        while not last:
            del buf[:pos]            # what zstd has had
            base += pos
            pos = bound = 0
            while not last and bound < BATCH:
                have(pos + 3)
                h = int.from_bytes(buf[pos:pos + 3], "little")
                last, kind, size = h & 1, (h >> 1) & 3, h >> 3
                if kind == 3 or size > 128 << 10:
                    fail("the compressed image is corrupt: a bad block header at offset %d"
                         % (base + pos))
                pos += 3 + (1 if kind == 1 else size)
                bound += 128 << 10 if kind == 2 else size
                have(pos)
            out = feed(0, pos)
            write_all(out)
            raw += len(out)
            report()
        have(pos + 4)
        feed(pos, pos + 4)             # the checksum: zstd compares it
        pos += 4
        report(True)
        if not d.eof:
            fail("the compressed image is corrupt: its frame does not end after its last block")
        extra = len(buf) - pos
        if mode == "decompress-file" and not extra:
            extra = len(read())
        if extra:
            fail("bytes follow the compressed image's zstd frame (at offset %d)" % (base + pos))
except zstandard.ZstdError as exc:
    fail("the compressed image is corrupt: %s" % str(exc).replace("zstd decompressor error: ", ""))
except BrokenPipeError:
    fail("its reader went away", 4)
except OSError as exc:
    fail("%s: %s" % ("writing" if mode == "compress" else "reading", exc.strerror or exc))
sys.stderr.write("\nok\n")
"""

def stage_argv(mode: str, level: int = DEFAULT_LEVEL, progress_fd: int = -1) -> List[str]:
    """The child's command line (stdin to stdout); its stderr's last line says
    why it failed, its exit status 0 that the whole frame passed.  With
    ``progress_fd``, it writes there a line per MiB: the raw (uncompressed)
    bytes it has read (compress) or written (decompress) so far."""
    argv = [sys.executable or "python3", "-I", "-c", _PROGRAM, mode, str(progress_fd)]
    if mode == "compress":
        argv += [str(level), str(THREADS)]
    return argv


#: ``done(why)``: None once the stage exited 0, else its one-line reason.
StageDone = Callable[[Optional[str]], None]


class ZstdStage:
    """One zstd child: ``mode`` "compress" (``level``), "decompress" or
    "decompress-file", reading ``stdin_fd`` and writing ``stdout_fd`` (the
    caller closes its own copies of the ends it gave away).

    ``failed(why)`` from the loop if it fails before :meth:`wait` was
    called (the caller stops the operation); after :meth:`wait`,
    ``done(why)``.  :meth:`stop` kills it (the stream is abandoned).
    :attr:`raw` follows the uncompressed bytes it has handled (to the MiB)."""

    def __init__(self, loop: Loop, mode: str, stdin_fd: int, stdout_fd: int,
                 failed: Callable[[str], None], level: int = DEFAULT_LEVEL) -> None:
        self.mode = mode
        self.loop = loop
        self.why: Optional[str] = None
        self.status: Optional[int] = None
        self.killed = False
        self.raw = 0
        self._failed = failed
        self._done: Optional[StageDone] = None
        self._partial = b""
        self._progress, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        try:
            self.child = ShortChild(loop, stage_argv(mode, level, w), self._exited,
                                    stdin_from=stdin_fd, stdout_to=stdout_fd, pass_fds=(w,))
        except BaseException:
            os.close(self._progress)
            raise
        finally:
            os.close(w)
        loop.add_reader(self._progress, self._read_progress)

    def _read_progress(self) -> None:
        if self._progress < 0:
            return
        data, eof = read_ready(self._progress)
        lines = (self._partial + data).split(b"\n")
        self._partial = lines.pop()
        if lines and lines[-1].isdigit():
            self.raw = int(lines[-1])
        if eof:
            self.loop.remove_reader(self._progress)
            os.close(self._progress)
            self._progress = -1

    @property
    def finished(self) -> bool:
        return self.child.finished

    def _exited(self, status: int, err: str) -> None:
        self.status = status
        self._read_progress()      # its last words, then EOF: closed
        if status != 0:
            self.why = ("killed" if self.killed else
                        err.splitlines()[-1] if err else f"zstd exited with status {status}")
        if self._done is not None:
            done, self._done = self._done, None
            done(self.why)
        elif status != 0 and not self.killed:
            self._failed(self.why or "")
        # else: it ended well before anyone waited: wait() reports it at once

    def wait(self, done: StageDone) -> None:
        """``done(why)`` once the child has exited (at once if it has)."""
        if self.child.finished:
            done(self.why)
            return
        self._done = done

    @property
    def refused(self) -> bool:
        """Did it exit because of the image (not killed, not its reader gone)?"""
        return self.status in (1, 3) and not self.killed

    def finish_reading(self, loop: Loop, fd: int, done: StageDone) -> None:
        """A decompressor's reader has read its whole stream from ``fd`` (the
        pipe's read end, non-blocking): nothing more may come out -- bytes
        after END are a frame that holds more than its stream -- then the
        child's verdict (the checksum is checked at the frame's end)."""
        def readable() -> None:
            try:
                data = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError as exc:
                data, why = b"", exc.strerror
            else:
                why = None
            loop.remove_reader(fd)
            if data:
                self.stop(lambda: done("the compressed image decompresses to more than its "
                                       "stream: bytes follow the stream's END record"))
            elif why is not None:
                self.stop(lambda: done(f"reading the decompressed stream: {why}"))
            else:
                self.wait(done)

        set_nonblocking(fd)
        loop.add_reader(fd, readable)

    def settle(self, loop: Loop, grace: float, then: Callable[[], None]) -> None:
        """The stream failed: let the child end (it may be saying why), kill
        it after ``grace`` seconds; ``then()`` once it is reaped."""
        if self.child.finished:
            then()
            return
        timer = loop.call_later(grace, lambda: self.stop(then))

        def ended(why: Optional[str]) -> None:
            timer.cancel()
            then()
        self._done = ended

    def stop(self, then: Callable[[], None]) -> None:
        """Kill it (unless it has exited); ``then()`` once it is reaped."""
        if self.child.finished:
            then()
            return
        self.killed = True
        self._done = lambda why: then()
        self.child.kill()
