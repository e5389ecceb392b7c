# pyxl's own toolstack on real Xen (issue 9): sourced by tests-in-dom0.sh once
# the guests pv1 and pvh1 run; uses its result/begin_op/check_continues/GMAX.
# Both have their disk and NIC: after every pyxl restore and migration, and
# after every failure the guest survives, its disk counter must continue
# (disk-after-X.G) and dom0 must ping it (net-after-X.G); after a failure that
# destroys a half-made domain, nothing of it may be left (leftovers).
# pyxl (the CLI, /opt/pyxl/bin/pyxl) picks its real-Xen backend by itself
# (/dev/xen/privcmd exists): suspend through control/shutdown + @releaseDomain,
# resume with xc_domain_resume(fast), destroy through libxenctrl + XenStore.
#
#   pyxl-save.G / xl-restore-of-pyxl.G      pyxl save G; the domain is gone; xl restore of that file
#   counter-after-pyxl-save.G               the restored guest counts on (same boot id)
#   pyxl-save-live.pvh1 (+ xl restore)      live pyxl save of the PVH guest
#   pyxl-save-c.G                           pyxl save -c: the guest keeps running
#   pyxl-save-killed.G                      helper SIGKILLed mid-save: pyxl fails (exit 1), the guest
#                                           is resumed and counts on, no file and no extra domain left
#   pyxl-suspend-timeout.pv1                the guest is paused, so never suspends: pyxl fails after its
#                                           30 s suspend timeout, the request is withdrawn, the guest counts on
#   pyxl-restore-of-xl.G                    xl save -> pyxl restore
#   pyxl-save-compressed.pvh1 / pyxl-restore-compressed.pvh1
#                                           pyxl save --compress; inspect checks it; pyxl restore
#   pyxl-migrate-compressed[-to-xl].pvh1    pyxl migrate --compress to pyxl (zstd) and to xl (plain)
#   pyxl-migrate.pvh1                       pyxl migrate --live to pyxl migrate-receive (localhost pipe):
#                                           a new domid, the name back, no --incoming/--migratedaway left
#   pyxl-migrate-to-xl / xl-migrate-to-pyxl.pvh1   the same with xl migrate-receive / xl migrate
#   pyxl-migrate-tls(-receiver).pvh1        the same over TCP with mutual TLS (certificates made by
#                                           boot.sh), after a peer with no certificate was refused
#   pyxl-migrate-killed.pvh1                the receiver's helper SIGKILLed: exit 1, the source runs on
#   pyxl-roundtrip(-save).G, pyxl-restore-killed.G
#                                           pyxl save -> pyxl restore with its helper killed (the
#                                           stream stalled in a FIFO: mid-restore; nothing left) ->
#                                           pyxl restore; the counter continues
PYXL=/opt/pyxl/bin/pyxl
# pyxl runs its default helper (ours); the helper-killed tests run it through a
# wrapper that SIGKILLs it.  PYXL_E2E_HELPER=debian (set here) runs Debian's.
[ "${PYXL_E2E_HELPER:-ours}" = debian ] && export PYXL_SAVE_HELPER=$DEBIAN_REAL
PT=300   # bound for every pyxl command (with devices: 20-60 s each under TCG, more under load)

