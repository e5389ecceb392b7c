"""QEMU's argv for a restored HVM guest and libxl's defaults over a saved config
(pyxl.backends.qemu_args, pyxl.backends.libxlcfg), checked against what libxl
4.17 builds.  Line numbers are Xen's stable-4.17 tools/libs/light/ files
(libxl_dm.c: libxl__build_device_model_args_new; libxl_create.c:
libxl__domain_build_info_setdefault; libxl_nic.c: libxl__device_nic_setdefault).

Only unit-tested here: that Debian's QEMU 7.2 accepts this argv, loads the
saved state with it and writes ``running`` is for the real-Xen lane."""

from __future__ import annotations

import copy
import os
import stat
from typing import Any, Dict

import pytest

from pyxl.backends import libxlcfg
from pyxl.backends.qemu_args import device_model_command, qmp_paths
from pyxl.errors import StartupError

W = "/root/e2e"


def _st(mode: int = stat.S_IFREG | 0o644):
    def st(path: str) -> os.stat_result:
        if path.startswith("/missing"):
            raise FileNotFoundError(2, "No such file or directory", path)
        return os.stat_result((mode, 0, 0, 1, 0, 0, 16 << 20, 0, 0, 0))
    return st


def hvm1() -> Dict[str, Any]:
    """xen-e2e's hvm1 as xl stores it (the user's config, before libxl's
    defaults, with the NIC's devid/type/MAC and video_memkb recorded):
    type="hvm", kernel/ramdisk/extra, memory=128, vcpus=1, tsc_mode="native",
    vga="none", vnc=0, serial="none", one raw disk xvda, one NIC on xenbr0."""
    return {
        "c_info": {"type": "hvm", "name": "hvm1", "uuid": "4b0f2d2e-6c8e-4a51-9d7c-0a0b0c0d0e0f",
                   "run_hotplug_scripts": "True"},
        "b_info": {
            "max_vcpus": 1, "avail_vcpus": [0], "max_memkb": 131072, "target_memkb": 131072,
            "video_memkb": 0, "tsc_mode": "native",
            "kernel": f"{W}/vmlinuz", "ramdisk": f"{W}/guest-initrd.gz",
            "cmdline": "console=hvc0 loglevel=4 e2e_ip=10.0.0.13",
            "type.hvm": {"vga": {"kind": "none"}, "vnc": {"enable": "False"},
                         "serial": "none"},
            "arch_x86": {"msr_relaxed": "False"},
        },
        "disks": [{"pdev_path": f"{W}/hvm1.img", "vdev": "xvda", "format": "raw",
                   "readwrite": 1}],
        "nics": [{"devid": 0, "mac": "00:16:3e:00:00:03", "bridge": "xenbr0",
                  "nictype": "vif_ioemu"}],
        "on_crash": "preserve",
    }


#: What libxl 4.17 gives QEMU for hvm1 as domain 5 restoring from fd 9.
HVM1_ARGV = [
    "/usr/libexec/xen-qemu-system-i386",          # QEMU_XEN_PATH (Debian: libxenmisc4.17)
    "-xen-domid", "5",                            # libxl_dm.c:1214-1216
    "-no-shutdown",                               # :1217
    # not stub domain, no pre-opened monitor fd (dm_restrict off): :1238-1256
    "-chardev", "socket,id=libxl-cmd,path=/var/run/xen/qmp-libxl-5,server=on,wait=off",
    "-mon", "chardev=libxl-cmd,mode=control",
    "-chardev", "socket,id=libxenstat-cmd,path=/var/run/xen/qmp-libxenstat-5,server=on,wait=off",
    "-mon", "chardev=libxenstat-cmd,mode=control",
    "-nodefaults",                                # :1284
    "-no-user-config",                            # :1290
    "-name", "hvm1",                              # :1296-1297
    "-vnc", "none",                               # vnc=0: :1339-1343
    "-display", "none",                           # :1350
    "-kernel", f"{W}/vmlinuz",                    # :1367-1374 (xl's extra is b_info.cmdline)
    "-initrd", f"{W}/guest-initrd.gz",
    "-append", "console=hvc0 loglevel=4 e2e_ip=10.0.0.13",
    "-serial", "none",                            # serial="none" is passed as given: :1402-1404
    # vga="none": no -device (:1457); usb, soundhw unset; acpi on (no -no-acpi, :1553)
    "-boot", "order=cda",                         # libxl_create.c:401 default, libxl_dm.c:1470
    # max_vcpus 1: no -smp (:1556)
    "-device", "rtl8139,id=nic0,netdev=net0,mac=00:16:3e:00:00:03",   # :1569-1579, model
    # default rtl8139 (libxl_nic.c:66), nictype vif_ioemu (libxl_nic.c:101), ifname
    # vifD.N-emu (libxl__device_nic_devname), script "no" (libxl_tapif_script, :27)
    "-netdev", "type=tap,id=net0,ifname=vif5.0-emu,br=xenbr0,script=no,downscript=no",
    "-incoming", "fd:9",                          # restore: :1796-1797
    "-machine", "xenfv,suppress-vmdesc=on",       # xen_platform_pci default on: :1818
    "-m", "128",                                  # (max_memkb - video_memkb) in MiB: :1858-1860
    # disk index 0 < 4, raw phy disk opened directly: :2006-2036, :1088
    "-drive", f"file={W}/hvm1.img,if=ide,index=0,media=disk,format=raw,cache=writeback",
]


