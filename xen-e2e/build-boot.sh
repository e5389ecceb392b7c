#!/bin/bash
# Boot artefacts, from Debian packages only, cached in $CACHE/boot-<hash>/:
#   xen              Debian's xen-$XEN_REL-amd64.gz, gunzipped (QEMU -kernel boots it as multiboot)
#   vmlinuz          Debian's kernel of $SUITE (6.1; 6.12 on trixie) for dom0 and the guests
#                    (it has CONFIG_XEN_PVH)
#   dom0-initrd.gz   busybox-static + the modules needed to mount the virtio root disk
#   guest-initrd.gz  busybox-static + guest-init.sh (prints a counter on hvc0 every second,
#                    writes one to its disk) + xen-blkfront, xen-netfront, ext4 and their deps
#   modules/         the kernel's /lib/modules/KVER (depmod'ed), copied into the dom0 root
#   kver             the kernel version string
# Usage: build-boot.sh   -> prints the directory
source "$(dirname "$0")/common.sh"

KPKG=$(kernel_pkg); [ -n "$KPKG" ] || die "cannot resolve linux-image-amd64 (apt-get update?)"
KVERS=$(candidate "$KPKG") XVERS=$(candidate "$XEN_PKG")
BB=$(dpkg -L busybox-static 2>/dev/null | grep -m1 '/bin/busybox$') || die "busybox-static is not installed"
key=$(hash_inputs "$E2E_DIR/build-boot.sh" "$E2E_DIR/guest-init.sh" "$E2E_DIR/dom0-initramfs-init.sh" "$BB" \
      -- "$KPKG=$KVERS $XEN_PKG=$XVERS")
out=$CACHE/boot-$key
if [ -e "$out/ok" ]; then printf '%s\n' "$out"; exit 0; fi

log "building boot artefacts $out ($KPKG $KVERS, $XEN_PKG $XVERS)"
rm -rf "$out"; mkdir -p "$out/x"
kdeb=$(fetch_deb "$KPKG" "$KVERS"); xdeb=$(fetch_deb "$XEN_PKG" "$XVERS")
dpkg-deb -x "$kdeb" "$out/x"; dpkg-deb -x "$xdeb" "$out/x"
# Debian 13's kernel package ships its modules under usr/lib/modules (merged
# /usr); the host's depmod and modprobe -d look under lib/modules.
if [ ! -d "$out/x/lib/modules" ] && [ -d "$out/x/usr/lib/modules" ]; then
    mkdir -p "$out/x/lib"; mv "$out/x/usr/lib/modules" "$out/x/lib/modules"
fi
kver=$(ls "$out/x/lib/modules"); echo "$kver" > "$out/kver"
gunzip -c "$out/x/boot/xen-$XEN_REL-amd64.gz" > "$out/xen"
cp "$out/x/boot/vmlinuz-$kver" "$out/vmlinuz"
depmod -b "$out/x" "$kver"

# cpio newc archive of a directory, gzipped.
mkcpio() { (cd "$1" && find . -print0 | cpio --null -o -H newc --quiet --owner=0:0) | gzip -9 > "$2"; }

# dom0 initramfs: load virtio-pci, virtio-blk and ext4 (modules, in dependency
# order as modprobe resolves them), mount /dev/vda, switch_root to the dom0 init.
d=$out/dom0-initramfs; mkdir -p "$d"/{bin,proc,sys,dev,newroot,mods}
cp "$BB" "$d/bin/busybox"; ln -s busybox "$d/bin/sh"
: > "$d/mods/order"
for m in virtio_pci virtio_blk ext4; do
    modprobe -d "$out/x" -S "$kver" --show-depends "$m" | sed -n 's/^insmod //p' | while read -r p _; do
        [ -e "$p" ] || p=$out/x$p
        b=$(basename "$p")
        grep -qx "$b" "$d/mods/order" || { cp "$p" "$d/mods/$b"; echo "$b" >> "$d/mods/order"; }
    done
done
cp "$E2E_DIR/dom0-initramfs-init.sh" "$d/init"; chmod +x "$d/init"
mkcpio "$d" "$out/dom0-initrd.gz"

# Guest initramfs: the PV disk and network frontends (PV, PVH and HVM guests
# all use them) and ext4, which mounts the guest's ext2 disk.
g=$out/guest-initramfs; mkdir -p "$g"/{bin,proc,sys,dev,mnt,mods}
cp "$BB" "$g/bin/busybox"; ln -s busybox "$g/bin/sh"
: > "$g/mods/order"
for m in xen-blkfront xen-netfront ext4; do
    modprobe -d "$out/x" -S "$kver" --show-depends "$m" | sed -n 's/^insmod //p' | while read -r p _; do
        [ -e "$p" ] || p=$out/x$p
        b=$(basename "$p")
        grep -qx "$b" "$g/mods/order" || { cp "$p" "$g/mods/$b"; echo "$b" >> "$g/mods/order"; }
    done
done
cp "$E2E_DIR/guest-init.sh" "$g/init"; chmod +x "$g/init"
mkcpio "$g" "$out/guest-initrd.gz"

mv "$out/x/lib/modules/$kver" "$out/modules"
rm -rf "$out/x" "$d" "$g"
touch "$out/ok"
printf '%s\n' "$out"
