//! The device against mock queues and a socketpair backend: negotiation, offloads at activation,
//! both data paths with single and merged buffers, every malformed chain, EAGAIN, reset.
#![allow(clippy::cast_possible_truncation)] // test values are small

use std::sync::atomic::Ordering;

use tapir_net_backend::offload::{TUN_F_ALL, TUN_F_CSUM, TUN_F_TSO4};
use virtio_bindings::virtio_net::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

use super::test_utils::{
    bit, Harness, CTRL, F_NEXT, F_WRITE, MEM_SIZE, MQ, MRG, RX as RX_QUEUE, RX1, TX as TX_QUEUE,
    TX1, V1,
};
use crate::virtio::VirtioDevice;

#[test]
fn activation_applies_the_acked_guest_offloads_to_the_backend() {
    let acked = V1
        | bit(VIRTIO_NET_F_GUEST_CSUM)
        | bit(VIRTIO_NET_F_GUEST_TSO4)
        | bit(VIRTIO_NET_F_CTRL_VQ);
    let h = Harness::started(TUN_F_ALL, acked);
    assert!(h.net.is_active());
    assert_eq!(
        h.net.acked_features() & bit(VIRTIO_NET_F_CTRL_VQ),
        0,
        "not offered, so not acked"
    );
    assert_eq!(h.net.pairs[0].backend.offloads, TUN_F_CSUM | TUN_F_TSO4);
    let mut config = [0u8; 12];
    h.net.read_config(0, &mut config);
    assert_eq!(&config[..6], &super::test_utils::MAC);
    let mut past = [0xffu8; 4];
    h.net.read_config(10, &mut past);
    assert_eq!(
        past,
        [0xdc, 0x05, 0, 0],
        "mtu 1500, then zeros past the end"
    );
}

#[test]
fn tx_frames_of_one_or_many_buffers_reach_the_backend_whole() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let one = Harness::frame(1, 0, 100); // NEEDS_CSUM
    let a = h.buffer(one.len() as u32, &one);
    h.add_chain(TX_QUEUE, &[(a, one.len() as u32, 0)]);
    let two = Harness::frame(0, 1, 3000); // TSO4
    let (hdr, body) = two.split_at(12);
    let b1 = h.buffer(12, hdr);
    let b2 = h.buffer(1000, &body[..1000]);
    let b3 = h.buffer(2000, &body[1000..]);
    h.add_chain(TX_QUEUE, &[(b1, 12, 0), (b2, 1000, 0), (b3, 2000, 0)]);
    h.net.process_tx(0);

    let mut got = vec![0u8; 70000];
    let n = h.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &one[..]);
    let n = h.peer.recv(&mut got).unwrap();
    assert_eq!(&got[..n], &two[..]);
    assert_eq!(h.used(TX_QUEUE), vec![(0, 0), (1, 0)]);
    let s = h.net.counters().snapshot();
    assert_eq!(
        (s.tx_frames, s.tx_bytes, s.tx_csum_frames, s.tx_gso_frames),
        (2, 3100, 1, 1)
    );
    assert!(
        h.irq.read().is_ok(),
        "the guest is interrupted for used TX buffers"
    );
}

#[test]
fn rx_fills_one_buffer_and_sets_num_buffers_to_one() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let buf = h.buffer(1526, &[0xee; 16]);
    h.add_chain(RX_QUEUE, &[(buf, 1526, F_WRITE)]);
    let frame = Harness::frame(0, 0, 60);
    h.peer.send(&frame).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(h.used(RX_QUEUE), vec![(0, 72)]);
    let got = h.read(buf, 72);
    assert_eq!(&got[12..], &frame[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1);
    assert_eq!(h.net.counters().snapshot().rx_frames, 1);
}

