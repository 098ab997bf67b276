//! Host-test helpers: a network namespace per test with a veth pair (`peer0` 10.78.0.1/24, `lower0`),
//! entered by one thread with its own /sys; an AF_PACKET capture on `peer0`; frame builders and
//! checksum checks. Needs root; everything it creates is removed on drop, also when a test fails.

#![allow(dead_code)]

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

pub const PEER_IP: [u8; 4] = [10, 78, 0, 1];
pub const GUEST_IP: [u8; 4] = [10, 78, 0, 2];
pub const GUEST_MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x78, 0x00, 0x02];

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) {
    sh("ip", args);
}

pub fn sh(cmd: &str, args: &[&str]) -> String {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A network namespace with `peer0` (10.78.0.1/24) and `lower0`, a veth pair; lower0 has checksum and
/// segmentation offloads off, so whatever the macvtap hands it is checksummed and segmented in software
/// before it reaches peer0, where a capture can check it.
pub struct TestNs {
    pub name: String,
    pub scratch: PathBuf,
}

impl TestNs {
    pub fn new(tag: &str) -> Self {
        let name = format!("tapir-nb-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).output();
        ip(&["netns", "add", &name]);
        let scratch = std::env::temp_dir().join(&name);
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch).expect("scratch dir");
        let ns = TestNs { name, scratch };
        let n = ns.name.as_str();
        ip(&[
            "-n", n, "link", "add", "peer0", "type", "veth", "peer", "name", "lower0",
        ]);
        ip(&["-n", n, "addr", "add", "10.78.0.1/24", "dev", "peer0"]);
        for dev in ["lo", "peer0", "lower0"] {
            ip(&["-n", n, "link", "set", dev, "up"]);
        }
        sh(
            "ip",
            &[
                "netns", "exec", n, "ethtool", "-K", "lower0", "tx", "off", "tso", "off", "gso",
                "off",
            ],
        );
        ns
    }

    /// Adds a macvtap `name` on lower0 with the guest's MAC, as a user would with `ip link add`.
    pub fn add_macvtap(&self, name: &str) {
        let mac = mac_str(&GUEST_MAC);
        ip(&[
            "-n", &self.name, "link", "add", "link", "lower0", "name", name, "address", &mac,
            "type", "macvtap", "mode", "bridge",
        ]);
        ip(&["-n", &self.name, "link", "set", name, "up"]);
    }

    /// A static neighbour entry on peer0 for the guest's address, so the peer's stack sends to the
    /// guest's MAC without waiting for ARP answers that no guest gives.
    pub fn add_guest_neighbour(&self) {
        ip(&[
            "-n",
            &self.name,
            "neigh",
            "add",
            "10.78.0.2",
            "lladdr",
            &mac_str(&GUEST_MAC),
            "dev",
            "peer0",
        ]);
    }

    /// `ip -o link show` in the namespace: every link, one per line.
    pub fn links(&self) -> String {
        sh("ip", &["-n", &self.name, "-o", "link", "show"])
    }

    /// Names of the macvtap links in the namespace.
    pub fn macvtaps(&self) -> Vec<String> {
        sh(
            "ip",
            &["-n", &self.name, "-o", "link", "show", "type", "macvtap"],
        )
        .lines()
        .filter_map(|l| l.split(':').nth(1))
        .map(|n| n.trim().split('@').next().unwrap_or_default().to_string())
        .collect()
    }

    /// Runs `body` on a thread inside the namespace, with /sys remounted for it (a private mount
    /// namespace), and returns its result; a panic in `body` fails the caller.
    pub fn run<T: Send + 'static>(&self, body: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let ns = File::open(&path).unwrap_or_else(|e| panic!("opening {path}: {e}"));
            // SAFETY: setns and unshare affect only this thread; the fd is valid for the call.
            unsafe {
                assert_eq!(libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET), 0, "setns");
                assert_eq!(
                    libc::unshare(libc::CLONE_NEWNS | libc::CLONE_FS),
                    0,
                    "unshare"
                );
            }
            let root = c"/";
            let sys = c"/sys";
            let sysfs = c"sysfs";
            // SAFETY: the strings are NUL-terminated literals; the mounts land in this thread's private
            // mount namespace only.
            unsafe {
                assert_eq!(
                    libc::mount(
                        std::ptr::null(),
                        root.as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_SLAVE,
                        std::ptr::null()
                    ),
                    0,
                    "making / a slave"
                );
                assert_eq!(
                    libc::mount(
                        sysfs.as_ptr(),
                        sys.as_ptr(),
                        sysfs.as_ptr(),
                        0,
                        std::ptr::null()
                    ),
                    0,
                    "mounting sysfs: {}",
                    std::io::Error::last_os_error()
                );
            }
            body()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl Drop for TestNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }
}

