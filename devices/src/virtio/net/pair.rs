//! One queue pair: a backend queue (one macvtap queue) and, once the driver started the device, the
//! pair's RX and TX virtqueues, served by one of two data planes: Tapir's own (the passes in
//! `rx.rs` and `tx.rs`, with what RX keeps between passes), or the host kernel's vhost-net
//! (`vhost.rs`), which then owns the rings until they stop. Everything a pass over one of its
//! queues touches is here or in the [`PassContext`] the device lends it; the device (`device.rs`)
//! keeps the control plane: features, configuration, activation, reset, the control queue, and
//! what a pass's end means for the guest (interrupts, yields, stopping on a driver error).

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use tapir_net_backend::{NetBackend, RecvBuf, SendBuf};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use super::counters::NetCounters;
use super::device::{rx_index, tx_index, Net, Pass};
use super::rx::RxStash;
use super::vhost::{Rings, VhostError, VhostPair};
use crate::error_limited;
use crate::virtio::queue::{needs_interrupt, usable};

/// One queue pair.
pub(super) struct QueuePair<B> {
    /// Pair `number` serves queues `rx_index(number)` and `tx_index(number)`.
    pub number: usize,
    pub backend: B,
    /// The backend may hold frames not read yet (its fd is edge-triggered).
    pub rx_pending: bool,
    /// The backend refused a frame with EAGAIN; TX waits for it to become writable.
    pub tx_blocked: bool,
    /// The virtqueues, while the driver runs the device.
    pub queues: Option<PairQueues>,
    /// TX coalescing: the last TX pass left the guest's notifications off; `tx_timer` brings
    /// the next poll.
    pub tx_polling: bool,
    pub tx_timer: TimerFd,
    /// The kernel's data plane, when it serves this pair.
    pub vhost: Option<VhostPair>,
}

/// A queue pair's virtqueues.
pub(super) struct PairQueues {
    pub rx: Queue,
    pub tx: Queue,
    /// RX chains taken from `rx` that no frame has used yet.
    pub rx_stash: RxStash,
    /// `rx`'s next used index when the device last decided whether to interrupt the guest.
    pub rx_decided_at: u16,
    /// Both queues are ready and inside guest memory; a pair the driver left unset is never
    /// touched (not even its rings' flags, which would sit at guest address 0).
    pub usable: bool,
}

/// What a pass over a pair's queue works with, lent by the device for that pass.
pub(super) struct PassContext<'a> {
    /// The device's name, for logs.
    pub name: &'a str,
    pub mem: &'a GuestMemoryMmap,
    pub counters: &'a NetCounters,
    /// The driver acked VIRTIO_NET_F_MRG_RXBUF: a frame may fill several RX chains.
    pub mrg_rxbuf: bool,
    /// The largest frame (with its header) the driver accepts.
    pub rx_frame_max: usize,
    /// TX coalescing is on (see `tx.rs`).
    pub tx_poll: bool,
}

/// Scratch space reused for every frame; one for all pairs, as one pass runs at a time.
pub(super) struct Scratch {
    pub rx_iov: Vec<RecvBuf<'static>>,
    pub tx_iov: Vec<SendBuf<'static>>,
    pub rx_hdr_bufs: Vec<(GuestAddress, u32)>,
    pub rx_used: Vec<(u16, u32)>,
}

impl Default for Scratch {
    fn default() -> Self {
        Self {
            rx_iov: Vec::with_capacity(64),
            tx_iov: Vec::with_capacity(64),
            rx_hdr_bufs: Vec::with_capacity(4),
            rx_used: Vec::with_capacity(64),
        }
    }
}

/// Interrupt moderation's rule, for the built-in device and the vhost-user backend alike: how
/// long an interrupt due `now` waits when the last one went at `last` and the window is `window`
/// long; `None` when it goes at once (the first after a quiet spell, or coalescing off).
pub(super) fn moderation_wait(
    last: Option<Instant>,
    window: Duration,
    now: Instant,
) -> Option<Duration> {
    last.and_then(|last| (last + window).checked_duration_since(now))
        .filter(|wait| !wait.is_zero())
}

/// A timerfd whose read never blocks: the event loop reads a timer when epoll said it fired, and
/// one re-armed meanwhile (reset clears the expiry count) must not hold the loop until it fires.
pub(super) fn nonblocking_timer() -> std::io::Result<TimerFd> {
    let timer = TimerFd::new()?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&timer);
    // SAFETY: fcntl on a descriptor the TimerFd owns; only its status flags change.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(timer)
}

impl<B: NetBackend> QueuePair<B> {
    pub fn new(number: usize, backend: B) -> std::io::Result<Self> {
        Ok(Self {
            number,
            backend,
            rx_pending: false,
            tx_blocked: false,
            queues: None,
            tx_polling: false,
            tx_timer: nonblocking_timer()?,
            vhost: None,
        })
    }

