"""pyxl ships py.typed, so its annotations are a promise: mypy --strict stays clean,
and a user's script is checked against them.

The user scripts are checked from a directory outside the tree, so mypy finds pyxl
the way a user's editor does: through the (editable) install, which must expose
``py.typed`` (the Makefile installs in setuptools' compat mode for that).
"""

import inspect
import re
import subprocess
import sys
import textwrap
import typing

import pytest

import pyxl
import pyxl.aio
from pyxl import migrate

from conftest import ROOT


def test_mypy_strict_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "pyxl"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    assert (ROOT / "pyxl" / "py.typed").exists()


def test_the_benches_are_typed_too():
    """bench/ (its figures feed the README) passes mypy --strict as pyxl does."""
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "bench"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]


GOOD = '''
import asyncio
from typing import Optional, Tuple

import pyxl
import pyxl.aio
from pyxl import migrate

op = pyxl.save(1, "/tmp/web1.save", live=True, leave="paused", timeout=60.0)
saved: pyxl.SaveResult = op.result()
written: Optional[int] = saved.bytes_written
rop = pyxl.restore("/tmp/web1.save", paused=True, name="web1b")
domid: int = rop.result().domid
rx = migrate.receive("127.0.0.1:0", sim_dir="/tmp/dst")
address: Optional[Tuple[str, int]] = rx.address
tx = migrate.migrate(1, address, live=True, downtime_ms=50, on_fail="stop",
                     max_bandwidth=100 << 20, sim_dir="/tmp/src")
results = pyxl.wait(op, rop, tx, rx)
# typed per position: each result has its operation's type, no annotation needed
saved2, restored2 = pyxl.wait(op, rop)
written2: Optional[int] = saved2.bytes_written
domid2: int = restored2.domid
more: "tuple[object, ...]" = pyxl.wait(op, rop, tx, rx, op, timeout=5.0)
# a list of different operations needs no annotation (the futures are covariant)
mixed = [op, rop, tx, rx]
pyxl.wait(*mixed)
ops: "list[pyxl.Operation[object]]" = [op, rop]
pyxl.wait(*ops)
sent: migrate.MigrateResult = tx.result()
got: migrate.ReceiveResult = rx.result()
downtime: Optional[float] = sent.downtime


async def main() -> None:
    s: pyxl.SaveResult = await pyxl.aio.save(1, "/tmp/a.save", live=True, leave="running")
    r: pyxl.RestoreResult = await pyxl.aio.restore("/tmp/a.save", paused=False)
    m, g = await asyncio.gather(pyxl.aio.migrate(1, "127.0.0.1:8002", live=True),
                                pyxl.aio.receive("127.0.0.1:8002", sim_dir="/tmp/dst"))
    print(s.duration, r.domid, m.downtime, g.domid)

asyncio.run(main())
'''

#: name -> (script, the error mypy must report for it)
BAD = {
    "misspelt_keyword": ('pyxl.save(1, "/tmp/x.save", liv=True)\n',
                         r'Unexpected keyword argument "liv"'),
    "misspelt_leave": ('pyxl.save(1, "/tmp/x.save", leave="destory")\n',
                       r'Argument "leave" to "save" has incompatible type'),
    "result_is_typed": ('name: str = pyxl.save(1, "/tmp/x.save").result()\n',
                        r'Incompatible types in assignment \(expression has type "SaveResult"'),
    "migrate_on_fail": ('migrate.migrate(1, "h:1", live=True, downtime_ms=5, on_fail="retry")\n',
                        r'Argument "on_fail" to "migrate" has incompatible type'),
    "receive_keyword": ('migrate.receive("127.0.0.1:0", pasued=True)\n',
                        r'Unexpected keyword argument "pasued"'),
    "wait_per_position": ('a, b = pyxl.wait(pyxl.save(1, "/tmp/x.save"), '
                          'pyxl.restore("/tmp/x.save"))\nreveal_type((a, b))\n',
                          r'Revealed type is "tuple\[pyxl\.ops\.saveoptions\.SaveResult, '
                          r'pyxl\.ops\.restore\.RestoreResult\]"'),
    "wait_result_is_typed": ('s: str\nr: int\ns, r = pyxl.wait(pyxl.save(1, "/tmp/x.save"), '
                             'pyxl.restore("/tmp/x.save"))\n',
                             r'Incompatible types in assignment \(expression has type '
                             r'"SaveResult", variable has type "str"\)'),
    "wait_many_is_common": ('domid: int = pyxl.wait(*[pyxl.save(1, "/tmp/x.save")] * 5)[0].domid\n'
                            'x: int = pyxl.wait(pyxl.save(1, "/x"), pyxl.restore("/x"), '
                            'pyxl.save(1, "/x"), pyxl.restore("/x"), pyxl.save(1, "/x"))[4]\n',
                            r'Incompatible types in assignment \(expression has type "object"'),
    "aio_keyword": ('import asyncio\nasyncio.run(pyxl.aio.save(1, "/tmp/x.save", liv=True))\n',
                    r'Unexpected keyword argument "liv"'),
    "aio_loop": ('import asyncio\nasyncio.run(pyxl.aio.save(1, "/tmp/x.save", '
                 'loop=pyxl.default_loop()))\n', r'Unexpected keyword argument "loop"'),
}