def test_hvm1_argv_is_libxls():
    cmd = device_model_command(hvm1(), 5, 9, environ={}, st=_st())
    assert cmd.argv == HVM1_ARGV
    # :652 (XSA-180 cap, unless set already) and :1863
    assert cmd.env == {"XEN_QEMU_CONSOLE_LIMIT": "1048576", "XEN_DOMAIN_ID": "5"}
    assert device_model_command(hvm1(), 5, 9, environ={"XEN_QEMU_CONSOLE_LIMIT": "0"},
                                st=_st()).env == {"XEN_DOMAIN_ID": "5"}


def test_without_incoming_fd_and_qmp_paths():
    argv = device_model_command(hvm1(), 12, None, environ={}, st=_st()).argv
    assert "-incoming" not in argv
    assert qmp_paths(12) == ["/var/run/xen/qmp-libxl-12", "/var/run/xen/qmp-libxenstat-12"]


def test_defaults_from_libxl_setdefault():
    """vga unset: cirrus with 8 MiB (libxl_create.c:295, :348-353) taken off -m;
    boot unset: cda; vcpus 2 of 4: -smp 2,maxcpus=4 (libxl_dm.c:1556-1566);
    acpi=0: -no-acpi; xen_platform_pci=0: the pc machine (:1816); no NIC: -net none (:1733)."""
    c = hvm1()
    c["b_info"]["type.hvm"] = {"vnc": {"enable": "False"}, "acpi": "False",
                               "xen_platform_pci": "False", "boot": "dc"}
    del c["b_info"]["video_memkb"]
    c["b_info"].update(max_vcpus=4, avail_vcpus=[0, 1])
    c["nics"] = []
    argv = device_model_command(c, 3, 4, environ={}, st=_st()).argv
    assert argv[argv.index("-device") + 1] == "cirrus-vga,vgamem_mb=8"
    assert argv[argv.index("-boot") + 1] == "order=dc"
    assert "-no-acpi" in argv
    assert argv[argv.index("-smp") + 1] == "2,maxcpus=4"
    assert argv[argv.index("-net"):argv.index("-net") + 2] == ["-net", "none"]
    assert argv[argv.index("-machine") + 1] == "pc,accel=xen,suppress-vmdesc=on"
    assert argv[argv.index("-m") + 1] == str(128 - 8)
    assert "-serial" not in argv


def test_std_vga_serial_pty_extra_and_vendor_device():
    c = hvm1()
    hvm = c["b_info"]["type.hvm"]
    hvm.update(vga={"kind": "std"}, serial="pty", vendor_device="xenserver",
               mmio_hole_memkb=1 << 20)
    c["b_info"]["video_memkb"] = 16 << 10
    c["b_info"]["extra"] = ["-trace", "none"]
    argv = device_model_command(c, 5, 9, environ={}, st=_st()).argv
    assert argv[argv.index("-device") + 1] == "VGA,vgamem_mb=16"
    assert argv[argv.index("-serial") + 1] == "pty"
    # extra right after -incoming, before -machine (:1799-1803); 1 GiB hole (:1820-1831)
    i = argv.index("-incoming")
    assert argv[i + 2:i + 6] == ["-trace", "none", "-machine",
                                 f"xenfv,suppress-vmdesc=on,max-ram-below-4g={3 << 30}"]
    assert argv[-2:] == ["-device", "xen-pvdevice,device-id=0xc000"]
    assert argv[argv.index("-m") + 1] == "112"


