"""What a migration receiver may tell its sender (pyxl.migrate.reasons.peer_reason).

README: the REASON is "never a local path, a size or free memory".  Every
reason goes through one check (``_told``); an error whose text would break
it is cut to its first part, or to a generic reason.  A libxc refusal with
errno 0 says which check refused the stream (its first ERROR line, without
numbers), not "(0)".
"""

from __future__ import annotations

import logging

import pytest

from pyxl.errors import (HelperFailed, MigrationError, MigrationProtocolError, StartupError,
                         Timeout)
from pyxl.migrate.reasons import _told, blame_sender, peer_reason

LOG = logging.getLogger("pyxl.test.peer_reason")


def _libxc(*lines: str, errnoval: int = 0) -> HelperFailed:
    return HelperFailed("restore of domain 7 failed", -1, errnoval, helper_errors=list(lines))


@pytest.mark.parametrize("lines, said", [
    (["xc: Record (0x00000001, Page data) length 0xfffffff0 exceeds max (0x8000000): "
      "Internal error", "xc: Restore failed (0 = Success): Internal error"],
     "record length exceeds max"),
    (["xc: PAGE_DATA record (length 4071432) too short to contain 2147483647 pfns worth of "
      "information: Internal error"], "PAGE_DATA record too short to contain pfns worth of "
                                      "information"),
    (["xc: Mandatory record 0x7fffffff (Reserved) not handled: Internal error"],
     "mandatory record not handled"),
])
def test_a_libxc_refusal_names_the_check(lines, said):
    assert peer_reason(_libxc(*lines)) == \
        f"the restore failed: the stream was refused by libxc ({said})"


@pytest.mark.parametrize("lines", [
    [],
    ["xc: Restore failed (0 = Success): Internal error"],        # libxc's summary: no news
    ["libxl-save-helper: cannot open /var/lib/secret: Permission denied"],   # not libxc's
    ["xc: Failed to map /dev/xen/privcmd page: Internal error"],  # a path
])
def test_a_libxc_refusal_without_a_plain_category(lines):
    assert peer_reason(_libxc(*lines)) == "the restore failed: the stream was refused by libxc"


def test_an_errno_is_named():
    assert peer_reason(_libxc(errnoval=12)) == "the restore failed (ENOMEM)"


def test_the_senders_early_end_is_told_without_its_size():
    blamed = blame_sender(_libxc(), 1 << 20, LOG)
    assert "after 1.0 MiB" in str(blamed)       # the local log keeps it
    assert peer_reason(blamed) == ("the sender closed the stream before its end (the migration "
                                   "stopped on the sending side); the half-received domain "
                                   "was destroyed")
    assert blame_sender(_libxc(), None, LOG).__class__ is HelperFailed   # no EOF: libxc's


@pytest.mark.parametrize("exc, told", [
    (MigrationError("writing to /srv/x failed: 4096 bytes"), "the receive failed"),
    (MigrationError("the stream's header (70000 bytes) does not fit this host's pipes"),
     "the receive failed"),
    (MigrationError("not enough free memory: 512 MiB wanted"), "the receive failed"),
    (MigrationProtocolError("not a migration stream: optional data of 600000 bytes"),
     "not a migration stream"),
    (StartupError("cannot open /etc/secret"),
     "the domain could not be created on the receiving host"),
    (Timeout("timed out after 3 s"), "the receiver timed out"),
])
def test_no_path_size_or_free_memory_gets_out(exc, told):
    said = peer_reason(exc)
    assert said.startswith(told) and _told(said), said
    for bad in ("/", "bytes", "MiB", "KiB", "free"):
        assert bad not in said, said


def test_a_peer_text_is_checked_too():
    exc = MigrationError("the receiver is full (64 connections pending): dropped this one")
    exc.peer_text = "the receiver is full: it dropped this connection"
    assert peer_reason(exc) == "the receiver is full: it dropped this connection"
    exc.peer_text = "dropped: 64 KiB of /tmp"      # refused: the error's own first part
    assert peer_reason(exc) == "the receiver is full (64 connections pending)"


def test_one_printable_line():
    assert not _told("two\nlines") and not _told("") and not _told("x" * 201)
    assert _told("not authorized")
