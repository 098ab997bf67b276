//! The virtio-net device's state machine: what it offers, what the driver accepted, activation
//! (offloads applied to the backend from the acked features), the number of queue pairs in use,
//! and reset, which can be repeated.
//!
//! Queues follow the virtio-net layout: receiveq1, transmitq1, ... receiveqN, transmitqN, and with
//! several pairs a control queue last. Pair `p` is served by backend `p` (one macvtap queue each).

use std::sync::Arc;
use std::time::{Duration, Instant};

use tapir_net_backend::{offload, NetBackend};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF,
    VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::NetCounters;
use super::pair::{moderation_wait, nonblocking_timer, QueuePair, Scratch};
use super::user_link::UserLink;
use super::vhost::{VhostPair, VHOST_DATA_FEATURES};
use super::{
    config_space, offered_features, rx_frame_max, Malformed, LINK_UP, QUEUE_SIZE, STATUS_AT,
};
use crate::virtio::queue::{usable, DriverError};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};
use crate::{error_limited, info_limited, warn_limited};

/// Most chains (TX, control) or frames (RX) one pass over a queue handles before it yields to the
/// other queues, NICs and the stop path; the queue is then served again on the next turn of the
/// event loop (see `reschedule`).
pub const BUDGET: usize = 128;

/// How long the guest may leave an interrupt unacknowledged before the device raises it again,
/// and how often that is checked.
pub const INTERRUPT_OVERDUE: Duration = Duration::from_millis(500);
pub const WATCHDOG_PERIOD: Duration = Duration::from_millis(250);

/// Queue index of pair `p`'s receive queue, and of its transmit queue.
pub const fn rx_index(pair: usize) -> usize {
    2 * pair
}
pub const fn tx_index(pair: usize) -> usize {
    2 * pair + 1
}

/// How a pass over a queue ended.
pub(super) enum Pass {
    /// Nothing left to do for now: the queue is empty (notifications are on again), the guest has
    /// no RX buffers, or the backend has no frames or no room.
    Done,
    /// The budget ran out with work possibly left.
    Yield,
    /// The driver broke the rules.
    Failed(DriverError),
}

/// Most queue pairs a device has.
pub const MAX_PAIRS: u16 = 31;

/// What the device works with once the driver started it.
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub ctrl: Option<Queue>,
    pub mrg_rxbuf: bool,
    pub rx_frame_max: usize,
}

/// A virtio-net device over backends `B` (macvtap queues, or socketpairs in tests).
pub struct Net<B: NetBackend> {
    pub(super) name: String,
    /// The data plane: one per backend.
    pub(super) pairs: Vec<QueuePair<B>>,
    /// Pairs the driver uses (VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET); 1 until it says otherwise.
    pub(super) pairs_in_use: usize,
    queue_sizes: Vec<u16>,
    avail_features: u64,
    pub(super) acked_features: u64,
    config: [u8; 12],
    mtu: u16,
    /// One per queue, in queue order.
    pub(super) queue_evts: Vec<EventFd>,
    /// Written on activation and reset: the event loop then (un)registers the runtime fds.
    pub(super) state_evt: EventFd,
    pub(super) counters: Arc<NetCounters>,
    pub(super) active: Option<Active>,
    pub(super) registered: bool,
    /// Set when the driver broke the rules: no queue is served until it resets the device.
    pub(super) broken: Option<DriverError>,
    /// Written when a pass ran out of budget; the queues to serve again are in `resched`.
    pub(super) yield_evt: EventFd,
    /// One bit per queue index.
    pub(super) resched: u64,
    /// Fires every [`WATCHDOG_PERIOD`]: an interrupt the guest left unacknowledged for
    /// [`INTERRUPT_OVERDUE`] is raised again.
    pub(super) watchdog: TimerFd,
    pub(super) scratch: Scratch,
    /// Coalescing (zero: none): a used-buffer interrupt due sooner than this after the last one
    /// waits for `moderation_timer`, and those due meanwhile are merged into it; and a TX pass
    /// that sent frames leaves the guest's notifications off and polls again this much later.
    pub(super) coalescing: Duration,
    pub(super) moderation_timer: TimerFd,
    /// An interrupt waits for the moderation timer.
    pub(super) irq_deferred: bool,
    pub(super) last_irq: Option<Instant>,
}