#[test]
fn rx_merges_buffers_for_a_large_frame_and_gives_back_the_rest() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    let bufs: Vec<u64> = (0..4).map(|_| h.buffer(100, &[])).collect();
    for b in &bufs {
        h.add_chain(RX_QUEUE, &[(*b, 100, F_WRITE)]);
    }
    let frame = Harness::frame(0, 0, 150); // 162 bytes: two buffers
    h.peer.send(&frame).unwrap();
    let small = Harness::frame(0, 0, 10); // the next frame takes the third buffer
    h.peer.send(&small).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(h.used(RX_QUEUE), vec![(0, 100), (1, 62), (2, 22)]);
    let mut first = h.read(bufs[0], 100);
    first.extend(h.read(bufs[1], 62));
    assert_eq!(u16::from_le_bytes([first[10], first[11]]), 2, "num_buffers");
    assert_eq!(&first[12..], &frame[12..]);
    let third = h.read(bufs[2], 22);
    assert_eq!(u16::from_le_bytes([third[10], third[11]]), 1);
    assert_eq!(h.net.counters().snapshot().rx_frames, 2);
}

fn stashed_rx_chains(h: &Harness) -> usize {
    h.net.state().queues[RX_QUEUE].stashed_chains
}

#[test]
fn rx_keeps_unused_chains_for_later_frames_in_order() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG | bit(VIRTIO_NET_F_GUEST_TSO4));
    let bufs: Vec<u64> = (0..8).map(|_| h.buffer(100, &[])).collect();
    for b in &bufs {
        h.add_chain(RX_QUEUE, &[(*b, 100, F_WRITE)]);
    }
    for _ in 0..3 {
        h.peer.send(&Harness::frame(0, 0, 10)).unwrap();
    }
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(h.used(RX_QUEUE), vec![(0, 22), (1, 22), (2, 22)]);
    assert_eq!(
        stashed_rx_chains(&h),
        5,
        "taken once, kept for the next frames"
    );

    // Two more buffers; a 312-byte frame takes the next four chains in order, the rest stay.
    for _ in 0..2 {
        let b = h.buffer(100, &[]);
        h.add_chain(RX_QUEUE, &[(b, 100, F_WRITE)]);
    }
    let big = Harness::frame(0, 0, 300);
    h.peer.send(&big).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(
        h.used(RX_QUEUE)[3..],
        [(3, 100), (4, 100), (5, 100), (6, 12)]
    );
    let mut got = Vec::new();
    for (b, len) in bufs[3..7].iter().zip([100, 100, 100, 12]) {
        got.extend(h.read(*b, len));
    }
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 4, "num_buffers");
    assert_eq!(&got[12..], &big[12..]);
    assert_eq!(stashed_rx_chains(&h), 3);
    assert_eq!(h.net.counters().snapshot().rx_frames, 4);
}

#[test]
fn a_malformed_rx_chain_behind_stashed_ones_is_returned_at_once() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG | bit(VIRTIO_NET_F_GUEST_TSO4));
    let good = h.buffer(2048, &[]);
    h.add_chain(RX_QUEUE, &[(good, 2048, F_WRITE)]);
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0); // no frame yet: the chain waits in the stash
    assert_eq!(stashed_rx_chains(&h), 1);
    let other = h.buffer(2048, &[]);
    h.add_chain(RX_QUEUE, &[(other, 2048, 0)]); // read-only in RX
    h.peer.send(&Harness::frame(0, 0, 60)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(h.used(RX_QUEUE), vec![(1, 0), (0, 72)]);
    assert_eq!(h.net.counters().snapshot().malformed_chains, 1);
}

