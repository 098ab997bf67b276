//! Guest-level tests of `tapir run`: the test guest boots on KVM (directly on a host with VT-x/AMD-V,
//! otherwise inside the KVM lab) and checks from inside what Tapir told it; the console works both
//! ways; every way a guest can stop ends Tapir with the right status and message.

use std::path::{Path, PathBuf};

use tapir_tests::{
    case_section, guest_file, initramfs_with_script, run_host_script, scratch_dir, Run,
};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

/// `target/<profile>/examples/boot`, built by `cargo test` next to this test's binary.
fn example_boot() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binaries live in target/<profile>/deps");
    profile_dir.join("examples/boot")
}

/// Runs a bash script on the KVM host with `args`; its output is the lab's (stdout and stderr merged).
fn run_script(dir: &Path, script: &str, args: &[&str]) -> Run {
    run_host_script(dir, &["--timeout", "400"], script, args)
}

fn assert_has(run: &Run, text: &str, name: &str, wanted: &[&str]) {
    for w in wanted {
        assert!(
            text.contains(w),
            "case {name}: lacks {w:?}\n{text}\n\nwhole run:\n{run}"
        );
    }
}

/// The guest checks its vCPU count, memory size and command line against what Tapir was told, that its
/// kernel printed no CPU/FPU warnings, and writes to the console.
const CHECK_SCRIPT: &str = r#"
want_cpus= want_mib=
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tapir.want_cpus=*) want_cpus=${arg#*=} ;;
        tapir.want_mib=*) want_mib=${arg#*=} ;;
    esac
done
set -- $(grep MemTotal /proc/meminfo); mem_kib=$2
cpus=$(grep -c ^processor /proc/cpuinfo)
echo "GUEST cpus=$cpus mem_kib=$mem_kib"
fail=0
[ "$cpus" = "$want_cpus" ] || { echo "GUEST-FAIL: $cpus vCPUs, want $want_cpus"; fail=1; }
# MemTotal is RAM less what the kernel keeps for itself: between 85% and 100% of it.
[ "$mem_kib" -ge $((want_mib * 1024 * 85 / 100)) ] && [ "$mem_kib" -le $((want_mib * 1024)) ] \
    || { echo "GUEST-FAIL: MemTotal $mem_kib kB for $want_mib MiB"; fail=1; }
grep -q "tapir.token=xyzzy-42" /proc/cmdline || { echo "GUEST-FAIL: command line lost"; fail=1; }
if dmesg | grep -iE "warning|firmware bug|bug:|consistency problem|mismatch|broken"; then
    echo "GUEST-FAIL: kernel warnings above"; fail=1
fi
echo "console write from pid $$" > /dev/console
exit $fail
"#;

#[test]
#[ignore = "needs root, KVM or the lab (QEMU) and the guest image: run by scripts/test"]
fn guest_sees_the_vcpus_memory_and_command_line_it_was_given() {
    let dir = scratch_dir("boot-shapes");
    let initrd = initramfs_with_script(&dir, CHECK_SCRIPT);
    let kernel = guest_file("bzImage");
    let script = r#"
T=$1 K=$2 I=$3
for shape in "1 256" "4 512" "2 3500"; do
    set -- $shape
    echo "=== case cpus=$1 mib=$2"
    timeout 120 "$T" run --kernel "$K" --initrd "$I" --cpus $1 --memory $2 --boot-timer \
        --cmdline "console=ttyS0 reboot=k panic=-1 tapir.token=xyzzy-42 tapir.want_cpus=$1 tapir.want_mib=$2" </dev/null
    echo "tapir-status=$?"
done
"#;
    let run = run_script(
        &dir,
        script,
        &[TAPIR, kernel.to_str().unwrap(), initrd.to_str().unwrap()],
    );
    for (cpus, mib) in [(1, 256), (4, 512), (2, 3500)] {
        let name = format!("cpus={cpus} mib={mib}");
        let out = case_section(&run, &name);
        assert!(
            !out.contains("GUEST-FAIL"),
            "case {name}: the guest disagrees\n{out}"
        );
        assert_has(
            &run,
            out,
            &name,
            &[
                &format!("GUEST cpus={cpus} "),
                "console write from pid",
                "TAPIR-EXIT 0",
                "tapir::boot_timer",
                "guest init started",
                "tapir: guest rebooted (i8042 reset)",
                "tapir-status=0",
            ],
        );
    }
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU) and the guest image: run by scripts/test"]
fn console_input_drives_the_guest_shell_without_losing_bytes() {
    let dir = scratch_dir("boot-console");
    // 64 lines of 99 characters: 100 times the UART's receive FIFO.
    let payload: String = (0..64)
        .map(|i| format!("{i:02}{}\n", "abcdefghij".repeat(10)[..97].to_owned()))
        .collect();
    std::fs::write(dir.join("payload.txt"), &payload).unwrap();
    let script = r#"
T=$1 K=$2 I=$3 D=$4
OUT=$D/console.out IN=$D/console.in
mkfifo "$IN"
exec 3<>"$IN"
"$T" run --kernel "$K" --initrd "$I" --console stdio <"$IN" >"$OUT" 2>&1 &
pid=$!
wait_for() {
    for _ in $(seq 1 600); do grep -q -- "$1" "$OUT" && return 0; sleep 0.1; done
    echo "TIMEOUT waiting for $1"; kill $pid; cat "$OUT"; exit 1
}
wait_for "/ # "
printf 'echo hello-$((6*7))\n' >&3
wait_for "hello-42"
printf 'cat > /tmp/in.txt\n' >&3
sleep 1
cat "$D/payload.txt" >&3
printf '\004' >&3
printf 'md5sum /tmp/in.txt\n' >&3
wait_for "$(md5sum <"$D/payload.txt" | cut -d' ' -f1)  /tmp/in.txt"
printf 'reboot -f\n' >&3
wait $pid
echo "=== case pipe"
echo "tapir-status=$?"
tail -n 3 "$OUT"

# On a terminal: raw mode while the guest runs, Ctrl-A x quits, the terminal comes back as it was.
echo "=== case tty"
script -qec "stty -g >$D/stty.before; $T run --kernel $K --initrd $I --console stdio; echo tapir-status=\$?; stty -g >$D/stty.after" /dev/null <"$IN" >"$D/tty.out" 2>&1 &
spid=$!
OUT=$D/tty.out
wait_for "/ # "
printf '\001x' >&3
wait $spid
cat "$D/tty.out" | tail -n 3
cmp -s "$D/stty.before" "$D/stty.after" && echo "terminal restored" || echo "terminal changed: $(cat $D/stty.before) -> $(cat $D/stty.after)"
"#;
    let kernel = guest_file("bzImage");
    let initrd = guest_file("initramfs.cpio.gz");
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    assert!(!run.stdout.contains("TIMEOUT"), "{run}");
    let pipe = case_section(&run, "pipe");
    assert_has(
        &run,
        pipe,
        "pipe",
        &["tapir-status=0", "tapir: guest rebooted"],
    );
    let tty = case_section(&run, "tty");
    assert_has(
        &run,
        tty,
        "tty",
        &[
            "tapir: stopped from the console (Ctrl-A x)",
            "tapir-status=0",
            "terminal restored",
        ],
    );
}

#[test]
#[ignore = "needs root, KVM or the lab (QEMU) and the guest image: run by scripts/test"]
fn every_way_the_guest_stops_ends_tapir_with_its_status() {
    let dir = scratch_dir("boot-stops");
    let initrd = initramfs_with_script(&dir, "echo guest-script-ran\nexit 0\n");
    let kernel = guest_file("bzImage");
    let plain = guest_file("initramfs.cpio.gz");
    let script = r#"
T=$1 K=$2 I=$3 PLAIN=$4 EXAMPLE=$5 D=$6
case_() { echo "=== case $1"; shift; timeout 120 "$@" </dev/null; echo "tapir-status=$?"; }
case_ reboot "$T" run --kernel "$K" --initrd "$I" --cmdline "console=ttyS0 tapir.exit=reboot"
case_ poweroff "$T" run --kernel "$K" --initrd "$I" --cmdline "console=ttyS0 tapir.exit=poweroff"
case_ poweroff-smp "$T" run --kernel "$K" --initrd "$I" --cpus 2 --cmdline "console=ttyS0 tapir.exit=poweroff"
case_ halt "$T" run --kernel "$K" --initrd "$I" --cmdline "console=ttyS0 tapir.exit=halt"
case_ panic "$T" run --kernel "$K" --cmdline "console=ttyS0 rdinit=/nonexistent panic=-1" --console file=$D/panic.txt
grep -q "Kernel panic - not syncing" $D/panic.txt && echo "console file has the panic"
case_ panic-spins "$T" run --kernel "$K" --cmdline "console=ttyS0 rdinit=/nonexistent panic=0"
case_ triple-fault "$T" run --kernel "$K" --initrd "$I" --cmdline "console=ttyS0 reboot=t"
case_ elf-vmlinux "$T" run --kernel "${K%/*}/vmlinux" --initrd "$I" --console none
case_ embedded "$EXAMPLE" "$K" "$I" 100

echo "=== case sigterm"
"$T" run --kernel "$K" --initrd "$PLAIN" --boot-timer --console file=$D/sigterm.txt 2>$D/sigterm.err </dev/null &
pid=$!
for _ in $(seq 1 600); do grep -q "guest init started" $D/sigterm.err && break; sleep 0.1; done
if ! grep -q "guest init started" $D/sigterm.err; then
    echo "no boot marker after 60 s; queue-state dump and console tail follow"
    kill -USR1 $pid; sleep 1
    tail -n 40 $D/sigterm.txt
fi
sleep 0.5
kill -TERM $pid
wait $pid
echo "tapir-status=$?"
cat $D/sigterm.err
pgrep -f "^$T" && echo "tapir still running" || echo "no tapir left"
"#;
    let example = example_boot();
    let run = run_script(
        &dir,
        script,
        &[
            TAPIR,
            kernel.to_str().unwrap(),
            initrd.to_str().unwrap(),
            plain.to_str().unwrap(),
            example.to_str().unwrap(),
            dir.to_str().unwrap(),
        ],
    );
    let cases: [(&str, &[&str]); 10] = [
        (
            "reboot",
            &[
                "guest-script-ran",
                "TAPIR-EXIT 0",
                "tapir: guest rebooted (i8042 reset)",
                "tapir-status=0",
            ],
        ),
        (
            "poweroff",
            &["TAPIR-EXIT 0", "tapir: guest powered off", "tapir-status=0"],
        ),
        (
            "poweroff-smp",
            &["TAPIR-EXIT 0", "tapir: guest powered off", "tapir-status=0"],
        ),
        (
            "halt",
            &["TAPIR-EXIT 0", "tapir: guest powered off", "tapir-status=0"],
        ),
        (
            "panic",
            &["tapir: guest kernel panicked: ", "tapir-status=3"],
        ),
        (
            "panic-spins",
            &[
                "---[ end Kernel panic",
                "tapir: guest kernel panicked: ",
                "tapir-status=3",
            ],
        ),
        (
            "triple-fault",
            &[
                "TAPIR-EXIT 0",
                "tapir: vCPU 0: triple fault (KVM_EXIT_SHUTDOWN)",
                "tapir-status=3",
            ],
        ),
        (
            "elf-vmlinux",
            &["tapir: guest rebooted (i8042 reset)", "tapir-status=0"],
        ),
        (
            "embedded",
            &[
                "guest-script-ran",
                "stopped: guest rebooted (i8042 reset)",
                "guest init after",
                "tapir-status=0",
            ],
        ),
        (
            "sigterm",
            &[
                "guest init started",
                "tapir: stopped by SIGTERM",
                "tapir-status=0",
                "no tapir left",
            ],
        ),
    ];
    for (name, wanted) in cases {
        assert_has(&run, case_section(&run, name), name, wanted);
    }
}
