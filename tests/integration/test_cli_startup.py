"""The CLI starts fast: a command imports only what it runs.

``pyxl --version`` imports none of the library beyond ``pyxl.errors`` and the
command table; ``pyxl sim list`` imports ``pyxl.sim`` and nothing of the
operations, the loops, the backends, migration or the stream codecs.  A
generous CPU bound (a ratio to ``python -c pass`` measured in the same run)
catches a heavy import creeping back; the precise figure is in the commit
message and README.
"""

from __future__ import annotations

import ast
import os
import resource
import subprocess
import sys
from typing import List

import pytest

from pyxl.cli import main as climain

from conftest import ROOT

#: Never imported by `pyxl --version` or `pyxl sim list`.
HEAVY = ["pyxl.ops", "pyxl.loop", "pyxl.backends", "pyxl.migrate", "pyxl.stream", "pyxl.wire",
         "pyxl.qmp", "pyxl.streamio", "pyxl.sim.devicemodel", "logging", "selectors", "socket",
         "ssl", "asyncio", "ctypes", "subprocess", "hashlib", "json", "signal",
         "shutil",   # argparse's terminal sizing: pyxl's formatter does without (2 ms)
         "locale"]   # gettext's catalog look-ups of argparse's words (pyxl.cli.args, 2.5 ms)


