"""pyxl-save-helper side by side with Debian's libxl-save-helper (no hypervisor).

Without Xen, both helpers stop at xc_interface_open(): what they send up to
there, and how they die, must match byte for byte.  Also here: our bad-argv
handling (a documented difference), the single thread, and the linked
libraries.  The harness at the top (HelperRun, run_helper, ...) is shared with
test_helper_shim.py and test_helper_sim.py.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import signal
import subprocess
import termios
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import pytest

from pyxl.wire.codec import Decoder, Message, encode_reply

from conftest import DEBIAN_HELPER, HELPER_VECTORS, OUR_HELPER, XEN_RELEASE, needs_debian

HELPER = OUR_HELPER
HELPERS = {"pyxl": HELPER, "debian": DEBIAN_HELPER}
EXIT_USAGE, EXIT_REPLY_LOST, EXIT_FAIL = 2, 254, 255
SYS_READ, SYS_WRITE, SYS_WRITEV = 0, 1, 20   # x86-64 syscall numbers, for /proc/PID/syscall

# argv of the captured "pure" vectors (tests/vectors/xen-4.17-helper/INDEX.md);
# IO_FD/BACK_FD are filled in per run.
SAVE = ["--save-domain", "{io}", "{back}", "5", "0", "136", "0"]
SAVE_LIVE = ["--save-domain", "{io}", "{back}", "5", "1", "136", "0"]
SAVE_REMUS = ["--save-domain", "{io}", "{back}", "5", "1", "184", "1"]
RESTORE = ["--restore-domain", "{io}", "-1", "7", "1", "0", "2", "0", "768", "0"]
RESTORE_COLO = ["--restore-domain", "{io}", "{back}", "7", "1", "0", "2", "0", "888", "2"]



@pytest.fixture(scope="session", autouse=True)
def built_helper():
    if not os.access(HELPER, os.X_OK):
        pytest.fail(f"{HELPER} is not built: run `python setup.py build_ext --inplace`")


# ---------------------------------------------------------------------------
# Harness


def _fd_at_least(fd: int, lowest: int = 50) -> int:
    """dup fd to the lowest free number >= lowest (never clobbers an open fd)."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD, lowest)
    os.close(fd)
    return new


