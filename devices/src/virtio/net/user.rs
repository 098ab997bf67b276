//! The vhost-user-net backend: Tapir's own data plane (the passes of `rx.rs` and `tx.rs`, one
//! [`QueuePair`] per pair, each over one macvtap queue) serving the rings of a vhost-user frontend
//! (QEMU, Cloud Hypervisor...). The vhost crate reads and answers the protocol's messages
//! (`BackendReqHandler`); [`UserNetHandler`] is what they do; each pair is served by a thread of
//! its own ([`UserNet::spawn_workers`]) waiting on the pair's kick eventfds, its macvtap queue and
//! its yield eventfd.
//!
//! Why not the vhost-user-backend crate: QEMU 7.2 enables the first pair's rings at every device
//! reset, before it acks any feature, and needs VHOST_USER_F_PROTOCOL_FEATURES to start a
//! vhost-user-net device at all; the crate's message loop drops the connection at such an early
//! SET_VRING_ENABLE and cannot be told otherwise. Here the early message is refused and the
//! connection stays (see `serve_connection` in Tapir's `user_net`).
//!
//! The frontend keeps what the guest sees of the device besides the rings: the control queue, the
//! MAC and the link status. This side offers the features its backends carry (the offloads the
//! macvtap takes, MRG_RXBUF, EVENT_IDX, MQ with one pair per macvtap queue), answers the
//! configuration space when asked, and hands the offloads the driver acked to the macvtap
//! (TUNSETOFFLOAD). The built-in device's guarantees hold: a pass has a budget and a yield comes
//! back through the pair's eventfd, the RX stash is bounded, a ring the driver broke stops its
//! pair (until the frontend sets the ring up again) and never the daemon, logs are rate-limited.
//!
//! What a frontend hands over is checked before use: ring sizes (a power of two up to 1024), ring
//! addresses (inside the memory it shared, checked again before every pass), and each memory
//! region (inside its file; a file that can be shrunk, a memfd without F_SEAL_SHRINK, is refused:
//! a frontend truncating it would turn the daemon's next access into SIGBUS).

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tapir_net_backend::{offload, NetBackend};
use vhost::vhost_user::message::{
    VhostTransferStateDirection, VhostTransferStatePhase, VhostUserConfigFlags, VhostUserInflight,
    VhostUserLog, VhostUserMemoryRegion, VhostUserProtocolFeatures, VhostUserShMemConfig,
    VhostUserSharedMsg, VhostUserSingleMemoryRegion, VhostUserVirtioFeatures,
    VhostUserVringAddrFlags, VhostUserVringState,
};
use vhost::vhost_user::VhostUserBackendReqHandlerMut;
use vhost::vhost_user::{Error as VuError, GpuBackend, Result as VuResult};
use vhost::VhostUserMemoryRegionBase;
use virtio_bindings::virtio_net::{VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MRG_RXBUF};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::NetCounters;
use super::device::{rx_index, tx_index, Pass};
use super::pair::{moderation_wait, nonblocking_timer, PassContext, QueuePair, Scratch};
use super::rx::RxStash;
use super::state::{queue_state, NetState};
use super::{config_space, offered_features, pair_count, rx_frame_max, QUEUE_SIZE};
use crate::virtio::queue::{needs_interrupt, usable};
use crate::{info_limited, warn_limited};

/// Events of a pair's thread.
const RX_KICK: u64 = 0;
const TX_KICK: u64 = 1;
const BACKEND: u64 = 2;
const AGAIN: u64 = 3;
const EXIT: u64 = 4;
/// The pair's interrupt moderation window ended.
const MODERATION: u64 = 5;
/// The pair's TX poll is due (TX coalescing).
const TX_POLL: u64 = 6;

/// Most memory regions a frontend may share (QEMU sends at most 8 in one table).
const MAX_REGIONS: usize = 32;

/// A started ring: the frontend gave it a size, addresses, a base and a kick eventfd.
struct LiveRing {
    queue: Queue,
    kick: EventFd,
}