killing_helper() {  # NAME DELAY: a wrapper of our helper that SIGKILLs it DELAY s after it starts
    cat > "$W/$1" <<EOF
#!/bin/sh
# exec keeps this pid: the helper itself is killed.
( sleep $2; kill -9 \$\$ ) &
exec $OURS_REAL "\$@"
EOF
    chmod +x "$W/$1"
}
pyxl_list() { "$XL" list 2>&1 | awk 'NR>1 {print $1}' | sort | tr '\n' ' '; }
pyxl_timed() {  # LOGNAME pyxl-args...: sets LAST_S, returns pyxl's status
    local logname=$1 t0 rc; shift
    sync
    t0=$(now_us)
    timeout $PT "$PYXL" -vv "$@" > "$OUT/pyxl-$logname.log" 2>&1
    rc=$?
    LAST_S=$(fmt_s $(($(now_us) - t0)))
    say "pyxl $* : rc $rc, $LAST_S s"
    return $rc
}
after_checks() {  # TAG GUEST BEFORE: the guest came back (or stayed): counter, disk, network
    check_continues "counter-after-$1.$2" "$2" "$3"
    check_disk "disk-after-$1.$2" "$2" "$DBEFORE"
    check_net "net-after-$1.$2" "$2"
}
pyxl_save_then_xl_restore() {  # GUEST TAG [pyxl save options...]; xl's helper: $XH (Debian's)
    local g=$1 tag=$2 before d f; shift 2
    f=$W/$g-pyxl-$tag.save
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-save-$tag.$g" FAIL "no domain $g"; return 1; }
    if ! pyxl_timed "save-$tag-$g" save "$@" "$d" "$f"; then
        result "pyxl-save-$tag.$g" FAIL "$(tail -n 3 "$OUT/pyxl-save-$tag-$g.log" | tr '\n' ' ')"
        "$XL" list "$g" > /dev/null 2>&1 || return 1
        return 1
    fi
    local dt=$LAST_S
    if "$XL" list "$d" > /dev/null 2>&1; then
        result "pyxl-save-$tag.$g" FAIL "$LAST_S s, but domain $d still exists after the save"
        return 1
    fi
    timing "pyxl-save-$tag.$g" pyxl "$dt"
    result "pyxl-save-$tag.$g" PASS "$dt s, $(stat -c %s "$f") bytes, domain $d destroyed; left: $(pyxl_list)"
    if ! xl_timed "xl-restore-of-pyxl.$g" "${XH:-debian}" "restore-pyxl-$tag-$g" restore "$f"; then
        result "xl-restore-of-pyxl-$tag.$g" FAIL "$(tail -n 3 "$OUT/xl-restore-pyxl-$tag-$g.log" | tr '\n' ' ')"
        return 1
    fi
    result "xl-restore-of-pyxl-$tag.$g" PASS "$LAST_S s"
    after_checks "pyxl-save-$tag" "$g" "$before"
}
pyxl_checkpoint() {  # GUEST
    local g=$1 before d f=$W/$1-pyxl-c.save
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-save-c.$g" FAIL "no domain $g"; return 1; }
    if pyxl_timed "save-c-$g" save -c "$d" "$f"; then
        timing "pyxl-save-c.$g" pyxl "$LAST_S"
        result "pyxl-save-c.$g" PASS "$LAST_S s, $(stat -c %s "$f") bytes"
        after_checks pyxl-save-c "$g" "$before"
    else
        result "pyxl-save-c.$g" FAIL "$(tail -n 3 "$OUT/pyxl-save-c-$g.log" | tr '\n' ' ')"
    fi
}
pyxl_killed() {  # GUEST DELAY: the helper is SIGKILLed DELAY s after it starts
    local g=$1 delay=$2 before d rc f=$W/$1-pyxl-killed.save listed
    killing_helper helper-killed $delay
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-save-killed.$g" FAIL "no domain $g"; return 1; }
    listed=$(pyxl_list)
    rm -f "$f"
    pyxl_timed "save-killed-$g" save --helper "$W/helper-killed" "$d" "$f"
    rc=$?
    if [ $rc -ne 1 ]; then
        result "pyxl-save-killed.$g" FAIL "pyxl exited $rc, not 1: $(tail -n 2 "$OUT/pyxl-save-killed-$g.log" | tr '\n' ' ')"
    elif [ -e "$f" ]; then
        result "pyxl-save-killed.$g" FAIL "the file $f exists after the failed save"
    elif [ "$(pyxl_list)" != "$listed" ]; then
        result "pyxl-save-killed.$g" FAIL "domains before: $listed, after: $(pyxl_list)"
    else
        result "pyxl-save-killed.$g" PASS "$LAST_S s, exit 1 ($(grep -o -m1 'error: .*' "$OUT/pyxl-save-killed-$g.log" | head -c 160)); domains: $listed"
    fi
    "$XL" list -v > "$OUT/xl-list-after-killed-$g.log" 2>&1
    after_checks pyxl-save-killed "$g" "$before"
}

