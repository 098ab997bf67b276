//! Guest-level tests of virtio-net through a macvtap: the test guest on KVM (or in the lab) in a fresh
//! namespace pair (scripts/lib/testnet: a veth peer at 10.77.0.1, a bridge-mode macvtap on the other
//! end) talks to the peer: ping both ways, 100 MB over TCP each way with matching checksums, UDP, a
//! driver reset under a TCP stream, offload counters, on Tapir's data plane and on vhost-net; then
//! two NICs at once, `link=` leaving no macvtap behind, and a multiqueue NIC on each plane.

use std::path::Path;

use tapir_tests::{
    check_guest_traffic, guest_file, initramfs_with_script, run_host_script_past_a_lab_crash,
    scratch_dir, Run, GUEST_TRAFFIC, PEER_SERVERS,
};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn run_script(dir: &Path, script: &str, args: &[&str]) -> Run {
    run_host_script_past_a_lab_crash(dir, &["--timeout", "500", "--memory", "4096"], script, args)
}

/// The guest's traffic (GUEST_TRAFFIC) with the peer through a macvtap opened with `--net
/// macvtap=mvt0{options}`, a queue-state dump while it runs, and what every data plane must show:
/// pings both ways and after a driver reset, 100 MB each way intact, iperf3 rates, a clean end.
fn traffic_through_the_macvtap(name: &str, options: &str) -> Run {
    let dir = scratch_dir(name);
    let initrd = initramfs_with_script(&dir, GUEST_TRAFFIC);
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3 D=$4 OPTIONS=$5 PEER_SERVERS=$6
eval "$(scripts/lib/testnet up gnet)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down gnet' EXIT
eval "$PEER_SERVERS"
ip netns exec $VM_NS "$T" run --kernel $K --initrd $I --memory 512 --net macvtap=$TAP_NAME$OPTIONS --stats \
    --cmdline "console=ttyS0 reboot=k panic=-1 tapir.ip=$GUEST_IP/$PREFIX" >$D/console.txt 2>&1 </dev/null &
tapir=$!
for _ in $(seq 1 300); do grep -q "^eth0:" $D/console.txt && break; sleep 0.1; done
ip netns exec $PEER_NS busybox ping -c 3 -W 2 $GUEST_IP && echo "PING-IN ok"
kill -USR1 $tapir   # the queue-state dump
# The guest reboots when its script is done (about 50 s in the lab); one that stalls is stopped after
# 300 s with a second dump, before the lab's own timeout.
for _ in $(seq 300); do kill -0 $tapir 2>/dev/null || break; sleep 1; done
if kill -0 $tapir 2>/dev/null; then
    echo "GUEST-STALLED: tapir still running after 300 s"
    kill -USR1 $tapir; sleep 1; kill $tapir
fi
wait $tapir
echo "tapir-status=$?"
cat $D/console.txt
echo "UP-PEER $(sha256sum <$D/upload.bin | cut -c1-64)"
echo "UP-BYTES $(wc -c <$D/upload.bin)"
"#;
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            dir.to_str().unwrap(),
            options,
            PEER_SERVERS,
        ],
    );
    for wanted in [
        "queue state of eth0 (mvt0)",
        "queue 0: size 1024",
        "guest avail idx ",
        "used_event ",
        "    counters: rx_frames=",
        // the interrupt's way to the guest: the NIC's pin is live, the vCPU's local APIC is read
        "IOAPIC: pin ",
        "vCPU 0: ",
        "local APIC tpr ",
        "TAPIR-EXIT 0",
        "tapir: guest rebooted",
        "tapir-status=0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    check_guest_traffic(&run);
    run
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn guest_talks_to_its_peer_through_the_macvtap() {
    let run = traffic_through_the_macvtap("net-traffic", "");
    assert!(
        run.stdout.contains("queue 0: size 1024, device avail "),
        "{run}"
    );
    // The guest's TCP used the offloads: segmentation and checksums left to the host, and GSO frames
    // from the peer handed to the guest whole.
    assert!(run.number("tx_gso_frames") > 0, "{run}");
    assert!(run.number("tx_csum_frames") > 0, "{run}");
    assert!(run.number("rx_gso_frames") > 0, "{run}");
    assert!(
        run.number("rx_bytes") > 100 << 20,
        "the 100 MB download went through the device\n{run}"
    );
    assert_eq!(run.number("malformed_chains"), 0, "{run}");
}

#[test]
#[ignore = "needs root, the lab's or the host's vhost-net, namespaces and the guest image: run by scripts/test"]
fn vhost_net_carries_the_same_traffic() {
    let run = traffic_through_the_macvtap("net-vhost", ",vhost=on");
    // The kernel moved the frames and raised their interrupts on the irqfd itself (Tapir's own
    // counters stay at 0; the traffic above could not have passed without them), through a driver
    // reset that stopped and restarted the rings.
    assert!(
        run.stdout
            .contains("queue 0: size 1024 (served by vhost-net)"),
        "{run}"
    );
    assert_eq!(run.number("rx_frames"), 0, "{run}");
    assert_eq!(run.number("tx_frames"), 0, "{run}");
    assert_eq!(run.number("interrupts_resent"), 0, "{run}");
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn two_nics_at_once_and_link_leaves_no_macvtap_behind() {
    let dir = scratch_dir("net-two");
    let initrd = initramfs_with_script(
        &dir,
        "ip addr add 10.77.0.3/24 dev eth1 && ip link set eth1 up\n\
         echo \"ETH1 $(cat /sys/class/net/eth1/address)\"\n\
         ping -c 2 -W 2 10.77.0.1 && echo PING-ETH0 ok\n\
         ping -c 2 -W 2 -I eth1 10.77.0.1 && echo PING-ETH1 ok\n",
    );
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3
eval "$(scripts/lib/testnet up gtwo)"
trap 'scripts/lib/testnet down gtwo' EXIT
macvtaps() { ip -n $VM_NS -o link show type macvtap | wc -l; }
echo "macvtaps-before=$(macvtaps)"
ip netns exec $VM_NS timeout 120 "$T" run --kernel $K --initrd $I --stats \
    --net macvtap=$TAP_NAME --net link=lower0,mac=52:54:00:77:00:09 \
    --cmdline "console=ttyS0 reboot=k panic=-1 tapir.ip=$GUEST_IP/$PREFIX" </dev/null
echo "tapir-status=$?"
echo "macvtaps-after=$(macvtaps)"
ip netns exec $VM_NS timeout 120 "$T" run --kernel $K --net link=lower0 --console none \
    --cmdline "console=ttyS0 rdinit=/nonexistent" </dev/null
echo "failed-status=$?"
echo "macvtaps-after-failure=$(macvtaps)"
ip netns exec $VM_NS "$T" run --kernel $K --net link=nonexistent0 --console none </dev/null
echo "bad-link-status=$?"
"#;
    let run = run_script(
        &dir,
        script,
        &[TAPIR, kernel.to_str().unwrap(), initrd.to_str().unwrap()],
    );
    for wanted in [
        "ETH1 52:54:00:77:00:09",
        "PING-ETH0 ok",
        "PING-ETH1 ok",
        "tapir-status=0",
        "macvtaps-before=1",
        "macvtaps-after=1",
        "failed-status=3",
        "macvtaps-after-failure=1",
        "bad-link-status=1",
        "nonexistent0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    let eth1_rx = run
        .line_value("rx_frames")
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse::<u64>().ok());
    assert!(
        eth1_rx.is_some_and(|n| n > 0),
        "eth1 received frames\n{run}"
    );
}

/// A 2-vCPU guest on `--net link=lower0,queues=2{options}`: it sees two queue pairs, takes both
/// through the control queue, and pings.
fn multiqueue(name: &str, options: &str) -> Run {
    let dir = scratch_dir(name);
    let initrd = initramfs_with_script(
        &dir,
        "echo \"RX-QUEUES $(ls -d /sys/class/net/eth0/queues/rx-* | wc -l)\"\n\
         ip addr add 10.77.0.4/24 dev eth0 && ip link set eth0 up\n\
         ping -c 3 -W 2 10.77.0.1 && echo PING ok\n",
    );
    let kernel = guest_file("bzImage");
    let script = r#"
set -u
T=$1 K=$2 I=$3 OPTIONS=$4
eval "$(scripts/lib/testnet up gmq)"
trap 'scripts/lib/testnet down gmq' EXIT
ip netns exec $VM_NS timeout 120 "$T" run --kernel $K --initrd $I --cpus 2 -v \
    --net link=lower0,queues=2$OPTIONS </dev/null
echo "tapir-status=$?"
echo "macvtaps-after=$(ip -n $VM_NS -o link show type macvtap | wc -l)"
"#;
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            options,
        ],
    );
    for wanted in [
        "2 queue pairs",
        "RX-QUEUES 2",
        "the guest uses 2 queue pairs",
        "PING ok",
        "TAPIR-EXIT 0",
        "tapir-status=0",
        "macvtaps-after=1",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    run
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn a_multiqueue_nic_gives_the_guest_a_queue_pair_per_vcpu() {
    multiqueue("net-mq", "");
}

#[test]
#[ignore = "needs root, the lab's or the host's vhost-net, namespaces and the guest image: run by scripts/test"]
fn vhost_net_serves_each_queue_pair() {
    let run = multiqueue("net-mq-vhost", ",vhost=on");
    assert!(
        run.stdout.contains("served by the kernel's vhost-net"),
        "{run}"
    );
}
