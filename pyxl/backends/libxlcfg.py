"""libxl's defaults over a saved domain config, for what pyxl builds from it.

The xl header carries the domain config as the user wrote it: libxl keeps a
copy taken *before* ``libxl__domain_config_setdefault`` and, once the domain
is built, updates it only with each NIC's devid, type and MAC, the uuid and
``video_memkb`` (libxl_internal.c: ``libxl__update_domain_configuration``).
A restoring toolstack applies libxl's defaults again.  This module does that
for the fields pyxl uses (libxl_create.c: ``libxl__domain_build_info_setdefault``,
libxl_disk.c: ``libxl__device_disk_setdefault``, libxl_nic.c:
``libxl__device_nic_setdefault``, libxl_device.c:
``libxl__device_disk_dev_number``), and says which saved features pyxl does
not rebuild (:func:`unsupported`), so a restore can refuse before any domain
exists.  Pure functions over the JSON (enums are libxl's lowercase names,
defbools ``"True"``/``"False"``/``"<default>"``); the one look at the host
(does a disk path exist, and is it a file or a block device) is a parameter.

May import: pyxl.errors, pyxl.backends.configcheck (the script directory).
"""

from __future__ import annotations

import os
import stat
from typing import Any, Callable, Dict, List, NamedTuple, Optional

from pyxl.backends.configcheck import XEN_SCRIPT_DIR
from pyxl.errors import StartupError

__all__ = ["Disk", "Nic", "XEN_SCRIPT_DIR", "avail_vcpus", "b_hvm", "check_restorable", "defbool", "disk_dev_number",
           "disks", "memkb", "nics", "paging_memkb", "prepare_nics", "to_int", "unsupported",
           "video_memkb"]

#: libxl_types.idl's MemKB default (~0ULL): "not set".
_MEMKB_DEFAULT = (1 << 64) - 1


def defbool(v: Any, default: bool) -> bool:
    """libxl's JSON for a defbool: true/false, "True"/"False", or "<default>"."""
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false"):
        return v.lower() == "true"
    return default


def to_int(v: Any, default: int) -> int:
    try:
        return int(v)
    except (TypeError, ValueError):
        return default


def memkb(v: Any) -> Optional[int]:
    """A MemKB field: None when unset (absent, libxl's ~0 default, or negative)."""
    n = to_int(v, -1)
    return None if n < 0 or n >= _MEMKB_DEFAULT - 1 else n


def b_hvm(config: Dict[str, Any]) -> Dict[str, Any]:
    """``b_info["type.hvm"]`` (the HVM arm of libxl's keyed union), or {}."""
    u = (config.get("b_info") or {}).get("type.hvm")
    return u if isinstance(u, dict) else {}


def _enum(v: Any, default: str) -> str:
    return v.lower() if isinstance(v, str) and v and v.lower() != "unknown" else default


def vga_kind(config: Dict[str, Any]) -> str:
    """"none", "cirrus" (libxl's default), "std" or "qxl"."""
    return _enum((b_hvm(config).get("vga") or {}).get("kind"), "cirrus")


def video_memkb(config: Dict[str, Any]) -> int:
    """b_info.video_memkb with libxl's qemu-xen default for the VGA kind."""
    b_info = config.get("b_info") or {}
    if (config.get("c_info") or {}).get("type") != "hvm":
        return memkb(b_info.get("video_memkb")) or 0
    v = memkb(b_info.get("video_memkb"))
    if v is not None:
        return v
    return {"none": 0, "qxl": 128 << 10, "std": 16 << 10}.get(vga_kind(config), 8 << 10)


def avail_vcpus(b_info: Dict[str, Any]) -> List[int]:
    """The vCPUs online at start: libxl's bitmap (a JSON list of set bits); by
    default vCPU 0 only."""
    avail = b_info.get("avail_vcpus")
    if isinstance(avail, list) and avail:
        return sorted(to_int(i, 0) for i in avail)
    return [0]


