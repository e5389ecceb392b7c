# Auto-converge on a real hypervisor (issue 20): sourced by tests-in-dom0.sh
# after tests-pyxl-in-dom0.sh (uses its PYXL, pyxl_list, and result,
# wait_ticks, check_continues, GMAX).
#
# conv1 is a 256 MiB PVH guest without devices whose init rewrites 16 MiB of tmpfs
# without pause (guest-init.sh, e2e_dirty=16): at a 16 MiB/s bandwidth cap its
# memory cannot be copied within a 20 ms downtime, so pyxl migrate
# --auto-converge caps its CPU through the scheduler (credit2's cap, as
# `xl sched-credit2 -d DOM -c CAP`).  A sampler reads the cap with xl while
# the migration runs.  (With 48 MiB of tmpfs a 128 MiB guest ran out of
# memory at boot: tmpfs pages cannot be reclaimed.)
#
#   converge.conv1            pyxl migrate --live --auto-converge succeeded; the
#                             report's throttle is a cap below 100 that xl saw on
#                             the source domain during the migration
#   converge-uncapped.conv1   the guest on the receiving side runs uncapped
#   counter-after-converge.conv1   the counter continues (same boot id)
#   converge-aborted.conv1    a target that cannot be met and --on-fail abort:
#                             exit 1, the source keeps running, its cap lifted

# The domain's scheduler cap (percent of one CPU, 0 = none), as xl prints it.
sched_cap() {  # DOMAIN
    { "$XL" sched-credit2 -d "$1" 2> /dev/null || "$XL" sched-credit -d "$1" 2> /dev/null; } \
        | awk 'NR == 2 {print $NF}'
}
# It starts sampling once precopy has reached iteration 1 (LOG says so): no cap
# can be set before, and an xl call costs dom0 most of a second of its one
# emulated CPU, which conv1's dirtier already halves.  Sampling from the start
# (lane runs 5 and 6: ~0.7 s per call, back to back) left pyxl so little CPU that
# iteration 0 took 140-225 s and the 4.20 runs overran the 300 s bound.
cap_sampler() {  # DOMID FILE LOG: the caps xl reports, one line per sample, until $W/stop-cap-sampler
    local c
    : > "$2"
    until [ -f "$W/stop-cap-sampler" ] || grep -q "iteration 1," "$3" 2> /dev/null; do
        snooze 1
    done
    while [ ! -f "$W/stop-cap-sampler" ]; do
        c=$(sched_cap "$1")
        [ -n "$c" ] && echo "$c" >> "$2"
        snooze 0.2
    done
}
# The lowest non-zero cap a sampler saw (empty if none), and how many samples.
caps_seen() {  # FILE
    awk '$1 > 0 && (m == "" || $1 < m) {m = $1} END {print m}' "$1"
}

# The bound of one converge migration: 256 MiB at a 16 MiB/s cap, with conv1's
# dirtier taking half of dom0's one emulated CPU (run 8: 62 s on 4.17, 159 s on
# 4.20, whose dom0 is slower throughout).
CT=480
converge_migrate() {  # TEST ON_FAIL DOWNTIME_MS ROUNDS: pyxl migrate --auto-converge of conv1; sets RC, D, SAMPLES
    local test=$1 onfail=$2 downtime=$3 rounds=$4 spid
    D=$("$XL" domid conv1 2>/dev/null) || { RC=-1; return; }
    rm -f "$W/stop-cap-sampler"
    : > "$OUT/pyxl-$test.log"
    cap_sampler "$D" "$W/caps-$test" "$OUT/pyxl-$test.log" &
    spid=$!
    timeout $CT "$PYXL" -vv migrate --live --auto-converge --downtime "$downtime" --max-iterations "$rounds" \
        --on-fail "$onfail" --max-bandwidth 16M --json \
        --command "$PYXL -vv migrate-receive" "$D" > "$OUT/pyxl-$test.json" 2> "$OUT/pyxl-$test.log"
    RC=$?
    touch "$W/stop-cap-sampler"; wait "$spid"
    SAMPLES=$(wc -l < "$W/caps-$test")
    cp "$W/caps-$test" "$OUT/caps-$test.txt"
}