/// One queue pair: the host side (its macvtap queue, flags) as the built-in device has it, the
/// frontend's two rings once started, and what RX keeps between passes.
struct UserPair<B> {
    pair: QueuePair<B>,
    rings: [Option<LiveRing>; 2],
    /// The eventfds the guest's interrupts go through (SET_VRING_CALL), RX then TX.
    calls: [Option<EventFd>; 2],
    /// An interrupt came due while its ring had no call eventfd: QEMU starts a ring (its kick)
    /// before it hands over the call, and a pass in between must not lose the guest's interrupt
    /// (with EVENT_IDX the guest would wait for it forever). SET_VRING_CALL delivers it.
    owed: [bool; 2],
    /// SET_VRING_ENABLE's word per ring. On until the frontend says otherwise after it acked
    /// features: QEMU 7.2 enables the first pair at reset, before it acks any (a message the
    /// vhost crate refuses), and never again for a single pair; Linux guests with several pairs
    /// have QEMU enable and disable them through the control queue once the driver runs.
    enabled: [bool; 2],
    /// The frontend's memory, as its last table said.
    mem: Option<GuestMemoryMmap>,
    acked: u64,
    stash: RxStash,
    /// The RX ring's next used index when the backend last decided whether to signal the guest.
    rx_decided_at: u16,
    scratch: Scratch,
    /// The driver broke a rule on this pair's rings: no pass until the frontend starts them again.
    broken: bool,
    /// The pair's macvtap queue is attached (TUNSETQUEUE): only pairs the driver enabled are,
    /// so that the kernel steers no flows to a queue nobody reads.
    attached: bool,
    /// Passes due again, RX then TX (one that ran out of budget, a ring just started or
    /// enabled); the pair's `again` eventfd wakes its thread for them.
    again: [bool; 2],
    /// Interrupt moderation (see [`UserNet::with_coalescing`]): when the pair last signalled
    /// the guest, the interrupts waiting for `moderation` to fire (RX then TX), and the timer.
    last_irq: Option<Instant>,
    deferred: [bool; 2],
    moderation: TimerFd,
}

/// A pair, its lock, and what its thread waits on.
struct PairSlot<B> {
    state: Mutex<UserPair<B>>,
    epoll: Epoll,
    again: EventFd,
    exit: EventFd,
}

/// The device a vhost-user frontend drives: features, configuration, and the pairs.
pub struct UserNet<B> {
    name: String,
    pairs: Vec<PairSlot<B>>,
    features: u64,
    config: [u8; 12],
    mtu: u16,
    counters: Arc<NetCounters>,
    stopping: AtomicBool,
    /// The coalescing window (zero: none), as the built-in device's `coalesce=`.
    coalescing: Duration,
}

impl<B> std::fmt::Debug for UserNet<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNet")
            .field("name", &self.name)
            .field("pairs", &self.pairs.len())
            .field("features", &format_args!("{:#x}", self.features))
            .finish_non_exhaustive()
    }
}

fn invalid(why: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidInput, why)
}

