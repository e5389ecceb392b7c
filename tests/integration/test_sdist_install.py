"""pyxl installs from its sdist into a fresh virtualenv, and runs from there.

pyxl is built on the host it runs on: the helper embeds the host's CPython
(its prefix is baked in at build time) and links the host's Xen libraries.
So the supported install is ``pip install pyxl-VERSION.tar.gz`` on the host
(README: Install).  This test does exactly that -- sdist, fresh venv, pip's
isolated build -- and then saves and restores a simulated guest with the
installed ``pyxl`` from a directory outside the source tree: the helper, the
spawner, the finisher, fakexen and its vCPU all come from the installed package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile

from conftest import ROOT


def run(argv, **kw):
    r = subprocess.run(argv, capture_output=True, text=True, timeout=900, **kw)
    assert r.returncode == 0, (argv, r.stdout[-2000:], r.stderr[-2000:])
    return r.stdout


def test_sdist_installs_into_a_fresh_venv_and_runs(tmp_path, sim_dir):
    dist = tmp_path / "dist"
    run([sys.executable, "setup.py", "-q", "sdist", "-d", str(dist)], cwd=str(ROOT))
    (sdist,) = dist.iterdir()
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("spawner/spawner.c", "finisher/finisher.c", "libxl_helper/main.c", "libxl_helper/_helper.pyx",
                   "fakexen/fakexen.c", "fakexen/vcpu.c", "pyxl/wire/_generated.py", "LICENSE",
                   "pyxl/py.typed"):
        assert needed in names, needed
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)])
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYXL_")}
    run([str(venv / "bin" / "pip"), "install", "-q", str(sdist)], env=env, cwd=str(tmp_path))
    pyxl = str(venv / "bin" / "pyxl")
    installed = run([str(venv / "bin" / "python"), "-c",
                     "import pyxl, os; print(os.path.dirname(pyxl.__file__))"],
                    env=env, cwd=str(tmp_path)).strip()
    assert installed.startswith(str(venv)), installed
    for program in ("pyxl-save-helper", "pyxl-spawner", "pyxl-finisher", "pyxl-sim-vcpu",
                    "libfakexen.so"):
        assert os.path.exists(os.path.join(installed, program)), program
    assert run([pyxl, "--version"], env=env, cwd=str(tmp_path)).startswith("pyxl ")
    env["PYXL_SIM_DIR"] = sim_dir
    domid = run([pyxl, "sim", "create", "--memory", "16M", "--name", "pkg"], env=env,
                cwd=str(tmp_path)).strip()
    run([pyxl, "sim", "pause", domid], env=env, cwd=str(tmp_path))
    digest = run([pyxl, "sim", "digest", domid], env=env, cwd=str(tmp_path)).strip()
    run([pyxl, "save", "-q", "pkg", "pkg.save"], env=env, cwd=str(tmp_path))
    new = run([pyxl, "restore", "-p", "--json", "pkg.save"], env=env, cwd=str(tmp_path))
    restored = json.loads(new)["domid"]
    assert run([pyxl, "sim", "digest", str(restored)], env=env,
               cwd=str(tmp_path)).strip() == digest
    run([pyxl, "sim", "destroy", str(restored)], env=env, cwd=str(tmp_path))
