"""The README's "Bring your own domains" example runs: a toolstack's own backend
builds the restore target (its names, its devices) and pyxl does the rest."""

from __future__ import annotations

import os
import runpy
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "own_domains.py")


def test_example_restores_into_the_toolstacks_own_domain(sim_dir, tmp_path):
    main = runpy.run_path(EXAMPLE)["main"]
    out = main(sim_dir, str(tmp_path))
    assert out["name"] == "restored-web1"         # the toolstack's naming, not the config's
    assert out["identical"]                        # memory and context byte for byte
    assert out["disks"] and out["disks_made"]      # its devices existed while the guest did
    assert out["state"] == "destroyed" and out["disks_left"] == []


def test_example_runs_as_a_script():
    proc = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "byte-identical" in proc.stdout