@dataclass
class HelperRun:
    """One helper process on real pipes, driven message by message.

    The stream fd and back-channel fd get numbers >= 50 (the same in every
    run, so argv and any fd numbers libxc logs are identical across helpers).
    stderr goes to a file; ``stdout_capacity`` shrinks the stdout pipe and
    ``prefill`` writes that many bytes into it before the helper starts, so the
    helper's writes block until the test reads.
    """

    exe: str
    argv: Sequence[str]
    mode: Optional[str] = None
    io: Optional[str] = None            # path of the stream file (None: /dev/null)
    io_mode: int = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    io_fd: Optional[int] = None         # or an fd (e.g. a pipe end) to use as IO_FD
    env: Optional[Dict[str, str]] = None
    restore_signals: bool = True        # False: child inherits our SIG_IGN for SIGPIPE
    stdout_capacity: Optional[int] = None
    prefill: Sequence[int] = ()
    broken_stdout: bool = False         # close the read end before the helper starts
    tmp: Optional[str] = None
    messages: List[Message] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.io_fd is not None:
            io = os.dup(self.io_fd)
        elif self.io:
            io = os.open(self.io, self.io_mode, 0o600)
        else:
            io = os.open(os.devnull, os.O_RDWR)
        io = _fd_at_least(io)
        back = _fd_at_least(os.open(os.devnull, os.O_RDWR), io + 1)
        self.args = [a.format(io=io, back=back) for a in self.argv]
        self.stdin_r, self.stdin_w = os.pipe()
        self.stdout_r, self.stdout_w = os.pipe()
        if self.stdout_capacity:
            fcntl.fcntl(self.stdout_w, fcntl.F_SETPIPE_SZ, self.stdout_capacity)
        if self.broken_stdout:
            os.close(self.stdout_r)
            self.stdout_r = os.open(os.devnull, os.O_RDONLY)   # finish() then sees EOF
        for size in self.prefill:   # one write() each: each starts a new pipe buffer
            os.write(self.stdout_w, b"\xee" * size)
        self.stderr_path = os.path.join(self.tmp or "/tmp", f"stderr.{os.getpid()}.{id(self)}")
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(
                [self.exe] + self.args, executable=self.exe, stdin=self.stdin_r,
                stdout=self.stdout_w, stderr=err, pass_fds=(io, back), env=self.env,
                restore_signals=self.restore_signals)
        for fd in (self.stdin_r, self.stdout_w, io, back):
            os.close(fd)
        self.pid = self.proc.pid
        self.decoder = Decoder(self.mode)
        self._queue: List[Message] = []
        self.eof = False
        self.raw = bytearray()

    # -- reading ----------------------------------------------------------
    def _fill(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self._queue and not self.eof:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.stdout_r], [], [], left)[0]:
                raise TimeoutError(f"no message from {self.exe} within {timeout} s "
                                   f"(so far: {[m.name for m in self.messages]})")
            data = os.read(self.stdout_r, 65536)
            if not data:
                self.eof = True
                self.decoder.eof()
                break
            self.raw += data
            self._queue += self.decoder.feed(data)

    def next(self, timeout: float = 10) -> Optional[Message]:
        """The next message, or None at EOF on the helper's stdout."""
        self._fill(timeout)
        if not self._queue:
            return None
        msg = self._queue.pop(0)
        self.messages.append(msg)
        return msg

    def expect(self, name: str, timeout: float = 10) -> Message:
        msg = self.next(timeout)
        assert msg is not None and msg.name == name, f"expected {name}, got {msg}"
        return msg

    def drain_prefill(self) -> None:
        left = sum(self.prefill)
        while left:
            left -= len(os.read(self.stdout_r, left))
        self.prefill = ()

    def stdout_queued(self) -> int:
        """Bytes sitting in the stdout pipe (FIONREAD)."""
        buf = fcntl.ioctl(self.stdout_r, termios.FIONREAD, b"\0\0\0\0")
        return int.from_bytes(buf, "little")

    # -- writing and signals --------------------------------------------------
    def reply(self, value: int) -> None:
        os.write(self.stdin_w, encode_reply(value))

    def close_stdin(self) -> None:
        if self.stdin_w >= 0:
            os.close(self.stdin_w)
            self.stdin_w = -1

    def kill(self, signum: int, timeout: float = 10) -> None:
        """Send signum and wait until the helper has taken it (or died of it).

        Waiting matters: a helper blocked writing to its stdout must see the
        signal while the pipe is still full, before the test reads from it.
        """
        os.kill(self.pid, signum)
        bit = 1 << (signum - 1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    status = dict(line.split(":", 1) for line in f if ":" in line)
            except FileNotFoundError:
                return
            pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
            if not pending & bit or status["State"].split()[0] in ("Z", "X"):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"helper did not take signal {signum}")
            time.sleep(0.001)

    # -- observing ----------------------------------------------------------
    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def syscall(self) -> List[str]:
        with open(f"/proc/{self.pid}/syscall") as f:
            return f.read().split()

    def wait_blocked(self, nr, fd: int, timeout: float = 10) -> None:
        """Wait until the helper sleeps in syscall nr (or one of a tuple) on fd.

        Polls /proc: another process's blocking state has no event to wait on.
        """
        nrs = {str(n) for n in (nr if isinstance(nr, tuple) else (nr,))}
        deadline = time.monotonic() + timeout
        while True:
            call = self.syscall()
            stat = open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()
            if call[0] in nrs and call[1:2] == [hex(fd)] and stat[0] == "S":
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"helper not blocked in syscall {nr} on fd {fd}: {call}")
            time.sleep(0.002)

    # -- finishing ------------------------------------------------------------
    def finish(self, timeout: float = 20) -> "Finished":
        """Read to EOF (no replies), reap, and collect everything."""
        while self.next(timeout) is not None:
            pass
        rc = self.proc.wait(timeout)
        self.close_stdin()
        os.close(self.stdout_r)
        with open(self.stderr_path, "rb") as f:
            err = f.read()
        os.unlink(self.stderr_path)
        return Finished(rc, list(self.messages), bytes(self.raw), err)