impl<B: NetBackend + 'static> UserNet<B> {
    /// A device named `name` (for logs) with one pair per backend, whose configuration space
    /// says `mac` and `mtu`, offering the guest offloads in `host_offloads` (TUN_F_* the backends
    /// accept).
    pub fn new(
        name: impl Into<String>,
        backends: Vec<B>,
        mac: [u8; 6],
        mtu: Option<u16>,
        host_offloads: u32,
    ) -> std::io::Result<Self> {
        let n = backends.len();
        let pairs = pair_count(n, "a vhost-user-net backend")?;
        // The frontend has its own control queue (and offers it to the guest).
        let features = (offered_features(host_offloads, mtu.is_some(), n)
            & !(1 << VIRTIO_NET_F_CTRL_VQ))
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        let mtu_value = mtu.unwrap_or(1500);
        let mut slots = Vec::with_capacity(n);
        for (p, backend) in backends.into_iter().enumerate() {
            let slot = PairSlot {
                state: Mutex::new(UserPair {
                    pair: QueuePair::new(p, backend)?,
                    rings: [None, None],
                    calls: [None, None],
                    owed: [false, false],
                    enabled: [true, true],
                    mem: None,
                    acked: 0,
                    stash: RxStash::default(),
                    rx_decided_at: 0,
                    scratch: Scratch::default(),
                    broken: false,
                    attached: true,
                    again: [false, false],
                    last_irq: None,
                    deferred: [false, false],
                    moderation: nonblocking_timer()?,
                }),
                epoll: Epoll::new()?,
                again: EventFd::new(libc::EFD_NONBLOCK)?,
                exit: EventFd::new(libc::EFD_NONBLOCK)?,
            };
            {
                let state = slot.state.lock().unwrap_or_else(|e| e.into_inner());
                let add = |fd: RawFd, set: EventSet, data: u64| {
                    slot.epoll
                        .ctl(ControlOperation::Add, fd, EpollEvent::new(set, data))
                };
                add(
                    state.pair.backend.as_raw_fd(),
                    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                    BACKEND,
                )?;
                add(slot.again.as_raw_fd(), EventSet::IN, AGAIN)?;
                add(slot.exit.as_raw_fd(), EventSet::IN, EXIT)?;
                add(state.moderation.as_raw_fd(), EventSet::IN, MODERATION)?;
                add(state.pair.tx_timer.as_raw_fd(), EventSet::IN, TX_POLL)?;
            }
            slots.push(slot);
        }
        let net = Self {
            name: name.into(),
            pairs: slots,
            features,
            config: config_space(mac, mtu_value, pairs),
            mtu: mtu_value,
            counters: Arc::new(NetCounters::default()),
            stopping: AtomicBool::new(false),
            coalescing: Duration::ZERO,
        };
        net.detach_all_but_first();
        Ok(net)
    }

    /// Coalesces as the built-in device does with `coalesce=` (before the pairs' threads start):
    /// a pair whose guest took an interrupt less than `window` ago gets the next at the end of
    /// that window, with whatever else became due in it; and a TX pass that sent frames leaves
    /// the guest's notifications off and polls the ring again `window` later. A frontend's
    /// interrupt costs more than one Tapir injects itself (QEMU relays a virtio-mmio device's
    /// through its main loop), so fewer of them count. Zero turns it off (the default).
    pub fn with_coalescing(mut self, window: Duration) -> Self {
        self.coalescing = window;
        self
    }

    /// The device's counters (frames, bytes, refused chains...), shared.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    /// Queue pairs the device has.
    pub fn pair_count(&self) -> usize {
        self.pairs.len()
    }

    /// Serves pair `p` on the calling thread until [`Self::stop_workers`] (a VMM that sandboxes
    /// its threads starts them itself; [`Self::spawn_workers`] does it plainly).
    pub fn run_pair(&self, p: usize) {
        if p < self.pairs.len() {
            self.work(p);
        }
    }

    /// Starts one thread per pair (named `tapir-vu-pN`), serving it until [`Self::stop_workers`].
    pub fn spawn_workers(
        self: &Arc<Self>,
        stack_size: usize,
    ) -> std::io::Result<Vec<std::thread::JoinHandle<()>>> {
        (0..self.pairs.len())
            .map(|p| {
                let net = self.clone();
                std::thread::Builder::new()
                    .name(format!("tapir-vu-p{p}"))
                    .stack_size(stack_size)
                    .spawn(move || net.work(p))
            })
            .collect()
    }

    /// Tells every pair's thread to end.
    pub fn stop_workers(&self) {
        self.stopping.store(true, Ordering::Relaxed);
        for slot in &self.pairs {
            let _ = slot.exit.write(1);
        }
    }

    fn lock(&self, p: usize) -> MutexGuard<'_, UserPair<B>> {
        // A pass that panicked left nothing half-done that matters more than serving on.
        self.pairs[p]
            .state
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn detach_all_but_first(&self) {
        for p in 1..self.pairs.len() {
            let mut pair = self.lock(p);
            if let Err(e) = pair.pair.backend.set_queue_enabled(false) {
                warn_limited!(
                    "{}: detaching the macvtap queue of pair {p}: {e}",
                    self.name
                );
            }
            pair.attached = false;
        }
    }

    /// Pair `p`'s thread.
    fn work(&self, p: usize) {
        let slot = &self.pairs[p];
        let mut events = vec![EpollEvent::default(); 8];
        while !self.stopping.load(Ordering::Relaxed) {
            let n = match slot.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn_limited!("{}: pair {p}: waiting for events: {e}", self.name);
                    return;
                }
            };
            for event in &events[..n] {
                let set = EventSet::from_bits_truncate(event.events);
                match event.data() {
                    RX_KICK | TX_KICK => {
                        let rx = event.data() == RX_KICK;
                        {
                            let pair = self.lock(p);
                            if let Some(ring) = &pair.rings[usize::from(!rx)] {
                                let _ = ring.kick.read();
                            }
                        }
                        let counter = if rx {
                            &self.counters.rx_notifications
                        } else {
                            &self.counters.tx_notifications
                        };
                        NetCounters::add(counter, 1);
                        self.serve(p, rx);
                    }
                    BACKEND => {
                        if set.contains(EventSet::IN) {
                            self.lock(p).pair.rx_pending = true;
                            self.serve(p, true);
                        }
                        if set.contains(EventSet::OUT)
                            && std::mem::take(&mut self.lock(p).pair.tx_blocked)
                        {
                            self.serve(p, false);
                        }
                    }
                    AGAIN => {
                        let _ = slot.again.read();
                        let [rx, tx] = std::mem::take(&mut self.lock(p).again);
                        if rx {
                            self.serve(p, true);
                        }
                        if tx {
                            self.serve(p, false);
                        }
                    }
                    MODERATION => {
                        let mut guard = self.lock(p);
                        let pair = &mut *guard;
                        let _ = pair.moderation.wait();
                        let due = std::mem::take(&mut pair.deferred);
                        // (the window restarts with what it held, if anything)
                        pair.last_irq = due.iter().any(|d| *d).then(Instant::now);
                        for side in (0..2).filter(|s| due[*s]) {
                            self.signal(p, pair, side);
                        }
                    }
                    TX_POLL => {
                        let polling = {
                            let mut pair = self.lock(p);
                            let _ = pair.pair.tx_timer.wait();
                            std::mem::take(&mut pair.pair.tx_polling)
                        };
                        if polling {
                            self.serve(p, false);
                        }
                    }
                    _ => return,
                }
            }
        }
    }

    /// Has pair `p`'s thread pass over its RX (`rx`) or TX ring soon.
    fn schedule(&self, p: usize, rx: bool) {
        self.lock(p).again[usize::from(!rx)] = true;
        self.wake(p);
    }

    /// Wakes pair `p`'s thread for the passes its pair wants.
    fn wake(&self, p: usize) {
        if let Err(e) = self.pairs[p].again.write(1) {
            warn_limited!("{}: pair {p}: scheduling a pass: {e}", self.name);
        }
    }

    /// One pass over pair `p`'s RX (`rx`) or TX ring, then the guest's interrupt if it wants one.
    fn serve(&self, p: usize, rx: bool) {
        let mut guard = self.lock(p);
        let pair = &mut *guard;
        let side = usize::from(!rx);
        if pair.broken || !pair.enabled[side] {
            return;
        }
        let (Some(mem), Some(ring)) = (pair.mem.as_ref(), pair.rings[side].as_mut()) else {
            return;
        };
        if !usable(&ring.queue, mem) {
            return;
        }
        if !pair.attached {
            match pair.pair.backend.set_queue_enabled(true) {
                Ok(()) => {
                    pair.attached = true;
                    info_limited!("{}: pair {p} in use: its macvtap queue attached", self.name);
                }
                Err(e) => warn_limited!(
                    "{}: attaching the macvtap queue of pair {p}: {e}",
                    self.name
                ),
            }
        }
        let ctx = PassContext {
            name: &self.name,
            mem,
            counters: &self.counters,
            mrg_rxbuf: pair.acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame_max: rx_frame_max(pair.acked, self.mtu),
            tx_poll: !self.coalescing.is_zero(),
        };
        let (pass, used_any) = if rx {
            pair.pair
                .rx_pass_on(&mut ring.queue, &mut pair.stash, &ctx, &mut pair.scratch)
        } else {
            pair.pair
                .tx_pass_on(&mut ring.queue, &ctx, &mut pair.scratch)
        };
        if !rx && pair.pair.tx_polling {
            // the guest's notifications stay off until a poll finds the ring empty
            if let Err(e) = pair.pair.tx_timer.reset(self.coalescing, None) {
                warn_limited!("{}: pair {p}: arming the TX poll: {e}", self.name);
                pair.pair.tx_polling = false;
                pair.again[side] = true;
                self.wake(p);
            }
        }
        match pass {
            Pass::Done => {}
            Pass::Yield => {
                NetCounters::add(&self.counters.yields, 1);
                pair.again[side] = true;
                self.wake(p);
            }
            Pass::Failed(e) => {
                NetCounters::add(&self.counters.driver_errors, 1);
                warn_limited!(
                    "{}: the driver broke pair {p}'s rings ({e}); the pair waits until the frontend starts them again",
                    self.name
                );
                pair.broken = true;
                return;
            }
        }
        if !used_any {
            return;
        }
        let wants = if rx {
            let since = std::mem::replace(&mut pair.rx_decided_at, ring.queue.next_used());
            needs_interrupt(&ring.queue, mem, rx_index(p), since).unwrap_or(true)
        } else {
            ring.queue.needs_notification(mem).unwrap_or(true)
        };
        if wants {
            self.raise(p, pair, side);
        }
    }

    /// Raises the guest's interrupt for pair `p`'s ring `side` now, or at the end of the pair's
    /// moderation window (merged with the others due by then).
    fn raise(&self, p: usize, pair: &mut UserPair<B>, side: usize) {
        if pair.deferred.iter().any(|d| *d) {
            if std::mem::replace(&mut pair.deferred[side], true) {
                NetCounters::add(&self.counters.interrupts_merged, 1);
            }
            return;
        }
        let now = Instant::now();
        if let Some(wait) = moderation_wait(pair.last_irq, self.coalescing, now) {
            match pair.moderation.reset(wait, None) {
                Ok(()) => {
                    pair.deferred[side] = true;
                    return;
                }
                Err(e) => {
                    warn_limited!("{}: pair {p}: arming the moderation timer: {e}", self.name)
                }
            }
        }
        pair.last_irq = Some(now);
        self.signal(p, pair, side);
    }

    /// Raises the guest's interrupt for pair `p`'s ring `side` through its call eventfd, or owes
    /// it until the frontend hands one over.
    fn signal(&self, p: usize, pair: &mut UserPair<B>, side: usize) {
        let Some(call) = &pair.calls[side] else {
            pair.owed[side] = true;
            return;
        };
        pair.owed[side] = false;
        NetCounters::add(&self.counters.interrupts, 1);
        if let Err(e) = call.write(1) {
            warn_limited!("{}: pair {p}: signalling the guest: {e}", self.name);
        }
    }

    /// Stops pair `p`'s ring `side` (0 RX, 1 TX): it leaves the pair's thread, RX's stash goes
    /// (its chains belong to the ring); returns where the device was in the avail ring.
    fn stop_ring(&self, p: usize, side: usize) -> Option<u16> {
        let mut pair = self.lock(p);
        let ring = pair.rings[side].take()?;
        let _ = self.pairs[p].epoll.ctl(
            ControlOperation::Delete,
            ring.kick.as_raw_fd(),
            EpollEvent::default(),
        );
        if side == 0 {
            pair.stash = RxStash::default();
            pair.rx_decided_at = 0;
        }
        pair.broken = false;
        // (an interrupt owed or deferred was for this ring: the frontend reads the used ring
        // itself now)
        pair.owed[side] = false;
        pair.deferred[side] = false;
        if side == 1 {
            pair.pair.tx_polling = false;
        }
        Some(ring.queue.next_avail())
    }

    /// The pairs' rings as they are now (SIGUSR1 in the daemon logs it), next to what the
    /// frontend's guest wrote in them: where a guest went deaf, whether a kick or an interrupt
    /// was missed. A ring the frontend disabled reads as not set up; `interrupt_pending` says an
    /// interrupt is owed to a ring that has no call eventfd yet.
    pub fn state(&self) -> NetState {
        let mut queues = Vec::new();
        let (mut rx_pending, mut tx_blocked) = (Vec::new(), Vec::new());
        let (mut owed, mut live, mut attached) = (false, false, 0);
        let mut broken = None;
        for p in 0..self.pairs.len() {
            let pair = self.lock(p);
            rx_pending.push(pair.pair.rx_pending);
            tx_blocked.push(pair.pair.tx_blocked);
            owed |= pair.owed.iter().any(|o| *o);
            attached += usize::from(pair.attached);
            if pair.broken {
                broken = Some(format!("the driver broke pair {p}'s rings"));
            }
            let Some(mem) = pair.mem.as_ref() else {
                continue;
            };
            for (side, index) in [(0, rx_index(p)), (1, tx_index(p))] {
                if let Some(ring) = &pair.rings[side] {
                    live = true;
                    let usable = pair.enabled[side] && usable(&ring.queue, mem);
                    let mut q = queue_state(index, &ring.queue, usable, mem);
                    if side == 0 {
                        q.stashed_chains = pair.stash.chains();
                        q.stashed_buffers = pair.stash.buffers();
                    }
                    queues.push(q);
                }
            }
        }
        NetState {
            name: self.name.clone(),
            active: live,
            broken,
            pairs_in_use: attached,
            rx_pending,
            tx_blocked,
            interrupt_pending: owed,
            queues,
        }
    }

    /// The frontend went away: every ring stops, memory, features and calls are forgotten, the
    /// offloads cleared, and only the first macvtap queue stays attached.
    pub fn disconnected(&self) {
        for p in 0..self.pairs.len() {
            self.stop_ring(p, 0);
            self.stop_ring(p, 1);
            let mut pair = self.lock(p);
            pair.calls = [None, None];
            pair.enabled = [true, true];
            pair.mem = None;
            pair.acked = 0;
            pair.pair.rx_pending = true;
            pair.pair.tx_blocked = false;
            if let Err(e) = pair.pair.backend.set_offloads(0) {
                warn_limited!("{}: clearing offloads: {e}", self.name);
            }
        }
        self.detach_all_but_first();
    }
}

