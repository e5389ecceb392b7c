"""pyxl.spawn: children started by pyxl-spawner, without the loop waiting for them."""

from __future__ import annotations

import array
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Dict, List, Optional, Tuple

import pytest

from conftest import ROOT, children, open_fds
from pyxl import spawn
from pyxl.loop import SelectorLoop
from pyxl.spawn import Child, set_child_nice, set_own_session, spawner_pid, start_spawner


def run_child(argv: List[str], timeout: float = 10.0, **kw: object) -> Dict[str, object]:
    loop = SelectorLoop()
    seen: Dict[str, object] = {}
    child = Child(loop, argv, lambda code: seen.setdefault("code", code), **kw)  # type: ignore[arg-type]
    assert loop.run_until(lambda: "code" in seen, timeout)
    loop.close()
    seen["child"] = child
    return seen


def output_of(argv: List[str], **kw: object) -> str:
    r, w = os.pipe()
    try:
        fds = dict(kw.pop("fds", {}))  # type: ignore[call-overload]
        fds[1] = w
        seen = run_child(argv, fds=fds, **kw)
    finally:
        os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    assert seen["code"] == 0, out
    return out


PROBE = ("import os; print(os.getppid(), os.getpgid(0) == os.getpid(), "
         "sorted(int(f) for f in os.listdir('/proc/self/fd')), os.readlink('/proc/self/fd/0'), "
         "os.environ.get('PROBE'), os.getcwd(), sep='|')")


def test_child_is_ours_in_its_own_group_with_only_its_fds(tmp_path):
    extra_r, extra_w = os.pipe()       # an fd of ours the child must not get...
    passed_r, passed_w = os.pipe()     # ...and one it gets, as fd 7
    try:
        out = output_of([sys.executable, "-I", "-S", "-c", PROBE], fds={7: passed_r},
                        env={"PROBE": "yes", "PATH": os.environ["PATH"]})
    finally:
        for fd in (extra_r, extra_w, passed_r, passed_w):
            os.close(fd)
    ppid, own_group, fds, stdin, env, cwd = out.split("|")
    assert int(ppid) == os.getpid()            # CLONE_PARENT: ours, not the spawner's
    assert own_group == "True"
    # 0 and 2 (/dev/null), 1 (our pipe), 7; 3 is listdir's own fd.  Nothing else.
    assert fds == "[0, 1, 2, 3, 7]" and stdin == "/dev/null"
    assert env == "yes" and cwd.strip() == os.getcwd()


def test_children_share_a_session_that_is_not_the_callers():
    """Every child runs in the spawner's session, not the caller's: where the
    kernel schedules by session (autogroup), pyxl's children share one
    group's weight against the caller's session, however many there are."""
    probe = "import os; print(os.getsid(0))"
    sids = {int(output_of([sys.executable, "-I", "-S", "-c", probe])) for _ in range(3)}
    start_spawner()
    pid = spawner_pid()
    assert pid is not None
    assert sids == {os.getsid(pid)} and os.getsid(pid) == pid != os.getsid(0)
    # ... unless asked for the caller's (a fork's children's) session
    set_own_session(False)
    try:
        assert int(output_of([sys.executable, "-I", "-S", "-c", probe])) == os.getsid(0)
        assert spawner_pid() != pid
    finally:
        set_own_session(True)
    assert int(output_of([sys.executable, "-I", "-S", "-c", probe])) == os.getsid(spawner_pid())
    assert os.getsid(spawner_pid()) != os.getsid(0)


def test_a_child_that_may_need_the_terminal_stays_in_our_group_and_session():
    """``new_group=False`` (a migration's ``--command``, e.g. ssh asking for a
    password): started by this thread, in our process group and session;
    still only the fds it is given (an inheritable fd of ours is not), its
    exit seen through a pidfd, a signal delivered."""
    probe = ("import os; print(os.getpgid(0), os.getsid(0), "
             "sorted(int(f) for f in os.listdir('/proc/self/fd')), sep='|')")
    leak_r, leak_w = os.pipe()
    os.set_inheritable(leak_r, True)
    try:
        out = output_of([sys.executable, "-I", "-S", "-c", probe], new_group=False)
    finally:
        os.close(leak_r)
        os.close(leak_w)
    pgid, sid, fds = out.strip().split("|")
    assert (int(pgid), int(sid)) == (os.getpgid(0), os.getsid(0))
    assert fds == "[0, 1, 2, 3]"
    loop = SelectorLoop()
    seen: List[Optional[int]] = []
    child = Child(loop, ["sleep", "30"], seen.append, new_group=False)
    child.kill()
    assert loop.run_until(lambda: seen, 10) and seen == [-signal.SIGKILL]
    with pytest.raises(FileNotFoundError):
        Child(loop, ["no-such-program-on-path"], seen.append, new_group=False)
    loop.close()


