//! Guest-level tests of `tapir vhost-user-net`: QEMU -M microvm (its guest memory a sealed memfd,
//! shared) as the frontend of Tapir's daemon on the test network's macvtap. The guest moves the
//! same traffic as in guest_net (ping both ways, 100 MB each way with matching checksums, iperf3,
//! a driver reset under a TCP stream); then a second QEMU is served by the same daemon, a third is
//! killed (SIGKILL) in the middle of a TCP flood and a fourth is served after it, a two-pair
//! NIC serves a 2-vCPU guest on both pairs, and SIGTERM ends the daemon leaving no socket, no
//! process and no macvtap it created.

use std::path::Path;

use tapir_tests::{
    check_guest_traffic, guest_file, initramfs_with_script, run_host_script_past_a_lab_crash,
    scratch_dir, Run, GUEST_TRAFFIC, PEER_SERVERS,
};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn run_script(dir: &Path, script: &str, args: &[&str]) -> Run {
    run_host_script_past_a_lab_crash(dir, &["--timeout", "600", "--memory", "4096"], script, args)
}

/// Shell functions for a host script that set T, K, D, SOCK, MAC, VM_NS, GUEST_IP and PREFIX:
/// `daemon SPEC` starts Tapir's daemon on SPEC in the VM's namespace (its output in
/// $D/daemon.txt, its pid in $daemon) and waits for its socket; `qemu N CPUS QUEUES INITRD` runs
/// QEMU as its frontend until the guest is done (its console in $D/console-N.txt).
const DAEMON_AND_QEMU: &str = r#"
daemon() {
    ip netns exec $VM_NS "$T" -v vhost-user-net --socket $SOCK --net "$1" --stats \
        >$D/daemon.txt 2>&1 </dev/null &
    daemon=$!
    for _ in $(seq 100); do [ -S $SOCK ] && break; sleep 0.1; done
}
qemu() {
    local n=$1 cpus=$2 queues=$3 initrd=$4 mq=off watch
    [ "$queues" -gt 1 ] && mq=on
    # a guest still running after 200 s has gone deaf: the daemon logs its rings (SIGUSR1)
    ( sleep 200; kill -USR1 $daemon ) 2>/dev/null &
    watch=$!
    timeout 300 qemu-system-x86_64 -M microvm,x-option-roms=off,rtc=off,acpi=off,memory-backend=mem \
        -object memory-backend-memfd,id=mem,size=512M,share=on -enable-kvm -cpu host -smp $cpus -m 512 \
        -nodefaults -no-user-config -display none -no-reboot -serial file:$D/console-$n.txt \
        -chardev socket,id=vu,path=$SOCK -netdev vhost-user,id=n0,chardev=vu,queues=$queues \
        -device virtio-net-device,netdev=n0,mac=$MAC,mq=$mq \
        -kernel $K -initrd $initrd -append "console=ttyS0 reboot=t panic=-1 tapir.ip=$GUEST_IP/$PREFIX" \
        </dev/null >$D/qemu-$n.txt 2>&1
    local status=$?
    pkill -P $watch 2>/dev/null; kill $watch 2>/dev/null
    return $status
}
"#;

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn qemu_through_the_daemon_carries_the_traffic_and_a_second_qemu_follows() {
    let dir = scratch_dir("vu-traffic");
    let traffic = initramfs_with_script(&dir, GUEST_TRAFFIC);
    let short_dir = dir.join("short");
    std::fs::create_dir_all(&short_dir).unwrap();
    let short = initramfs_with_script(
        &short_dir,
        "sleep 1\nping -c 3 -W 2 10.77.0.1 && echo PING-SECOND ok\n",
    );
    let flood_dir = dir.join("flood");
    std::fs::create_dir_all(&flood_dir).unwrap();
    let flood = initramfs_with_script(
        &flood_dir,
        "sleep 1\necho FLOOD-START\niperf3 -c 10.77.0.1 -t 120 -P 2 >/dev/null 2>&1\n",
    );
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3 I2=$4 D=$5 PEER_SERVERS=$6 DAEMON_AND_QEMU=$7 I3=$8
SOCK=$D/vu.sock
eval "$(scripts/lib/testnet up gvu)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down gvu' EXIT
eval "$PEER_SERVERS"
eval "$DAEMON_AND_QEMU"
# a macvtap of the daemon's own beside the test network's mvt0 (which keeps its MAC)
MAC=52:54:00:77:00:05
daemon link=lower0,mac=$MAC
echo "SOCKET-MODE $(stat -c %a $SOCK)"
echo "macvtaps-serving=$(ip -n $VM_NS -o link show type macvtap | wc -l)"
qemu 1 1 1 $I &
q=$!
for _ in $(seq 300); do grep -q "^eth0:" $D/console-1.txt 2>/dev/null && break; sleep 0.1; done
ip netns exec $PEER_NS busybox ping -c 3 -W 2 $GUEST_IP && echo "PING-IN ok"
wait $q
echo "qemu-1-status=$?"
cat $D/console-1.txt $D/qemu-1.txt
echo "UP-PEER $(sha256sum <$D/upload.bin | cut -c1-64)"
# the same daemon serves the next frontend
qemu 2 1 1 $I2
echo "qemu-2-status=$?"
cat $D/console-2.txt
# a frontend killed in the middle of a TCP flood; the one after it is served
qemu 3 1 1 $I3 &
q=$!
for _ in $(seq 300); do grep -q "FLOOD-START" $D/console-3.txt 2>/dev/null && break; sleep 0.1; done
sleep 4
pkill -KILL -f "console-3.txt" && echo "qemu-3 killed"
wait $q
qemu 4 1 1 $I2
echo "qemu-4-status=$?"
grep PING-SECOND $D/console-4.txt | sed 's/^/AFTER-KILL /'
kill -TERM $daemon
wait $daemon
echo "daemon-status=$?"
cat $D/daemon.txt
[ -e $SOCK ] && echo "SOCKET-LEFT" || echo "socket removed"
echo "macvtaps-after=$(ip -n $VM_NS -o link show type macvtap | wc -l)"
pgrep -f "vhost-user-net --socket $SOCK" && echo "DAEMON-LEFT" || echo "no daemon left"
"#;
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            traffic.to_str().unwrap(),
            short.to_str().unwrap(),
            dir.to_str().unwrap(),
            PEER_SERVERS,
            DAEMON_AND_QEMU,
            flood.to_str().unwrap(),
        ],
    );
    for wanted in [
        "SOCKET-MODE 600",
        // the testnet's mvt0 and the daemon's link= macvtap
        "macvtaps-serving=2",
        "vhost-user-net: serving ",
        "1 queue pair) on ",
        "TAPIR-EXIT 0",
        "qemu-1-status=0",
        "PING-SECOND ok",
        "qemu-2-status=0",
        "qemu-3 killed",
        "qemu-4-status=0",
        "AFTER-KILL PING-SECOND ok",
        "tapir: NIC counters",
        "tapir: vhost-user-net: stopped by SIGTERM",
        "daemon-status=0",
        "socket removed",
        "macvtaps-after=1",
        "no daemon left",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    check_guest_traffic(&run);
    // Tapir's data plane moved it, with the offloads: GSO both ways, and no chain refused.
    assert!(
        run.number("rx_bytes") > 100 << 20,
        "the 100 MB download went through the daemon\n{run}"
    );
    assert!(run.number("tx_bytes") > 100 << 20, "{run}");
    assert!(run.number("rx_gso_frames") > 0, "{run}");
    assert!(run.number("tx_gso_frames") > 0, "{run}");
    assert_eq!(run.number("malformed_chains"), 0, "{run}");
    assert_eq!(run.number("driver_errors"), 0, "{run}");
    assert_eq!(
        run.stdout
            .matches("vhost-user-net: a frontend connected")
            .count(),
        4,
        "{run}"
    );
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn a_two_pair_daemon_serves_both_pairs_of_a_two_vcpu_guest() {
    let dir = scratch_dir("vu-mq");
    let initrd = initramfs_with_script(
        &dir,
        "echo \"RX-QUEUES $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\"\n\
         sleep 1\n\
         ping -c 3 -W 2 10.77.0.1 && echo PING ok\n\
         iperf3 -c 10.77.0.1 -t 3 -P 4 -R | grep -E 'SUM.*receiver' | sed 's/^/TCP-IN /'\n",
    );
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3 D=$4 DAEMON_AND_QEMU=$5
SOCK=$D/vu.sock
eval "$(scripts/lib/testnet up gvumq)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down gvumq' EXIT
ip netns exec $PEER_NS iperf3 -s >/dev/null 2>&1 &
eval "$DAEMON_AND_QEMU"
daemon macvtap=$TAP_NAME,queues=2
qemu 1 2 2 $I
echo "qemu-status=$?"
cat $D/console-1.txt $D/qemu-1.txt
kill -TERM $daemon
wait $daemon
echo "daemon-status=$?"
cat $D/daemon.txt
"#;
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            dir.to_str().unwrap(),
            DAEMON_AND_QEMU,
        ],
    );
    for wanted in [
        "2 queue pairs) on ",
        // the guest took the second pair through QEMU's control queue, and the daemon served it
        "pair 1 in use: its macvtap queue attached",
        "RX-QUEUES 2",
        "PING ok",
        "TCP-IN ",
        "TAPIR-EXIT 0",
        "qemu-status=0",
        "daemon-status=0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    assert!(run.number("rx_frames") > 0, "{run}");
    assert_eq!(run.number("driver_errors"), 0, "{run}");
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn tapir_as_the_frontend_of_the_daemon_carries_the_traffic_and_follows_a_killed_one() {
    // One daemon (two pairs, on the test network's macvtap) serves Tapir five times: the traffic
    // guest on one pair; a 2-vCPU guest on both pairs (queues=2); a Tapir killed (SIGKILL) in the
    // middle of a TCP flood; one more after it; a last one under which the daemon stops (SIGTERM):
    // its guest sees its link go down. Each Tapir takes the macvtap's MAC from the daemon's
    // configuration space.
    let dir = scratch_dir("vu-frontend");
    let traffic = initramfs_with_script(&dir, GUEST_TRAFFIC);
    let sub = |name: &str, script: &str| {
        let d = dir.join(name);
        std::fs::create_dir_all(&d).unwrap();
        initramfs_with_script(&d, script)
    };
    let mq = sub(
        "mq",
        "echo \"RX-QUEUES $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\"\n\
         sleep 1\n\
         ping -c 3 -W 2 10.77.0.1 && echo PING-MQ ok\n\
         iperf3 -c 10.77.0.1 -t 3 -P 4 -R | grep -E 'SUM.*receiver' | sed 's/^/TCP-IN-MQ /'\n",
    );
    let flood = sub(
        "flood",
        "sleep 1\necho FLOOD-START\niperf3 -c 10.77.0.1 -t 120 -P 2 >/dev/null 2>&1\n",
    );
    let short = sub(
        "short",
        "sleep 1\nping -c 3 -W 2 10.77.0.1 && echo PING-LAST ok\n",
    );
    let orphan = sub(
        "orphan",
        "sleep 1\necho \"CARRIER-BEFORE $(cat /sys/class/net/eth0/carrier)\"\necho LINK-WATCH\n\
         for i in $(seq 300); do\n\
           [ \"$(cat /sys/class/net/eth0/carrier)\" = 0 ] && { echo LINK-DOWN-SEEN; break; }\n\
           sleep 0.1\n\
         done\n",
    );
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3 IMQ=$4 IFLOOD=$5 ISHORT=$6 D=$7 PEER_SERVERS=$8 DAEMON_AND_QEMU=$9 IORPHAN=${10}
SOCK=$D/vu.sock
eval "$(scripts/lib/testnet up gvutf)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down gvutf' EXIT
eval "$PEER_SERVERS"
eval "$DAEMON_AND_QEMU"
daemon macvtap=$TAP_NAME,queues=2
tapir() { # N INITRD OPTIONS...
    local n=$1 initrd=$2 watch status
    shift 2
    # a guest still running after 200 s has gone deaf: Tapir and the daemon log their state
    ( sleep 200; pkill -USR1 -f "^$T run --kernel $K --initrd $initrd"; kill -USR1 $daemon ) 2>/dev/null &
    watch=$!
    ip netns exec $VM_NS timeout 300 "$T" run --kernel $K --initrd $initrd --memory 512 "$@" \
        --cmdline "console=ttyS0 reboot=k panic=-1 tapir.ip=$GUEST_IP/$PREFIX" \
        >$D/tapir-$n.txt 2>&1 </dev/null
    status=$?
    pkill -P $watch 2>/dev/null; kill $watch 2>/dev/null
    return $status
}
tapir 1 $I --net vhost-user=$SOCK &
t=$!
for _ in $(seq 300); do grep -q "^eth0:" $D/tapir-1.txt 2>/dev/null && break; sleep 0.1; done
ip netns exec $PEER_NS busybox ping -c 3 -W 2 $GUEST_IP && echo "PING-IN ok"
wait $t
echo "tapir-1-status=$?"
cat $D/tapir-1.txt
echo "UP-PEER $(sha256sum <$D/upload.bin | cut -c1-64)"
tapir 2 $IMQ --cpus 2 -v --net vhost-user=$SOCK,queues=2
echo "tapir-2-status=$?"
cat $D/tapir-2.txt
tapir 3 $IFLOOD --net vhost-user=$SOCK &
t=$!
for _ in $(seq 300); do grep -q "FLOOD-START" $D/tapir-3.txt 2>/dev/null && break; sleep 0.1; done
sleep 4
pkill -KILL -f -- "--initrd $IFLOOD" && echo "tapir-3 killed"
wait $t
tapir 4 $ISHORT --net vhost-user=$SOCK
echo "tapir-4-status=$?"
grep -E "PING-LAST|TAPIR-EXIT" $D/tapir-4.txt
# the daemon stops under a running Tapir: its guest sees the link go down
tapir 5 $IORPHAN --net vhost-user=$SOCK &
t=$!
for _ in $(seq 300); do grep -q "LINK-WATCH" $D/tapir-5.txt 2>/dev/null && break; sleep 0.1; done
kill -TERM $daemon
wait $daemon
echo "daemon-status=$?"
wait $t
echo "tapir-5-status=$?"
cat $D/tapir-5.txt
cat $D/daemon.txt
"#;
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            traffic.to_str().unwrap(),
            mq.to_str().unwrap(),
            flood.to_str().unwrap(),
            short.to_str().unwrap(),
            dir.to_str().unwrap(),
            PEER_SERVERS,
            DAEMON_AND_QEMU,
            orphan.to_str().unwrap(),
        ],
    );
    for wanted in [
        "2 queue pairs) on ",
        "served by the vhost-user backend at ",
        "tapir-1-status=0",
        "RX-QUEUES 2",
        "PING-MQ ok",
        "TCP-IN-MQ ",
        "pair 1 in use: its macvtap queue attached",
        "tapir-2-status=0",
        "tapir-3 killed",
        "PING-LAST ok",
        "tapir-4-status=0",
        "daemon-status=0",
        "CARRIER-BEFORE 1",
        "the vhost-user backend closed the connection",
        "LINK-DOWN-SEEN",
        "tapir-5-status=0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    check_guest_traffic(&run);
    assert_eq!(
        run.stdout
            .matches("vhost-user-net: a frontend connected")
            .count(),
        5,
        "{run}"
    );
    // the daemon moved the 100 MB each way (Tapir runs without --stats: its own counters would
    // show only what it moved itself, nothing)
    assert!(run.number("rx_bytes") > 100 << 20, "{run}");
    assert!(run.number("tx_bytes") > 100 << 20, "{run}");
    assert_eq!(run.number("driver_errors"), 0, "{run}");
    assert!(!run.stdout.contains("panicked"), "{run}");
}