pyxl_restore() {  # TEST GUEST FILE BEFORE [pyxl restore options...]: pyxl restore, counter continues
    local test=$1 g=$2 f=$3 before=$4 d; shift 4
    if ! pyxl_timed "$test-$g" restore "$@" "$f"; then
        result "$test.$g" FAIL "$(tail -n 3 "$OUT/pyxl-$test-$g.log" | tr '\n' ' ')"
        return 1
    fi
    d=$("$XL" domid "$g" 2>/dev/null)
    timing "$test.$g" pyxl "$LAST_S"
    result "$test.$g" PASS "$LAST_S s, domid ${d:-?}; xl list: $(pyxl_list)"
    { xenstore-ls -fp "/local/domain/$d"; xenstore-ls -fp "$(xenstore-read "/local/domain/$d/vm")";
      xenstore-ls -fp "/libxl/$d"; } > "$OUT/xenstore-$g-after-$test.txt" 2>&1
    after_checks "$test" "$g" "$before"
}
xl_save_pyxl_restore() {  # GUEST: xl save (Debian's helper) -> pyxl restore
    local g=$1 before f=$W/$1-xl-for-pyxl.save
    begin_op "$g"; before=${GMAX[$g]}
    if ! xl_timed "xl-save-for-pyxl.$g" debian "save-for-pyxl-$g" save "$g" "$f"; then
        result "pyxl-restore-of-xl.$g" FAIL "xl save failed: $(tail -n 3 "$OUT/xl-save-for-pyxl-$g.log" | tr '\n' ' ')"
        return 1
    fi
    pyxl_restore pyxl-restore-of-xl "$g" "$f" "$before"
}
pyxl_roundtrip() {  # GUEST: pyxl save -> pyxl restore with the helper killed -> pyxl restore
    local g=$1 before d f=$W/$1-pyxl-roundtrip.save listed rc
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-roundtrip-save.$g" FAIL "no domain $g"; return 1; }
    if ! pyxl_timed "roundtrip-save-$g" save "$d" "$f"; then
        result "pyxl-roundtrip-save.$g" FAIL "$(tail -n 3 "$OUT/pyxl-roundtrip-save-$g.log" | tr '\n' ' ')"
        return 1
    fi
    result "pyxl-roundtrip-save.$g" PASS "$LAST_S s"
    killing_helper helper-killed-r 2
    listed=$(pyxl_list)
    # The stream comes through a FIFO and stalls after its first 16 MiB, so the
    # helper is killed mid-restore whatever the host's speed (from the whole
    # file, a quiet host restored pv1 within the kill's delay: exit 0).
    local fifo=$W/restore-killed.fifo feeder
    rm -f "$fifo"; mkfifo "$fifo"
    ( head -c 16777216 "$f"; exec sleep 120 ) > "$fifo" 2> /dev/null &
    feeder=$!
    pyxl_timed "restore-killed-$g" restore --helper "$W/helper-killed-r" "$fifo"
    rc=$?
    kill "$feeder" 2> /dev/null; wait "$feeder" 2> /dev/null; rm -f "$fifo"
    local left; left=$(leftovers "$g")
    if [ $rc -eq 1 ] && [ "$(pyxl_list)" = "$listed" ] && [ -z "$left" ]; then
        result "pyxl-restore-killed.$g" PASS "$LAST_S s, exit 1, nothing left (domains: $(pyxl_list))"
    else
        result "pyxl-restore-killed.$g" FAIL "exit $rc; domains before: $listed, after: $(pyxl_list); left: ${left:-nothing}"
        "$XL" list "$g" > /dev/null 2>&1 && { result "pyxl-roundtrip.$g" SKIP "restore-killed left $g"; return 1; }
    fi
    pyxl_restore pyxl-roundtrip "$g" "$f" "$before"
}

