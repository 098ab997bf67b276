# shellcheck shell=bash
# shellcheck disable=SC2154,SC2034  # (variables set by the caller, and for it)
# Shared by scripts/lib/bench-run and scripts/lib/soak-run: boot the test guest with one VMM on the test
# network's macvtap, talk to it, stop it. Source it after common.sh and `eval "$(scripts/lib/testnet up
# NAME)"`; it defines functions only. The caller sets:
#   work           a private directory (console.log, vmm.out, vmm.err, vmm.log and the marker pipe go there)
#   tapir kernel initrd cpus mem_mib guest_cmdline (guest_kernel KIND sets kernel and qemu_acpi)
#   and optionally qemu_extra, an array of further QEMU arguments (e.g. a QMP socket), tapir_net,
#   Tapir's --net SPEC (default fd=3, the test network's macvtap; another SPEC gets /dev/null as fd 3),
#   qemu_tap, QEMU's tap netdev options (default fd=3; e.g. ifname=tap0,script=no,downscript=no
#   for a tap on a Linux bridge, when fd 3 is /dev/null for QEMU too), and vmm_start_trace and
#   vmm_start_marker: a tracefs instance directory whose trace_marker gets vmm_start_marker written
#   just before the VMM starts
# VMMs: tapir (--net fd=3), tapir-vhost (--net fd=3,vhost=on), qemu (microvm, virtio-net-device,
# vhost=off), qemu-vhost (vhost=on), qemu-vu (QEMU's vhost-user netdev, its guest RAM a shared memfd,
# served by Tapir's vhost-user-net daemon, started first; its pid in helper_pid), tapir-vu (Tapir's
# --net vhost-user= on the same daemon); each gets the macvtap as fd 3 opened on the same /dev/tapN
# (the daemon in the -vu cases; qemu-vu-cUS: qemu-vu with the daemon's coalesce=US, qemu-vu-nc: with
# coalesce=0).

qemu_extra=()
helper_pid=
tapir_net=fd=3
qemu_tap=fd=3
qemu_acpi=off qemu_rtc=off

# guest_kernel KIND: the guest for KIND (test: guest-images/out/bzImage; debian, debian-cloud,
# debian-rt: that stock kernel from guest-images/build --kernel KIND): sets kernel, initrd_base (the
# initramfs guest-images/with-script adds to), kernel_symbols (for naming initcalls), qemu_acpi (a
# stock kernel finds its virtio-mmio NIC only in QEMU microvm's ACPI tables, as in Tapir's) and
# qemu_rtc (microvm's default, on, for a stock kernel: QEMU's FADT does not say there is no CMOS RTC,
# and with rtc=off Linux's rtc_cmos spent 3.3 s probing the empty ports, a cost of the options, not
# of QEMU; Tapir's FADT says so and has no RTC).
guest_kernel() {
    case "$1" in
        test)
            kernel=guest-images/out/bzImage initrd_base=guest-images/out/initramfs.cpio.gz
            kernel_symbols=guest-images/out/vmlinux qemu_acpi=off qemu_rtc=off ;;
        debian|debian-cloud|debian-rt)
            kernel=guest-images/out/$1/vmlinuz initrd_base=guest-images/out/$1/initramfs.cpio.gz
            kernel_symbols=guest-images/out/$1/System.map qemu_acpi=on qemu_rtc=on ;;
        *) die "unknown guest kernel: $1 (test, debian, debian-cloud or debian-rt)" ;;
    esac
    [ -f "$kernel" ] && [ -f "$initrd_base" ] || die "no $kernel: run guest-images/build$([ "$1" = test ] || echo " --kernel $1")"
}

in_peer() { ip netns exec "$PEER_NS" "$@"; }

# check_vmm VMM: dies unless VMM is one this host can run.
check_vmm() {
    case "$1" in
        tapir|tapir-acpi-off|tapir-4k|tapir-vu|qemu|qemu-vu|qemu-vu-nc) ;;
        qemu-vu-c*) [[ "$1" =~ ^qemu-vu-c[0-9]+$ ]] || die "unknown VMM: $1 (qemu-vu-cUS takes a number of microseconds)" ;;
        qemu-vhost|tapir-vhost) [ -c /dev/vhost-net ] || die "$1 needs /dev/vhost-net" ;;
        *) die "unknown VMM: $1 (tapir, tapir-vhost, tapir-vu, tapir-acpi-off, tapir-4k, qemu, qemu-vhost, qemu-vu, qemu-vu-cUS or qemu-vu-nc)" ;;
    esac
}

