"""``pyxl inspect``: output, JSON, exit codes, never a traceback."""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, List, Tuple

import pytest

from pyxl.cli import inspect as inspect_cli

from conftest import ROOT
from stream_support import HELPER, STREAMS, hvm_chunks, rec


def run_main(argv: List[str], capsys: Any) -> Tuple[int, str, str]:
    code = inspect_cli.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("name", ["hvm.xl", "pv.xl", "hvm.libxl", "pv.libxl", "hvm.libxc",
                                  "pv-v2.libxc"])
def test_inspect_sample_vectors(name: str, capsys: Any) -> None:
    code, out, err = run_main([str(STREAMS / name)], capsys)
    assert code == 0, err
    assert err == ""
    layer = name.rsplit(".", 1)[1]
    assert f"{layer} stream" in out
    assert "result: OK" in out
    assert "END" in out and "pages:" in out
    if layer == "xl":
        assert "config" in out and ("tiny-hvm" in out or "tiny-pv" in out)


def test_inspect_folds_page_data_unless_asked(capsys: Any) -> None:
    code, out, _ = run_main([str(STREAMS / "hvm.xl")], capsys)
    assert code == 0 and "PAGE_DATA x2" in out and "13 pfns, 13 with data" in out
    code, out, _ = run_main([str(STREAMS / "hvm.xl"), "--all-records"], capsys)
    rows = [line for line in out.splitlines() if " libxc " in line and " PAGE_DATA " in line]
    assert code == 0 and "PAGE_DATA x2" not in out and len(rows) == 2


def test_inspect_json(capsys: Any) -> None:
    code, out, err = run_main([str(STREAMS / "pv.xl"), "--json"], capsys)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["ok"] is True and doc["error"] is None
    assert doc["layer"] == "xl" and doc["file"].endswith("pv.xl")
    assert doc["config"]["c_info"]["name"] == "tiny-pv"
    assert doc["xl_header"]["mandatory_flags"] == 3
    assert doc["libxl_header"]["offset"] == 0x137
    assert doc["libxc_header"] == {"offset": 0x14F, "version": 3, "options": 0}
    assert doc["domain_header"]["type_name"] == "x86 PV"
    assert doc["pages"] == {"records": 2, "pfns": 9, "with_data": 8, "without_data": 1,
                            "holes": 1, "by_type": {"L1TAB": 1, "L2TAB": 1, "L3TAB": 1,
                                                    "L4TAB_PINNED": 1, "NOTAB": 4, "XTAB": 1}}
    first_pd = next(r for r in doc["records"] if r["name"] == "PAGE_DATA")
    assert first_pd == {"layer": "libxc", "type": 1, "name": "PAGE_DATA", "offset": 0x207,
                        "length": 0x8048, "detail": first_pd["detail"], "pfns": 8,
                        "with_data": 8}


