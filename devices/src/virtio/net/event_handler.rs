//! The device in the VMM's event loop: the state eventfd (activation, reset) is always watched;
//! the queue notifications and each backend's fd (edge-triggered, read to EAGAIN) only while the
//! driver runs the device. Each registration carries a token: the queue index for a queue, or
//! BACKEND + pair for a backend; YIELD brings back the queues whose last pass used its budget;
//! WATCHDOG, a periodic timer, raises again an interrupt the guest left unacknowledged; MODERATION
//! ends an interrupt moderation window; TX_POLL + pair brings a pair's TX poll when it coalesces TX.
//! A pair the kernel serves (vhost-net) has neither its queues' eventfds nor its backend
//! registered: the kernel watches both.

use event_manager::{EventOps, Events, MutEventSubscriber};
use tapir_net_backend::NetBackend;
use vmm_sys_util::epoll::EventSet;

use super::counters::NetCounters;
use super::device::Net;

use crate::error_limited;

const STATE: u32 = u32::MAX;
const YIELD: u32 = u32::MAX - 1;
const WATCHDOG: u32 = u32::MAX - 2;
const MODERATION: u32 = u32::MAX - 3;
const BACKEND: u32 = 1 << 16;
const TX_POLL: u32 = 1 << 17;

impl<B: NetBackend> Net<B> {
    fn runtime_events(&self) -> Vec<Events> {
        // (the control queue's index is past the pairs')
        let in_kernel = |index: usize| self.pairs.get(index / 2).is_some_and(|p| p.vhost.is_some());
        let mut events: Vec<Events> = (0u32..)
            .zip(&self.queue_evts)
            .filter(|(i, _)| !in_kernel(*i as usize))
            .map(|(i, evt)| Events::with_data(evt, i, EventSet::IN))
            .collect();
        for (p, pair) in (0u32..).zip(&self.pairs) {
            if pair.vhost.is_none() {
                events.push(Events::with_data(
                    &pair.backend,
                    BACKEND + p,
                    EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                ));
                events.push(Events::with_data(&pair.tx_timer, TX_POLL + p, EventSet::IN));
            }
        }
        events
    }

    /// Registers the runtime fds when the device became active, removes them when it was reset.
    fn reconcile(&mut self, ops: &mut EventOps) {
        let want = self.active.is_some();
        if want == self.registered {
            return;
        }
        for events in self.runtime_events() {
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            if let Err(e) = result {
                error_limited!(
                    "{}: (un)registering an fd with the event loop: {e:?}",
                    self.name
                );
            }
        }
        self.registered = want;
    }
}

impl<B: NetBackend> MutEventSubscriber for Net<B> {
    fn init(&mut self, ops: &mut EventOps) {
        for (evt, token) in [(&self.state_evt, STATE), (&self.yield_evt, YIELD)] {
            if let Err(e) = ops.add(Events::with_data(evt, token, EventSet::IN)) {
                error_limited!("{}: registering an eventfd: {e:?}", self.name);
            }
        }
        if let Err(e) = ops.add(Events::with_data(&self.watchdog, WATCHDOG, EventSet::IN)) {
            error_limited!("{}: registering the interrupt watchdog: {e:?}", self.name);
        }
        let timer = Events::with_data(&self.moderation_timer, MODERATION, EventSet::IN);
        if let Err(e) = ops.add(timer) {
            error_limited!("{}: registering the moderation timer: {e:?}", self.name);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let token = events.data();
        if token == STATE {
            let _ = self.state_evt.read();
            self.reconcile(ops);
            for p in 0..self.pairs.len() {
                self.process_rx(p);
                self.process_tx(p);
            }
            self.process_ctrl();
        } else if token == YIELD {
            let _ = self.yield_evt.read();
            self.serve_yielded();
        } else if token == MODERATION {
            let _ = self.moderation_timer.wait();
            self.moderation_ended(std::time::Instant::now());
        } else if token == WATCHDOG {
            let _ = self.watchdog.wait();
            self.check_interrupt(std::time::Instant::now());
        } else if token >= TX_POLL {
            self.tx_poll_due((token - TX_POLL) as usize);
        } else if token >= BACKEND {
            let p = (token - BACKEND) as usize;
            let set = events.event_set();
            if set.contains(EventSet::IN) {
                if let Some(pair) = self.pairs.get_mut(p) {
                    pair.rx_pending = true;
                }
                self.process_rx(p);
            }
            if set.contains(EventSet::OUT) {
                if let Some(pair) = self.pairs.get_mut(p).filter(|pair| pair.tx_blocked) {
                    pair.tx_blocked = false;
                    self.process_tx(p);
                }
            }
        } else if let Some(evt) = self.queue_evts.get(token as usize) {
            let _ = evt.read();
            let index = token as usize;
            if Some(index) != self.ctrl_index() {
                let counter = if index % 2 == 0 {
                    &self.counters.rx_notifications
                } else {
                    &self.counters.tx_notifications
                };
                NetCounters::add(counter, 1);
            }
            self.process_queue(index);
        }
    }
}

impl<B: NetBackend> Net<B> {
    /// Another pass over each queue whose last pass used its budget.
    pub(super) fn serve_yielded(&mut self) {
        let queues = std::mem::take(&mut self.resched);
        for index in (0..64usize).filter(|i| queues & (1 << i) != 0) {
            self.process_queue(index);
        }
    }

    /// One pass over queue `index`.
    pub(super) fn process_queue(&mut self, index: usize) {
        if Some(index) == self.ctrl_index() {
            self.process_ctrl();
        } else if index % 2 == 0 {
            self.process_rx(index / 2);
        } else {
            self.process_tx(index / 2);
        }
    }
}

/// What the event loop does, callable without one: for the fuzz targets.
#[cfg(feature = "fuzzing")]
impl<B: NetBackend> Net<B> {
    /// A notification of queue `index` (what the guest's QueueNotify write causes).
    pub fn fuzz_notify(&mut self, index: usize) {
        if index < self.queue_evts.len() {
            self.process_queue(index);
        }
    }

    /// Pair `pair`'s backend became readable.
    pub fn fuzz_backend_readable(&mut self, pair: usize) {
        if let Some(p) = self.pairs.get_mut(pair) {
            p.rx_pending = true;
            self.process_rx(pair);
        }
    }

    /// Pair `pair`'s backend became writable.
    pub fn fuzz_backend_writable(&mut self, pair: usize) {
        if let Some(p) = self.pairs.get_mut(pair).filter(|p| p.tx_blocked) {
            p.tx_blocked = false;
            self.process_tx(pair);
        }
    }

    /// The yield eventfd fired.
    pub fn fuzz_yield(&mut self) {
        let _ = self.yield_evt.read();
        self.serve_yielded();
    }

    /// Host memory the device holds for RX, in buffers: (stashed buffers, scratch iovec capacity).
    pub fn fuzz_rx_holdings(&self) -> (usize, usize) {
        // (a pair holds queues only while the device runs)
        let stashed = self
            .pairs
            .iter()
            .filter_map(|p| p.queues.as_ref())
            .map(|q| q.rx_stash.buffers())
            .sum();
        (stashed, self.scratch.rx_iov.capacity())
    }
}