@pytest.mark.skipif(not os.path.exists("/proc/self/autogroup"), reason="no autogroup kernel")
def test_the_childrens_group_gets_the_nice_increment():
    """Under autogroup a child's own nice only orders it within its session's
    group: set_child_nice sets the group's too (and back)."""
    start_spawner()
    pid = spawner_pid()

    def group_nice() -> int:
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])
    try:
        set_child_nice(7)
        assert group_nice() == 7
        assert int(output_of([sys.executable, "-I", "-S", "-c",
                              "import os; print(os.getpriority(os.PRIO_PROCESS, 0))"])) == \
            os.getpriority(os.PRIO_PROCESS, 0) + 7
    finally:
        set_child_nice(0)
    assert group_nice() == 0


def test_exit_codes_signals_and_a_missing_program():
    assert run_child(["sh", "-c", "exit 3"])["code"] == 3
    loop = SelectorLoop()
    seen: List[Optional[int]] = []
    child = Child(loop, ["sleep", "30"], seen.append)
    child.kill()                       # before the spawner answered: delivered at the start
    assert loop.run_until(lambda: seen, 10)
    assert seen == [-signal.SIGKILL] and child.wait_status is not None
    missing = run_child(["/nonexistent/program"])
    child = missing["child"]
    assert missing["code"] is None
    assert isinstance(child.start_error, FileNotFoundError)      # type: ignore[attr-defined]
    assert child.pid > 0                                          # type: ignore[attr-defined]
    assert not [p for p, _ in children() if p == child.pid]       # type: ignore[attr-defined]
    with pytest.raises(FileNotFoundError):
        Child(loop, ["no-such-program-on-path"], seen.append)
    loop.close()


def test_a_program_found_on_path_is_remembered_but_checked(tmp_path):
    """A search of PATH is remembered, as a shell hashes it (the loop starts
    children by name: not a stat per PATH entry each time), and checked when
    used: a program that moved is found where it went, one that went away is
    a FileNotFoundError, as before."""
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    env = {"PATH": f"{first}:{second}"}
    prog = second / "pyxl-test-prog"
    prog.write_text("#!/bin/sh\necho second\n")
    prog.chmod(0o755)
    assert output_of(["pyxl-test-prog"], env=env) == "second\n"
    assert spawn._found[("pyxl-test-prog", env["PATH"])] == str(prog)
    moved = first / "pyxl-test-prog"
    moved.write_text("#!/bin/sh\necho first\n")
    moved.chmod(0o755)
    assert output_of(["pyxl-test-prog"], env=env) == "second\n"     # remembered
    prog.unlink()
    assert output_of(["pyxl-test-prog"], env=env) == "first\n"      # checked: moved
    moved.unlink()
    loop = SelectorLoop()
    with pytest.raises(FileNotFoundError):
        Child(loop, ["pyxl-test-prog"], lambda code: None, env=env)
    loop.close()


def stopped_spawner() -> Tuple[int, SelectorLoop, List[Optional[int]]]:
    """The spawner's pid, stopped (SIGSTOP); a loop; a list for exit codes."""
    start_spawner()
    pid = spawner_pid()
    assert pid is not None
    os.kill(pid, signal.SIGSTOP)
    return pid, SelectorLoop(), []


def test_the_call_never_waits_for_the_spawner():
    """With the spawner stopped, starts return at once -- 40 of them, more than
    the kernel queues on its socket (net.unix.max_dgram_qlen, 10): the rest
    wait in pyxl, not in sendmsg -- and every child runs once the spawner does."""
    pid, loop, seen = stopped_spawner()
    try:
        t = time.perf_counter()
        kids = [Child(loop, ["true"], seen.append) for _ in range(40)]
        took = time.perf_counter() - t
        loop.run_until(lambda: False, 0.3)
        assert seen == [] and all(k.pid == -1 for k in kids)
    finally:
        os.kill(pid, signal.SIGCONT)
    # A blocking send would never return here (the spawner is stopped); the
    # bound only keeps a loaded CI machine from failing 40 quick calls.
    assert took < 1.0, took
    assert loop.run_until(lambda: len(seen) == 40, 30)
    assert seen == [0] * 40 and len({k.pid for k in kids}) == 40
    loop.close()


def test_a_dead_spawner_is_replaced_and_its_pending_start_fails():
    pid, loop, seen = stopped_spawner()
    pending = Child(loop, ["true"], seen.append)
    os.kill(pid, signal.SIGKILL)
    assert loop.run_until(lambda: seen, 10)
    assert seen == [None] and pending.start_error is not None
    assert "spawner" in str(pending.start_error)
    os.waitpid(pid, 0)
    assert run_child(["true"])["code"] == 0       # a new spawner
    assert spawner_pid() not in (None, pid)
    loop.close()


