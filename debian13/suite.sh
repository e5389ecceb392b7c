#!/bin/bash
# The test suite against Xen 4.20's libraries: `make test` inside a Debian 13
# (trixie) root built from Debian's packages, on this Debian 12 machine.
#
# Why a root and not the host: Debian 13 ships Xen 4.20 (libxenmisc4.20:
# libxenctrl.so.4.20, domctl interface 0x17) and Python 3.13; the helper,
# fakexen and the ctypes backend must build and pass against those as they do
# against Debian 12's 4.17 and 3.11.  No hypervisor is involved: fakexen stands
# in for Xen 4.20 beneath the real 4.20 libxenctrl, Debian 13's own
# libxl-save-helper runs against it in the cross-helper tests.
#
# The root (debootstrap minbase + the packages below) is cached by the content
# of this script in $DEBIAN13_CACHE (default .cache/debian13 in the tree); the
# tree under test is copied in fresh each run (tracked and untracked files, no
# build output).  Needs root (unshare -m, chroot), debootstrap, and Debian's and
# PyPI's archives.  Usage: debian13/suite.sh [pytest args...]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd); tree=$(dirname "$here")
cache=${DEBIAN13_CACHE:-$tree/.cache/debian13}
mirror=${DEBIAN13_MIRROR:-http://deb.debian.org/debian}
security=${DEBIAN13_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
# What `make test` needs in the root: make's own apt step finds these present.
pkgs="xen-utils-4.20 libxen-dev valgrind python3 python3-venv python3-dev gcc libc6-dev make
      openssl iproute2 procps ca-certificates git binutils"
pkgs=$(echo $pkgs)
log() { printf '[debian13 %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

command -v debootstrap >/dev/null || {
    log "apt-get install debootstrap"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap
}
key=$(cat "$0" | sha256sum | cut -c1-16)
root=$cache/root-$key
if [ ! -e "$root.ok" ]; then
    rm -rf "$cache" && mkdir -p "$cache"
    t0=$SECONDS
    log "building the Debian 13 root $root"
    unshare -m --propagation private debootstrap --variant=minbase trixie "$root" "$mirror" \
        > "$cache/debootstrap.log" 2>&1 || { tail -20 "$cache/debootstrap.log" >&2; exit 1; }
    printf 'deb %s trixie main\ndeb %s trixie-updates main\ndeb %s trixie-security main\n' \
        "$mirror" "$mirror" "$security" > "$root/etc/apt/sources.list"
    printf 'APT::Install-Recommends "false";\nAPT::Install-Suggests "false";\n' \
        > "$root/etc/apt/apt.conf.d/90norecommends"
    printf '#!/bin/sh\nexit 101\n' > "$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"
    cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
    unshare -m --propagation private sh -ec "mount -t proc proc '$root/proc'; mount --rbind /dev '$root/dev';
        chroot '$root' sh -ec 'apt-get -q update && DEBIAN_FRONTEND=noninteractive apt-get -y -q install $pkgs && apt-get clean'" \
        > "$cache/apt.log" 2>&1 || { tail -20 "$cache/apt.log" >&2; exit 1; }
    touch "$root.ok"
    log "root built in $((SECONDS - t0)) s"
fi
# pip inside trusts what the host's pip trusts (an archive proxy's CA, if any).
ca=$(python3 -m pip config get global.cert 2>/dev/null || true)
[ -f "$ca" ] || ca=/etc/ssl/certs/ca-certificates.crt
cp "$ca" "$root/etc/ssl/host-ca.crt"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
# The tree under test, fresh (its .venv is kept between runs: make setup
# rebuilds what changed).
# Its git metadata too (a clone's: HEAD is this tree's), so that the bench
# records the commit it measured.
mkdir -p "$root/src/pyxl"
find "$root/src/pyxl" -mindepth 1 -maxdepth 1 ! -name .venv -exec rm -rf {} +
git clone -q --no-checkout "$tree" "$cache/clone" && mv "$cache/clone/.git" "$root/src/pyxl/.git"
rm -rf "$cache/clone"
(cd "$tree" && git ls-files -co --exclude-standard -z | tar --null -T - -cf -) | tar -C "$root/src/pyxl" -xf -
# /tmp on the disk, as the host's: the suite's tmp_path files add up to 12 GiB
# (pytest keeps every test's until the session ends), more than a RAM-backed
# tmpfs takes (half the RAM by default; CI run 29 ran out at 97 %).
rm -rf "$cache/tmp" && mkdir -m 1777 "$cache/tmp"
log "make test in Debian 13 (Xen $(ls "$root"/usr/lib/x86_64-linux-gnu/libxenctrl.so.4.* | sed -n 's/.*libxenctrl.so.\(4\.[0-9]*\)$/\1/p'), $(chroot "$root" python3 --version))"
args=$(printf ' %q' "$@")
# A passed run's files are removed; a failed run's stay to be looked at (to the next run).
status=0
# The root bind-mounted on itself: a mount point, as \`ip netns\` needs its / to be
# (the namespace tests move veth ends with \`ip -n\`).
unshare -m --propagation private sh -ec "
    mount --bind '$root' '$root'
    mount -t proc proc '$root/proc'; mount --rbind /dev '$root/dev'
    mount -t tmpfs -o mode=1777 tmpfs '$root/dev/shm'; mount --bind '$cache/tmp' '$root/tmp'
    mount -t tmpfs tmpfs '$root/run'
    exec chroot '$root' env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 PIP_CERT=/etc/ssl/host-ca.crt PIP_DISABLE_PIP_VERSION_CHECK=1 \
        sh -ec 'cd /src/pyxl && make test PYTEST_ARGS=\"$args\"'" || status=$?
[ "$status" != 0 ] || rm -rf "$cache/tmp"
exit "$status"
