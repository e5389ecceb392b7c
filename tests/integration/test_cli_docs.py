"""``pyxl completion bash`` and the man page, both generated from the parser (issue 17).

The completion script is valid bash and completes in a real bash: commands,
``sim`` subcommands, options, an option's choices, files, and domain names
(from ``pyxl sim list`` on a machine without Xen).  The man page renders
with groff without a warning and documents every command and option.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from pyxl import sim

from conftest import ROOT

PYXL = [sys.executable, "-m", "pyxl"]


@pytest.fixture(scope="module")
def script(tmp_path_factory) -> str:
    r = subprocess.run(PYXL + ["completion", "bash"], capture_output=True, text=True, cwd=ROOT,
                       check=True)
    path = tmp_path_factory.mktemp("completion") / "pyxl.bash"
    path.write_text(r.stdout)
    return str(path)


def complete(script: str, line: str, env=None) -> list:
    """What bash completes for ``line`` (the last word is the one completed)."""
    words = line.split(" ")
    program = f"""
        source {script}
        COMP_WORDS=({' '.join(repr(w) for w in words)})
        COMP_CWORD={len(words) - 1}
        _pyxl
        printf '%s\\n' "${{COMPREPLY[@]}}"
    """
    # `pyxl` on PATH for the domain-name lookup: this interpreter's
    bindir = os.path.dirname(sys.executable)
    e = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}", **(env or {}))
    r = subprocess.run(["bash", "--norc", "-c", program], capture_output=True, text=True,
                       env=e, cwd=ROOT, timeout=60)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


def test_the_script_is_valid_bash(script):
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def test_commands_and_subcommands(script):
    assert complete(script, "pyxl sa") == ["save"]
    assert set(complete(script, "pyxl migrate")) == {"migrate", "migrate-receive"}
    assert set(complete(script, "pyxl sim cr")) == {"create", "create-empty"}
    assert "completion" in complete(script, "pyxl ")


def test_options_and_their_values(script):
    assert complete(script, "pyxl save --li") == ["--live"]
    assert complete(script, "pyxl -v save --ti") == ["--timeout"]
    assert set(complete(script, "pyxl migrate --on-fail ")) == {"abort", "stop"}
    assert set(complete(script, "pyxl inspect --layer l")) == {"libxl", "libxc"}
    assert "--content" in complete(script, "pyxl sim create --c")
    assert complete(script, "pyxl restore --sim-dir libxl_h") == ["libxl_helper"]   # directories
    assert complete(script, "pyxl restore --sim-dir READ") == []
    assert "README.md" in complete(script, "pyxl inspect READ")            # a file


def test_domain_names(script, sim_dir):
    sim.create(16 << 20, name="web1", sim_dir=sim_dir)
    assert complete(script, "pyxl save w", env={"PYXL_SIM_DIR": sim_dir}) == ["web1"]
    # the --sim-dir on the line is the one whose domains are offered
    assert complete(script, f"pyxl save --sim-dir {sim_dir} w") == ["web1"]


def test_each_positional_completes_as_what_it_is(script, sim_dir):
    sim.create(16 << 20, name="READ", sim_dir=sim_dir)
    env = {"PYXL_SIM_DIR": sim_dir}
    assert complete(script, "pyxl save READ", env=env) == ["READ"]          # DOMAIN: a domain
    assert "README.md" in complete(script, "pyxl save READ READ", env=env)  # FILE: a file
    assert complete(script, "pyxl completion ") == ["bash"]


def test_the_man_page_renders_and_documents_everything(tmp_path):
    from pyxl.cli.docgen import walk
    from pyxl.cli.main import build_parser
    r = subprocess.run([sys.executable, "-m", "pyxl.cli.docgen", "man"], capture_output=True,
                       text=True, cwd=ROOT, check=True)
    page = tmp_path / "pyxl.1"
    page.write_text(r.stdout)
    g = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(page)], capture_output=True,
                       text=True)
    assert g.returncode == 0 and g.stderr == "", g.stderr
    text = subprocess.run(["groff", "-man", "-Tascii", "-P", "-cbou", str(page)],
                          capture_output=True, text=True, check=True).stdout
    commands = 0
    for path, p in walk(build_parser()):
        if not path or path == "sim":
            continue
        commands += 1
        assert f"pyxl {path} " in " ".join(text.split()), path
        for a in p._actions:
            for opt in a.option_strings:
                assert opt in text, (path, opt)
    assert commands > 20
    for section in ("EXIT STATUS", "ENVIRONMENT", "SEE ALSO"):
        assert section in text


def test_help_texts_are_plain_text():
    """``--help`` and the man page show what the parser holds, as it is: no
    reStructuredText from a docstring (``pyxl``) in any description or help line."""
    import argparse

    from pyxl.cli.docgen import walk
    from pyxl.cli.main import build_parser
    texts = []
    for path, parser in walk(build_parser()):
        texts += [(path, parser.description), (path, parser.epilog)]
        for action in parser._actions:
            texts.append((path, action.help))
            if isinstance(action, argparse._SubParsersAction):
                texts += [(path, sub.help) for sub in action._choices_actions]
    assert len(texts) > 50
    assert [(path, text) for path, text in texts if text and ("``" in text or ":class:" in text)] == []
    r = subprocess.run(PYXL + ["inspect", "--help"], capture_output=True, text=True, cwd=ROOT,
                       check=True)
    assert "Show and check a saved-domain stream" in r.stdout and "``" not in r.stdout