def paging_memkb(config: Dict[str, Any]) -> int:
    """b_info.shadow_memkb, or libxl__get_required_paging_memory's default:
    1 MiB per vCPU plus a page per MiB of RAM for the p2m (not PV) and one
    more per MiB for shadow paging (no HAP)."""
    b_info, c_info = config.get("b_info") or {}, config.get("c_info") or {}
    v = memkb(b_info.get("shadow_memkb"))
    if v is not None and v > 0:
        return v
    dtype = c_info.get("type") or "pv"
    hap = dtype != "pv" and defbool(c_info.get("hap"), True)
    per_mib = (dtype != "pv") + (not hap)
    return 4 * (256 * to_int(b_info.get("max_vcpus"), 1)
                + per_mib * (to_int(b_info.get("max_memkb"), 0) // 1024))


# ---- disks -------------------------------------------------------------------------------


def _virtdisk(vdev: str, prefix: str, max_index: int, max_part: int) -> Optional[tuple[int, int]]:
    """libxl's device_virtdisk_matches: the letters after ``prefix`` are the disk
    index in base 26 ("a" = 0, "aa" = 26), then an optional partition number."""
    if not vdev.startswith(prefix):
        return None
    rest, index = vdev[len(prefix):], -1
    while rest and "a" <= rest[0] <= "z":
        index = (index + 1) * 26 + (ord(rest[0]) - ord("a"))
        rest = rest[1:]
        if index > max_index:
            return None
    if index < 0:
        return None     # no letters (libxl computes a negative disk number here)
    if not rest:
        return index, 0
    if rest[0] == "0" or not rest.isdigit() or int(rest) > max_part:
        return None
    return index, int(rest)


def disk_dev_number(vdev: str) -> tuple[int, int, int]:
    """(Xen device number, disk index, partition) of a virtual device name,
    as libxl__device_disk_dev_number: ``xvda`` -> (51712, 0, 0), ``hdc`` ->
    (5632, 2, 0), ``sdb1`` -> (2065, 1, 1).  ValueError for a name libxl
    cannot place on a disk (a bare number has no disk index either)."""
    if vdev.startswith("d") and "p" in vdev:
        d, _, p = vdev[1:].partition("p")
        if d.isdigit() and p.isdigit() and int(d) < (1 << 20) and int(p) < 256:
            disk, part = int(d), int(p)
            return _xvd_number(disk, part), disk, part
    m = _virtdisk(vdev, "xvd", (1 << 20) - 1, 255)
    if m is not None:
        return _xvd_number(*m), m[0], m[1]
    m = _virtdisk(vdev, "hd", 3, 63)
    if m is not None:
        disk, part = m
        return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6) | part, disk, part
    m = _virtdisk(vdev, "sd", 15, 15)
    if m is not None:
        return (8 << 8) | (m[0] << 4) | m[1], m[0], m[1]
    raise ValueError(f"virtual disk {vdev!r}: not a name libxl knows (xvdX, hdX, sdX, dNpM)")


def _xvd_number(disk: int, part: int) -> int:
    if disk <= 15 and part <= 15:
        return (202 << 8) | (disk << 4) | part
    return (1 << 28) | (disk << 8) | part


class Disk(NamedTuple):
    """One saved disk after libxl's defaults."""
    vdev: str
    devid: int          # the Xen device number (XenStore's device id)
    disk_index: int     # xvda/hda/sda: 0
    pdev_path: str
    backend: str        # "phy" or "qdisk"
    format: str         # "raw", "qcow2", ... ("empty" only for a CD-ROM)
    readwrite: bool
    is_cdrom: bool
    removable: bool
    script: Optional[str]   # as configured (None: the phy default, block)
    discard_enable: bool
    trusted: bool
    backend_domid: int


StatFn = Callable[[str], os.stat_result]


def _disk_backend(d: Dict[str, Any], fmt: str, path: str, st: StatFn) -> str:
    """libxl__device_disk_set_backend: the configured backend, or the first of
    phy (a raw file or block device, or any raw disk with a script) and qdisk."""
    want = _enum(d.get("backend"), "unknown")
    script = d.get("script")
    phy_ok = fmt == "raw"
    if phy_ok and not script and to_int(d.get("backend_domid"), 0) == 0:
        try:
            mode = st(path).st_mode
        except OSError as exc:
            raise StartupError(f"disk {d.get('vdev')}: cannot stat {path}: {exc.strerror}") from None
        phy_ok = stat.S_ISBLK(mode) or stat.S_ISREG(mode)
    qdisk_ok = not script
    if want == "unknown":
        if phy_ok:
            return "phy"
        if qdisk_ok:
            return "qdisk"
    elif (want == "phy" and phy_ok) or (want == "qdisk" and qdisk_ok):
        return want
    raise StartupError(f"disk {d.get('vdev')}: no suitable backend (configured {want!r}, "
                       f"format {fmt!r}{', script ' + str(script) if script else ''})")


def disks(config: Dict[str, Any], st: StatFn = os.stat) -> List[Disk]:
    """The saved disks with libxl's defaults; StartupError for one libxl would refuse."""
    out = []
    hvm = (config.get("c_info") or {}).get("type") == "hvm"
    for d in config.get("disks") or []:
        vdev = str(d.get("vdev") or "")
        try:
            devid, index, _part = disk_dev_number(vdev)
        except ValueError as exc:
            raise StartupError(str(exc)) from None
        fmt = _enum(d.get("format"), "raw")
        cdrom = bool(to_int(d.get("is_cdrom"), 0))
        path = str(d.get("pdev_path") or "")
        if fmt == "empty":
            if not cdrom:
                raise StartupError(f"disk {vdev}: empty but not a CD-ROM")
            backend = "qdisk"
        elif cdrom and hvm:
            backend = "qdisk"    # libxl forces QEMU's backend for an HVM CD-ROM
        else:
            backend = _disk_backend(d, fmt, path, st)
        rw = bool(to_int(d.get("readwrite"), 0))
        out.append(Disk(vdev, devid, index, path, backend, fmt, rw, cdrom,
                        bool(to_int(d.get("removable"), 0)), d.get("script") or None,
                        defbool(d.get("discard_enable"), rw), defbool(d.get("trusted"), True),
                        to_int(d.get("backend_domid"), 0)))
    return out


# ---- NICs --------------------------------------------------------------------------------


class Nic(NamedTuple):
    """One saved NIC after libxl's defaults."""
    devid: int
    mac: str
    bridge: str
    script: str         # absolute
    nictype: str        # "vif_ioemu" (HVM's default) or "vif"
    model: str
    ifname: Optional[str]
    ip: Optional[str]
    mtu: int
    gatewaydev: Optional[str]
    rate: Optional[str]  # "bytes,usecs" as the backend's node
    trusted: bool
    backend_domid: int


def prepare_nics(config: Dict[str, Any]) -> None:
    """What libxl records in the saved config (libxl__device_nic_set_devids,
    libxl__update_config_nic): a devid, a type and a MAC for every NIC, so
    that QEMU's argv and the backends agree, and so does the next restore.
    Random MACs are Xen's OUI 00:16:3e, as libxl's."""
    hvm = (config.get("c_info") or {}).get("type") == "hvm"
    nics_ = [n for n in config.get("nics") or [] if isinstance(n, dict)]
    last = max([to_int(n.get("devid"), -1) for n in nics_] + [-1])
    for n in nics_:
        if to_int(n.get("devid"), -1) < 0:
            last += 1
            n["devid"] = last
        nt = _enum(n.get("nictype"), "vif_ioemu" if hvm else "vif")
        n["nictype"] = nt if hvm else "vif"
        mac = str(n.get("mac") or "")
        if not mac or mac == "00:00:00:00:00:00":
            r = os.urandom(3)
            n["mac"] = f"00:16:3e:{r[0] & 0x7f:02x}:{r[1]:02x}:{r[2]:02x}"


def nics(config: Dict[str, Any]) -> List[Nic]:
    """The saved NICs with libxl's defaults (run :func:`prepare_nics` first)."""
    out = []
    for n in config.get("nics") or []:
        script = str(n.get("script") or "vif-bridge")
        rate = None
        usecs = to_int(n.get("rate_interval_usecs"), 0)
        if usecs > 0:
            rate = f"{to_int(n.get('rate_bytes_per_interval'), 0)},{usecs}"
        out.append(Nic(to_int(n.get("devid"), 0), str(n.get("mac") or "").lower(),
                       str(n.get("bridge") or "xenbr0"),
                       script if script.startswith("/") else f"{XEN_SCRIPT_DIR}/{script}",
                       _enum(n.get("nictype"), "vif"), str(n.get("model") or "rtl8139"),
                       n.get("ifname") or None, n.get("ip") or None,
                       to_int(n.get("mtu"), 0) or 1500, n.get("gatewaydev") or None, rate,
                       defbool(n.get("trusted"), True), to_int(n.get("backend_domid"), 0)))
    return out


# ---- what pyxl does not rebuild ------------------------------------------------------------

#: Device lists of libxl_domain_config pyxl does not recreate on restore.
_DEVICE_LISTS = ("pcidevs", "rdms", "dtdevs", "vfbs", "vkbs", "vtpms", "p9s", "pvcallsifs",
                 "vdispls", "vsnds", "channels", "usbctrls", "usbdevs", "virtios")


def unsupported(config: Dict[str, Any]) -> List[str]:
    """Features of a saved config that pyxl's Xen backend does not rebuild on
    restore, each named as xl's config file names it; [] when it can.  Disks
    and NICs are rebuilt for every type; an HVM guest's device model and
    emulated devices are checked too.  (PV and PVH guests lose the devices of
    the other lists -- vfb, pci... -- as before.)"""
    c_info, b_info = config.get("c_info") or {}, config.get("b_info") or {}
    dtype = c_info.get("type") or "pv"
    why: List[str] = []
    if dtype not in ("pv", "pvh", "hvm"):
        return [f"type={dtype!r}"]
    if _enum(b_info.get("tsc_mode"), "default") not in ("default", "always_emulate", "native"):
        why.append(f"tsc_mode={b_info.get('tsc_mode')!r}")
    for n in config.get("nics") or []:
        if any(k.startswith("colo_") for k in n):
            why.append(f"COLO on nic {n.get('devid', '?')}")
        if n.get("backend_domname") or to_int(n.get("backend_domid"), 0):
            why.append(f"nic {n.get('devid', '?')} with a driver-domain backend")
    for d in config.get("disks") or []:
        vdev = d.get("vdev", "?")
        if d.get("backend_domname") or to_int(d.get("backend_domid"), 0):
            why.append(f"disk {vdev} with a driver-domain backend")
        if defbool(d.get("colo_enable"), False):
            why.append(f"COLO on disk {vdev}")
        if _enum(d.get("specification"), "xen") != "xen":
            why.append(f"disk {vdev} specification={d.get('specification')}")
        if _enum(d.get("backend"), "unknown") not in ("unknown", "phy", "qdisk"):
            why.append(f"disk {vdev} backendtype={d.get('backend')}")
        if dtype != "hvm" and (_enum(d.get("backend"), "unknown") == "qdisk"
                               or _enum(d.get("format"), "raw") != "raw"):
            why.append(f"disk {vdev} served by QEMU (qdisk) for a {dtype.upper()} guest "
                       "(pyxl starts no QEMU for it)")
    if dtype != "hvm":
        return why
    for key in _DEVICE_LISTS:
        if config.get(key):
            why.append(f"{key} (device list)")
    if _enum(c_info.get("passthrough"), "disabled") not in ("disabled", "default"):
        why.append("passthrough")
    if defbool(c_info.get("driver_domain"), False):
        why.append("driver_domain=1")
    if defbool(c_info.get("xend_suspend_evtchn_compat"), False):
        why.append("xend_suspend_evtchn_compat")
    if b_info.get("vnuma_nodes"):
        why.append("vnuma")
    return why + _unsupported_hvm(config)


def _unsupported_hvm(config: Dict[str, Any]) -> List[str]:
    b_info, hvm = config.get("b_info") or {}, b_hvm(config)
    why: List[str] = []
    if _enum(b_info.get("device_model_version"), "qemu_xen") != "qemu_xen":
        why.append(f"device_model_version={b_info.get('device_model_version')}")
    for key, name in (("device_model_stubdomain", "device_model_stubdomain_override=1"),
                      ("dm_restrict", "dm_restrict=1")):
        if defbool(b_info.get(key), False):
            why.append(name)
    if b_info.get("device_model_user"):
        why.append("device_model_user")
    if defbool((hvm.get("vnc") or {}).get("enable"), True):
        why.append("vnc=1 (xl's default for HVM; pyxl starts QEMU without a display: set vnc=0)")
    for key in ("sdl", "spice"):
        if defbool((hvm.get(key) or {}).get("enable"), False):
            why.append(f"{key}=1")
    kind = vga_kind(config)
    if kind not in ("none", "cirrus", "std"):
        why.append(f"vga={kind!r}")
    if defbool(hvm.get("usb"), False) or hvm.get("usbdevice") or hvm.get("usbdevice_list") \
            or to_int(hvm.get("usbversion"), 0):
        why.append("usb/usbversion/usbdevice")
    if hvm.get("soundhw"):
        why.append("soundhw")
    if defbool(hvm.get("gfx_passthru"), False):
        why.append("gfx_passthru")
    if _enum(hvm.get("hdtype"), "ide") != "ide":
        why.append(f"hdtype={hvm.get('hdtype')}")
    genid = str(hvm.get("ms_vm_genid") or "")
    if genid.strip("0-"):
        why.append("generationid")
    if hvm.get("serial") and hvm.get("serial_list"):
        why.append("both serial and serial_list")
    if not b_info.get("kernel") and (b_info.get("ramdisk") or b_info.get("cmdline")):
        why.append("ramdisk/cmdline without kernel")
    for d in config.get("disks") or []:
        vdev = str(d.get("vdev") or "?")
        if to_int(d.get("is_cdrom"), 0):
            why.append(f"CD-ROM {vdev}")
            continue
        if vdev.startswith("sd"):
            why.append(f"SCSI disk {vdev}")
            continue
        try:
            _devid, index, _part = disk_dev_number(vdev)
        except ValueError:
            continue    # libxl skips it for QEMU (no emulated disk), so do we
        if index < 4 and not to_int(d.get("readwrite"), 0):
            why.append(f"read-only emulated IDE disk {vdev} (QEMU cannot)")
        elif index < 4 and d.get("script") and _enum(d.get("format"), "raw") == "raw" \
                and _enum(d.get("backend"), "unknown") != "qdisk":
            why.append(f"emulated IDE disk {vdev} with script= (QEMU would need the "
                       "script's device)")
    return why


def check_restorable(config: Dict[str, Any]) -> None:
    """StartupError naming every saved feature pyxl would not rebuild."""
    why = unsupported(config)
    if why:
        raise StartupError("pyxl cannot restore this domain on Xen: the saved config uses "
                           + "; ".join(why))