impl<B: NetBackend> std::fmt::Debug for Net<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.name)
            .field("pairs", &self.pairs.len())
            .field("pairs_in_use", &self.pairs_in_use)
            .field(
                "acked_features",
                &format_args!("{:#x}", self.acked_features),
            )
            .field("active", &self.active.is_some())
            .field("broken", &self.broken)
            .finish_non_exhaustive()
    }
}

impl<B: NetBackend> Net<B> {
    /// A device named `name` (for logs) with one queue pair per backend, advertising `mac` and
    /// `mtu`, offering the guest offloads in `host_offloads` (TUN_F_* the backends accept).
    pub fn new(
        name: impl Into<String>,
        backends: Vec<B>,
        mac: [u8; 6],
        mtu: Option<u16>,
        host_offloads: u32,
    ) -> std::io::Result<Self> {
        let n = backends.len();
        let pairs = super::pair_count(n, "a virtio-net device")?;
        let queues = if n > 1 { 2 * n + 1 } else { 2 };
        let mtu_value = mtu.unwrap_or(1500);
        Ok(Self {
            name: name.into(),
            pairs: backends
                .into_iter()
                .enumerate()
                .map(|(p, backend)| QueuePair::new(p, backend))
                .collect::<std::io::Result<_>>()?,
            pairs_in_use: 1,
            queue_sizes: vec![QUEUE_SIZE; queues],
            avail_features: offered_features(host_offloads, mtu.is_some(), n),
            acked_features: 0,
            config: config_space(mac, mtu_value, pairs),
            mtu: mtu_value,
            queue_evts: (0..queues)
                .map(|_| EventFd::new(libc::EFD_NONBLOCK))
                .collect::<std::io::Result<_>>()?,
            state_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            counters: Arc::new(NetCounters::default()),
            active: None,
            registered: false,
            broken: None,
            yield_evt: EventFd::new(libc::EFD_NONBLOCK)?,
            resched: 0,
            watchdog: {
                let mut t = TimerFd::new()?;
                t.reset(WATCHDOG_PERIOD, Some(WATCHDOG_PERIOD))?;
                t
            },
            scratch: Scratch::default(),
            coalescing: Duration::ZERO,
            moderation_timer: nonblocking_timer()?,
            irq_deferred: false,
            last_irq: None,
        })
    }

    /// Has the kernel's vhost-net serve the queue pairs, one instance per pair in pair order. The
    /// guest is then offered the ring and RX features only where vhost-net offers them; a
    /// vhost-net without VIRTIO_F_VERSION_1 cannot serve a virtio-mmio version 2 device.
    pub fn with_vhost(mut self, vhost: Vec<VhostPair>) -> std::io::Result<Self> {
        let invalid = |why: String| std::io::Error::new(std::io::ErrorKind::InvalidInput, why);
        if vhost.len() != self.pairs.len() {
            return Err(invalid(format!(
                "{} vhost-net instances for {} queue pairs",
                vhost.len(),
                self.pairs.len()
            )));
        }
        for (pair, v) in self.pairs.iter_mut().zip(vhost) {
            let lacking = VHOST_DATA_FEATURES & !v.offered_features();
            if lacking & (1 << VIRTIO_F_VERSION_1) != 0 {
                return Err(invalid(format!(
                    "this kernel's vhost-net lacks VIRTIO_F_VERSION_1 (offers {:#x})",
                    v.offered_features()
                )));
            }
            self.avail_features &= !lacking;
            pair.vhost = Some(v);
        }
        Ok(self)
    }

