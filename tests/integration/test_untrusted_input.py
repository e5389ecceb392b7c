"""Untrusted streams: the config in the xl header is checked in one place before
any domain exists (pyxl/backends/configcheck.py), and the libxl records after
the libxc stream are bounded (pyxl/ops/trailer.py).  Every failure is typed and
one line, and nothing is left: no domain, no fd, no child.

Real save files from fakexen guests, with their config or trailer rewritten;
through the library, the CLI, and a migration receiver (raw socket, stdin).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import threading
import time
import pytest

import pyxl
from pyxl import migrate, sim
from pyxl.loop import default_loop
from pyxl.stream import xl as sxl
from pyxl.stream.libxl import LibxlRecordType, libxl_record

from conftest import ROOT, domids
from test_cli_errors import PYXL, one_line_error, pyxl_cli
from test_migrate import assert_peer_told

MB = 1 << 20


def xl_head(config: bytes) -> bytes:
    """An xl header carrying ``config`` as is (JSON flag set, NUL appended)."""
    cfg = config + b"\0"
    optdata = struct.pack("=I", len(cfg)) + cfg
    return struct.pack("=32sIIII", sxl.XL_MAGIC, sxl.XL_BYTEORDER,
                       sxl.XL_FLAG_STREAMV2 | sxl.XL_FLAG_JSON, 0, len(optdata)) + optdata


def split_save(data: bytes):
    """(config, the libxl stream) of a save file."""
    fixed = sxl.parse_xl_header(data[:sxl.XL_HEADER.size])
    end = sxl.XL_HEADER.size + fixed.optional_data_len
    header = sxl.parse_xl_optional_data(fixed, data[sxl.XL_HEADER.size:end])
    return header.config, data[end:]


@pytest.fixture
def good(sim_dir, tmp_path):
    """A good save file of a small guest (its domain destroyed): (config, libxl stream)."""
    d = sim.create(16 * MB, sim_dir=sim_dir)
    path = tmp_path / "good.save"
    pyxl.wait(pyxl.save(d, path, sim_dir=sim_dir))
    return split_save(path.read_bytes())


def with_config(good, edit) -> bytes:
    config, stream = good
    config = json.loads(json.dumps(config))
    if callable(edit):
        edit(config)
        body = json.dumps(config).encode()
    else:
        body = edit
    return xl_head(body) + stream


def setter(section, key, value):
    def edit(config):
        config[section][key] = value
    return edit


def deep(levels: int):
    v: object = 1
    for _ in range(levels):
        v = [v]
    return v


# (id, edit, what the one-line error names)
BAD_CONFIGS = [
    ("nesting-beyond-recursion", b'{"b_info": ' + b"[" * 100000 + b"]" * 100000 + b"}",
     "nests too deeply"),
    ("nesting-deep", lambda c: c.update(x={"y": deep(40)}), "x.y[0]"),
    ("c_info-list", lambda c: c.update(c_info=[]), "c_info: must be a JSON object"),
    ("b_info-missing", lambda c: c.pop("b_info"), "b_info: must be a JSON object"),
    ("b_info-string", lambda c: c.update(b_info="x"), "b_info: must be a JSON object"),
    ("max_memkb-1e999", b'{"c_info": {}, "b_info": {"max_memkb": 1e999}}', "b_info.max_memkb"),
    ("max_memkb-huge", setter("b_info", "max_memkb", 10 ** 30), "b_info.max_memkb"),
    ("max_memkb-negative", setter("b_info", "max_memkb", -4096), "b_info.max_memkb"),
    ("max_memkb-string", setter("b_info", "max_memkb", "16384"), "b_info.max_memkb"),
    ("target-negative", setter("b_info", "target_memkb", -1), "b_info.target_memkb"),
    ("target-over-max", setter("b_info", "target_memkb", 1 << 30), "b_info.target_memkb"),
    ("vcpus-zero", setter("b_info", "max_vcpus", 0), "b_info.max_vcpus"),
    ("vcpus-float", setter("b_info", "max_vcpus", 1.5), "b_info.max_vcpus"),
    ("avail-vcpus", setter("b_info", "avail_vcpus", [0, 7]), "b_info.avail_vcpus[1]"),
    ("event-channels", setter("b_info", "event_channels", -1), "b_info.event_channels"),
    ("uuid", setter("c_info", "uuid", "not-a-uuid"), "c_info.uuid"),
    ("name-slash", setter("c_info", "name", "../etc"), "c_info.name"),
    ("name-control", setter("c_info", "name", "a\nb"), "c_info.name"),
    ("name-long", setter("c_info", "name", "n" * 1000), "c_info.name"),
    ("name-line-separator", setter("c_info", "name", "db\u2028pyxl: error: x"),
     "c_info.name: must not contain line or paragraph separators or format characters (U+2028)"),
    ("name-paragraph-separator", setter("c_info", "name", "db\u2029x"), "(U+2029)"),
    ("name-bidi", setter("c_info", "name", "sda\u202e1bew"), "c_info.name: must not contain"),
    ("name-zero-width", setter("c_info", "name", "web\u200b1"), "(U+200B)"),
    ("name-surrogate", b'{"c_info": {"name": "\\ud800"}, "b_info": {"max_memkb": 16384}}',
     "c_info.name"),
    ("type", setter("c_info", "type", "hvm\u0000"), "c_info.type"),
    ("huge-int-elsewhere", lambda c: c.update(extra={"n": 1 << 80}), "extra.n"),
    # What the receiving host runs, as root, and with what words (review 29: a
    # stream named the hotplug script, the device model, QEMU's arguments).
    ("device-model", setter("b_info", "device_model", "/bin/true"),
     "b_info.device_model: names a program"),
    ("extra-args", setter("b_info", "extra", ["-chardev", "file,id=x,path=/etc/shadow"]),
     "b_info.extra: adds device-model arguments"),
    ("extra-hvm-string", setter("b_info", "extra_hvm", "-S"), "b_info.extra_hvm"),
    ("serial-file", setter("b_info", "type.hvm", {"serial": "file:/etc/cron.d/x"}),
     "b_info.type.hvm.serial: must be \"pty\""),
    ("serial-list-socket", setter("b_info", "type.hvm", {"serial_list": ["pty", "unix:/s,server"]}),
     "b_info.type.hvm.serial_list[1]"),
    ("boot-option", setter("b_info", "type.hvm", {"boot": "c,splash=/etc/shadow"}),
     "b_info.type.hvm.boot: must be a boot order"),
    ("disk-script-path", lambda c: c.update(disks=[{"vdev": "xvda", "script": "/tmp/evil"}]),
     "disks[0].script: must name a script in /etc/xen/scripts"),
    ("disk-script-dotdot", lambda c: c.update(disks=[{"vdev": "xvda",
                                                      "script": "/etc/xen/scripts/../../tmp/e"}]),
     "disks[0].script"),
    ("nic-script", lambda c: c.update(nics=[{"script": "../../../tmp/evil"}]), "nics[0].script"),
    ("nic-mac-option", lambda c: c.update(nics=[{"mac": "00:16:3e:00:00:03,romfile=/etc/shadow"}]),
     "nics[0].mac: must be a MAC address"),
    ("nic-model-option", lambda c: c.update(nics=[{"model": "e1000,romfile=/x"}]), "nics[0].model"),
    ("nic-bridge-option", lambda c: c.update(nics=[{"bridge": "xenbr0,script=/x"}]),
     "nics[0].bridge: must be an interface name"),
    ("disks-string", lambda c: c.update(disks="xvda"), "disks: must be a list"),
    ("disk-string", lambda c: c.update(disks=["xvda"]), "disks[0]: must be an object"),
]


@pytest.mark.parametrize("edit,needle", [b[1:] for b in BAD_CONFIGS],
                         ids=[b[0] for b in BAD_CONFIGS])
def test_restore_refuses_a_bad_config_before_any_domain(sim_dir, tmp_path, good, edit, needle):
    """Library and CLI: a typed error naming the field, exit 2, one line, no domain."""
    path = tmp_path / "bad.save"
    path.write_bytes(with_config(good, edit))
    before = domids(sim_dir)
    with pytest.raises(pyxl.StartupError) as info:
        pyxl.restore(path, sim_dir=sim_dir)
    assert needle in str(info.value), info.value
    assert "\n" not in str(info.value)
    if "nests too deeply" not in needle:
        assert isinstance(info.value, pyxl.ConfigError), info.value
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(path))
    one_line_error(r, 2, needle)
    assert domids(sim_dir) == before


@pytest.mark.parametrize("edit,needle", [b[1:] for b in BAD_CONFIGS[:3] + BAD_CONFIGS[5:8]],
                         ids=[b[0] for b in BAD_CONFIGS[:3] + BAD_CONFIGS[5:8]])
def test_restore_from_a_pipe_reports_a_bad_config_as_its_outcome(sim_dir, good, edit, needle):
    """From a pipe the head is read from the loop: the error is the operation's."""
    data = with_config(good, edit)
    data = data[:len(data) - len(good[1]) + 64]     # the head and a little more
    r, w = os.pipe()
    before = domids(sim_dir)
    try:
        op = pyxl.restore(r, sim_dir=sim_dir)
        assert not op.done()
        threading.Thread(target=lambda: (os.write(w, data), os.close(w)), daemon=True).start()
        assert default_loop().run_until(op.done, 30)
        assert isinstance(op.exception(), pyxl.StartupError), op.exception()
        assert needle in str(op.exception())
    finally:
        os.close(r)
    assert domids(sim_dir) == before


