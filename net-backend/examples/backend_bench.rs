//! Pushes frames through the macvtap backend and prints frames/s and Gbit/s for 64-byte, 1500-byte and
//! 64 KiB GSO frames, next to the same frames written with plain `write()` on the same fd (the kernel's
//! own ceiling). Needs root: it makes a network namespace `tapir-bench-<pid>` with a veth pair and a
//! macvtap, enters it, and deletes it on exit. Run it with `scripts/bench-backend`.
//!
//! usage: backend_bench [SECONDS_PER_RUN] [ROUNDS]   (defaults 1 and 3)

use std::os::fd::AsRawFd;
use std::process::Command;
use std::time::{Duration, Instant};

use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_TCPV4};
use tapir_net_backend::{
    NetBackend, Nic, NicSpec, OpenOptions, SendBuf, TapQueue, VnetHdr, VNET_HDR_LEN,
};

const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x79, 0x00, 0x02];

struct Netns(String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("running ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn setup() -> Result<Netns, String> {
    let name = format!("tapir-bench-{}", std::process::id());
    ip(&["netns", "add", &name])?;
    let ns = Netns(name);
    let n = ns.0.as_str();
    let mac = GUEST_MAC
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":");
    ip(&[
        "-n", n, "link", "add", "peer0", "type", "veth", "peer", "name", "lower0",
    ])?;
    ip(&["-n", n, "addr", "add", "10.79.0.1/24", "dev", "peer0"])?;
    for dev in ["lo", "peer0", "lower0"] {
        ip(&["-n", n, "link", "set", dev, "up"])?;
    }
    ip(&[
        "-n", n, "link", "add", "link", "lower0", "name", "mvt0", "address", &mac, "type",
        "macvtap", "mode", "bridge",
    ])?;
    ip(&["-n", n, "link", "set", "mvt0", "up"])?;
    let f = std::fs::File::open(format!("/run/netns/{n}"))
        .map_err(|e| format!("opening the namespace: {e}"))?;
    // SAFETY: setns on a valid namespace fd; affects this (the only) thread.
    if unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(format!("setns: {}", std::io::Error::last_os_error()));
    }
    // /sys must show this namespace's links: a private mount namespace with a fresh sysfs.
    // SAFETY: unshare and mount with NUL-terminated literals; only this process's mounts change.
    unsafe {
        if libc::unshare(libc::CLONE_NEWNS) != 0
            || libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_SLAVE,
                std::ptr::null(),
            ) != 0
            || libc::mount(
                c"sysfs".as_ptr(),
                c"/sys".as_ptr(),
                c"sysfs".as_ptr(),
                0,
                std::ptr::null(),
            ) != 0
        {
            return Err(format!(
                "remounting /sys: {}",
                std::io::Error::last_os_error()
            ));
        }
    }
    Ok(ns)
}

/// One frame with its vnet header, split (for writev) and contiguous (for write).
struct Load {
    name: &'static str,
    hdr: [u8; VNET_HDR_LEN],
    frame: Vec<u8>,
}