#[test]
fn a_frame_over_several_chains_is_published_whole_and_interrupts_as_event_idx_says() {
    use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    let mut h = Harness::new(TUN_F_ALL);
    let queues = h
        .queues
        .iter()
        .map(|d| {
            let mut q = d.create_queue();
            q.set_event_idx(true);
            q
        })
        .collect();
    h.start_with(V1 | MRG | bit(VIRTIO_RING_F_EVENT_IDX), queues);
    let (avail, used, size) = {
        let d = &h.queues[RX_QUEUE];
        (d.avail, d.used, d.size)
    };
    let used_idx = |h: &Harness| h.mem.read_obj::<u16>(GuestAddress(used + 2)).unwrap();
    // used_event 1: the driver wants an interrupt once the device passes used index 1
    h.mem
        .write_obj(1u16, GuestAddress(avail + 4 + 2 * u64::from(size)))
        .unwrap();
    for _ in 0..4 {
        let b = h.buffer(100, &[]);
        h.add_chain(RX_QUEUE, &[(b, 100, F_WRITE)]);
    }
    h.peer.send(&Harness::frame(0, 0, 150)).unwrap(); // two chains: used entries 0 and 1
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(used_idx(&h), 2);
    assert_eq!(h.used(RX_QUEUE), vec![(0, 100), (1, 62)]);
    assert!(h.irq.read().is_ok(), "used_event 1 was passed");

    h.peer.send(&Harness::frame(0, 0, 10)).unwrap(); // used entry 2: used_event is behind
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(used_idx(&h), 3);
    assert!(
        h.irq.read().is_err(),
        "no interrupt the driver did not ask for"
    );

    h.mem
        .write_obj(3u16, GuestAddress(avail + 4 + 2 * u64::from(size)))
        .unwrap();
    h.peer.send(&Harness::frame(0, 0, 10)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert!(h.irq.read().is_ok(), "used_event 3 was passed");
}

#[test]
fn a_frame_waits_for_room_rather_than_being_cut_short_once_the_driver_posted_enough() {
    // GUEST_TSO4: the largest frame is 65562 bytes; two 40000-byte buffers hold one.
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG | bit(VIRTIO_NET_F_GUEST_TSO4));
    let bufs: Vec<u64> = (0..3).map(|_| h.buffer(40000, &[])).collect();
    for b in &bufs[..2] {
        h.add_chain(RX_QUEUE, &[(*b, 40000, F_WRITE)]);
    }
    h.peer.send(&Harness::frame(0, 0, 100)).unwrap();
    let big = Harness::frame(0, 0, 50000);
    h.peer.send(&big).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(
        h.used(RX_QUEUE),
        vec![(0, 112)],
        "the big frame is not read into the 40000 bytes left"
    );
    assert_eq!(h.net.counters().snapshot().rx_no_buffers, 1);
    assert!(h.net.pairs[0].rx_pending);

    h.add_chain(RX_QUEUE, &[(bufs[2], 40000, F_WRITE)]);
    h.net.process_rx(0); // the guest's notification
    assert_eq!(h.used(RX_QUEUE)[1..], [(1, 40000), (2, 10012)]);
    let mut got = h.read(bufs[1], 40000);
    got.extend(h.read(bufs[2], 10012));
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 2, "num_buffers");
    assert_eq!(&got[12..], &big[12..], "the frame arrives whole");
}