def test_name_given_to_restore_is_checked(sim_dir, tmp_path, good):
    path = tmp_path / "good.save"
    path.write_bytes(with_config(good, lambda c: None))
    with pytest.raises(pyxl.ConfigError, match="name: must not contain '/'"):
        pyxl.restore(path, sim_dir=sim_dir, name="a/b")
    assert domids(sim_dir) == []


def _only_srv_disks(seen):
    """A host's policy: disks only under /srv/guests (what a config_check is for)."""
    def check(config):
        seen.append(config)
        for i, d in enumerate(config.get("disks") or []):
            if not str(d.get("pdev_path", "")).startswith("/srv/guests/"):
                raise pyxl.ConfigError(f"disks[{i}].pdev_path", "is not under /srv/guests")
    return check


def test_a_hosts_config_check_refuses_what_pyxl_lets_through(sim_dir, tmp_path, good):
    """Disk paths are the sender's to choose, as under xl: a host that does not
    trust its senders with them says so in config_check, which sees the config
    after pyxl's checks and refuses it before anything is built."""
    path = tmp_path / "disk.save"
    path.write_bytes(with_config(good, lambda c: c.update(
        disks=[{"vdev": "xvda", "pdev_path": "/dev/sda", "format": "raw"}])))
    seen: list = []
    with pytest.raises(pyxl.ConfigError, match=r"config: disks\[0\]\.pdev_path: is not under /srv/guests$"):
        pyxl.restore(path, sim_dir=sim_dir, config_check=_only_srv_disks(seen))
    assert len(seen) == 1 and seen[0]["disks"][0]["pdev_path"] == "/dev/sda"
    assert domids(sim_dir) == []
    with pytest.raises(pyxl.ConfigError, match=r"b_info\.device_model"):   # pyxl's, first
        path.write_bytes(with_config(good, setter("b_info", "device_model", "/bin/true")))
        pyxl.restore(path, sim_dir=sim_dir, config_check=_only_srv_disks(seen))
    assert len(seen) == 1


