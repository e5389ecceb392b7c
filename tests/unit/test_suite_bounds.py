"""The suite's own bounds (tests/conftest.py): a hung test fails alone, and a
passed test's files go as it ends.  Without them a CI run hung: earlier runs'
files filled the disk, a save's pipe reader died of ENOSPC, and a test waited
for it with no bound."""

from __future__ import annotations

import pathlib
from typing import List

import pytest

_LEFT: List[pathlib.Path] = []


def test_every_test_has_a_time_bound(request: pytest.FixtureRequest) -> None:
    assert request.config.pluginmanager.hasplugin("timeout")
    assert float(request.config.getini("timeout")) == 300


def test_a_passed_test_writes_its_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "image").write_bytes(b"x" * 4096)
    _LEFT.append(tmp_path)


def test_and_they_are_gone_once_it_has_passed() -> None:
    """(Runs after the one above: pytest keeps a module's order.)"""
    assert _LEFT and not _LEFT[0].exists()