/// Checks a memory region's file: the region lies inside it, and it cannot shrink under the
/// daemon.
fn check_region_file(region: &VhostUserMemoryRegion, file: &File) -> Result<(), String> {
    let (size, offset) = (region.memory_size, region.mmap_offset);
    let len = file
        .metadata()
        .map_err(|e| format!("reading its file's size: {e}"))?
        .len();
    let end = offset.checked_add(size);
    if !matches!(end, Some(end) if end <= len) {
        return Err(format!(
            "{size:#x} bytes at file offset {offset:#x} run past its file's end ({len:#x})"
        ));
    }
    // SAFETY: fcntl on a descriptor the file owns; it only reads the seals.
    let seals = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GET_SEALS) };
    if seals >= 0 && seals & libc::F_SEAL_SHRINK == 0 {
        return Err("its file may be shrunk (a memfd without F_SEAL_SHRINK), \
            which would crash the backend"
            .into());
    }
    Ok(())
}

/// A frontend's region: where its VMM maps it, to translate ring addresses.
#[derive(Clone, Copy, Debug)]
struct Mapping {
    vmm_addr: u64,
    size: u64,
    gpa: u64,
}

/// The setup of one ring, kept until the frontend starts it with a kick eventfd.
#[derive(Clone, Copy, Debug, Default)]
struct RingSetup {
    size: u16,
    /// Guest-physical addresses: descriptor table, avail ring, used ring.
    addrs: Option<(u64, u64, u64)>,
    base: u16,
}

