"""Every code block in README.md runs, or is checked, as a test (issue 17).

* ``python`` blocks run in a fresh interpreter, in a temporary directory, on
  fakexen (``PYXL_SIM_DIR``), with the names a reader would have at hand:
  ``domid`` (a running simulated guest called web1), ``src_dir`` (its state
  directory) and ``dst_dir`` (another host's).  A block marked, on the line
  before it, ``<!-- readme-test: compile-only: WHY -->`` is only compiled:
  such marks are counted, and may not grow past :data:`MAX_COMPILE_ONLY`
  without a reason here.
* ``sh`` blocks: every ``pyxl ...`` line (after an optional ``host$`` prompt,
  continuations joined) must parse with pyxl's own parser; the certificate
  recipe runs with openssl and its certificates must make a mutual-TLS pair;
  ``make`` lines name real targets (``make -n``); the example script runs.
* Plain blocks: the CLI synopsis names only options each command has, and
  the exception tree only classes ``pyxl.errors`` has.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import List, Optional

import pytest

from conftest import ROOT

README = ROOT / "README.md"
#: python blocks that may only be compiled: the HookLoop hooks (the application's
#: own loop), the TLS listener on a fixed public port, the Remus fds
MAX_COMPILE_ONLY = 3

_FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
_MARK = re.compile(r"<!-- readme-test: (compile-only): (.+?) -->\s*$")


@dataclass
class Block:
    line: int
    lang: str
    text: str
    mark: Optional[str]

    def __str__(self) -> str:
        return f"README.md:{self.line} ({self.lang or 'plain'})"


def blocks() -> List[Block]:
    text = README.read_text()
    out = []
    for m in _FENCE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        before = text[:m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        mark = _MARK.search(before)
        out.append(Block(line, m.group(1), m.group(2), mark.group(1) if mark else None))
    return out


def of(lang: str) -> List[Block]:
    return [b for b in blocks() if b.lang == lang]


PRELUDE = textwrap.dedent("""\
    import os
    from pyxl import sim
    src_dir = os.environ["PYXL_SIM_DIR"]
    dst_dir = os.environ["README_DST_DIR"]
    domid = sim.create(32 << 20, dirty_rate=1 << 20, name="web1")
    """)


def test_the_marks_do_not_grow():
    marked = [b for b in blocks() if b.mark]
    assert all(b.lang == "python" for b in marked), marked
    assert len(marked) <= MAX_COMPILE_ONLY, [str(b) for b in marked]


@pytest.mark.parametrize("block", of("python"), ids=str)
def test_python_block(block: Block, tmp_path):
    code = compile(block.text, str(block), "exec")   # every block compiles
    if block.mark == "compile-only":
        return
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir(mode=0o700)
    dst.mkdir(mode=0o700)
    env = {"PATH": "/usr/bin:/bin", "PYXL_SIM_DIR": str(src), "README_DST_DIR": str(dst),
           "PYTHONPATH": str(ROOT)}
    try:
        r = subprocess.run([sys.executable, "-c", PRELUDE + block.text], cwd=tmp_path, env=env,
                           capture_output=True, text=True, timeout=180)
        assert r.returncode == 0, f"{block}:\n{r.stderr[-2000:]}"
    finally:
        from pyxl import sim
        for d in (src, dst):
            sim.remove_dir(str(d))
    assert code is not None


def _commands(text: str) -> List[List[str]]:
    """The shell commands of a block: continuations joined, prompts and comments dropped."""
    out = []
    for line in text.replace("\\\n", " ").splitlines():
        line = re.sub(r"^\w+\$ ", "", line.strip())
        if line and not line.startswith("#"):
            out.append(shlex.split(line, comments=True))
    return out


def test_sh_blocks_use_the_cli_as_it_is(tmp_path):
    from pyxl.cli.main import build_parser
    seen = 0
    for block in of("sh"):
        assert subprocess.run(["bash", "-n"], input=block.text, text=True).returncode == 0, block
        for argv in _commands(block.text):
            if argv[0] == "pyxl":
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit as exc:
                    pytest.fail(f"{block}: `{shlex.join(argv)}` does not parse ({exc})")
                seen += 1
            elif argv[0] == "make":
                r = subprocess.run(["make", "-n", *argv[1:]], cwd=ROOT, capture_output=True,
                                   text=True)
                assert r.returncode == 0, f"{block}: {shlex.join(argv)}: {r.stderr}"
    assert seen >= 3


def test_the_certificate_recipe_makes_a_working_pair(tmp_path):
    """The Trust section's openssl commands, run as written: the certificate
    they make verifies against their CA as both ends of a TLS connection."""
    recipe = next(b for b in of("sh") if "openssl req -x509" in b.text)
    r = subprocess.run(["bash", "-e"], input=recipe.text, cwd=tmp_path, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    import ssl
    from pyxl.migrate.tls import TlsOptions, make_context
    opts = TlsOptions(str(tmp_path / "dst.pem"), str(tmp_path / "dst.key"),
                      str(tmp_path / "ca.pem"), allow=("dst.example",),
                      server_name="dst.example")
    server, client = make_context(opts, server=True), make_context(opts, server=False)
    a, b = ssl.MemoryBIO(), ssl.MemoryBIO()
    c, d = ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(a, b, server_side=True)
    cli = client.wrap_bio(c, d, server_hostname="dst.example")
    for _ in range(10):   # shuttle the handshake between the two
        for obj in (cli, srv):
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                pass
        a.write(d.read())
        c.write(b.read())
    assert cli.getpeercert() and srv.getpeercert()
    assert (tmp_path / "dst.key").stat().st_mode & 0o777 == 0o600


def test_the_example_runs(tmp_path):
    block = next(b for b in of("sh") if "examples/own_domains.py" in b.text)
    argv = _commands(block.text)[0]
    r = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, capture_output=True, text=True,
                       timeout=180)
    assert r.returncode == 0, r.stderr


def _options_of(parser) -> set:
    return {o for a in parser._actions for o in a.option_strings}


def test_the_cli_synopsis_names_real_options():
    import argparse
    from pyxl.cli.main import build_parser
    synopsis = next(b for b in of("") if b.text.startswith("pyxl [-v|-vv] [-T] COMMAND"))
    parser = build_parser()
    top = synopsis.text.splitlines()[0]
    for opt in re.findall(r"(?<![\w-])(--?[a-zA-Z][\w-]*)", top):   # pyxl's own options
        assert opt.replace("-vv", "-v") in _options_of(parser), opt
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    current: Optional[str] = None
    for raw in synopsis.text.splitlines():
        line = raw.strip()
        if line.startswith("pyxl "):
            words = line.split()
            current = words[1]
            line = " ".join(words[2:])
        if current is None or current.startswith("["):
            continue
        if current == "sim":
            sim_subs = next(a for a in subs["sim"]._actions
                            if isinstance(a, argparse._SubParsersAction)).choices
            for alt in line.split(" | "):
                for name in re.match(r"([\w|-]+)", alt).group(1).split("|") if alt else []:
                    if name in sim_subs:
                        for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", alt):
                            assert opt in _options_of(sim_subs[name]), (name, opt)
                            checked += 1
            continue
        for opt in re.findall(r"(?<![\w-])(--?[a-z][\w-]*)", line):
            assert opt in _options_of(subs[current]), (current, opt)
            checked += 1
    assert checked > 40


def test_the_exception_tree_names_real_classes():
    import pyxl.errors
    tree = next(b for b in of("") if b.text.startswith("PyxlError"))
    names = set(re.findall(r"\b([A-Z][A-Za-z]+(?:Error|Exited|Died|Failed|Aborted|Complete|"
                           r"Results|Timeout|Cancelled|Stream|Large|Doubt))\b", tree.text))
    assert len(names) > 20
    import builtins
    missing = [n for n in sorted(names) if not hasattr(pyxl.errors, n) and not hasattr(builtins, n)]
    assert not missing, missing
