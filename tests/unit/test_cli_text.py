"""What the CLI prints of what users and peers named: addresses as they are
written, names and paths that cannot break a line or forge another."""

from __future__ import annotations

import pytest

from pyxl.cli.runner import shown
from pyxl.migrate.address import format_address, parse_address


@pytest.mark.parametrize("text,host,port", [
    ("127.0.0.1:8002", "127.0.0.1", 8002),
    ("[::1]:8002", "::1", 8002),
    ("dst.example:1", "dst.example", 1),
])
def test_an_address_prints_as_it_is_written(text, host, port):
    assert parse_address(text) == (host, port)
    assert format_address(host, port) == text


@pytest.mark.parametrize("name,line", [
    ("web1", "web1"),
    ("new\nline.save", "new\\nline.save"),
    ("a\tb", "a\\tb"),
    ("db\u2028pyxl: error: forged", "db\\u2028pyxl: error: forged"),
    ("\u202eevil", "\\u202eevil"),
    ("caf\u00e9 \u4e2d", "caf\u00e9 \u4e2d"),                # letters stay as they are
])
def test_a_name_is_shown_on_one_line_as_what_it_is(name, line):
    assert shown(name) == line