/// What the vhost-user messages of one frontend connection do to a [`UserNet`].
pub struct UserNetHandler<B> {
    net: Arc<UserNet<B>>,
    owned: bool,
    acked: u64,
    mappings: Vec<Mapping>,
    mem: Option<GuestMemoryMmap>,
    setups: Vec<RingSetup>,
}

impl<B: NetBackend + 'static> UserNetHandler<B> {
    /// A handler for a new connection to `net`, which must be as new or as
    /// [`UserNet::disconnected`] left it (the server calls that when a frontend goes).
    pub fn new(net: Arc<UserNet<B>>) -> Self {
        let rings = 2 * net.pairs.len();
        Self {
            net,
            owned: false,
            acked: 0,
            mappings: Vec::new(),
            mem: None,
            setups: vec![RingSetup::default(); rings],
        }
    }

    fn ring(&self, index: u32) -> VuResult<(usize, usize)> {
        let index = index as usize;
        if index >= self.setups.len() {
            return Err(VuError::InvalidParam);
        }
        Ok((index / 2, index % 2))
    }

    fn to_gpa(&self, vmm_addr: u64) -> VuResult<u64> {
        self.mappings
            .iter()
            .find(|m| vmm_addr >= m.vmm_addr && vmm_addr - m.vmm_addr < m.size)
            .map(|m| m.gpa + (vmm_addr - m.vmm_addr))
            .ok_or(VuError::InvalidParam)
    }

    fn refuse(&self, why: String) -> VuError {
        warn_limited!("{}: refused: {why}", self.net.name);
        VuError::ReqHandlerError(invalid(why))
    }
}

