//! `scripts/lab` behaves like a command: the inner command's status and output come back, and every way
//! the lab itself can fail is reported with status 125 (124 for a timeout) and a message.

use tapir_tests::{lab, repo_root, scratch_dir};

#[test]
#[ignore = "needs root and QEMU (boots the KVM lab): run by scripts/test"]
fn lab_runs_command_with_kvm_and_returns_zero() {
    let run = lab(
        &[],
        &[
            "sh",
            "-c",
            "echo lab-says-hello; ls -l /dev/kvm; echo svm=$(grep -c svm /proc/cpuinfo); \
             pwd; echo home=$HOME; lsmod | cut -d' ' -f1 | sort | tr '\\n' ' '",
        ],
    );
    assert_eq!(run.status, Some(0), "{run}");
    run.assert_stdout_has("lab-says-hello");
    let kvm = run
        .stdout
        .lines()
        .find(|l| l.ends_with("/dev/kvm"))
        .unwrap_or_else(|| panic!("no /dev/kvm line\n{run}"));
    assert!(kvm.starts_with('c'), "/dev/kvm is not a char device: {kvm}");
    let svm: u32 = run
        .stdout
        .lines()
        .find_map(|l| l.strip_prefix("svm="))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no svm count\n{run}"));
    assert!(svm > 0, "the inner host has no svm flag\n{run}");
    // Same working directory and environment as the caller.
    run.assert_stdout_has(&repo_root().display().to_string());
    run.assert_stdout_has(&format!(
        "home={}",
        std::env::var("HOME").unwrap_or_default()
    ));
    for module in ["kvm_amd", "veth", "macvtap", "tun", "vhost_net"] {
        assert!(
            run.stdout.split_whitespace().any(|m| m == module),
            "module {module} not loaded\n{run}"
        );
    }
}

#[test]
#[ignore = "needs root and QEMU (boots the KVM lab): run by scripts/test"]
fn lab_returns_nonzero_status_and_stderr_and_writes_stay_inside() {
    let dir = scratch_dir("lab-status");
    let probe = dir.join("written-inside");
    let cmd = format!(
        "echo to-stderr >&2; touch {0} && test -e {0} && echo wrote-inside; exit 7",
        probe.display()
    );
    let run = lab(&[], &["sh", "-c", &cmd]);
    assert_eq!(run.status, Some(7), "{run}");
    run.assert_stdout_has("to-stderr");
    run.assert_stdout_has("wrote-inside");
    assert!(
        !probe.exists(),
        "a write inside the lab reached the host: {}",
        probe.display()
    );
}

#[test]
#[ignore = "needs root and QEMU (boots the KVM lab): run by scripts/test"]
fn lab_reports_a_kernel_that_panics() {
    // No rdinit and no root device: the inner kernel panics before the command can run.
    let run = lab(&["--append", "rdinit=/nonexistent"], &["true"]);
    assert_eq!(run.status, Some(125), "{run}");
    assert!(
        run.stderr.contains("never reached the command"),
        "no failure message\n{run}"
    );
    assert!(
        run.stderr.contains("Kernel panic"),
        "the kernel's last lines are not shown\n{run}"
    );
}

#[test]
#[ignore = "needs root and QEMU (boots the KVM lab): run by scripts/test"]
fn lab_reports_missing_qemu_kernel_and_bad_arguments() {
    let run = lab(&["--qemu", "/nonexistent/qemu-system-x86_64"], &["true"]);
    assert_eq!(run.status, Some(125), "{run}");
    assert!(run.stderr.contains("QEMU not found"), "{run}");

    let run = lab(&["--kernel", "/nonexistent/vmlinuz"], &["true"]);
    assert_eq!(run.status, Some(125), "{run}");
    assert!(
        run.stderr
            .contains("kernel not found: /nonexistent/vmlinuz"),
        "{run}"
    );

    // A file that is not a kernel: QEMU refuses it and the lab says the inner host never started.
    let dir = scratch_dir("lab-bad-kernel");
    let bogus = dir.join("not-a-kernel");
    std::fs::write(&bogus, b"this is not a kernel").expect("writing a bogus kernel");
    let run = lab(&["--kernel", &bogus.display().to_string()], &["true"]);
    assert_eq!(run.status, Some(125), "{run}");
    assert!(run.stderr.contains("never reached the command"), "{run}");

    let run = lab(&["--memory", "lots"], &["true"]);
    assert_eq!(run.status, Some(125), "{run}");
    assert!(run.stderr.contains("not a positive number: lots"), "{run}");
}

#[test]
#[ignore = "needs root and QEMU (boots the KVM lab): run by scripts/test"]
fn lab_times_out_and_leaves_no_qemu_behind() {
    // A unique word on the inner kernel's command line finds this lab's QEMU among parallel ones.
    let marker = format!("tapir.test-timeout={}", std::process::id());
    let started = std::time::Instant::now();
    let run = lab(&["--timeout", "25", "--append", &marker], &["sleep", "600"]);
    assert_eq!(run.status, Some(124), "{run}");
    assert!(run.stderr.contains("timed out after 25 s"), "{run}");
    assert!(
        started.elapsed().as_secs() < 120,
        "the timeout did not stop the lab"
    );
    let ps = std::process::Command::new("pgrep")
        .args(["-f", &marker])
        .output()
        .expect("running pgrep");
    assert!(ps.stdout.is_empty(), "a lab QEMU is still running");
}
