//! A hostile guest against Tapir, in a real VM (the lab where there is no hardware
//! virtualization): the test guest unbinds its virtio-net driver and `tapir-hostile` drives the
//! NIC's registers and rings itself, playing every pattern of the hostile-guest issue, while the
//! peer sends it frames. From the host the test checks what a VMM owes its host whatever the
//! guest does: Tapir's threads outside the vCPUs do not spin, its memory does not grow by more
//! than 16 MiB, its log stays short, SIGTERM ends it within a second with status 0, nothing is left
//! behind, and after a driver rebind the guest talks again.

use tapir_tests::{
    guest_file, initramfs_with_script, run_host_script_past_a_lab_crash, scratch_dir, Run,
};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn pattern_line<'a>(run: &'a Run, prefix: &str) -> &'a str {
    run.stdout
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?}\n{run}"))
}

/// The whole numbers among a line's words.
fn numbers(line: &str) -> Vec<u64> {
    line.split_whitespace()
        .filter_map(|w| w.trim_end_matches([',', ';']).parse().ok())
        .collect()
}

/// Each pattern runs this long (two of them half as long).
const PATTERN_SECONDS: u32 = 4;

const GUEST: &str = r#"
dev=$(basename $(readlink /sys/class/net/eth0/device))
echo -n $dev > /sys/bus/virtio/drivers/virtio_net/unbind
echo HOSTILE-START
sleep 1
tapir-hostile --seconds SECONDS all
echo "HOSTILE-STATUS $?"
echo HOSTILE-DONE
# The avail index far ahead once more, held as it is for 4 s: a device that spins on it spins on.
tapir-hostile --hold 4 avail-ahead
echo -n $dev > /sys/bus/virtio/drivers/virtio_net/bind
ip addr add 10.77.0.9/24 dev eth0 && ip link set eth0 up
sleep 1
ping -c 3 -W 2 10.77.0.1 && echo "PING-AFTER-HOSTILE ok"
echo READY-FOR-SIGTERM
sleep 600
"#;

/// Runs in the lab (or on a KVM host): boots the guest with a created macvtap (link=, 2 queue
/// pairs so the control queue exists), samples Tapir's CPU time outside its vCPUs and its RSS at
/// HOSTILE-START and HOSTILE-DONE, then stops it with SIGTERM and times that.
const HOST: &str = r#"
set -u
T=$1 K=$2 I=$3 D=$4
eval "$(scripts/lib/testnet up ghostile)"
trap 'kill $(jobs -p) 2>/dev/null; scripts/lib/testnet down ghostile' EXIT
ip -n $PEER_NS neigh add 10.77.0.9 lladdr 52:54:00:77:00:09 dev peer0
ip netns exec $VM_NS "$T" run --kernel $K --initrd $I --memory 256 \
    --net link=lower0,mac=52:54:00:77:00:09,queues=2 --stats \
    --cmdline "console=ttyS0 reboot=k panic=-1 mem=192M tapir.ip=10.77.0.9/24" \
    >$D/console.txt 2>$D/stderr.txt </dev/null &
