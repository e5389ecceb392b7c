"""fakexen end to end: Xen's own save/restore code (Debian's libxenctrl/libxenguest 4.17,
driven by Debian's libxl-save-helper or pyxl's) on simulated domains."""

import os
import time

import pytest

import simdriver as sd
from conftest import SLOW, mounted_tmpfs, needs_debian
from pyxl import sim
from pyxl.sim import control as sim_control

MiB = 1 << 20
SPECIAL_ZEROED = (0xFEFFB, 0xFEFFC, 0xFEFFD, 0xFEFFF)  # bufioreq, store, ioreq, console

pytestmark = [
    needs_debian,
    pytest.mark.skipif(not os.access(sim.vcpu_path(), os.X_OK), reason="fakexen not built"),
]

HELPERS = [pytest.param(sd.DEBIAN_HELPER, id="debian"),
           pytest.param(sd.OUR_HELPER, id="ours", marks=pytest.mark.skipif(
               not sd.our_helper_available(), reason="pyxl-save-helper is not a real build yet"))]


@pytest.fixture
def stream(fxdir):
    path = os.path.join(fxdir, "stream.libxc")
    yield path
    if os.path.exists(path):
        os.unlink(path)


def target_for(src, fxdir, name="restored"):
    i = sim.info(src, fxdir)
    return sim.create_empty(i.max_memkb, name, sim.config(src, fxdir), sim_dir=fxdir)


def assert_ok(run):
    assert run.ok, run.text()
    assert not run.errors, run.text()


def page(domid, fxdir, pfn):
    with open(os.path.join(fxdir, f"d{domid}", "mem"), "rb") as f:
        return os.pread(f.fileno(), 4096, pfn * 4096)


def assert_restored_like_xen(src, dst, fxdir, restore_run):
    """What a correct restore leaves: identical memory, context and params; the store,
    console, ioreq and bufioreq pages zeroed (never written by the guest, so zero on both
    sides); grant entries 0/1 for console and store."""
    assert restore_run.restore_results == (0xFEFFC, 0xFEFFF)
    assert sim.populated_runs(dst, fxdir) == sim.populated_runs(src, fxdir)
    assert sim.hvm_context(dst, fxdir) == sim.hvm_context(src, fxdir)
    ps, pd = sim.hvm_params(src, fxdir), sim.hvm_params(dst, fxdir)
    assert [ps[i] for i in sim.SAVED_PARAMS] == [pd[i] for i in sim.SAVED_PARAMS]
    assert (pd[2], pd[18]) == (sd.STORE_EVTCHN, sd.CONSOLE_EVTCHN)
    for pfn in SPECIAL_ZEROED:
        assert page(dst, fxdir, pfn) == bytes(4096)
    assert sim.grant_entries(dst, sim_dir=fxdir) == [(1, 0, 0xFEFFF), (1, 0, 0xFEFFC)]
    assert sim.digest(dst, fxdir) == sim.digest(src, fxdir)
    assert sim.check_guest(dst, fxdir).consistent


# ---- non-live -------------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPERS)
def test_nonlive_save_restore_of_paused_guest(fxdir, stream, helper):
    src = sim.create(64 * MiB, sim_dir=fxdir, paused=True)
    want = sim.digest(src, fxdir)
    run = sd.save_to_file(src, stream, sim_dir=fxdir, helper=helper)
    assert_ok(run)
    assert run.replies == [("switch_qemu_logdirty", 0), ("suspend", 1),
                           ("switch_qemu_logdirty", 0), ("complete", 0)]
    assert "Domain now suspended" in run.phases and "Frames" in run.phases
    assert sim.state(src, fxdir) == "suspended"
    assert sim.digest(src, fxdir) == want              # saving does not touch the guest
    dst = target_for(src, fxdir)
    rrun = sd.restore_from_file(dst, stream, sim_dir=fxdir, helper=helper)
    assert_ok(rrun)
    assert rrun.replies == [("static_data_done", 0), ("complete", 0)]
    assert_restored_like_xen(src, dst, fxdir, rrun)
    assert sim.state(dst, fxdir) == "paused"


@pytest.mark.parametrize("helper", HELPERS)
def test_saved_stream_passes_debians_verifier(fxdir, stream, helper):
    src = sim.create(16 * MiB, sim_dir=fxdir, dirty_rate=8 * MiB)
    run = sd.save_to_file(src, stream, sim_dir=fxdir, live=True, helper=helper)
    assert_ok(run)
    v = sd.verify_stream(stream)
    assert v.returncode == 0, v.stdout + v.stderr
    assert "HVM context" in v.stdout and "Page Data" in v.stdout and "Record: End" in v.stdout


# ---- live -----------------------------------------------------------------------------------


