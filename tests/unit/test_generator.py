"""libxl_helper/genmsgs.py: one message table, two generated sides that agree.

* The committed pyxl/wire/_generated.py is exactly what the generator writes today,
  and a stale copy is refused: by ``genmsgs.py check`` and by the build (setup.py),
  which never rewrites it; ``genmsgs.py regen`` (``make regen``) does.
* The helper's _messages.pxi has, for every table row, a send function with
  the row's arguments and wire types, the right message number, a callback
  stub where the row waits or has a CBFLAGS bit, and installs each stub in the
  modes that send it.
* A changed table (a temporary copy, via --table) changes both outputs the
  same way, and the changed .pxi still compiles into the helper.
"""

from __future__ import annotations

import re
import runpy
import shutil
import subprocess
import sys
import sysconfig

import pytest

from conftest import ROOT

GEN = ROOT / "libxl_helper" / "genmsgs.py"
TABLE = ROOT / "pyxl" / "wire" / "table.py"
C_TYPES = {"uint16": "uint16_t", "uint32": "uint32_t", "int32": "int32_t", "uint64": "uint64_t",
           "string": "const char *"}


def generate(kind: str, table=None) -> str:
    args = [sys.executable, str(GEN)] + (["--table", str(table)] if table else []) + [kind]
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout


def load(table=TABLE):
    ns = runpy.run_path(str(table))
    return ns["MESSAGES"], ns["CALLBACK_BIT_MESSAGES"]


# ---------------------------------------------------------------------------
# Parsing the generated Cython


def parse_pxi(text: str):
    """What the .pxi defines: {name: {...}} plus {mode: {installed names}}."""
    numbers = dict((n, int(v)) for n, v in re.findall(r"^    MSG_(\w+) = (\d+)$", text, re.M))
    flags = dict((n, int(v)) for n, v in re.findall(r"^    CBFLAG_(\w+) = (\d+)$", text, re.M))
    out = {}
    for name, params, body in re.findall(
            r"^cdef void send_(\w+)\(([^)]*)\) noexcept nogil:\n((?:    .*\n)+)", text, re.M):
        args = [re.match(r"(.*?)\s*(\w+)$", p.strip()).groups() for p in params.split(",") if p.strip()]
        begin = re.search(r"_msg_begin\(MSG_(\w+)\)", body).group(1)
        puts = re.findall(r"_put_(\w+)\(p, (\w+)", body)
        out[name] = {"args": [(a, t) for t, a in args], "number": numbers[begin.upper()],
                     "puts": puts, "cbflag": flags.get(name.upper(), 0), "stub": None,
                     "sent": "_msg_send(p)" in body}
    for rtype, name, params, body in re.findall(
            r"^cdef (int|void) stub_(\w+)\(([^)]*)\) noexcept nogil:\n((?:    .*\n)+)", text, re.M):
        out[name]["stub"] = (rtype, [p.strip() for p in params.split(",")], body)
    installed = {}
    for mode, body in re.findall(
            r"^cdef void install_(\w+)_callbacks\(\w+ \*cbs, unsigned int cbflags\) noexcept nogil:\n"
            r"((?:    .*\n)+)", text, re.M):
        pairs = re.findall(r"if cbflags & CBFLAG_(\w+):\n        cbs\.(\w+) = stub_(\w+)", body)
        assert all(f.lower() == field == stub for f, field, stub in pairs)
        installed[mode] = {field for _, field, _ in pairs}
    return out, installed


