//! `scripts/lib/bench-report`, the half of `scripts/bench` that turns measurements into the table and the
//! plots: medians, min-max and ratios come out right, every file is written, and a run that lacks a
//! figure is refused by name (the check `scripts/bench --quick` relies on in `scripts/test`).

use std::fs;
use std::path::Path;
use std::process::Command;

use tapir_tests::{repo_root, scratch_dir, Run};

const FIGURES: [&str; 25] = [
    "boot_s",
    "startup_ms",
    "rss_boot_kib",
    "rss_after_kib",
    "tcp_out_mbps",
    "tcp_in_mbps",
    "udp_out_kpps",
    "udp_in_kpps",
    "rtt_ms",
    "exits_per_pkt_tcp_out",
    "exits_per_pkt_tcp_in",
    "exits_per_pkt_udp_out",
    "exits_per_pkt_udp_in",
    "irqs_per_pkt_tcp_out",
    "irqs_per_pkt_tcp_in",
    "irqs_per_pkt_udp_out",
    "irqs_per_pkt_udp_in",
    "notifies_per_pkt_tcp_out",
    "notifies_per_pkt_tcp_in",
    "notifies_per_pkt_udp_out",
    "notifies_per_pkt_udp_in",
    "vmm_cpu_ms_per_kframe_tcp_out",
    "vmm_cpu_ms_per_kframe_tcp_in",
    "vmm_cpu_ms_per_kframe_udp_out",
    "vmm_cpu_ms_per_kframe_udp_in",
];

/// Three rounds: Tapir 1, 2, 3 (median 2) and QEMU 4, 5, 4 (median 4) for every figure, less `skip`.
fn raw_data(skip: Option<(&str, &str)>) -> String {
    let mut raw = String::from(
        "BENCH-INFO vmms tapir qemu\nBENCH-INFO command scripts/bench --quick\nBENCH-INFO seconds 2\n",
    );
    for round in 1..=3 {
        for (vmm, value) in [("tapir", round), ("qemu", [4, 5, 4][round - 1])] {
            for figure in FIGURES {
                if skip != Some((vmm, figure)) {
                    raw += &format!("BENCH {vmm} {round} {figure} {value}\n");
                }
            }
        }
    }
    raw
}

/// `--suite modes`: each figure of that suite, Tapir on macvtap 3 and on the bridge 6 in every round.
const MODES_FIGURES: [&str; 18] = [
    "tcp_out_mbps",
    "tcp_in_mbps",
    "udp_out_kpps",
    "udp_in_kpps",
    "rtt_ms",
    "rtt_p99_ms",
    "host_cpu_ms_per_kframe_tcp_out",
    "host_cpu_ms_per_kframe_tcp_in",
    "host_cpu_ms_per_kframe_udp_out",
    "host_cpu_ms_per_kframe_udp_in",
    "softirq_ms_per_kframe_tcp_out",
    "softirq_ms_per_kframe_tcp_in",
    "softirq_ms_per_kframe_udp_out",
    "softirq_ms_per_kframe_udp_in",
    "vmm_cpu_ms_per_kframe_tcp_out",
    "vmm_cpu_ms_per_kframe_tcp_in",
    "vmm_cpu_ms_per_kframe_udp_out",
    "vmm_cpu_ms_per_kframe_udp_in",
];

fn modes_raw_data() -> String {
    let mut raw = String::from(
        "BENCH-INFO vmms tapir tapir@bridge\nBENCH-INFO command scripts/bench --suite modes\n",
    );
    for round in 1..=2 {
        for (cfg, value) in [("tapir", 3), ("tapir@bridge", 6)] {
            for figure in MODES_FIGURES {
                raw += &format!("BENCH {cfg} {round} {figure} {value}\n");
            }
        }
    }
    raw
}

fn report(raw: &Path, out: &Path) -> Run {
    report_with(&[], raw, out)
}

