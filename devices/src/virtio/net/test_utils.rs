//! A virtio-net device on a socketpair backend with mock split queues in real guest memory, driven
//! the way the event loop drives it.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use tapir_net_backend::socketpair::SocketpairBackend;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::Queue;
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

pub struct Harness {
    pub mem: &'static GuestMemoryMmap,
    /// One mock queue per device queue, in queue order.
    pub queues: Vec<MockSplitQueue<'static, GuestMemoryMmap>>,
    pub net: Net<SocketpairBackend>,
    /// The other end of pair 0's backend, and of the others'.
    pub peer: UnixDatagram,
    pub peers: Vec<UnixDatagram>,
    pub irq: EventFd,
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
        let queues = (0..count)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(i as u64 * 0x8000), 256))
            .collect();
        let peer = peers.remove(0);
        Self {
            mem,
            queues,
            net,
            peers,
            peer,
            irq: EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            next_desc: vec![0; count],
            next_buf: BUF_BASE,
        }
    }

    pub fn start(&mut self, acked: u64) {
        self.net.ack_features(acked);
        let mut queues: Vec<Queue> = self
            .queues
            .iter()
            .map(|q| q.create_queue().unwrap())
            .collect();
        for q in &mut queues {
            virtio_queue::QueueT::set_event_idx(q, false);
        }
        let interrupt = Arc::new(Interrupt::new(self.irq.try_clone().unwrap()));
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

    /// Adds raw descriptors as they are (for broken chains).
    pub fn add_raw(&mut self, q: usize, raw: &[RawDescriptor]) {
        self.queues[q]
            .add_desc_chains(raw, self.next_desc[q])
            .unwrap();
        self.next_desc[q] += raw.len() as u16;
    }

    /// The used ring of queue `q`: (head, len) per entry.
    pub fn used(&self, q: usize) -> Vec<(u32, u32)> {
        let mock = &self.queues[q];
        let n = mock.used().idx().load();
        (0..n)
            .map(|i| {
                let e = mock.used().ring().ref_at(i as usize).unwrap().load();
                (e.id(), e.len())
            })
            .collect()
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
