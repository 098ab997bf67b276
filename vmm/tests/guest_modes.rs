//! What each macvtap mode lets through, measured with real guests: two test guests on macvtaps Tapir
//! creates on one lower device (`--net link=lower0,mode=M`), a peer behind the lower device
//! (scripts/lib/testnet's veth), and the host with an address on the lower device itself. Each guest
//! pings the peer and the other guest; the peer and the host ping a guest. VEPA and private mode run
//! again behind a reflecting switch (a Linux bridge on the peer side with hairpin on for the port),
//! bridge mode again with `host=` (the host's own macvlan port), and passthru with one guest, which
//! takes the lower device's MAC, while a second passthru NIC is refused. The README's reachability
//! matrix is this test's output (the MATRIX lines it prints).

use tapir_tests::{
    case_section, guest_file, initramfs_with_script, run_host_script_past_a_lab_crash, scratch_dir,
};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

/// Each guest: ping the peer and the other guest (up to 20 tries each, so a guest that boots later
/// is still found), report, and stay up while the host pings it.
const GUEST: &str = r#"
other= hold=20
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tapir.other=*) other=${arg#tapir.other=} ;;
        tapir.hold=*) hold=${arg#tapir.hold=} ;;
    esac
done
reach() { for _ in $(seq 20); do ping -c 1 -W 1 "$1" >/dev/null 2>&1 && { echo ok; return; }; done; echo no; }
echo "REACH peer $(reach 10.77.0.1)"
[ -z "$other" ] || echo "REACH other $(reach "$other")"
echo "GUEST-DONE"
sleep "$hold"
"#;

const HOST: &str = r#"
set -u
T=$1 K=$2 I=$3 D=$4
eval "$(scripts/lib/testnet up modes)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down modes' EXIT
# Tapir makes its own macvtaps here; the host's address sits on the lower device itself.
ip -n $VM_NS link del mvt0
ip -n $VM_NS addr add 10.77.0.9/24 dev lower0

boot() { # NAME SPEC IP OTHER
    ip netns exec $VM_NS "$T" run --kernel $K --initrd $I --memory 256 --net "$2" \
        --cmdline "console=ttyS0 reboot=k panic=-1 tapir.ip=$3/24 tapir.other=$4" \
        >$D/$1.txt 2>&1 </dev/null &
}
wait_for() { # FILE TEXT SECONDS
    for _ in $(seq $(($3 * 10))); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
    echo "no \"$2\" in $1 after $3 s"
    return 1
}
pings() { # NS ADDR [ping options]
    local ns=$1 addr=$2; shift 2
    ip netns exec "$ns" busybox ping -c 3 -W 2 "$@" "$addr" >/dev/null 2>&1 && echo ok || echo no
}
report() { # NAME
    grep -a -E "^(REACH|eth0:|tapir: |\[.*(ERROR|WARN))" $D/$1.txt | sed "s/^/$1: /"
}
two_guests() { # CASE MODE [EXTRA SPEC for a]
    echo "=== case $1"
    rm -f $D/a.txt $D/b.txt
    boot a "link=lower0,mode=$2,mac=52:54:00:77:00:0a${3:-}" 10.77.0.10 10.77.0.11; local a=$!
    boot b "link=lower0,mode=$2,mac=52:54:00:77:00:0b" 10.77.0.11 10.77.0.10; local b=$!
    # The host and the peer ping a while the guests ping each other (each guest stays up 20 s after).
    wait_for $D/a.txt "^eth0:" 150 && wait_for $D/b.txt "^eth0:" 150
    echo "HOST peer->a $(pings $PEER_NS 10.77.0.10)"
    echo "HOST host->a $(pings $VM_NS 10.77.0.10 -I lower0)"
    if [ -n "${3:-}" ]; then
        port=$(ip -n $VM_NS -o link show type macvlan | awk -F': ' '{print $2}' | cut -d@ -f1)
        echo "HOST port $port: $(ip -n $VM_NS -o -4 addr show dev "$port" | awk '{print $4}')"
        echo "HOST hostport->a $(pings $VM_NS 10.77.0.10 -I "$port")"
    fi
    wait_for $D/a.txt GUEST-DONE 150 && wait_for $D/b.txt GUEST-DONE 150
    wait $a; echo "a-status=$?"
    wait $b; echo "b-status=$?"
    report a; report b
    echo "LINKS-LEFT $(ip -n $VM_NS -o link show | grep -c -E 'macvtap|macvlan|tpr[0-9]')"
}

two_guests bridge bridge
two_guests private private
two_guests vepa vepa

# A switch that reflects frames: peer0 into a bridge with hairpin on.
ip -n $PEER_NS link add br0 type bridge || echo "SETUP-FAILED a bridge for the reflecting switch"
ip -n $PEER_NS addr del 10.77.0.1/24 dev peer0
ip -n $PEER_NS link set peer0 master br0
ip -n $PEER_NS addr add 10.77.0.1/24 dev br0
ip -n $PEER_NS link set br0 up
ip netns exec $PEER_NS bridge link set dev peer0 hairpin on
two_guests vepa-hairpin vepa
two_guests private-hairpin private

two_guests bridge-host-port bridge ",host=10.77.0.8/24"

echo "=== case passthru"
rm -f $D/a.txt $D/b.txt
boot a "link=lower0,mode=passthru" 10.77.0.10 ""; a=$!
wait_for $D/a.txt "^eth0:" 150
echo "LOWER-MAC $(ip netns exec $VM_NS cat /sys/class/net/lower0/address)"
echo "HOST peer->a $(pings $PEER_NS 10.77.0.10)"
echo "HOST host->a $(pings $VM_NS 10.77.0.10 -I lower0)"
ip netns exec $VM_NS "$T" run --kernel $K --initrd $I --memory 256 --net link=lower0,mode=passthru \
    </dev/null 2>&1 | grep -a -i error | sed 's/^/SECOND /'
wait_for $D/a.txt GUEST-DONE 150
wait $a; echo "a-status=$?"
report a
echo "LINKS-LEFT $(ip -n $VM_NS -o link show | grep -c -E 'macvtap|macvlan|tpr[0-9]')"
echo "=== end"
"#;

/// One case's outcome: whether a reached the peer and b, b reached a, the peer and the host reached a.
fn reach(section: &str, line: &str) -> &'static str {
    match section.lines().find_map(|l| l.strip_prefix(line)) {
        Some(v) if v.trim() == "ok" => "ok",
        Some(v) if v.trim() == "no" => "no",
        _ => "?",
    }
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn each_macvtap_mode_reaches_what_the_kernel_says() {
    let dir = scratch_dir("modes");
    let initrd = initramfs_with_script(&dir, GUEST);
    let kernel = guest_file("bzImage");
    let run = run_host_script_past_a_lab_crash(
        &dir,
        &["--timeout", "1500", "--memory", "3072"],
        HOST,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    assert_eq!(run.status, Some(0), "{run}");
    assert!(!run.stdout.contains("SETUP-FAILED"), "{run}");
    println!("{run}");

    // (case, a->peer, a->b, b->a, peer->a, host->a via lower0)
    let expected = [
        ("bridge", "ok", "ok", "ok", "ok", "no"),
        ("private", "ok", "no", "no", "ok", "no"),
        ("vepa", "ok", "no", "no", "ok", "no"),
        // Measured, and what the kernel does: the switch reflects the host's frames from lower0
        // too, and they come back to the VEPA macvtap like any other station's.
        ("vepa-hairpin", "ok", "ok", "ok", "ok", "ok"),
        ("private-hairpin", "ok", "no", "no", "ok", "no"),
        ("bridge-host-port", "ok", "ok", "ok", "ok", "no"),
    ];
    let mut matrix = String::from("MATRIX case a->peer a->b b->a peer->a host->a\n");
    for (case, a_peer, a_b, b_a, peer_a, host_a) in expected {
        let s = case_section(&run, case);
        let got = (
            reach(s, "a: REACH peer "),
            reach(s, "a: REACH other "),
            reach(s, "b: REACH other "),
            reach(s, "HOST peer->a "),
            reach(s, "HOST host->a "),
        );
        matrix.push_str(&format!(
            "MATRIX {case} {} {} {} {} {}\n",
            got.0, got.1, got.2, got.3, got.4
        ));
        assert_eq!(got, (a_peer, a_b, b_a, peer_a, host_a), "case {case}\n{s}");
        assert!(s.contains("a-status=0") && s.contains("b-status=0"), "{s}");
        assert!(s.contains("LINKS-LEFT 0"), "case {case} left links\n{s}");
    }
    let port = case_section(&run, "bridge-host-port");
    assert_eq!(reach(port, "HOST hostport->a "), "ok", "{port}");
    assert!(port.contains("10.77.0.8/24"), "{port}");

    let pt = case_section(&run, "passthru");
    let lower_mac = pt
        .lines()
        .find_map(|l| l.strip_prefix("LOWER-MAC "))
        .expect("the lower device's MAC");
    assert!(
        pt.contains(&format!("a: eth0: {lower_mac} ")),
        "the passthru guest has the lower device's MAC\n{pt}"
    );
    assert_eq!(reach(pt, "a: REACH peer "), "ok", "{pt}");
    assert_eq!(reach(pt, "HOST peer->a "), "ok", "{pt}");
    assert_eq!(reach(pt, "HOST host->a "), "no", "{pt}");
    assert!(
        pt.contains("SECOND ") && pt.contains("holds it in passthru mode"),
        "a second passthru NIC is refused saying why\n{pt}"
    );
    assert!(
        pt.contains("a-status=0") && pt.contains("LINKS-LEFT 0"),
        "{pt}"
    );
    println!("{matrix}");
}

const GUEST_CARRIER: &str = r#"
carrier() { cat /sys/class/net/eth0/carrier 2>/dev/null; }
for _ in $(seq 50); do [ "$(carrier)" = 1 ] && break; sleep 0.2; done
echo "CARRIER-BEFORE $(carrier)"
for _ in $(seq 150); do [ "$(carrier)" = 0 ] && break; sleep 0.2; done
echo "CARRIER-AFTER $(carrier)"
"#;

const HOST_CARRIER: &str = r#"
set -u
T=$1 K=$2 I=$3 D=$4
eval "$(scripts/lib/testnet up carrier)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down carrier' EXIT
ip -n $VM_NS link del mvt0
ip netns exec $VM_NS "$T" run --kernel $K --initrd $I --memory 256 --net link=lower0 --stats \
    --cmdline "console=ttyS0 reboot=k panic=-1 tapir.ip=$GUEST_IP/$PREFIX" >$D/console.txt 2>&1 </dev/null &
tapir=$!
for _ in $(seq 1500); do grep -q "^CARRIER-BEFORE" $D/console.txt && break; sleep 0.1; done
# The lower device goes away under the running guest (its veth pair deleted from the peer's side).
ip -n $PEER_NS link del peer0
wait $tapir
echo "tapir-status=$?"
cat $D/console.txt
echo "LINKS-LEFT $(ip -n $VM_NS -o link show | grep -c 'tpr[0-9]')"
"#;

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn the_guest_sees_its_link_go_when_the_lower_device_goes() {
    let dir = scratch_dir("carrier");
    let initrd = initramfs_with_script(&dir, GUEST_CARRIER);
    let kernel = guest_file("bzImage");
    let run = run_host_script_past_a_lab_crash(
        &dir,
        &["--timeout", "500"],
        HOST_CARRIER,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    for wanted in [
        "CARRIER-BEFORE 1",
        "CARRIER-AFTER 0",
        "the guest's link is down",
        "tapir-status=0",
        "LINKS-LEFT 0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    assert_eq!(run.number("link_changes"), 1, "{run}");
    assert!(
        !run.stdout.contains("ERROR"),
        "the macvtap that went with its lower device is no error\n{run}"
    );
}
