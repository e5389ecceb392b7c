#!/bin/sh
# PID 1 of dom0's initramfs (busybox): load the modules for the virtio root disk,
# mount it and hand over to the dom0 init (/sbin/xen-e2e-init, dom0-init.sh).
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t sysfs sys /sys
busybox mount -t devtmpfs dev /dev
while read -r m; do busybox insmod "/mods/$m" || echo "initramfs: insmod $m failed"; done < /mods/order
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do busybox sleep 0.1; i=$((i + 1)); done
busybox mount -t ext4 /dev/vda /newroot || { echo "initramfs: cannot mount /dev/vda"; busybox sh; }
busybox umount /proc /sys /dev
exec busybox switch_root /newroot /sbin/xen-e2e-init
