//! The test guest built by `guest-images/build`: its initramfs holds what the init needs, its kernel has the
//! options the fragment asks for, and it boots under QEMU with KVM inside the lab, printing the banner,
//! sending the boot marker and reporting `/tapir/run`'s status.

use std::process::Command;
use tapir_tests::{
    guest_file, initramfs_members, initramfs_with_script, lab, qemu_microvm_args, scratch_dir,
};

/// The member names of a guest initramfs.
fn names(archive: &std::path::Path) -> Vec<String> {
    initramfs_members(archive)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

#[test]
#[ignore = "needs the guest image built by guest-images/build: run by scripts/test"]
fn guest_initramfs_holds_what_init_needs() {
    let members = names(&guest_file("initramfs.cpio.gz"));
    for needed in [
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/mount",
        "bin/tapir-mark",
        "bin/tapir-hostile",
        "bin/ping",
        "usr/bin/nc",
        "usr/bin/wget",
        "sbin/ip",
        "bin/stty",
        "bin/cttyhack",
        "sbin/reboot",
        "usr/bin/iperf3",
        "lib64/ld-linux-x86-64.so.2",
        "etc/passwd",
    ] {
        assert!(
            members.iter().any(|m| m == needed),
            "initramfs lacks {needed}"
        );
    }
    // iperf3 is dynamic: the libraries ldd names on the host must be in the image too.
    let ldd = Command::new("ldd")
        .arg("/usr/bin/iperf3")
        .output()
        .expect("running ldd");
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let lib = lib.trim_start_matches('/');
        assert!(
            members.iter().any(|m| m == lib),
            "initramfs lacks iperf3's {lib}"
        );
    }
}

#[test]
#[ignore = "needs the guest image built by guest-images/build: run by scripts/test"]
fn guest_kernel_has_the_fragment_options() {
    let config =
        std::fs::read_to_string(guest_file("kernel.config")).expect("reading the kernel config");
    let fragment =
        std::fs::read_to_string(tapir_tests::repo_root().join("guest-images/kernel.config"))
            .expect("reading guest-images/kernel.config");
    let wanted: Vec<&str> = fragment
        .lines()
        .filter(|l| l.starts_with("CONFIG_"))
        .collect();
    assert!(wanted.len() > 20, "the fragment lost its options");
    for line in wanted {
        assert!(
            config.lines().any(|l| l == line),
            "kernel built without {line}"
        );
    }
    for must_be_off in ["CONFIG_MODULES=y", "CONFIG_ACPI=y"] {
        assert!(
            !config.lines().any(|l| l == must_be_off),
            "{must_be_off} should be off"
        );
    }
    assert!(guest_file("bzImage").metadata().expect("bzImage").len() > 500_000);
    assert!(guest_file("vmlinux").metadata().expect("vmlinux").len() > 1_000_000);
}

#[test]
#[ignore = "needs the guest image built by guest-images/build: run by scripts/test"]
fn with_script_appends_tapir_run() {
    let dir = scratch_dir("with-script");
    let initrd = initramfs_with_script(&dir, "echo hi\n");
    let members = initramfs_members(&initrd);
    let run = members.iter().find(|(name, _)| name == "tapir/run");
    assert_eq!(
        run.map(|(_, body)| body.as_slice()),
        Some(&b"echo hi\n"[..])
    );
    assert!(
        members.iter().any(|(name, _)| name == "init"),
        "the base archive is gone"
    );
}

#[test]
#[ignore = "needs root, QEMU and the guest image (boots it with KVM inside the lab): run by scripts/test"]
fn qemu_boots_guest_in_lab_and_reports_script_status() {
    let dir = scratch_dir("qemu-guest");
    let ok = initramfs_with_script(
        &dir,
        "echo guest-cpus=$(nproc)\necho guest-cmdline=$(cat /proc/cmdline)\nexit 0\n",
    );
    let failing_dir = dir.join("failing");
    std::fs::create_dir_all(&failing_dir).expect("scratch subdirectory");
    let failing = initramfs_with_script(&failing_dir, "echo about-to-fail\nexit 3\n");
    let kernel = guest_file("bzImage");
    let marker = dir.join("boot-marker");

    let quoted = |args: Vec<String>| -> String {
        args.iter()
            .map(|a| format!("'{a}'"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    let first = quoted(qemu_microvm_args(
        &kernel,
        &ok,
        "tapir.ip=10.0.0.2/24",
        &marker,
    ));
    let second = quoted(qemu_microvm_args(
        &kernel,
        &failing,
        "",
        &dir.join("marker2"),
    ));
    // Both boots in one lab run; the marker file is read inside, where QEMU wrote it.
    let script = format!(
        "{first}; echo qemu-status=$?; echo marker=$(cat {m}); {second}; echo qemu-status=$?",
        m = marker.display()
    );
    let run = lab(&[], &["sh", "-c", &script]);
    assert_eq!(run.status, Some(0), "{run}");
    run.assert_stdout_has("=== Tapir test guest");
    run.assert_stdout_has("guest-cpus=1");
    run.assert_stdout_has("tapir.ip=10.0.0.2/24");
    run.assert_stdout_has("TAPIR-EXIT 0");
    run.assert_stdout_has("marker=T");
    run.assert_stdout_has("about-to-fail");
    run.assert_stdout_has("TAPIR-EXIT 3");
    // reboot=t + -no-reboot: QEMU exits 0 when the guest reboots after its script.
    assert_eq!(run.stdout.matches("qemu-status=0").count(), 2, "{run}");
}
