//! The vhost-user backend driven message by message, as a frontend (honest or not) would: memory
//! tables, ring set-up, frames both ways through a pair's thread, and what a bad frontend gets.
#![allow(clippy::cast_possible_truncation)] // test values are small

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;
use std::time::Duration;

use tapir_net_backend::socketpair::SocketpairBackend;
use vhost::vhost_user::message::{VhostUserMemoryRegion, VhostUserVringAddrFlags};
use vhost::vhost_user::{Error as VuError, VhostUserBackendReqHandlerMut};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::mmap::MmapRegion;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::eventfd::EventFd;

use super::test_utils::{wait_for, DriverQueue, F_WRITE, MRG, V1};
use super::{UserNet, UserNetHandler, HDR_LEN};

const MEM: u64 = 0x40_0000;
/// Where the frontend's VMM "maps" guest address 0 (ring addresses come in that space).
const VMM_BASE: u64 = 0x7f00_0000_0000;
const BUFS: u64 = 0x10_0000;

/// A memfd of `len` bytes, sealed against shrinking unless `sealed` is false.
fn memfd(len: u64, sealed: bool) -> File {
    // SAFETY: memfd_create with a valid NUL-terminated name; the fd is checked and owned below.
    let fd = unsafe { libc::memfd_create(c"tapir-test".as_ptr(), libc::MFD_ALLOW_SEALING) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh descriptor nobody else owns.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(len).unwrap();
    if sealed {
        // SAFETY: fcntl adding seals on a descriptor the file owns.
        let rc = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW,
            )
        };
        assert_eq!(rc, 0);
    }
    file
}

fn region(size: u64) -> VhostUserMemoryRegion {
    VhostUserMemoryRegion::new(0, size, VMM_BASE, 0)
}

/// A one-pair backend on a socketpair (MTU `mtu`), with the peer's end of it.
fn device(mtu: Option<u16>) -> (Arc<UserNet<SocketpairBackend>>, UnixDatagram) {
    coalescing_device(mtu, Duration::ZERO)
}

fn coalescing_device(
    mtu: Option<u16>,
    window: Duration,
) -> (Arc<UserNet<SocketpairBackend>>, UnixDatagram) {
    let (backend, peer) = SocketpairBackend::pair(0).unwrap();
    let net = UserNet::new("vu-test", vec![backend], [2, 0, 0, 0, 0, 1], mtu, 0)
        .unwrap()
        .with_coalescing(window);
    (Arc::new(net), peer)
}

struct Frontend {
    handler: UserNetHandler<SocketpairBackend>,
    net: Arc<UserNet<SocketpairBackend>>,
    peer: UnixDatagram,
    /// The "guest" side's view of the shared memory, and its two rings.
    rx: DriverQueue,
    tx: DriverQueue,
    calls: [EventFd; 2],
    kicks: [EventFd; 2],
}

impl Frontend {
    /// A backend with one pair, its memory table set from a sealed memfd, rings set up at
    /// 0x0/0x4000 (size 256), features `acked`, both rings started and its thread running.
    fn started(acked: u64) -> Self {
        Self::coalescing(acked, Duration::ZERO)
    }

    /// [`Self::started`] with the backend coalescing over `window`.
    fn coalescing(acked: u64, window: Duration) -> Self {
        let (net, peer) = coalescing_device(None, window);
        net.spawn_workers(256 << 10).unwrap();
        let mut handler = UserNetHandler::new(net.clone());
        let file = memfd(MEM, true);
        let mine = MmapRegion::<()>::from_file(
            FileOffset::new(file.try_clone().unwrap(), 0),
            MEM as usize,
        )
        .unwrap();
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(
            GuestMemoryMmap::from_regions(vec![
                GuestRegionMmap::new(mine, GuestAddress(0)).unwrap()
            ])
            .unwrap(),
        ));
        handler.set_owner().unwrap();
        handler.set_features(acked).unwrap();
        handler
            .set_mem_table(&[region(MEM)], vec![file], None)
            .unwrap();
        let rx = DriverQueue::new(mem, 0, 256);
        let tx = DriverQueue::new(mem, 0x4000, 256);
        let calls = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        let kicks = [
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
            EventFd::new(libc::EFD_NONBLOCK).unwrap(),
        ];
        for (i, q) in [&rx, &tx].into_iter().enumerate() {
            let i32_ = i as u32;
            handler.set_vring_num(i32_, 256).unwrap();
            handler
                .set_vring_addr(
                    i32_,
                    VhostUserVringAddrFlags::empty(),
                    VMM_BASE + q.desc,
                    VMM_BASE + q.used,
                    VMM_BASE + q.avail,
                    0,
                )
                .unwrap();
            handler.set_vring_base(i32_, 0).unwrap();
            handler
                .set_vring_call(i as u8, Some(dup(&calls[i])))
                .unwrap();
            handler
                .set_vring_kick(i as u8, Some(dup(&kicks[i])))
                .unwrap();
        }
        Self {
            handler,
            net,
            peer,
            rx,
            tx,
            calls,
            kicks,
        }
    }
}

