//! The device in the VMM's event loop: the state eventfd (activation, reset) is always watched;
//! the queue notifications and the backend's fd (edge-triggered, read to EAGAIN) only while the
//! driver runs the device.

use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use tapir_net_backend::NetBackend;
use vmm_sys_util::epoll::EventSet;

use super::counters::NetCounters;
use super::device::Net;
use super::{RX_QUEUE, TX_QUEUE};

impl<B: NetBackend> Net<B> {
    fn runtime_events(&self) -> [Events; 3] {
        [
            Events::new(&self.queue_evts[RX_QUEUE], EventSet::IN),
            Events::new(&self.queue_evts[TX_QUEUE], EventSet::IN),
            Events::new(
                &self.backend,
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
            ),
        ]
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
                log::error!(
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
        if let Err(e) = ops.add(Events::new(&self.state_evt, EventSet::IN)) {
            log::error!("{}: registering the state eventfd: {e:?}", self.name);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        if fd == self.state_evt.as_raw_fd() {
            let _ = self.state_evt.read();
            self.reconcile(ops);
            self.process_rx();
            self.process_tx();
        } else if fd == self.queue_evts[RX_QUEUE].as_raw_fd() {
            let _ = self.queue_evts[RX_QUEUE].read();
            NetCounters::add(&self.counters.rx_notifications, 1);
            self.process_rx();
        } else if fd == self.queue_evts[TX_QUEUE].as_raw_fd() {
            let _ = self.queue_evts[TX_QUEUE].read();
            NetCounters::add(&self.counters.tx_notifications, 1);
            self.process_tx();
        } else if fd == self.backend.as_raw_fd() {
            let set = events.event_set();
            if set.contains(EventSet::IN) {
                self.rx_pending = true;
                self.process_rx();
            }
            if set.contains(EventSet::OUT) && self.tx_blocked {
                self.tx_blocked = false;
                self.process_tx();
            }
        }
    }
}
