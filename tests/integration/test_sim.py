"""pyxl.sim: the simulated domains themselves, without any helper."""

import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from hypothesis import given, settings, strategies as st

from conftest import children, mounted_tmpfs, vcpu_processes
from pyxl import sim
from pyxl.sim import layout as sim_layout, statedir as sim_statedir
from pyxl.cli import sim as sim_cli

MiB = 1 << 20


def native_built():
    return os.access(sim.vcpu_path(), os.X_OK) and os.path.exists(sim.libfakexen_path())


pytestmark = pytest.mark.skipif(not native_built(), reason="native artefacts not built")


# ---- layout ---------------------------------------------------------------------------------


def test_control_block_layout_matches_the_c_header():
    out = subprocess.run([sim.vcpu_path(), "layout"], capture_output=True, text=True, check=True)
    c = json.loads(out.stdout)
    for name, (off, _fmt) in sim_layout.CTL_FIELDS.items():
        assert c[name] == off, name
    assert c["sizeof_ctl"] <= sim.PAGE_SIZE
    for key in ("GNT_OFF", "LEAVES_OFF", "MSRS_OFF", "CONFIG_OFF", "CONFIG_MAX", "HVMCTX_OFF",
                "HVMCTX_MAX", "BITMAPS_OFF", "PFN_ALIGN", "CTL_MAGIC", "CTL_VERSION",
                "GUEST_MAGIC"):
        assert c[key] == getattr(sim_layout, key), key
    assert c["guest_state"] == {"magic": 0, "lap": 8, "cursor": 16, "pages_written": 24,
                                "boots": 32, "ram_pages": 40}


def test_ram_layout_is_libxls():
    # 1 GiB: pfn 0 up, VGA hole 0xa0-0xbf left out, all below the MMIO hole
    assert sim.ram_runs(262144) == [(0, 0xA0), (0xC0, 262144 - 0xA0)]
    # 8 GiB: RAM beyond 3.75 GiB goes above 4 GiB
    runs = sim.ram_runs(2097152)
    assert runs[:2] == [(0, 0xA0), (0xC0, 0xF0000 - 0xC0)]
    assert runs[2][0] == 0x100000 and sum(n for _, n in runs) == 2097152
    assert runs[2][0] + runs[2][1] - 1 == 0x21001F   # the probe's max_gpfn for 8 GiB


@given(st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 300)), max_size=8))
@settings(max_examples=200, deadline=None)
def test_bit_runs_are_maximal_runs(spans):
    bm = bytearray(1024)
    want = set()
    for start, n in spans:
        sim_layout._set_bits(bm, start, min(n, 8192 - start))
        want.update(range(start, min(start + n, 8192)))
    runs = sim.bit_runs(bytes(bm))
    got = set()
    for i, (s, n) in enumerate(runs):
        assert n > 0
        if i:
            assert s > runs[i - 1][0] + runs[i - 1][1]   # maximal and ordered
        got.update(range(s, s + n))
    assert got == want


def test_parse_size():
    assert sim.parse_size("1G") == 1 << 30
    assert sim.parse_size("50M") == 50 * MiB
    assert sim.parse_size("64k") == 65536
    assert sim.parse_size("4096") == 4096
    assert sim.parse_size("1GiB") == 1 << 30
    with pytest.raises(ValueError):
        sim.parse_size("lots")


# ---- creation -------------------------------------------------------------------------------


