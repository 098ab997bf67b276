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

    /// The rest of the first stdout line that starts with `prefix` (leading blanks ignored),
    /// trimmed; panics, showing the run, when there is none.
    pub fn line_value(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find_map(|l| l.trim().strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no line starting with {prefix:?}\n{self}"))
            .trim()
    }

    /// The number that follows `prefix` on its line (the first column of a `--stats` row).
    pub fn number(&self, prefix: &str) -> u64 {
        self.line_value(prefix)
            .split_whitespace()
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number after {prefix:?}\n{self}"))
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

/// What scripts/lab says when its inner host itself went down under the command (the outer QEMU
/// exited): the lab failed, not the command.
const LAB_DIED: &str = "the inner host stopped while the command was running";
/// What scripts/lab says when its timeout ran out.
const LAB_TIMED_OUT: &str = "lab: error: timed out after";

/// Runs `scripts/lab LAB_ARGS -- CMD...` from the repository root and waits for it. The lab's
/// inner host (QEMU TCG emulating SVM) now and then goes down or hangs by itself; such a run (the
/// lab says its host stopped, or it timed out before the command printed anything) says nothing
/// about the command and is run once more, saying so.
pub fn lab(lab_args: &[&str], cmd: &[&str]) -> Run {
    let once = || {
        let out = Command::new(repo_root().join("scripts/lab"))
            .args(lab_args)
            .arg("--")
            .args(cmd)
            .current_dir(repo_root())
            .stdin(std::process::Stdio::null())
            .output()
            .expect("starting scripts/lab");
        Run::from_output(out)
    };
    let run = once();
    if run.status == Some(125) && run.stderr.contains(LAB_DIED) {
        println!("the lab's inner host went down under the command; running it once more\n{run}");
        return once();
    }
    // An inner host that hangs (seen: no output and an idle QEMU until the timeout) looks the same
    // from here as a command that printed nothing: once more, then it fails like any timeout.
    if run.status == Some(124) && run.stdout.trim().is_empty() && run.stderr.contains(LAB_TIMED_OUT)
    {
        println!("the lab timed out with no output from the command; running it once more\n{run}");
        return once();
    }
    run
}

/// True when this host's CPU has hardware virtualization (vmx/svm), so guests run on its own KVM.
pub fn host_has_hardware_kvm() -> bool {
    fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.split_whitespace().any(|w| w == "vmx" || w == "svm"))
        .unwrap_or(false)
}

/// Runs `cmd` where a guest can boot: directly on a host with hardware virtualization, otherwise
/// inside the KVM lab (with `lab_args`), from the repository root either way.
pub fn on_kvm_host(lab_args: &[&str], cmd: &[&str]) -> Run {
    if !host_has_hardware_kvm() {
        return lab(lab_args, cmd);
    }
    let out = Command::new(cmd[0])
        .args(&cmd[1..])
        .current_dir(repo_root())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("starting {}: {e}", cmd[0]));
    Run::from_output(out)
}

/// Writes `script` to `dir/host.sh` and runs it with bash and `args` where a guest can boot
/// ([`on_kvm_host`], with `lab_args` for the lab); in the lab its stdout and stderr come back merged.
pub fn run_host_script(dir: &Path, lab_args: &[&str], script: &str, args: &[&str]) -> Run {
    let path = dir.join("host.sh");
    fs::write(&path, script).expect("writing the host script");
    let mut cmd = vec!["bash", path.to_str().expect("utf-8 path")];
    cmd.extend_from_slice(args);
    on_kvm_host(lab_args, &cmd)
}

/// What Tapir prints when a guest triple-faults.
const GUEST_TRIPLE_FAULT: &str = "triple fault (KVM_EXIT_SHUTDOWN)";

/// What a host script prints (with its VMM's queue-state dump) when its guest outlived the time the
/// script gives it, so that a stalled guest ends the script instead of the lab's timeout.
pub const GUEST_STALLED: &str = "GUEST-STALLED";

/// Where the first runs of repeated lab scripts are kept; scripts/test lists them at its end.
pub fn lab_retry_dir() -> PathBuf {
    repo_root().join("target/lab-retries")
}

/// [`run_host_script`] for a script whose guests never mean to triple-fault or stall. In the lab,
/// nested guests now and then crash with a triple fault under every VMM (QEMU too: docs/soak.md and
/// issue 12 count and trace them) or stop answering, so a run where one did is kept (in
/// [`lab_retry_dir`], named after `dir`, and printed) and run once more; a second failure fails
/// the test as any other. On a host with hardware virtualization nothing is run again.
pub fn run_host_script_past_a_lab_crash(
    dir: &Path,
    lab_args: &[&str],
    script: &str,
    args: &[&str],
) -> Run {
    let run = run_host_script(dir, lab_args, script, args);
    let failure = [GUEST_TRIPLE_FAULT, GUEST_STALLED]
        .into_iter()
        .find(|marker| run.stdout.contains(marker));
    let Some(failure) = failure else {
        return run;
    };
    if host_has_hardware_kvm() {
        return run;
    }
    let name = dir
        .file_name()
        .map_or("run".into(), |n| n.to_string_lossy());
    let kept = lab_retry_dir().join(format!("{name}.log"));
    let _ = fs::create_dir_all(lab_retry_dir());
    let _ = fs::write(&kept, format!("first run ({failure}):\n{run}"));
    println!(
        "{failure} in the lab; kept in {}; running the script once more\n{run}",
        kept.display()
    );
    run_host_script(dir, lab_args, script, args)
}