pub fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

pub fn ifindex(name: &str) -> u32 {
    let c = std::ffi::CString::new(name).expect("name");
    // SAFETY: if_nametoindex reads the NUL-terminated name.
    let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
    assert!(i != 0, "no interface {name} here");
    i
}

/// Where udev would put macvtap `iface`'s device node in `dir` (call inside the namespace).
pub fn tap_node_path(dir: &Path, iface: &str) -> PathBuf {
    dir.join(format!("tap{}", ifindex(iface)))
}

/// Makes macvtap `iface`'s char device node at [`tap_node_path`], as udev would, and returns its path.
pub fn make_tap_node(dir: &Path, iface: &str) -> PathBuf {
    let node = tap_node_path(dir, iface);
    let dev = std::fs::read_to_string(format!(
        "/sys/class/net/{iface}/macvtap/tap{}/dev",
        ifindex(iface)
    ))
    .expect("sysfs dev");
    let (major, minor) = dev.trim().split_once(':').expect("MAJOR:MINOR");
    sh("mknod", &[node.to_str().expect("path"), "c", major, minor]);
    node
}

pub fn link_mac(name: &str) -> [u8; 6] {
    let text = std::fs::read_to_string(format!("/sys/class/net/{name}/address"))
        .expect("reading a MAC from sysfs");
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(text.trim().split(':')) {
        *b = u8::from_str_radix(part, 16).expect("hex");
    }
    mac
}

/// An AF_PACKET socket receiving everything that arrives on one interface (call inside the namespace).
pub struct Capture {
    fd: OwnedFd,
}

impl Capture {
    pub fn on(iface: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                proto.into(),
            )
        };
        assert!(
            fd >= 0,
            "AF_PACKET socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd was just created and is owned here.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; zeroed is a valid start.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex(iface) as i32;
        // SAFETY: bind reads a sockaddr_ll of the given size.
        let ret = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(ret, 0, "binding the capture to {iface}");
        let tv = libc::timeval {
            tv_sec: 0,
            tv_usec: 200_000,
        };
        // SAFETY: SO_RCVTIMEO reads a timeval of the given size.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            );
        }
        Capture { fd }
    }

    /// Frames received within `wait` that satisfy `keep`, until `want` of them arrived.
    pub fn collect(
        &self,
        want: usize,
        wait: Duration,
        keep: impl Fn(&[u8]) -> bool,
    ) -> Vec<Vec<u8>> {
        let deadline = Instant::now() + wait;
        let mut got = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while got.len() < want && Instant::now() < deadline {
            // SAFETY: recv writes at most buf.len() bytes into buf.
            let n =
                unsafe { libc::recv(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            if n > 0 && keep(&buf[..n as usize]) {
                got.push(buf[..n as usize].to_vec());
            }
        }
        got
    }
}

// ---- frames and checksums ----

pub fn ones_sum(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

pub fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    sum as u16
}

/// The pseudo-header sum a guest puts in the L4 checksum field with NEEDS_CSUM (folded, not inverted).
pub fn pseudo_sum(src: &[u8], dst: &[u8], proto: u8, l4_len: usize) -> u16 {
    let mut sum = ones_sum(src, 0);
    sum = ones_sum(dst, sum);
    sum += u32::from(proto);
    sum += (l4_len as u32) & 0xffff;
    sum += (l4_len as u32) >> 16;
    fold(sum)
}

/// Whether an L4 segment's checksum is right for this pseudo header.
pub fn l4_checksum_ok(src: &[u8], dst: &[u8], proto: u8, l4: &[u8]) -> bool {
    let sum = ones_sum(l4, u32::from(pseudo_sum(src, dst, proto, l4.len())));
    fold(sum) == 0xffff
}

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;

pub fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(1514);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

pub fn tcp_header(sport: u16, dport: u16, seq: u32, csum: u16) -> Vec<u8> {
    let mut t = Vec::with_capacity(20);
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&seq.to_be_bytes());
    t.extend_from_slice(&1u32.to_be_bytes()); // ack
    t.push(5 << 4); // data offset
    t.push(0x18); // PSH|ACK
    t.extend_from_slice(&65535u16.to_be_bytes());
    t.extend_from_slice(&csum.to_be_bytes());
    t.extend_from_slice(&[0, 0]);
    t
}