pyxl_compressed() {  # GUEST: pyxl save --compress -> inspect (checksum OK) -> pyxl restore
    local g=$1 before d f=$W/$1-pyxl.zsave
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-save-compressed.$g" FAIL "no domain $g"; return 1; }
    if ! pyxl_timed "save-compressed-$g" save --compress "$d" "$f"; then
        result "pyxl-save-compressed.$g" FAIL "$(tail -n 3 "$OUT/pyxl-save-compressed-$g.log" | tr '\n' ' ')"
        return 1
    fi
    if ! "$PYXL" inspect "$f" > "$OUT/inspect-compressed-$g.txt" 2>&1 \
            || ! grep -q "checksum OK" "$OUT/inspect-compressed-$g.txt"; then
        result "pyxl-save-compressed.$g" FAIL "inspect: $(tail -n 2 "$OUT/inspect-compressed-$g.txt" | tr '\n' ' ')"
        return 1
    fi
    result "pyxl-save-compressed.$g" PASS "$LAST_S s, $(stat -c %s "$f") bytes (zstd, checksum OK)"
    pyxl_restore pyxl-restore-compressed "$g" "$f" "$before"
}
compressed_as_said() {  # TEST GUEST TEXT: the migration log's summary says TEXT
    if grep -q -- "$3" "$OUT/pyxl-$1-$2.log"; then
        result "$1-summary.$2" PASS "'$3'"
    else
        result "$1-summary.$2" FAIL "no '$3' in: $(grep -m1 'migrated' "$OUT/pyxl-$1-$2.log")"
    fi
}

pyxl_uncooperative() {  # GUEST: a guest that never answers (paused): pyxl save times out
    local g=$1 before d rc f=$W/$1-pyxl-timeout.save listed
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-suspend-timeout.$g" FAIL "no domain $g"; return 1; }
    listed=$(pyxl_list)
    "$XL" pause "$d"
    pyxl_timed "save-timeout-$g" save "$d" "$f"
    rc=$?
    local req; req=$(xenstore-read "/local/domain/$d/control/shutdown" 2>&1)
    "$XL" unpause "$d"
    if [ $rc -eq 1 ] && grep -q "did not suspend within" "$OUT/pyxl-save-timeout-$g.log" \
        && [ -z "$req" ] && [ ! -e "$f" ] && [ "$(pyxl_list)" = "$listed" ]; then
        result "pyxl-suspend-timeout.$g" PASS "$LAST_S s, exit 1 ($(grep -o -m1 'error: .*' "$OUT/pyxl-save-timeout-$g.log" | head -c 160)); request withdrawn"
    else
        result "pyxl-suspend-timeout.$g" FAIL "exit $rc, control/shutdown '$req', $(tail -n 1 "$OUT/pyxl-save-timeout-$g.log")"
    fi
    after_checks pyxl-suspend-timeout "$g" "$before"
}