def test_a_receivers_config_check_fails_the_receive_and_the_sender_is_told(hosts, good):
    _, b = hosts
    data = with_config(good, lambda c: c.update(
        disks=[{"vdev": "xvda", "pdev_path": "/dev/sda", "format": "raw"}]))
    data = data[:len(data) - len(good[1]) + 64]
    seen: list = []
    rx = migrate.receive("127.0.0.1:0", sim_dir=b, config_check=_only_srv_disks(seen))
    peer = socket.create_connection(rx.address)
    peer.setblocking(False)
    peer.sendall(data)
    assert default_loop().run_until(rx.done, 60)
    assert isinstance(rx.exception(), pyxl.ConfigError), rx.exception()
    assert "disks[0].pdev_path: is not under /srv/guests" in str(rx.exception())
    assert_peer_told(peer)
    peer.close()
    assert domids(b) == [] and len(seen) == 1


@pytest.mark.parametrize("edit,needle", [b[1:] for b in BAD_CONFIGS[2:3] + BAD_CONFIGS[5:7]],
                         ids=[b[0] for b in BAD_CONFIGS[2:3] + BAD_CONFIGS[5:7]])
def test_receiver_fails_typed_on_a_bad_config(hosts, good, edit, needle):
    """A migration receiver: done() with the ConfigError, the sender told, no
    domain; and the CLI receiver (stdin/stdout) exits 2 with one line."""
    _, b = hosts
    data = with_config(good, edit)
    data = data[:len(data) - len(good[1]) + 64]     # the head and a little more
    rx = migrate.receive("127.0.0.1:0", sim_dir=b)
    peer = socket.create_connection(rx.address)
    peer.setblocking(False)
    peer.sendall(data)
    assert default_loop().run_until(rx.done, 60)
    assert isinstance(rx.exception(), pyxl.ConfigError), rx.exception()
    assert needle in str(rx.exception())
    assert_peer_told(peer)
    peer.close()
    assert domids(b) == []
    r = subprocess.run(PYXL + ["migrate-receive", "--sim-dir", b], input=data,
                       capture_output=True, timeout=60, cwd=str(ROOT))
    r = subprocess.CompletedProcess(r.args, r.returncode, r.stdout.decode(errors="replace"),
                                    r.stderr.decode())
    one_line_error(r, 2, needle)
    assert domids(b) == []


