//! A hostile driver against the device: each test plays one way a guest could make the host spin,
//! grow, write where it must not, or send what it did not mean, and checks that the device stays
//! bounded, answers as the virtio spec says (DEVICE_NEEDS_RESET, a refused chain) and keeps its
//! memory small.
#![allow(clippy::cast_possible_truncation)] // test values are small

use tapir_net_backend::offload::TUN_F_ALL;
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};

use super::device::BUDGET;
use super::test_utils::{bit, Harness, F_INDIRECT, F_WRITE, MQ, MRG, RX, TWO_PAIRS, TX, V1};
use crate::virtio::queue::MAX_CHAIN_BUFFERS;
use crate::virtio::VirtioDevice;

const GSO: u64 = bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4);

fn needs_reset(h: &Harness) -> bool {
    h.interrupt.as_ref().unwrap().needs_reset()
}

/// An indirect table of `entries` descriptors (addr, len, flags) in guest memory; returns its
/// address.
fn indirect_table(h: &mut Harness, entries: &[(u64, u32, u16)]) -> u64 {
    let raw: Vec<u8> = entries
        .iter()
        .enumerate()
        .flat_map(|(i, &(addr, len, flags))| {
            let last = i + 1 == entries.len();
            let flags = if last { flags } else { flags | 1 };
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, i as u16 + 1));
            vm_memory::ByteValued::as_slice(&d).to_vec()
        })
        .collect();
    h.buffer(raw.len() as u32, &raw)
}

/// A descriptor that points at an indirect table of `entries` descriptors.
fn indirect(table: u64, entries: usize) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(
        table,
        16 * entries as u32,
        F_INDIRECT,
        0,
    ))
}

#[test]
fn an_avail_index_far_ahead_stops_the_device_instead_of_spinning() {
    for q in [TX, RX] {
        let mut h = Harness::started(TUN_F_ALL, V1);
        h.queues[q].set_avail_idx(300); // 300 chains "available" in a queue of 256
        h.peer.send(&Harness::frame(0, 0, 60)).unwrap();
        if q == RX {
            h.net.pairs[0].rx_pending = true;
            h.net.process_rx(0);
        } else {
            h.net.process_tx(0);
        }
        let s = h.net.counters().snapshot();
        assert_eq!(s.driver_errors, 1, "queue {q}");
        assert!(needs_reset(&h), "queue {q}: DEVICE_NEEDS_RESET");
        assert!(h.irq.read().is_ok(), "queue {q}: the driver is told");
        // Nothing more is served until a reset.
        h.queues[q].set_avail_idx(1);
        h.net.process_tx(0);
        h.net.process_rx(0);
        assert_eq!(h.net.counters().snapshot().driver_errors, 1);
        assert!(h.used(q).is_empty());
        h.net.reset();
        assert!(h.net.broken.is_none(), "a reset clears it");
    }
}

#[test]
fn a_chain_head_outside_the_queue_is_a_driver_error_not_a_log_line_per_chain() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    h.queues[TX].publish(4000);
    h.net.process_tx(0);
    assert_eq!(h.net.counters().snapshot().driver_errors, 1);
    assert!(needs_reset(&h));
    assert!(
        h.used(TX).is_empty(),
        "a head that does not exist cannot be returned"
    );
}

#[test]
fn a_pair_the_driver_never_set_up_is_never_touched() {
    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    // Pair 0 and the control queue set up; pair 1 left as reset made it (not ready, address 0).
    let queues: Vec<Queue> = (0..5)
        .map(|i| {
            if i == 2 || i == 3 {
                Queue::new(256).unwrap()
            } else {
                h.queues[i].create_queue()
            }
        })
        .collect();
    h.start_with(V1 | MQ, queues);
    // Queue 0's descriptor table sits at guest address 0, where an unset queue's rings point.
    let before = h.read(0, 64);
    h.peers[0].send(&Harness::frame(0, 0, 60)).unwrap();
    h.net.pairs[1].rx_pending = true;
    h.net.process_rx(1);
    h.net.process_tx(1);
    assert_eq!(h.read(0, 64), before, "nothing written at guest address 0");
    // Asking for both pairs is refused: pair 1 has no queues.
    let status = h.control(&TWO_PAIRS, 1);
    assert_eq!(h.read(status, 1), [VIRTIO_NET_ERR as u8]);
    assert_eq!(h.net.pairs_in_use(), 1);
    assert_eq!(h.read(0, 64), before);
}

#[test]
fn the_rx_stash_stays_bounded_whatever_the_guest_posts() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG | GSO);
    // 12-byte writable buffers behind indirect tables, all the same 12 bytes, the same heads
    // posted again and again: the pattern that made the device hold millions of iovecs.
    let tiny = h.buffer(12, &[0; 12]);
    let table = indirect_table(&mut h, &vec![(tiny, 12, F_WRITE); 1000]);
    for _ in 0..4 {
        h.add_raw(RX, &[indirect(table, 1000)]);
    }
    for _ in 0..200 {
        h.queues[RX].publish(0);
    }
    let frame = Harness::frame(0, 0, 60);
    h.peer.send(&frame).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    let stash = &h.net.pairs[0].queues.as_ref().unwrap().rx_stash;
    assert!(
        stash.buffers() <= 2 * MAX_CHAIN_BUFFERS,
        "{} buffers held",
        stash.buffers()
    );
    assert!(h.net.scratch.rx_iov.capacity() <= 2 * MAX_CHAIN_BUFFERS);
    let used = h.used(RX);
    assert_eq!(used[0], (0, frame.len() as u32), "the frame arrived whole");
    assert_eq!(h.net.counters().snapshot().rx_frames, 1);
}

