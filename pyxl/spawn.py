"""Starting child processes without the loop ever waiting for one.

``subprocess`` and ``posix_spawn`` return only once the child has exec'd
(vfork semantics: the parent sleeps meanwhile).  Quiet, that is 1-3 ms; with
the CPUs busy -- 16 helpers on 2 CPUs -- the child first waits for a CPU, and
the parent, once woken, waits again: 20-150 ms measured inside one loop
callback.  So pyxl does not start its children itself.  A small native
process, ``pyxl-spawner`` (``spawner/spawner.c``, one per pyxl process,
started on first use), does it: the loop sends a request (argv, env, the fds
the child gets) on a socket, and the answer -- the pid and a pidfd, or why
the exec failed -- comes back on a socket of its own, read from the loop.

The children are still pyxl's own: the spawner clones them with
``CLONE_PARENT``, so pyxl reaps them and gets their exit status as if it had
forked them.  :class:`Child` is such a child, watched through its pidfd (no
SIGCHLD handler).  An application that set SIGCHLD to SIG_IGN (the kernel
then reaps, and ``waitpid`` fails with ECHILD) gets ``status`` None.

They run at the priority of the thread that asked for them, as after a
fork, or :func:`set_child_nice` nicer (the application's trade-off: a loop
that keeps its CPU against bulk work that yields it to everyone).

The spawner, and so every child, runs in a session of its own.  Where the
kernel groups tasks by session for scheduling (autogroup: Debian's kernels,
``/proc/sys/kernel/sched_autogroup_enabled``), pyxl's children then share one
group's weight, however many there are, and the application's session keeps
its own: 16 CPU-bound helpers do not make the loop wait 16 turns for a CPU
(bench/stall.py: the longest callback 180-210 ms by the wall clock before,
12-39 ms after, with another tenant busy).  The children still get every CPU
the loop leaves idle.  Tasks in a cgroup of their own (a systemd service with
the cpu controller) are not grouped this way; there the service's cgroup
decides.

May import: pyxl.loop, pyxl.fdio, pyxl._paths.
"""

from __future__ import annotations

import array
import collections
import errno
import fcntl
import os
import signal
import socket
import struct
import subprocess
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple, TypeVar

from pyxl._paths import package_file
from pyxl.fdio import close_quietly
from pyxl.loop import Loop, Timer, ignore

__all__ = ["Child", "MAX_REQUEST", "SPAWNER_NAME", "child_nice", "inherited_stderr", "set_child_nice",
           "set_own_session", "spawner_pid", "start_spawner"]

SPAWNER_NAME = "pyxl-spawner"
#: The longest request the spawner reads (spawner.c's MAX_MSG): a start's path,
#: argv and environment, each with its NUL, and some 40 bytes more.
MAX_REQUEST = 256 * 1024
_REPLY = struct.Struct("=iiI")          # pid, errno, stage
_STAGES = {1: "the spawner refused the request", 2: "clone", 3: "its fds", 4: "chdir",
           5: "exec"}


T = TypeVar("T")

# How much nicer than the caller pyxl's children run (see set_child_nice).
_child_nice = 0


def set_child_nice(increment: int) -> None:
    """Run the children started from now on (helpers, compressors, file
    finishers, ...) ``increment`` (0-19) nicer than the calling thread.  0,
    the default, is what a fork gives: the caller's priority, as libxl runs
    its helper.

    A trade-off, so the application's to make.  With 16 saves on 2 CPUs at
    the loop's own priority, in the caller's session, the loop is preempted
    inside its callbacks and its longest one took 25-250 ms of wall time
    (``bench/stall.py``); at +10, 8-17 ms.  In their own session (the
    default, see above) the children's scheduling group gets the increment
    too.  But at +10 the children get a tenth of a CPU against any busy
    process at the caller's priority: on a busy dom0, a live migration that
    must outpace its guest's dirtying could then never converge."""
    global _child_nice
    if isinstance(increment, bool) or not isinstance(increment, int) or not 0 <= increment <= 19:
        raise ValueError(f"child nice increment must be an integer in 0..19, not {increment!r}")
    _child_nice = increment
    _group_nice()


def _group_nice() -> None:
    """Under autogroup the children's session is one scheduling group, which
    their own nice only orders within: the group itself gets the increment
    (``/proc/PID/autogroup``; raising it needs no privilege)."""
    if _spawner is None or _spawner.pid != os.getpid() or not _spawner.own_session:
        return
    try:
        with open(f"/proc/{_spawner.proc.pid}/autogroup", "w") as f:
            f.write(str(_child_nice))
    except OSError:
        pass        # no autogroup in this kernel: the children's nice is all there is