/// Ethernet + IPv4 + TCP with `payload`, the TCP checksum left as the pseudo-header sum (NEEDS_CSUM).
pub fn tcp4_frame(dst_mac: [u8; 6], src_mac: [u8; 6], seq: u32, payload: &[u8]) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&((20 + l4_len) as u16).to_be_bytes());
    ip.extend_from_slice(&[0x12, 0x34, 0x40, 0, 64, 6, 0, 0]);
    ip.extend_from_slice(&GUEST_IP);
    ip.extend_from_slice(&PEER_IP);
    let hsum = !fold(ones_sum(&ip, 0));
    ip[10..12].copy_from_slice(&hsum.to_be_bytes());
    tcp_frame(
        dst_mac, src_mac, ETH_IPV4, &ip, &GUEST_IP, &PEER_IP, seq, payload,
    )
}

/// Ethernet + the given IP header + TCP with `payload`, the TCP checksum left as the pseudo-header sum
/// for `src_ip`/`dst_ip`.
#[allow(clippy::too_many_arguments)]
fn tcp_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    ethertype: u16,
    ip: &[u8],
    src_ip: &[u8],
    dst_ip: &[u8],
    seq: u32,
    payload: &[u8],
) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut f = eth(dst_mac, src_mac, ethertype);
    f.extend_from_slice(ip);
    f.extend_from_slice(&tcp_header(
        40000,
        5001,
        seq,
        pseudo_sum(src_ip, dst_ip, 6, l4_len),
    ));
    f.extend_from_slice(payload);
    f
}

pub const GUEST_IP6: [u8; 16] = [0xfd, 0x78, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
pub const PEER_IP6: [u8; 16] = [0xfd, 0x78, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

/// Ethernet + IPv6 + TCP with `payload`, the TCP checksum left as the pseudo-header sum.
pub fn tcp6_frame(dst_mac: [u8; 6], src_mac: [u8; 6], seq: u32, payload: &[u8]) -> Vec<u8> {
    let l4_len = 20 + payload.len();
    let mut ip = vec![0x60, 0, 0, 0];
    ip.extend_from_slice(&(l4_len as u16).to_be_bytes());
    ip.extend_from_slice(&[6, 64]);
    ip.extend_from_slice(&GUEST_IP6);
    ip.extend_from_slice(&PEER_IP6);
    tcp_frame(
        dst_mac, src_mac, ETH_IPV6, &ip, &GUEST_IP6, &PEER_IP6, seq, payload,
    )
}

/// A payload whose bytes differ from segment to segment, so reordering or loss shows.
pub fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 251) as u8).collect()
}