@pytest.fixture(scope="module")
def mypy_on_user_scripts(tmp_path_factory):
    """One mypy --strict run over the good script and every bad one (one file each)."""
    d = tmp_path_factory.mktemp("user")
    (d / "good.py").write_text(textwrap.dedent(GOOD))
    header = "import pyxl\nimport pyxl.aio\nfrom pyxl import migrate\n"
    for name, (body, _) in BAD.items():
        (d / f"bad_{name}.py").write_text(header + body)
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-error-summary",
                        "--cache-dir", str(ROOT / ".mypy_cache"), "--config-file", "/dev/null",
                        *sorted(p.name for p in d.glob("*.py"))],
                       cwd=d, capture_output=True, text=True, timeout=600)
    assert "Cannot find implementation or library stub" not in r.stdout, r.stdout
    return r.stdout


def test_a_correct_user_script_passes_mypy_strict(mypy_on_user_scripts):
    assert [line for line in mypy_on_user_scripts.splitlines()
            if line.startswith("good.py")] == []


@pytest.mark.parametrize("name", sorted(BAD))
def test_a_wrong_user_script_fails_mypy_strict(mypy_on_user_scripts, name):
    mine = [line for line in mypy_on_user_scripts.splitlines()
            if line.startswith(f"bad_{name}.py:")]
    assert mine, mypy_on_user_scripts
    assert any(re.search(BAD[name][1], line) for line in mine), mine


@pytest.mark.parametrize("fn", [pyxl.save, pyxl.restore, migrate.migrate, migrate.receive,
                                pyxl.aio.save, pyxl.aio.restore, pyxl.aio.migrate,
                                pyxl.aio.receive])
def test_help_shows_every_keyword(fn):
    """help(pyxl.save), help(pyxl.migrate.migrate), ...: named parameters, no **kw."""
    params = inspect.signature(fn).parameters.values()
    assert not [p for p in params if p.kind is p.VAR_KEYWORD]
    names = {p.name for p in params}
    assert {"helper", "timeout", "sim_dir", "backend"} <= names
    # pyxl.aio's run on the running asyncio loop: no loop= to offer
    assert ("loop" in names) == (fn.__module__ != "pyxl.aio")
    if fn.__name__ in ("save", "migrate"):
        assert "live" in names
    closed = {"leave": ("destroy", "paused", "running"), "on_fail": ("abort", "stop")}
    for name, values in closed.items():
        if name in names:      # the annotation is the module's Literal alias
            alias = inspect.signature(fn).parameters[name].annotation
            module = sys.modules[inspect.unwrap(fn).__module__]
            assert typing.get_args(getattr(module, alias)) == values


@pytest.mark.parametrize("name", ["save", "restore", "migrate", "receive"])
def test_the_aio_signatures_are_their_twins_without_loop(name):
    """pyxl.aio's signatures are written out (a ParamSpec cannot drop loop=):
    they must stay the synchronous twins', parameter for parameter."""
    twin = getattr(migrate if name in ("migrate", "receive") else pyxl, name)
    mine = inspect.signature(getattr(pyxl.aio, name)).parameters
    theirs = {k: p for k, p in inspect.signature(twin).parameters.items() if k != "loop"}
    assert list(mine) == list(theirs)
    for k, p in theirs.items():
        assert (mine[k].kind, mine[k].default, mine[k].annotation) == \
            (p.kind, p.default, p.annotation), k