/// The output of one case of a host script that prints `=== case NAME` before each case (and may
/// print `=== end` after the last): from after that line to the next case or the end. Other lines
/// starting with `=== ` (the test guest's banner) stay inside.
pub fn case_section<'a>(run: &'a Run, name: &str) -> &'a str {
    let start = format!("=== case {name}\n");
    let at = run
        .stdout
        .find(&start)
        .unwrap_or_else(|| panic!("no case {name:?}\n{run}"));
    let rest = &run.stdout[at + start.len()..];
    let end = ["\n=== case ", "\n=== end"]
        .iter()
        .filter_map(|m| rest.find(m))
        .min()
        .map_or(rest.len(), |e| e + 1);
    &rest[..end]
}

/// Writes `script` as the guest's `/tapir/run` into a new initramfs (guest-images/with-script) in `dir`.
pub fn initramfs_with_script(dir: &Path, script: &str) -> PathBuf {
    initramfs_with_script_on(dir, script, &guest_file("initramfs.cpio.gz"))
}

/// [`initramfs_with_script`] on another base initramfs (a stock kernel's, `guest-images/out/debian/...`).
pub fn initramfs_with_script_on(dir: &Path, script: &str, base: &Path) -> PathBuf {
    let script_path = dir.join("run.sh");
    fs::write(&script_path, script).expect("writing the guest script");
    let out = dir.join("initramfs-run.cpio.gz");
    let status = Command::new(repo_root().join("guest-images/with-script"))
        .arg(&script_path)
        .arg(&out)
        .arg(base)
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

/// The members (name, contents) of a gzipped initramfs, every concatenated newc archive in turn, as
/// Linux unpacks it (`cpio -t` stops at the first archive's trailer).
pub fn initramfs_members(archive: &Path) -> Vec<(String, Vec<u8>)> {
    let out = Command::new("zcat")
        .arg(archive)
        .output()
        .expect("running zcat");
    assert!(out.status.success(), "zcat {} failed", archive.display());
    parse_newc(&out.stdout).unwrap_or_else(|e| panic!("{}: {e}", archive.display()))
}

fn parse_newc(mut data: &[u8]) -> Result<Vec<(String, Vec<u8>)>, String> {
    let pad4 = |n: usize| (4 - n % 4) % 4;
    let mut members = Vec::new();
    while !data.is_empty() {
        if data[0] == 0 {
            // zero padding between concatenated archives
            data = &data[1..];
            continue;
        }
        if data.len() < 110 || &data[..6] != b"070701" {
            return Err(format!(
                "no newc header where one should start ({} bytes left)",
                data.len()
            ));
        }
        let field = |i: usize| -> Result<usize, String> {
            let hex =
                std::str::from_utf8(&data[6 + 8 * i..14 + 8 * i]).map_err(|e| e.to_string())?;
            usize::from_str_radix(hex, 16).map_err(|e| e.to_string())
        };
        let (filesize, namesize) = (field(6)?, field(11)?);
        let name_end = 110 + namesize;
        let data_start = name_end + pad4(name_end);
        let data_end = data_start + filesize;
        if data.len() < data_end {
            return Err("truncated member".into());
        }
        let name = String::from_utf8_lossy(&data[110..name_end - 1]).into_owned();
        if name != "TRAILER!!!" {
            let name = name.trim_start_matches("./").to_string();
            members.push((name, data[data_start..data_end].to_vec()));
        }
        data = &data[(data_end + pad4(data_end)).min(data.len())..];
    }
    Ok(members)
}

/// The test guest's side of the traffic tests (its `/tapir/run`; it is 10.77.0.2 on the test
/// network, the peer 10.77.0.1 runs [`PEER_SERVERS`]): ping out, 100 MB down over HTTP and 100 MB
/// up with nc (checksums printed on both sides), iperf3 TCP both ways and UDP, then a driver
/// reset (unbind and bind virtio_net) while an iperf3 TCP stream flows, and a ping after it.
/// [`check_guest_traffic`] checks what it printed.
pub const GUEST_TRAFFIC: &str = r#"
peer=10.77.0.1
sleep 3   # the host pings us meanwhile
ping -c 3 -W 2 $peer && echo "PING-OUT ok"
echo "DOWN $(wget -q -O - http://$peer/blob | sha256sum | cut -c1-64)"
dd if=/dev/urandom of=/tmp/up bs=1M count=100 2>/dev/null
echo "UP-LOCAL $(sha256sum /tmp/up | cut -c1-64)"
nc $peer 5001 </tmp/up
rm /tmp/up
iperf3 -c $peer -t 3 -f m | grep -E 'receiver' | sed 's/^/TCP-OUT /'
iperf3 -c $peer -t 3 -f m -R | grep -E 'receiver' | sed 's/^/TCP-IN /'
iperf3 -c $peer -u -b 0 -l 64 -t 3 | grep -E 'receiver' | sed 's/^/UDP /'
# A driver reset while a TCP stream flows (its iperf3 fails, as it may): unbind and bind virtio_net
# again, configure, talk again.
iperf3 -c $peer -t 6 >/dev/null 2>&1 &
sleep 2
dev=$(basename $(readlink /sys/class/net/eth0/device))
echo -n $dev > /sys/bus/virtio/drivers/virtio_net/unbind
echo -n $dev > /sys/bus/virtio/drivers/virtio_net/bind
ip addr add 10.77.0.2/24 dev eth0 && ip link set eth0 up
sleep 1
ping -c 2 -W 2 $peer && echo "PING-AFTER-RESET ok"
wait
"#;

/// The peer's side of [`GUEST_TRAFFIC`], for a host script to `eval` once `scripts/lib/testnet up`
/// set PEER_NS and with D a scratch directory: a 100 MB blob over HTTP (its checksum printed as
/// PEER-SHA), an nc listener writing the upload to $D/upload.bin, an iperf3 server. The script
/// prints UP-PEER (the upload's checksum) and UP-BYTES at its end itself.
pub const PEER_SERVERS: &str = r#"
head -c 100M /dev/urandom >$D/blob
echo "PEER-SHA $(sha256sum <$D/blob | cut -c1-64)"
ip netns exec $PEER_NS busybox httpd -f -p 80 -h $D &
# nc's stdin must stay open: at EOF busybox nc shuts its side down, and the guest's nc quits early.
mkfifo $D/hold
exec 8<>$D/hold
ip netns exec $PEER_NS busybox nc -l -p 5001 <$D/hold >$D/upload.bin &
ip netns exec $PEER_NS iperf3 -s >/dev/null 2>&1 &
"#;

/// What every data plane must show for [`GUEST_TRAFFIC`]: pings both ways and after the driver
/// reset, 100 MB each way intact, an iperf3 rate above 0 for TCP both ways and UDP. The host
/// script must print PING-IN after pinging the guest, and UP-PEER after the guest is done.
pub fn check_guest_traffic(run: &Run) {
    for wanted in ["PING-IN ok", "PING-OUT ok", "PING-AFTER-RESET ok"] {
        assert!(run.stdout.contains(wanted), "lacks {wanted:?}\n{run}");
    }
    let peer_sha = run.line_value("PEER-SHA ");
    assert_eq!(
        run.line_value("DOWN "),
        peer_sha,
        "100 MB peer -> guest arrived intact"
    );
    assert_eq!(
        run.line_value("UP-PEER "),
        run.line_value("UP-LOCAL "),
        "100 MB guest -> peer arrived intact"
    );
    // A rate in any unit: a lab run beside other labs has moved UDP at 734 Kbits/sec.
    for prefix in ["TCP-OUT ", "TCP-IN ", "UDP "] {
        let line = run.line_value(prefix);
        let rate = line
            .split_whitespace()
            .collect::<Vec<_>>()
            .windows(2)
            .find(|w| w[1].ends_with("bits/sec"))
            .and_then(|w| w[0].parse::<f64>().ok());
        assert!(
            rate.is_some_and(|r| r > 0.0),
            "{prefix}: no rate above 0 in {line:?}\n{run}"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::parse_newc;

    fn member(name: &str, body: &[u8]) -> Vec<u8> {
        let mut out = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            1,
            0o100644,
            0,
            0,
            1,
            0,
            body.len(),
            0,
            0,
            0,
            0,
            name.len() + 1,
            0
        )
        .into_bytes();
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out.extend_from_slice(body);
        while out.len() % 4 != 0 {
            out.push(0);
        }
        out
    }

    #[test]
    fn newc_reads_every_concatenated_archive() {
        let mut data = member("init", b"#!/bin/sh\n");
        data.extend(member("TRAILER!!!", b""));
        data.extend([0u8; 512]);
        data.extend(member("tapir/run", b"exit 0\n"));
        data.extend(member("TRAILER!!!", b""));
        let members = parse_newc(&data).expect("valid archives");
        assert_eq!(
            members,
            vec![
                ("init".to_string(), b"#!/bin/sh\n".to_vec()),
                ("tapir/run".to_string(), b"exit 0\n".to_vec()),
            ]
        );
    }

    #[test]
    fn newc_rejects_garbage_and_truncation() {
        assert!(parse_newc(b"not an archive at all, clearly not").is_err());
        let whole = member("init", b"0123456789");
        assert!(parse_newc(&whole[..whole.len() - 6]).is_err());
    }
}
