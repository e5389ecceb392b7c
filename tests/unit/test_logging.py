"""The library's loggers are quiet unless the application configures logging.

Every ``pyxl.*`` logger comes from ``pyxl._log.get_logger``, which gives the
``pyxl`` root logger a NullHandler: logging's last-resort handler then never
prints pyxl's records to stderr.  (tests/integration/test_embedding.py checks the
same end to end: a failed save in a script with no logging set up prints nothing.)
"""

from __future__ import annotations

import ast
import logging
import subprocess
import sys

import pytest

from pyxl._log import ROOT, get_logger, install_null_handler

from conftest import ROOT as REPO


def test_get_logger_installs_one_null_handler():
    log = get_logger("pyxl.test.logging")
    assert log.name == "pyxl.test.logging"
    get_logger("pyxl.test.other")
    install_null_handler()
    nulls = [h for h in logging.getLogger(ROOT).handlers if isinstance(h, logging.NullHandler)]
    assert len(nulls) == 1


def test_get_logger_refuses_a_name_outside_pyxl():
    with pytest.raises(ValueError, match="not a pyxl logger"):
        get_logger("pyxlother")


def test_an_unconfigured_script_sees_nothing_on_stderr():
    """Without the NullHandler, logging.lastResort prints WARNING and above."""
    code = ("from pyxl._log import get_logger\n"
            "get_logger('pyxl.domain.7').error('the helper failed')\n"
            "import logging; logging.getLogger('other').error('shown')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    assert r.stderr == "shown\n"      # lastResort still serves the application's own loggers


def test_a_configured_application_gets_pyxls_records():
    code = ("import logging; logging.basicConfig(format='%(name)s %(message)s')\n"
            "from pyxl._log import get_logger\n"
            "get_logger('pyxl.domain.7').error('the helper failed')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert r.stderr == "pyxl.domain.7 the helper failed\n"


def test_no_module_takes_a_logger_around_get_logger():
    """A module calling logging.getLogger itself could log before the NullHandler exists."""
    bad = []
    for path in sorted((REPO / "pyxl").rglob("*.py")):
        if path.name == "_log.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "getLogger"):
                bad.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert bad == []