def test_disks_as_libxl_places_them():
    """hd*/xvd* indexes 0-3 become IDE drives at their index; xvde and later are PV
    only (:2025-2031); a qdisk disk keeps its format (vhd is QEMU's vpc), a phy one is raw."""
    c = hvm1()
    c["disks"] = [
        {"pdev_path": "/img/c.qcow2", "vdev": "hdc", "format": "qcow2", "readwrite": 1,
         "backend": "qdisk"},
        {"pdev_path": "/img/d.vhd", "vdev": "xvdd", "format": "vhd", "readwrite": 1},
        {"pdev_path": "/dev/vg/e", "vdev": "xvde", "format": "raw", "readwrite": 1},
        {"pdev_path": "/img/a.img", "vdev": "xvda1", "format": "raw", "readwrite": 1},
    ]
    argv = device_model_command(c, 5, 9, environ={}, st=_st()).argv
    drives = [argv[i + 1] for i, a in enumerate(argv) if a == "-drive"]
    assert drives == [
        "file=/img/c.qcow2,if=ide,index=2,media=disk,format=qcow2,cache=writeback",
        "file=/img/d.vhd,if=ide,index=3,media=disk,format=vpc,cache=writeback",
        "file=/img/a.img,if=ide,index=0,media=disk,format=raw,cache=writeback",
    ]


def test_a_comma_in_a_name_or_a_disk_path_adds_no_option():
    """QEMU splits an option's value at a comma: ``file=/img/a,readonly=off.img``
    gave the drive an option of the path's choosing.  A comma is doubled,
    QEMU's escape (libxl passes them as they are)."""
    c = hvm1()
    c["c_info"]["name"] = "web,debug-threads=on"
    c["disks"] = [{"pdev_path": "/img/a,snapshot=on.img", "vdev": "xvda", "format": "raw",
                   "readwrite": 1}]
    argv = device_model_command(c, 5, 9, environ={}, st=_st()).argv
    assert argv[argv.index("-name") + 1] == "web,,debug-threads=on"
    assert argv[argv.index("-drive") + 1] == \
        "file=/img/a,,snapshot=on.img,if=ide,index=0,media=disk,format=raw,cache=writeback"


@pytest.mark.parametrize("vdev,expected", [
    ("xvda", (51712, 0, 0)), ("xvdb3", (51731, 1, 3)), ("xvdq", ((1 << 28) | (16 << 8), 16, 0)),
    ("hda", (768, 0, 0)), ("hdb", (832, 1, 0)), ("hdc", (5632, 2, 0)), ("hdd2", (5698, 3, 2)),
    ("sda", (2048, 0, 0)), ("sdb1", (2065, 1, 1)), ("d3p1", ((202 << 8) | (3 << 4) | 1, 3, 1)),
    ("xvdaa", ((1 << 28) | (26 << 8), 26, 0)),
])
def test_disk_dev_number(vdev, expected):
    assert libxlcfg.disk_dev_number(vdev) == expected


@pytest.mark.parametrize("vdev", ["xvda0", "hde", "sdq", "vda", "", "xvd"])
def test_disk_dev_number_refuses(vdev):
    with pytest.raises(ValueError):
        libxlcfg.disk_dev_number(vdev)


def test_disk_backend_choice():
    c = hvm1()
    assert libxlcfg.disks(c, _st())[0].backend == "phy"            # a regular file
    assert libxlcfg.disks(c, _st(stat.S_IFBLK | 0o600))[0].backend == "phy"
    assert libxlcfg.disks(c, _st(stat.S_IFDIR | 0o755))[0].backend == "qdisk"
    c["disks"][0]["format"] = "qcow2"
    assert libxlcfg.disks(c, _st())[0].backend == "qdisk"
    c["disks"][0].update(format="raw", pdev_path="/missing.img")
    with pytest.raises(StartupError, match="cannot stat /missing.img"):
        libxlcfg.disks(c, _st())


