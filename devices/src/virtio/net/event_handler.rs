//! The device in the VMM's event loop: the state eventfd (activation, reset) is always watched;
//! the queue notifications and each backend's fd (edge-triggered, read to EAGAIN) only while the
//! driver runs the device. Each registration carries a token: the queue index for a queue, or
//! BACKEND + pair for a backend; YIELD brings back the queues whose last pass used its budget.

use event_manager::{EventOps, Events, MutEventSubscriber};
use tapir_net_backend::NetBackend;
use vmm_sys_util::epoll::EventSet;

use super::counters::NetCounters;
use super::device::Net;

use crate::error_limited;

const STATE: u32 = u32::MAX;
const YIELD: u32 = u32::MAX - 1;
const BACKEND: u32 = 1 << 16;

impl<B: NetBackend> Net<B> {
    fn runtime_events(&self) -> Vec<Events> {
        let mut events: Vec<Events> = self
            .queue_evts
            .iter()
            .enumerate()
            .map(|(i, evt)| Events::with_data(evt, i as u32, EventSet::IN))
            .collect();
        events.extend(self.pairs.iter().enumerate().map(|(p, pair)| {
            Events::with_data(
                &pair.backend,
                BACKEND + p as u32,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            )
        }));
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
            let queues = std::mem::take(&mut self.resched);
            for index in (0..64usize).filter(|i| queues & (1 << i) != 0) {
                self.process_queue(index);
            }
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
    /// One pass over queue `index`.
    fn process_queue(&mut self, index: usize) {
        if Some(index) == self.ctrl_index() {
            self.process_ctrl();
        } else if index % 2 == 0 {
            self.process_rx(index / 2);
        } else {
            self.process_tx(index / 2);
        }
    }
}
