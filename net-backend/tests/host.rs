//! Host tests of the net backend on a real macvtap: each test has its own network namespace with a veth
//! pair and a macvtap on one end (see common/mod.rs). They need root, so they are `#[ignore]`d with the
//! reason and run by scripts/test.

mod common;

use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use common::*;
use tapir_net_backend::offload::TUN_F_CSUM;
use tapir_net_backend::vnet::{FLAG_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
use tapir_net_backend::{
    MacAddr, NetBackend, Nic, NicError, NicSpec, OpenOptions, RecvBuf, SendBuf, TapQueue, VnetHdr,
    VNET_HDR_LEN,
};

fn opts(ns: &TestNs) -> OpenOptions {
    let dev = ns.scratch.join("dev");
    std::fs::create_dir_all(&dev).expect("dev dir");
    OpenOptions {
        dev_dir: dev,
        runtime_dir: ns.scratch.join("run"),
        link_name: None,
    }
}

fn spec(text: &str) -> NicSpec {
    text.parse().unwrap_or_else(|e| panic!("{text}: {e}"))
}

fn write(queue: &mut TapQueue, hdr: VnetHdr, frame: &[u8]) {
    let bytes = hdr.to_bytes();
    let n = queue
        .write_frame(&[SendBuf::new(&bytes), SendBuf::new(frame)])
        .expect("writev to the macvtap")
        .expect("the macvtap would block");
    assert_eq!(n, VNET_HDR_LEN + frame.len());
}

/// Reads frames from `queue` for up to `wait`, returning (header, frame) of those `keep` accepts.
fn read_until(
    queue: &mut TapQueue,
    want: usize,
    wait: Duration,
    keep: impl Fn(&[u8]) -> bool,
) -> Vec<(VnetHdr, Vec<u8>)> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut hdr = [0u8; VNET_HDR_LEN];
    let mut body = vec![0u8; 65_600];
    while out.len() < want && Instant::now() < deadline {
        match queue
            .read_frame(&[RecvBuf::new(&mut hdr), RecvBuf::new(&mut body)])
            .expect("readv from the macvtap")
        {
            Some(n) => {
                assert!(n >= VNET_HDR_LEN, "short read of {n} bytes");
                let frame = body[..n - VNET_HDR_LEN].to_vec();
                if keep(&frame) {
                    out.push((VnetHdr::from_bytes(&hdr).expect("header"), frame));
                }
            }
            None => std::thread::sleep(Duration::from_millis(5)),
        }
    }
    out
}

fn is_tcp_to_5001(f: &[u8]) -> bool {
    let (ethertype, l3) = (u16::from_be_bytes([f[12], f[13]]), &f[14..]);
    match ethertype {
        ETH_IPV4 => l3.len() > 24 && l3[9] == 6 && l3[22..24] == 5001u16.to_be_bytes(),
        ETH_IPV6 => l3.len() > 44 && l3[6] == 6 && l3[42..44] == 5001u16.to_be_bytes(),
        _ => false,
    }
}

