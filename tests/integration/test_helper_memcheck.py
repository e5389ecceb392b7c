"""pyxl-save-helper under valgrind memcheck: no errors, nothing definitely lost.

PYXL_HELPER_PYTHONMALLOC=malloc0 gives memcheck every Python allocation
(zero-filled, which also hides CPython 3.11's own uninitialised read,
gh-119022), so no suppression file is needed.  "Possibly lost" blocks are
CPython's static objects still alive after Py_FinalizeEx and are not errors.
The exit-254 path leaves through exit() from inside libxc without finalizing,
so leak checking is off there and only memory errors count.
"""

from __future__ import annotations

import os
import shutil

import pytest

from conftest import MEMCHECK_LEAK_OPTS
from test_helper import EXIT_FAIL, EXIT_REPLY_LOST, HELPER, RESTORE, SAVE, STARTUP_FAILURE, HelperRun
from test_helper_shim import converse, shim  # noqa: F401  (fixture)

VALGRIND = shutil.which("valgrind")
pytestmark = pytest.mark.skipif(not VALGRIND, reason="valgrind not installed")
MEMCHECK_FAILED = 99


def memcheck_run(argv, tmp_path, leaks=True, env=None, **kw) -> HelperRun:
    opts = ["--error-exitcode=%d" % MEMCHECK_FAILED, "--quiet"]
    if leaks:
        opts += MEMCHECK_LEAK_OPTS
    env = dict(env or os.environ, PYXL_HELPER_PYTHONMALLOC="malloc0")
    return HelperRun(VALGRIND, opts + [HELPER] + list(argv), env=env, tmp=str(tmp_path), **kw)


def test_memcheck_startup_failure(tmp_path):
    done = memcheck_run(SAVE, tmp_path).finish(timeout=120)
    assert done.returncode == EXIT_FAIL, done.stderr.decode()
    assert done.summary() == STARTUP_FAILURE and done.stderr == b""


def test_memcheck_bad_argv(tmp_path):
    done = memcheck_run(["--save-domain", "1"], tmp_path).finish(timeout=120)
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1, done.stderr.decode()


@pytest.mark.parametrize("argv", [SAVE, RESTORE], ids=["save", "restore"])
def test_memcheck_whole_conversation(shim, tmp_path, argv):  # noqa: F811
    env = dict(os.environ, LD_PRELOAD=shim, PYXL_SHIM="")
    done = converse(memcheck_run(argv, tmp_path, env=env), {"suspend": 1})
    assert done.returncode == 0, done.stderr.decode()
    assert done.messages[-2].name == "complete" and done.stderr == b""


def test_memcheck_reply_lost(shim, tmp_path):  # noqa: F811
    env = dict(os.environ, LD_PRELOAD=shim, PYXL_SHIM="")
    run = memcheck_run(SAVE, tmp_path, leaks=False, env=env)
    while run.next(timeout=120).name != "switch_qemu_logdirty":
        pass
    run.close_stdin()
    done = run.finish(timeout=120)
    assert done.returncode == EXIT_REPLY_LOST, done.stderr.decode()