def test_create_paused_guest(fxdir):
    domid = sim.create(16 * MiB, name="g1", sim_dir=fxdir, paused=True)
    i = sim.info(domid, fxdir)
    assert (i.domid, i.name, i.state, i.memory) == (domid, "g1", "paused", 16 * MiB)
    assert i.tot_pages == 4096 + 16          # RAM + the 16 special pages
    assert i.max_gpfn == 0xFEFFF             # the console page
    assert i.vcpu_pid is None
    assert sim.populated_runs(domid, fxdir) == [(0, 0xA0), (0xC0, 4096 - 0xA0), (0xFEFF0, 16)]
    cfg = sim.config(domid, fxdir)
    assert cfg["c_info"]["type"] == "hvm" and cfg["c_info"]["name"] == "g1"
    assert cfg["c_info"]["uuid"] == i.uuid
    assert cfg["b_info"] == {"max_memkb": 16384, "target_memkb": 16384, "max_vcpus": 1}
    params = sim.hvm_params(domid, fxdir)
    assert params[1] == 0xFEFFC and params[17] == 0xFEFFF and params[5] == 0xFEFFD
    assert params[6] == 0xFEFFB and params[32] == 0xFEFF0 and params[33] == 8
    ctx = sim.hvm_context(domid, fxdir)
    assert ctx[:8] == bytes([1, 0, 0, 0, 24, 0, 0, 0])          # HEADER descriptor
    assert int.from_bytes(ctx[8:12], "little") == 0x54381286
    assert ctx[-8:] == bytes(8)                                 # END
    c = sim.check_guest(domid, fxdir)
    assert c.consistent and c.ram_pages == 4095 and c.lap == 1 and c.pages_written == 0
    assert c.special_nonzero == 0
    assert sim.digest(domid, fxdir) == sim.digest(domid, fxdir)
    assert [d.domid for d in sim.list_domains(fxdir)] == [domid]


def test_create_empty_restore_target(fxdir):
    cfg = {"c_info": {"type": "hvm", "name": "x", "uuid": "6a2f0b2e-2d64-4a6b-9d8c-1c5e2a9f4b11"},
           "b_info": {"max_memkb": 65536, "target_memkb": 65536, "max_vcpus": 1}}
    domid = sim.create_empty(65536, "incoming", cfg, sim_dir=fxdir)
    i = sim.info(domid, fxdir)
    assert (i.state, i.tot_pages, i.max_gpfn, i.vcpu_pid) == ("paused", 0, 0, None)
    assert i.uuid == "6a2f0b2e-2d64-4a6b-9d8c-1c5e2a9f4b11"
    assert sim.config(domid, fxdir)["c_info"]["name"] == "incoming"
    assert sim.populated_runs(domid, fxdir) == []
    assert sim.hvm_context(domid, fxdir) == b""


def test_names_are_list_domains_names_read_cheaply(fxdir):
    """sim.names: every live domain's name (what a restore's name check reads),
    the same as list_domains gives; a destroyed one, and a stray entry, are not
    in it."""
    a = sim.create(1 * MiB, name="web1", sim_dir=fxdir, paused=True)
    b = sim.create_empty(1024, "web2--incoming", sim_dir=fxdir)
    c = sim.create(1 * MiB, name="gone", sim_dir=fxdir, paused=True)
    sim.destroy(c, fxdir)
    os.mkdir(os.path.join(fxdir, "d999"))          # no control page
    assert sim.names(fxdir) == {a: "web1", b: "web2--incoming"}
    assert sim.names(fxdir) == {i.domid: i.name for i in sim.list_domains(fxdir)}
    assert sim.names(os.path.join(fxdir, "nowhere")) == {}


def test_domids_are_unique_and_never_reused(fxdir):
    a = sim.create(1 * MiB, sim_dir=fxdir, paused=True)
    b = sim.create_empty(1024, sim_dir=fxdir)
    sim.destroy(a, fxdir)
    c = sim.create(1 * MiB, sim_dir=fxdir, paused=True)
    assert len({a, b, c}) == 3 and c > b > a


def _racer(args):
    fxdir, i = args
    return sim.create(1 * MiB, name=f"r{i}", sim_dir=fxdir, paused=True)


def test_racing_creators_get_distinct_domids(fxdir):
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(8) as pool:
        ids = pool.map(_racer, [(fxdir, i) for i in range(24)])
    assert len(set(ids)) == 24
    assert sorted(d.domid for d in sim.list_domains(fxdir)) == sorted(ids)
    assert not [n for n in os.listdir(fxdir) if n.startswith(".tmp-")]


def test_a_crashed_creator_leaves_nothing_that_blocks(fxdir):
    # What a creator killed mid-build leaves: its private build directory.
    dead = subprocess.Popen(["true"])
    dead.wait()
    os.mkdir(os.path.join(fxdir, f".tmp-7-{dead.pid}-deadbeef"))
    with open(os.path.join(fxdir, f".tmp-7-{dead.pid}-deadbeef", "mem"), "wb") as f:
        f.write(b"partial")
    domid = sim.create(1 * MiB, sim_dir=fxdir, paused=True)
    assert sim.info(domid, fxdir).state == "paused"
    assert not [n for n in os.listdir(fxdir) if n.startswith(".tmp-")]
    assert [d.domid for d in sim.list_domains(fxdir)] == [domid]


