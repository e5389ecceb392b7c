"""The package's metadata says what is true: its license (a LICENSE file and an
SPDX expression), the Pythons it runs on, and that it is typed."""

from __future__ import annotations

import importlib.metadata
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_license_file_and_expression():
    md = importlib.metadata.metadata("pyxl")
    assert md["License-Expression"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_requires_python_is_what_runs_it():
    md = importlib.metadata.metadata("pyxl")
    assert md["Requires-Python"] == ">=3.11"      # subprocess's process_group
    assert sys.version_info >= (3, 11)
    pythons = {c.rsplit(" :: ", 1)[1] for c in md.get_all("Classifier")
               if c.startswith("Programming Language :: Python :: 3.")}
    assert f"{sys.version_info[0]}.{sys.version_info[1]}" in pythons
    assert "Typing :: Typed" in md.get_all("Classifier")
    assert (ROOT / "pyxl" / "py.typed").exists()