impl Drop for Frontend {
    fn drop(&mut self) {
        self.net.stop_workers();
    }
}

fn dup(evt: &EventFd) -> File {
    let clone = evt.try_clone().unwrap();
    // SAFETY: the clone's descriptor is handed over whole to the File.
    unsafe { File::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(clone)) }
}

#[test]
fn frames_cross_both_ways_through_the_pairs_thread() {
    let f = Frontend::started(V1 | MRG);
    // guest -> peer: one chain [header | frame], kicked
    let frame = b"\x02\0\0\0\0\x01\x02\0\0\0\0\x02\x08\0hello vhost-user";
    let mut chain = vec![0u8; HDR_LEN];
    chain.extend_from_slice(frame);
    f.tx.offer(0, BUFS, &chain);
    f.kicks[1].write(1).unwrap();
    let mut got = [0u8; 2048];
    let mut n = 0;
    wait_for("the frame at the peer", || match f.peer.recv(&mut got) {
        Ok(len) => {
            n = len;
            true
        }
        Err(_) => false,
    });
    assert_eq!(&got[HDR_LEN..n], frame, "the frame, behind its header");
    wait_for("the TX chain used", || f.tx.used_entries() == vec![(0, 0)]);
    wait_for("the TX interrupt", || f.calls[1].read().is_ok());

    // peer -> guest: a buffer posted, a frame sent by the peer
    let rx_buf = BUFS + 0x1_0000;
    f.rx.store_desc(
        0,
        RawDescriptor::from(SplitDescriptor::new(rx_buf, 4096, F_WRITE, 0)),
    );
    f.rx.publish(0);
    f.kicks[0].write(1).unwrap();
    let mut incoming = vec![0u8; HDR_LEN];
    incoming.extend_from_slice(b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\0hello guest");
    f.peer.send(&incoming).unwrap();
    wait_for("the RX chain used", || !f.rx.used_entries().is_empty());
    assert_eq!(f.rx.used_entries(), vec![(0, incoming.len() as u32)]);
    let mut seen = vec![0u8; incoming.len()];
    f.rx.mem_read(rx_buf, &mut seen);
    assert_eq!(&seen[HDR_LEN..], &incoming[HDR_LEN..]);
    assert_eq!(u16::from_le_bytes([seen[10], seen[11]]), 1, "num_buffers");
    wait_for("the RX interrupt", || f.calls[0].read().is_ok());
    let stats = f.net.counters().snapshot();
    assert_eq!((stats.rx_frames, stats.tx_frames), (1, 1));
}

#[test]
fn a_stopped_ring_gives_back_where_it_was_and_can_start_again() {
    let mut f = Frontend::started(V1);
    let frame = vec![0u8; HDR_LEN + 60];
    for head in 0..3u16 {
        f.tx.offer(head, BUFS + 0x1000 * u64::from(head), &frame);
    }
    f.kicks[1].write(1).unwrap();
    wait_for("three TX chains used", || f.tx.used_entries().len() == 3);
    let state = f.handler.get_vring_base(1).unwrap();
    assert_eq!({ state.num }, 3, "the next avail index");
    // started again from there (as after a driver restart in the frontend)
    f.handler.set_vring_base(1, 3).unwrap();
    f.handler.set_vring_kick(1, Some(dup(&f.kicks[1]))).unwrap();
    f.tx.offer(3, BUFS, &frame);
    f.kicks[1].write(1).unwrap();
    wait_for("the fourth chain used", || f.tx.used_entries().len() == 4);
}

#[test]
fn memory_that_could_crash_the_daemon_is_refused() {
    let (net, _peer) = device(None);
    let mut h = UserNetHandler::new(net);
    // a memfd that can shrink: truncating it would turn the daemon's accesses into SIGBUS
    let err = h
        .set_mem_table(&[region(MEM)], vec![memfd(MEM, false)], None)
        .unwrap_err();
    assert!(err.to_string().contains("F_SEAL_SHRINK"), "{err}");
    // a region past its file's end
    let err = h
        .set_mem_table(&[region(2 * MEM)], vec![memfd(MEM, true)], None)
        .unwrap_err();
    assert!(err.to_string().contains("past its file's end"), "{err}");
    let err = h
        .set_mem_table(
            &[VhostUserMemoryRegion::new(0, MEM, VMM_BASE, u64::MAX - 10)],
            vec![memfd(MEM, true)],
            None,
        )
        .unwrap_err();
    assert!(err.to_string().contains("past its file's end"), "{err}");
    // overlapping regions
    let err = h
        .set_mem_table(
            &[
                region(MEM),
                VhostUserMemoryRegion::new(0x1000, 0x1000, VMM_BASE, 0),
            ],
            vec![memfd(MEM, true), memfd(MEM, true)],
            None,
        )
        .unwrap_err();
    assert!(matches!(err, VuError::ReqHandlerError(_)), "{err}");
    // files and regions that do not match up
    assert!(h.set_mem_table(&[region(MEM)], vec![], None).is_err());
}

#[test]
fn rings_a_frontend_gets_wrong_are_refused_before_use() {
    let (net, _peer) = device(None);
    let mut h = UserNetHandler::new(net.clone());
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let flags = VhostUserVringAddrFlags::empty;
    // a ring index the device does not have
    assert!(matches!(
        h.set_vring_num(2, 256),
        Err(VuError::InvalidParam)
    ));
    assert!(matches!(h.get_vring_base(7), Err(VuError::InvalidParam)));
    assert!(h.set_vring_kick(200, Some(dup(&kick))).is_err());
    // sizes: zero, not a power of two, more than the device's 1024
    for bad in [0, 3, 2048, u32::MAX] {
        assert!(h.set_vring_num(0, bad).is_err(), "size {bad}");
    }
    // addresses before any memory table, then outside it
    assert!(h
        .set_vring_addr(
            0,
            flags(),
            VMM_BASE,
            VMM_BASE + 0x2000,
            VMM_BASE + 0x1000,
            0
        )
        .is_err());
    // started before its addresses are known
    h.set_vring_num(0, 256).unwrap();
    assert!(h.set_vring_kick(0, Some(dup(&kick))).is_err());
    h.set_mem_table(&[region(MEM)], vec![memfd(MEM, true)], None)
        .unwrap();
    assert!(
        h.set_vring_addr(0, flags(), 0x1000, 0x3000, 0x2000, 0)
            .is_err(),
        "not a VMM address"
    );
    // a ring that runs past the end of memory: set, but refused when started
    let near_end = VMM_BASE + MEM - 0x100;
    h.set_vring_addr(0, flags(), near_end, near_end, near_end, 0)
        .unwrap();
    let err = h.set_vring_kick(0, Some(dup(&kick))).unwrap_err();
    assert!(
        err.to_string()
            .contains("does not lie in the shared memory"),
        "{err}"
    );
    // features never offered
    assert!(h.set_features(1 << 63).is_err());
    // nothing of that started anything, and the backend is still whole
    net.spawn_workers(256 << 10).unwrap();
    net.stop_workers();
}

#[test]
fn the_configuration_space_reads_as_the_built_in_devices() {
    let (net, _peer) = device(Some(1400));
    let mut h = UserNetHandler::new(net);
    let flags = vhost::vhost_user::message::VhostUserConfigFlags::empty();
    let config = h.get_config(0, 12, flags).unwrap();
    assert_eq!(&config[..6], &[2, 0, 0, 0, 0, 1]);
    assert_eq!(u16::from_le_bytes([config[10], config[11]]), 1400);
    assert_eq!(
        h.get_config(10, 8, flags).unwrap(),
        vec![0x78, 0x05, 0, 0, 0, 0, 0, 0]
    );
    assert_eq!(h.get_config(u32::MAX, 4, flags).unwrap(), vec![0; 4]);
    assert!(h.get_config(0, u32::MAX, flags).unwrap().len() <= 4096);
    assert!(h.set_config(0, &[1], flags).is_err());
}

#[test]
fn a_ring_at_the_end_of_the_highest_region_is_refused() {
    let (net, _peer) = device(None);
    let mut h = UserNetHandler::new(net);
    // (the highest region vm-memory maps ends one page below 2^64)
    let top = u64::MAX - 0x1fff;
    h.set_mem_table(
        &[VhostUserMemoryRegion::new(top, 0x1000, VMM_BASE, 0)],
        vec![memfd(0x1000, true)],
        None,
    )
    .unwrap();
    let last = VMM_BASE + 0xffe; // its used index would lie past the region's end
    h.set_vring_num(0, 1).unwrap();
    h.set_vring_addr(0, VhostUserVringAddrFlags::empty(), last, last, last, 0)
        .unwrap();
    let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let err = h.set_vring_kick(0, Some(dup(&kick))).unwrap_err();
    assert!(
        err.to_string().contains("used ring outside memory"),
        "{err}"
    );
}

#[test]
fn an_interrupt_due_before_the_frontend_hands_over_its_call_eventfd_is_delivered_then() {
    // QEMU restarts a ring with SET_VRING_KICK before SET_VRING_CALL: a pass in between (frames
    // waiting in the macvtap) uses buffers while the ring has no call eventfd.
    let mut f = Frontend::started(V1 | MRG);
    f.handler.get_vring_base(0).unwrap();
    let rx_buf = BUFS + 0x1_0000;
    f.rx.store_desc(
        0,
        RawDescriptor::from(SplitDescriptor::new(rx_buf, 4096, F_WRITE, 0)),
    );
    f.rx.publish(0);
    let mut incoming = vec![0u8; HDR_LEN];
    incoming.extend_from_slice(b"\x02\0\0\0\0\x02\x02\0\0\0\0\x01\x08\0while restarting");
    f.peer.send(&incoming).unwrap();
    f.handler.set_vring_base(0, 0).unwrap();
    f.handler.set_vring_kick(0, Some(dup(&f.kicks[0]))).unwrap();
    wait_for("the RX chain used", || !f.rx.used_entries().is_empty());
    assert!(f.calls[0].read().is_err(), "no call eventfd yet");
    let call = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    f.handler.set_vring_call(0, Some(dup(&call))).unwrap();
    assert_eq!(
        call.read().ok(),
        Some(1),
        "the owed interrupt, on the new eventfd"
    );
    // owed once, not again
    f.handler.set_vring_call(0, Some(dup(&call))).unwrap();
    assert!(call.read().is_err());
}

#[test]
fn coalescing_holds_a_second_interrupt_to_the_window_and_polls_tx() {
    let f = Frontend::coalescing(V1, Duration::from_millis(500));
    let frame = vec![0u8; HDR_LEN + 60];
    let send = |head: u16, kick: bool| {
        f.tx.offer(head, BUFS + 0x1000 * u64::from(head), &frame);
        if kick {
            f.kicks[1].write(1).unwrap();
        }
    };
    let mut got = [0u8; 2048];
    send(0, true);
    wait_for("the first frame", || f.peer.recv(&mut got).is_ok());
    // the first interrupt after a quiet spell goes at once
    wait_for("the first interrupt", || f.calls[1].read().is_ok());
    // the next, due within the window, waits for its end
    send(1, true);
    wait_for("the second frame", || f.peer.recv(&mut got).is_ok());
    wait_for("the second chain used", || f.tx.used_entries().len() == 2);
    std::thread::sleep(Duration::from_millis(20));
    assert!(f.calls[1].read().is_err(), "held to the window's end");
    wait_for("the held interrupt", || f.calls[1].read().is_ok());
    assert_eq!(f.net.counters().snapshot().interrupts, 2);
    // Without a kick: the pass that sent frames left the guest's notifications off and polls
    // the ring again, which finds this one.
    send(2, false);
    wait_for("a frame found by the poll", || {
        f.peer.recv(&mut got).is_ok()
    });
}