# ---- the records after the libxc stream ------------------------------------------------------

END = libxl_record(LibxlRecordType.END)
EMU_HDR = struct.pack("<II", 2, 0)     # QEMU upstream, index 0


def flood_records(n: int, size: int):
    """``n`` EMULATOR_CONTEXT records of ``size`` bytes each, generated lazily."""
    chunk = bytes(1 << 20)
    for _ in range(n):
        yield struct.pack("<II", LibxlRecordType.EMULATOR_CONTEXT, size) + EMU_HDR
        left = size - len(EMU_HDR)
        while left > 0:
            yield chunk[:min(left, len(chunk))]
            left -= len(chunk)


RECEIVER = r"""
import json, sys
import pyxl
from pyxl import migrate
from pyxl.backends.sim import SimBackend

class Backend(SimBackend):
    pass

backend = Backend(sys.argv[1])
if len(sys.argv) > 2:
    backend.max_emulator_context = int(sys.argv[2])
rx = migrate.receive("127.0.0.1:0", backend=backend)
print(rx.address[1], flush=True)
pyxl.default_loop().run_until(rx.done)
exc = rx.exception()
status = dict(l.split(":", 1) for l in open("/proc/self/status") if l.startswith("Vm"))
print(json.dumps({"error": type(exc).__name__ if exc else None, "text": str(exc),
                  "bound": getattr(exc, "bound", None),
                  "hwm_kib": int(status["VmHWM"].split()[0])}), flush=True)
"""


def flood_receiver(b: str, stream: bytes, n: int, size: int, max_context: int = 0) -> dict:
    """A receiver in its own process, sent ``stream`` minus its END, then the
    flood; its outcome and its peak RSS."""
    argv = [sys.executable, "-c", RECEIVER, b] + ([str(max_context)] if max_context else [])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, cwd=str(ROOT))
    try:
        assert p.stdout is not None
        port = int(p.stdout.readline())
        peer = socket.create_connection(("127.0.0.1", port))

        def send() -> None:
            try:
                peer.sendall(stream[:-len(END)])
                for part in flood_records(n, size):
                    peer.sendall(part)
                peer.sendall(END)
            except OSError:
                pass   # the receiver gave up on us: that is the point

        t = threading.Thread(target=send, daemon=True)
        t.start()
        out = json.loads(p.stdout.readline())
        peer.close()
        t.join(30)
        return out
    finally:
        p.kill()
        p.wait()