#[test]
fn an_interrupt_the_guest_never_acknowledges_is_raised_again_by_the_watchdog() {
    use std::time::{Duration, Instant};
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;

    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    let b = h.buffer(2048, &[]);
    h.add_chain(RX_QUEUE, &[(b, 2048, F_WRITE)]);
    h.peer.send(&Harness::frame(0, 0, 40)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert!(h.irq.read().is_ok(), "the frame's interrupt");

    // the guest never runs its handler: the status bit stays set
    let later = Instant::now() + Duration::from_millis(600);
    h.net.check_interrupt(later);
    assert!(h.irq.read().is_ok(), "raised again");
    assert_eq!(h.net.counters().snapshot().interrupts_resent, 1);
    h.net.check_interrupt(later);
    assert!(h.irq.read().is_err(), "not again at once");

    h.interrupt.as_ref().unwrap().ack(VIRTIO_MMIO_INT_VRING);
    h.net.check_interrupt(later + Duration::from_secs(5));
    assert!(
        h.irq.read().is_err(),
        "an acknowledged interrupt is left alone"
    );
    assert_eq!(h.net.counters().snapshot().interrupts_resent, 1);
}

#[test]
fn moderation_merges_the_interrupts_due_within_its_window_into_one_at_its_end() {
    use std::time::{Duration, Instant};

    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    h.net.set_coalescing(Duration::from_millis(50));
    let frame = |h: &mut Harness| {
        let b = h.buffer(2048, &[]);
        h.add_chain(RX_QUEUE, &[(b, 2048, F_WRITE)]);
        h.peer.send(&Harness::frame(0, 0, 40)).unwrap();
        h.net.pairs[0].rx_pending = true;
        h.net.process_rx(0);
    };
    frame(&mut h);
    assert!(
        h.irq.read().is_ok(),
        "the first after a quiet spell goes at once"
    );
    frame(&mut h);
    frame(&mut h);
    assert!(
        h.irq.read().is_err(),
        "the next two wait for the window's end"
    );
    assert_eq!(
        h.used(RX_QUEUE).len(),
        3,
        "the frames themselves do not wait"
    );
    assert!(h.net.irq_deferred);
    h.net.moderation_ended(Instant::now());
    assert!(h.irq.read().is_ok(), "one interrupt for both at the end");
    let stats = h.net.counters().snapshot();
    assert_eq!((stats.interrupts, stats.interrupts_merged), (2, 1));
    // a reset forgets a deferred interrupt
    frame(&mut h);
    assert!(h.net.irq_deferred);
    h.net.reset();
    assert!(!h.net.irq_deferred);
    h.net.moderation_ended(Instant::now());
    assert!(
        h.irq.read().is_err(),
        "nothing raised for a device that was reset"
    );
}

#[test]
fn coalesced_tx_keeps_notifications_off_until_a_poll_finds_the_queue_empty() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    h.net.set_coalescing(std::time::Duration::from_millis(50));
    let used_flags =
        |h: &Harness| u16::from_le_bytes(h.read(h.queues[TX_QUEUE].used, 2).try_into().unwrap());
    let send = |h: &mut Harness| {
        let frame = Harness::frame(0, 0, 100);
        let a = h.buffer(frame.len() as u32, &frame);
        h.add_chain(TX_QUEUE, &[(a, frame.len() as u32, 0)]);
    };
    send(&mut h);
    h.net.process_tx(0);
    assert_eq!(h.used(TX_QUEUE).len(), 1, "the frame went at once");
    assert!(h.net.pairs[0].tx_polling);
    assert_eq!(
        used_flags(&h),
        1,
        "VRING_USED_F_NO_NOTIFY: the guest need not kick"
    );
    // the guest queues another without a kick; the poll sends it and polls again
    send(&mut h);
    h.net.tx_poll_due(0);
    assert_eq!(h.used(TX_QUEUE).len(), 2);
    assert!(h.net.pairs[0].tx_polling);
    assert_eq!(used_flags(&h), 1);
    // a poll that finds nothing turns notifications back on
    h.net.tx_poll_due(0);
    assert!(!h.net.pairs[0].tx_polling);
    assert_eq!(used_flags(&h), 0, "the guest kicks again");
    let mut got = vec![0u8; 2048];
    for _ in 0..2 {
        h.peer.recv(&mut got).unwrap();
    }
}

#[test]
fn rx_without_buffers_waits_and_resumes_when_the_guest_adds_some() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    h.peer.send(&Harness::frame(0, 0, 40)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert!(h.used(RX_QUEUE).is_empty());
    assert_eq!(h.net.counters().snapshot().rx_no_buffers, 1);
    assert!(
        h.net.pairs[0].rx_pending,
        "the frame is still waiting in the backend"
    );
    for _ in 0..2 {
        let b = h.buffer(2048, &[]);
        h.add_chain(RX_QUEUE, &[(b, 2048, F_WRITE)]);
    }
    h.net.process_rx(0); // what a guest notification on the RX queue does
    assert_eq!(h.used(RX_QUEUE), vec![(0, 52)]);
    assert!(
        !h.net.pairs[0].rx_pending,
        "read to EAGAIN, the second buffer stays with the device"
    );
}