    /// Has a vhost-user backend serve the queue pairs over `link` (the pairs' backends must be
    /// its [`UserQueue`]s). The guest is offered what the backend offered, and what the device
    /// itself serves: the MAC, the link status, the MTU and the control queue.
    pub fn with_vhost_user(mut self, link: &Arc<UserLink>) -> std::io::Result<Self> {
        if link.pairs() != self.pairs.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "a vhost-user link of {} pairs for {} queue pairs",
                    link.pairs(),
                    self.pairs.len()
                ),
            ));
        }
        let own = 1 << VIRTIO_NET_F_MAC
            | 1 << VIRTIO_NET_F_STATUS
            | 1 << VIRTIO_NET_F_MTU
            | 1 << VIRTIO_NET_F_MQ
            | 1 << VIRTIO_NET_F_CTRL_VQ;
        self.avail_features &= link.offered_features() | own;
        for (p, pair) in self.pairs.iter_mut().enumerate() {
            pair.vhost = Some(VhostPair::user(link.clone(), p));
        }
        Ok(self)
    }

    /// Whether the kernel's vhost-net (or a vhost-user backend) serves the queue pairs.
    pub fn on_vhost(&self) -> bool {
        self.pairs.iter().any(|p| p.vhost.is_some())
    }

    /// Clones of the queues' notification eventfds, in queue order, to register as ioeventfds.
    pub fn queue_evts(&self) -> std::io::Result<Vec<EventFd>> {
        self.queue_evts.iter().map(EventFd::try_clone).collect()
    }

    /// The device's live counters.
    pub fn counters(&self) -> Arc<NetCounters> {
        self.counters.clone()
    }

    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// Queue pairs the driver uses.
    pub fn pairs_in_use(&self) -> usize {
        self.pairs_in_use
    }

    /// Index of the control queue, when the device has one.
    pub(super) fn ctrl_index(&self) -> Option<usize> {
        (self.pairs.len() > 1).then(|| 2 * self.pairs.len())
    }

    /// Uses the first `n` pairs: the host steers flows only to their backends.
    pub(super) fn use_pairs(&mut self, n: usize) -> Result<(), String> {
        for (p, pair) in self.pairs.iter_mut().enumerate() {
            pair.backend.set_queue_enabled(p < n).map_err(|e| {
                format!(
                    "{} queue pair {p}: {e}",
                    if p < n { "enabling" } else { "disabling" }
                )
            })?;
        }
        self.pairs_in_use = n;
        Ok(())
    }

    /// Raises the interrupt if the driver wants one for what queue `index` just used.
    pub(super) fn notify_guest(&mut self, index: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let wanted = match self.pairs.get_mut(index / 2) {
            Some(pair) => pair.wants_interrupt(index % 2 == 0, &active.mem),
            None => match active.ctrl.as_mut() {
                Some(ctrl) => ctrl.needs_notification(&active.mem).map_err(|_| ()),
                None => return,
            },
        };
        match wanted {
            Ok(false) => {}
            Ok(true) => self.raise_used(Instant::now()),
            Err(_) => self.fail(DriverError::Rings { queue: index }),
        }
    }

    /// Coalesces with a `window`: a guest that took a used-buffer interrupt less than `window`
    /// ago gets the next at the end of that window, with whatever else became due in it, and TX
    /// is polled `window` after a pass that sent frames, the guest's notifications left off
    /// meanwhile. The first interrupt or frame after a quiet spell goes at once (a ping's answer
    /// waits for nothing). Zero turns it off (the default).
    pub fn set_coalescing(&mut self, window: Duration) {
        self.coalescing = window;
    }

    /// Raises a used-buffer interrupt now, or when the moderation window ends.
    fn raise_used(&mut self, now: Instant) {
        if self.irq_deferred {
            NetCounters::add(&self.counters.interrupts_merged, 1);
            return;
        }
        if let Some(wait) = moderation_wait(self.last_irq, self.coalescing, now) {
            match self.moderation_timer.reset(wait, None) {
                Ok(()) => {
                    self.irq_deferred = true;
                    return;
                }
                Err(e) => error_limited!("{}: arming the moderation timer: {e}", self.name),
            }
        }
        self.last_irq = Some(now);
        let Some(active) = self.active.as_ref() else {
            return;
        };
        NetCounters::add(&self.counters.interrupts, 1);
        if let Err(e) = active.interrupt.signal_used() {
            error_limited!("{}: raising the interrupt: {e}", self.name);
        }
    }

    /// The moderation window ended: raise the interrupt that waited for it.
    pub(super) fn moderation_ended(&mut self, now: Instant) {
        if std::mem::take(&mut self.irq_deferred) {
            self.last_irq = None;
            self.raise_used(now);
        }
    }

    /// The host interface went down or away (`false`) or is back (`true`): the status field's
    /// LINK_UP follows, and a driver that acked VIRTIO_NET_F_STATUS gets a configuration change
    /// interrupt, so the guest sees its carrier go and come back. Returns whether anything changed.
    pub fn set_link(&mut self, up: bool) -> bool {
        let status = if up { LINK_UP } else { 0 };
        let field = &mut self.config[STATUS_AT..STATUS_AT + 2];
        if field == status.to_le_bytes() {
            return false;
        }
        field.copy_from_slice(&status.to_le_bytes());
        NetCounters::add(&self.counters.link_changes, 1);
        let status_acked = self.acked_features & (1 << VIRTIO_NET_F_STATUS) != 0;
        if let (Some(active), true) = (&self.active, status_acked) {
            if let Err(e) = active.interrupt.signal_config() {
                error_limited!("{}: raising the configuration interrupt: {e}", self.name);
            }
        }
        true
    }

    /// The watchdog's turn: raise again an interrupt the guest has not acknowledged for
    /// [`INTERRUPT_OVERDUE`] (see [`Interrupt::resend_if_overdue`]).
    pub(super) fn check_interrupt(&mut self, now: Instant) {
        let Some(active) = self.active.as_ref() else {
            return;
        };
        match active.interrupt.resend_if_overdue(now, INTERRUPT_OVERDUE) {
            Ok(false) => {}
            Ok(true) => {
                NetCounters::add(&self.counters.interrupts_resent, 1);
                warn_limited!(
                    "{}: the guest left an interrupt unacknowledged for {} ms; raised it again",
                    self.name,
                    INTERRUPT_OVERDUE.as_millis()
                );
            }
            Err(e) => error_limited!("{}: raising the interrupt again: {e}", self.name),
        }
    }

    fn signal_state(&self) {
        if let Err(e) = self.state_evt.write(1) {
            error_limited!("{}: signalling the event loop: {e}", self.name);
        }
    }

    /// The driver broke the virtio rules: stop serving every queue, set DEVICE_NEEDS_RESET and
    /// tell the driver, count it, and say so (rate-limited).
    pub(super) fn fail(&mut self, why: DriverError) {
        if self.broken.is_some() {
            return;
        }
        self.broken = Some(why);
        NetCounters::add(&self.counters.driver_errors, 1);
        warn_limited!(
            "{}: the driver broke the virtio rules ({why}); the device stops until it is reset",
            self.name
        );
        if let Some(active) = &self.active {
            if let Err(e) = active.interrupt.signal_needs_reset() {
                error_limited!("{}: raising the configuration interrupt: {e}", self.name);
            }
        }
    }

    /// Has queue `index` served again on the event loop's next turn: its pass used its budget.
    pub(super) fn reschedule(&mut self, index: usize) {
        NetCounters::add(&self.counters.yields, 1);
        if self.resched == 0 {
            if let Err(e) = self.yield_evt.write(1) {
                error_limited!("{}: signalling the event loop: {e}", self.name);
            }
        }
        self.resched |= 1 << index;
    }

    /// What every pass over queue `index` does at its end: serve the queue again on the event
    /// loop's next turn, or stop the device, as the pass ended; interrupt the guest if it used
    /// chains and the driver wants to hear of it.
    pub(super) fn end_pass(&mut self, index: usize, pass: Pass, used_any: bool) {
        match pass {
            Pass::Done => {}
            Pass::Yield => self.reschedule(index),
            Pass::Failed(e) => self.fail(e),
        }
        if used_any {
            self.notify_guest(index);
        }
    }
}

