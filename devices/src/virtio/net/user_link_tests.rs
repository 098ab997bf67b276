//! Tapir's device as a vhost-user frontend, against Tapir's own backend over a socketpair: the
//! handshake, the rings started on activation, frames both ways through the backend's thread with
//! the interrupt on the device's irqfd, a reset that stops the rings, and a second pair enabled
//! only when the driver asks for it.
#![allow(clippy::cast_possible_truncation)] // test values are small

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tapir_net_backend::socketpair::SocketpairBackend;
use vhost::vhost_user::BackendReqHandler;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::Queue;
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::test_utils::{wait_for, DriverQueue, F_WRITE, MQ, MRG, RX, RX1, TWO_PAIRS, TX, V1};
use super::{Net, UserLink, UserNet, UserNetHandler, UserQueue, HDR_LEN};
use crate::virtio::{Interrupt, VirtioDevice};

const MEM: u64 = 0x100_0000;
const BUFS: u64 = 0x10_0000;
const BACKEND_MAC: [u8; 6] = [2, 0, 0, 0, 0, 7];

/// Guest RAM as a sealed memfd, as the VMM makes it for a vhost-user NIC.
fn shared_memory() -> &'static GuestMemoryMmap {
    // SAFETY: memfd_create with a NUL-terminated name; the fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"tapir-test-ram".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0);
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(MEM).unwrap();
    // SAFETY: fcntl adding seals on a descriptor the file owns.
    let rc = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, libc::F_SEAL_SHRINK) };
    assert_eq!(rc, 0);
    let region = MmapRegion::from_file(FileOffset::new(file, 0), MEM as usize).unwrap();
    Box::leak(Box::new(
        GuestMemoryMmap::from_regions(vec![GuestRegionMmap::new(region, GuestAddress(0)).unwrap()])
            .unwrap(),
    ))
}

/// Tapir's backend with `pairs` pairs on socketpairs, serving one connection on a thread; the
/// frontend's end of the connection and the peers' ends of the pairs.
fn backend(
    pairs: usize,
) -> (
    Arc<UserNet<SocketpairBackend>>,
    UnixStream,
    Vec<UnixDatagram>,
) {
    let (backends, peers): (Vec<_>, Vec<_>) = (0..pairs)
        .map(|_| SocketpairBackend::pair(tapir_net_backend::offload::TUN_F_ALL).unwrap())
        .unzip();
    let net = Arc::new(
        UserNet::new(
            "vu-backend",
            backends,
            BACKEND_MAC,
            Some(1400),
            tapir_net_backend::offload::TUN_F_ALL,
        )
        .unwrap(),
    );
    net.spawn_workers(256 << 10).unwrap();
    let (ours, theirs) = UnixStream::pair().unwrap();
    let handler = Arc::new(Mutex::new(UserNetHandler::new(net.clone())));
    std::thread::spawn(move || {
        let mut requests = BackendReqHandler::from_stream(theirs, handler);
        // until the frontend hangs up (refused requests go on)
        while !matches!(
            requests.handle_request(),
            Err(vhost::vhost_user::Error::Disconnected | vhost::vhost_user::Error::PartialMessage)
        ) {}
    });
    (net, ours, peers)
}

struct Rig {
    mem: &'static GuestMemoryMmap,
    net: Net<UserQueue>,
    link: Arc<UserLink>,
    backend: Arc<UserNet<SocketpairBackend>>,
    peers: Vec<UnixDatagram>,
    queues: Vec<DriverQueue>,
    kicks: Vec<EventFd>,
    irq: EventFd,
}

impl Rig {
    fn new(pairs: usize) -> Self {
        let (backend, stream, peers) = backend(pairs);
        let link = Arc::new(UserLink::over(stream, Path::new("test.sock"), pairs).unwrap());
        let offloads = tapir_net_backend::offload::tun_offloads_for(link.offered_features());
        let mac = link
            .mac()
            .expect("the backend's MAC from its configuration space");
        let net = Net::new(
            "vu-frontend",
            UserQueue::for_pairs(&link),
            mac,
            link.mtu(),
            offloads,
        )
        .unwrap()
        .with_vhost_user(&link)
        .unwrap();
        let mem = shared_memory();
        let count = net.queue_max_sizes().len();
        let queues = (0..count)
            .map(|i| DriverQueue::new(mem, i as u64 * 0x4000, 256))
            .collect();
        let kicks = net.queue_evts().unwrap();
        Self {
            mem,
            net,
            link,
            backend,
            peers,
            queues,
            kicks,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        }
    }

    fn start(&mut self, acked: u64) {
        let queues: Vec<Queue> = self.queues.iter().map(DriverQueue::create_queue).collect();
        self.net.ack_features(acked);
        let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
        self.net
            .activate(self.mem.clone(), interrupt, queues)
            .unwrap();
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.backend.stop_workers();
    }
}

