//! `tapir`'s command line and the errors it reports before a guest runs. These need no guest, and
//! except where a test says so, no KVM and no root.

use std::process::{Command, Output};

use tapir_tests::{guest_file, scratch_dir};

const TAPIR: &str = env!("CARGO_BIN_EXE_tapir");

fn tapir(args: &[&str]) -> Output {
    Command::new(TAPIR)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("starting tapir")
}

/// Runs tapir through `sh -c` so a test can set limits or namespaces first.
fn tapir_sh(script: &str) -> Output {
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .env("TAPIR", TAPIR)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("starting sh")
}

/// Shell lines that make a network namespace `$ns` (`PREFIX-<shell pid>`, deleted when the script
/// exits) holding a veth end `lower0`, up, for a `link=lower0` NIC.
fn netns_with_veth(prefix: &str) -> String {
    format!(
        "ns={prefix}-$$\n\
         ip netns add $ns || exit 99\n\
         trap 'ip netns del $ns' EXIT\n\
         ip -n $ns link add lower0 type veth peer name peer0\n\
         ip -n $ns link set lower0 up\n"
    )
}

fn assert_fails(out: &Output, status: i32, message: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(status), "stderr: {stderr}");
    assert!(
        stderr.contains(message),
        "stderr lacks {message:?}: {stderr}"
    );
    assert!(!stderr.contains("panicked"), "tapir panicked: {stderr}");
}