def check_pxi_against_table(text: str, messages, bits) -> None:
    parsed, installed = parse_pxi(text)
    assert list(parsed) == [row[0] for row in messages]          # one per row, in order
    for number, (name, senders, waits, args) in enumerate(messages, start=1):
        got = parsed[name]
        cbflag = 1 << number if name in bits else 0
        assert got["number"] == number, name
        assert got["args"] == [(a, C_TYPES[w]) for a, w in args], name
        assert got["puts"] == [(w, a) for a, w in args], name    # packed in table order
        assert got["sent"], name
        assert got["cbflag"] == cbflag, name
        if waits or cbflag:
            rtype, params, body = got["stub"]
            assert rtype == ("int" if waits else "void"), name
            assert params == [f"{C_TYPES[w]}{'' if w == 'string' else ' '}{a}" for a, w in args] \
                + ["void *data"], name
            assert f"send_{name}(" in body and (("return _get_reply()" in body) == bool(waits))
        else:
            assert got["stub"] is None, name
        for mode in ("save", "restore"):
            assert (name in installed[mode]) == bool(cbflag and mode in senders), (name, mode)


def check_wire_against_table(text: str, messages, bits) -> None:
    ns: dict = {}
    exec(compile(text, "_wire.py", "exec", dont_inherit=True), ns)   # no __future__ leak
    by_number = ns["BY_NUMBER"]
    assert sorted(by_number) == list(range(1, len(messages) + 1))
    for number, (name, senders, waits, args) in enumerate(messages, start=1):
        cls = by_number[number]
        assert (cls.NAME, cls.SENDERS, cls.WAITS_FOR_REPLY, cls.ARGS, cls.CBFLAG) == \
            (name, tuple(senders), waits, tuple(args), (1 << number) if name in bits else 0)


# ---------------------------------------------------------------------------
# The real table


WIRE = ROOT / "pyxl" / "wire" / "_generated.py"
STALE = "stale pyxl/wire/_generated.py: run make regen"


def test_committed_wire_is_generated():
    assert WIRE.read_text() == generate("wire"), STALE


def check(*args):
    return subprocess.run([sys.executable, str(GEN), "check", *map(str, args)],
                          capture_output=True, text=True)


def test_check_accepts_the_committed_copy():
    proc = check()
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")


@pytest.mark.parametrize("alter", [
    lambda t: t.replace("WAITS_FOR_REPLY: ClassVar[bool] = True", "WAITS_FOR_REPLY: ClassVar[bool] = False", 1),
    lambda t: t.replace("    2: Progress,\n", ""),
    lambda t: t + "\n",
    lambda t: t[:-1],
    lambda t: "",
], ids=["changed-value", "dropped-row", "extra-newline", "missing-newline", "empty"])
def test_check_refuses_a_stale_copy(tmp_path, alter):
    stale = tmp_path / "_generated.py"
    text = alter(WIRE.read_text())
    assert text != WIRE.read_text()
    stale.write_text(text)
    proc = check(stale)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr == f"stale {stale}: run make regen\n"
    assert stale.read_text() == text   # check never writes


def test_check_refuses_a_missing_copy(tmp_path):
    proc = check(tmp_path / "_generated.py")
    assert proc.returncode == 1 and proc.stderr.endswith(": run make regen\n")


def test_regen_rewrites_a_stale_copy_and_leaves_a_fresh_one(tmp_path):
    stale = tmp_path / "_generated.py"
    stale.write_text(WIRE.read_text().replace("NUMBER: ClassVar[int] = 10", "NUMBER: ClassVar[int] = 11"))
    regen = [sys.executable, str(GEN), "regen", str(stale)]
    proc = subprocess.run(regen, capture_output=True, text=True, check=True)
    assert proc.stdout == f"wrote {stale}\n"
    assert stale.read_text() == generate("wire") and check(stale).returncode == 0
    proc = subprocess.run(regen, capture_output=True, text=True, check=True)
    assert proc.stdout == f"up to date: {stale}\n"


def test_check_follows_the_table(tmp_path):
    """A table change makes the committed copy stale; regenerating from that table fixes it."""
    path = changed_table(tmp_path, insert_before_complete(ADDED_MESSAGE))
    copy = tmp_path / "_generated.py"
    copy.write_text(WIRE.read_text())
    args = [sys.executable, str(GEN), "--table", path]
    assert subprocess.run(args + ["check", str(copy)], capture_output=True).returncode == 1
    subprocess.run(args + ["regen", str(copy)], capture_output=True, check=True)
    assert subprocess.run(args + ["check", str(copy)], capture_output=True).returncode == 0
    assert copy.read_text() == generate("wire", path)