def test_inspect_refused_stream(tmp_path: pathlib.Path, capsys: Any) -> None:
    chunks = hvm_chunks()
    chunks[7] = rec(9)  # empty HVM_CONTEXT
    path = tmp_path / "bad.libxc"
    path.write_bytes(b"".join(chunks))
    code, out, err = run_main([str(path)], capsys)
    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("pyxl: error: refused: libxc record at 0x")
    assert "HVM_CONTEXT is empty" in err
    assert "result: REFUSED" in out

    code, out, err = run_main([str(path), "--json"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["ok"] is False
    assert doc["error"]["type"] == "StreamError"
    assert doc["error"]["reason"] == "HVM_CONTEXT is empty"
    assert doc["error"]["offset"] == sum(len(c) for c in chunks[:7])


def test_inspect_truncated_stream(capsys: Any) -> None:
    code, out, err = run_main([str(HELPER / "shim-save-stdin-eof.iofd.bin"), "--json"], capsys)
    assert code == 1
    doc = json.loads(out)
    assert doc["error"]["type"] == "TruncatedStream" and doc["error"]["offset"] == 0xB8
    assert len(doc["records"]) == 5


def test_inspect_checkpointed(capsys: Any) -> None:
    path = str(HELPER / "shim-save-remus-one-checkpoint.iofd.bin")
    assert run_main([path], capsys)[0] == 1
    code, out, _ = run_main([path, "--checkpointed"], capsys)
    assert code == 0 and "checkpoints: 1" in out


def test_inspect_layer_override(capsys: Any) -> None:
    code, _, err = run_main([str(STREAMS / "hvm.libxl"), "--layer", "libxc"], capsys)
    assert code == 1 and "libxc image header at 0x0" in err


@pytest.mark.parametrize("argv", [[], ["--bogus", "x"], ["a", "b"], ["x", "--layer", "nope"]])
def test_inspect_usage_errors(argv: List[str], capsys: Any) -> None:
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "usage:" in err


def test_inspect_io_errors(tmp_path: pathlib.Path, capsys: Any) -> None:
    code, _, err = run_main([str(tmp_path)], capsys)
    assert code == 2 and "Is a directory" in err and err.count("\n") == 1
    code, _, err = run_main([str(tmp_path / "missing")], capsys)
    assert code == 2 and "No such file" in err
    if os.geteuid() != 0:  # root reads anything
        locked = tmp_path / "locked"
        locked.write_bytes(b"x")
        locked.chmod(0)
        code, _, err = run_main([str(locked)], capsys)
        assert code == 2 and "Permission denied" in err


def test_add_parser_registers_inspect(capsys: Any) -> None:
    parser = argparse.ArgumentParser(prog="pyxl")
    sub = parser.add_subparsers(dest="command")
    inspect_cli.add_parser(sub)
    args = parser.parse_args(["inspect", str(STREAMS / "hvm.libxc"), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["layer"] == "libxc"


def _python(*args: str, stdin: Any = None, data: bytes = b"") -> "subprocess.CompletedProcess[bytes]":
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, *args], input=data if stdin is None else None,
                          stdin=stdin, capture_output=True, env=env, cwd=str(ROOT), timeout=60)


def test_inspect_stdin_pipe_subprocess() -> None:
    data = (STREAMS / "hvm.xl").read_bytes()
    proc = _python("-m", "pyxl.cli.inspect", "-", "--json", data=data)
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["ok"] and doc["size"] is None and doc["pages"]["pfns"] == 13


def test_a_compressed_image_on_a_pipe_is_refused_with_the_fix() -> None:
    import zstandard
    data = zstandard.ZstdCompressor(write_checksum=True).compress((STREAMS / "hvm.xl").read_bytes())
    proc = _python("-m", "pyxl.cli.inspect", "-", data=data)
    assert proc.returncode == 1
    assert proc.stderr.decode().splitlines()[-1] == (
        "pyxl: error: refused: stream at 0x0: a zstd-compressed image: inspect the file, or "
        "`zstd -dc FILE | pyxl inspect -`")


@pytest.mark.parametrize("data", [b"", b"garbage" * 10, b"\xff" * 8 + b"XENF" + bytes(12),
                                  b"LibxlFmt\x00\x00\x00\x02\x00\x00\x00\x00\x07\x00\x00\x00"])
def test_inspect_never_tracebacks(tmp_path: pathlib.Path, data: bytes) -> None:
    path = tmp_path / "s"
    path.write_bytes(data)
    proc = _python("-m", "pyxl.cli.inspect", str(path))
    assert proc.returncode == 1
    assert b"Traceback" not in proc.stderr
    assert proc.stderr.startswith(b"pyxl: error: refused: ")
    assert proc.stderr.count(b"\n") == 1


def test_pyxl_cli_inspect_subprocess() -> None:
    """Through the project's ``pyxl`` entry point, once pyxl/cli.py wires it."""
    try:
        from pyxl.cli import main as cli
        cli.build_parser()
    except Exception as exc:  # pragma: no cover - cli.py is another engineer's file
        pytest.skip(f"pyxl.cli.main not usable yet: {exc}")
    good = _python("-c", "import sys; from pyxl.cli.main import main; sys.exit(main())",
                   "inspect", str(STREAMS / "pv.xl"))
    assert good.returncode == 0, good.stderr
    assert b"result: OK" in good.stdout
    bad = _python("-c", "import sys; from pyxl.cli.main import main; sys.exit(main())",
                  "inspect", str(HELPER / "shim-save-stdin-eof.iofd.bin"))
    assert bad.returncode == 1 and b"Traceback" not in bad.stderr