@dataclass
class Finished:
    returncode: int
    messages: List[Message]
    stdout: bytes
    stderr: bytes

    def summary(self) -> List[tuple]:
        """(name, level, errnoval, context) per message: what must match exactly."""
        return [(m.name, getattr(m, "level", None), getattr(m, "errnoval", None),
                 getattr(m, "context", None)) for m in self.messages]


def run_helper(exe: str, argv: Sequence[str], tmp, **kw) -> Finished:
    return HelperRun(exe, argv, tmp=str(tmp), **kw).finish()


def assert_same(ours: Finished, theirs: Finished) -> None:
    assert ours.returncode == theirs.returncode
    assert ours.summary() == theirs.summary()
    assert ours.messages == theirs.messages
    assert ours.stdout == theirs.stdout
    assert ours.stderr == theirs.stderr


# ---------------------------------------------------------------------------
# Side by side: without a hypervisor both stop at xc_interface_open.

STARTUP_FAILURE = [
    ("log", 1, 0, "libxl-save-helper"),                  # "starting save|restore"
    ("log", 8, 2, "xencall"),                            # no /dev/xen/privcmd
    ("log", 8, 2, "libxl-save-helper"),                  # "xc_interface_open failed"
]


@needs_debian
@pytest.mark.parametrize("argv, mode", [(SAVE, "save"), (SAVE_LIVE, "save"), (SAVE_REMUS, "save"),
                                        (RESTORE, "restore"), (RESTORE_COLO, "restore")],
                         ids=["save", "live-save", "remus-save", "restore", "colo-restore"])
def test_helper_startup_failure_matches_debian(argv, mode, tmp_path):
    ours = run_helper(HELPER, argv, tmp_path, mode=mode, io=str(tmp_path / "ours.io"))
    theirs = run_helper(DEBIAN_HELPER, argv, tmp_path, mode=mode, io=str(tmp_path / "theirs.io"))
    assert_same(ours, theirs)
    assert ours.returncode == EXIT_FAIL
    assert ours.summary() == STARTUP_FAILURE
    assert [m.formatted for m in ours.messages] == [
        f"starting {mode}", "Could not obtain handle on privileged command interface",
        "xc_interface_open failed"]
    assert (tmp_path / "ours.io").read_bytes() == b""


@pytest.mark.parametrize("vector, argv, mode", [("pure-save", SAVE, "save"),
                                                ("pure-save-live", SAVE_LIVE, "save"),
                                                ("pure-restore", RESTORE, "restore")])
def test_helper_startup_failure_matches_capture(vector, argv, mode, tmp_path):
    """Byte for byte what Debian's helper wrote when the vectors were captured."""
    ours = run_helper(HELPER, argv, tmp_path, mode=mode)
    assert ours.returncode == EXIT_FAIL
    assert ours.stdout == (HELPER_VECTORS / f"{vector}.stdout.bin").read_bytes()
    assert ours.stderr == b""


@needs_debian
def test_helper_stdin_closed_early_matches_debian(tmp_path):
    """libxl gone before start: neither helper reads stdin on the failure path."""
    runs = {}
    for name, exe in HELPERS.items():
        run = HelperRun(exe, SAVE, mode="save", tmp=str(tmp_path))
        run.close_stdin()
        runs[name] = run.finish()
    assert_same(runs["pyxl"], runs["debian"])
    assert runs["pyxl"].returncode == EXIT_FAIL