def build_tree(tmp_path):
    """The files setup.py reads before it builds anything, copied into a scratch tree."""
    tree = tmp_path / "tree"
    for rel in ("setup.py", "pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "libxl_helper/genmsgs.py",
                "pyxl/wire/table.py", "pyxl/wire/_generated.py"):
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / rel, tree / rel)
    return tree


def test_build_refuses_a_stale_copy_and_leaves_it_alone(tmp_path):
    """setup.py's build fails with one line ending in "run make regen", and writes no source file.

    (It used to regenerate the committed copy during every build, so the check
    above could never fail after one.)
    """
    tree = build_tree(tmp_path)
    stale = tree / "pyxl" / "wire" / "_generated.py"
    text = stale.read_text().replace("NUMBER: ClassVar[int] = 10", "NUMBER: ClassVar[int] = 11")
    stale.write_text(text)
    proc = subprocess.run([sys.executable, "setup.py", "-q", "build_ext"], cwd=tree,
                          capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == "error: " + STALE
    assert stale.read_text() == text
    assert not (tree / "build").exists()   # refused before compiling anything


def test_default_table_path_changes_nothing():
    assert generate("wire", TABLE) == generate("wire")
    assert generate("pxi", TABLE) == generate("pxi")


def test_pxi_has_a_send_function_and_stub_per_table_row():
    check_pxi_against_table(generate("pxi"), *load())


def test_pxi_matches_xen_417_helper():
    """Spot checks against Xen 4.17's libxl_save_msgs_gen.pl (numbers, bits, stubs)."""
    parsed, installed = parse_pxi(generate("pxi"))
    assert {n: p["number"] for n, p in parsed.items()} == {
        "log": 1, "progress": 2, "suspend": 3, "postcopy": 4, "checkpoint": 5,
        "wait_checkpoint": 6, "switch_qemu_logdirty": 7, "static_data_done": 8,
        "restore_results": 9, "complete": 10,
        "precopy_round": 11}   # pyxl's extension: after Xen's, never sent by Xen's helper
    assert parsed["precopy_round"]["cbflag"] == 0
    assert installed == {
        "save": {"suspend", "postcopy", "checkpoint", "wait_checkpoint", "switch_qemu_logdirty"},
        "restore": {"suspend", "postcopy", "checkpoint", "wait_checkpoint", "static_data_done",
                    "restore_results"}}
    assert parsed["complete"]["stub"][0] == "int" and parsed["complete"]["cbflag"] == 0
    assert parsed["restore_results"]["stub"][0] == "void"
    assert parsed["log"]["stub"] is None and parsed["progress"]["stub"] is None


def test_wire_matches_table():
    check_wire_against_table(generate("wire"), *load())


# ---------------------------------------------------------------------------
# A changed table


ADDED_CALLBACK = '''    ("hello", ("save",), True, (("id", "uint16"), ("note", "string"))),
'''
ADDED_MESSAGE = '''    ("note", ("save", "restore"), False, (("what", "string"), ("count", "uint64"))),
'''


def changed_table(tmp_path, edit) -> str:
    text = TABLE.read_text()
    path = tmp_path / "_msgtable.py"
    path.write_text(edit(text))
    return str(path)


def insert_before_complete(extra: str, bit: str = None):
    def edit(text):
        anchor = '    # 10\n    ("complete"'
        assert anchor in text
        text = text.replace(anchor, extra + anchor)
        if bit:
            text = text.replace('"restore_results",\n)', f'"restore_results", "{bit}",\n)')
            assert bit in text.split("CALLBACK_BIT_MESSAGES", 1)[1]
        return text
    return edit


@pytest.mark.parametrize("edit, changes", [
    (insert_before_complete(ADDED_CALLBACK, "hello"), {"hello": 10, "complete": 11}),
    (insert_before_complete(ADDED_MESSAGE), {"note": 10, "complete": 11}),
    (lambda t: t.replace('("done", "uint64"), ("total", "uint64")',
                         '("done", "uint32"), ("total", "int32")'), {}),
], ids=["added-callback", "added-message", "changed-types"])
def test_changed_table_changes_both_outputs_consistently(tmp_path, edit, changes):
    path = changed_table(tmp_path, edit)
    messages, bits = load(path)
    wire, pxi = generate("wire", path), generate("pxi", path)
    assert wire != generate("wire") and pxi != generate("pxi")
    check_wire_against_table(wire, messages, bits)
    check_pxi_against_table(pxi, messages, bits)
    parsed, installed = parse_pxi(pxi)
    for name, number in changes.items():
        assert parsed[name]["number"] == number
    if "hello" in changes:
        assert parsed["hello"]["cbflag"] == 1 << 10 and "hello" in installed["save"]
        assert "hello" not in installed["restore"]
        assert "CBFLAG: ClassVar[int] = 1024" in wire
    if not changes:
        assert parsed["progress"]["args"][2:] == [("done", "uint32_t"), ("total", "int32_t")]


@pytest.mark.parametrize("edit, error", [
    (lambda t: t.replace('("missing", "uint32")', '("missing", "float")'), "unknown wire type 'float'"),
    (lambda t: t.replace('("suspend", ("save", "restore")', '("log", ("save", "restore")'), "unique"),
    (lambda t: t.replace('("switch_qemu_logdirty", ("save",)', '("switch_qemu_logdirty", ("migrate",)'),
     "senders"),
])
def test_generator_refuses_a_table_the_helper_cannot_implement(tmp_path, edit, error):
    path = changed_table(tmp_path, edit)
    proc = subprocess.run([sys.executable, str(GEN), "--table", path, "pxi"],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and error in proc.stderr


def test_usage_error():
    proc = subprocess.run([sys.executable, str(GEN), "c++"], capture_output=True, text=True)
    assert proc.returncode == 2 and "usage:" in proc.stderr and proc.stdout == ""


@pytest.mark.skipif(not shutil.which("cc"), reason="no C compiler")
def test_changed_pxi_still_compiles_into_the_helper(tmp_path):
    """Cython + C-compile _helper.pyx against a table with an extra message.

    Only plain messages (no new callbacks struct field) can be added without
    touching _helper.pyx; the C compiler also checks every stub against
    libxc's real callback prototypes.
    """
    cython = shutil.which("cython", path=str(ROOT / ".venv" / "bin")) or shutil.which("cython")
    if not cython:
        pytest.skip("cython not installed")
    path = changed_table(tmp_path, insert_before_complete(ADDED_MESSAGE))
    (tmp_path / "_messages.pxi").write_text(generate("pxi", path))
    # _helper.pyx and what it includes/cimports (xen.pxd, _frame.pxi, _precopy.pxi).
    for src in ROOT.joinpath("libxl_helper").iterdir():
        if src.suffix in (".pyx", ".pxd", ".pxi"):
            assert src.name != "_messages.pxi"   # never in the source tree
            shutil.copy(src, tmp_path / src.name)
    subprocess.run([cython, "-3", "-I", str(tmp_path), "-o", str(tmp_path / "_helper.c"),
                    str(tmp_path / "_helper.pyx")], check=True, cwd=tmp_path)
    c = (tmp_path / "_helper.c").read_text()
    assert "__pyx_f_7_helper_send_note" in c
    subprocess.run(["cc", "-fsyntax-only", "-Wall", "-Werror=incompatible-pointer-types",
                    "-I", sysconfig.get_paths()["include"], str(tmp_path / "_helper.c")], check=True)
