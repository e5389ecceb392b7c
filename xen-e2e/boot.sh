#!/bin/bash
# One boot of the emulated Xen host: QEMU TCG, one CPU, 2 GiB, Xen (4.17 or 4.20) as the
# multiboot kernel, dom0 kernel + initramfs as modules, the dom0 root on a
# virtio disk (snapshot=on: the cached image stays pristine), and a virtio-9p
# share carrying the tests in and the results out.  Serial console -> serial.log.
# Usage: boot.sh BOOT_DIR ROOTFS_IMG RUN_DIR   (exit 0 iff the tests ran to the end)
source "$(dirname "$0")/common.sh"
BOOT=$1 IMG=$2 RUN=$3
TIMEOUT=${XEN_E2E_BOOT_TIMEOUT:-5400}
# -smap: QEMU 7.2's TCG reads far-return/iret stacks as supervisor accesses,
#        which SMAP blocks: dom0 dies at once.
# -xsave: with XSAVE exposed, Xen context-switches FPU/SSE/AVX state with
#        XSAVE*/XRSTOR, and under QEMU 7.2's TCG dom0's user-space state gets
#        corrupted as soon as guests are scheduled (measured: 183 of 183 LZMA
#        round trips wrong with AVX, 31 of 188 with -avx,-avx2, every one with
#        -xsaveopt; 0 of 106 with -xsave, which makes Xen use FXSAVE/FXRSTOR).
CPU=${XEN_E2E_CPU:-max,-smap,-xsave}

share=$RUN/share
rm -rf "$RUN"; mkdir -p "$share/out"
cp "${XEN_E2E_TESTS:-$E2E_DIR/tests-in-dom0.sh}" "$share/tests-in-dom0.sh"
cp "$BOOT/vmlinuz" "$BOOT/guest-initrd.gz" "$share/"
cp "$E2E_DIR/tests-pyxl-in-dom0.sh" "$E2E_DIR/tests-pyxl-hvm-in-dom0.sh" "$E2E_DIR/tests-cross-in-dom0.sh" \
    "$E2E_DIR/tests-converge-in-dom0.sh" "$share/"
# Images saved on the previous release's boot (run.sh): restored on this one.
if [ -n "${XEN_E2E_CROSS_FROM:-}" ] && [ -d "$XEN_E2E_CROSS_FROM" ]; then
    cp -a "$XEN_E2E_CROSS_FROM" "$share/cross-in"
fi
# XEN_E2E_ONLY_PYXL=1: create the guests, then run only tests-pyxl-in-dom0.sh (debugging).
[ -n "${XEN_E2E_ONLY_PYXL:-}" ] && touch "$share/only-pyxl"
echo "${XEN_E2E_HELPER_ORDER:-debian ours}" > "$share/helper-order"
# XEN_E2E_ROUNDS / XEN_E2E_HVM_ROUNDS: rounds of the xl tests (default 2) and of
# those of the HVM guest (default 1).
[ -n "${XEN_E2E_ROUNDS:-}" ] && echo "$XEN_E2E_ROUNDS" > "$share/rounds"
[ -n "${XEN_E2E_HVM_ROUNDS:-}" ] && echo "$XEN_E2E_HVM_ROUNDS" > "$share/hvm-rounds"
# XEN_E2E_PROFILE=quick: our helper only, one round, no migration of hvm1 and
# fewer pyxl failure tests (CI: a boot in about half the time of the full set).
echo "${XEN_E2E_PROFILE:-full}" > "$share/profile"
# A CA and two host certificates for the TLS migration test (pyxl migrate
# between two pyxl ends, mutual TLS): made here with openssl, valid 2 days.
tls=$share/tls; mkdir -p "$tls"
(
    cd "$tls"
    ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"
    openssl req -x509 $ec -keyout ca.key -out ca.pem -days 2 -subj /CN=e2e-ca \
        -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign,cRLSign
    for n in receiver sender; do
        openssl req $ec -keyout $n.key -out $n.csr -subj /CN=$n.e2e
        printf 'subjectAltName=DNS:%s.e2e\nextendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature\n' $n > $n.ext
        openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out $n.pem -days 2 -extfile $n.ext
    done
) > "$RUN/tls.log" 2>&1 || log "openssl failed (see $RUN/tls.log): the TLS migration test will fail"

XEN_CMDLINE="console=com1 com1=115200,8n1 dom0_mem=1024M,max:1024M dom0_max_vcpus=1"
DOM0_CMDLINE="console=hvc0 earlyprintk=xen loglevel=5"
t0=$SECONDS
set +e
# TMPDIR: the snapshot=on overlay (guest writes: save files) goes next to the run.
TMPDIR=$RUN timeout --foreground -k 10 "$TIMEOUT" qemu-system-x86_64 \
    -accel tcg -cpu "$CPU" -m 2048 -smp 1 \
    -display none -nic none -no-reboot -monitor none \
    -serial "file:$RUN/serial.log" \
    -kernel "$BOOT/xen" -append "$XEN_CMDLINE" \
    -initrd "$BOOT/vmlinuz $DOM0_CMDLINE,$BOOT/dom0-initrd.gz" \
    -drive "file=$IMG,if=virtio,format=raw,snapshot=on" \
    -virtfs "local,path=$share,mount_tag=e2e,security_model=none" \
    > "$RUN/qemu.log" 2>&1
rc=$?
set -e
echo "$((SECONDS - t0))" > "$RUN/boot-seconds"
log "QEMU exited $rc after $((SECONDS - t0)) s (serial log: $RUN/serial.log)"
[ $rc -eq 124 ] && log "boot timed out after $TIMEOUT s"
grep -qx DONE "$share/out/results.txt" 2>/dev/null