@needs_debian
@pytest.mark.parametrize("argv", [SAVE, RESTORE], ids=["save", "restore"])
def test_helper_stdout_broken_pipe_matches_debian(argv, tmp_path):
    """libxl closed our stdout: the first write raises SIGPIPE, which kills both."""
    runs = {}
    for name, exe in HELPERS.items():
        runs[name] = run_helper(exe, argv, tmp_path, broken_stdout=True)
        assert runs[name].returncode == -signal.SIGPIPE, name
    assert_same(runs["pyxl"], runs["debian"])
    assert runs["pyxl"].stdout == b"" and runs["pyxl"].stderr == b""


@needs_debian
def test_helper_stdout_broken_pipe_with_sigpipe_ignored_matches_debian(tmp_path):
    """An inherited SIG_IGN for SIGPIPE is left alone: then EPIPE, perror, exit 255."""
    assert signal.getsignal(signal.SIGPIPE) == signal.SIG_IGN   # CPython's default
    runs = {}
    for name, exe in HELPERS.items():
        runs[name] = run_helper(exe, SAVE, tmp_path, restore_signals=False, broken_stdout=True)
    assert_same(runs["pyxl"], runs["debian"])
    assert runs["pyxl"].returncode == EXIT_FAIL
    assert runs["pyxl"].stderr == b"write: Broken pipe\n"


# ---------------------------------------------------------------------------
# Bad command lines: Xen's helper assert()s and dies of SIGABRT; ours explains
# on one line of stderr, writes nothing to stdout, and exits 2.

BAD_ARGV = {
    "no-args": ([], "no mode given; usage: pyxl-save-helper --save-domain IO_FD BACK_FD DOMID "
                    "XCFLAGS CBFLAGS STREAM_TYPE | --restore-domain IO_FD BACK_FD DOMID STORE_EVTCHN "
                    "STORE_DOMID CONSOLE_EVTCHN CONSOLE_DOMID CBFLAGS STREAM_TYPE"),
    "bad-mode": (["--frobnicate-domain", "3"], "unknown mode '--frobnicate-domain'"),
    "save-missing-arg": (["--save-domain", "10", "11", "5", "0", "136"],
                         "--save-domain takes 6 arguments (IO_FD BACK_FD DOMID XCFLAGS CBFLAGS "
                         "STREAM_TYPE), got 5"),
    "save-extra-arg": (["--save-domain", "10", "11", "5", "0", "136", "0", "99"],
                       "--save-domain takes 6 arguments (IO_FD BACK_FD DOMID XCFLAGS CBFLAGS "
                       "STREAM_TYPE), got 7"),
    "restore-missing-arg": (["--restore-domain", "10", "-1", "7", "1", "0", "2", "0", "768"],
                            "--restore-domain takes 9 arguments (IO_FD BACK_FD DOMID STORE_EVTCHN "
                            "STORE_DOMID CONSOLE_EVTCHN CONSOLE_DOMID CBFLAGS STREAM_TYPE), got 8"),
    "mode-only": (["--restore-domain"], "--restore-domain takes 9 arguments"),
}
# Numbers Xen's helper would silently turn into something (atoi/strtoul).
BAD_NUMBERS = {
    "domid-not-numeric": (["--save-domain", "10", "11", "x5", "0", "136", "0"],
                          "--save-domain: DOMID must be a decimal number from 0 to 4294967295, got 'x5'"),
    "domid-trailing-junk": (["--save-domain", "10", "11", "5x", "0", "136", "0"], "DOMID"),
    "domid-empty": (["--save-domain", "10", "11", "", "0", "136", "0"], "got ''"),
    "domid-plus": (["--save-domain", "10", "11", "+5", "0", "136", "0"], "DOMID"),
    "domid-space": (["--save-domain", "10", "11", " 5", "0", "136", "0"], "DOMID"),
    "domid-negative": (["--save-domain", "10", "11", "-1", "0", "136", "0"], "DOMID"),
    "domid-too-big": (["--save-domain", "10", "11", "4294967296", "0", "136", "0"], "DOMID"),
    "domid-hex": (["--save-domain", "10", "11", "0x5", "0", "136", "0"], "DOMID"),
    "io-fd-negative": (["--save-domain", "-1", "11", "5", "0", "136", "0"],
                       "IO_FD must be a decimal number from 0 to 2147483647, got '-1'"),
    "back-fd-below-minus-one": (["--save-domain", "10", "-2", "5", "0", "136", "0"], "BACK_FD"),
    "stream-type-unknown": (["--save-domain", "10", "11", "5", "0", "136", "3"],
                            "STREAM_TYPE must be a decimal number from 0 to 2, got '3'"),
    "cbflags-not-numeric": (["--save-domain", "10", "11", "5", "0", "all", "0"], "CBFLAGS"),
    "store-domid-too-big": (["--restore-domain", "10", "-1", "7", "1", "65536", "2", "0", "768", "0"],
                            "STORE_DOMID must be a decimal number from 0 to 65535, got '65536'"),
    "console-evtchn-unicode-digit": (["--restore-domain", "10", "-1", "7", "1", "0", "\u0662", "0", "768", "0"],
                                     "CONSOLE_EVTCHN"),
}


