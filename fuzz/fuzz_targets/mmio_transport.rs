//! The virtio-mmio transport over a real virtio-net device (socketpair backends): arbitrary
//! register reads and writes of any size and offset, with queue passes and frame arrivals in
//! between, as a driver could mix them. Nothing may panic or hang.
#![no_main]

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use tapir_devices::virtio::net::Net;
use tapir_devices::virtio::{Interrupt, MmioTransport};
use tapir_devices::BusDevice;
use tapir_net_backend::offload::TUN_F_ALL;
use tapir_net_backend::socketpair::SocketpairBackend;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

const MEM: usize = 256 * 1024;

#[derive(Arbitrary, Debug)]
enum Op {
    Write { offset: u16, value: u32, size: u8 },
    Read { offset: u16, size: u8 },
    Process(u8),
    Frame { pair: u8, len: u16 },
    Yield,
    Poke { at: u32, bytes: Vec<u8> },
}

#[derive(Arbitrary, Debug)]
struct Input {
    pairs: bool,
    memory: Vec<u8>,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).expect("memory");
    let n = input.memory.len().min(MEM);
    mem.write_slice(&input.memory[..n], GuestAddress(0))
        .expect("in memory");
    let pairs = if input.pairs { 2 } else { 1 };
    let (backends, peers): (Vec<SocketpairBackend>, Vec<UnixDatagram>) = (0..pairs)
        .map(|_| SocketpairBackend::pair(TUN_F_ALL).expect("socketpair"))
        .unzip();
    for p in &peers {
        p.set_nonblocking(true).expect("non-blocking");
    }
    let net =
        Net::new("fuzz", backends, [2, 0, 0, 0, 0, 1], Some(1500), TUN_F_ALL).expect("device");
    let queues = net.queue_evts().expect("eventfds").len();
    let notifiers = net.queue_evts().expect("eventfds");
    let net = Arc::new(Mutex::new(net));
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
    let mut transport = MmioTransport::new(
        net.clone(),
        mem.clone(),
        Arc::new(Interrupt::new(irq)),
        notifiers,
    );
    let mut data = [0u8; 8];
    for op in input.ops.iter().take(256) {
        match op {
            Op::Write {
                offset,
                value,
                size,
            } => {
                let size = [1, 2, 4, 8][usize::from(*size) % 4];
                data[..4].copy_from_slice(&value.to_le_bytes());
                transport.write(u64::from(*offset) % 0x1000, &data[..size]);
            }
            Op::Read { offset, size } => {
                let size = [1, 2, 4, 8][usize::from(*size) % 4];
                transport.read(u64::from(*offset) % 0x1000, &mut data[..size]);
            }
            Op::Process(q) => net.lock().unwrap().fuzz_notify(usize::from(*q) % queues),
            Op::Frame { pair, len } => {
                let p = usize::from(*pair) % pairs;
                let _ = peers[p].send(&vec![0x5a; usize::from(*len).max(1)]);
                net.lock().unwrap().fuzz_backend_readable(p);
            }
            Op::Yield => net.lock().unwrap().fuzz_yield(),
            Op::Poke { at, bytes } => {
                let at = *at as usize % MEM;
                let n = bytes.len().min(MEM - at).min(256);
                mem.write_slice(&bytes[..n], GuestAddress(at as u64))
                    .expect("in memory");
            }
        }
    }
});