fn is_udp_to_guest(f: &[u8]) -> bool {
    f.len() > 42 && f[..6] == GUEST_MAC && f[12..14] == ETH_IPV4.to_be_bytes() && f[14 + 9] == 17
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_plain_frame_reaches_the_peer() {
    let ns = TestNs::new("plain");
    ns.add_macvtap("mvt0");
    let o = opts(&ns);
    ns.run(move || {
        let mut nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening macvtap mvt0");
        assert_eq!(nic.mac(), MacAddr(GUEST_MAC));
        assert_eq!(nic.mtu(), Some(1500));
        assert!(nic.link_running().expect("link state"));
        assert_eq!(
            nic.queues()[0]
                .kernel_vnet_hdr_len()
                .expect("TUNGETVNETHDRSZ"),
            VNET_HDR_LEN
        );
        // The node Tapir had to make (no udev) is gone once the queues are open.
        assert_eq!(
            std::fs::read_dir(&o.runtime_dir)
                .expect("runtime dir")
                .count(),
            0
        );

        let capture = Capture::on("peer0");
        let mut frame = eth(link_mac("peer0"), GUEST_MAC, 0x88b5);
        frame.extend_from_slice(&pattern(100));
        write(&mut nic.queues_mut()[0], VnetHdr::default(), &frame);
        let got = capture.collect(1, Duration::from_secs(3), |f| f[12..14] == [0x88, 0xb5]);
        assert_eq!(got, vec![frame]);
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_needs_csum_tcp_segment_arrives_with_correct_checksum() {
    let ns = TestNs::new("csum");
    ns.add_macvtap("mvt0");
    let o = opts(&ns);
    ns.run(move || {
        let mut nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening mvt0");
        let capture = Capture::on("peer0");
        let payload = pattern(1000);
        let frame = tcp4_frame(link_mac("peer0"), GUEST_MAC, 1000, &payload);
        let hdr = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type: GSO_NONE,
            csum_start: 34,
            csum_offset: 16,
            ..Default::default()
        };
        write(&mut nic.queues_mut()[0], hdr, &frame);
        let got = capture.collect(1, Duration::from_secs(3), is_tcp_to_5001);
        assert_eq!(got.len(), 1, "the segment did not reach the peer");
        let f = &got[0];
        assert_eq!(
            fold(ones_sum(&f[14..34], 0)),
            0xffff,
            "IPv4 header checksum"
        );
        assert!(
            l4_checksum_ok(&f[26..30], &f[30..34], 6, &f[34..]),
            "TCP checksum was not completed"
        );
        assert_eq!(&f[54..], &payload[..]);
        // The frame as sent had only the pseudo-header sum: the kernel really did the work.
        assert!(!l4_checksum_ok(
            &frame[26..30],
            &frame[30..34],
            6,
            &frame[34..]
        ));
    });
}

/// Sends one 64000-byte TSO frame and checks the peer got it as correct, contiguous segments.
fn tso_case(v6: bool) {
    let ns = TestNs::new(if v6 { "tso6" } else { "tso4" });
    ns.add_macvtap("mvt0");
    let o = opts(&ns);
    ns.run(move || {
        let mut nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening mvt0");
        let capture = Capture::on("peer0");
        let payload = pattern(64_000);
        let seq0 = 7_000_000u32;
        let (frame, l3_len, gso_type) = if v6 {
            (
                tcp6_frame(link_mac("peer0"), GUEST_MAC, seq0, &payload),
                40,
                GSO_TCPV6,
            )
        } else {
            (
                tcp4_frame(link_mac("peer0"), GUEST_MAC, seq0, &payload),
                20,
                GSO_TCPV4,
            )
        };
        let l4 = 14 + l3_len;
        // The MSS that fits the veth's 1500-byte MTU: 1460 for IPv4, 1440 for IPv6.
        let mss = 1500 - l3_len - 20;
        let hdr = VnetHdr {
            flags: FLAG_NEEDS_CSUM,
            gso_type,
            hdr_len: (l4 + 20) as u16,
            gso_size: mss as u16,
            csum_start: l4 as u16,
            csum_offset: 16,
            num_buffers: 0,
        };
        write(&mut nic.queues_mut()[0], hdr, &frame);
        let want = payload.len().div_ceil(mss);
        let segs = capture.collect(want, Duration::from_secs(5), is_tcp_to_5001);
        let sizes: Vec<usize> = segs.iter().map(Vec::len).collect();
        assert_eq!(
            segs.len(),
            want,
            "expected {want} segments, got sizes {sizes:?}"
        );
        let mut joined = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let data = &s[l4 + 20..];
            assert!(
                data.len() <= mss,
                "segment {i} carries {} bytes",
                data.len()
            );
            let seq = u32::from_be_bytes([s[l4 + 4], s[l4 + 5], s[l4 + 6], s[l4 + 7]]);
            assert_eq!(seq, seq0 + joined.len() as u32, "segment {i} out of order");
            let (src, dst) = if v6 {
                (&s[22..38], &s[38..54])
            } else {
                (&s[26..30], &s[30..34])
            };
            assert!(
                l4_checksum_ok(src, dst, 6, &s[l4..]),
                "segment {i}: bad TCP checksum"
            );
            if !v6 {
                assert_eq!(
                    fold(ones_sum(&s[14..34], 0)),
                    0xffff,
                    "segment {i}: bad IPv4 header checksum"
                );
                assert_eq!(
                    usize::from(u16::from_be_bytes([s[16], s[17]])),
                    s.len() - 14
                );
            } else {
                assert_eq!(
                    usize::from(u16::from_be_bytes([s[18], s[19]])),
                    s.len() - 54
                );
            }
            joined.extend_from_slice(data);
        }
        assert_eq!(joined, payload, "the segments do not add up to the payload");
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_tso_v4_frame_is_segmented_and_checksummed() {
    tso_case(false);
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_tso_v6_frame_is_segmented_and_checksummed() {
    tso_case(true);
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_peer_stack_frames_are_read_with_a_sensible_header() {
    let ns = TestNs::new("rx");
    ns.add_macvtap("mvt0");
    ns.add_guest_neighbour();
    let o = opts(&ns);
    ns.run(move || {
        let mut nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening mvt0");
        let sock = UdpSocket::bind("10.78.0.1:0").expect("UDP socket on the peer");
        let queue = &mut nic.queues_mut()[0];

        // No offloads: the kernel hands over finished frames.
        sock.send_to(b"hello from the peer", "10.78.0.2:9999")
            .expect("send");
        let got = read_until(queue, 1, Duration::from_secs(3), is_udp_to_guest);
        assert_eq!(got.len(), 1, "no UDP frame reached the macvtap");
        let (hdr, f) = &got[0];
        assert_eq!(hdr.gso_type, GSO_NONE);
        assert_eq!(hdr.flags & FLAG_NEEDS_CSUM, 0, "{hdr:?}");
        assert!(
            l4_checksum_ok(&f[26..30], &f[30..34], 17, &f[34..]),
            "UDP checksum"
        );
        assert_eq!(&f[42..], b"hello from the peer");

        // Checksum offload on: the host may leave the checksum to the guest, and says where it is.
        assert_eq!(
            queue.set_offloads(TUN_F_CSUM).expect("TUNSETOFFLOAD"),
            TUN_F_CSUM
        );
        sock.send_to(b"partial please", "10.78.0.2:9999")
            .expect("send");
        let got = read_until(queue, 1, Duration::from_secs(3), is_udp_to_guest);
        assert_eq!(got.len(), 1, "no UDP frame reached the macvtap");
        let (hdr, f) = &got[0];
        assert_eq!(hdr.flags & FLAG_NEEDS_CSUM, FLAG_NEEDS_CSUM, "{hdr:?}");
        assert_eq!((hdr.csum_start, hdr.csum_offset), (34, 6), "{hdr:?}");
        assert_eq!(&f[42..], b"partial please");
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_multiqueue_opens_and_spreads_flows() {
    let ns = TestNs::new("mq");
    ns.add_macvtap("mvt0");
    ns.add_guest_neighbour();
    let o = opts(&ns);
    ns.run(move || {
        let mut nic = Nic::open(&spec("macvtap=mvt0,queues=2"), &o).expect("opening two queues");
        assert_eq!(nic.queues().len(), 2);
        for port in 20000..20064u16 {
            let sock = UdpSocket::bind(("10.78.0.1", port)).expect("bind");
            sock.send_to(b"flow", "10.78.0.2:9999").expect("send");
        }
        let mut per_queue = Vec::new();
        for q in nic.queues_mut() {
            per_queue.push(read_until(q, 64, Duration::from_secs(2), is_udp_to_guest).len());
        }
        assert_eq!(per_queue.iter().sum::<usize>(), 64, "{per_queue:?}");
        assert!(
            per_queue.iter().all(|&n| n > 0),
            "flows not spread: {per_queue:?}"
        );
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_created_macvtap_is_deleted_on_drop_and_on_failure() {
    let ns = TestNs::new("create");
    let o = opts(&ns);
    let mac = "52:54:00:aa:bb:01";
    let name = ns.run({
        let o = o.clone();
        move || {
            let nic = Nic::open(&spec(&format!("link=lower0,mode=bridge,mac={mac}")), &o)
                .expect("creating a macvtap on lower0");
            assert!(nic.is_created());
            assert_eq!(nic.mac().to_string(), mac);
            assert_eq!(link_mac(nic.iface()), nic.mac().0);
            assert!(
                nic.supported_offloads() & TUN_F_CSUM != 0,
                "offloads: {:#x}",
                nic.supported_offloads()
            );
            nic.iface().to_string()
        }
    });
    assert!(
        ns.macvtaps().is_empty(),
        "{name} outlived its Nic: {:?}",
        ns.macvtaps()
    );

    // Opening fails after the macvtap exists (no directory can be made for its node): it is deleted too.
    let mut broken = o.clone();
    broken.runtime_dir = "/proc/version/tapir".into();
    let err = ns.run(move || Nic::open(&spec("link=lower0"), &broken).expect_err("no runtime dir"));
    assert!(matches!(err, NicError::MakeNode { .. }), "{err}");
    assert!(
        ns.macvtaps().is_empty(),
        "a failed open left {:?}",
        ns.macvtaps()
    );
}

/// Sends one UDP datagram from `src` to the guest (10.78.0.2:7) out of interface `dev` only, and
/// returns the UDP frames to the guest that the macvtap queue shows within a second.
fn udp_from(dev: &str, src: [u8; 4], queue: &mut TapQueue) -> Vec<Vec<u8>> {
    let sock = UdpSocket::bind((std::net::Ipv4Addr::from(src), 0)).expect("bind");
    // SAFETY: SO_BINDTODEVICE reads `dev.len()` bytes from a live &str.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        )
    };
    assert_eq!(
        rc,
        0,
        "SO_BINDTODEVICE {dev}: {}",
        std::io::Error::last_os_error()
    );
    sock.send_to(b"host to guest", (std::net::Ipv4Addr::from(GUEST_IP), 7))
        .expect("send_to");
    read_until(queue, 1, Duration::from_secs(1), |f| {
        is_udp_to_guest(f) && f[14 + 12..14 + 16] == src
    })
    .into_iter()
    .map(|(_, f)| f)
    .collect()
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_port_reaches_the_guest_where_the_lower_device_cannot() {
    let ns = TestNs::new("hostport");
    let o = opts(&ns);
    let guest_mac = mac_str(&GUEST_MAC);
    // The usual set-up: the host's address on the lower device. Frames from it leave by the wire
    // and never come back to a macvtap on the same device.
    ip(&[
        "-n",
        &ns.name,
        "addr",
        "add",
        "10.78.1.1/24",
        "dev",
        "lower0",
    ]);
    ip(&[
        "-n",
        &ns.name,
        "neigh",
        "add",
        "10.78.0.2",
        "lladdr",
        &guest_mac,
        "dev",
        "lower0",
    ]);
    let nic_spec = format!("link=lower0,mode=bridge,mac={guest_mac},host=10.78.0.50/24");
    let (lower, port, shown, through_port) = ns.run(move || {
        let mut nic = Nic::open(&spec(&nic_spec), &o).expect("link= with host=");
        let lower = udp_from("lower0", [10, 78, 1, 1], &mut nic.queues_mut()[0]);
        let port = tapir_net_backend::netlink::Rtnl::open()
            .and_then(|mut r| r.links())
            .expect("links")
            .into_iter()
            .find(|l| l.kind.as_deref() == Some("macvlan"))
            .expect("a macvlan for the host")
            .name;
        // `ip` runs in this thread's network namespace.
        let shown = sh("ip", &["-o", "addr", "show", "dev", &port]);
        ip(&[
            "neigh",
            "add",
            "10.78.0.2",
            "lladdr",
            &guest_mac,
            "dev",
            &port,
        ]);
        let through_port = udp_from(&port, [10, 78, 0, 50], &mut nic.queues_mut()[0]);
        (lower, port, shown, through_port)
    });
    assert!(shown.contains("10.78.0.50/24"), "{port}: {shown}");
    assert!(
        lower.is_empty(),
        "a frame from the lower device's own address reached the macvtap: {lower:?}"
    );
    assert_eq!(through_port.len(), 1, "nothing came through {port}");
    let links = ns.links();
    assert!(
        !links.contains(&port) && ns.macvtaps().is_empty(),
        "left behind: {links}"
    );
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_port_errors_say_why_and_leave_nothing() {
    let ns = TestNs::new("hosterr");
    let o = opts(&ns);
    let links_before = ns.links();
    ns.run(move || {
        let err = Nic::open(&spec("link=lower0,host=10.78.0.1/24"), &o).expect_err("in use");
        assert!(
            matches!(err, NicError::AddressInUse { ref iface, .. } if iface == "peer0"),
            "{err}"
        );
        assert!(err.to_string().contains("10.78.0.1/24"), "{err}");
        let err = Nic::open(&spec("link=nosuch2,host=10.78.0.50/24"), &o).expect_err("no lower");
        assert!(
            matches!(err, NicError::NoSuchLink(ref n) if n == "nosuch2"),
            "{err}"
        );
    });
    assert_eq!(ns.links(), links_before, "a failed open left links behind");
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_one_mac_twice_and_a_shared_passthru_are_refused_saying_why() {
    let ns = TestNs::new("passthru");
    let o = opts(&ns);
    let links_before = ns.links();
    ns.run(move || {
        let lower_mac = MacAddr(link_mac("lower0"));
        // Two guests asking for one MAC on one lower device.
        let first = Nic::open(&spec("link=lower0,mac=52:54:00:aa:bb:07"), &o).expect("first");
        let err = Nic::open(&spec("link=lower0,mode=vepa,mac=52:54:00:aa:bb:07"), &o)
            .expect_err("the same MAC again");
        assert!(
            matches!(err, NicError::MacInUse { ref holder, .. } if holder == first.iface()),
            "{err}"
        );
        // A passthru macvtap beside another one.
        let err = Nic::open(&spec("link=lower0,mode=passthru"), &o).expect_err("not alone");
        assert!(matches!(err, NicError::LowerTaken { .. }), "{err}");
        assert!(err.to_string().contains(first.iface()), "{err}");
        drop(first);

        // Alone it works, with the lower device's MAC; nothing else fits beside it.
        let pt = Nic::open(&spec("link=lower0,mode=passthru"), &o).expect("passthru alone");
        assert_eq!(
            pt.mac(),
            lower_mac,
            "a passthru guest has the lower device's MAC"
        );
        for other in ["link=lower0,mode=passthru", "link=lower0,mode=bridge"] {
            let err = Nic::open(&spec(other), &o).expect_err("lower taken");
            assert!(
                matches!(err, NicError::LowerTaken { ref why, .. } if why.contains(pt.iface())),
                "{other}: {err}"
            );
        }
        drop(pt);

        // mac= cannot be honoured in passthru mode: an error, not a silent other MAC.
        let err = Nic::open(&spec("link=lower0,mode=passthru,mac=52:54:00:aa:bb:08"), &o)
            .expect_err("passthru with mac=");
        assert!(
            matches!(err, NicError::PassthruMac { actual, .. } if actual == lower_mac),
            "{err}"
        );
    });
    assert_eq!(ns.links(), links_before, "refused opens left links behind");
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_macvtaps_of_dead_tapir_processes_are_swept_and_others_kept() {
    let ns = TestNs::new("sweep");
    let mut gone = std::process::Command::new("true").spawn().expect("true");
    let dead = gone.id();
    gone.wait().expect("wait");
    let stale = format!("tpr{dead}n0");
    let stale_port = format!("tpr{dead}h1");
    let live = format!("tpr{}n9", std::process::id());
    for name in [stale.as_str(), live.as_str(), "mvt0"] {
        ip(&[
            "-n", &ns.name, "link", "add", "link", "lower0", "name", name, "type", "macvtap",
        ]);
    }
    ip(&[
        "-n",
        &ns.name,
        "link",
        "add",
        "link",
        "lower0",
        "name",
        &stale_port,
        "type",
        "macvlan",
    ]);
    let mut removed = ns.run(|| tapir_net_backend::nic::sweep_stale_links().expect("sweep"));
    removed.sort();
    let mut want_removed = vec![stale.clone(), stale_port];
    want_removed.sort();
    assert_eq!(removed, want_removed);
    let mut left = ns.macvtaps();
    left.sort();
    let mut want = vec![live, "mvt0".to_string()];
    want.sort();
    assert_eq!(left, want, "{stale} removed, the rest kept");
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_existing_node_is_used_others_are_passed_and_files_refused() {
    let ns = TestNs::new("nodes");
    ns.add_macvtap("mvt0");
    let o = opts(&ns);
    ns.run(move || {
        let node = tap_node_path(&o.dev_dir, "mvt0");

        // A regular file where the node should be: the `3<>/dev/tapN` trap.
        std::fs::write(&node, b"").expect("regular file");
        let err = Nic::open(&spec("macvtap=mvt0"), &o).expect_err("regular file");
        assert!(matches!(err, NicError::WrongNode { .. }), "{err}");
        assert!(err.to_string().contains("a regular file"), "{err}");
        std::fs::remove_file(&node).expect("rm");

        // Another char device under the name (another namespace's macvtap of the same ifindex):
        // left alone, and the queues open through a private node.
        let c = std::ffi::CString::new(node.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: mknod with a valid path; the node is /dev/null's numbers, harmless.
        let rc = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(1, 3)) };
        assert_eq!(rc, 0, "mknod: {}", std::io::Error::last_os_error());
        let nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening past another's node");
        drop(nic);
        let meta = std::fs::metadata(&node).expect("the other node is still there");
        assert_eq!(
            libc::major(std::os::unix::fs::MetadataExt::rdev(&meta)),
            1,
            "left as it was"
        );
        std::fs::remove_file(&node).expect("rm");

        // The right node, as udev would make it: used as it is, nothing made in the runtime dir.
        make_tap_node(&o.dev_dir, "mvt0");
        let nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening through the existing node");
        assert!(
            !o.runtime_dir.exists() || std::fs::read_dir(&o.runtime_dir).expect("dir").count() == 0
        );
        drop(nic);

        // Permission: the same node opened with a filesystem uid that has no access to it.
        // SAFETY: setfsuid changes only this thread's filesystem uid; it is restored below.
        let old = unsafe { libc::setfsuid(65534) };
        let err = Nic::open(&spec("macvtap=mvt0"), &o).expect_err("nobody may not open it");
        // SAFETY: as above.
        unsafe { libc::setfsuid(old as libc::uid_t) };
        assert!(matches!(err, NicError::Permission { .. }), "{err}");
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_error_cases_name_what_failed() {
    let ns = TestNs::new("errors");
    ns.add_macvtap("mvt0");
    ip(&[
        "-n",
        &ns.name,
        "tuntap",
        "add",
        "dev",
        "tq0",
        "mode",
        "tap",
        "multi_queue",
    ]);
    let o = opts(&ns);
    ns.run(move || {
        let err = Nic::open(&spec("macvtap=nosuch0"), &o).expect_err("missing link");
        assert!(
            matches!(err, NicError::NoSuchLink(ref n) if n == "nosuch0"),
            "{err}"
        );

        let err = Nic::open(&spec("macvtap=lower0"), &o).expect_err("a veth");
        assert!(
            matches!(err, NicError::NotMacvtap { ref kind, .. } if kind == "veth"),
            "{err}"
        );

        let err =
            Nic::open(&spec("macvtap=mvt0,mac=52:54:00:00:00:99"), &o).expect_err("other MAC");
        assert!(matches!(err, NicError::MacMismatch { .. }), "{err}");

        let err = Nic::open(&spec("link=nosuch1"), &o).expect_err("missing lower");
        assert!(
            matches!(err, NicError::NoSuchLink(ref n) if n == "nosuch1"),
            "{err}"
        );

        // A multiqueue tap opened for one queue: TUNSETIFF refuses, and the error says why.
        let err = Nic::open(&spec("tap=tq0"), &o).expect_err("queue mismatch");
        assert!(matches!(err, NicError::Queues { .. }), "{err}");
        let nic = Nic::open(&spec("tap=tq0,queues=2"), &o).expect("two queues on a multiqueue tap");
        assert_eq!(nic.queues().len(), 2);
        drop(nic);

        // fd= with something that is not a tap.
        use std::os::fd::IntoRawFd;
        let fd = std::fs::File::open("/dev/null")
            .expect("/dev/null")
            .into_raw_fd();
        let err = Nic::open(&spec(&format!("fd={fd}")), &o).expect_err("/dev/null is no tap");
        assert!(err.to_string().contains("not a tap or macvtap"), "{err}");
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_ready_fd_of_a_macvtap_is_accepted() {
    let ns = TestNs::new("fd");
    ns.add_macvtap("mvt0");
    let o = opts(&ns);
    ns.run(move || {
        use std::os::fd::IntoRawFd;
        let node = make_tap_node(&o.dev_dir, "mvt0");
        // Opened blocking, as a caller would: Tapir makes it non-blocking.
        let fd = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&node)
            .expect("open")
            .into_raw_fd();
        let mut nic = Nic::open(&spec(&format!("fd={fd}")), &o).expect("fd= of a macvtap");
        assert_eq!(nic.iface(), "mvt0");
        assert_eq!(nic.mac(), MacAddr(GUEST_MAC));
        // Multicast from the peer (IPv6 neighbour discovery) may be queued: drain it; a blocking fd
        // would hang here instead of answering EAGAIN.
        let mut buf = [0u8; 2048];
        let idle = (0..1000).any(|_| {
            nic.queues_mut()[0]
                .read_frame(&[RecvBuf::new(&mut buf)])
                .expect("read")
                .is_none()
        });
        assert!(idle, "an idle macvtap must say EAGAIN");
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap, tc): run by scripts/test"]
fn host_a_full_queue_wakes_an_edge_triggered_epoll_once_it_drains() {
    let ns = TestNs::new("full");
    ns.add_macvtap("mvt0");
    // A slow lower device holds frames in its qdisc, still charged to the macvtap queue's socket.
    sh(
        "ip",
        &[
            "netns", "exec", &ns.name, "tc", "qdisc", "add", "dev", "lower0", "root", "tbf",
            "rate", "8mbit", "burst", "3000", "limit", "1000000",
        ],
    );
    let o = opts(&ns);
    ns.run(move || {
        use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
        let mut nic = Nic::open(&spec("macvtap=mvt0"), &o).expect("opening mvt0");
        let queue = &mut nic.queues_mut()[0];
        let epoll = Epoll::new().unwrap();
        let set = EventSet::OUT | EventSet::EDGE_TRIGGERED;
        epoll
            .ctl(
                ControlOperation::Add,
                queue.as_raw_fd(),
                EpollEvent::new(set, 1),
            )
            .unwrap();
        let mut ready = [EpollEvent::default(); 1];
        assert_eq!(epoll.wait(0, &mut ready).unwrap(), 1, "writable at first");

        let frame = [eth([0xff; 6], GUEST_MAC, 0x88b5), vec![0x5a; 1400]].concat();
        let hdr = VnetHdr::default().to_bytes();
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut sent = 0;
        while queue
            .write_frame(&[SendBuf::new(&hdr), SendBuf::new(&frame)])
            .expect("writev")
            .is_some()
        {
            sent += 1;
            assert!(
                Instant::now() < deadline,
                "the queue never filled ({sent} frames)"
            );
        }
        // The kernel wakes us only if the wakeup was armed when the queue filled.
        let n = epoll.wait(5000, &mut ready).unwrap();
        assert_eq!(
            n, 1,
            "no EPOLLOUT within 5 s after {sent} frames filled the queue"
        );
        assert!(ready[0].event_set().contains(EventSet::OUT));
    });
}

#[test]
#[ignore = "needs root (network namespace, veth, macvtap): run by scripts/test"]
fn host_link_watch_sees_the_lower_device_go_down_and_away() {
    use tapir_net_backend::netlink::{LinkEvent, LinkWatch};
    let ns = TestNs::new("watch");
    let o = opts(&ns);
    let name = ns.name.clone();
    ns.run(move || {
        let nic = Nic::open(&spec("link=lower0"), &o).expect("open");
        let index = nic.ifindex().expect("the macvtap's index");
        let mut watch = LinkWatch::open().expect("watch");
        // The macvtap's own announcements, waiting up to 2 s for at least one.
        let mine = |watch: &mut LinkWatch| -> Vec<LinkEvent> {
            let deadline = Instant::now() + Duration::from_secs(2);
            let mut got = Vec::new();
            while got.is_empty() && Instant::now() < deadline {
                got.extend(watch.events().expect("events").into_iter().filter(|e| {
                    matches!(e, LinkEvent::Changed { index: i, .. } | LinkEvent::Deleted { index: i } if *i == index)
                }));
                std::thread::sleep(Duration::from_millis(20));
            }
            got
        };
        watch.events().expect("reading what came before");
        ip(&["-n", &name, "link", "set", "lower0", "down"]);
        let down = mine(&mut watch);
        assert!(
            down.contains(&LinkEvent::Changed { index, running: false }),
            "{down:?}"
        );
        ip(&["-n", &name, "link", "set", "lower0", "up"]);
        let up = mine(&mut watch);
        assert!(
            up.contains(&LinkEvent::Changed { index, running: true }),
            "{up:?}"
        );
        ip(&["-n", &name, "link", "del", "peer0"]);
        let gone = mine(&mut watch);
        assert!(gone.contains(&LinkEvent::Deleted { index }), "{gone:?}");
        // The queue neither blocks nor fails once the macvtap is gone: reads find nothing.
        let mut nic = nic;
        let mut hdr = [0u8; VNET_HDR_LEN];
        let mut body = vec![0u8; 2048];
        let got = nic.queues_mut()[0]
            .read_frame(&[RecvBuf::new(&mut hdr), RecvBuf::new(&mut body)])
            .expect("a read after the macvtap went");
        assert_eq!(got, None);
        drop(nic); // logs that the macvtap was already gone, not an error
    });
}
