//! A virtio-net device on a socketpair backend with split queues in real guest memory, played by
//! a small driver of our own, and driven the way the event loop drives it.
//!
//! Not virtio-queue's `MockSplitQueue`: in 0.18 it puts the used ring 0x104 bytes after the avail
//! ring whatever the queue size (so 256-entry rings overlap) and writes avail entries past the
//! ring's end once the index passes the size; tests on it can pass for the wrong reasons.
#![allow(clippy::cast_possible_truncation)] // test values are small

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tapir_net_backend::socketpair::SocketpairBackend;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::Net;
use crate::virtio::{Interrupt, VirtioDevice};

pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// Where test buffers live; the queues' rings sit below.
pub const BUF_BASE: u64 = 0x10_0000;
pub const MEM_SIZE: usize = 0x100_0000;
pub const F_NEXT: u16 = 1;
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = 4;

/// Waits up to 5 s for `done`, which another thread (a vhost-user pair's) makes true.
pub fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

pub const fn bit(b: u32) -> u64 {
    1 << b
}
pub const V1: u64 = bit(VIRTIO_F_VERSION_1);
pub const MRG: u64 = bit(VIRTIO_NET_F_MRG_RXBUF);
pub const MQ: u64 = bit(VIRTIO_NET_F_MQ) | bit(VIRTIO_NET_F_CTRL_VQ);
/// Queues of a device: rx0 tx0, and with two pairs rx1 tx1 ctrl.
pub const RX: usize = 0;
pub const TX: usize = 1;
pub const RX1: usize = 2;
pub const TX1: usize = 3;
pub const CTRL: usize = 4;
/// VIRTIO_NET_CTRL_MQ / VQ_PAIRS_SET 2.
pub const TWO_PAIRS: [u8; 4] = [4, 0, 2, 0];
/// Guest memory per queue for its rings (room for 256 entries).
const QUEUE_SPAN: u64 = 0x4000;

/// The driver's side of one split queue: descriptor table at +0, avail ring at +0x1000, used
/// ring at +0x2000 of its span, none overlapping.
pub struct DriverQueue {
    mem: &'static GuestMemoryMmap,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
}

impl DriverQueue {
    pub fn new(mem: &'static GuestMemoryMmap, base: u64, size: u16) -> Self {
        let q = Self {
            mem,
            size,
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        };
        q.mem
            .write_slice(&[0u8; 0x3000], GuestAddress(base))
            .unwrap();
        q
    }

