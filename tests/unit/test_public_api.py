"""pyxl's public surface is what it says it is.

``pyxl.__all__`` is pinned here: adding, renaming or dropping a public name
means changing PUBLIC below too, on purpose.  Every name in it exists, the
package imports in a fresh interpreter, ``pyxl.Backend`` is a typing.Protocol
(what pyxl asks of a host), and every exception exported is a PyxlError.
"""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

import pyxl
from conftest import ROOT

PUBLIC = sorted([
    # loops
    "AsyncioLoop", "HookLoop", "SelectorLoop", "default_loop",
    # operations
    "CallbackRequest", "Operation", "ProgressEvent", "RestoreOperation", "RestoreOptions",
    "RestoreResult", "SaveOperation", "SaveOptions", "SaveResult", "restore", "save", "wait",
    # the host
    "Backend", "DEBIAN_HELPER", "helper_path",
    # errors (pyxl/errors.py)
    "BackendError", "CallbackError", "Cancelled", "CompressedImage", "ConfigError", "CorruptImage", "HelperDied",
    "HelperExited", "HelperFailed",
    "HelperProtocolError", "LocalProtocolError", "MigrationError", "MigrationInDoubt", "MigrationProtocolError",
    "MissingComplete", "MissingRestoreResults", "OperationError", "PrecopyAborted", "PrecopyPolicyError",
    "ProtocolError", "PyxlError", "RemoteProtocolError", "StartupError", "StreamError",
    "StreamTooLarge", "Timeout", "TruncatedStream", "UnsupportedStream",
])


def test_all_is_the_expected_list():
    assert len(pyxl.__all__) == len(set(pyxl.__all__)), "duplicates in pyxl.__all__"
    got = sorted(pyxl.__all__)
    missing = sorted(set(PUBLIC) - set(got))
    extra = sorted(set(got) - set(PUBLIC))
    assert got == PUBLIC, f"pyxl.__all__ differs: missing {missing}, not expected {extra}"


@pytest.mark.parametrize("name", PUBLIC)
def test_public_name_exists(name):
    assert hasattr(pyxl, name), f"pyxl.{name} is listed but does not exist"


def test_every_name_in_all_exists():
    assert [n for n in pyxl.__all__ if not hasattr(pyxl, n)] == []


def test_import_in_a_fresh_interpreter():
    r = subprocess.run([sys.executable, "-c", "import pyxl; print(pyxl.Backend)"],
                       capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Backend" in r.stdout


def _is_protocol(cls: object) -> bool:
    if hasattr(typing, "is_protocol"):                 # Python >= 3.13
        return bool(typing.is_protocol(cls))
    return isinstance(cls, type) and typing.Protocol in cls.__mro__ and \
        bool(getattr(cls, "_is_protocol", False))


def test_backend_is_a_protocol():
    backend = getattr(pyxl, "Backend", None)
    assert backend is not None, "pyxl.Backend does not exist"
    assert _is_protocol(backend), f"pyxl.Backend is {backend!r}, not a typing.Protocol class"


def _exported_exceptions():
    return [n for n in PUBLIC if isinstance(getattr(pyxl, n, None), type)
            and issubclass(getattr(pyxl, n), BaseException)]


def test_exceptions_are_found():
    assert {"PyxlError", "OperationError", "ProtocolError", "Timeout"} <= set(_exported_exceptions())


@pytest.mark.parametrize("name", _exported_exceptions())
def test_exported_exception_is_a_pyxl_error(name):
    assert issubclass(getattr(pyxl, name), pyxl.PyxlError), \
        f"pyxl.{name} ({getattr(pyxl, name).__mro__}) is not a pyxl.PyxlError"