#[test]
fn malformed_tx_chains_are_returned_empty_and_nothing_is_sent() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let ok = h.buffer(64, &Harness::frame(0, 0, 52));
    h.add_chain(TX_QUEUE, &[(ok, 8, 0)]); // shorter than the header
    h.add_chain(TX_QUEUE, &[(ok, 64, F_WRITE)]); // device-writable in TX
    h.add_chain(TX_QUEUE, &[(MEM_SIZE as u64 - 16, 64, 0)]); // runs past guest memory
    h.add_chain(TX_QUEUE, &[(ok, 12, 0), (ok, 70_000, 0)]); // longer than any frame (and memory)
    let big = h.buffer(70_000, &[]);
    h.add_chain(TX_QUEUE, &[(big, 70_000, 0)]); // longer than any frame
                                                // A chain whose descriptor points at itself.
    let looping = RawDescriptor::from(SplitDescriptor::new(ok, 64, F_NEXT, 5));
    h.add_raw(TX_QUEUE, &[looping]);
    // A chain whose next index is past the table.
    h.add_raw(
        TX_QUEUE,
        &[RawDescriptor::from(SplitDescriptor::new(
            ok, 64, F_NEXT, 999,
        ))],
    );
    h.net.process_tx(0);
    let used = h.used(TX_QUEUE);
    assert_eq!(used.len(), 7, "{used:?}");
    assert!(used.iter().all(|(_, len)| *len == 0));
    let s = h.net.counters().snapshot();
    assert_eq!((s.malformed_chains, s.tx_frames), (7, 0));
    let mut buf = [0u8; 100];
    assert!(
        h.peer.recv(&mut buf).is_err(),
        "nothing reached the backend"
    );
    // The queue still works afterwards.
    h.add_chain(TX_QUEUE, &[(ok, 64, 0)]);
    h.net.process_tx(0);
    assert_eq!(h.peer.recv(&mut buf).unwrap(), 64);
}

#[test]
fn malformed_rx_chains_are_returned_empty_and_the_frame_waits_for_a_good_one() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    let b = h.buffer(2048, &[]);
    h.add_chain(RX_QUEUE, &[(b, 2048, 0)]); // read-only in RX
    h.add_chain(RX_QUEUE, &[(MEM_SIZE as u64 - 8, 2048, F_WRITE)]); // outside memory
    h.add_chain(RX_QUEUE, &[(b, 4, F_WRITE)]); // no room for the header
    h.add_chain(RX_QUEUE, &[(b, 2048, F_WRITE)]);
    h.peer.send(&Harness::frame(0, 0, 100)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    assert_eq!(h.used(RX_QUEUE), vec![(0, 0), (1, 0), (2, 0), (3, 112)]);
    assert_eq!(h.net.counters().snapshot().malformed_chains, 3);
}

#[test]
fn a_full_backend_puts_the_chain_back_and_tx_resumes_when_writable() {
    let mut h = Harness::started(TUN_F_ALL, V1);
    let frame = Harness::frame(0, 0, 1000);
    let b = h.buffer(frame.len() as u32, &frame);
    for _ in 0..200 {
        h.add_chain(TX_QUEUE, &[(b, frame.len() as u32, 0)]);
    }
    h.net.process_tx(0);
    assert!(h.net.pairs[0].tx_blocked, "the socketpair filled up");
    let sent_first = h.used(TX_QUEUE).len();
    assert!(sent_first < 200);
    assert_eq!(h.net.counters().snapshot().tx_eagain, 1);
    let mut got = 0;
    let mut buf = [0u8; 2048];
    while h.peer.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(got, sent_first, "every used chain was sent, none dropped");
    h.net.pairs[0].tx_blocked = false; // what EPOLLOUT does
    h.net.process_tx(0);
    while h.peer.recv(&mut buf).is_ok() {
        got += 1;
    }
    if h.net.pairs[0].tx_blocked {
        h.net.pairs[0].tx_blocked = false;
        h.net.process_tx(0);
        while h.peer.recv(&mut buf).is_ok() {
            got += 1;
        }
    }
    assert_eq!(h.used(TX_QUEUE).len(), 200);
    assert_eq!(got, 200);
    assert_eq!(h.net.counters().tx_frames.load(Ordering::Relaxed), 200);
}