def test_prepare_nics_records_devid_type_and_mac():
    c = hvm1()
    c["nics"] = [{"bridge": "br1"}, {"devid": 3, "mac": "00:16:3E:AA:BB:CC"}, {}]
    libxlcfg.prepare_nics(c)
    assert [n["devid"] for n in c["nics"]] == [4, 3, 5]
    assert all(n["nictype"] == "vif_ioemu" for n in c["nics"])
    assert c["nics"][0]["mac"].startswith("00:16:3e:") and len(c["nics"][0]["mac"]) == 17
    nics = libxlcfg.nics(c)
    assert nics[1].mac == "00:16:3e:aa:bb:cc" and nics[1].model == "rtl8139"
    assert nics[0].bridge == "br1" and nics[2].bridge == "xenbr0"
    assert nics[0].script == "/etc/xen/scripts/vif-bridge"
    pv = {"c_info": {"type": "pv"}, "nics": [{"nictype": "vif_ioemu"}]}
    libxlcfg.prepare_nics(pv)
    assert pv["nics"][0]["nictype"] == "vif"


@pytest.mark.parametrize("change,named", [
    (lambda c: c["b_info"]["type.hvm"].pop("vnc"), "vnc=1"),
    (lambda c: c["b_info"]["type.hvm"].update(sdl={"enable": "True"}), "sdl=1"),
    (lambda c: c["b_info"]["type.hvm"].update(spice={"enable": "True"}), "spice=1"),
    (lambda c: c["b_info"]["type.hvm"].update(vga={"kind": "qxl"}), "vga='qxl'"),
    (lambda c: c["b_info"]["type.hvm"].update(usb="True"), "usb"),
    (lambda c: c["b_info"]["type.hvm"].update(soundhw="hda"), "soundhw"),
    (lambda c: c["b_info"]["type.hvm"].update(hdtype="ahci"), "hdtype=ahci"),
    (lambda c: c["b_info"].update(device_model_version="qemu_xen_traditional"),
     "device_model_version=qemu_xen_traditional"),
    (lambda c: c["b_info"].update(device_model_stubdomain="True"), "device_model_stubdomain"),
    (lambda c: c["b_info"].update(dm_restrict="True"), "dm_restrict=1"),
    (lambda c: c.update(pcidevs=[{"func": 0}]), "pcidevs"),
    (lambda c: c.update(channels=[{"name": "org.qemu.guest_agent.0"}]), "channels"),
    (lambda c: c.update(vtpms=[{}]), "vtpms"),
    (lambda c: c["disks"][0].update(is_cdrom=1), "CD-ROM xvda"),
    (lambda c: c["disks"][0].update(vdev="sda"), "SCSI disk sda"),
    (lambda c: c["disks"][0].update(readwrite=0), "read-only emulated IDE disk xvda"),
    (lambda c: c["disks"][0].update(script="block-iscsi"), "with script="),
    (lambda c: c["nics"][0].update(backend_domid=3), "driver-domain"),
    (lambda c: c["b_info"].update(tsc_mode="native_paravirt"), "tsc_mode"),
])
def test_unsupported_hvm_features_are_named(change, named):
    c = copy.deepcopy(hvm1())
    change(c)
    with pytest.raises(StartupError) as ei:
        device_model_command(c, 5, 9, environ={}, st=_st())
    assert named in str(ei.value)
    assert str(ei.value).startswith("pyxl cannot restore this domain on Xen")


def test_supported_config_has_nothing_to_name():
    assert libxlcfg.unsupported(hvm1()) == []
    assert libxlcfg.unsupported({"c_info": {"type": "pvh"}, "vfbs": [{}]}) == []
    assert libxlcfg.unsupported({"c_info": {"type": "arm"}}) == ["type='arm'"]


def test_paging_memory_as_libxl():
    """libxl__get_required_paging_memory (libxl_create.c:1028-1049): 4 pages *
    (256 per vCPU + per MiB: 1 for the p2m of HVM/PVH, +1 without HAP)."""
    c = hvm1()
    assert libxlcfg.paging_memkb(c) == 4 * (256 + 128)
    c["c_info"]["hap"] = "False"
    assert libxlcfg.paging_memkb(c) == 4 * (256 + 2 * 128)
    c["b_info"]["shadow_memkb"] = 9000
    assert libxlcfg.paging_memkb(c) == 9000