pyxl_migrate() {  # TEST GUEST SENDER...: a live localhost migration through a pipe; the
    # guest must end up once, under its own name, with a new domid, counting on
    local test=$1 g=$2 before d d2 names; shift 2
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "$test.$g" FAIL "no domain $g"; return 1; }
    local log=$OUT/pyxl-$test-$g.log t0 rc
    sync
    t0=$(now_us)
    timeout $PT "$@" > "$log" 2>&1
    rc=$?
    LAST_S=$(fmt_s $(($(now_us) - t0)))
    say "$test $g: $* : rc $rc, $LAST_S s"
    d2=$("$XL" domid "$g" 2>/dev/null)
    names=$(pyxl_list)
    if [ $rc -ne 0 ]; then
        result "$test.$g" FAIL "exit $rc: $(tail -n 3 "$log" | tr '\n' ' ')"
    elif [ -z "$d2" ] || [ "$d2" = "$d" ]; then
        result "$test.$g" FAIL "domain $g is ${d2:-gone} (was $d); xl list: $names"
    elif echo "$names" | grep -q -- '--incoming\|--migratedaway'; then
        result "$test.$g" FAIL "a migration name is left: $names"
    else
        timing "$test.$g" pyxl "$LAST_S"
        result "$test.$g" PASS "$LAST_S s, domid $d -> $d2; xl list: $names"
    fi
    after_checks "$test" "$g" "$before"
}
pyxl_migrate_tls() {  # GUEST: pyxl migrate to a pyxl migrate-receive on 127.0.0.1, mutual TLS
    local g=$1 tls=$E2E/tls rlog=$OUT/pyxl-migrate-tls-receiver-$1.log rpid port=8102
    # A receiver that listens for a TLS peer named sender.e2e and no other.
    timeout $PT "$PYXL" -vv migrate-receive --listen 127.0.0.1:$port --tls-cert "$tls/receiver.pem" \
        --tls-key "$tls/receiver.key" --tls-ca "$tls/ca.pem" --tls-allow sender.e2e > "$rlog" 2>&1 &
    rpid=$!
    # First a peer without a certificate, sending a save file's bytes: refused, the receiver listens on.
    local i
    for i in $(seq 1 60); do (exec 3<> /dev/tcp/127.0.0.1/$port) 2> /dev/null && break; snooze 1; done
    (exec 3<> /dev/tcp/127.0.0.1/$port && head -c 65536 "$W/pvh1-ours.save" >&3) 2> /dev/null
    pyxl_migrate pyxl-migrate-tls "$g" "$PYXL" -vv migrate --live --tls-cert "$tls/sender.pem" \
        --tls-key "$tls/sender.key" --tls-ca "$tls/ca.pem" --tls-name receiver.e2e \
        "$("$XL" domid "$g")" 127.0.0.1:$port
    wait $rpid
    local rrc=$?
    if [ $rrc -eq 0 ] && ! "$XL" list 2>/dev/null | grep -q -- '--incoming'; then
        result "pyxl-migrate-tls-receiver.$g" PASS "exit 0 after a refused plain peer and the TLS sender"
    else
        result "pyxl-migrate-tls-receiver.$g" FAIL "exit $rrc: $(tail -n 2 "$rlog" | tr '\n' ' ')"
    fi
}
pyxl_migrate_killed() {  # GUEST: the receiver's restore helper is SIGKILLed mid-stream
    local g=$1 before d rc listed log=$OUT/pyxl-migrate-killed-$1.log
    killing_helper helper-killed-m 2
    begin_op "$g"; before=${GMAX[$g]}
    d=$("$XL" domid "$g" 2>/dev/null) || { result "pyxl-migrate-killed.$g" FAIL "no domain $g"; return 1; }
    listed=$(pyxl_list)
    timeout $PT "$PYXL" -vv migrate --live --command "$PYXL migrate-receive --helper $W/helper-killed-m" \
        "$d" > "$log" 2>&1
    rc=$?
    local left; left=$(leftovers)
    if [ $rc -eq 1 ] && [ "$(pyxl_list)" = "$listed" ] && [ "$("$XL" domid "$g" 2>/dev/null)" = "$d" ] \
            && [ -z "$left" ]; then
        result "pyxl-migrate-killed.$g" PASS "exit 1 ($(grep -o -m1 'error: .*' "$log" | head -c 160)); domains: $listed; nothing left"
    else
        result "pyxl-migrate-killed.$g" FAIL "exit $rc; domains before: $listed, after: $(pyxl_list); left: ${left:-nothing}; $(tail -n 2 "$log" | tr '\n' ' ')"
    fi
    after_checks pyxl-migrate-killed "$g" "$before"
}