fn report_with(options: &[&str], raw: &Path, out: &Path) -> Run {
    let output = Command::new("/usr/bin/python3")
        .arg(repo_root().join("scripts/lib/bench-report"))
        .args(options)
        .arg(raw)
        .arg(out)
        .output()
        .expect("starting /usr/bin/python3");
    Run {
        status: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

#[test]
#[ignore = "needs /usr/bin/python3 with matplotlib (scripts/test installs python3-matplotlib)"]
fn report_gives_medians_ranges_ratios_and_plots() {
    let dir = scratch_dir("bench-report");
    let raw = dir.join("raw.txt");
    fs::write(&raw, raw_data(None)).unwrap();
    let out = dir.join("out");
    let run = report(&raw, &out);
    assert_eq!(run.status, Some(0), "{run}");
    // One row per figure, and the TCP row with its median (min-max) for both and Tapir/QEMU = 2/4.
    let rows = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("| ") && !l.starts_with("| figure"));
    assert_eq!(rows.count(), FIGURES.len(), "{run}");
    run.assert_stdout_has(
        "| TCP guest→peer, Mbit/s (higher is better) | 2 (1-3) | 4 (4-5) | 0.50 |",
    );
    // RSS is shown in MiB: 2 KiB -> 0.0, so the ratio is still taken from the raw medians.
    run.assert_stdout_has("| RSS outside guest RAM, after boot, MiB (lower is better) | 0.0 (0.0-0.0) | 0.0 (0.0-0.0) | 0.50 |");
    let md = fs::read_to_string(out.join("benchmarks.md")).expect("benchmarks.md written");
    assert!(md.contains("`scripts/bench --quick`"), "{md}");
    assert!(md.contains("| 0.50 |"), "{md}");
    for png in ["boot-memory.png", "network.png", "per-frame.png"] {
        assert!(
            md.contains(&format!("](bench/{png})")),
            "{png} not linked\n{md}"
        );
        let bytes = fs::read(out.join("bench").join(png)).unwrap_or_else(|e| panic!("{png}: {e}"));
        assert!(bytes.starts_with(b"\x89PNG\r\n"), "{png} is not a PNG");
        assert!(
            bytes.len() > 10_000,
            "{png} is suspiciously small: {} bytes",
            bytes.len()
        );
    }
    assert_eq!(
        fs::read_to_string(out.join("bench/raw.txt")).unwrap(),
        raw_data(None)
    );
}

#[test]
#[ignore = "needs /usr/bin/python3 with matplotlib (scripts/test installs python3-matplotlib)"]
fn four_vmms_get_the_ratios_of_like_set_ups() {
    // Tapir 2, Tapir vhost=on 3, QEMU vhost=off 4, QEMU vhost=on 8 in every round: Tapir against
    // both QEMUs, Tapir vhost=on against QEMU vhost=on only.
    let mut raw = String::from("BENCH-INFO vmms tapir tapir-vhost qemu qemu-vhost\n");
    for round in 1..=2 {
        for (vmm, value) in [
            ("tapir", 2),
            ("tapir-vhost", 3),
            ("qemu", 4),
            ("qemu-vhost", 8),
        ] {
            for figure in FIGURES {
                raw += &format!("BENCH {vmm} {round} {figure} {value}\n");
            }
        }
    }
    let dir = scratch_dir("bench-report-four");
    fs::write(dir.join("raw.txt"), raw).unwrap();
    let run = report(&dir.join("raw.txt"), &dir.join("out"));
    assert_eq!(run.status, Some(0), "{run}");
    run.assert_stdout_has(
        "| Tapir / QEMU vhost=off | Tapir / QEMU vhost=on | Tapir vhost=on / QEMU vhost=on |",
    );
    run.assert_stdout_has(
        "| TCP guest→peer, Mbit/s (higher is better) | 2 (2-2) | 3 (3-3) | 4 (4-4) | 8 (8-8) | 0.50 | 0.25 | 0.38 |",
    );
}

#[test]
#[ignore = "needs /usr/bin/python3 (scripts/test installs it)"]
fn report_refuses_a_run_that_lacks_a_figure() {
    let dir = scratch_dir("bench-report-missing");
    let raw = dir.join("raw.txt");
    fs::write(&raw, raw_data(Some(("qemu", "rtt_ms")))).unwrap();
    let out = dir.join("out");
    let run = report(&raw, &out);
    assert_eq!(run.status, Some(1), "{run}");
    assert!(
        run.stderr
            .contains("figures missing from the run: qemu rtt_ms"),
        "{run}"
    );
    assert!(
        !out.join("benchmarks.md").exists(),
        "a report was written anyway"
    );

    // A value that is not a number counts as missing too.
    let garbled =
        raw_data(None).replace("BENCH tapir 1 boot_s 1\n", "BENCH tapir 1 boot_s 1.2.3\n");
    let garbled = garbled
        .lines()
        .filter(|l| {
            !(l.starts_with("BENCH tapir 2 boot_s") || l.starts_with("BENCH tapir 3 boot_s"))
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&raw, garbled).unwrap();
    let run = report(&raw, &out);
    assert_eq!(run.status, Some(1), "{run}");
    assert!(run.stderr.contains("tapir boot_s"), "{run}");
}

#[test]
#[ignore = "needs /usr/bin/python3 with matplotlib (scripts/test installs python3-matplotlib)"]
fn modes_report_is_a_section_that_both_suites_keep() {
    let dir = scratch_dir("bench-report-modes");
    let (net_raw, modes_raw) = (dir.join("net.txt"), dir.join("modes.txt"));
    fs::write(&net_raw, raw_data(None)).unwrap();
    fs::write(&modes_raw, modes_raw_data()).unwrap();
    let out = dir.join("out");
    let net_row = "| TCP guest→peer, Mbit/s (higher is better) | 2 (1-3) | 4 (4-5) | 0.50 |";
    let modes_row = "| TCP guest→peer, Mbit/s (higher is better) | 3 (3-3) | 6 (6-6) | 0.50 |";

    let run = report(&net_raw, &out);
    assert_eq!(run.status, Some(0), "{run}");
    let run = report_with(&["--suite", "modes"], &modes_raw, &out);
    assert_eq!(run.status, Some(0), "{run}");
    run.assert_stdout_has(modes_row);
    let md = fs::read_to_string(out.join("benchmarks.md")).unwrap();
    assert!(
        md.contains(net_row),
        "the modes report dropped the net table\n{md}"
    );
    assert!(md.contains(modes_row), "{md}");
    assert!(md.contains("](bench/modes.png)"), "{md}");
    let png = fs::read(out.join("bench/modes.png")).expect("modes.png");
    assert!(png.starts_with(b"\x89PNG\r\n"), "modes.png is not a PNG");

    // The net suite again: its table is rewritten and the modes section stays, once.
    let run = report(&net_raw, &out);
    assert_eq!(run.status, Some(0), "{run}");
    let md = fs::read_to_string(out.join("benchmarks.md")).unwrap();
    assert_eq!(md.matches(modes_row).count(), 1, "{md}");
    assert_eq!(md.matches(net_row).count(), 1, "{md}");
    // And the modes suite again: one section, not two.
    let run = report_with(&["--suite", "modes"], &modes_raw, &out);
    assert_eq!(run.status, Some(0), "{run}");
    let md = fs::read_to_string(out.join("benchmarks.md")).unwrap();
    assert_eq!(
        md.matches("## macvtap against a Linux bridge + tap")
            .count(),
        1,
        "{md}"
    );

    // A configuration lacking a figure is refused by name.
    let lacking = modes_raw_data().replace("BENCH tapir@bridge 2 rtt_p99_ms 6\n", "");
    let lacking = lacking.replace("BENCH tapir@bridge 1 rtt_p99_ms 6\n", "");
    fs::write(&modes_raw, lacking).unwrap();
    let run = report_with(&["--suite", "modes"], &modes_raw, &dir.join("out2"));
    assert_eq!(run.status, Some(1), "{run}");
    assert!(run.stderr.contains("tapir@bridge rtt_p99_ms"), "{run}");
}