    /// The driver started the device with these queues and acked `acked`: serve them (if both
    /// are set up), here or, on vhost, by handing them to the kernel with `kick` (the queues'
    /// notification eventfds, RX then TX) as its kick eventfds and `call` (the device's irqfd)
    /// as its call eventfd. The userspace plane looks at
    /// the backend first, which may have frames already.
    pub fn start(
        &mut self,
        rx: Queue,
        tx: Queue,
        mem: &GuestMemoryMmap,
        acked: u64,
        kick: [&EventFd; 2],
        call: &EventFd,
    ) -> Result<(), VhostError> {
        let usable = usable(&rx, mem) && usable(&tx, mem);
        if let (Some(vhost), true) = (self.vhost.as_mut(), usable) {
            // SAFETY: the backend's fd stays open while `self` (which owns the backend) lives,
            // and the borrow ends with this call.
            let backend = unsafe { BorrowedFd::borrow_raw(self.backend.as_raw_fd()) };
            let rings = Rings {
                queues: [&rx, &tx],
                kick,
                call,
                backend,
            };
            vhost.start(acked, mem, &rings)?;
        }
        self.queues = Some(PairQueues {
            rx,
            tx,
            rx_stash: RxStash::default(),
            rx_decided_at: 0,
            usable,
        });
        self.rx_pending = true;
        self.tx_blocked = false;
        Ok(())
    }

    /// The driver reset the device: the queues are gone (and the kernel's rings stopped).
    pub fn stop(&mut self) {
        if let Some(vhost) = self.vhost.as_mut() {
            vhost.stop();
        }
        self.queues = None;
        self.tx_blocked = false;
        // (a poll timer still armed finds nothing to poll; no timerfd call on the vCPU thread)
        self.tx_polling = false;
    }

    /// Both queues are there to be served.
    pub fn usable(&self) -> bool {
        self.queues.as_ref().is_some_and(|q| q.usable)
    }

    /// Tapir's own passes serve the queues (not the kernel).
    pub fn served_here(&self) -> bool {
        self.vhost.is_none() && self.usable()
    }

    /// Whether the driver wants an interrupt for what the pair's RX (`rx`) or TX queue used since
    /// the last time this was asked; `Err` when its rings cannot be read.
    pub fn wants_interrupt(&mut self, rx: bool, mem: &GuestMemoryMmap) -> Result<bool, ()> {
        let Some(q) = self.queues.as_mut() else {
            return Ok(false);
        };
        if rx {
            // RX returns a frame's chains together (put_all), which needs_notification misses
            let since = std::mem::replace(&mut q.rx_decided_at, q.rx.next_used());
            needs_interrupt(&q.rx, mem, rx_index(self.number), since).map_err(|_| ())
        } else {
            q.tx.needs_notification(mem).map_err(|_| ())
        }
    }
}

impl<B: NetBackend> Net<B> {
    /// One pass over pair `pair`'s RX queue: frames from its backend into the guest's buffers.
    pub(super) fn process_rx(&mut self, pair: usize) {
        if let Some((pass, used_any)) = self.pass(pair, QueuePair::rx_pass) {
            self.end_pass(rx_index(pair), pass, used_any);
        }
    }

    /// One pass over pair `pair`'s TX queue: the guest's frames to its backend; with coalescing,
    /// the next poll is timed when the pass left the guest's notifications off.
    pub(super) fn process_tx(&mut self, pair: usize) {
        if let Some((pass, used_any)) = self.pass(pair, QueuePair::tx_pass) {
            if let Some(p) = self.pairs.get_mut(pair).filter(|p| p.tx_polling) {
                if let Err(e) = p.tx_timer.reset(self.coalescing, None) {
                    // No poll would come: coalescing ends, and a pass without it turns the
                    // guest's notifications back on.
                    error_limited!(
                        "{}: arming the TX poll timer: {e}; coalescing off",
                        self.name
                    );
                    p.tx_polling = false;
                    self.coalescing = std::time::Duration::ZERO;
                    self.process_tx(pair);
                }
            }
            self.end_pass(tx_index(pair), pass, used_any);
        }
    }

    /// Pair `pair`'s TX poll timer fired.
    pub(super) fn tx_poll_due(&mut self, pair: usize) {
        if let Some(p) = self.pairs.get_mut(pair) {
            let _ = p.tx_timer.wait();
            if std::mem::take(&mut p.tx_polling) {
                self.process_tx(pair);
            }
        }
    }

    /// Runs `pass` on pair `pair` when the device serves it: it runs, the driver broke no rule
    /// and set the pair's queues up. Returns how the pass ended and whether it used any chain.
    fn pass(
        &mut self,
        pair: usize,
        pass: fn(&mut QueuePair<B>, &PassContext, &mut Scratch) -> (Pass, bool),
    ) -> Option<(Pass, bool)> {
        if self.broken.is_some() {
            return None;
        }
        let active = self.active.as_ref()?;
        let pair = self.pairs.get_mut(pair).filter(|p| p.served_here())?;
        let ctx = PassContext {
            name: &self.name,
            mem: &active.mem,
            counters: &self.counters,
            mrg_rxbuf: active.mrg_rxbuf,
            rx_frame_max: active.rx_frame_max,
            tx_poll: !self.coalescing.is_zero(),
        };
        Some(pass(pair, &ctx, &mut self.scratch))
    }
}