if [ ! -x "$PYXL" ]; then
    result pyxl.installed FAIL "$PYXL missing"
else
    for g in pv1 pvh1; do
        [ -n "${GMAX[$g]:-}" ] || continue
        "$XL" list "$g" > /dev/null 2>&1 || continue
        d=$("$XL" domid "$g")
        { xenstore-ls -fp "/local/domain/$d"; xenstore-ls -fp "$(xenstore-read "/local/domain/$d/vm")";
          xenstore-ls -fp "/libxl/$d"; xenstore-ls -fp /local/domain/0/backend; } > "$OUT/xenstore-$g-before-pyxl.txt" 2>&1
        cp /var/lib/xen/userdata-d.$d.*.libxl-json "$OUT/" 2>/dev/null
        [ "$PROFILE" = quick ] && [ $g = pvh1 ] || pyxl_killed "$g" 1.5
        pyxl_save_then_xl_restore "$g" plain
        [ "$PROFILE" = quick ] || pyxl_checkpoint "$g"
    done
    if [ -n "${GMAX[pvh1]:-}" ] && [ "$PROFILE" != quick ]; then
        pyxl_save_then_xl_restore pvh1 live --live
    fi
    # pyxl migrate (localhost, live, through a pipe): pyxl to pyxl, pyxl to
    # xl, xl to pyxl; then a failure at the receiver
    if "$XL" list pvh1 > /dev/null 2>&1; then
        pyxl_migrate pyxl-migrate pvh1 "$PYXL" -vv migrate --live --command "$PYXL -vv migrate-receive" \
            "$("$XL" domid pvh1)"
        [ "$PROFILE" != quick ] && pyxl_migrate pyxl-migrate-to-xl pvh1 "$PYXL" -vv migrate --live --command "$XL migrate-receive" \
            "$("$XL" domid pvh1)"
        pyxl_migrate xl-migrate-to-pyxl pvh1 "$XL" -vvv migrate -s "" pvh1 "$PYXL -vv migrate-receive"
        pyxl_migrate_tls pvh1
        [ "$PROFILE" != quick ] && pyxl_migrate_killed pvh1
        # --compress: taken by pyxl's receiver; xl's ignores the offer (its
        # optional flag) and gets the plain rest after 2 s
        pyxl_migrate pyxl-migrate-compressed pvh1 "$PYXL" -vv migrate --live --compress \
            --command "$PYXL -vv migrate-receive" "$("$XL" domid pvh1)"
        compressed_as_said pyxl-migrate-compressed pvh1 "sent, zstd"
        pyxl_migrate pyxl-migrate-compressed-to-xl pvh1 "$PYXL" -vv migrate --live --compress \
            --command "$XL migrate-receive" "$("$XL" domid pvh1)"
        compressed_as_said pyxl-migrate-compressed-to-xl pvh1 "plain: the receiver did not take --compress"
    fi
    "$XL" list pvh1 > /dev/null 2>&1 && pyxl_compressed pvh1
    # a guest that does not cooperate (paused while asked to suspend): 30 s
    [ -n "${GMAX[pv1]:-}" ] && [ "$PROFILE" != quick ] && pyxl_uncooperative pv1
    # pyxl restore into a domain pyxl creates
    for g in pv1 pvh1; do
        [ "$PROFILE" = quick ] && [ $g = pv1 ] && continue
        "$XL" list "$g" > /dev/null 2>&1 || continue
        xl_save_pyxl_restore "$g"
        "$XL" list "$g" > /dev/null 2>&1 || continue
        pyxl_roundtrip "$g"
    done
    "$XL" list > "$OUT/xl-list-after-pyxl.log" 2>&1
fi