/// Counts a refused chain and says so, rate-limited: a guest that keeps sending them must not
/// flood the log.
pub(super) fn report_malformed(name: &str, counters: &NetCounters, why: Malformed) {
    NetCounters::add(&counters.malformed_chains, 1);
    warn_limited!(
        "{name}: the guest sent a malformed descriptor chain ({why:?}); returned with length 0"
    );
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn features(&self) -> u64 {
        self.avail_features
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let Some(src) = usize::try_from(offset)
            .ok()
            .and_then(|o| self.config.get(o..))
        else {
            return;
        };
        let n = src.len().min(data.len());
        data[..n].copy_from_slice(&src[..n]);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        log::debug!("{}: guest wrote read-only config at {offset:#x}", self.name);
    }

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        if queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                got: queues.len(),
                want: self.queue_sizes.len(),
            });
        }
        // Pairs the driver does not use yet may stay unset; the first pair must be there, and the
        // control queue when the driver took VIRTIO_NET_F_CTRL_VQ (without it there is none).
        let ctrl_acked = self.acked_features & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        for (i, q) in queues.iter().enumerate() {
            if !usable(q, &mem) && (i < 2 || (ctrl_acked && Some(i) == self.ctrl_index())) {
                return Err(ActivateError::BadQueue(i));
            }
        }
        let wanted = offload::tun_offloads_for(self.acked_features);
        let mut set = wanted;
        for pair in &mut self.pairs {
            set = pair.backend.set_offloads(wanted).map_err(|e| {
                ActivateError::Backend(format!("setting offloads {wanted:#x}: {e}"))
            })?;
        }
        self.use_pairs(1).map_err(ActivateError::Backend)?;
        info_limited!(
            "{}: driver started: features {:#x}, offloads to the guest {set:#x}",
            self.name,
            self.acked_features
        );
        // vhost-net raises its interrupts on the irqfd itself
        interrupt.set_vring_from_outside(self.on_vhost());
        let call = interrupt.irqfd();
        let mut queues = queues.into_iter();
        for pair in &mut self.pairs {
            if let (Some(rx), Some(tx)) = (queues.next(), queues.next()) {
                let p = pair.number;
                let kick = [&self.queue_evts[rx_index(p)], &self.queue_evts[tx_index(p)]];
                if let Err(e) = pair.start(rx, tx, &mem, self.acked_features, kick, call) {
                    for pair in &mut self.pairs {
                        pair.stop();
                    }
                    return Err(ActivateError::Backend(format!("queue pair {p}: {e}")));
                }
            }
        }
        self.broken = None;
        self.resched = 0;
        self.active = Some(Active {
            mem,
            interrupt,
            ctrl: queues.next().filter(|_| ctrl_acked),
            mrg_rxbuf: self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame_max: rx_frame_max(self.acked_features, self.mtu),
        });
        self.signal_state();
        Ok(())
    }

    fn reset(&mut self) {
        info_limited!("{}: reset by the driver", self.name);
        self.active = None;
        self.broken = None;
        self.resched = 0;
        self.acked_features = 0;
        // (the timer may still fire: with nothing deferred it raises nothing; no timerfd call
        // here, on the vCPU thread that reset the device)
        self.irq_deferred = false;
        self.last_irq = None;
        for pair in &mut self.pairs {
            pair.stop();
            if let Err(e) = pair.backend.set_offloads(0) {
                warn_limited!("{}: clearing offloads on reset: {e}", self.name);
            }
        }
        self.signal_state();
    }
}
