# Images across Xen releases (sourced by tests-in-dom0.sh; needs its helpers and
# tests-pyxl-in-dom0.sh's pyxl_timed).  The upgrade direction users take: a
# guest saved on this boot's Xen is restored on the next release's boot.
#
# cross_save (every boot, at the end of the pv1/pvh1 tests): pv1 saved by pyxl,
# pvh1 by xl with Debian's helper, into $OUT/cross/ with each guest's disk
# image (copied after the save: the guest is gone, its disk quiescent) and its
# counters (console boot id and count, disk count).  run.sh hands that
# directory to the next release's boot as $E2E/cross-in.
#
# cross_restore (a boot that has $E2E/cross-in): each image restored by the tool
# that saved it (pyxl restore; xl restore with Debian's helper) on this Xen, then
#   cross-restore-TOOL.G               the restore succeeded
#   counter-after-cross-restore-TOOL.G the same boot of the guest counts on
#   disk-after-cross-restore-TOOL.G    its disk counter continues
#   net-after-cross-restore-TOOL.G     it answers ping on the bridge
# The downgrade direction (XEN_E2E_XEN="4.17 4.20 4.17"): an image whose HVM
# context comes from Xen 4.20.1 or later (pyxl inspect says so) cannot load on
# 4.17; there pyxl restore must fail, say why, and leave nothing:
#   cross-restore-refused.G
# RESULT names carry no release: the summary's per-release lines say where.
X=$OUT/cross

xen_release() { "$XL" info 2>/dev/null | awk '/^xen_version/{print $3}'; }

cross_save() {
    local g tool log ok
    mkdir -p "$X"
    xen_release > "$X/from"
    for pair in "pv1 pyxl" "pvh1 xl"; do
        set -- $pair; g=$1 tool=$2
        "$XL" list $g > /dev/null 2>&1 || continue
        begin_op $g
        ok=0
        # Saved to dom0's disk, then copied to the 9p share: libxc writes guest
        # pages straight from their foreign mappings, which 9p's zero-copy path
        # cannot take (EFAULT, "Bad address", measured).
        if [ $tool = pyxl ]; then
            log=$OUT/pyxl-cross-save-$g.log
            pyxl_timed cross-save-$g save "$("$XL" domid $g)" "$W/$g-$tool-cross.save" && ok=1
        else
            log=$OUT/xl-cross-save-$g.log
            env -u LIBXL_SAVE_HELPER "$XL" save $g "$W/$g-$tool-cross.save" > "$log" 2>&1 && ok=1
        fi
        [ $ok = 1 ] && { mv "$W/$g-$tool-cross.save" "$X/$g-$tool.save" || ok=0; }
        if [ $ok = 0 ]; then
            result "cross-save-$tool.$g" FAIL "$(tail -n 3 "$log" | tr '\n' ' ')"
            continue
        fi
        # The guest is gone: its disk is quiescent, its counters final.
        scan $g
        cp "$W/$g.img" "$X/$g-$tool.img"
        echo "${GID[$g]} ${GMAX[$g]} $(disk_count $g)" > "$X/$g-$tool.state"
        result "cross-save-$tool.$g" PASS "on Xen $(cat "$X/from"): $(cat "$X/$g-$tool.state")"
    done
}

cross_refused() {  # GUEST FILE: pyxl restore on 4.17 of a stream from 4.20.1 or later
    local g=$1 f=$2 rc left
    pyxl_timed cross-refused-$g restore "$f"; rc=$?
    left=$(leftovers $g)
    if [ $rc = 1 ] && grep -q "refused the stream's HVM context" "$OUT/pyxl-cross-refused-$g.log" \
            && ! "$XL" list $g > /dev/null 2>&1 && [ -z "$left" ]; then
        result "cross-restore-refused.$g" PASS "exit 1: $(grep -o "Xen 4.17 refused[^)]*)" "$OUT/pyxl-cross-refused-$g.log" | head -n 1); nothing left"
    else
        result "cross-restore-refused.$g" FAIL "exit $rc; left: ${left:-nothing}; $(tail -n 2 "$OUT/pyxl-cross-refused-$g.log" | tr '\n' ' ')"
    fi
}

cross_restore() {
    local in=$E2E/cross-in from g tool f id max dn ok d
    [ -d "$in" ] || return 0
    from=$(cat "$in/from" 2>/dev/null)
    XEN_RELEASE_HERE=$(xen_release)
    say "images saved on Xen $from, restored on Xen $(xen_release)"
    for pair in "pv1 pyxl" "pvh1 xl"; do
        set -- $pair; g=$1 tool=$2; f=$in/$g-$tool.save
        if [ ! -f "$f" ] || [ ! -f "$in/$g-$tool.state" ]; then
            result "cross-restore-$tool.$g" FAIL "no image of $g saved by $tool on Xen ${from:-?}"
            continue
        fi
        "$XL" destroy $g > /dev/null 2>&1
        cp "$in/$g-$tool.img" "$W/$g.img"
        if [ "${XEN_RELEASE_HERE%.*}" = 4.17 ] && "$PYXL" inspect --json "$f" 2> /dev/null \
                | grep -q 'written by Xen 4.20.1 or later'; then
            # The downgrade direction with a 4.20.1+ HVM context: 4.17 cannot
            # load it.  pyxl must refuse it, say why, and leave nothing.
            cross_refused $g "$f"
            continue
        fi
        read -r id max dn < "$in/$g-$tool.state"
        scan $g                               # what this boot's own $g printed: consumed
        GID[$g]=$id GMAX[$g]=$max RESTARTS=0 REPEATS=0 GAPS=0 DBEFORE=$dn
        ok=0
        if [ $tool = pyxl ]; then
            pyxl_timed cross-restore-$g restore "$f" && ok=1
            [ $ok = 1 ] && timing "cross-restore-pyxl.$g" pyxl "$LAST_S"
        else
            env -u LIBXL_SAVE_HELPER "$XL" restore "$f" > "$OUT/xl-cross-restore-$g.log" 2>&1 && ok=1
        fi
        if [ $ok = 1 ]; then
            result "cross-restore-$tool.$g" PASS "saved by $tool on Xen $from, restored on Xen $(xen_release)"
            after_checks "cross-restore-$tool" $g "$max"
        else
            local log=$OUT/xl-cross-restore-$g.log
            [ $tool = pyxl ] && log=$OUT/pyxl-cross-restore-$g.log
            result "cross-restore-$tool.$g" FAIL "$(tail -n 3 "$log" | tr '\n' ' ')"
        fi
        "$XL" destroy $g > /dev/null 2>&1
    done
    d=$(leftovers)
    [ -z "$d" ] && result "nothing-left.cross" PASS "after the cross-release restores" \
        || result "nothing-left.cross" FAIL "$d"
}