#[test]
fn reset_stops_the_device_and_it_can_start_again() {
    let mut h = Harness::started(TUN_F_ALL, V1 | bit(VIRTIO_NET_F_GUEST_CSUM));
    assert_eq!(h.net.pairs[0].backend.offloads, TUN_F_CSUM);
    h.net.reset();
    assert!(!h.net.is_active());
    assert_eq!(h.net.pairs[0].backend.offloads, 0);
    assert_eq!(h.net.acked_features(), 0);
    h.net.process_tx(0); // nothing to do, nothing breaks
    h.net.process_rx(0);
    h.start(V1 | bit(VIRTIO_NET_F_GUEST_CSUM) | bit(VIRTIO_NET_F_GUEST_TSO4));
    assert!(h.net.is_active());
    assert_eq!(h.net.pairs[0].backend.offloads, TUN_F_CSUM | TUN_F_TSO4);
}

#[test]
fn several_pairs_start_with_one_and_the_driver_enables_the_rest() {
    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    assert_ne!(
        h.net.features() & MQ,
        0,
        "MQ and the control queue are offered"
    );
    let mut pairs = [0u8; 2];
    h.net.read_config(8, &mut pairs);
    assert_eq!(u16::from_le_bytes(pairs), 2, "max_virtqueue_pairs");
    h.start(V1 | MQ);
    assert_eq!(h.net.pairs_in_use(), 1);
    assert!(h.net.pairs[0].backend.enabled && !h.net.pairs[1].backend.enabled);

    let ack = h.control(&[4, 0, 2, 0], 1); // VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET 2
    assert_eq!(h.read(ack, 1), [0], "VIRTIO_NET_OK");
    assert_eq!(h.used(CTRL), vec![(0, 1)]);
    assert_eq!(h.net.pairs_in_use(), 2);
    assert!(h.net.pairs[1].backend.enabled);

    // Pair 1 moves frames through its own backend.
    let frame = Harness::frame(0, 0, 80);
    let b = h.buffer(frame.len() as u32, &frame);
    h.add_chain(TX1, &[(b, frame.len() as u32, 0)]);
    h.net.process_tx(1);
    let mut got = [0u8; 256];
    assert_eq!(h.peers[0].recv(&mut got).unwrap(), frame.len());
    let rx = h.buffer(2048, &[]);
    h.add_chain(RX1, &[(rx, 2048, F_WRITE)]);
    h.peers[0].send(&frame).unwrap();
    h.net.pairs[1].rx_pending = true;
    h.net.process_rx(1);
    assert_eq!(h.used(RX1), vec![(0, frame.len() as u32)]);
}