converge_phase() {
    cat > "$W/conv1.cfg" <<EOF
name = "conv1"
type = "pvh"
kernel = "$W/vmlinuz"
ramdisk = "$W/guest-initrd.gz"
memory = 256
vcpus = 1
tsc_mode = "native"
on_crash = "preserve"
extra = "console=hvc0 loglevel=4 e2e_dirty=16"
EOF
    scan conv1; GID[conv1]="" GMAX[conv1]=""
    if ! "$XL" create "$W/conv1.cfg" > "$OUT/xl-create-conv1.log" 2>&1 || ! wait_ticks conv1 2 90; then
        result converge.conv1 FAIL "conv1 did not start: $(tail -n 2 "$OUT/xl-create-conv1.log" | tr '\n' ' ') count ${GMAX[conv1]:-none}"
        "$XL" destroy conv1 2> /dev/null
        return
    fi
    grep -q "e2e-info dirtying" "$CONLOG/guest-conv1.log" || say "conv1: no dirtier line on its console"

    local before low throttle after
    scan conv1; RESTARTS=0 REPEATS=0 GAPS=0; before=${GMAX[conv1]}
    converge_migrate converge stop 20 8
    low=$(caps_seen "$W/caps-converge")
    throttle=$(sed -n 's/.*"throttle": *\([0-9]*\).*/\1/p' "$OUT/pyxl-converge.json")
    if [ "$RC" -ne 0 ]; then
        result converge.conv1 FAIL "exit $RC: $(tail -n 2 "$OUT/pyxl-converge.log" | tr '\n' ' ')"
    elif [ -z "$low" ] || [ -z "$throttle" ] || [ "$throttle" -lt 1 ] || [ "$throttle" -ge 100 ]; then
        result converge.conv1 FAIL "no cap seen: report's throttle '${throttle}', lowest cap xl saw '${low}' in $SAMPLES samples"
    else
        timing converge.conv1 pyxl "$(sed -n 's/.*"seconds": *\([0-9.]*\).*/\1/p' "$OUT/pyxl-converge.json")"
        result converge.conv1 PASS "throttle $throttle %, xl saw caps down to $low % during the migration ($SAMPLES samples); $(head -c 200 "$OUT/pyxl-converge.json")"
    fi
    after=$(sched_cap conv1)
    if [ "$("$XL" domid conv1 2> /dev/null)" != "$D" ] && [ "$after" = 0 ]; then
        result converge-uncapped.conv1 PASS "the migrated domain's cap is 0 (xl)"
    else
        result converge-uncapped.conv1 FAIL "conv1: domid $("$XL" domid conv1 2> /dev/null) (was $D), cap '${after}'"
    fi
    check_continues counter-after-converge.conv1 conv1 "$before"

    # A 1 ms target within 3 rounds (a guest's own kernel dirties more than the
    # 4 pages that 1 ms carries at 16 MiB/s), and --on-fail abort: the
    # migration fails and the source runs on, uncapped.
    if [ "$PROFILE" != quick ]; then
        scan conv1; RESTARTS=0 REPEATS=0 GAPS=0; before=${GMAX[conv1]}
        local names; names=$(pyxl_list)
        converge_migrate converge-aborted abort 1 3
        low=$(caps_seen "$W/caps-converge-aborted")
        after=$(sched_cap conv1)
        if [ "$RC" -eq 1 ] && [ "$("$XL" domid conv1 2> /dev/null)" = "$D" ] && [ "$after" = 0 ] \
                && [ "$(pyxl_list)" = "$names" ]; then
            result converge-aborted.conv1 PASS "exit 1 ($(grep -o -m1 'error: .*' "$OUT/pyxl-converge-aborted.log" | head -c 160)); caps seen down to ${low:-none} %, now 0; domains: $names"
        else
            result converge-aborted.conv1 FAIL "exit $RC, domid $("$XL" domid conv1 2> /dev/null) (was $D), cap '${after}', domains $(pyxl_list) (were $names): $(tail -n 2 "$OUT/pyxl-converge-aborted.log" | tr '\n' ' ')"
        fi
        check_continues counter-after-converge-aborted.conv1 conv1 "$before"
    fi
    "$XL" destroy conv1 2> /dev/null
}