@pytest.mark.parametrize("save_helper,restore_helper", [
    pytest.param(sd.DEBIAN_HELPER, sd.DEBIAN_HELPER, id="debian-debian"),
    pytest.param(sd.DEBIAN_HELPER, sd.OUR_HELPER, id="debian-ours", marks=HELPERS[1].marks),
    pytest.param(sd.OUR_HELPER, sd.DEBIAN_HELPER, id="ours-debian", marks=HELPERS[1].marks),
    pytest.param(sd.OUR_HELPER, sd.OUR_HELPER, id="ours-ours", marks=HELPERS[1].marks),
])
def test_live_migration_of_a_dirtying_guest(fxdir, save_helper, restore_helper):
    src = sim.create(128 * MiB, dirty_rate=64 * MiB, sim_dir=fxdir)
    time.sleep(0.2)
    dst = target_for(src, fxdir)
    srun, rrun = sd.migrate(src, dst, sim_dir=fxdir, live=True, save_helper=save_helper,
                            restore_helper=restore_helper)
    assert_ok(srun)
    assert_ok(rrun)
    # precopy rounds happened while the guest kept writing
    assert len(srun.iterations) >= 2, srun.text()
    assert sim.state(src, fxdir) == "suspended"
    src_check = sim.check_guest(src, fxdir)
    assert src_check.consistent and src_check.pages_written > 0
    assert_restored_like_xen(src, dst, fxdir, rrun)
    # the restored guest resumes counting where the source stopped
    sim.set_dirty_rate(dst, 64 * MiB, fxdir)
    sim.unpause(dst, fxdir)
    time.sleep(0.3)
    sim.pause(dst, fxdir)
    after = sim.check_guest(dst, fxdir)
    assert after.consistent
    assert after.pages_written > src_check.pages_written
    assert (after.lap, after.cursor) > (src_check.lap, src_check.cursor) or after.lap > src_check.lap
    assert after.boots == src_check.boots + 1
    assert after.min_gen >= src_check.lap - 1        # generations continued, never restarted


def test_live_debug_verify_pass_finds_no_mismatch(fxdir):
    """XCFLAGS 3: libxc resends every page after the final pass and the restorer compares
    them with what it wrote -- an oracle for lost dirty pages."""
    src = sim.create(64 * MiB, dirty_rate=128 * MiB, sim_dir=fxdir)
    time.sleep(0.1)
    dst = target_for(src, fxdir)
    srun, rrun = sd.migrate(src, dst, sim_dir=fxdir, live=True, debug=True)
    assert_ok(srun)
    assert_ok(rrun)
    assert "Frames verify" in srun.phases
    assert not [t for _, _, t in rrun.logs if "verify" in t.lower() and "fail" in t.lower()]
    assert sim.digest(dst, fxdir) == sim.digest(src, fxdir)


def test_live_save_recovers_when_logdirty_was_left_on(fxdir, stream):
    """A previous helper died with log-dirty on: ENABLE fails EINVAL, libxc turns it off
    and on again, as it does on real Xen."""
    src = sim.create(8 * MiB, dirty_rate=4 * MiB, sim_dir=fxdir)
    with sim_control._Dom(src, fxdir) as d:
        d.set("logdirty", 1)
    run = sd.save_to_file(src, stream, sim_dir=fxdir, live=True,
                          env={"PYXL_SIM_TRACE": "1"})
    assert_ok(run)
    assert "ENABLE_LOGDIRTY: already on, EINVAL" in run.stderr
    assert sim.info(src, fxdir).logdirty is False     # OFF at cleanup


def test_failed_save_then_resume(fxdir, stream):
    """The suspend callback fails: the save fails cleanly and the guest can go on."""
    src = sim.create(8 * MiB, dirty_rate=4 * MiB, sim_dir=fxdir)
    run = sd.save_to_file(src, stream, sim_dir=fxdir, live=True, on_suspend=lambda: 0)
    assert run.status == 0 and run.complete and run.complete[0] != 0, run.text()
    assert sim.state(src, fxdir) == "running"
    sim.suspend(src, fxdir)                            # a save that failed after suspending
    sim.resume(src, fxdir)
    n = sim.counter(src, fxdir)
    time.sleep(0.2)
    assert sim.counter(src, fxdir) > n


# ---- errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize("helper", HELPERS)
def test_save_of_missing_domain_fails_with_esrch(fxdir, stream, helper):
    run = sd.save_to_file(4242, stream, sim_dir=fxdir, helper=helper)
    assert run.status == 0 and run.complete and run.complete[0] != 0, run.text()
    assert any("3 = No such process" in e for e in run.errors), run.text()
    assert "d4242" in run.stderr or "4242" in " ".join(run.errors)


def test_save_of_domain_destroyed_midway_fails_with_esrch(fxdir, stream):
    src = sim.create(8 * MiB, sim_dir=fxdir, paused=True)

    def destroy_then_claim_suspended():
        sim.destroy(src, fxdir)
        return 1

    run = sd.save_to_file(src, stream, sim_dir=fxdir, on_suspend=destroy_then_claim_suspended)
    assert run.status == 0 and run.complete and run.complete[0] != 0, run.text()
    assert any("No such process" in e for e in run.errors), run.text()