#[test]
fn control_commands_out_of_range_or_unknown_are_refused() {
    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    h.start(V1 | MQ);
    for command in [&[4u8, 0, 3, 0][..], &[4, 0, 0, 0], &[0, 0, 1], &[4, 0, 2]] {
        let ack = h.control(command, 1);
        assert_eq!(h.read(ack, 1), [1], "VIRTIO_NET_ERR for {command:?}");
    }
    assert_eq!(h.net.pairs_in_use(), 1);
    // A command without a status byte, and one without a header, are malformed.
    let cmd = h.buffer(4, &[4, 0, 2, 0]);
    h.add_chain(CTRL, &[(cmd, 4, 0)]);
    h.add_chain(CTRL, &[(cmd, 1, 0), (cmd, 1, F_WRITE)]);
    h.net.process_ctrl();
    assert_eq!(h.net.counters().snapshot().malformed_chains, 2);
    assert_eq!(h.used(CTRL).len(), 6);

    let mut h = Harness::with_pairs(TUN_F_ALL, 2);
    h.start(V1 | bit(VIRTIO_NET_F_CTRL_VQ)); // MQ not acked: pairs stay at one
    let ack = h.control(&[4, 0, 2, 0], 1);
    assert_eq!(h.read(ack, 1), [1]);
    assert_eq!(h.net.pairs_in_use(), 1);
}

#[test]
fn the_state_dump_shows_the_device_and_the_guest_rings_side_by_side() {
    let mut h = Harness::started(TUN_F_ALL, V1 | MRG);
    for _ in 0..3 {
        let b = h.buffer(1526, &[]);
        h.add_chain(RX_QUEUE, &[(b, 1526, F_WRITE)]);
    }
    h.peer.send(&Harness::frame(0, 0, 60)).unwrap();
    h.net.pairs[0].rx_pending = true;
    h.net.process_rx(0);
    let s = h.net.state();
    assert!(s.active && s.broken.is_none());
    let rx = &s.queues[RX_QUEUE];
    assert!(rx.usable);
    assert_eq!((rx.avail_idx, rx.used_idx), (Some(3), Some(1)));
    assert_eq!((rx.next_avail, rx.next_used), (3, 1));
    assert_eq!(rx.stashed_chains, 2, "two chains wait for frames");
    assert!(
        s.interrupt_pending,
        "the guest was interrupted and has not acked"
    );
    let text = s.to_string();
    assert!(text.contains("queue 0: size 256, device avail 3 used 1, guest avail idx 3 used idx 1"));
    assert!(text.contains("stash 2 chains"), "{text}");

    h.queues[TX_QUEUE].set_avail_idx(300);
    h.net.process_tx(0);
    let s = h.net.state();
    assert!(s
        .broken
        .as_deref()
        .is_some_and(|b| b.contains("avail index 300")));
    assert!(s.to_string().contains("stopped (queue 1: avail index 300"));
}

#[test]
fn the_host_link_going_and_coming_back_reaches_the_guest_as_its_link_status() {
    use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

    let status = |h: &Harness| {
        let mut s = [0u8; 2];
        h.net.read_config(6, &mut s);
        u16::from_le_bytes(s)
    };
    let mut h = Harness::started(TUN_F_ALL, V1 | bit(VIRTIO_NET_F_STATUS));
    assert_eq!(status(&h), VIRTIO_NET_S_LINK_UP as u16);
    assert!(h.net.set_link(false), "a change");
    assert_eq!(status(&h), 0);
    assert!(h.irq.read().is_ok(), "the configuration change interrupt");
    let irq = h.interrupt.as_ref().unwrap();
    assert_ne!(irq.status() & VIRTIO_MMIO_INT_CONFIG, 0);
    irq.ack(VIRTIO_MMIO_INT_CONFIG);
    assert!(!h.net.set_link(false), "no change, no interrupt");
    assert!(h.irq.read().is_err());
    assert!(h.net.set_link(true));
    assert_eq!(status(&h), VIRTIO_NET_S_LINK_UP as u16);
    assert!(h.irq.read().is_ok());
    assert_eq!(h.net.counters().snapshot().link_changes, 2);

    // A driver that did not ack STATUS reads the field but gets no interrupt for it.
    let mut h = Harness::started(TUN_F_ALL, V1);
    assert!(h.net.set_link(false));
    assert_eq!(status(&h), 0);
    assert!(h.irq.read().is_err());
    // Nor does a device no driver has started.
    let mut h = Harness::new(TUN_F_ALL);
    assert!(h.net.set_link(false));
    assert!(h.irq.read().is_err());
}