# Whether the spawner, and so every child, runs in a session of its own.
_own_session = True


def set_own_session(own: bool) -> None:
    """Run pyxl's children in a session of their own (True, the default: see
    the module's docstring) or in the caller's (False: on an autogroup kernel
    they then compete with the application's loop one by one, as a fork's
    children do).  Takes effect at the next start: a running spawner of the
    other kind is let go (it answers what it was asked, then exits; this call
    waits for that, briefly: not for a loop's callback)."""
    global _own_session, _spawner
    _own_session = bool(own)
    if _spawner is not None and _spawner.pid == os.getpid() and \
            _spawner.own_session != _own_session and not _spawner.pending:
        old, _spawner = _spawner, None
        old.close()
        try:
            old.proc.wait(timeout=5)     # reaped: no zombie of ours is left behind
        except subprocess.TimeoutExpired:
            pass                         # answering what is in flight; reaped later


def child_nice() -> int:
    """The increment :func:`set_child_nice` set."""
    return _child_nice


def _paired(hand_over: Callable[[int], T]) -> Tuple[socket.socket, T]:
    """A SOCK_SEQPACKET pair: ``hand_over(fd)`` gives the far end away (to a
    child, or in a request); ours comes back, non-blocking, with its result."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        result = hand_over(theirs.fileno())
    except BaseException:
        ours.close()
        raise
    finally:
        theirs.close()
    ours.setblocking(False)
    return ours, result


class _Spawner:
    """The running spawner of this process (a new one after a fork, or if it died)."""

    def __init__(self) -> None:
        exe = package_file(SPAWNER_NAME)
        if not os.access(exe, os.X_OK):
            raise OSError(errno.ENOENT, f"{exe} is missing: build pyxl (`make build`)")
        # Its own session (so its own process group: a terminal's Ctrl-C is
        # pyxl's to handle; and its own scheduling group, see above).
        # Our end never blocks: the kernel queues only a few messages on it
        # (net.unix.max_dgram_qlen, 10 by default), so with many starts at once
        # the rest wait in ``pending`` (below), not in sendmsg.
        self.sock, self.proc = _paired(lambda fd: subprocess.Popen(
            [exe], stdin=fd, stdout=subprocess.DEVNULL, close_fds=True,
            **({"start_new_session": True} if _own_session else {"process_group": 0})))
        self.own_session = _own_session
        self.pid = os.getpid()
        # The longest request the kernel takes on this socket (its send buffer,
        # less the kernel's own 32 bytes), at most what the spawner reads.
        try:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, MAX_REQUEST + 4096)
        except OSError:
            pass        # the host's cap (net.core.wmem_max) stands
        self.max_request = min(MAX_REQUEST,
                               self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32)
        #: requests that found the socket full: (payload, our copies of their fds)
        self.pending: Deque[Tuple[bytes, List[int]]] = collections.deque()

    def send(self, payload: bytes, fds: Sequence[int]) -> None:
        self.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                       array.array("i", fds))])

    def queue(self, payload: bytes, fds: Sequence[int]) -> None:
        """Keep a request (and copies of its fds: the caller closes its own) for
        :func:`_flush`."""
        copies: List[int] = []
        try:
            for fd in fds:
                copies.append(os.dup(fd))
        except OSError:
            for fd in copies:
                os.close(fd)
            raise
        self.pending.append((payload, copies))

    def close(self) -> None:
        self.sock.close()
        while self.pending:
            for fd in self.pending.popleft()[1]:
                os.close(fd)
        self.proc.poll()        # reap it if it is gone


_spawner: Optional[_Spawner] = None


def start_spawner() -> None:
    """Start this process's spawner now, if it does not run.  Optional: the first
    :class:`Child` does it otherwise (a fork+exec, waited for, once).  It holds
    one socket of ours until the process exits."""
    global _spawner
    if _spawner is None or _spawner.pid != os.getpid():
        # After a fork the parent's spawner is not ours (its children would
        # be the parent's): ours is a new one; the inherited socket is left
        # alone (closing it here is harmless, but it is not ours to manage).
        _spawner = _Spawner()
        if _child_nice:
            _group_nice()


def spawner_pid() -> Optional[int]:
    """The pid of this process's spawner, if it runs (a child of ours, like the
    processes it starts)."""
    if _spawner is None or _spawner.pid != os.getpid():
        return None
    return _spawner.proc.pid


def _restart() -> _Spawner:
    """The spawner died (its socket broke): a new one takes the pending requests.
    Requests it had taken and not answered fail (their reply sockets see EOF)."""
    global _spawner
    assert _spawner is not None
    old = _spawner
    pending, old.pending = old.pending, collections.deque()
    old.close()
    _spawner = None
    start_spawner()
    assert _spawner is not None
    _spawner.pending = pending
    return _spawner


def _send(payload: bytes, fds: Sequence[int]) -> bool:
    """To this process's spawner (starting one if there is none), now (True) or,
    if its socket is full, at a later :func:`_flush` (False).  Never waits."""
    start_spawner()
    assert _spawner is not None
    if len(payload) > _spawner.max_request:
        # Refused here, not queued: the kernel would refuse it at every try.
        raise OSError(errno.E2BIG, f"argument list and environment too long for "
                      f"{SPAWNER_NAME} ({len(payload)} bytes; at most {_spawner.max_request})")
    if _spawner.pending:
        _spawner.queue(payload, fds)      # in order
        _flush()
        return not _still_pending()
    for attempt in (1, 2):
        try:
            _spawner.send(payload, fds)
            return True
        except BlockingIOError:
            _spawner.queue(payload, fds)
            return False
        except (BrokenPipeError, ConnectionResetError):
            if attempt == 2:
                raise
            _restart()
    return True     # not reached: the second attempt returns or raises


def _still_pending() -> bool:
    return _spawner is not None and bool(_spawner.pending)


def _flush() -> None:
    """Send what waits for room on the spawner's socket, in order, as far as it
    goes.  Called at each answer: an answer means the spawner took a request,
    so while requests wait, answers keep coming."""
    spawner = _spawner
    if spawner is None or spawner.pid != os.getpid():
        return
    while spawner.pending:
        payload, fds = spawner.pending[0]
        try:
            spawner.send(payload, fds)
        except BlockingIOError:
            return
        except (BrokenPipeError, ConnectionResetError):
            spawner = _restart()
            continue
        except OSError:
            # This one cannot be sent (ENOBUFS, ...): it is dropped, its reply
            # socket's far end closed with it, so its Child fails ("did not
            # answer"); the requests behind it go on.
            pass
        spawner.pending.popleft()
        for fd in fds:
            os.close(fd)


#: Programs found on PATH, by (name, PATH), as a shell hashes them: a search
#: is two syscalls per PATH entry (a dozen entries here, some slow beside a
#: busy disk), and the sim backend starts an ``rm`` from the loop as each
#: save ends.  A remembered path is checked (as a shell does), not trusted.
_found: Dict[Tuple[str, str], str] = {}


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def _which(name: str, env: Mapping[str, str]) -> str:
    if "/" in name:
        return name
    search = env.get("PATH", os.defpath)
    path = _found.get((name, search))
    if path is not None and _executable(path):
        return path
    for d in search.split(os.pathsep):
        path = os.path.join(d or ".", name)
        if _executable(path):
            if len(_found) < 64:
                _found[(name, search)] = path
            return path
    raise FileNotFoundError(errno.ENOENT, f"{name}: not found on PATH", name)


def _cpu_mask() -> bytes:
    """This thread's CPU affinity as a kernel cpumask (bytes, CPU 0 first)."""
    bits = 0
    for cpu in os.sched_getaffinity(0):
        bits |= 1 << cpu
    return bits.to_bytes((bits.bit_length() + 63) // 64 * 8, "little")


def _request(path: str, argv: Sequence[str], env: Mapping[str, str], targets: Sequence[int],
             flags: int) -> bytes:
    """What a fork here would give the child: our cwd and CPU affinity, and our
    nice plus :func:`set_child_nice`'s increment."""
    try:
        cwd = os.getcwd()
    except OSError:     # removed under us: the child starts in the spawner's
        cwd = ""
    strings = [path, cwd, *argv, *(f"{k}={v}" for k, v in env.items())]
    mask = _cpu_mask()
    return (b"PXS1" + struct.pack(f"=II{len(targets)}iiI", flags, len(targets),
                                  *targets, min(19, os.getpriority(os.PRIO_PROCESS, 0) + _child_nice),
                                  len(mask))
            + mask + struct.pack("=II", len(argv), len(env))
            + b"".join(os.fsencode(s) + b"\0" for s in strings))


def _inheritable_fds() -> List[int]:
    """Our fds that an exec would pass on (not close-on-exec)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.get_inheritable(int(name)):
                out.append(int(name))
        except OSError:     # listdir's own fd, closed by now
            pass
    return out


def inherited_stderr() -> Dict[int, int]:
    """``fds`` entry giving a child our stderr (none if ours is closed)."""
    try:
        os.fstat(2)
    except OSError:
        return {}
    return {2: 2}


class Child:
    """A child process running ``argv``, started through the spawner (or, with
    ``new_group=False``, by this thread: see :meth:`_start_here`).

    ``fds`` maps the child's fd numbers to ours (the child gets copies; 0-2
    not given are /dev/null, nothing else is inherited).  ``exited(status)``
    comes once, from ``loop``: the exit code as :mod:`subprocess` reports it
    (-N: killed by signal N), or None if its status was lost (reaped
    elsewhere).  If the program never ran, ``start_error`` says why (an
    OSError, e.g. FileNotFoundError) and ``exited(None)`` follows.  ``pid`` is
    -1 until the spawner has answered (then ``started()``, if given, runs);
    a signal sent before that is delivered then.  Errors in the request itself
    (no such program on PATH, no fds) raise OSError here.  ``new_session``:
    the child leads a session of its own (``setsid``, as a daemon such as
    QEMU is started), not only a process group."""

    def __init__(self, loop: Loop, argv: Sequence[str], exited: Callable[[Optional[int]], None],
                 *, fds: Optional[Mapping[int, int]] = None,
                 env: Optional[Mapping[str, str]] = None, new_group: bool = True,
                 new_session: bool = False,
                 started: Optional[Callable[[], None]] = None) -> None:
        self.loop = loop
        self.argv = list(argv)
        self._exited_cb = exited
        self._started_cb = started
        self.pid = -1
        self.start_error: Optional[OSError] = None
        self.finished = False
        self.wait_status: Optional[int] = None   # os.waitpid's, when known
        self._pidfd = -1
        self._pending: List[int] = []
        self._killed = False
        env = dict(os.environ if env is None else env)
        fds = dict(fds or {})
        self._reply: Optional[socket.socket] = None
        self._retry: Optional[Timer] = None
        if not new_group:
            self._start_here(_which(self.argv[0], env), fds, env)
            return
        payload = _request(_which(self.argv[0], env), self.argv, env, list(fds),
                           2 if new_session else 1)
        ours, sent = _paired(lambda fd: _send(payload, [fd, *fds.values()]))
        self._reply = ours
        loop.add_reader(ours.fileno(), self._answered)
        self._hold(True)     # a private loop runs on until the spawner has answered
        # Queued (the spawner's socket was full): the answers to earlier
        # requests send it; this loop also tries, in case those answers are
        # read by a loop that is not running.
        self._retry = None if sent else loop.call_later(0.005, self._resend)

    def _start_here(self, path: str, fds: Dict[int, int], env: Mapping[str, str]) -> None:
        """``new_group=False``: posix_spawn from this thread, so that the child
        is in our process group and session, with our terminal (a migration's
        ssh may ask for a password).  Waited for until its exec: once, at a
        migration's start, before any helper runs."""
        top = max([2, *fds])
        copies: Dict[int, int] = {}
        try:
            # Each source above every target first: no dup2 clobbers a source.
            for target, src in fds.items():
                copies[target] = fcntl.fcntl(src, fcntl.F_DUPFD_CLOEXEC, top + 1)
            actions: List[Tuple[Any, ...]] = [
                (os.POSIX_SPAWN_OPEN, t, os.devnull, os.O_RDWR, 0) for t in (0, 1, 2)
                if t not in copies]
            actions += [(os.POSIX_SPAWN_DUP2, copy, t) for t, copy in copies.items()]
            # and nothing else of ours (an application's fds may be inheritable)
            actions += [(os.POSIX_SPAWN_CLOSE, fd) for fd in _inheritable_fds()
                        if fd > 2 and fd not in copies]
            policy = os.sched_getscheduler(0) & ~getattr(os, "SCHED_RESET_ON_FORK", 0)
            if policy in (os.SCHED_FIFO, os.SCHED_RR):   # never real-time, as the spawner's
                self.pid = os.posix_spawn(path, self.argv, env, file_actions=actions,
                                          scheduler=(os.SCHED_OTHER, os.sched_param(0)))
            else:
                self.pid = os.posix_spawn(path, self.argv, env, file_actions=actions)
        finally:
            for copy in copies.values():
                os.close(copy)
        try:
            self._pidfd = os.pidfd_open(self.pid)
        except ProcessLookupError:     # already reaped (SIGCHLD ignored): status unknown
            self.loop.call_later(0, lambda: self._end(None))
            return
        self.loop.call_later(0, self._began)

    def _resend(self) -> None:
        self._retry = None
        _flush()
        if self._reply is not None and _still_pending():
            self._retry = self.loop.call_later(0.005, self._resend)

    @property
    def running(self) -> bool:
        return not self.finished

    def _answered(self) -> None:
        sock = self._reply
        assert sock is not None
        try:
            # close-on-exec: a program the application starts keeping its
            # fds does not get our children's pidfds
            data, anc, _flags, _addr = sock.recvmsg(_REPLY.size, socket.CMSG_SPACE(4),
                                                    socket.MSG_CMSG_CLOEXEC)
        except BlockingIOError:
            return
        except OSError as exc:
            data, anc = b"", []
            self.start_error = exc
        self.loop.remove_reader(sock.fileno())
        sock.close()
        self._reply = None
        self._hold(self._killed)    # a killed child is held until it is reaped
        if self._retry is not None:
            self._retry.cancel()
            self._retry = None
        _flush()
        for level, kind, body in anc:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS and len(body) >= 4:
                self._pidfd = array.array("i", body[:4])[0]
        if len(data) != _REPLY.size:
            # The spawner died before answering: whatever it started (if
            # anything) cannot be told apart here.
            self.start_error = self.start_error or OSError(
                errno.ECHILD, "pyxl-spawner did not answer (it ended, or the request could not "
                "be sent)")
            self._end(None)
            return
        pid, err, stage = _REPLY.unpack(data)
        self.pid = pid
        if err:
            why = os.strerror(err) if stage == 5 else (
                f"{os.strerror(err)} ({_STAGES.get(stage, stage)})")
            self.start_error = OSError(err, why, self.argv[0])
        if self._pidfd < 0:
            self._end(None)
            return
        self._began()

    def _began(self) -> None:
        self.loop.add_reader(self._pidfd, self._gone)
        for signum in self._pending:
            self.signal(signum)
        self._pending.clear()
        if self.start_error is None and self._started_cb is not None:
            self._started_cb()

    def _gone(self) -> None:
        try:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
        except ChildProcessError:
            pid, status = self.pid, -1       # reaped by the kernel (SIGCHLD ignored) or someone
        if pid == 0:
            return                           # a spurious wake-up: not gone yet
        try:
            self.loop.remove_reader(self._pidfd)
        except RuntimeError:                 # from poll(): its loop is closed
            pass
        close_quietly(self._pidfd)
        self._pidfd = -1
        if status == -1:
            self._end(None)
        else:
            self.wait_status = status
            self._end(os.waitstatus_to_exitcode(status))

    def _end(self, code: Optional[int]) -> None:
        if not self.finished:
            self.finished = True
            self._hold(False)
            exited, self._exited_cb = self._exited_cb, ignore
            self._started_cb = None
            # The callbacks' owner (which holds this Child) is no longer held
            # here: refcounting frees them both, not the cyclic collector
            # inside some later callback.
            exited(None if self.start_error is not None else code)

    def poll(self) -> bool:
        """Is it still running?  Reaps it now if it has exited (for a child
        whose loop no longer runs: ``exited`` is then called from here)."""
        if not self.finished and self._pidfd >= 0:
            self._gone()
        return not self.finished

    def signal(self, signum: int) -> None:
        """Send ``signum`` (through the pidfd: never to a reused pid)."""
        if self.finished:
            return
        if self._pidfd < 0:
            self._pending.append(signum)
            return
        try:
            signal.pidfd_send_signal(self._pidfd, signum)
        except ProcessLookupError:
            pass

    def kill(self) -> None:
        if not self.finished:
            self._killed = True
            self._hold(True)
        self.signal(signal.SIGKILL)

    def _hold(self, on: bool) -> None:
        """Keep a private loop (:func:`pyxl.loop.run_private`) running for
        this child: one whose step ended while the spawner had not answered,
        or that was killed and is not yet reaped, is otherwise never signalled
        or reaped (other loops run on anyway)."""
        hold = getattr(self.loop, "hold" if on else "release", None)
        if hold is not None:
            hold(self)

    def forget(self) -> None:
        """No callback; it is still reaped when it ends."""
        self._exited_cb = ignore