def test_flood_of_emulator_records_keeps_the_receiver_small(hosts, good):
    """6 x 64 MiB EMULATOR_CONTEXT records: refused at the first one's header
    (pyxl's 4 MiB bound), the receiver's peak RSS stays far below one record,
    the error names the bound, and nothing is left."""
    a, b = hosts
    _, stream = good
    assert stream.endswith(END)
    config, _ = good
    data = xl_head(json.dumps(config).encode()) + stream
    out = flood_receiver(b, data, 6, 64 * MB)
    assert out["error"] == "StreamTooLarge", out
    assert out["bound"] == "EMULATOR_CONTEXT bytes", out
    assert "pyxl's bound on EMULATOR_CONTEXT bytes" in out["text"] and "\n" not in out["text"]
    assert out["hwm_kib"] < 200 * 1024, out          # the flood alone would be 384 MiB
    assert domids(b) == []


def test_too_many_records_are_refused(hosts, good):
    """Small records, too many of them: the count bound."""
    a, b = hosts
    config, stream = good
    data = xl_head(json.dumps(config).encode()) + stream
    out = flood_receiver(b, data, 20, 4096)
    assert out["error"] == "StreamTooLarge" and out["bound"] == "records", out
    assert domids(b) == []


def test_backend_may_declare_a_larger_device_model_state(hosts, good):
    """A backend's ``max_emulator_context`` raises the bound: a 40 MiB record gets
    past the trailer (and the simulated device model then refuses its garbage)."""
    a, b = hosts
    config, stream = good
    data = xl_head(json.dumps(config).encode()) + stream
    out = flood_receiver(b, data, 1, 40 * MB, max_context=64 * MB)
    assert out["error"] != "StreamTooLarge", out
    assert out["error"] is not None, out
    assert domids(b) == []


def test_restore_from_a_file_with_a_flood_is_refused(sim_dir, tmp_path, good):
    """A save file (read with blocking reads) with a 64 MiB record: refused at
    its header, exit 1, one line naming the bound, no domain."""
    config, stream = good
    path = tmp_path / "flood.save"
    with open(path, "wb") as f:
        f.write(xl_head(json.dumps(config).encode()) + stream[:-len(END)])
        for part in flood_records(1, 64 * MB):
            f.write(part)
        f.write(END)
    before = domids(sim_dir)
    t0 = time.monotonic()
    r = pyxl_cli("restore", "--sim-dir", sim_dir, str(path))
    one_line_error(r, 1, "pyxl's bound on EMULATOR_CONTEXT bytes")
    assert time.monotonic() - t0 < 30
    assert domids(sim_dir) == before


def test_a_cut_in_the_records_after_the_libxc_stream_names_the_file_offset(sim_dir, tmp_path,
                                                                            good):
    """A file cut inside its END record: the error names the file offset where
    the bytes are missing (as `pyxl inspect` does), not one counted from the
    records' start, and its cause is the StreamError with that offset."""
    config, stream = good
    path = tmp_path / "cut.save"
    path.write_bytes(xl_head(json.dumps(config).encode()) + stream[:-len(END)])
    size = path.stat().st_size
    before = domids(sim_dir)
    op = pyxl.restore(path, sim_dir=sim_dir)
    assert default_loop().run_until(op.done, 60)
    exc = op.exception()
    assert type(exc) is pyxl.OperationError, exc
    assert f"libxl record at {size:#x}: end of stream" in str(exc), exc
    assert isinstance(exc.__cause__, pyxl.TruncatedStream) and exc.__cause__.offset == size
    assert domids(sim_dir) == before
    r = pyxl_cli("inspect", str(path))
    assert f"at {size:#x}" in r.stdout + r.stderr, (r.stdout, r.stderr)
    # the same image compressed (zstd -d gives back the file above): the offset
    # in the plain stream, which the restore counts as the helper reads it
    if shutil.which("zstd") is None:
        return
    subprocess.run(["zstd", "-q", "--check", str(path), "-o", str(tmp_path / "cut.zst")],
                   check=True)
    op = pyxl.restore(tmp_path / "cut.zst", sim_dir=sim_dir)
    assert default_loop().run_until(op.done, 60)
    assert f"libxl record at {size:#x}: end of stream" in str(op.exception()), op.exception()
    assert domids(sim_dir) == before