#[test]
fn the_handshake_gives_the_backends_mac_mtu_and_features() {
    let rig = Rig::new(1);
    assert_eq!(rig.link.mac(), Some(BACKEND_MAC));
    assert_eq!(rig.link.mtu(), Some(1400));
    let offered = rig.net.features();
    assert_eq!(offered & V1, V1);
    assert_eq!(offered & MRG, MRG);
    // the backend offers no control queue; the device has none with one pair
    assert_eq!(offered & MQ, 0);
    let mut config = [0u8; 6];
    rig.net.read_config(0, &mut config);
    assert_eq!(config, BACKEND_MAC);
}

#[test]
fn frames_cross_through_the_backend_and_a_reset_stops_its_rings() {
    let mut rig = Rig::new(1);
    rig.start(V1 | MRG);
    // guest -> peer
    let frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x07\x08\0from the frontend";
    let mut chain = vec![0u8; HDR_LEN];
    chain.extend_from_slice(frame);
    let tx = &rig.queues[TX];
    tx.offer(0, BUFS, &chain);
    rig.kicks[TX].write(1).unwrap();
    let mut got = [0u8; 2048];
    let mut n = 0;
    wait_for("the frame at the backend's peer", || {
        rig.peers[0].recv(&mut got).map(|len| n = len).is_ok()
    });
    assert_eq!(&got[HDR_LEN..n], frame);
    wait_for("the TX chain used", || tx.used_entries() == vec![(0, 0)]);
    // the backend signalled the device's irqfd itself
    wait_for("the interrupt", || rig.irq.read().is_ok());

    // peer -> guest
    let rx = &rig.queues[RX];
    let rx_buf = BUFS + 0x1_0000;
    rx.store_desc(
        0,
        RawDescriptor::from(SplitDescriptor::new(rx_buf, 4096, F_WRITE, 0)),
    );
    rx.publish(0);
    rig.kicks[RX].write(1).unwrap();
    let mut incoming = vec![0u8; HDR_LEN];
    incoming.extend_from_slice(b"\x02\0\0\0\0\x07\x02\0\0\0\0\x01\x08\0to the frontend");
    rig.peers[0].send(&incoming).unwrap();
    wait_for("the RX chain used", || !rx.used_entries().is_empty());
    let mut seen = vec![0u8; incoming.len()];
    rx.mem_read(rx_buf, &mut seen);
    assert_eq!(&seen[HDR_LEN..], &incoming[HDR_LEN..]);
    let state = rig.net.state().to_string();
    assert!(
        state.contains("served by its vhost-user backend"),
        "{state}"
    );

    // A reset stops the backend's rings: a kick after it moves nothing.
    rig.net.reset();
    assert!(!rig.backend.state().active, "{}", rig.backend.state());
    tx.offer(1, BUFS, &chain);
    rig.kicks[TX].write(1).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(tx.used_entries().len(), 1, "nothing used after the reset");
    // The driver sets its rings up afresh and starts the device again: the backend serves the
    // new rings.
    for (i, q) in rig.queues.iter_mut().enumerate() {
        *q = DriverQueue::new(rig.mem, i as u64 * 0x4000, 256);
    }
    rig.start(V1 | MRG);
    let tx = &rig.queues[TX];
    tx.offer(0, BUFS, &chain);
    rig.kicks[TX].write(1).unwrap();
    wait_for("a frame after the restart", || {
        rig.peers[0].recv(&mut got).is_ok()
    });
    wait_for("the new ring's chain used", || {
        tx.used_entries() == vec![(0, 0)]
    });
}

#[test]
fn a_second_pair_is_enabled_only_when_the_driver_takes_it() {
    let mut rig = Rig::new(2);
    let offered = rig.net.features();
    assert_eq!(
        offered & MQ,
        MQ,
        "two pairs: MQ and the device's own control queue"
    );
    rig.start(V1 | MQ);
    let state = rig.backend.state();
    assert_eq!(state.queues.len(), 4, "{state}");
    // ring 2 (pair 1's RX) runs but is disabled: it reads as not set up
    let pair1 = state.queues.iter().find(|q| q.index == RX1).unwrap();
    assert!(!pair1.usable, "{state}");
    let mut h = rig;
    let status = control(&mut h, &TWO_PAIRS);
    assert_eq!(status, 0, "VQ_PAIRS_SET 2 accepted");
    let state = h.backend.state();
    let pair1 = state.queues.iter().find(|q| q.index == RX1).unwrap();
    assert!(pair1.usable, "{state}");
}

/// Sends a control command through the device's control queue; returns its status byte.
fn control(rig: &mut Rig, command: &[u8]) -> u8 {
    let ctrl = rig.queues.len() - 1;
    let q = &rig.queues[ctrl];
    let cmd = BUFS + 0x8_0000;
    let status = cmd + 0x100;
    q.mem_write(cmd, command);
    q.mem_write(status, &[0xff]);
    q.store_desc(
        0,
        RawDescriptor::from(SplitDescriptor::new(
            cmd,
            command.len() as u32,
            super::test_utils::F_NEXT,
            1,
        )),
    );
    q.store_desc(
        1,
        RawDescriptor::from(SplitDescriptor::new(status, 1, F_WRITE, 0)),
    );
    q.publish(0);
    rig.net.process_ctrl();
    let mut out = [0u8; 1];
    q.mem_read(status, &mut out);
    out[0]
}