fn loads() -> Vec<Load> {
    let peer_mac = std::fs::read_to_string("/sys/class/net/peer0/address").unwrap_or_default();
    let mut dst = [0xffu8; 6];
    for (b, p) in dst.iter_mut().zip(peer_mac.trim().split(':')) {
        *b = u8::from_str_radix(p, 16).unwrap_or(0xff);
    }
    let eth = |ethertype: u16, len: usize| {
        let mut f = Vec::with_capacity(len);
        f.extend_from_slice(&dst);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&ethertype.to_be_bytes());
        f.resize(len, 0x5a);
        f
    };
    // 64 KiB TCP frame to a closed port on the peer: IPv4 + TCP headers, checksum left to the kernel.
    let mut tso = eth(0x0800, 14);
    let total = 65_535usize;
    let mut ip4 = vec![0x45, 0];
    ip4.extend_from_slice(&(total as u16).to_be_bytes());
    ip4.extend_from_slice(&[0, 0, 0x40, 0, 64, 6, 0, 0, 10, 79, 0, 2, 10, 79, 0, 1]);
    let mut sum: u32 = ip4
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    ip4[10..12].copy_from_slice(&(!(sum as u16)).to_be_bytes());
    tso.extend_from_slice(&ip4);
    tso.extend_from_slice(&[
        0x9c, 0x40, 0x13, 0x89, 0, 0, 0, 1, 0, 0, 0, 1, 0x50, 0x18, 0xff, 0xff, 0, 0, 0, 0,
    ]);
    tso.resize(14 + total, 0x5a);
    let gso = VnetHdr {
        flags: FLAG_NEEDS_CSUM,
        gso_type: GSO_TCPV4,
        hdr_len: 54,
        gso_size: 1460,
        csum_start: 34,
        csum_offset: 16,
        num_buffers: 0,
    };
    vec![
        Load {
            name: "64 B",
            hdr: VnetHdr::default().to_bytes(),
            frame: eth(0x88b5, 64),
        },
        Load {
            name: "1500 B",
            hdr: VnetHdr::default().to_bytes(),
            frame: eth(0x88b5, 1514),
        },
        Load {
            name: "64 KiB GSO",
            hdr: gso.to_bytes(),
            frame: tso,
        },
    ]
}

/// Frames and payload bytes written in `secs` seconds, by the backend (writev) or plain write().
fn run(queue: &mut TapQueue, load: &Load, secs: f64, plain: bool) -> (f64, f64) {
    let joined: Vec<u8> = load.hdr.iter().chain(load.frame.iter()).copied().collect();
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let start = Instant::now();
    let mut frames = 0u64;
    while Instant::now() < deadline {
        for _ in 0..64 {
            let done = if plain {
                // SAFETY: write reads `joined.len()` bytes from a live buffer.
                let n =
                    unsafe { libc::write(queue.as_raw_fd(), joined.as_ptr().cast(), joined.len()) };
                n > 0
            } else {
                matches!(
                    queue.write_frame(&[SendBuf::new(&load.hdr), SendBuf::new(&load.frame)]),
                    Ok(Some(_))
                )
            };
            frames += u64::from(done);
        }
    }
    let t = start.elapsed().as_secs_f64();
    (
        frames as f64 / t,
        frames as f64 * load.frame.len() as f64 * 8.0 / t / 1e9,
    )
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("backend_bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let rounds: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(3).max(1);
    // Dropped when bench() returns, on every path: the namespace goes with it.
    let _ns = setup().map_err(|e| format!("setting up the namespace: {e} (run as root)"))?;
    let spec: NicSpec = "macvtap=mvt0".parse().map_err(|e| format!("{e}"))?;
    let opts = OpenOptions {
        runtime_dir: std::env::temp_dir().join(format!("tapir-bench-{}", std::process::id())),
        ..OpenOptions::default()
    };
    let mut nic = Nic::open(&spec, &opts).map_err(|e| e.to_string())?;
    let queue = &mut nic.queues_mut()[0];
    println!("Frames written to macvtap mvt0 (veth lower0 -> peer0), {secs} s per run, median of {rounds} rounds (A B alternating)\n");
    println!("| frame | backend writev frames/s | backend Gbit/s | plain write() frames/s | plain write() Gbit/s | backend/plain |");
    println!("|---|---:|---:|---:|---:|---:|");
    for load in loads() {
        let (mut a_fps, mut a_gbps, mut b_fps, mut b_gbps) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            let (f, g) = run(queue, &load, secs, false);
            a_fps.push(f);
            a_gbps.push(g);
            let (f, g) = run(queue, &load, secs, true);
            b_fps.push(f);
            b_gbps.push(g);
        }
        let (af, ag, bf, bg) = (median(a_fps), median(a_gbps), median(b_fps), median(b_gbps));
        println!(
            "| {} | {:.0} | {:.2} | {:.0} | {:.2} | {:.2} |",
            load.name,
            af,
            ag,
            bf,
            bg,
            af / bf
        );
    }
    Ok(())
}
