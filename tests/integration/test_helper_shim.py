"""Both helpers over a scripted stand-in for libxc's save/restore (LD_PRELOAD).

The shim below (compiled once per session) replaces only xc_interface_open/
close and xc_domain_save/restore, the four functions of libxenctrl/libxenguest
that the helper calls.  It logs what it was given -- every argument and which
callbacks are installed -- through the helper's own logger, calls the
callbacks in libxc's order, logs each reply, and can be told (PYXL_SHIM) to
misbehave.  So everything the helper itself does -- argv to libxc, CBFLAGS to
callbacks, framing, replies, errno, restore_results, complete, exit statuses,
SIGTERM -- is compared with Debian's helper, with no hypervisor.  What real
libxc does in between is covered by test_helper_sim.py (fakexen).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess

import pytest

from pyxl.wire.codec import Log, ProtocolError

from test_helper import (DEBIAN_HELPER, EXIT_FAIL, EXIT_REPLY_LOST, HELPERS, RESTORE,
                         RESTORE_COLO, SAVE, SAVE_LIVE, SAVE_REMUS, SYS_READ, SYS_WRITE, HelperRun,
                         assert_same, needs_debian)

SHIM_C = r"""
/* Test stand-in for libxc's save/restore entry points (pyxl tests). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <xenctrl.h>
#include <xenguest.h>

static xentoollog_logger *lg;
static int handle;

static int is(const char *name)
{
    const char *s = getenv("PYXL_SHIM");
    return s && !strcmp(s, name);
}

static char *repeat(const char *unit, size_t times)
{
    size_t n = strlen(unit);
    char *s = malloc(n * times + 1);
    for (size_t i = 0; i < times; i++)
        memcpy(s + i * n, unit, n);
    s[n * times] = 0;
    return s;
}

xc_interface *xc_interface_open(xentoollog_logger *logger, xentoollog_logger *dombuild_logger,
                                unsigned open_flags)
{
    lg = logger;
    if (is("long-log")) {
        char *ascii = repeat("x", 200000), *utf8 = repeat("\xc3\xa9", 40000);
        xtl_log(logger, XTL_ERROR, -1, "xc", "%s", ascii);
        xtl_log(logger, XTL_WARN, 7, "xc", "%s!", utf8);
        xtl_log(logger, XTL_INFO, -1, ascii, "context too long");
        xtl_progress(logger, "xc", utf8, 1, 2);
        errno = ENOENT;
        return NULL;
    }
    if (is("null-context")) {
        xtl_log(logger, XTL_ERROR, -1, NULL, "no context");
        errno = ENOENT;
        return NULL;
    }
    xtl_log(logger, XTL_DETAIL, -1, "shim", "open flags=%u same_logger=%d", open_flags,
            logger == dombuild_logger);
    xtl_log(logger, XTL_DEBUG, -1, "shim", "formats: %d %u %ld %lx %s %5.2f %c %% %p",
            -42, 42u, -1L, 0xfeffcUL, "str", 3.14159, 'c', (void *)0);
    return (xc_interface *)&handle;
}

int xc_interface_close(xc_interface *xch)
{
    xtl_log(lg, XTL_DETAIL, -1, "shim", "close ok=%d", xch == (xc_interface *)&handle);
    return 0;
}

/* The stream: writes n bytes, as libxc does (retry on EINTR, fail otherwise). */
static int stream(int fd, size_t n)
{
    static char page[65536];
    memset(page, 0xab, sizeof(page));
    while (n) {
        ssize_t r = write(fd, page, n < sizeof(page) ? n : sizeof(page));
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0) {
            int e = errno;
            xtl_log(lg, XTL_ERROR, -1, "xc", "Failed to write stream (%d = %s)", e, strerror(e));
            errno = e;
            return -1;
        }
        n -= r;
    }
    return 0;
}

#define CALL(cb, name, ...) ({                                                   \
    int r_ = (cb)->name(__VA_ARGS__);                                            \
    xtl_log(lg, XTL_DETAIL, -1, "shim", "%s -> %d", #name, r_);                  \
    r_; })