def test_restore_into_missing_domain_fails_cleanly(fxdir, stream):
    src = sim.create(4 * MiB, sim_dir=fxdir, paused=True)
    assert_ok(sd.save_to_file(src, stream, sim_dir=fxdir))
    run = sd.restore_from_file(777, stream, sim_dir=fxdir)
    assert run.status == 0 and run.complete and run.complete[0] != 0, run.text()
    assert any("No such process" in e for e in run.errors), run.text()
    assert run.restore_results == (0, 0)


def test_restore_beyond_max_memory_fails_cleanly(fxdir, stream):
    src = sim.create(16 * MiB, sim_dir=fxdir, paused=True)
    assert_ok(sd.save_to_file(src, stream, sim_dir=fxdir))
    dst = sim.create_empty(4096, "small", sim_dir=fxdir)       # 4 MiB + slack
    run = sd.restore_from_file(dst, stream, sim_dir=fxdir)
    assert run.complete and run.complete[0] != 0, run.text()
    assert "over-allocation" in run.stderr
    assert any("Failed to populate" in e for e in run.errors), run.text()


@pytest.fixture
def small_tmpfs():
    with mounted_tmpfs("40m", prefix="pyxl-fx-small-") as mnt:
        yield mnt


def test_restore_onto_a_full_tmpfs_fails_cleanly(fxdir, stream, small_tmpfs):
    src = sim.create(32 * MiB, sim_dir=fxdir, paused=True)
    assert_ok(sd.save_to_file(src, stream, sim_dir=fxdir))
    # The target is made while there is room, then something else fills the tmpfs.
    dst = sim.create_empty(32768, "incoming", sim_dir=small_tmpfs)
    with open(os.path.join(small_tmpfs, "filler"), "wb") as f:
        try:
            f.write(bytes(30 * MiB))
        except OSError:
            pass
    run = sd.restore_from_file(dst, stream, sim_dir=small_tmpfs)
    assert run.status == 0 and run.complete and run.complete[0] != 0, run.text()
    assert "No space left on device" in run.stderr
    assert any("Failed to populate" in e for e in run.errors), run.text()
    os.unlink(os.path.join(small_tmpfs, "filler"))


# ---- performance shape ----------------------------------------------------------------------


def test_mapping_is_per_run_not_per_page(fxdir):
    """One mmap per batch (runs of consecutive pfns), never one per page, on both sides."""
    src = sim.create(64 * MiB, sim_dir=fxdir, paused=True)
    dst = target_for(src, fxdir)
    stats = os.path.join(fxdir, "stats.jsonl")
    r, w = os.pipe()
    import json
    import threading
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("r", sd.restore(
        dst, r, sim_dir=fxdir, close_io_fd=True, env={"PYXL_SIM_STATS": stats})))
    t.start()
    srun = sd.save(src, w, sim_dir=fxdir, close_io_fd=True, env={"PYXL_SIM_STATS": stats})
    t.join()
    assert_ok(srun)
    assert_ok(out["r"])
    lines = [json.loads(x) for x in open(stats)]
    assert len(lines) == 2
    pages = 16384 + 16
    for s in lines:
        assert s["pages_mapped"] >= pages
        assert s["mmap_calls"] <= s["map_calls"] + 8, s     # + the VGA-hole reservation etc.
        assert s["map_calls"] <= pages // 1024 + 8, s
    save_stats = next(s for s in lines if s["pfinfo_batches"])
    assert save_stats["pfinfo_batches"] == 0xFF000 // 1024   # p2m_size floor of the layout
    # save's read-only maps are copies into reused buffers; restore's writable ones are views
    assert save_stats["copied_pages"] == save_stats["pages_mapped"], save_stats
    assert save_stats["mmap_calls"] <= 8, save_stats
    restore_stats = next(s for s in lines if not s["pfinfo_batches"])
    assert restore_stats["copied_pages"] == 0, restore_stats
    assert sim.digest(dst, fxdir) == sim.digest(src, fxdir)


@pytest.mark.skipif(not SLOW, reason="large guest: set PYXL_SLOW=1")
def test_large_guest_with_ram_above_4g(fxdir):
    """4.5 GiB: RAM above the MMIO hole; non-live save into a pipe, restore, identical."""
    src = sim.create(4608 * MiB, sim_dir=fxdir, paused=True)
    assert sim.info(src, fxdir).max_gpfn > 0x100000
    dst = target_for(src, fxdir)
    srun, rrun = sd.migrate(src, dst, sim_dir=fxdir)
    assert_ok(srun)
    assert_ok(rrun)
    assert sim.digest(dst, fxdir) == sim.digest(src, fxdir)