#[test]
fn help_explains_every_option() {
    let out = tapir(&["run", "--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for option in [
        "--kernel",
        "--initrd",
        "--cmdline",
        "--cpus",
        "--memory",
        "--console",
        "--boot-timer",
        "--verbose",
        "Ctrl-A x",
        "Exit status",
    ] {
        assert!(help.contains(option), "run --help lacks {option}:\n{help}");
    }
    let out = tapir(&["--version"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("tapir "));
}

#[test]
fn usage_errors_exit_2() {
    assert_fails(&tapir(&[]), 2, "Usage");
    assert_fails(&tapir(&["run"]), 2, "--kernel");
    assert_fails(&tapir(&["run", "--kernel", "k", "--cpus", "-3"]), 2, "-3");
    assert_fails(
        &tapir(&["run", "--kernel", "k", "--console", "serial"]),
        2,
        "stdio, none or file=PATH",
    );
}

#[test]
fn bad_files_and_sizes_are_named() {
    let dir = scratch_dir("cli-errors");
    let text = dir.join("notes.txt");
    std::fs::write(&text, "not a kernel\n").unwrap();
    let text = text.to_str().unwrap();
    assert_fails(
        &tapir(&["run", "--kernel", "/nonexistent/bzImage"]),
        1,
        "opening kernel /nonexistent/bzImage: No such file",
    );
    assert_fails(
        &tapir(&["run", "--kernel", text]),
        1,
        &format!("{text} is not a kernel"),
    );
    assert_fails(
        &tapir(&["run", "--kernel", "/bin/true"]),
        1,
        "loading the ELF kernel /bin/true",
    );
    assert_fails(
        &tapir(&["run", "--kernel", "k", "--cpus", "0"]),
        1,
        "0 vCPUs asked for",
    );
    assert_fails(
        &tapir(&["run", "--kernel", "k", "--cpus", "33"]),
        1,
        "33 vCPUs asked for; Tapir supports 1 to 32",
    );
    assert_fails(
        &tapir(&["run", "--kernel", "k", "--memory", "16"]),
        1,
        "16 MiB of guest memory asked for; at least 32",
    );
    // Guest memory is allocated before anything else; an address-space limit makes that fail.
    assert_fails(
        &tapir_sh("ulimit -v 300000; exec \"$TAPIR\" run --kernel /nonexistent --memory 2048"),
        1,
        "allocating 2048 MiB of guest memory",
    );
}

#[test]
#[ignore = "needs the guest image: run by scripts/test"]
fn kernel_dependent_errors_are_named() {
    let kernel = guest_file("bzImage");
    let kernel = kernel.to_str().unwrap();
    let dir = scratch_dir("cli-initrd");
    let big = dir.join("big.cpio");
    std::fs::write(&big, vec![0u8; 40 << 20]).unwrap();
    assert_fails(
        &tapir(&[
            "run",
            "--kernel",
            kernel,
            "--initrd",
            big.to_str().unwrap(),
            "--memory",
            "32",
        ]),
        1,
        "initramfs of 41943040 bytes does not fit",
    );
    assert_fails(
        &tapir(&[
            "run",
            "--kernel",
            kernel,
            "--initrd",
            "/nonexistent.cpio.gz",
        ]),
        1,
        "opening initramfs /nonexistent.cpio.gz",
    );
    let long = format!("console=ttyS0 {}", "x".repeat(3000));
    assert_fails(
        &tapir(&["run", "--kernel", kernel, "--cmdline", &long]),
        1,
        "the kernel takes at most 2047",
    );
    assert_fails(
        &tapir(&[
            "run",
            "--kernel",
            kernel,
            "--console",
            "file=/nonexistent/dir/console.txt",
        ]),
        1,
        "opening the console output file=/nonexistent/dir/console.txt",
    );
}

#[test]
#[ignore = "needs root (a mount namespace, another user) and the guest image: run by scripts/test"]
fn kvm_that_is_missing_or_forbidden_is_named() {
    let kernel = guest_file("bzImage");
    let script = format!(
        "unshare -m sh -c 'mount -t tmpfs none /dev && exec \"$TAPIR\" run --kernel {}'",
        kernel.display()
    );
    assert_fails(
        &tapir_sh(&script),
        1,
        "opening /dev/kvm (is KVM loaded, and may this user open it?): No such file",
    );
    let script = format!(
        "exec setpriv --reuid=65534 --regid=65534 --clear-groups \"$TAPIR\" run --kernel {}",
        kernel.display()
    );
    assert_fails(
        &tapir_sh(&script),
        1,
        "opening /dev/kvm (is KVM loaded, and may this user open it?): Permission denied",
    );
}

#[test]
#[ignore = "needs root (a network namespace, veth, macvtap) and the guest image: run by scripts/test"]
fn sigterm_at_any_moment_of_set_up_leaves_no_macvtap() {
    // The stop signals are caught before the macvtap exists: a SIGTERM at any moment either
    // kills tapir before it made anything (status 143) or lets it finish building and stop through
    // its clean-up (status 0, or 1 where KVM is missing); a macvtap is never left behind.
    let kernel = guest_file("bzImage");
    let script = format!(
        r#"
{}for d in 0 0.001 0.002 0.004 0.007 0.01 0.015 0.02 0.03 0.05 0.08 0.13 0.2 0.3; do
    ip netns exec $ns "$TAPIR" run --kernel {} --console none --net link=lower0 2>/dev/null &
    pid=$!
    sleep $d
    kill -TERM $pid 2>/dev/null
    wait $pid
    echo "delay=$d status=$? macvtaps=$(ip -n $ns -o link show type macvtap | wc -l)"
done
"#,
        netns_with_veth("tapir-sigterm"),
        kernel.display()
    );
    let out = tapir_sh(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let runs: Vec<&str> = stdout.lines().filter(|l| l.starts_with("delay=")).collect();
    assert_eq!(
        runs.len(),
        14,
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for run in &runs {
        assert!(run.ends_with("macvtaps=0"), "{run}\n{stdout}");
        assert!(
            ["status=0 ", "status=1 ", "status=143 "]
                .iter()
                .any(|s| run.contains(s)),
            "{run}"
        );
    }
    assert!(
        runs.iter().any(|r| r.contains("status=0 ")),
        "at least one run was stopped through its clean-up: {stdout}"
    );
}

#[test]
#[ignore = "needs root (a network namespace, veth, macvtap) and the guest image: run by scripts/test"]
fn vhost_on_without_vhost_net_is_named_and_leaves_no_macvtap() {
    // Where the host has /dev/vhost-net, /dev/null is bound over it in a mount namespace of the
    // test's own: opening works, VHOST_SET_OWNER is refused; where it has none, opening fails.
    let kernel = guest_file("bzImage");
    let script = format!(
        r#"
{}unshare -m sh -c '[ ! -e /dev/vhost-net ] || mount --bind /dev/null /dev/vhost-net
    exec ip netns exec '$ns' "$TAPIR" run --kernel {} --console none --net link=lower0,vhost=on'
echo "status=$? macvtaps=$(ip -n $ns -o link show type macvtap | wc -l)"
"#,
        netns_with_veth("tapir-novhost"),
        kernel.display()
    );
    let out = tapir_sh(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stdout.contains("status=1 macvtaps=0"), "{stdout}\n{stderr}");
    for wanted in [
        "NIC link=lower0,mode=bridge,vhost=on: vhost=on needs the host kernel's vhost-net",
        "or use vhost=off",
        "vhost-net: ",
    ] {
        assert!(stderr.contains(wanted), "lacks {wanted:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn vhost_user_net_refuses_what_it_cannot_serve_and_says_what() {
    let dir = scratch_dir("cli-vu");
    let file = dir.join("not-a-socket");
    std::fs::write(&file, "keep me").unwrap();
    let sock = file.to_str().unwrap();
    let out = tapir(&["vhost-user-net", "--socket", sock, "--net", "fd=3"]);
    assert_fails(
        &out,
        1,
        "not-a-socket exists and is not a socket; refusing to replace it",
    );
    assert_eq!(std::fs::read_to_string(&file).unwrap(), "keep me");
    let sock = dir.join("vu.sock");
    let sock = sock.to_str().unwrap();
    let out = tapir(&["vhost-user-net", "--socket", sock, "--net", "fd=3,vhost=on"]);
    assert_fails(&out, 1, "vhost=on does not apply to a vhost-user backend");
    let out = tapir(&[
        "vhost-user-net",
        "--socket",
        sock,
        "--net",
        "fd=3",
        "--socket-mode",
        "9",
    ]);
    assert_fails(&out, 2, "is not an octal mode");
    let out = tapir(&["vhost-user-net", "--help"]);
    let help = String::from_utf8_lossy(&out.stdout);
    for wanted in [
        "--socket",
        "--socket-mode",
        "--net",
        "--stats",
        "share=on",
        "SIGTERM",
        "Exit status",
    ] {
        assert!(
            help.contains(wanted),
            "vhost-user-net --help lacks {wanted}:\n{help}"
        );
    }
}

#[test]
#[ignore = "needs root (a network namespace, veth, macvtap): run by scripts/test"]
fn a_hostile_frontend_gets_refusals_or_a_closed_socket_and_the_daemon_serves_on() {
    // vmm/tests/data/hostile_frontend.py connects once per case and sends one kind of nonsense
    // (garbage, a 4 GiB size, unknown requests, bad memory tables and rings, a hundred refusals in
    // a row); then an honest GET_FEATURES must still be answered and SIGTERM end the daemon with 0.
    let dir = scratch_dir("cli-vu-hostile");
    let frontend = tapir_tests::repo_root().join("vmm/tests/data/hostile_frontend.py");
    let script = format!(
        r#"
{}S={}/vu.sock
ip netns exec $ns "$TAPIR" vhost-user-net --socket $S --net link=lower0 2>{}/daemon.txt &
d=$!
for _ in $(seq 100); do [ -S $S ] && break; sleep 0.05; done
timeout 120 python3 {} $S
echo "frontend=$?"
kill -0 $d && echo "daemon alive"
kill -TERM $d; wait $d
echo "status=$?"
cat {}/daemon.txt >&2
"#,
        netns_with_veth("tapir-vuh"),
        dir.display(),
        dir.display(),
        frontend.display(),
        dir.display()
    );
    let out = tapir_sh(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.matches("case ").count(), 16, "{stdout}\n{stderr}");
    // the nonsense that breaks the messages' framing ends the connection
    for closed in [
        "case garbage: closed",
        "case a size of 4 GiB: closed",
        "case a wrong version: closed",
        "case a hundred refused requests: closed",
    ] {
        assert!(
            stdout.contains(closed),
            "lacks {closed:?}: {stdout}\n{stderr}"
        );
    }
    for wanted in [
        "honest: features 0x",
        "frontend=0",
        "daemon alive",
        "status=0",
    ] {
        assert!(
            stdout.contains(wanted),
            "lacks {wanted:?}: {stdout}\n{stderr}"
        );
    }
    assert!(stderr.contains("F_SEAL_SHRINK"), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
#[ignore = "needs root (a network namespace, veth, macvtap): run by scripts/test"]
fn vhost_user_net_serves_on_a_private_socket_and_leaves_nothing_behind() {
    // A daemon on a macvtap it creates: its socket is 0600, a second daemon on the same socket is
    // refused, SIGTERM ends it with status 0, its socket and macvtap gone; a NIC it cannot open is
    // named, with no socket left.
    let dir = scratch_dir("cli-vu-serve");
    let script = format!(
        r#"
{}S={}/vu.sock
ip netns exec $ns "$TAPIR" vhost-user-net --socket $S --net link=lower0 --stats 2>{}/daemon.txt &
d=$!
for _ in $(seq 100); do [ -S $S ] && break; sleep 0.05; done
echo "mode=$(stat -c %a $S) macvtaps=$(ip -n $ns -o link show type macvtap | wc -l)"
ip netns exec $ns "$TAPIR" vhost-user-net --socket $S --net link=lower0
echo "second=$?"
kill -TERM $d; wait $d
echo "status=$? macvtaps=$(ip -n $ns -o link show type macvtap | wc -l) socket=$(ls $S 2>/dev/null | wc -l)"
cat {}/daemon.txt >&2
ip netns exec $ns "$TAPIR" vhost-user-net --socket $S --net link=nowhere0
echo "nolink=$? socket=$(ls $S 2>/dev/null | wc -l)"
"#,
        netns_with_veth("tapir-vu"),
        dir.display(),
        dir.display(),
        dir.display()
    );
    let out = tapir_sh(&script);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    for wanted in [
        "mode=600 macvtaps=1",
        "second=1",
        "status=0 macvtaps=0 socket=0",
        "nolink=1 socket=0",
    ] {
        assert!(
            stdout.contains(wanted),
            "lacks {wanted:?}: {stdout}\n{stderr}"
        );
    }
    for wanted in [
        "vu.sock: another backend is listening there",
        "vhost-user-net: serving tpr",
        "tapir: NIC counters",
        "vhost-user-net: stopped by SIGTERM",
        "NIC link=nowhere0,mode=bridge: there is no network interface called nowhere0",
    ] {
        assert!(stderr.contains(wanted), "lacks {wanted:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}