@pytest.mark.parametrize("argv, text", list({**BAD_ARGV, **BAD_NUMBERS}.values()),
                         ids=list({**BAD_ARGV, **BAD_NUMBERS}))
def test_helper_bad_argv_is_one_line_on_stderr(argv, text, tmp_path):
    done = run_helper(HELPER, argv, tmp_path)
    assert done.returncode == EXIT_USAGE
    assert done.stdout == b""
    err = done.stderr.decode()
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert err.startswith("pyxl-save-helper: ")
    assert text in err


@needs_debian
@pytest.mark.parametrize("vector", ["pure-no-args", "pure-bad-mode", "pure-save-missing-arg",
                                    "pure-save-extra-arg"])
def test_helper_bad_argv_documented_difference_from_debian(vector, tmp_path):
    """The captured bad command lines: Debian aborts, we exit 2 -- neither writes stdout."""
    argv = BAD_ARGV[vector[len("pure-"):]][0]
    theirs = run_helper(DEBIAN_HELPER, argv, tmp_path)
    ours = run_helper(HELPER, argv, tmp_path)
    assert theirs.returncode == -signal.SIGABRT
    assert b"Assertion" in theirs.stderr
    assert ours.returncode == EXIT_USAGE
    assert theirs.stdout == ours.stdout == b""
    assert (HELPER_VECTORS / f"{vector}.stdout.bin").read_bytes() == b""


@pytest.mark.parametrize("argv", [SAVE, RESTORE], ids=["save", "restore"])
def test_helper_accepts_every_value_libxl_sends(argv, tmp_path):
    """Extremes of each range parse (and then fail at xc_interface_open like Debian's)."""
    big = [a if a.startswith(("-", "{")) else str(0xFFFFFFFF) for a in argv]
    if argv is RESTORE:
        big[5] = big[7] = "65535"   # STORE_DOMID, CONSOLE_DOMID are domid_t
    big[-1] = "2"                   # COLO
    done = run_helper(HELPER, big, tmp_path)
    assert done.returncode == EXIT_FAIL
    assert done.summary() == STARTUP_FAILURE


def test_helper_reads_only_its_allocator_variable(tmp_path):
    """Isolated CPython: PYTHON* variables are ignored, a bad PYXL_HELPER_PYTHONMALLOC is not."""
    env = dict(os.environ, PYTHONMALLOC="garbage", PYTHONHOME="/nonexistent",
               PYTHONPATH="/nonexistent", PYTHONSTARTUP="/nonexistent")
    done = run_helper(HELPER, SAVE, tmp_path, env=env)
    assert done.returncode == EXIT_FAIL and done.summary() == STARTUP_FAILURE
    for allocator in ("malloc", "pymalloc", "malloc_debug"):
        done = run_helper(HELPER, SAVE, tmp_path, env=dict(env, PYXL_HELPER_PYTHONMALLOC=allocator))
        assert done.returncode == EXIT_FAIL and done.summary() == STARTUP_FAILURE, allocator
    done = run_helper(HELPER, SAVE, tmp_path, env=dict(env, PYXL_HELPER_PYTHONMALLOC="jemalloc"))
    assert done.returncode == EXIT_USAGE and done.stdout == b""
    assert done.stderr.count(b"\n") == 1 and b"PYXL_HELPER_PYTHONMALLOC=jemalloc" in done.stderr