def test_malformed_requests_are_answered_and_the_spawner_lives_on():
    start_spawner()
    assert spawn._spawner is not None
    # b"": an empty request with its reply socket was taken for EOF: no answer,
    # and the spawner stopped taking requests
    for payload in (b"junk", b"PXS1" + b"\xff" * 40, b"PXS1" + bytes(12), b""):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spawn._spawner.sock.sendmsg([payload], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                                 array.array("i", [theirs.fileno()]))])
        theirs.close()
        ours.settimeout(10)
        pid, err, stage = spawn._REPLY.unpack(ours.recv(64))
        ours.close()
        assert (pid, stage) == (-1, 1) and err != 0
    assert run_child(["true"])["code"] == 0


def test_after_a_fork_the_child_process_gets_its_own_spawner():
    start_spawner()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:   # pragma: no cover - the forked test process
        code = 1
        try:
            seen = run_child([sys.executable, "-I", "-S", "-c", "import os; os.write(1, "
                              "str(os.getppid()).encode())"], fds={1: w})
            code = 0 if seen["code"] == 0 and spawner_pid() not in (None,) else 2
        finally:
            os._exit(code)
    os.close(w)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert f.read() == str(pid)          # the forked process's child, not ours
    assert os.waitstatus_to_exitcode(status) == 0


def test_sigchld_ignored_still_ends():
    old = signal.signal(signal.SIGCHLD, signal.SIG_IGN)
    try:
        seen = run_child(["sh", "-c", "exit 5"])
    finally:
        signal.signal(signal.SIGCHLD, old)
    assert seen["code"] is None and seen["child"].wait_status is None  # type: ignore[attr-defined]


def test_no_fd_left_behind():
    before = open_fds()
    for _ in range(5):
        assert run_child(["true"])["code"] == 0
    run_child(["/nonexistent/program"])
    assert open_fds() == before


def test_child_gets_the_callers_cpu_affinity():
    """As a fork from the calling thread would (the bench places helpers so)."""
    start_spawner()
    old = os.sched_getaffinity(0)
    cpu = max(old)
    os.sched_setaffinity(0, {cpu})
    try:
        out = output_of([sys.executable, "-I", "-S", "-c",
                         "import os; print(sorted(os.sched_getaffinity(0)))"])
    finally:
        os.sched_setaffinity(0, old)
    assert out.strip() == f"[{cpu}]"


NICE_OF_CHILD = [sys.executable, "-I", "-S", "-c", "import os; print(os.nice(0))"]


def test_children_run_at_the_callers_priority_or_the_set_increment_nicer():
    """A fork's priority by default; set_child_nice(n) puts them n below."""
    ours = os.nice(0)
    assert spawn.child_nice() == 0
    assert int(output_of(NICE_OF_CHILD)) == ours
    try:
        spawn.set_child_nice(10)
        assert int(output_of(NICE_OF_CHILD)) == min(19, ours + 10)
        spawn.set_child_nice(3)
        assert int(output_of(NICE_OF_CHILD)) == min(19, ours + 3)
    finally:
        spawn.set_child_nice(0)


RT_PROBE = r"""
import os, sys
sys.path.insert(0, sys.argv[1])
# An application that gives its loop thread a real-time policy, without
# SCHED_RESET_ON_FORK: its spawner (a fork) is real-time too ...
os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
from pyxl.loop import SelectorLoop
from pyxl.spawn import Child, spawner_pid, start_spawner
start_spawner()
loop = SelectorLoop()
r, w = os.pipe()
code = []
Child(loop, [sys.executable, "-I", "-S", "-c",
             "import os; os.write(1, str(os.sched_getscheduler(0)).encode())"],
      code.append, fds={1: w})
os.close(w)
loop.run_until(lambda: code, 30)
print(os.sched_getscheduler(spawner_pid()), os.read(r, 100).decode(), code[0])
"""