#[test]
fn chains_of_more_buffers_than_writev_takes_are_refused_whole() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let frame = Harness::frame(0, 0, 2000);
    let (hdr, body) = frame.split_at(12);
    let h_addr = h.buffer(12, hdr);
    let b_addr = h.buffer(body.len() as u32, body);
    // 1 header buffer + 1100 one-or-two-byte pieces of the body: more than UIO_MAXIOV.
    let mut long = vec![(h_addr, 12, 0)];
    long.extend((0..1000).map(|i| (b_addr + 2 * i, 2, 0)));
    long.extend((0..100).map(|_| (b_addr, 0, 0)));
    let table = indirect_table(&mut h, &long);
    h.add_raw(TX, &[indirect(table, long.len())]);
    h.net.process_tx(0);
    let s = h.net.counters().snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes, s.malformed_chains), (0, 0, 1));
    assert_eq!(h.used(TX), vec![(0, 0)]);
    h.peer.set_nonblocking(true).unwrap();
    assert!(
        h.peer.recv(&mut [0u8; 4096]).is_err(),
        "nothing truncated went out"
    );

    // Exactly the limit goes out whole.
    let mut fits = vec![(h_addr, 12, 0)];
    fits.extend((0..1000).map(|i| (b_addr + 2 * i, 2, 0)));
    fits.truncate(MAX_CHAIN_BUFFERS);
    let sent: usize = fits.iter().map(|f| f.1 as usize).sum();
    let table = indirect_table(&mut h, &fits);
    h.add_raw(TX, &[indirect(table, fits.len())]);
    h.net.process_tx(0);
    let mut got = vec![0u8; 4096];
    let n = h.peer.recv(&mut got).unwrap();
    assert_eq!(n, sent);
    assert_eq!(&got[..n], &frame[..sent]);
    let s = h.net.counters().snapshot();
    assert_eq!((s.tx_frames, s.tx_bytes), (1, (sent - 12) as u64));
}

#[test]
fn a_control_command_with_an_empty_status_buffer_gets_nothing_written() {
    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    h.start(V1 | MQ);
    let status = h.control(&TWO_PAIRS, 0);
    assert_eq!(
        h.read(status, 1),
        [0xff],
        "no byte written into a 0-byte buffer"
    );
    assert_eq!(h.used(4), vec![(0, 0)]);
    assert_eq!(h.net.counters().snapshot().malformed_chains, 1);
    assert_eq!(h.net.pairs_in_use(), 1, "the command was not carried out");
}

#[test]
fn a_full_queue_is_served_in_budgeted_passes_that_yield() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let frame = Harness::frame(0, 0, 20);
    for _ in 0..200 {
        let a = h.buffer(frame.len() as u32, &frame);
        h.add_chain(TX, &[(a, frame.len() as u32, 0)]);
    }
    h.net.process_tx(0);
    assert_eq!(h.used(TX).len(), BUDGET, "one pass sends one budget");
    assert_eq!(h.net.counters().snapshot().yields, 1);
    assert_eq!(h.net.resched, 1 << TX, "TX is due again");
    assert!(
        h.net.yield_evt.read().is_ok(),
        "and the event loop is woken for it"
    );
    h.net.resched = 0;
    h.net.process_tx(0);
    assert_eq!(h.used(TX).len(), 200);
    assert_eq!(
        h.net.counters().snapshot().yields,
        1,
        "the rest fit one pass"
    );
}

#[test]
fn a_flood_of_malformed_rx_chains_is_bounded_per_pass() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    let ro = h.buffer(64, &[0; 64]);
    for _ in 0..256 {
        h.add_chain(RX, &[(ro, 64, 0)]); // read-only: refused
    }
    h.peer.send(&Harness::frame(0, 0, 60)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    let s = h.net.counters().snapshot();
    // Every turn of the pass and every refused chain spend the same budget.
    assert!(
        (BUDGET as u64 / 2..=BUDGET as u64).contains(&s.malformed_chains),
        "{} chains walked in one pass",
        s.malformed_chains
    );
    assert_eq!(s.yields, 1);
    assert_eq!(s.rx_frames, 0);
}

#[test]
fn a_driver_without_the_control_queue_feature_needs_no_control_queue() {
    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    // Only pair 0 set up; neither CTRL_VQ nor MQ acked, so no control queue either.
    let queues: Vec<Queue> = (0..5)
        .map(|i| {
            if i < 2 {
                h.queues[i].create_queue()
            } else {
                Queue::new(256).unwrap()
            }
        })
        .collect();
    h.start_with(V1, queues);
    assert!(h.net.is_active());
    let frame = Harness::frame(0, 0, 40);
    let a = h.buffer(frame.len() as u32, &frame);
    h.add_chain(TX, &[(a, frame.len() as u32, 0)]);
    h.net.process_tx(0);
    h.net.process_ctrl();
    let mut got = [0u8; 128];
    assert_eq!(h.peer.recv(&mut got).unwrap(), frame.len());
    assert_eq!(h.net.counters().snapshot().driver_errors, 0);
}