# ---------------------------------------------------------------------------
# One thread, and the right libraries.


@pytest.mark.parametrize("exe", [HELPER, pytest.param(DEBIAN_HELPER, marks=needs_debian)],
                         ids=["pyxl", "debian"])
@pytest.mark.parametrize("where", ["first-write", "inside-xc_interface_open"])
def test_helper_single_thread_while_blocked_on_stdout(exe, where, tmp_path):
    """Block the helper writing to a full stdout pipe and count its threads.

    At its first write ("starting save") the interpreter is up and the module
    loaded.  At the second (libxencall's error, from inside
    xc_interface_open) every Xen library is loaded and initialised.  The pipe
    is two page-sized buffers: filled, or filled but for room for the first
    frame, which a write may append to the last buffer.
    """
    page = os.sysconf("SC_PAGE_SIZE")
    first_frame = 52   # "starting save", tests/vectors/.../pure-save.decoded.txt
    prefill = [page, page] if where == "first-write" else [page, page - first_frame]
    run = HelperRun(exe, SAVE, mode="save", tmp=str(tmp_path), stdout_capacity=2 * page,
                    prefill=prefill)
    run.wait_blocked(SYS_WRITE, 1)
    assert run.stdout_queued() == 2 * page   # and so: blocked in the frame we meant
    assert run.threads() == 1
    assert "Threads:\t1\n" in open(f"/proc/{run.pid}/status").read()
    run.drain_prefill()
    done = run.finish()
    assert done.returncode == EXIT_FAIL and done.summary() == STARTUP_FAILURE


def _needed(path: str) -> List[str]:
    out = subprocess.run(["readelf", "-d", path], check=True, capture_output=True, text=True).stdout
    return [line.split("[", 1)[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line]


@pytest.mark.skipif(not shutil.which("readelf"), reason="readelf (binutils) not installed")
def test_helper_links_xen_libraries_but_not_libxl():
    needed = _needed(HELPER)
    # built against this host's Xen release (the helper records which: these)
    for lib in (f"libxenctrl.so.{XEN_RELEASE}", f"libxenguest.so.{XEN_RELEASE}",
                "libxentoollog.so.1"):
        assert lib in needed
    assert any(lib.startswith("libpython3") for lib in needed)
    assert not [lib for lib in needed if "xenlight" in lib or "xenstore" in lib]
    ldd = subprocess.run(["ldd", HELPER], check=True, capture_output=True, text=True).stdout
    assert "not found" not in ldd
    assert "libxenlight" not in ldd and "libxenstore" not in ldd   # xenstore starts threads


@needs_debian
@pytest.mark.skipif(not shutil.which("readelf"), reason="readelf (binutils) not installed")
def test_helper_links_the_same_xen_libraries_as_debian():
    ours = {lib for lib in _needed(HELPER) if lib.startswith("libxen")}
    assert ours == {lib for lib in _needed(DEBIAN_HELPER) if lib.startswith("libxen")}


@pytest.mark.parametrize("argv", [SAVE, RESTORE], ids=["save", "restore"])
@pytest.mark.parametrize("value", ["-1", "abc", "60001", "nan"])
def test_helper_refuses_a_bad_progress_interval(argv, value, tmp_path):
    """PYXL_PROGRESS_INTERVAL_MS (pyxl's host sets it; libxl never does) is read
    in both modes: a bad value is a usage error, one line, nothing on stdout."""
    done = run_helper(HELPER, argv, tmp_path,
                      env=dict(os.environ, PYXL_PROGRESS_INTERVAL_MS=value))
    assert done.returncode == EXIT_USAGE and done.stdout == b""
    err = done.stderr.decode()
    assert err.count("\n") == 1 and "PYXL_PROGRESS_INTERVAL_MS must be a number from 0 to " \
        "60000, got" in err, err