def modules_after(argv: List[str], sim_dir: str) -> List[str]:
    """sys.modules after ``pyxl ARGV`` ran in a fresh interpreter (its output discarded)."""
    code = ("import io, sys, contextlib\n"
            "from pyxl.cli.main import main\n"
            "out = io.StringIO()\n"
            "with contextlib.redirect_stdout(out):\n"
            "    try:\n"
            f"        rc = main({argv!r})\n"
            "    except SystemExit as e:\n"
            "        rc = e.code\n"
            "print(repr([rc, sorted(sys.modules)]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=str(ROOT), env=dict(os.environ, PYXL_SIM_DIR=sim_dir))
    assert r.returncode == 0, r.stderr
    rc, mods = ast.literal_eval(r.stdout.splitlines()[-1])
    assert rc == 0, (rc, r.stderr)
    return mods


def heavy_in(mods: List[str]) -> List[str]:
    return [m for m in mods if any(m == h or m.startswith(h + ".") for h in HEAVY)]


def test_version_imports_no_subcommand_and_no_library(sim_dir):
    mods = modules_after(["--version"], sim_dir)
    assert heavy_in(mods) == []
    assert [m for m in mods if m.startswith("pyxl.cli.")] == ["pyxl.cli.args", "pyxl.cli.main",
                                                             "pyxl.cli.runner"]
    assert "pyxl.sim" not in mods


def test_sim_list_imports_the_simulator_only(sim_dir):
    mods = modules_after(["sim", "list"], sim_dir)
    assert "pyxl.sim" in mods and "pyxl.cli.sim" in mods
    assert heavy_in(mods) == []
    # dataclasses (with inspect) and typing: 10 ms of a 30 ms budget
    assert not {"dataclasses", "inspect", "typing"} & set(mods)
    assert not {"pyxl.cli.saverestore", "pyxl.cli.migrate", "pyxl.cli.inspect",
                "pyxl.cli.demo"} & set(mods)


def test_the_table_help_lines_are_the_modules_own():
    """`pyxl --help` shows the table's lines without importing the modules: the same
    lines the modules register, and every module command is in the table."""
    full = climain.build_parser()
    sub = next(a for a in full._actions if a.dest == "command")
    own = {a.dest: a.help for a in sub._choices_actions}
    assert own == {name: helptext for name, (_, helptext) in climain.COMMANDS.items()}
    lazy = climain.build_parser(["--help"])
    sub = next(a for a in lazy._actions if a.dest == "command")
    assert list(sub.choices) == list(climain.COMMANDS)


def test_a_sim_subcommand_builds_only_its_own_parser():
    """`pyxl sim list` builds `list` in full, the other sim subcommands by name and
    help line only; `pyxl sim --help` and a mistyped subcommand get them all."""
    def sim_choices(argv: List[str]) -> dict:
        parser = climain.build_parser(argv)
        top = next(a for a in parser._actions if a.dest == "command")
        sim = top.choices["sim"]
        return next(a for a in sim._actions if a.dest == "sim_command").choices

    def options(p: object) -> set:
        return {o for a in p._actions for o in a.option_strings}   # type: ignore[attr-defined]

    lazy = sim_choices(["sim", "list", "--json"])
    full = sim_choices(["sim", "--help"])
    assert list(lazy) == list(full) == list(sim_choices(["sim", "lst"]))
    assert options(lazy["list"]) == options(full["list"]) >= {"--json", "--sim-dir"}
    assert options(lazy["create"]) == set() and "--memory" in options(full["create"])
    assert climain.build_parser(["sim", "list", "--json"]).parse_args(
        ["sim", "list", "--json"]).json is True


def test_help_lists_every_command_and_a_subcommand_gets_its_own_usage():
    r = subprocess.run([sys.executable, "-m", "pyxl", "--help"], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0
    for name in climain.COMMANDS:
        assert f"    {name}" in r.stdout
    r = subprocess.run([sys.executable, "-m", "pyxl", "-v", "restore"], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.splitlines()[-1] == ("pyxl: error: restore: the following arguments are "
                                         "required: FILE")


def _cpu_ms(argv: List[str], env: dict, runs: int = 7) -> float:
    """The least CPU time (user + system) of ``runs`` runs: the load of the machine
    only ever adds."""
    best = float("inf")
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                       check=True, timeout=60)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        best = min(best, (after.ru_utime - before.ru_utime
                          + after.ru_stime - before.ru_stime) * 1000)
    return best


@pytest.mark.parametrize("argv", [["--version"], ["sim", "list"]])
def test_startup_cpu_is_a_small_multiple_of_a_bare_interpreter(argv, sim_dir, tmp_path):
    """Measured (2 cores, best of 21, cached bytecode): python -c pass 9 ms, --version
    18 ms, sim list 24 ms (the whole library: 170 ms).  The bound, 3x a bare
    interpreter + 10 ms, leaves room for a loaded machine's noise, not for a
    heavy import."""
    # Cached bytecode, as an installed pyxl has it, even where the environment
    # says not to write any (PYTHONDONTWRITEBYTECODE) or the tree is read-only.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env.update(PYXL_SIM_DIR=sim_dir, PYTHONPYCACHEPREFIX=str(tmp_path / "pycache"))
    pyxl = [sys.executable, "-m", "pyxl"]
    subprocess.run(pyxl + argv, capture_output=True, env=env, check=True)   # bytecode cached
    bare = _cpu_ms([sys.executable, "-c", "pass"], env)
    took = _cpu_ms(pyxl + argv, env)
    assert took <= 3 * bare + 10, f"pyxl {' '.join(argv)}: {took:.1f} ms CPU, bare {bare:.1f}"


def test_main_gives_argparse_its_gettext_back(capsys):
    """pyxl's main skips gettext for argparse's own words while it runs (a faster
    start), and only then: an application that calls it keeps its translations."""
    import argparse

    before = argparse._   # type: ignore[attr-defined]
    seen = []

    def translate(message: str) -> str:
        seen.append(message)
        return message

    argparse._ = translate   # type: ignore[attr-defined]
    try:
        with pytest.raises(SystemExit) as exit_:
            climain.main(["no-such-command"])
        assert exit_.value.code == 2
        assert seen == []                                   # main used the words as written
        assert argparse._ is translate                      # type: ignore[attr-defined]
        argparse.ArgumentParser(prog="app").format_usage()
        assert "usage: " in seen                            # and gave gettext back
    finally:
        argparse._ = before   # type: ignore[attr-defined]
    assert "invalid choice: 'no-such-command'" in capsys.readouterr().err