# The guest's /tapir/run for the bench and the soak: an HTTP server with /cgi-bin/counters (the virtio
# interrupts summed over CPUs, then eth0's received and sent frames) and an iperf3 server.
write_guest_script() { # FILE
    cat >"$1" <<'GUEST'
mkdir -p /www/cgi-bin
cat >/www/cgi-bin/counters <<'CGI'
#!/bin/sh
echo "Content-Type: text/plain"
echo
awk '/virtio/ { for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i } END { print n + 0 }' /proc/interrupts
cat /sys/class/net/eth0/statistics/rx_packets /sys/class/net/eth0/statistics/tx_packets
CGI
chmod +x /www/cgi-bin/counters
httpd -p 80 -h /www
iperf3 -s >/dev/null 2>&1 &
while :; do sleep 3600; done
GUEST
}

# The measuring functions live in scripts/lib/benchmeasure.py (unit-tested); these call it.
benchmeasure() { /usr/bin/python3 scripts/lib/benchmeasure.py "$@"; }

# RSS of PID outside mappings at least as large as guest RAM, in KiB.
rss_outside_guest() { benchmeasure rss "$1" "$mem_mib"; }

guest_counters_raw() { # the guest's counters CGI's body
    # (timeout, not wget's -T: Debian 12's static busybox wget crashes with -T)
    in_peer timeout 10 busybox wget -q -O - "http://$GUEST_IP/cgi-bin/counters"
}

guest_counters() { # -> "virtio_interrupts eth0_frames" (received and sent) from the guest
    local body
    body=$(guest_counters_raw) && benchmeasure guest-counters <<<"$body"
}

# answers: the guest answers the peer, over HTTP or else to a ping.
answers() {
    guest_counters >/dev/null 2>&1 || in_peer busybox ping -c 2 -W 2 "$GUEST_IP" >/dev/null 2>&1
}

# answers_within SECONDS: the guest answers within SECONDS; 1 at once when the VMM is gone.
answers_within() {
    local end=$((SECONDS + $1))
    while :; do
        answers && return 0
        kill -0 "$vmm_pid" 2>/dev/null || return 1
        [ "$SECONDS" -lt "$end" ] || return 1
        sleep 1
    done
}

