#!/bin/bash
# Layer 1 of the dom0 root filesystem: Debian $SUITE minbase + Xen $XEN_REL tools
# + QEMU for HVM guests (qemu-system-xen) + iproute2/ping/e2fsprogs +
# the toolchain pyxl's helper builds with (python3-dev, libxen-dev, gcc) + a venv (with zstandard)
# at /opt/pyxl holding Cython >= 3.0 from PyPI (bookworm's cython3 is 0.29) +
# the dom0 kernel's modules.  Cached in $CACHE/base-<hash>/root, keyed by this
# script, the Xen tools version and the kernel version.
# Usage: build-base.sh KVER MODULES_DIR   -> prints the base root directory
source "$(dirname "$0")/common.sh"
KVER=$1 MODDIR=$2

# strace and time: diagnostics for the helper comparison (debug scripts).
# qemu-system-xen: the device model of the HVM guest (libxl starts it).
# procps: pgrep/ps, for the tests' QEMU and leftover checks (minbase has neither).
# iproute2: the bridge xenbr0 (dom0-init.sh) and Xen's vif-bridge script.
# iputils-ping: dom0 pings the guests.  e2fsprogs: the guests' disks (mke2fs,
# debugfs, e2fsck).  Xen's block script needs losetup and flock, which minbase
# has (mount, util-linux).
PKGS="xen-utils-$XEN_REL xenstore-utils python3 python3-venv python3-dev libxen-dev gcc libc6-dev kmod strace time
      qemu-system-xen iproute2 iputils-ping e2fsprogs procps"
PKGS=$(echo $PKGS)
key=$(hash_inputs "$E2E_DIR/build-base.sh" -- "$SUITE $KVER $(candidate xen-utils-$XEN_REL) $PKGS")
out=$CACHE/base-$SUITE-$key
if [ -e "$out/ok" ]; then printf '%s\n' "$out/root"; exit 0; fi

log "building dom0 base root $out (debootstrap --variant=minbase $SUITE)"
rm -rf "$out" && mkdir -p "$out" "$CACHE/apt-archives"
root=$out/root
t0=$SECONDS
unshare -m --propagation private \
    debootstrap --variant=minbase --cache-dir="$CACHE/apt-archives" "$SUITE" "$root" "$MIRROR" \
    > "$out/debootstrap.log" 2>&1 || { tail -20 "$out/debootstrap.log" >&2; die "debootstrap failed"; }
log "debootstrap: $((SECONDS - t0)) s"

# Tools from bookworm + bookworm-security (the hypervisor deb comes from the same
# suites, so dom0 tools and hypervisor are the same 4.17.x release).
cat > "$root/etc/apt/sources.list" <<EOS
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $SECURITY_MIRROR $SUITE-security main
EOS
printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' > "$root/etc/apt/apt.conf.d/90norecommends"
# Never start services inside the chroot.
printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
t0=$SECONDS
in_chroot "$root" sh -ec "apt-get -q update >/dev/null && apt-get -y -q install $PKGS >/dev/null && apt-get clean" \
    > "$out/apt.log" 2>&1 || { tail -20 "$out/apt.log" >&2; die "apt-get install in chroot failed"; }
log "apt-get install ($PKGS): $((SECONDS - t0)) s"

t0=$SECONDS
# pip trusts the host's CA bundle (the same one the host's own pip uses).
ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
cp "$ca" "$root/tmp/host-ca.crt"
in_chroot "$root" env PIP_CERT=/tmp/host-ca.crt sh -ec "python3 -m venv /opt/pyxl && /opt/pyxl/bin/pip install -q --disable-pip-version-check 'Cython>=3.0' 'setuptools>=77' wheel 'zstandard>=0.19'" \
    > "$out/pip.log" 2>&1 || { tail -20 "$out/pip.log" >&2; die "pip install Cython in chroot failed"; }
rm -f "$root/tmp/host-ca.crt"
log "venv + Cython, zstandard (--compress) from PyPI: $((SECONDS - t0)) s ($(in_chroot "$root" /opt/pyxl/bin/cython --version 2>&1))"

# dom0 kernel modules (xenfs, privcmd, evtchn, gntdev, 9p, virtio, ext4, ...).
mkdir -p "$root/lib/modules"
cp -a "$MODDIR" "$root/lib/modules/$KVER"
rm -rf "$root/usr/share/doc" "$root/usr/share/man" "$root/usr/share/locale" "$root/var/lib/apt/lists/"*
touch "$out/ok"
for old in "$CACHE"/base-"$SUITE"-*/; do old=${old%/}; [ "$old" = "$out" ] || rm -rf "$old"; done
printf '%s\n' "$root"
