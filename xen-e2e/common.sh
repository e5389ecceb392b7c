# Shared settings and helpers for the xen-e2e lane (sourced, not run).
# shellcheck shell=bash
set -euo pipefail

E2E_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$E2E_DIR/.." && pwd)
CACHE=${XEN_E2E_CACHE:-$E2E_DIR/.cache}
DEBS=$CACHE/debs
# The Xen release under test, and the Debian release its dom0 runs: 4.17 on
# Debian 12 (bookworm), 4.20 on Debian 13 (trixie).  One per invocation of the
# build scripts; run.sh goes through the list in XEN_E2E_XEN.
XEN_REL=${XEN_E2E_XEN:-4.17}
case $XEN_REL in
    4.17) SUITE=bookworm ;;
    4.20) SUITE=trixie ;;
    *) echo "xen-e2e: XEN_E2E_XEN=$XEN_REL: 4.17 or 4.20" >&2; exit 2 ;;
esac
MIRROR=${XEN_E2E_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${XEN_E2E_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
XEN_PKG=xen-hypervisor-$XEN_REL-amd64
HOST_SUITE=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")

log() { printf '[xen-e2e %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# sha256 of the named files' contents plus any extra strings given after "--".
hash_inputs() {
    local f h=""
    while [ $# -gt 0 ] && [ "$1" != "--" ]; do
        h+="$(basename "$1") $(sha256sum < "$1" | cut -c1-64)"$'\n'; shift
    done
    [ $# -gt 0 ] && shift
    h+="$*"
    printf '%s' "$h" | sha256sum | cut -c1-16
}

# apt for $SUITE's packages: the host's own apt when the host runs $SUITE, else
# a private apt configuration under $CACHE (its own lists, the host's keyring),
# so the host's apt state is never touched.  Lists older than a day are renewed.
sapt() {
    if [ "$SUITE" = "$HOST_SUITE" ]; then "$@"; return; fi
    local d=$CACHE/apt-$SUITE
    if [ ! -e "$d/apt.conf" ] || [ -n "$(find "$d/updated" -mmin +1440 2>/dev/null)" ] \
            || [ ! -e "$d/updated" ]; then
        mkdir -p "$d/lists/partial" "$d/archives/partial" "$d/etc/preferences.d"
        printf 'deb %s %s main\ndeb %s %s-updates main\ndeb %s %s-security main\n' \
            "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" "$SECURITY_MIRROR" "$SUITE" > "$d/sources.list"
        cat > "$d/apt.conf" <<EOC
Dir::State "$d";
Dir::State::lists "$d/lists";
Dir::State::status "$d/status";
Dir::Cache "$d";
Dir::Cache::archives "$d/archives";
Dir::Etc::sourcelist "$d/sources.list";
Dir::Etc::sourceparts "-";
Dir::Etc::preferencesparts "$d/etc/preferences.d";
APT::Architecture "amd64";
EOC
        : > "$d/status"
        APT_CONFIG=$d/apt.conf apt-get -q update > "$d/update.log" 2>&1 \
            || { tail -5 "$d/update.log" >&2; die "apt-get update for $SUITE failed"; }
        touch "$d/updated"
    fi
    APT_CONFIG=$d/apt.conf "$@"
}

# The candidate version apt would install from $SUITE.
candidate() { sapt apt-cache policy "$1" | awk '/Candidate:/{print $2}'; }

# Kernel image package behind linux-image-amd64, e.g. linux-image-6.1.0-56-amd64.
kernel_pkg() { sapt apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/{print $2; exit}'; }

# Download one .deb (exact version) into $DEBS once; print its path.
fetch_deb() {
    local pkg=$1 ver=$2 f
    mkdir -p "$DEBS"
    f=$(ls "$DEBS"/"${pkg}"_"${ver//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
    if [ -z "$f" ]; then
        (cd "$DEBS" && sapt apt-get download -q "$pkg=$ver" 2>&1 | grep -v -e unsandboxed -e '^Get:' >&2 || true)
        f=$(ls "$DEBS"/"${pkg}"_"${ver//:/%3a}"_*.deb 2>/dev/null | head -1 || true)
        [ -n "$f" ] || die "could not download $pkg=$ver"
    fi
    printf '%s\n' "$f"
}

# Run a command in a chroot inside a private mount namespace: the bind mounts
# vanish with the process, whatever happens.
in_chroot() {
    local root=$1; shift
    unshare -m --propagation private sh -ec '
        root=$1; shift
        mount -t proc proc "$root/proc"
        mount --rbind /dev "$root/dev"
        mount -t sysfs sys "$root/sys"
        cp -L /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
        exec chroot "$root" env -i HOME=/root PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
            LANG=C.UTF-8 DEBIAN_FRONTEND=noninteractive "$@"
    ' sh "$root" "$@"
}