# start_vmm VMM: boots the guest; sets vmm_pid and boot_s (seconds from start to the boot marker).
# Returns 1 (after a log line) when no marker comes within 60 s.
start_vmm() {
    local vmm=$1 t0 t1 line='' c
    rm -f "$work/mark" "$work/console.log" "$work/vmm.out" "$work/vmm.err" "$work/vmm.log" "$work/helper.log"
    mkfifo "$work/mark"
    if [[ "$vmm" == *-vu* ]]; then
        [ "$qemu_tap" = fd=3 ] || { log "$vmm runs on the macvtap only"; return 1; }
        start_helper || return 1
    fi
    # (a trace marker for the start-up figure, where the caller set one up)
    [ -z "${vmm_start_trace:-}" ] || echo "$vmm_start_marker" >"$vmm_start_trace/trace_marker"
    t0=$(date +%s.%N)
    case "$vmm" in
        tapir|tapir-vhost|tapir-vu|tapir-acpi-off|tapir-4k)
            local fd3=$TAP_DEV acpi=on huge=on net=$tapir_net
            [ "$tapir_net" = fd=3 ] || fd3=/dev/null
            [ "$vmm" != tapir-vu ] || { net=vhost-user=$work/vu.sock fd3=/dev/null; }
            [ "$vmm" = tapir-acpi-off ] && acpi=off
            [ "$vmm" = tapir-4k ] && huge=off
            [ "$vmm" != tapir-vhost ] || net+=,vhost=on
            ip netns exec "$VM_NS" "$tapir" run --kernel "$kernel" --initrd "$initrd" --acpi "$acpi" --huge-pages "$huge" \
                --cpus "$cpus" --memory "$mem_mib" --net "$net" --boot-timer --stats --console "file=$work/console.log" \
                --cmdline "$guest_cmdline reboot=k" 3<>"$fd3" 2>"$work/mark" >"$work/vmm.out" </dev/null & ;;
        qemu|qemu-vhost|qemu-vu*)
            local vhost=off fd3=$TAP_DEV machine="microvm,x-option-roms=off,rtc=$qemu_rtc,acpi=$qemu_acpi"
            local netdev=(-netdev "tap,id=n0,$qemu_tap,vhost=$vhost")
            [ "$qemu_tap" = fd=3 ] || fd3=/dev/null
            [ "$vmm" = qemu-vhost ] && netdev=(-netdev "tap,id=n0,$qemu_tap,vhost=on")
            if [[ "$vmm" == qemu-vu* ]]; then
                fd3=/dev/null machine+=",memory-backend=mem"
                netdev=(-object "memory-backend-memfd,id=mem,size=${mem_mib}M,share=on"
                    -chardev "socket,id=vu,path=$work/vu.sock" -netdev vhost-user,id=n0,chardev=vu)
            fi
            ip netns exec "$VM_NS" qemu-system-x86_64 -M "$machine" \
                -enable-kvm -cpu host -smp "$cpus" -m "$mem_mib" -nodefaults -no-user-config -display none \
                -no-reboot -serial "file:$work/console.log" \
                -chardev "pipe,id=mark,path=$work/mark" -device isa-debugcon,iobase=0x402,chardev=mark \
                "${netdev[@]}" -device "virtio-net-device,netdev=n0,mac=$MAC,id=net0" "${qemu_extra[@]}" \
                -kernel "$kernel" -initrd "$initrd" -append "$guest_cmdline reboot=t" \
                3<>"$fd3" </dev/null >"$work/vmm.out" 2>"$work/vmm.err" & ;;
    esac
    vmm_pid=$!
    # read-write, so that opening never blocks on a VMM that died first; the reads time out instead
    exec 4<>"$work/mark"
    if [[ "$vmm" == tapir* ]]; then
        while IFS= read -r -t 60 line <&4; do
            [[ "$line" == *"guest init started"* ]] && break
        done
        [[ "$line" == *"guest init started"* ]] || { vmm_rest_of_log; log "$vmm: no boot marker"; return 1; }
    else
        IFS= read -r -t 60 -N 1 c <&4 || { vmm_rest_of_log; log "$vmm: no boot marker"; return 1; }
    fi
    t1=$(date +%s.%N)
    vmm_rest_of_log
    boot_s=$(awk -v a="$t1" -v b="$t0" 'BEGIN {printf "%.3f", a - b}')
}

# The rest of the marker pipe (Tapir's stderr) into vmm.log, through a read-only descriptor, so that it
# ends when the VMM does.
vmm_rest_of_log() {
    exec 5<"$work/mark" 4<&-
    cat <&5 >>"$work/vmm.log" &
    exec 5<&-
}

# start_helper: Tapir's vhost-user-net daemon on the macvtap (fd 3) at $work/vu.sock, for qemu-vu;
# sets helper_pid once its socket is there (its log in helper.log).
start_helper() {
    local i
    rm -f "$work/vu.sock"
    local spec=fd=3
    # (qemu-vu-nc: the daemon without coalescing; qemu-vu-cUS: with coalesce=US)
    case "$vmm" in
        *-nc) spec+=,coalesce=0 ;;
        qemu-vu-c*) spec+=,coalesce=${vmm#qemu-vu-c} ;;
    esac
    ip netns exec "$VM_NS" "$tapir" vhost-user-net --socket "$work/vu.sock" --net "$spec" --stats \
        3<>"$TAP_DEV" </dev/null >"$work/helper.log" 2>&1 &
    helper_pid=$!
    for i in $(seq 100); do
        [ -S "$work/vu.sock" ] && return 0
        kill -0 "$helper_pid" 2>/dev/null || break
        sleep 0.1
    done
    log "the vhost-user-net daemon did not start: $(tail -n 3 "$work/helper.log" 2>/dev/null)"
    stop_helper
    return 1
}

stop_pid() { # PID WHAT: SIGTERM, and SIGKILL after 30 s
    local i
    kill "$1" 2>/dev/null || true
    for i in $(seq 60); do kill -0 "$1" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$1" 2>/dev/null && log "$2 (pid $1) ignored SIGTERM for 30 s: killed"
    wait "$1" 2>/dev/null || true
}