def test_guest_larger_than_the_machine_is_refused_up_front(fxdir):
    with pytest.raises(sim.InsufficientResources, match="needs"):
        sim.create(1 << 50, sim_dir=fxdir)
    with pytest.raises(sim.InsufficientResources):
        sim.create_empty(1 << 40, sim_dir=fxdir)
    assert sim.list_domains(fxdir) == []
    assert [n for n in os.listdir(fxdir) if not n.startswith(".")] == []


@pytest.fixture
def tiny_tmpfs():
    """A 16 MiB tmpfs, mounted for the test (needs root)."""
    with mounted_tmpfs("16m", prefix="pyxl-fx-tiny-") as mnt:
        yield mnt


def test_full_tmpfs_is_a_clear_error_and_leaves_nothing(tiny_tmpfs):
    with pytest.raises(sim.InsufficientResources, match="free"):
        sim.create(64 * MiB, sim_dir=tiny_tmpfs)
    assert [n for n in os.listdir(tiny_tmpfs) if n.startswith(("d", ".tmp-"))] == []
    # Past the up-front check (e.g. another writer filled the disk meanwhile), the
    # allocation itself fails cleanly: ENOSPC, never a SIGBUS, nothing half-made.
    orig = sim_statedir._check_capacity
    sim_statedir._check_capacity = lambda *a: None
    try:
        with pytest.raises(sim.InsufficientResources, match="no space left"):
            sim.create(64 * MiB, sim_dir=tiny_tmpfs)
    finally:
        sim_statedir._check_capacity = orig
    assert [n for n in os.listdir(tiny_tmpfs) if n.startswith(("d", ".tmp-"))] == []
    # and the directory still works for a guest that fits
    domid = sim.create(4 * MiB, sim_dir=tiny_tmpfs, paused=True)
    assert sim.check_guest(domid, tiny_tmpfs).consistent


# ---- run state ------------------------------------------------------------------------------


