//! The virtio-net device's queues against an arbitrary driver: descriptor tables, indirect tables,
//! avail rings and indexes as the input says, then a sequence of notifications, frame arrivals,
//! guest memory changes, yields and resets. Checked after every step: the call returned (libFuzzer's
//! timeout catches a spin), the device wrote guest memory only inside device-writable buffers and
//! the used rings of queues that are set up, and what it holds for RX stays bounded.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tapir_devices::virtio::net::Net;
use tapir_devices::virtio::{Interrupt, VirtioDevice};
use tapir_net_backend::offload::TUN_F_ALL;
use tapir_net_backend::socketpair::SocketpairBackend;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 256 * 1024;
const QUEUES: usize = 5; // two pairs and the control queue
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;
const EVENT_IDX: u64 = 1 << 29;

#[derive(Arbitrary, Debug)]
struct QueueSetup {
    /// Below 192: the usual layout (ready, 256 entries, rings at 16 KiB per queue), so that most
    /// inputs reach the data path; otherwise the fields below as they are.
    layout: u8,
    ready: bool,
    size_log2: u8,
    desc: u16,
    avail: u16,
    used: u16,
}

#[derive(Arbitrary, Debug)]
enum Op {
    Notify(u8),
    Frame { pair: u8, len: u16, fill: u8 },
    Readable(u8),
    Writable(u8),
    Drain,
    Yield,
    Poke { at: u32, bytes: Vec<u8> },
    Reset,
}

#[derive(Arbitrary, Debug)]
struct Input {
    features: u64,
    queues: [QueueSetup; QUEUES],
    memory: Vec<u8>,
    ops: Vec<Op>,
}

fn queue(index: usize, s: &QueueSetup, features: u64) -> Queue {
    let mut q = Queue::new(256).expect("256 is a valid size");
    q.set_event_idx(features & EVENT_IDX != 0);
    if s.layout < 192 {
        let base = index as u64 * 0x4000;
        let _ = q.try_set_desc_table_address(GuestAddress(base));
        let _ = q.try_set_avail_ring_address(GuestAddress(base + 0x1000));
        let _ = q.try_set_used_ring_address(GuestAddress(base + 0x2000));
        q.set_ready(true);
        return q;
    }
    let _ = q.try_set_size(1 << (s.size_log2 % 9));
    let at = |v: u16| GuestAddress((u64::from(v) * 16) % MEM as u64);
    let _ = q.try_set_desc_table_address(at(s.desc));
    let _ = q.try_set_avail_ring_address(at(s.avail));
    let _ = q.try_set_used_ring_address(at(s.used));
    q.set_ready(s.ready);
    q
}

/// Byte ranges the device may write: used rings of queues set up inside memory, and every buffer
/// some descriptor (direct or in an indirect table) marks device-writable.
#[derive(Default)]
struct Writable(Vec<(usize, usize)>);

impl Writable {
    fn add(&mut self, start: u64, len: u64) {
        let start = start.min(MEM as u64) as usize;
        let end = start.saturating_add(len.min(MEM as u64) as usize).min(MEM);
        if start < end {
            self.0.push((start, end));
        }
    }

    fn contains(&self, at: usize) -> bool {
        self.0.iter().any(|&(s, e)| (s..e).contains(&at))
    }

    fn scan_table(&mut self, mem: &[u8], table: u64, entries: u64, nested: bool) {
        for i in 0..entries.min((MEM / 16) as u64) {
            let off = (table + 16 * i) as usize;
            let Some(d) = mem.get(off..off + 16) else {
                return;
            };
            let addr = u64::from_le_bytes(d[0..8].try_into().unwrap());
            let len = u64::from(u32::from_le_bytes(d[8..12].try_into().unwrap()));
            let flags = u16::from_le_bytes(d[12..14].try_into().unwrap());
            if flags & F_WRITE != 0 {
                self.add(addr, len);
            }
            if flags & F_INDIRECT != 0 && !nested && addr < MEM as u64 {
                self.scan_table(mem, addr, len / 16, true);
            }
        }
    }