tapir=$!
show() {
    echo "--- console"; cat $D/console.txt
    echo "--- stderr"; cat $D/stderr.txt
}
wait_for() { # TEXT SECONDS
    for _ in $(seq 1 $(($2 * 10))); do grep -q "$1" $D/console.txt && return 0; sleep 0.1; done
    echo "TIMEOUT waiting for $1"
    kill -TERM $tapir; sleep 2; show
    return 1
}
# CPU ticks of Tapir's threads that are not vCPUs, and its RSS in KiB.
non_vcpu_ticks() {
    local t sum=0 comm
    for t in /proc/$tapir/task/*; do
        comm=$(cat $t/comm 2>/dev/null) || continue
        case "$comm" in tapir-vcpu*) continue ;; esac
        set -- $(sed 's/^.*) //' $t/stat 2>/dev/null)
        sum=$((sum + ${12:-0} + ${13:-0}))
    done
    echo $sum
}
# Per thread: name=ticks, for the log.
thread_ticks() {
    local t
    for t in /proc/$tapir/task/*; do
        set -- $(sed 's/^.*) //' $t/stat 2>/dev/null)
        printf '%s=%s ' "$(cat $t/comm 2>/dev/null)" $((${12:-0} + ${13:-0}))
    done
    echo
}
rss_kb() { awk '/^VmRSS/ {print $2}' /proc/$tapir/status; }
now_ms() { echo $(($(date +%s%N) / 1000000)); }

wait_for HOSTILE-START 120 || exit 1
ticks0=$(non_vcpu_ticks) rss0=$(rss_kb) t0=$(now_ms)
echo "THREAD-TICKS-START $(thread_ticks)"
# Frames for the guest meanwhile (the stash-flood pattern needs some), bounded in time.
ip netns exec $PEER_NS timeout 90 bash -c \
    'while :; do echo hostile >/dev/udp/10.77.0.9/9; done' 2>/dev/null &
flood=$!
wait_for HOSTILE-DONE 240 || exit 1
kill $flood 2>/dev/null
ticks1=$(non_vcpu_ticks) rss1=$(rss_kb) t1=$(now_ms)
echo "THREAD-TICKS-DONE $(thread_ticks)"
hz=$(getconf CLK_TCK)
echo "NON-VCPU-CPU-MS $(( (ticks1 - ticks0) * 1000 / hz ))"
echo "WALL-MS $((t1 - t0))"
echo "RSS-START-KB $rss0"
echo "RSS-GROWTH-KB $((rss1 - rss0))"
wait_for HOSTILE-QUIET 60 || exit 1
quiet0=$(non_vcpu_ticks) q0=$(now_ms)
wait_for HOSTILE-QUIET-END 60 || exit 1
quiet1=$(non_vcpu_ticks) q1=$(now_ms)
echo "QUIET-CPU-MS $(( (quiet1 - quiet0) * 1000 / hz ))"
echo "QUIET-WALL-MS $((q1 - q0))"
wait_for READY-FOR-SIGTERM 60 || exit 1
s0=$(now_ms)
kill -TERM $tapir
wait $tapir
echo "tapir-status=$?"
echo "SIGTERM-MS $(( $(now_ms) - s0 ))"
echo "MACVTAPS-LEFT $(ip -n $VM_NS -o link show type macvtap | grep -c tpr)"
echo "STDERR-LINES $(wc -l <$D/stderr.txt)"
show
"#;

#[test]
#[ignore = "needs root, KVM or the lab (QEMU), namespaces and the guest image: run by scripts/test"]
fn a_hostile_guest_cannot_hang_bloat_or_crash_tapir() {
    let dir = scratch_dir("hostile");
    let guest = GUEST.replace("SECONDS", &PATTERN_SECONDS.to_string());
    let initrd = initramfs_with_script(&dir, &guest);
    let kernel = guest_file("bzImage");
    // A nested guest in the lab sometimes dies while it boots, with any VMM (issue 12): a run
    // whose guest never reached the patterns says nothing about them and is tried again, twice
    // at most, saying why. A guest that triple-faults after HOSTILE-START is, in the lab only, run
    // once more like every lab script's (its first run kept in target/lab-retries): it happened in
    // 2 of about 8 full CI runs, both times during stash-flood, unexplained so far; a second one
    // fails the test, and on a host with hardware virtualization the first does.
    let mut attempt = 1;
    let run = loop {
        let run = run_host_script_past_a_lab_crash(
            &dir,
            &["--timeout", "600", "--memory", "2048"],
            HOST,
            &[
                TAPIR,
                kernel.to_str().unwrap(),
                initrd.to_str().unwrap(),
                dir.to_str().unwrap(),
            ],
        );
        let died_booting = run.stdout.contains("TIMEOUT waiting for HOSTILE-START");
        if !died_booting || attempt == 3 {
            break run;
        }
        let why = run
            .stdout
            .lines()
            .find(|l| l.starts_with("tapir: ") && !l.contains("NIC counters"))
            .unwrap_or("no reason printed");
        println!("attempt {attempt}: the guest died before the patterns ({why}); booting again");
        attempt += 1;
    };
    // What the device did, pattern by pattern, as the guest saw it.
    for wanted in [
        "HOSTILE device: 5 queues",
        "HOSTILE avail-ahead queue 1: DEVICE_NEEDS_RESET",
        "HOSTILE avail-ahead queue 0: DEVICE_NEEDS_RESET",
        "HOSTILE bad-heads: DEVICE_NEEDS_RESET",
        "address 0 untouched; VQ_PAIRS_SET 2 refused",
        "HOSTILE ctrl-zero-status: returned, used length 0, status byte untouched",
        "renegotiation ignored",
        "HOSTILE reset-storm:",
        "s, 0 refused",
        "HOSTILE-STATUS 0",
        "PING-AFTER-HOSTILE ok",
        "tapir-status=0",
        "MACVTAPS-LEFT 0",
    ] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    // (sent, 2001, refused) chains; (posted, used) RX chains while frames arrived.
    let long = pattern_line(&run, "HOSTILE long-chain:");
    let (sent, empty) = (numbers(long)[0], numbers(long)[2]);
    assert!(
        sent > 0 && empty == sent,
        "every long chain refused: {long}\n{run}"
    );
    let flood = pattern_line(&run, "HOSTILE stash-flood:");
    assert!(
        numbers(flood)[1] > 0,
        "frames reached the flooded queue: {flood}\n{run}"
    );
    for line in [long, flood] {
        assert!(line.ends_with("no-NEEDS_RESET"), "{line}\n{run}");
    }

    // While the guest plays the patterns, the device thread works for every kick and frame (a
    // guest can always make its VMM work), but never a whole core; once the guest stops, with the
    // device left broken, Tapir is idle.
    let cpu = run.number("NON-VCPU-CPU-MS ");
    let wall = run.number("WALL-MS ");
    assert!(
        cpu * 4 < wall * 3,
        "Tapir's threads outside the vCPUs took {cpu} ms of {wall} ms: something spins\n{run}"
    );
    let quiet = run.number("QUIET-CPU-MS ");
    let quiet_wall = run.number("QUIET-WALL-MS ");
    assert!(
        quiet * 10 < quiet_wall,
        "{quiet} ms of CPU in {quiet_wall} ms with a quiet guest: something spins\n{run}"
    );
    let growth = run.number("RSS-GROWTH-KB ");
    assert!(growth < 16 << 10, "RSS grew by {growth} KiB\n{run}");
    let stop = run.number("SIGTERM-MS ");
    assert!(stop < 1000, "SIGTERM took {stop} ms\n{run}");
    // Rate-limited: a handful of lines per kind, whatever the guest repeats.
    let lines = run.number("STDERR-LINES ");
    assert!(lines < 60, "{lines} lines of log\n{run}");
    println!(
        "hostile guest: Tapir's non-vCPU threads {cpu} ms of CPU in {wall} ms, then {quiet} ms \
         in {quiet_wall} ms quiet; RSS {} KiB + {growth} KiB, SIGTERM {stop} ms, {lines} lines \
         on stderr",
        run.number("RSS-START-KB ")
    );
    for line in run.stdout.lines().filter(|l| l.starts_with("THREAD-TICKS")) {
        println!("{line}");
    }
    let driver_errors = run.number("driver_errors");
    assert!(driver_errors >= 3, "{run}");
}
