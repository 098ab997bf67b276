//! Helpers shared by Tapir's guest-level tests: where the repository and the guest image are, running a
//! command in the KVM lab (`scripts/lab`), and building a guest initramfs with a `/tapir/run` script.
//!
//! The tests that use these need root, QEMU and a built guest image. They are `#[ignore]`d with a reason
//! that says so and are run by `scripts/test`, which installs and builds what they need.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ lives inside the repository")
        .to_path_buf()
}

/// The directory `guest-images/build` writes the test guest to.
pub fn guest_out() -> PathBuf {
    repo_root().join("guest-images/out")
}

/// A path inside the guest image's output directory that must exist; panics with the fix when it doesn't.
pub fn guest_file(name: &str) -> PathBuf {
    let path = guest_out().join(name);
    assert!(
        path.exists(),
        "{} is missing: run guest-images/build first",
        path.display()
    );
    path
}

/// A fresh scratch directory under `target/`, where the lab's inner host can read it (the host's root is
/// shared with it, `/tmp` included, but a directory under the repository is easier to find afterwards).
pub fn scratch_dir(test: &str) -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = repo_root()
        .join("target/test-scratch")
        .join(format!("{test}-{}-{n}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).expect("creating a scratch directory under target/");
    dir
}

/// What a finished command left: its exit status (None when killed by a signal) and its output.
#[derive(Debug)]
pub struct Run {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    fn from_output(out: Output) -> Self {
        Run {
            status: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// Panics, showing both streams, unless `text` appears in stdout.
    pub fn assert_stdout_has(&self, text: &str) {
        assert!(self.stdout.contains(text), "stdout lacks {text:?}\n{self}");
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

/// Runs `scripts/lab LAB_ARGS -- CMD...` from the repository root and waits for it.
pub fn lab(lab_args: &[&str], cmd: &[&str]) -> Run {
    let out = Command::new(repo_root().join("scripts/lab"))
        .args(lab_args)
        .arg("--")
        .args(cmd)
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .expect("starting scripts/lab");
    Run::from_output(out)
}

/// Writes `script` as the guest's `/tapir/run` into a new initramfs (guest-images/with-script) in `dir`.
pub fn initramfs_with_script(dir: &Path, script: &str) -> PathBuf {
    let script_path = dir.join("run.sh");
    fs::write(&script_path, script).expect("writing the guest script");
    let out = dir.join("initramfs-run.cpio.gz");
    let status = Command::new(repo_root().join("guest-images/with-script"))
        .arg(&script_path)
        .arg(&out)
        .status()
        .expect("starting guest-images/with-script");
    assert!(
        status.success(),
        "guest-images/with-script failed: {status}"
    );
    out
}

/// The command line that boots the test guest in QEMU `-M microvm` with KVM, the reference VMM the lab
/// measured (DESIGN.md): no ACPI, so QEMU announces virtio-mmio devices on the kernel command line, and
/// `reboot=t` so that the guest's reboot is a triple fault that ends QEMU (`-no-reboot`). The guest's boot
/// marker (one byte to port 0x402) goes to `marker` through an isa-debugcon.
pub fn qemu_microvm_args(kernel: &Path, initrd: &Path, append: &str, marker: &Path) -> Vec<String> {
    [
        "qemu-system-x86_64",
        "-M",
        "microvm,x-option-roms=off,rtc=off,acpi=off",
        "-enable-kvm",
        "-cpu",
        "host",
        "-m",
        "256",
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-no-reboot",
        "-serial",
        "stdio",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([
        "-chardev".into(),
        format!("file,id=mark,path={}", marker.display()),
        "-device".into(),
        "isa-debugcon,iobase=0x402,chardev=mark".into(),
        "-kernel".into(),
        kernel.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        format!("console=ttyS0 reboot=t panic=-1 {append}"),
    ])
    .collect()
}