    fn learn(&mut self, mem: &[u8], queues: &[Queue]) {
        for q in queues {
            let size = u64::from(q.size());
            let in_mem = |a: u64, l: u64| a.checked_add(l).is_some_and(|e| e <= MEM as u64);
            let usable = q.ready()
                && size > 0
                && in_mem(q.desc_table(), 16 * size)
                && in_mem(q.avail_ring(), 6 + 2 * size)
                && in_mem(q.used_ring(), 6 + 8 * size);
            if usable {
                self.add(q.used_ring(), 6 + 8 * size);
                self.scan_table(mem, q.desc_table(), size, false);
            }
        }
    }
}

fn snapshot(mem: &GuestMemoryMmap) -> Vec<u8> {
    let mut v = vec![0u8; MEM];
    mem.read_slice(&mut v, GuestAddress(0)).expect("in memory");
    v
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = input.memory.len().min(MEM);
    mem.write_slice(&input.memory[..n], GuestAddress(0))
        .expect("in memory");
    let (backends, peers): (Vec<SocketpairBackend>, Vec<UnixDatagram>) = (0..2)
        .map(|_| SocketpairBackend::pair(TUN_F_ALL).expect("socketpair"))
        .unzip();
    for p in &peers {
        p.set_nonblocking(true).expect("non-blocking");
    }
    let mut net =
        Net::new("fuzz", backends, [2, 0, 0, 0, 0, 1], Some(1500), TUN_F_ALL).expect("device");
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let features = input.features & net.features();
    let fresh = || -> Vec<Queue> {
        input
            .queues
            .iter()
            .enumerate()
            .map(|(i, s)| queue(i, s, features))
            .collect()
    };
    let queues = fresh();
    let mut allowed = Writable::default();
    let start =
        |net: &mut Net<SocketpairBackend>, allowed: &mut Writable, mem: &GuestMemoryMmap| {
            allowed.learn(&snapshot(mem), &queues);
            net.ack_features(features);
            let interrupt = Arc::new(Interrupt::new(irq.try_clone().expect("eventfd")));
            let _ = net.activate(mem.clone(), interrupt, fresh());
        };
    start(&mut net, &mut allowed, &mem);

    let mut frame = Vec::new();
    let mut sink = vec![0u8; 70000];
    for op in input.ops.iter().take(64) {
        if let Op::Poke { at, bytes } = op {
            let at = *at as usize % MEM;
            let n = bytes.len().min(MEM - at).min(256);
            mem.write_slice(&bytes[..n], GuestAddress(at as u64))
                .expect("in memory");
            continue;
        }
        let before = snapshot(&mem);
        allowed.learn(&before, &queues);
        match op {
            Op::Notify(q) => net.fuzz_notify(usize::from(*q) % QUEUES),
            Op::Frame { pair, len, fill } => {
                frame.clear();
                frame.resize(usize::from(*len).clamp(1, 65562), *fill);
                let _ = peers[usize::from(*pair) % 2].send(&frame);
                net.fuzz_backend_readable(usize::from(*pair) % 2);
            }
            Op::Readable(p) => net.fuzz_backend_readable(usize::from(*p) % 2),
            Op::Writable(p) => net.fuzz_backend_writable(usize::from(*p) % 2),
            Op::Drain => {
                for p in &peers {
                    while p.recv(&mut sink).is_ok() {}
                }
            }
            Op::Yield => net.fuzz_yield(),
            Op::Reset => {
                net.reset();
                start(&mut net, &mut allowed, &mem);
            }
            Op::Poke { .. } => unreachable!("handled above"),
        }
        let after = snapshot(&mem);
        if let Some(at) = (0..MEM).find(|&i| before[i] != after[i] && !allowed.contains(i)) {
            panic!("{op:?} wrote guest byte {at:#x} outside every device-writable buffer and used ring");
        }
        let (stashed, scratch) = net.fuzz_rx_holdings();
        assert!(stashed <= 2 * 2 * 1024, "{stashed} RX buffers held");
        assert!(scratch <= 4096, "RX scratch of {scratch} iovecs");
    }
});
