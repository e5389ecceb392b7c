#!/bin/sh
# PID 1 of the PV and PVH test guests (busybox initramfs).  Prints
#   e2e-tick BOOT_ID N
# on the Xen console every second, N = 0, 1, 2, ...  BOOT_ID is the kernel's
# random boot id: a guest that restarted instead of being restored shows a new
# BOOT_ID and N from 0 again.
export PATH=/bin
busybox mount -t proc proc /proc
busybox mount -t devtmpfs dev /dev
read -r id < /proc/sys/kernel/random/boot_id
n=0
while :; do
    echo "e2e-tick $id $n"
    n=$((n + 1))
    busybox sleep 1
done > /dev/hvc0 2>&1
