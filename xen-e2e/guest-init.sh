#!/bin/sh
# PID 1 of the test guests pv1, pvh1 and hvm1 (busybox initramfs).  Prints
#   e2e-tick BOOT_ID N
# on the Xen console every second, N = 0, 1, 2, ...  BOOT_ID is the kernel's
# random boot id: a guest that restarted instead of being restored shows a new
# BOOT_ID and N from 0 again.
#
# Devices (the same for PV, PVH and HVM: the Debian kernel's PV frontends; an
# HVM guest unplugs QEMU's emulated disk and NIC once it has them):
#   /dev/xvda  an ext2 file system (made in dom0) with a file /counter,
#              mounted with -o sync; every second the line "e2e-disk BOOT_ID M"
#              (64 bytes) overwrites its start in place (the shell's printf
#              into `1<>`: no truncation, no process), so the file never grows
#              and the on-disk metadata stays consistent between writes.  The
#              writer is its own process: a disk that stops answering does not
#              stop the console counter.
#   eth0       the address given as e2e_ip=A.B.C.D on the kernel command line
#              (/24), so dom0 can ping the guest across its bridge.  Without
#              e2e_ip= the guest does not wait for either device.
# "e2e-info ..." lines on the console tell what was set up or what failed.
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
busybox mount -t sysfs sys /sys
exec > /dev/hvc0 2>&1
read -r id < /proc/sys/kernel/random/boot_id
read -r cmdline < /proc/cmdline
ip=
dirty=
for a in $cmdline; do
    case $a in e2e_ip=*) ip=${a#e2e_ip=} ;; e2e_dirty=*) dirty=${a#e2e_dirty=} ;; esac
done
# xen-blkfront, xen-netfront, ext4 (which also serves ext2) and their
# dependencies, in modprobe's order (build-boot.sh).
while read -r m; do busybox insmod "/mods/$m" 2> /dev/null || echo "e2e-info insmod $m failed"; done < /mods/order

disk_writer() {
    m=0
    while :; do
        printf '%-63s\n' "e2e-disk $id $m" 1<> /mnt/counter || echo "e2e-info disk write $m failed"
        m=$((m + 1))
        busybox sleep 1
    done
}
# Wait (up to 10 s each) for the devices only if the guest was given an
# address: a guest created without devices (for pyxl's tests: no e2e_ip=)
# boots without the wait.
i=0
[ -n "$ip" ] || i=100
while [ ! -b /dev/xvda ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i + 1)); done
busybox mkdir -p /mnt
if [ -b /dev/xvda ] && busybox mount -t ext2 -o sync,noatime /dev/xvda /mnt; then
    echo "e2e-info disk /dev/xvda mounted"
    disk_writer &
else
    echo "e2e-info no disk: /dev/xvda cannot be mounted"
fi
i=0
[ -n "$ip" ] || i=100
while [ ! -e /sys/class/net/eth0 ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i + 1)); done
busybox ip link set lo up
if [ -n "$ip" ] && [ -e /sys/class/net/eth0 ] && busybox ip addr add "$ip/24" dev eth0 \
    && busybox ip link set eth0 up; then
    echo "e2e-info net eth0 $ip"
else
    echo "e2e-info no network (eth0 ${ip:-without e2e_ip=})"
fi

# e2e_dirty=MIB: a CPU-bound writer rewrites a MIB-sized tmpfs file over and
# over, so the guest dirties its memory as fast as its vCPU lets it: a CPU cap
# on the domain slows it down (the auto-converge test).  Its own process: the
# counter below keeps its pace.
if [ -n "$dirty" ] && busybox mkdir -p /dirty \
    && busybox mount -t tmpfs -o size=$((dirty + 1))m tmpfs /dirty; then
    ( while :; do
        busybox dd if=/dev/zero of=/dirty/f bs=1M count="$dirty" conv=notrunc 2> /dev/null
      done ) &
    echo "e2e-info dirtying $dirty MiB of memory without pause"
fi
n=0
while :; do
    echo "e2e-tick $id $n"
    n=$((n + 1))
    busybox sleep 1
done
