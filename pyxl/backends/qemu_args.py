"""QEMU's command line for an HVM guest, as libxl 4.17 builds it.

libxl_dm.c ``libxl__build_device_model_args_new`` for a local (not stub
domain) qemu-xen device model, the cases pyxl supports (the rest are refused
before any domain exists: :func:`pyxl.backends.libxlcfg.unsupported`):

* no display (``-vnc none -display none``), optionally ``-nographic``;
* VGA none, cirrus or std with ``vgamem_mb`` from video_memkb;
* direct kernel boot (``-kernel``/``-initrd``/``-append``), ``-boot order=``,
  serial ports as given (``-serial pty``, ``-serial none``, ...);
* emulated IDE disks for the first four disk indexes (hda-hdd, xvda-xvdd),
  raw through the configured path;
* emulated NICs (nictype vif_ioemu) as a ``-device``/``-netdev`` tap pair on
  ``vifD.N-emu`` bridged by vif-bridge later, or ``-net none``;
* ``-smp``, ``-machine xenfv`` (``pc,accel=xen`` without the platform
  device), ``-m``, the two QMP sockets, and on restore ``-incoming fd:N``.

Pure: the caller opens the state file and passes its fd number.  Paths are
Debian's (libxenmisc4.17: QEMU_XEN_PATH, XEN_RUN_DIR).

May import: pyxl.backends.libxlcfg, pyxl.errors.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, NamedTuple, Optional

from pyxl.backends import libxlcfg
from pyxl.backends.libxlcfg import b_hvm, defbool, to_int

__all__ = ["DeviceModelCommand", "QEMU_XEN_PATH", "RUN_DIR", "device_model_command",
           "qmp_path", "qmp_paths"]

#: Debian's qemu-system-xen, as libxl's QEMU_XEN_PATH there.
QEMU_XEN_PATH = "/usr/libexec/xen-qemu-system-i386"
RUN_DIR = "/var/run/xen"
#: hvm_info's HVM_BELOW_4G_MMIO_START (xen/include/public/hvm/e820.h)
HVM_BELOW_4G_MMIO_START = 0xF0000000


class DeviceModelCommand(NamedTuple):
    argv: List[str]
    #: variables added to the inherited environment (libxl__exec's envs)
    env: Dict[str, str]


def qmp_path(domid: int) -> str:
    """libxl's QMP socket for the domain's QEMU (libxl__qemu_qmp_path)."""
    return f"{RUN_DIR}/qmp-libxl-{domid}"


def qmp_paths(domid: int) -> List[str]:
    """Both QMP sockets QEMU creates for the domain (libxl__qmp_cleanup's list)."""
    return [qmp_path(domid), f"{RUN_DIR}/qmp-libxenstat-{domid}"]


def _mb(kb: int) -> int:
    return (kb + 1023) // 1024      # libxl__sizekb_to_mb rounds up


def device_model_command(config: Dict[str, Any], domid: int,
                         incoming_fd: Optional[int] = None,
                         environ: Optional[Dict[str, str]] = None,
                         st: libxlcfg.StatFn = os.stat) -> DeviceModelCommand:
    """argv and extra environment of QEMU for ``domid`` built from ``config``
    (a saved libxl_domain_config as JSON, after :func:`libxlcfg.prepare_nics`).
    ``incoming_fd``: the fd (inherited by QEMU) of the saved device state.
    ``environ``: the environment QEMU inherits (XEN_QEMU_CONSOLE_LIMIT is
    left alone when already set there, as libxl does).  ``st``: how disk paths
    are looked at (libxl's choice of the phy backend)."""
    libxlcfg.check_restorable(config)
    c_info, b_info, hvm = config.get("c_info") or {}, config.get("b_info") or {}, b_hvm(config)
    env: Dict[str, str] = {}
    # XSA-180: QEMU's stderr is capped unless the admin chose a cap.
    if "XEN_QEMU_CONSOLE_LIMIT" not in (environ or {}):
        env["XEN_QEMU_CONSOLE_LIMIT"] = "1048576"
    dm = str(b_info.get("device_model") or QEMU_XEN_PATH)
    a = [dm, "-xen-domid", str(domid), "-no-shutdown"]
    qmp, xenstat = qmp_paths(domid)
    a += ["-chardev", f"socket,id=libxl-cmd,path={qmp},server=on,wait=off",
          "-mon", "chardev=libxl-cmd,mode=control",
          "-chardev", f"socket,id=libxenstat-cmd,path={xenstat},server=on,wait=off",
          "-mon", "chardev=libxenstat-cmd,mode=control"]
    a += ["-nodefaults", "-no-user-config"]
    if c_info.get("name"):
        a += ["-name", _value(str(c_info["name"]))]
    # vnc, sdl and spice are refused by check_restorable: no display.
    a += ["-vnc", "none", "-display", "none"]
    if hvm.get("keymap"):
        a += ["-k", str(hvm["keymap"])]
    for key, opt in (("kernel", "-kernel"), ("ramdisk", "-initrd"), ("cmdline", "-append")):
        if b_info.get(key):
            a += [opt, str(b_info[key])]
    if hvm.get("serial"):
        a += ["-serial", str(hvm["serial"])]
    for s in hvm.get("serial_list") or []:
        a += ["-serial", str(s)]
    if defbool(hvm.get("nographic"), False):
        a.append("-nographic")
    kind, vmem = libxlcfg.vga_kind(config), libxlcfg.video_memkb(config)
    if kind == "std":
        a += ["-device", f"VGA,vgamem_mb={_mb(vmem)}"]
    elif kind == "cirrus":
        a += ["-device", f"cirrus-vga,vgamem_mb={_mb(vmem)}"]
    a += ["-boot", f"order={hvm.get('boot') or 'cda'}"]
    if not (defbool(b_info.get("acpi"), True) and defbool(hvm.get("acpi"), True)):
        a.append("-no-acpi")
    max_vcpus = to_int(b_info.get("max_vcpus"), 1)
    if max_vcpus > 1:
        # After libxl's defaults avail_vcpus always has a size, so libxl
        # always says how many of the maximum are online.
        a += ["-smp", f"{len(libxlcfg.avail_vcpus(b_info))},maxcpus={max_vcpus}"]
    ioemu = 0
    for nic in libxlcfg.nics(config):
        if nic.nictype != "vif_ioemu":
            continue
        a += ["-device", f"{nic.model},id=nic{nic.devid},netdev=net{nic.devid},mac={nic.mac}",
              "-netdev", f"type=tap,id=net{nic.devid},ifname=vif{domid}.{nic.devid}-emu,"
                         f"br={nic.bridge},script=no,downscript=no"]
        ioemu += 1
    if not ioemu:
        a += ["-net", "none"]
    if incoming_fd is not None:
        a += ["-incoming", f"fd:{incoming_fd}"]
    a += [str(x) for x in b_info.get("extra") or []]
    a += ["-machine", _machine(config)]
    a += [str(x) for x in b_info.get("extra_hvm") or []]
    a += ["-m", str(_mb(to_int(b_info.get("max_memkb"), 0) - vmem))]
    env["XEN_DOMAIN_ID"] = str(domid)
    a += _drives(config, st)
    if str(hvm.get("vendor_device") or "").lower() == "xenserver":
        a += ["-device", "xen-pvdevice,device-id=0xc000"]
    return DeviceModelCommand(a, env)


def _value(text: str) -> str:
    """A value inside one of QEMU's ``key=value,...`` options: a comma is
    doubled (QEMU's escape), so a name or a path never adds an option."""
    return text.replace(",", ",,")


def _machine(config: Dict[str, Any]) -> str:
    hvm = b_hvm(config)
    m = "xenfv,suppress-vmdesc=on" if defbool(hvm.get("xen_platform_pci"), True) \
        else "pc,accel=xen,suppress-vmdesc=on"
    hole = libxlcfg.memkb(hvm.get("mmio_hole_memkb")) or 0
    if hole:
        below = (1 << 32) - (hole << 10)
        if below <= HVM_BELOW_4G_MMIO_START:   # libxl ignores (warns about) a bigger one
            m += f",max-ram-below-4g={below}"
    return m


_QEMU_FORMATS = {"qcow": "qcow", "qcow2": "qcow2", "vhd": "vpc", "raw": "raw", "qed": "qed"}


def _drives(config: Dict[str, Any], st: libxlcfg.StatFn) -> List[str]:
    """Emulated IDE disks: indexes 0-3 (hda-hdd, xvda-xvdd), raw from the
    configured path (libxl__device_disk_find_local_path: a raw disk without a
    script, or a qdisk one, is opened directly); later disks are PV only."""
    a: List[str] = []
    for d in libxlcfg.disks(config, st):
        if d.disk_index >= 4:
            continue
        # libxl__qemu_disk_format_string; phy disks are raw to QEMU
        fmt = _QEMU_FORMATS.get(d.format, "") if d.backend == "qdisk" else "raw"
        if not fmt:
            continue    # libxl: "Unable to determine disk image format": PV only
        a += ["-drive", f"file={_value(d.pdev_path)},if=ide,index={d.disk_index},media=disk,format={fmt},"
                        "cache=writeback"]
    return a
