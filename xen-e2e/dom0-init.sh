#!/bin/sh
# PID 1 of dom0 (installed as /sbin/xen-e2e-init in the dom0 root; no systemd).
# Brings up the Xen toolstack's daemons, runs the tests the host put on the 9p
# share (tests-in-dom0.sh), then powers the (emulated) machine off.
# Xen's tools of this root's release: /usr/lib/xen-4.17 (Debian 12), -4.20 (13).
XEN_BIN=$(ls -d /usr/lib/xen-4.*/bin | tail -n 1)
export PATH=/opt/pyxl/bin:$XEN_BIN:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8
say() { echo "dom0-init: $*"; }

mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm
# devtmpfs has no /dev/fd, /dev/stdin...: udev would make them.  Xen's hotplug
# scripts need /dev/stdin (locking.sh's claim_lock stats it, and loops until it
# can: without it `block add` spins until libxl kills it after 40 s).
ln -sfn /proc/self/fd /dev/fd
ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mount -o remount,rw /
mkdir -p /run/lock /run/xen /run/xenstored /var/log/xen/console /var/lib/xen /tmp
hostname dom0
# The guests' devices: blkback + loop (Xen's block script attaches each disk
# image to a loop device), netback + bridge, and tun for QEMU's tap of an HVM
# guest's emulated NIC.
for m in xenfs xen-evtchn xen-gntdev xen-gntalloc xen-privcmd 9pnet_virtio 9p \
         xen-blkback loop xen-netback bridge tun; do
    modprobe "$m" || say "modprobe $m failed"
done
mount -t xenfs xenfs /proc/xen || say "mount xenfs failed"
# The guests' network: a bridge with dom0 at 10.0.0.1; each guest's vif joins it
# (Xen's vif-bridge script, run by libxl).  It exists only inside this emulated
# host: QEMU runs with -nic none.
ip link set lo up
{ ip link add xenbr0 type bridge stp_state 0 forward_delay 0 && ip addr add 10.0.0.1/24 dev xenbr0 && ip link set xenbr0 up; } \
    || say "bridge xenbr0 failed"
mkdir -p /mnt/e2e
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 e2e /mnt/e2e || say "mount 9p share failed"
mkdir -p /mnt/e2e/out
say "dom0 up after $(cut -d' ' -f1 /proc/uptime) s"

"$XEN_BIN/xenstored" --pid-file=/run/xenstored.pid || say "xenstored failed"
"$XEN_BIN/xen-init-dom0" || say "xen-init-dom0 failed"
# --timestamp=guest: each line of a guest's console log starts with the time.
"$XEN_BIN/xenconsoled" --pid-file=/run/xenconsoled.pid --log=guest --timestamp=guest \
    --log-dir=/var/log/xen/console || say "xenconsoled failed"
say "toolstack up after $(cut -d' ' -f1 /proc/uptime) s"

if [ -f /mnt/e2e/tests-in-dom0.sh ]; then
    bash /mnt/e2e/tests-in-dom0.sh > /mnt/e2e/out/tests.log 2>&1
    say "tests-in-dom0.sh exited $?"
else
    say "no tests on the share"
fi
# Keep the guests' console logs and the toolstack's logs with the results.
cp -r /var/log/xen /mnt/e2e/out/var-log-xen 2>/dev/null
say "powering off after $(cut -d' ' -f1 /proc/uptime) s"
sync
umount /mnt/e2e 2>/dev/null
echo o > /proc/sysrq-trigger
sleep 30
