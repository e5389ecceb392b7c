#!/bin/bash
# `make xen-e2e`: boot Xen in QEMU (TCG) -- 4.17 with a Debian 12 dom0, then 4.20
# with a Debian 13 dom0 -- and run real libxl (Debian's xl) against OUR save
# helper and Debian's, and pyxl's own toolstack, on a real hypervisor, the same
# tests on both.  See README.md.
#
# Environment:
#   XEN_E2E_XEN="4.17 4.20" the Xen releases to boot, in turn (default both); the
#                           summary has a RESULTS line per release and one overall;
#                           guests saved on one release are restored on the next
#                           (tests-cross-in-dom0.sh)
#   XEN_E2E_CROSS_FROM=DIR  (one release) restore the images in DIR (a cross/ of
#                           an earlier run's out/) on this one
#   XEN_E2E_RUNS=N          boots (each a full test run) in this invocation (default 1)
#   XEN_E2E_BOOT_TIMEOUT=S  bound on one boot (default 5400)
#   XEN_E2E_CACHE=DIR       cache directory (default xen-e2e/.cache)
#   XEN_E2E_TESTS=FILE      run FILE in dom0 instead of tests-in-dom0.sh (debugging)
#   XEN_E2E_PROFILE=quick   the CI subset (see tests-in-dom0.sh); default full
#   XEN_E2E_BUDGET=S        bound on all boots together, retries included: a retry
#                           gets what is left, and none if under 600 s are left
# Exit status: 0 iff every run finished and no test failed.
set -euo pipefail
RELEASES=${XEN_E2E_XEN:-4.17 4.20}
if [ "$(echo $RELEASES | wc -w)" -gt 1 ]; then
    # One invocation per release (each builds its own boot artefacts and dom0
    # root, and prints its own summary), then one summary over all of them.
    list=$(mktemp); t0=$SECONDS; status=0; per=""
    cross=""
    for rel in $RELEASES; do
        s0=$SECONDS
        # The previous release's saved images go to this one (upgrade direction).
        XEN_E2E_XEN=$rel XEN_E2E_RESULTS_LIST=$list XEN_E2E_CROSS_FROM=$cross bash "$0" || status=1
        last=$(tail -n 1 "$list"); cross=$(dirname "${last#*=}")/cross
        per+="  xen-$rel: $((SECONDS - s0)) s"$'\n'
    done
    echo
    echo "================ xen-e2e summary: Xen $(echo $RELEASES | sed 's/ / and /g') ================"
    python3 "$(dirname "$0")/summarize.py" $(cat "$list") || status=1
    rm -f "$list"
    echo
    printf 'wall time per release:\n%s' "$per"
    echo "total wall time: $((SECONDS - t0)) s"
    exit $status
fi
source "$(dirname "$0")/common.sh"
START=$SECONDS
RUNS=${XEN_E2E_RUNS:-1}
phase() { PH_NAME=$1; PH_T0=$SECONDS; log "== $1"; }
PHASES=""
endphase() { PHASES+="$(printf '  %-44s %4d s' "$PH_NAME" $((SECONDS - PH_T0)))"$'\n'; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mke2fs -d of a root-owned tree)"

phase "host packages"
HOST_PKGS="qemu-system-x86 debootstrap e2fsprogs cpio busybox-static kmod xz-utils"
missing=$(for p in $HOST_PKGS; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"; done)
if [ -n "$missing" ] || [ -z "$(candidate "$XEN_PKG")" ]; then
    apt-get update -qq
fi
if [ -n "$missing" ]; then
    log "apt-get install $missing"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing > /dev/null
fi
endphase

phase "boot artefacts (xen, kernel, initrds)"
BOOT=$("$E2E_DIR/build-boot.sh")
endphase
phase "dom0 base root (debootstrap, apt, Cython)"
BASE=$("$E2E_DIR/build-base.sh" "$(cat "$BOOT/kver")" "$BOOT/modules")
endphase
phase "dom0 root image (pyxl built inside)"
IMG=$("$E2E_DIR/build-rootfs.sh" "$BASE")
endphase
log "pyxl in the dom0 root: $(cat "${IMG%.img}.helper-status" 2>/dev/null || echo unknown)"

stamp=$(date +%Y%m%d-%H%M%S)
BOOTS_T0=$SECONDS
# One boot's bound: XEN_E2E_BOOT_TIMEOUT, cut to what is left of XEN_E2E_BUDGET.
boot_timeout() {
    local t=${XEN_E2E_BOOT_TIMEOUT:-5400}
    if [ -n "${XEN_E2E_BUDGET:-}" ]; then
        local left=$((XEN_E2E_BUDGET - (SECONDS - BOOTS_T0)))
        [ "$left" -lt "$t" ] && t=$left
    fi
    echo "$t"
}
RETRIES=0 FAILED_RUNS=0 ALLRES=""
for i in $(seq 1 "$RUNS"); do
    phase "run $i/$RUNS: boot + tests"
    run=$CACHE/runs/$stamp-xen$XEN_REL-$i
    # Alternate which helper goes first: odd runs Debian's, even runs ours.
    export XEN_E2E_HELPER_ORDER="debian ours"; [ $((i % 2)) = 0 ] && XEN_E2E_HELPER_ORDER="ours debian"
    if ! XEN_E2E_BOOT_TIMEOUT=$(boot_timeout) "$E2E_DIR/boot.sh" "$BOOT" "$IMG" "$run"; then
        left=$(boot_timeout)
        if [ "$left" -lt 600 ]; then
            FAILED_RUNS=$((FAILED_RUNS + 1))
            log "run $i did not finish; no retry: $left s left of XEN_E2E_BUDGET"
        else
            RETRIES=$((RETRIES + 1))
            log "run $i did not finish: retrying the whole boot once (first attempt kept in $run.attempt1)"
            rm -rf "$run.attempt1"; mv "$run" "$run.attempt1"
            XEN_E2E_BOOT_TIMEOUT=$left "$E2E_DIR/boot.sh" "$BOOT" "$IMG" "$run" \
                || { FAILED_RUNS=$((FAILED_RUNS + 1)); log "run $i failed twice"; }
        fi
    fi
    endphase
    ALLRES+=" $XEN_REL=$run/share/out/results.txt"
    [ -n "${XEN_E2E_RESULTS_LIST:-}" ] && echo "$XEN_REL=$run/share/out/results.txt" >> "$XEN_E2E_RESULTS_LIST"
    log "results: $run/share/out/ (serial console: $run/serial.log)"
done
# Keep the 8 newest run directories.
ls -dt "$CACHE"/runs/*/ 2>/dev/null | tail -n +9 | xargs -r rm -rf

echo
echo "================ xen-e2e summary: Xen $XEN_REL ================"
echo "Xen: $(basename "$BOOT") kernel $(cat "$BOOT/kver"); dom0 root: $(basename "$IMG")"
echo "pyxl helper build in dom0 root: $(cat "${IMG%.img}.helper-status" 2>/dev/null)"
status=0
python3 "$E2E_DIR/summarize.py" $ALLRES || status=$?
echo
echo "phases:"
printf '%s' "$PHASES"
echo "whole-boot retries: $RETRIES; runs failed even after the retry: $FAILED_RUNS"
echo "total wall time: $((SECONDS - START)) s"
exit $status