stop_helper() {
    [ -n "$helper_pid" ] || return 0
    stop_pid "$helper_pid" "the vhost-user-net daemon"
    helper_pid=
}

stop_vmm() { # SIGTERM, and SIGKILL after 30 s; then the daemon of qemu-vu
    if [ -n "$vmm_pid" ]; then
        stop_pid "$vmm_pid" "the VMM"
        vmm_pid=
    fi
    stop_helper
}

# The host's KVM trace: kvm_exit and kvm_inj_exception, so that a crash shows the guest's last exits
# (with their RIPs) and the exceptions injected before it (on AMD a triple fault resets the vCPU's
# registers); for a deaf guest, the interrupt's way: irqfd/KVM_IRQ_LINE (kvm_set_irq), IOAPIC
# (kvm_ioapic_set_irq, "coalesced" when a pin is still pending), local APIC (kvm_apic_accept_irq),
# injection (kvm_inj_virq). kvm_trace_on sets kvm_traced=1 where tracefs is writable; kvm_trace_off
# in the caller's cleanup.
kvm_tracing=/sys/kernel/tracing
kvm_traced=0
kvm_trace_events=(kvm_exit kvm_inj_exception kvm_set_irq kvm_ioapic_set_irq kvm_apic_accept_irq kvm_inj_virq)
kvm_trace_on() {
    local event
    mountpoint -q "$kvm_tracing" || mount -t tracefs tracefs "$kvm_tracing" 2>/dev/null || true
    [ -w "$kvm_tracing/events/kvm/kvm_exit/enable" ] || return 0
    echo 4096 >"$kvm_tracing/buffer_size_kb"
    for event in "${kvm_trace_events[@]}"; do
        echo 1 >"$kvm_tracing/events/kvm/$event/enable" 2>/dev/null || true
    done
    kvm_traced=1
}
kvm_trace_off() {
    local event
    [ "$kvm_traced" = 1 ] || return 0
    for event in "${kvm_trace_events[@]}"; do
        echo 0 >"$kvm_tracing/events/kvm/$event/enable" 2>/dev/null || true
    done
    kvm_traced=0
}
kvm_trace_clear() { [ "$kvm_traced" = 0 ] || : >"$kvm_tracing/trace"; }
kvm_trace_tail() { # N: the last N events
    [ "$kvm_traced" = 0 ] || grep -v '^#' "$kvm_tracing/trace" | tail -n "$1" || true
}

# vmm_threads: the VMM's threads (name, state, utime, stime in ticks).
vmm_threads() {
    local t
    for t in /proc/"$vmm_pid"/task/*; do
        # (after the name in parentheses, which may hold spaces: state, then utime and stime as 12 and 13)
        echo "$(cat "$t/comm" 2>/dev/null): $(sed 's/.*) //' "$t/stat" 2>/dev/null | cut -d' ' -f1,12,13)" || true
    done
}

qmp_dump() { # QEMU's view of its virtio-net device's queues, over QMP (qmp_sock, set by the caller)
    /usr/bin/python3 scripts/lib/qmp-queues "$qmp_sock" 2>&1 || true
}

# deaf_report VMM: what a guest that stopped answering left behind: the queue-state dump (Tapir's
# SIGUSR1 dump into its log, with the vCPUs' and IOAPIC's interrupt state; QEMU's over QMP, for which
# the caller gives QEMU `-qmp unix:$qmp_sock,...` in qemu_extra), the VMM's threads' CPU time 2 s
# apart, and the KVM events while the peer pings the guest.
deaf_report() {
    echo "--- queue-state dump"
    if [[ "$1" == tapir* ]]; then
        kill -USR1 "$vmm_pid" 2>/dev/null || true
        sleep 1
    else
        qmp_dump
    fi
    echo "--- the VMM's threads (name, state, utime, stime in ticks), 2 s apart"
    vmm_threads
    sleep 2
    vmm_threads
    if [ "$kvm_traced" = 1 ]; then
        kvm_trace_clear
        in_peer busybox ping -c 3 -W 1 "$GUEST_IP" >/dev/null 2>&1 || true
        echo "--- KVM events while the peer pinged the deaf guest (the last 80)"
        kvm_trace_tail 80
    fi
}
