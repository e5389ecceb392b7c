# pyxl's own toolstack on the HVM guest hvm1 (Debian's QEMU as device model, a
# disk and a NIC): sourced by tests-in-dom0.sh after the PV/PVH pyxl tests; uses
# its create_guest/begin_op/check_continues/check_disk/check_net/xl_timed and
# tests-pyxl-in-dom0.sh's pyxl_timed.
#
#   pyxl-save.hvm1 / xl-restore-of-pyxl.hvm1   pyxl save (QEMU's state through QMP into the
#                                              stream's EMULATOR_CONTEXT) -> xl restore
#   pyxl-inspect.hvm1-emulator                 the file has an EMULATOR_CONTEXT record
#   pyxl-restore-of-xl.hvm1                    xl save -> pyxl restore: pyxl builds the HVM
#                                              domain, its disk and NIC, starts QEMU on the
#                                              saved state, unpauses once QEMU runs
#   pyxl-roundtrip.hvm1                        pyxl save -> pyxl restore
#   pyxl-migrate.hvm1                          pyxl migrate --live -> pyxl migrate-receive
#   {counter,disk,net}-after-X.hvm1            the guest counts on, on its console and its
#                                              disk, and answers ping across xenbr0
#   nothing-left.hvm1                          after xl destroy of the pyxl-restored guest: no
#                                              QEMU, loop device (of any copy), backend or tap left
# QEMU under TCG on a loaded host can take more than libxl's 60 s to start,
# and a pyxl restore of hvm1 then more than the 120 s bound of the PV/PVH
# tests (seen: killed at 120 s while dom0 ran slowly; verify-stream-v2 took
# 91 s there instead of 12).
export PYXL_DM_START_TIMEOUT=300
PT=480
pyxl_hvm_after() {  # TAG BEFORE DISK_BEFORE: the checks after hvm1 came back
    check_continues "counter-after-$1.hvm1" hvm1 "$2"
    check_disk "disk-after-$1.hvm1" hvm1 "$3"
    check_net "net-after-$1.hvm1" hvm1
}
pyxl_hvm_phase() {
    local g=hvm1 d f before dbefore xh=debian
    # quick (no xl phase of hvm1): xl's save and restore here run our helper
    [ "$PROFILE" = quick ] && [ $OURS_OK = 1 ] && xh=ours
    say "== pyxl tests of hvm1"
    if ! create_guest hvm1; then
        return 1
    fi
    # 1. pyxl save -> xl restore
    f=$W/hvm1-pyxl.save
    begin_op $g; before=${GMAX[$g]}; dbefore=$(disk_count $g)
    d=$("$XL" domid $g)
    if pyxl_timed save-hvm1 save "$d" "$f"; then
        timing "pyxl-save.hvm1" pyxl "$LAST_S"
        result "pyxl-save.hvm1" PASS "$LAST_S s, $(stat -c %s "$f") bytes"
        if "$PYXL" inspect --json "$f" > "$OUT/pyxl-inspect-hvm1.json" 2>&1 \
                && grep -q '"EMULATOR_CONTEXT"' "$OUT/pyxl-inspect-hvm1.json"; then
            result "pyxl-inspect.hvm1-emulator" PASS "the stream carries QEMU's state"
        else
            result "pyxl-inspect.hvm1-emulator" FAIL "$(head -c 300 "$OUT/pyxl-inspect-hvm1.json" | tr '\n' ' ')"
        fi
        if xl_timed "xl-restore-of-pyxl.hvm1" $xh "restore-pyxl-hvm1" restore "$f"; then
            result "xl-restore-of-pyxl.hvm1" PASS "$LAST_S s"
            pyxl_hvm_after pyxl-save "$before" "$dbefore"
        else
            result "xl-restore-of-pyxl.hvm1" FAIL "$(tail -n 3 "$OUT/xl-restore-pyxl-hvm1.log" | tr '\n' ' ')"
        fi
    else
        result "pyxl-save.hvm1" FAIL "$(tail -n 3 "$OUT/pyxl-save-hvm1.log" | tr '\n' ' ')"
    fi
    "$XL" list $g > /dev/null 2>&1 || return 1
    # 2. xl save -> pyxl restore
    f=$W/hvm1-xl-$xh.save     # -ours: checked by Debian's verify-stream-v2 at the end
    begin_op $g; before=${GMAX[$g]}; dbefore=$(disk_count $g)
    if ! xl_timed "save.hvm1" $xh "save-for-pyxl-hvm1" save $g "$f"; then
        result "pyxl-restore-of-xl.hvm1" FAIL "xl save failed: $(tail -n 3 "$OUT/xl-save-for-pyxl-hvm1.log" | tr '\n' ' ')"
        return 1
    fi
    if pyxl_timed restore-xl-hvm1 restore "$f"; then
        timing "pyxl-restore.hvm1" pyxl "$LAST_S"
        result "pyxl-restore-of-xl.hvm1" PASS "$LAST_S s, domain $(tail -n 1 "$OUT/pyxl-restore-xl-hvm1.log")"
        pyxl_hvm_after pyxl-restore "$before" "$dbefore"
    else
        result "pyxl-restore-of-xl.hvm1" FAIL "$(tail -n 4 "$OUT/pyxl-restore-xl-hvm1.log" | tr '\n' ' ')"
        "$XL" list > "$OUT/xl-list-after-pyxl-hvm1-restore.log" 2>&1
        return 1
    fi
    # 3. pyxl save -> pyxl restore
    f=$W/hvm1-pyxl2.save
    begin_op $g; before=${GMAX[$g]}; dbefore=$(disk_count $g)
    d=$("$XL" domid $g)
    if pyxl_timed save2-hvm1 save "$d" "$f" && pyxl_timed restore2-hvm1 restore "$f"; then
        result "pyxl-roundtrip.hvm1" PASS "save + restore, $LAST_S s for the restore"
        pyxl_hvm_after pyxl-roundtrip "$before" "$dbefore"
    else
        result "pyxl-roundtrip.hvm1" FAIL "$(tail -n 3 "$OUT"/pyxl-save2-hvm1.log "$OUT"/pyxl-restore2-hvm1.log 2>/dev/null | tr '\n' ' ')"
    fi
    # 4. pyxl migrate --live (localhost, through a pipe) to pyxl migrate-receive:
    #    QEMU's dirty tracking through QMP during precopy, its state in the
    #    stream, the receiver's QEMU on it; the disk shared by both copies
    #    (same /vm/UUID) until the source is destroyed.
    if "$XL" list $g > /dev/null 2>&1; then
        dbefore=$(disk_count $g)
        # Under TCG the receiver's disk and NIC scripts and QEMU's start take
        # minutes, not the 60 s the deadlines default to.
        PT=400 pyxl_migrate pyxl-migrate hvm1 "$PYXL" -vv migrate --live --handshake-timeout 300 \
            --command "$PYXL -vv migrate-receive --idle-timeout 300" "$("$XL" domid $g)"
        check_disk "disk-after-pyxl-migrate.hvm1" hvm1 "$dbefore"
        check_net "net-after-pyxl-migrate.hvm1" hvm1
    fi
    # 5. Destroy the pyxl-restored guest: nothing of it may be left.
    d=$("$XL" domid $g 2>/dev/null) || return 1
    xenstore-ls -fp "/local/domain/0/device-model/$d" > "$OUT/xenstore-hvm1-dm-before-destroy.txt" 2>&1
    "$XL" destroy $g > "$OUT/xl-destroy-pyxl-hvm1.log" 2>&1
    local left=""
    pgrep -f "xen-domid $d " > /dev/null && left="$left QEMU;"
    [ -n "$(loop_of $g)" ] && left="$left loop $(loop_of $g);"
    xenstore-exists "/local/domain/0/device-model/$d" 2>/dev/null && left="$left device-model node;"
    xenstore-exists "/local/domain/0/backend/vbd/$d" 2>/dev/null && left="$left vbd backend;"
    xenstore-exists "/local/domain/0/backend/vif/$d" 2>/dev/null && left="$left vif backend;"
    ip link show "vif$d.0-emu" > /dev/null 2>&1 && left="$left tap vif$d.0-emu;"
    # pyxl's own destroys (after each pyxl save) ran the block script's
    # "remove" too: no loop device of an earlier copy may be left either.
    if [ -z "$left" ]; then
        result "nothing-left.hvm1" PASS "after xl destroy of the pyxl-restored hvm1 (QEMU, loop, XenStore, tap)"
    else
        result "nothing-left.hvm1" FAIL "left:$left"
    fi
    echo "left:${left:- nothing}" > "$OUT/pyxl-hvm1-destroy-leftovers.txt"
}
pyxl_hvm_phase