int xc_domain_save(xc_interface *xch, int io_fd, uint32_t dom, uint32_t flags,
                   struct save_callbacks *cb, xc_stream_type_t stream_type, int recv_fd)
{
    int rc = -1, e = 0, logdirty = 0;
    xtl_log(lg, XTL_DETAIL, -1, "shim", "save io_fd=%d dom=%u flags=%u stream_type=%d recv_fd=%d",
            io_fd, dom, flags, (int)stream_type, recv_fd);
    xtl_log(lg, XTL_INFO, -1, "shim", "save callbacks: suspend=%d precopy_policy=%d postcopy=%d "
            "checkpoint=%d wait_checkpoint=%d switch_qemu_logdirty=%d data=%d",
            !!cb->suspend, !!cb->precopy_policy, !!cb->postcopy, !!cb->checkpoint,
            !!cb->wait_checkpoint, !!cb->switch_qemu_logdirty, !!cb->data);
    if (is("callbacks-only"))
        return 0;
    if (is("fail-leaving-errno"))   /* like libxc on a bad stream: errno untouched */
        return -1;
    if (is("chatty")) {             /* more log than a pipe holds */
        char *text = repeat("c", 1000);
        for (int i = 0; i < 200; i++)
            xtl_log(lg, XTL_DETAIL, -1, "xc", "chatter %d %s", i, text);
        free(text);
        return 0;
    }
    if (cb->switch_qemu_logdirty) {
        if (CALL(cb, switch_qemu_logdirty, dom, 1, cb->data)) {
            errno = EIO;
            return -1;
        }
        logdirty = 1;
    }
    xtl_progress(lg, "xc", "Start of stream", 0, 0);
    if (stream(io_fd, is("big-stream") ? (64u << 20) : 4096))
        goto out;
    if (cb->suspend && CALL(cb, suspend, cb->data) != 1) {
        xtl_log(lg, XTL_ERROR, -1, "xc", "Failed to suspend domain: Internal error");
        errno = EINVAL;
        goto out;
    }
    xtl_progress(lg, "xc", "Frames", 0, 16);
    xtl_progress(lg, "xc", "Frames", 16, 16);
    if (stream_type != XC_STREAM_PLAIN) {
        if (cb->postcopy)
            CALL(cb, postcopy, cb->data);
        if (cb->checkpoint)
            CALL(cb, checkpoint, cb->data);
        if (cb->wait_checkpoint)
            CALL(cb, wait_checkpoint, cb->data);
    }
    xtl_progress(lg, "xc", "Complete", 0, 0);
    rc = 0;
 out:
    e = errno;
    if (logdirty)
        CALL(cb, switch_qemu_logdirty, dom, 0, cb->data);
    errno = e;
    return rc;
}

