#!/bin/bash
# Layer 2 of the dom0 root filesystem: base root + the repository's current
# working tree (git ls-files + untracked, non-ignored files; xen-e2e/ itself is
# left out) built and installed INSIDE the root, in a chroot against Debian's
# python3-dev and libxen-dev with Cython from the base layer's venv:
#     /opt/pyxl/bin/pip install --no-build-isolation --no-index /src/pyxl
# giving /opt/pyxl/bin/pyxl-save-helper and /opt/pyxl/bin/pyxl.  Then dom0's
# init goes in as /sbin/xen-e2e-init and the tree is packed into an ext4 image
# with `mke2fs -d` (no loop mount).  Cached as $CACHE/rootfs-<hash>.img, keyed
# by the base layer, this script, dom0-init.sh and the tree's content.
# A failed helper build does not fail the image: the tests report it.
# Usage: build-rootfs.sh BASE_ROOT   -> prints the image path
source "$(dirname "$0")/common.sh"
BASE=$1
IMG_SIZE=${XEN_E2E_ROOTFS_SIZE:-4G}

mkdir -p "$CACHE"
tree_tar=$CACHE/tree.tar
(cd "$REPO_DIR" && git ls-files -co --exclude-standard -z \
    | while IFS= read -r -d '' f; do
        case $f in xen-e2e/*) continue ;; esac
        [ -f "$f" ] && printf '%s\0' "$f"
      done \
    | tar --null -T - --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf "$tree_tar")
tree_hash=$(sha256sum < "$tree_tar" | cut -c1-16)
key=$(hash_inputs "$E2E_DIR/build-rootfs.sh" "$E2E_DIR/dom0-init.sh" -- "$(basename "$(dirname "$BASE")") $tree_hash $IMG_SIZE")
img=$CACHE/rootfs-$key.img
if [ -e "$img" ]; then rm -f "$tree_tar"; printf '%s\n' "$img"; exit 0; fi

log "building dom0 root image $img (tree $tree_hash)"
stage=$CACHE/rootfs-$key.d
rm -rf "$stage"
t0=$SECONDS
cp -a --reflink=auto "$BASE" "$stage"
mkdir -p "$stage/src/pyxl"
tar -xf "$tree_tar" -C "$stage/src/pyxl"; rm -f "$tree_tar"
blog=$CACHE/rootfs-$key.build.log
if in_chroot "$stage" sh -c 'cd /src/pyxl && /opt/pyxl/bin/pip install -v --no-build-isolation --no-deps --no-index . || exit 1
        /opt/pyxl/bin/pyxl-save-helper --save-domain 3 4 1 0 136 0 < /dev/null > /dev/null 2>&1
        echo "probe: pyxl-save-helper exited $?"' > "$blog" 2>&1; then
    status="built: $(tail -n 1 "$blog") (no hypervisor in the chroot: 255 expected)"
else
    status="FAILED (see $blog)"
fi
[ -x "$stage/opt/pyxl/bin/pyxl-save-helper" ] || status="helper missing after build ($status)"
echo "$status" > "$CACHE/rootfs-$key.helper-status"
log "pyxl in the dom0 root: $status ($((SECONDS - t0)) s)"
rm -rf "$stage/src/pyxl/build"

install -m 755 "$E2E_DIR/dom0-init.sh" "$stage/sbin/xen-e2e-init"
mkdir -p "$stage/mnt/e2e" "$stage/var/lib/xen-e2e"
echo dom0 > "$stage/etc/hostname"
t0=$SECONDS
rm -f "$img.tmp"
mke2fs -q -t ext4 -L dom0root -d "$stage" "$img.tmp" "$IMG_SIZE" >&2 || die "mke2fs -d failed"
mv "$img.tmp" "$img"
log "mke2fs -d: $((SECONDS - t0)) s, $(du -sh --apparent-size "$stage" | cut -f1) in a $IMG_SIZE sparse image"
rm -rf "$stage"
# Keep the two newest images.
ls -t "$CACHE"/rootfs-*.img 2>/dev/null | tail -n +3 | while read -r old; do
    rm -f "$old" "${old%.img}.build.log" "${old%.img}.helper-status"
done
printf '%s\n' "$img"