def test_children_never_inherit_a_real_time_policy():
    """A loop thread at SCHED_FIFO (the way to keep a busy host from
    preempting it) must not make pyxl's CPU-bound helpers real-time: the
    spawner's children run SCHED_OTHER whatever the caller's policy."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except PermissionError:
        pytest.skip("needs CAP_SYS_NICE to set a real-time policy")   # CI runs as root
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    out = subprocess.run([sys.executable, "-c", RT_PROBE, str(ROOT)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    spawner_policy, child_policy, code = out.stdout.split()
    assert int(spawner_policy) == os.SCHED_FIFO       # the probe is meaningful ...
    assert int(child_policy) == os.SCHED_OTHER and code == "0"   # ... and the child is not RT


@pytest.mark.parametrize("bad", [-1, 20, 1.5, "5", True])
def test_child_nice_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="child nice increment must be an integer in 0..19"):
        spawn.set_child_nice(bad)
    assert spawn.child_nice() == 0


def _under_64_open_files(argv: str, target: int, then: str) -> str:
    """What a process whose open-files limit is 64 prints of one Child of
    ``argv`` given a pipe as fd ``target``: its exit code, then ``then``."""
    code = ("import os, resource\n"
            "resource.setrlimit(resource.RLIMIT_NOFILE, (64, resource.getrlimit("
            "resource.RLIMIT_NOFILE)[1]))\n"
            "from pyxl.loop import SelectorLoop\n"
            "from pyxl.spawn import Child\n"
            "loop = SelectorLoop(); seen = []\n"
            "r, w = os.pipe()\n"
            f"c = Child(loop, {argv}, seen.append, fds={{{target}: w}})\n"
            "os.close(w)\n"
            "assert loop.run_until(lambda: seen, 20)\n"
            f"print(seen[0], {then})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def test_children_start_under_a_low_open_files_limit():
    """Debian's default soft RLIMIT_NOFILE is 1024 (the lane's dom0): the
    spawner's children must not need fd numbers above their own targets."""
    out = _under_64_open_files("['sh', '-c', 'echo ok >&9']", 9,
                               "c.start_error, os.read(r, 10).decode().strip()")
    assert out.split() == ["0", "None", "ok"]


def test_a_private_step_that_kills_its_child_before_the_answer_leaves_nothing():
    """A step on run_private's loop that starts a child and kills it at once
    (a hotplug script past its time while the spawner is slow to answer) and
    is done: the loop runs on until the child is answered for, killed and
    reaped.  Closed at once (CI run 36), the kill was never sent: the script's
    `sleep` ran on."""
    from pyxl.loop import run_private
    before = {pid for pid, _ in children()}
    started: List[Child] = []

    def step(loop, done):
        child = Child(loop, ["sleep", "30"], lambda code: None)
        started.append(child)
        child.forget()
        child.kill()                 # before the spawner can have answered
        done(True)

    t0 = time.monotonic()
    assert run_private(step) is True
    assert time.monotonic() - t0 < 5
    (child,) = started
    assert child.finished and child.pid > 0
    assert [c for c in children() if c[0] not in before] == []
    with pytest.raises(ProcessLookupError):
        os.kill(child.pid, 0)


def test_a_target_at_the_open_files_limit_is_a_start_error_not_a_silent_127():
    """The child could not move its exec report above a target at the fd
    limit and exited 127 unheard: the start looked like a child that ran."""
    out = _under_64_open_files("['true']", 63, "repr(c.start_error)")
    assert out == "None OSError(22, 'Invalid argument (its fds)')", out


def test_our_childrens_pidfds_are_not_inherited_by_what_the_application_runs():
    loop = SelectorLoop()
    seen: List[Optional[int]] = []
    child = Child(loop, ["sleep", "30"], seen.append)
    assert loop.run_until(lambda: child.pid > 0, 10)
    assert not os.get_inheritable(child._pidfd)
    child.kill()
    assert loop.run_until(lambda: seen, 10)
    loop.close()


def test_a_request_too_long_for_the_spawner_is_refused_and_the_queue_behind_it_moves():
    """A start whose request the kernel refuses at every try (EMSGSIZE), once
    queued behind a busy spawner, stayed at the queue's head: the starts before
    it were never answered, nor any after.  Too long for the socket is now
    refused at the call (E2BIG); the rest are all answered."""
    pid, loop, seen = stopped_spawner()
    assert spawn._spawner is not None
    limit = spawn._spawner.max_request
    env = {"PATH": os.environ["PATH"]}
    kids = [Child(loop, ["true"], seen.append, env={**env, "MID": "y" * 40000}) for _ in range(15)]
    assert spawn._spawner.pending, "the spawner's socket is full: starts wait in the queue"
    with pytest.raises(OSError) as refused:
        Child(loop, ["true"], seen.append, env={**env, "BIG": "x" * limit})
    assert refused.value.errno == errno.E2BIG
    assert f"at most {limit}" in str(refused.value)
    half = (limit - 2048) // 2        # (one string is at most 128 KiB at exec)
    near = Child(loop, ["true"], seen.append, env={**env, "B1": "x" * half, "B2": "x" * half})
    os.kill(pid, signal.SIGCONT)
    assert loop.run_until(lambda: len(seen) == 16, 30), (len(seen), len(spawn._spawner.pending))
    assert seen == [0] * 16 and all(k.start_error is None for k in kids + [near])
    assert run_child(["true"])["code"] == 0
    loop.close()