def test_vcpu_is_detached_and_writes_at_the_rate(fxdir):
    domid = sim.create(8 * MiB, dirty_rate=4 * MiB, sim_dir=fxdir)
    i = sim.info(domid, fxdir)
    assert i.state == "running" and i.vcpu_pid
    with open(f"/proc/{i.vcpu_pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    assert int(fields[1]) != os.getpid()            # not our child
    assert int(fields[3]) != os.getsid(0)           # its own session
    assert not [pid for pid, cmd in children(cmdline=True) if b"pyxl-sim-vcpu" in cmd]  # nor zombie
    time.sleep(0.5)
    sim.pause(domid, fxdir)
    n = sim.counter(domid, fxdir)
    assert 50 <= n <= 1100, n                       # ~512 pages in 0.5 s at 4 MiB/s
    time.sleep(0.2)
    assert sim.counter(domid, fxdir) == n           # paused: no writes
    assert sim.state(domid, fxdir) == "paused"
    assert sim.check_guest(domid, fxdir).consistent
    sim.unpause(domid, fxdir)
    time.sleep(0.2)
    assert sim.counter(domid, fxdir) > n


def test_set_dirty_rate(fxdir):
    domid = sim.create(4 * MiB, sim_dir=fxdir)
    time.sleep(0.1)
    assert sim.counter(domid, fxdir) == 0           # idle guest
    sim.set_dirty_rate(domid, 8 * MiB, fxdir)
    time.sleep(0.2)
    assert sim.counter(domid, fxdir) > 0
    assert sim.info(domid, fxdir).dirty_rate == 8 * MiB


def test_suspend_is_pollable_and_resume_continues(fxdir):
    domid = sim.create(8 * MiB, dirty_rate=16 * MiB, sim_dir=fxdir)
    time.sleep(0.1)
    sim.request_suspend(domid, fxdir)               # returns at once
    deadline = time.monotonic() + 5
    while sim.state(domid, fxdir) != "suspended":
        assert time.monotonic() < deadline
        time.sleep(0.001)
    i = sim.info(domid, fxdir)
    assert i.shutdown_reason == "suspend" and i.vcpu_pid is None
    n = sim.counter(domid, fxdir)
    c = sim.check_guest(domid, fxdir)
    assert c.consistent and c.ctx_rip == c.pages_written == n   # state left in the context
    time.sleep(0.1)
    assert sim.counter(domid, fxdir) == n
    with pytest.raises(sim.DomainStateError, match="suspended"):
        sim.unpause(domid, fxdir)
    sim.resume(domid, fxdir)
    assert sim.state(domid, fxdir) == "running"
    time.sleep(0.1)
    sim.pause(domid, fxdir)
    c2 = sim.check_guest(domid, fxdir)
    assert c2.consistent and c2.pages_written > n and c2.boots == 2


def test_pause_then_resume_leaves_a_suspended_guest_paused(fxdir):
    """xl save -p: pause the suspended domain, then resume it: it stays paused and its
    memory is what was saved; unpause then runs it."""
    domid = sim.create(8 * MiB, dirty_rate=16 * MiB, sim_dir=fxdir)
    time.sleep(0.05)
    sim.suspend(domid, fxdir)
    saved = sim.digest(domid, fxdir)
    sim.pause(domid, fxdir)
    assert sim.state(domid, fxdir) == "suspended"
    sim.resume(domid, fxdir)
    assert sim.state(domid, fxdir) == "paused" and sim.info(domid, fxdir).vcpu_pid is None
    assert sim.digest(domid, fxdir) == saved
    sim.unpause(domid, fxdir)
    time.sleep(0.05)
    assert sim.state(domid, fxdir) == "running"
    sim.pause(domid, fxdir)
    assert sim.check_guest(domid, fxdir).consistent


def test_pausing_or_suspending_a_paused_guest_changes_nothing(fxdir):
    domid = sim.create(8 * MiB, dirty_rate=16 * MiB, sim_dir=fxdir)
    time.sleep(0.05)
    sim.pause(domid, fxdir)
    before = sim.digest(domid, fxdir)
    c = sim.check_guest(domid, fxdir)
    assert c.ctx_rip == c.pages_written          # the paused vCPU's registers
    sim.suspend(domid, fxdir)
    assert sim.digest(domid, fxdir) == before


def test_suspend_of_paused_guest_is_immediate(fxdir):
    domid = sim.create(4 * MiB, sim_dir=fxdir, paused=True)
    sim.suspend(domid, fxdir, timeout=1)
    assert sim.state(domid, fxdir) == "suspended"


def test_destroy(fxdir):
    domid = sim.create(4 * MiB, dirty_rate=MiB, sim_dir=fxdir)
    pid = sim.info(domid, fxdir).vcpu_pid
    sim.destroy(domid, fxdir)
    assert not vcpu_processes(fxdir)
    assert not os.path.exists(f"/proc/{pid}/cmdline") or b"pyxl-sim-vcpu" not in open(
        f"/proc/{pid}/cmdline", "rb").read()
    for op in (sim.info, sim.state, sim.pause, sim.unpause, sim.destroy, sim.digest,
               sim.request_suspend, sim.config):
        with pytest.raises(sim.NoSuchDomain, match=f"domain {domid} does not exist"):
            op(domid, fxdir)
    assert sim.list_domains(fxdir) == []


def test_vcpu_exits_when_its_state_dir_disappears():
    d = tempfile.mkdtemp(prefix="pyxl-fx-gone-", dir="/dev/shm")
    domid = sim.create(4 * MiB, dirty_rate=MiB, sim_dir=d)
    pid = sim.info(domid, d).vcpu_pid
    shutil.rmtree(d)
    deadline = time.monotonic() + 5
    while vcpu_processes(d):
        assert time.monotonic() < deadline, f"vCPU {pid} outlived its directory"
        time.sleep(0.05)


# ---- CLI ------------------------------------------------------------------------------------


def run_cli(capsys, *argv):
    rc = sim_cli.main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli(fxdir, capsys):
    rc, out, err = run_cli(capsys, "create", "--memory", "4M", "--dirty-rate", "1M",
                           "--name", "c1", "--sim-dir", fxdir)
    assert rc == 0 and err == ""
    domid = int(out.strip())
    rc, out, _ = run_cli(capsys, "list", "--json", "--sim-dir", fxdir)
    (entry,) = json.loads(out)
    assert entry["domid"] == domid and entry["name"] == "c1" and entry["state"] == "running"
    assert entry["memory"] == 4 * MiB
    rc, out, _ = run_cli(capsys, "create", "--memory", "2M", "--paused", "--json",
                         "--sim-dir", fxdir)
    other = json.loads(out)
    assert rc == 0 and other["state"] == "paused" and other["domid"] != domid
    rc, out, _ = run_cli(capsys, "create-empty", "--max-mem", "8M", "--name", "in",
                         "--sim-dir", fxdir)
    empty = int(out.strip())
    rc, out, _ = run_cli(capsys, "create-empty", "--max-mem", "8M", "--json", "--sim-dir", fxdir)
    assert rc == 0 and json.loads(out)["domid"] not in (domid, other["domid"], empty)
    assert sim.info(empty, sim_dir=fxdir).name == "in"
    assert run_cli(capsys, "suspend", str(domid), "--sim-dir", fxdir)[0] == 0
    rc, out, _ = run_cli(capsys, "digest", str(domid), "--sim-dir", fxdir)
    assert rc == 0 and out.strip().splitlines()[-1] == sim.digest(domid, fxdir)
    assert run_cli(capsys, "resume", str(domid), "--sim-dir", fxdir)[0] == 0
    assert run_cli(capsys, "pause", str(domid), "--sim-dir", fxdir)[0] == 0
    rc, out, _ = run_cli(capsys, "check", str(domid), "--json", "--sim-dir", fxdir)
    assert rc == 0 and json.loads(out)["consistent"]
    assert run_cli(capsys, "unpause", str(domid), "--sim-dir", fxdir)[0] == 0
    assert run_cli(capsys, "destroy", str(domid), "--sim-dir", fxdir)[0] == 0
    rc, out, err = run_cli(capsys, "destroy", str(domid), "--sim-dir", fxdir)
    assert rc == 2 and err.count("\n") == 1 and "does not exist" in err
    rc, out, err = run_cli(capsys, "create", "--memory", "16T", "--sim-dir", fxdir)
    assert rc == 2 and "needs" in err and err.startswith("pyxl: error:") and err.count("\n") == 1
    rc, out, _ = run_cli(capsys, "list", "--sim-dir", fxdir)
    assert rc == 0 and "DOMID" in out
    rc, out, _ = run_cli(capsys, "env", "--sim-dir", fxdir)
    assert f"PYXL_SIM_DIR={fxdir}" in out and "libfakexen.so" in out


def test_cli_usage_errors(capsys, tmp_path):
    with pytest.raises(SystemExit) as exc:
        sim_cli.main(["create", "--memory", "lots"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        sim_cli.main(["pause", "-x"])
    assert sim_cli.main(["pause", "no-such-name", "--sim-dir", str(tmp_path / "sim")]) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "pyxl: error: no such domain: 'no-such-name'"


def test_queries_racing_destroy_see_no_such_domain_or_nothing(fxdir):
    import threading
    doms = [sim.create(1 * MiB, sim_dir=fxdir, paused=True) for _ in range(12)]
    errors = []

    def destroyer():
        for d in doms:
            sim.destroy(d, fxdir)

    t = threading.Thread(target=destroyer)
    t.start()
    while t.is_alive():
        try:
            sim.list_domains(fxdir)
            for d in doms:
                try:
                    sim.info(d, fxdir)
                    sim.digest(d, fxdir)
                except sim.NoSuchDomain:
                    pass
        except Exception as exc:  # anything else is a bug
            errors.append(exc)
    t.join()
    assert not errors
    assert sim.list_domains(fxdir) == []


def _rate(domid, fxdir, seconds):
    """Pages/s the guest writes, measured over ``seconds``."""
    n0, t0 = sim.counter(domid, fxdir), time.monotonic()
    time.sleep(seconds)
    return (sim.counter(domid, fxdir) - n0) / (time.monotonic() - t0)


def test_cpu_cap_slows_the_guest_as_xens_scheduler_cap(fxdir):
    """A capped vCPU runs cap % of the time, so its measured dirty rate falls."""
    from pyxl.backends.sim import SimBackend
    be = SimBackend(fxdir)
    domid = sim.create(16 * MiB, dirty_rate=16 * MiB, sim_dir=fxdir)
    assert be.cpu_cap(domid) == 0                   # uncapped, as a new Xen domain
    be.set_cpu_cap(domid, 100)
    full = _rate(domid, fxdir, 1.0)
    be.set_cpu_cap(domid, 25)
    assert be.cpu_cap(domid) == sim.info(domid, fxdir).cpu_cap == 25
    quarter = _rate(domid, fxdir, 1.0)
    assert 0.6 * 4096 <= full <= 1.2 * 4096, full   # 16 MiB/s = 4096 pages/s
    assert 0.12 <= quarter / full <= 0.40, (quarter, full)
    be.set_cpu_cap(domid, 0)
    assert _rate(domid, fxdir, 0.5) > 2 * quarter   # uncapped again
    assert sim.check_guest(domid, fxdir).consistent
    for bad in (-1, 101, 2.5, True, "50"):
        with pytest.raises(ValueError, match="cpu cap"):
            be.set_cpu_cap(domid, bad)


# ---- a creation in steps (a loop's restore target) ------------------------------------------

def test_an_empty_domain_is_made_in_steps_and_exists_only_after_the_last(sim_dir):
    made = sim.empty_creation(16 * 1024, "target", {"c_info": {"name": "target"}},
                              sim_dir=sim_dir)
    steps = made.steps()
    assert len(steps) == 3
    for step in steps[:-1]:
        step()
        assert made.domid > 0 and sim.list_domains(sim_dir=sim_dir) == []
    steps[-1]()
    [dom] = sim.list_domains(sim_dir=sim_dir)
    assert dom.domid == made.domid and dom.name == "target" and dom.state == "paused"
    assert [n for n in os.listdir(sim_dir) if n.startswith(".tmp-")] == []


def test_a_failed_step_leaves_no_build_directory(sim_dir):
    huge = {"c_info": {"name": "big"}, "pad": "x" * sim_layout.CONFIG_MAX}
    made = sim.empty_creation(16 * 1024, "big", huge, sim_dir=sim_dir)
    reserve, write, _ = made.steps()
    reserve()
    assert [n for n in os.listdir(sim_dir) if n.startswith(".tmp-")] != []
    with pytest.raises(sim.SimError, match="config JSON"):
        write()
    assert [n for n in os.listdir(sim_dir) if n.startswith(".tmp-")] == []
    assert sim.list_domains(sim_dir=sim_dir) == []


def test_the_backend_creates_a_restore_target_over_several_callbacks(sim_dir):
    """Each step is a callback of its own; a failing one is the creation's
    StartupError and leaves nothing behind."""
    from pyxl.backends import SimBackend, base
    from pyxl.errors import StartupError
    from pyxl.loop import SelectorLoop
    loop = SelectorLoop()
    calls = []
    real = loop.call_later
    loop.call_later = lambda delay, cb: real(delay, lambda: (calls.append(cb), cb()))
    be = SimBackend(sim_dir)
    out = []
    base.start_create_restore_target(be, loop, {"c_info": {"name": "t"},
                                                 "b_info": {"max_memkb": 16384}},
                                     lambda d, e: out.append((d, e)))
    assert loop.run_until(lambda: out, 10)
    assert out[0][1] is None and be.domain_names()[out[0][0]] == "t"
    assert len(calls) >= 5          # the name check, three creation steps, the end
    out.clear()
    base.start_create_restore_target(be, loop, {"c_info": {"name": "u"},
                                                 "b_info": {"max_memkb": 16384},
                                                 "pad": "x" * sim_layout.CONFIG_MAX},
                                     lambda d, e: out.append((d, e)))
    assert loop.run_until(lambda: out, 10)
    assert out[0][0] is None and isinstance(out[0][1], StartupError)
    assert "cannot create the domain to restore into" in str(out[0][1])
    assert sorted(be.domain_names().values()) == ["t"]
    assert [n for n in os.listdir(sim_dir) if n.startswith(".tmp-")] == []
    loop.close()