int xc_domain_restore(xc_interface *xch, int io_fd, uint32_t dom, unsigned int store_evtchn,
                      unsigned long *store_mfn, uint32_t store_domid,
                      unsigned int console_evtchn, unsigned long *console_mfn,
                      uint32_t console_domid, xc_stream_type_t stream_type,
                      struct restore_callbacks *cb, int send_back_fd)
{
    xtl_log(lg, XTL_DETAIL, -1, "shim", "restore io_fd=%d dom=%u store=%u/%u console=%u/%u "
            "stream_type=%d back_fd=%d mfns=%lu/%lu", io_fd, dom, store_evtchn, store_domid,
            console_evtchn, console_domid, (int)stream_type, send_back_fd, *store_mfn,
            *console_mfn);
    xtl_log(lg, XTL_INFO, -1, "shim", "restore callbacks: static_data_done=%d suspend=%d "
            "postcopy=%d checkpoint=%d wait_checkpoint=%d restore_results=%d data=%d",
            !!cb->static_data_done, !!cb->suspend, !!cb->postcopy, !!cb->checkpoint,
            !!cb->wait_checkpoint, !!cb->restore_results, !!cb->data);
    if (is("callbacks-only"))
        return 0;
    if (is("fail-leaving-errno"))
        return -1;
    if (cb->static_data_done && CALL(cb, static_data_done, is("missing") ? 3 : 0, cb->data)) {
        xtl_log(lg, XTL_ERROR, -1, "xc", "Mandatory record 0x10 not handled");
        errno = EINVAL;
        return -1;
    }
    if (is("restore-fails")) {
        xtl_log(lg, XTL_ERROR, -1, "xc", "Failed to read Record Header from stream");
        errno = ENODATA;
        return -1;
    }
    if (stream_type == XC_STREAM_COLO) {
        if (cb->checkpoint)
            CALL(cb, checkpoint, cb->data);
        if (cb->restore_results)
            cb->restore_results(0x1f3e, 0x1f3f, cb->data);
    }
    *store_mfn = 0xfeffc;
    *console_mfn = 0xfefff;
    xtl_log(lg, XTL_INFO, -1, "xc", "Restore successful");
    return 0;
}
"""


@pytest.fixture(scope="session")
def shim(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if not cc:
        pytest.skip("no C compiler to build the test shim")
    d = tmp_path_factory.mktemp("shim")
    (d / "shim.c").write_text(SHIM_C)
    so = d / "libtestshim.so"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", str(so),
                    str(d / "shim.c"), "-lxentoollog"], check=True)
    return str(so)


def shim_run(shim, exe, argv, tmp_path, scenario="", **kw) -> HelperRun:
    env = dict(os.environ, LD_PRELOAD=shim, PYXL_SHIM=scenario)
    mode = "save" if argv[0] == "--save-domain" else "restore"
    return HelperRun(exe, argv, mode=mode, env=env, tmp=str(tmp_path), **kw)


def converse(run: HelperRun, replies=None, default=0):
    """Play libxl: answer every callback (replies[name] or default) until EOF."""
    replies = replies or {}
    while True:
        msg = run.next()
        if msg is None:
            return run.finish()
        if msg.WAITS_FOR_REPLY:
            run.reply(replies.get(msg.name, default))


def both(shim, argv, tmp_path, scenario="", replies=None, default=0):
    """Run the same conversation with both helpers; assert identical; return ours."""
    done = {}
    for name, exe in HELPERS.items():
        done[name] = converse(shim_run(shim, exe, argv, tmp_path, scenario,
                                       io=str(tmp_path / f"{name}.io")), replies, default)
    assert_same(done["pyxl"], done["debian"])
    assert (tmp_path / "pyxl.io").read_bytes() == (tmp_path / "debian.io").read_bytes()
    return done["pyxl"]


pytestmark = needs_debian


def _names(done):
    return [m.name for m in done.messages]


def _texts(done, context="shim"):
    return [m.formatted for m in done.messages if isinstance(m, Log) and m.context == context]


# ---------------------------------------------------------------------------
# Complete flows


def test_shim_plain_save_flow_matches_debian(shim, tmp_path):
    done = both(shim, SAVE, tmp_path, replies={"suspend": 1})
    assert done.returncode == 0
    assert _names(done) == ["log", "log", "log", "log", "log", "switch_qemu_logdirty", "log",
                            "progress", "suspend", "log", "progress", "progress", "progress",
                            "switch_qemu_logdirty", "log", "log", "complete", "log"]
    assert done.messages[-2].retval == 0 and done.messages[-2].errnoval == 0
    assert done.messages[-3].formatted == "complete r=0"
    assert "formats: -42 42 -1 feffc str  3.14 c % (nil)" in _texts(done)
    assert "open flags=0 same_logger=1" in _texts(done)


@pytest.mark.parametrize("argv", [SAVE, SAVE_LIVE, SAVE_REMUS], ids=["plain", "live", "remus"])
@pytest.mark.parametrize("replies", [{"suspend": 1}, {"suspend": 1, "postcopy": -7, "checkpoint": 2,
                                                      "switch_qemu_logdirty": 0}],
                         ids=["ok", "odd-replies"])
def test_shim_save_replies_reach_libxc_like_debian(shim, tmp_path, argv, replies):
    both(shim, argv, tmp_path, replies=replies)


def test_shim_save_failure_reports_errno_like_debian(shim, tmp_path):
    """suspend refused: libxc fails with EINVAL; complete(-1, EINVAL), still exit 0."""
    done = both(shim, SAVE, tmp_path, replies={"suspend": 0})
    assert done.returncode == 0
    complete = done.messages[-2]
    assert (complete.name, complete.retval, complete.errnoval) == ("complete", -1, 22)
    assert done.messages[-3].formatted == "complete r=-1" and done.messages[-3].errnoval == 22


@pytest.mark.parametrize("scenario", ["", "missing", "restore-fails"])
@pytest.mark.parametrize("argv", [RESTORE, RESTORE_COLO], ids=["plain", "colo"])
def test_shim_restore_flow_matches_debian(shim, tmp_path, scenario, argv):
    done = both(shim, argv, tmp_path, scenario, replies={"static_data_done": 0}, default=1)
    assert done.returncode == 0
    results = [m for m in done.messages if m.name == "restore_results"]
    complete = done.messages[-2]
    if scenario == "restore-fails":   # restore_results regardless, with zeros
        assert [(m.store_gfn, m.console_gfn) for m in results] == [(0, 0)]
        assert (complete.retval, complete.errnoval) == (-1, 61)
    else:
        assert results[-1].store_gfn == 0xfeffc and results[-1].console_gfn == 0xfefff
        assert (complete.retval, complete.errnoval) == (0, 0)


@pytest.mark.parametrize("argv", [SAVE, RESTORE], ids=["save", "restore"])
def test_shim_failure_without_errno_reports_errno_0_like_debian(shim, tmp_path, argv):
    """libxc may fail without setting errno: complete() then reports whatever
    errno the helper's own start-up left -- 0 in Xen's helper, so 0 in ours
    too (not CPython's start-up leftovers)."""
    done = both(shim, argv, tmp_path, "fail-leaving-errno")
    assert (done.messages[-2].retval, done.messages[-2].errnoval) == (-1, 0)


def test_shim_restore_results_sent_without_its_cbflag(shim, tmp_path):
    """CBFLAGS 0: no callbacks at all, but restore_results and complete still come."""
    argv = list(RESTORE)
    argv[8] = "0"
    done = both(shim, argv, tmp_path)
    assert "restore callbacks: static_data_done=0 suspend=0 postcopy=0 checkpoint=0 " \
           "wait_checkpoint=0 restore_results=0 data=0" in _texts(done)
    assert _names(done)[-4:] == ["restore_results", "log", "complete", "log"]


CBFLAGS = [0, 8, 128, 136, 184, 248, 256, 512, 768, 800, 888, 0x7, 0xFFFFFFFF]


@pytest.mark.parametrize("cbflags", CBFLAGS)
@pytest.mark.parametrize("mode", ["save", "restore"])
def test_shim_cbflags_install_the_same_callbacks_as_debian(shim, tmp_path, mode, cbflags):
    argv = list(SAVE if mode == "save" else RESTORE)
    argv[-2] = str(cbflags)
    done = both(shim, argv, tmp_path, "callbacks-only")
    assert done.returncode == 0


def test_shim_cbflags_all_bits(shim, tmp_path):
    argv = list(SAVE)
    argv[-2] = str(0xFFFFFFFF)
    done = both(shim, argv, tmp_path, "callbacks-only")
    assert "save callbacks: suspend=1 precopy_policy=0 postcopy=1 checkpoint=1 " \
           "wait_checkpoint=1 switch_qemu_logdirty=1 data=0" in _texts(done)


# ---------------------------------------------------------------------------
# Lost replies: exit 254


@pytest.mark.parametrize("how", ["eof", "half-reply"])
@pytest.mark.parametrize("argv, callback", [(SAVE, "switch_qemu_logdirty"), (RESTORE, "static_data_done")],
                         ids=["save", "restore"])
def test_shim_reply_lost_exits_254_like_debian(shim, tmp_path, argv, callback, how):
    done = {}
    for name, exe in HELPERS.items():
        run = shim_run(shim, exe, argv, tmp_path)
        while run.next().name != callback:
            pass
        if how == "half-reply":
            os.write(run.stdin_w, b"\0\0")
        run.close_stdin()
        done[name] = run.finish()
    assert_same(done["pyxl"], done["debian"])
    assert done["pyxl"].returncode == EXIT_REPLY_LOST
    assert done["pyxl"].messages[-1].name == callback


def test_shim_complete_reply_lost_exits_254_like_debian(shim, tmp_path):
    done = {}
    for name, exe in HELPERS.items():
        run = shim_run(shim, exe, SAVE, tmp_path)
        while (msg := run.next()).name != "complete":
            if msg.WAITS_FOR_REPLY:
                run.reply(1 if msg.name == "suspend" else 0)
        run.close_stdin()
        done[name] = run.finish()
    assert_same(done["pyxl"], done["debian"])
    assert done["pyxl"].returncode == EXIT_REPLY_LOST


def test_shim_single_thread_while_waiting_for_a_reply(shim, tmp_path):
    for exe in HELPERS.values():
        run = shim_run(shim, exe, SAVE, tmp_path)
        run.expect("log"), run.expect("log"), run.expect("log"), run.expect("log"), run.expect("log")
        run.expect("switch_qemu_logdirty")
        run.wait_blocked(SYS_READ, 0)
        assert run.threads() == 1, exe
        run.close_stdin()
        assert run.finish().returncode == EXIT_REPLY_LOST


# ---------------------------------------------------------------------------
# SIGTERM (libxl aborting the operation)


@pytest.mark.parametrize("argv, callback, expect", [
    (SAVE, "suspend", EXIT_REPLY_LOST),          # handler, no SA_RESTART: read -> EINTR
    (RESTORE, "static_data_done", -signal.SIGTERM),   # default action
], ids=["save", "restore"])
def test_shim_sigterm_while_waiting_matches_debian(shim, tmp_path, argv, callback, expect):
    done = {}
    for name, exe in HELPERS.items():
        run = shim_run(shim, exe, argv, tmp_path)
        while (msg := run.next()).name != callback:
            if msg.WAITS_FOR_REPLY:
                run.reply(0)
        run.wait_blocked(SYS_READ, 0)
        run.kill(signal.SIGTERM)
        done[name] = run.finish()
    assert_same(done["pyxl"], done["debian"])
    assert done["pyxl"].returncode == expect


def test_shim_sigterm_during_stream_write_fails_libxc_like_debian(shim, tmp_path):
    """SIGTERM while libxc is blocked writing the stream: the handler puts a
    read-only /dev/null over IO_FD, the write fails (EBADF), and the helper
    still reports complete(-1, EBADF) and exits 0 -- libxl's abort path."""
    done = {}
    for name, exe in HELPERS.items():
        r, w = os.pipe()   # a stream nobody reads: libxc blocks in write()
        run = shim_run(shim, exe, SAVE, tmp_path, "big-stream", io_fd=w)
        os.close(w)
        run.expect("log"), run.expect("log"), run.expect("log"), run.expect("log"), run.expect("log")
        run.expect("switch_qemu_logdirty")
        run.reply(0)
        run.expect("log"), run.expect("progress")
        io_fd = int(run.args[1])
        run.wait_blocked(SYS_WRITE, io_fd)
        run.kill(signal.SIGTERM)
        while (msg := run.next()) is not None:
            if msg.WAITS_FOR_REPLY:
                run.reply(0)
        os.close(r)
        done[name] = run.finish()
    assert_same(done["pyxl"], done["debian"])
    ours = done["pyxl"]
    assert ours.returncode == 0
    errors = [m.formatted for m in ours.messages if isinstance(m, Log) and m.level == 8]
    assert errors == ["Failed to write stream (9 = Bad file descriptor)"]
    assert (ours.messages[-2].retval, ours.messages[-2].errnoval) == (-1, 9)


# ---------------------------------------------------------------------------
# Documented differences: over-long texts and a NULL context


@pytest.mark.parametrize("exe", HELPERS.values(), ids=HELPERS.keys())
def test_shim_overlong_log_texts(shim, tmp_path, exe):
    """Debian's helper asserts a frame is < 64 KiB and aborts; ours shortens
    the longest string (at a UTF-8 boundary) and marks it '...[truncated]'."""
    run = shim_run(shim, exe, SAVE, tmp_path, "long-log")
    done = run.finish()
    if exe == DEBIAN_HELPER:
        assert done.returncode == -signal.SIGABRT
        assert [m.name for m in done.messages] == ["log"]   # only "starting save" got out
        return
    assert done.returncode == EXIT_FAIL
    starting, ascii, utf8, long_ctx, progress, failed = done.messages
    pos, frames = 0, []
    while pos < len(done.stdout):
        size = int.from_bytes(done.stdout[pos:pos + 2], "little")
        frames.append(size)
        pos += 2 + size
    assert max(frames) <= 0xFFFF
    assert all(0xFFFF - 3 <= size for size in frames[1:5])   # full, less a cut UTF-8 char
    assert ascii.formatted == "x" * (0xFFFF - 20 - 2 - 14) + "...[truncated]"
    assert (ascii.level, ascii.errnoval, ascii.context) == (8, -1, "xc")
    assert utf8.formatted.endswith("\u00e9...[truncated]") and set(utf8.formatted[:-14]) == {"\u00e9"}
    assert utf8.formatted.encode("utf-8")   # no lone surrogates: cut between characters
    assert (utf8.level, utf8.errnoval) == (7, 7)
    assert long_ctx.formatted == "context too long" and long_ctx.context.endswith("...[truncated]")
    assert progress.doing_what.endswith("...[truncated]") and (progress.done, progress.total) == (1, 2)
    assert failed.formatted == "xc_interface_open failed" and failed.errnoval == 2


@pytest.mark.parametrize("exe", HELPERS.values(), ids=HELPERS.keys())
def test_shim_null_context(shim, tmp_path, exe):
    """Debian's helper crashes on strlen(NULL); ours sends an empty context."""
    done = shim_run(shim, exe, RESTORE, tmp_path, "null-context").finish()
    if exe == DEBIAN_HELPER:
        assert done.returncode == -signal.SIGSEGV
        return
    assert done.returncode == EXIT_FAIL
    assert [(m.context, m.formatted) for m in done.messages][1] == ("", "no context")


@pytest.mark.parametrize("exe", HELPERS.values(), ids=HELPERS.keys())
def test_shim_sigterm_while_blocked_on_stdout(shim, tmp_path, exe):
    """Save mode, SIGTERM while the helper waits for libxl to read its stdout.

    Xen's helper takes the interrupted write() as fatal (perror, exit 255) and
    never reports complete; ours retries the write (documented difference), so
    the SIGTERM only does what it is for -- fail libxc's stream -- and libxl
    still gets every message and complete."""
    run = shim_run(shim, exe, SAVE, tmp_path, "chatty")
    run.wait_blocked(SYS_WRITE, 1)
    run.kill(signal.SIGTERM)
    if exe == DEBIAN_HELPER:
        # Its frame header was out, the body write failed: a cut frame, then exit.
        with pytest.raises(ProtocolError, match="ended inside a frame"):
            while run.next() is not None:
                pass
        assert run.proc.wait(10) == EXIT_FAIL
        with open(run.stderr_path, "rb") as f:
            assert f.read() == b"write: Interrupted system call\n"
        assert "complete" not in [m.name for m in run.messages]
        return
    while (msg := run.next()) is not None:
        if msg.WAITS_FOR_REPLY:
            run.reply(0)
    done = run.finish()
    chatter = [m for m in done.messages if isinstance(m, Log) and m.formatted.startswith("chatter")]
    assert done.returncode == 0 and done.stderr == b""
    assert len(chatter) == 200
    assert (done.messages[-2].name, done.messages[-2].retval) == ("complete", 0)