/// A 64-bit address as virtio-queue takes it: low and high halves.
fn halves(addr: u64) -> (Option<u32>, Option<u32>) {
    (
        u32::try_from(addr & 0xffff_ffff).ok(),
        u32::try_from(addr >> 32).ok(),
    )
}

impl<B> std::fmt::Debug for UserNetHandler<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserNetHandler")
            .field("net", &self.net)
            .field("owned", &self.owned)
            .field("acked", &format_args!("{:#x}", self.acked))
            .field("mappings", &self.mappings)
            .field("setups", &self.setups)
            .finish_non_exhaustive()
    }
}

fn unsupported(what: &'static str) -> VuError {
    VuError::InvalidOperation(what)
}

impl<B: NetBackend + 'static> VhostUserBackendReqHandlerMut for UserNetHandler<B> {
    fn set_owner(&mut self) -> VuResult<()> {
        if self.owned {
            return Err(VuError::InvalidOperation("already owned"));
        }
        self.owned = true;
        Ok(())
    }

    fn reset_owner(&mut self) -> VuResult<()> {
        self.net.disconnected();
        self.owned = false;
        self.acked = 0;
        Ok(())
    }

    fn reset_device(&mut self) -> VuResult<()> {
        self.net.disconnected();
        self.acked = 0;
        Ok(())
    }

    fn get_features(&mut self) -> VuResult<u64> {
        Ok(self.net.features)
    }

    fn set_features(&mut self, features: u64) -> VuResult<()> {
        if features & !self.net.features != 0 {
            return Err(self.refuse(format!(
                "features {features:#x} include some never offered ({:#x})",
                self.net.features
            )));
        }
        self.acked = features;
        let wanted = offload::tun_offloads_for(features);
        let event_idx = features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        // Without PROTOCOL_FEATURES every ring is enabled from now on (and SET_VRING_ENABLE
        // cannot come).
        let all_on = features & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits() == 0;
        let mut set = wanted;
        for p in 0..self.net.pairs.len() {
            let mut pair = self.net.lock(p);
            pair.acked = features;
            if all_on {
                pair.enabled = [true, true];
            }
            for ring in pair.rings.iter_mut().flatten() {
                ring.queue.set_event_idx(event_idx);
            }
            match pair.pair.backend.set_offloads(wanted) {
                Ok(s) => set = s,
                Err(e) => warn_limited!("{}: setting offloads {wanted:#x}: {e}", self.net.name),
            }
        }
        info_limited!(
            "{}: the frontend acked features {features:#x}; offloads to the guest {set:#x}",
            self.net.name
        );
        Ok(())
    }

    fn set_mem_table(
        &mut self,
        ctx: &[VhostUserMemoryRegion],
        files: Vec<File>,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<Vec<VhostUserMemoryRegionBase>>> {
        if ctx.len() > MAX_REGIONS || ctx.len() != files.len() {
            return Err(self.refuse(format!(
                "a memory table of {} regions with {} files",
                ctx.len(),
                files.len()
            )));
        }
        let mut regions = Vec::with_capacity(ctx.len());
        let mut mappings = Vec::with_capacity(ctx.len());
        for (region, file) in ctx.iter().zip(files) {
            let at = region.guest_phys_addr;
            check_region_file(region, &file)
                .map_err(|why| self.refuse(format!("memory region {at:#x}: {why}")))?;
            let size = usize::try_from(region.memory_size)
                .map_err(|_| self.refuse(format!("memory region {at:#x}: too large")))?;
            let mapped =
                MmapRegion::<()>::from_file(FileOffset::new(file, region.mmap_offset), size)
                    .map_err(|e| self.refuse(format!("mapping memory region {at:#x}: {e}")))?;
            let guest = GuestRegionMmap::new(mapped, GuestAddress(at)).ok_or_else(|| {
                self.refuse(format!("memory region {at:#x}: past the address space"))
            })?;
            regions.push(guest);
            mappings.push(Mapping {
                vmm_addr: region.user_addr,
                size: region.memory_size,
                gpa: at,
            });
        }
        let mem = GuestMemoryMmap::from_regions(regions)
            .map_err(|e| self.refuse(format!("the memory table: {e}")))?;
        for p in 0..self.net.pairs.len() {
            self.net.lock(p).mem = Some(mem.clone());
        }
        self.mem = Some(mem);
        self.mappings = mappings;
        Ok(None)
    }

    fn set_vring_num(&mut self, index: u32, num: u32) -> VuResult<()> {
        let (_, _) = self.ring(index)?;
        let size = u16::try_from(num)
            .ok()
            .filter(|n| n.is_power_of_two() && *n <= QUEUE_SIZE)
            .ok_or_else(|| self.refuse(format!("ring {index}: size {num}")))?;
        self.setups[index as usize].size = size;
        Ok(())
    }

    fn set_vring_addr(
        &mut self,
        index: u32,
        _flags: VhostUserVringAddrFlags,
        descriptor: u64,
        used: u64,
        available: u64,
        _log: u64,
    ) -> VuResult<()> {
        self.ring(index)?;
        let addrs = (
            self.to_gpa(descriptor)?,
            self.to_gpa(available)?,
            self.to_gpa(used)?,
        );
        self.setups[index as usize].addrs = Some(addrs);
        Ok(())
    }

    fn set_vring_base(&mut self, index: u32, base: u32) -> VuResult<()> {
        self.ring(index)?;
        self.setups[index as usize].base =
            u16::try_from(base).map_err(|_| VuError::InvalidParam)?;
        Ok(())
    }

    fn get_vring_base(&mut self, index: u32) -> VuResult<VhostUserVringState> {
        let (p, side) = self.ring(index)?;
        let next = self
            .net
            .stop_ring(p, side)
            .unwrap_or(self.setups[index as usize].base);
        self.net.lock(p).calls[side] = None;
        Ok(VhostUserVringState::new(index, u32::from(next)))
    }

    fn set_vring_kick(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let (p, side) = self.ring(u32::from(index))?;
        self.net.stop_ring(p, side);
        let Some(file) = fd else {
            // (polling mode, VHOST_USER_VRING_NOFD_MASK: not offered)
            return Err(self.refuse(format!("ring {index}: no kick eventfd")));
        };
        let setup = self.setups[usize::from(index)];
        let (Some(mem), Some((desc, avail, used)), true) =
            (self.mem.as_ref(), setup.addrs, setup.size > 0)
        else {
            return Err(self.refuse(format!(
                "ring {index} started before its memory, addresses and size were given"
            )));
        };
        let used_idx = GuestAddress(used)
            .checked_add(2)
            .and_then(|at| mem.read_obj::<u16>(at).ok())
            .ok_or_else(|| self.refuse(format!("ring {index}: used ring outside memory")))?;
        let mut queue = Queue::new(QUEUE_SIZE).map_err(|_| VuError::BackendInternalError)?;
        queue.set_size(setup.size);
        let (lo, hi) = halves(desc);
        queue.set_desc_table_address(lo, hi);
        let (lo, hi) = halves(avail);
        queue.set_avail_ring_address(lo, hi);
        let (lo, hi) = halves(used);
        queue.set_used_ring_address(lo, hi);
        queue.set_next_avail(setup.base);
        queue.set_next_used(u16::from_le(used_idx));
        queue.set_event_idx(self.acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0);
        queue.set_ready(true);
        if !usable(&queue, mem) {
            return Err(self.refuse(format!(
                "ring {index}: size {} at {desc:#x}/{avail:#x}/{used:#x} does not lie in the shared memory",
                setup.size
            )));
        }
        // SAFETY: the descriptor came with the message and is owned by nothing else.
        let kick = unsafe { EventFd::from_raw_fd(file.into_raw_fd()) };
        // The ring goes in before its kick is watched: the pair's thread reads a kick only from
        // an installed ring, and would spin on one it cannot read yet.
        let kick_fd = kick.as_raw_fd();
        {
            let mut pair = self.net.lock(p);
            pair.rings[side] = Some(LiveRing { queue, kick });
            if side == 0 {
                pair.rx_decided_at = u16::from_le(used_idx);
                pair.pair.rx_pending = true;
            }
            pair.broken = false;
        }
        let watched = self.net.pairs[p].epoll.ctl(
            ControlOperation::Add,
            kick_fd,
            EpollEvent::new(EventSet::IN, if side == 0 { RX_KICK } else { TX_KICK }),
        );
        if let Err(e) = watched {
            self.net.stop_ring(p, side);
            return Err(self.refuse(format!("ring {index}: watching its kick eventfd: {e}")));
        }
        // whatever the guest queued already
        self.net.schedule(p, side == 0);
        Ok(())
    }

    fn set_vring_call(&mut self, index: u8, fd: Option<File>) -> VuResult<()> {
        let (p, side) = self.ring(u32::from(index))?;
        let call = fd.map(|file| {
            // SAFETY: the descriptor came with the message and is owned by nothing else.
            unsafe { EventFd::from_raw_fd(file.into_raw_fd()) }
        });
        let mut guard = self.net.lock(p);
        let pair = &mut *guard;
        pair.calls[side] = call;
        if pair.owed[side] {
            self.net.signal(p, pair, side);
        }
        Ok(())
    }

    fn set_vring_err(&mut self, index: u8, _fd: Option<File>) -> VuResult<()> {
        self.ring(u32::from(index))?;
        Ok(())
    }

    fn get_protocol_features(&mut self) -> VuResult<VhostUserProtocolFeatures> {
        Ok(VhostUserProtocolFeatures::MQ | VhostUserProtocolFeatures::CONFIG)
    }

    fn set_protocol_features(&mut self, _features: u64) -> VuResult<()> {
        // (the vhost crate keeps them and checks the messages that need them)
        Ok(())
    }

    fn get_queue_num(&mut self) -> VuResult<u64> {
        Ok(self.setups.len() as u64)
    }

    fn set_vring_enable(&mut self, index: u32, enable: bool) -> VuResult<()> {
        log::debug!("{}: ring {index} enabled: {enable}", self.net.name);
        let (p, side) = self.ring(index)?;
        self.net.lock(p).enabled[side] = enable;
        if enable {
            self.net.schedule(p, side == 0);
        }
        Ok(())
    }

    fn get_config(
        &mut self,
        offset: u32,
        size: u32,
        _flags: VhostUserConfigFlags,
    ) -> VuResult<Vec<u8>> {
        let config = &self.net.config;
        let start = (offset as usize).min(config.len());
        let end = start.saturating_add(size as usize).min(config.len());
        let mut out = config[start..end].to_vec();
        // (past the end reads as zeroes, as from the built-in device)
        out.resize((size as usize).min(4096), 0);
        Ok(out)
    }

    fn set_config(
        &mut self,
        _offset: u32,
        _buf: &[u8],
        _flags: VhostUserConfigFlags,
    ) -> VuResult<()> {
        Err(unsupported("the configuration space is read-only"))
    }

    fn set_gpu_socket(&mut self, _gpu_backend: GpuBackend) -> VuResult<()> {
        Err(unsupported("not a GPU"))
    }

    fn get_shared_object(&mut self, _uuid: VhostUserSharedMsg) -> VuResult<File> {
        Err(unsupported("no shared objects"))
    }

    fn get_inflight_fd(
        &mut self,
        _inflight: &VhostUserInflight,
    ) -> VuResult<(VhostUserInflight, File)> {
        Err(unsupported("no inflight tracking"))
    }

    fn set_inflight_fd(&mut self, _inflight: &VhostUserInflight, _file: File) -> VuResult<()> {
        Err(unsupported("no inflight tracking"))
    }

    fn get_max_mem_slots(&mut self) -> VuResult<u64> {
        Err(unsupported("no memory slots"))
    }

    fn add_mem_region(
        &mut self,
        _region: &VhostUserSingleMemoryRegion,
        _fd: File,
        _postcopy_listening: Option<bool>,
    ) -> VuResult<Option<VhostUserMemoryRegionBase>> {
        Err(unsupported("no memory slots"))
    }

    fn remove_mem_region(&mut self, _region: &VhostUserSingleMemoryRegion) -> VuResult<()> {
        Err(unsupported("no memory slots"))
    }

    fn set_device_state_fd(
        &mut self,
        _direction: VhostTransferStateDirection,
        _phase: VhostTransferStatePhase,
        _fd: File,
    ) -> VuResult<Option<File>> {
        Err(unsupported("no migration"))
    }

    fn check_device_state(&mut self) -> VuResult<()> {
        Err(unsupported("no migration"))
    }

    fn get_shmem_config(&mut self) -> VuResult<VhostUserShMemConfig> {
        Err(unsupported("no shared memory regions"))
    }

    fn set_log_base(&mut self, _log: &VhostUserLog, _file: File) -> VuResult<()> {
        Err(unsupported("no dirty logging"))
    }
}
