"""pyxl ships py.typed, so its annotations are a promise: mypy --strict stays clean."""

import subprocess
import sys

from conftest import ROOT


def test_mypy_strict_clean():
    r = subprocess.run([sys.executable, "-m", "mypy", "pyxl"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    assert (ROOT / "pyxl" / "py.typed").exists()