    /// A device-side queue on these rings, ready.
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.desc))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used))
            .unwrap();
        q.set_ready(true);
        q
    }

    /// Writes `data` into guest memory at `addr` (a buffer's contents).
    pub fn mem_write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    /// Reads guest memory at `addr` into `out`.
    pub fn mem_read(&self, addr: u64, out: &mut [u8]) {
        self.mem.read_slice(out, GuestAddress(addr)).unwrap();
    }

    pub fn store_desc(&self, index: u16, raw: RawDescriptor) {
        let addr = self.desc + 16 * u64::from(index % self.size);
        self.mem.write_obj(raw, GuestAddress(addr)).unwrap();
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(self.avail + 2)).unwrap()
    }

    /// Sets the avail index as it is, however far from the device's.
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail + 2))
            .unwrap();
    }

    /// Puts `bytes` at `at` and makes them available as the one-descriptor chain `head`, for the
    /// device to read (a TX frame).
    pub fn offer(&self, head: u16, at: u64, bytes: &[u8]) {
        self.mem_write(at, bytes);
        self.store_desc(
            head,
            RawDescriptor::from(SplitDescriptor::new(at, bytes.len() as u32, 0, 0)),
        );
        self.publish(head);
    }

    /// Makes `head` available (the ring entry wraps, as a driver's does).
    pub fn publish(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail + 4 + 2 * u64::from(idx % self.size);
        self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// The used ring: (head, len) per entry so far (at most `size` of them).
    pub fn used_entries(&self) -> Vec<(u32, u32)> {
        let n: u16 = self.mem.read_obj(GuestAddress(self.used + 2)).unwrap();
        (0..n)
            .map(|i| {
                let at = self.used + 4 + 8 * u64::from(i % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect()
    }
}

pub struct Harness {
    pub mem: &'static GuestMemoryMmap,
    /// One driver queue per device queue, in queue order.
    pub queues: Vec<DriverQueue>,
    pub net: Net<SocketpairBackend>,
    /// The other end of pair 0's backend, and of the others'.
    pub peer: UnixDatagram,
    pub peers: Vec<UnixDatagram>,
    pub irq: EventFd,
    /// The interrupt the device was started with.
    pub interrupt: Option<Arc<Interrupt>>,
    next_desc: Vec<u16>,
    next_buf: u64,
}

impl Harness {
    /// A device whose backend accepts `host_offloads`, started by a driver that acked `acked`.
    pub fn started(host_offloads: u32, acked: u64) -> Self {
        let mut h = Self::new(host_offloads);
        h.start(acked);
        h
    }

    pub fn new(host_offloads: u32) -> Self {
        Self::with_pairs(host_offloads, 1)
    }

    /// A device with `pairs` queue pairs (and the control queue when more than one).
    pub fn with_pairs(host_offloads: u32, pairs: usize) -> Self {
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap(),
        ));
        let (backends, mut peers): (Vec<_>, Vec<_>) = (0..pairs)
            .map(|_| SocketpairBackend::pair(host_offloads).unwrap())
            .unzip();
        let net = Net::new("test-net", backends, MAC, Some(1500), host_offloads).unwrap();
        let count = net.queue_max_sizes().len();
        assert!(
            count as u64 * QUEUE_SPAN <= BUF_BASE,
            "rings below the buffers"
        );
        let queues = (0..count)
            .map(|i| DriverQueue::new(mem, i as u64 * QUEUE_SPAN, 256))
            .collect();
        let peer = peers.remove(0);
        Self {
            mem,
            queues,
            net,
            peers,
            peer,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            interrupt: None,
            next_desc: vec![0; count],
            next_buf: BUF_BASE,
        }
    }

    pub fn start(&mut self, acked: u64) {
        let queues: Vec<Queue> = self.queues.iter().map(DriverQueue::create_queue).collect();
        self.start_with(acked, queues);
    }

    /// Starts the device with the queues as given (some possibly not ready).
    pub fn start_with(&mut self, acked: u64, queues: Vec<Queue>) {
        self.net.ack_features(acked);
        let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
        self.interrupt = Some(interrupt.clone());
        self.net
            .activate(self.mem.clone(), interrupt, queues)
            .unwrap();
    }

    /// A fresh buffer of `len` bytes filled with `fill`.
    pub fn buffer(&mut self, len: u32, fill: &[u8]) -> u64 {
        let addr = self.next_buf;
        self.next_buf += u64::from(len).max(1).next_multiple_of(64);
        self.mem.write_slice(fill, GuestAddress(addr)).unwrap();
        addr
    }

    /// Adds a chain of (addr, len, flags) descriptors to queue `q` (2p RX, 2p+1 TX); NEXT is added.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let start = self.next_desc[q];
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, (addr, len, flags))| {
                let last = i + 1 == descs.len();
                let flags = if last { *flags } else { flags | F_NEXT };
                RawDescriptor::from(SplitDescriptor::new(
                    *addr,
                    *len,
                    flags,
                    start + i as u16 + 1,
                ))
            })
            .collect();
        self.add_raw(q, &raw);
        start
    }

    /// Queues a control command with a status buffer of `status_len` bytes (filled with 0xff)
    /// and lets the device answer it; returns the status buffer's address.
    pub fn control(&mut self, command: &[u8], status_len: u32) -> u64 {
        let cmd = self.buffer(command.len() as u32, command);
        let status = self.buffer(1, &[0xff]);
        self.add_chain(
            CTRL,
            &[
                (cmd, command.len() as u32, 0),
                (status, status_len, F_WRITE),
            ],
        );
        self.net.process_ctrl();
        status
    }

    /// Adds raw descriptors as they are (for broken chains) at the next free table slots, and
    /// makes available each that does not follow a descriptor with NEXT.
    pub fn add_raw(&mut self, q: usize, raw: &[RawDescriptor]) {
        let start = self.next_desc[q];
        let mut follows_next = false;
        for (i, desc) in raw.iter().enumerate() {
            let index = start.wrapping_add(i as u16);
            self.queues[q].store_desc(index, *desc);
            if !follows_next {
                self.queues[q].publish(index % self.queues[q].size);
            }
            follows_next = SplitDescriptor::from(*desc).flags() & F_NEXT != 0;
        }
        self.next_desc[q] = start.wrapping_add(raw.len() as u16);
    }

    /// The used ring of queue `q`: (head, len) per entry.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        self.queues[q].used_entries()
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// A frame with a virtio-net header: flags, gso_type, then `payload_len` bytes of a pattern.
    pub fn frame(flags: u8, gso: u8, payload_len: usize) -> Vec<u8> {
        let mut f = vec![0u8; 12];
        f[0] = flags;
        f[1] = gso;
        f.extend((0..payload_len).map(|i| (i % 251) as u8));
        f
    }
}
