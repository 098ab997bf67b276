//! A snapshot of a device's queues for diagnosis (a guest that went deaf: did it stop refilling, was
//! a kick not seen, an interrupt not taken?): the device's own positions next to what the guest's
//! rings say, read from guest memory as they are.

use std::fmt;

use tapir_net_backend::NetBackend;
use virtio_bindings::virtio_mmio::VIRTIO_MMIO_INT_VRING;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::device::{rx_index, tx_index, Net};
use super::vhost::VhostPair;

/// One queue's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueState {
    /// Queue index (rx0 tx0 rx1 tx1 ... ctrl).
    pub index: usize,
    pub size: u16,
    /// Set up by the driver (ready, rings in guest memory).
    pub usable: bool,
    /// The device's next avail index and next used index.
    pub next_avail: u16,
    pub next_used: u16,
    /// What the guest's rings hold now (None where a ring cannot be read).
    pub avail_idx: Option<u16>,
    pub used_idx: Option<u16>,
    /// With EVENT_IDX: the driver's used_event (interrupt wanted at) and the device's
    /// avail_event (kick wanted at); without it, the used ring's NO_NOTIFY flag.
    pub event_idx: bool,
    pub used_event: Option<u16>,
    pub avail_event: Option<u16>,
    pub no_notify: Option<bool>,
    /// RX: chains and buffers held in the stash.
    pub stashed_chains: usize,
    pub stashed_buffers: usize,
    /// The kernel's vhost-net serves the queue: the device's own indexes stay where they started.
    pub in_kernel: bool,
    /// A vhost-user backend serves it (the same).
    pub in_backend: bool,
}

/// The whole device's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetState {
    pub name: String,
    pub active: bool,
    /// Why the device stopped serving (a driver error), if it did.
    pub broken: Option<String>,
    pub pairs_in_use: usize,
    /// Per pair: the backend may hold frames not read yet; TX waits for it to take frames.
    pub rx_pending: Vec<bool>,
    pub tx_blocked: Vec<bool>,
    /// The guest has not acknowledged a used-buffer interrupt yet (InterruptStatus VRING set).
    pub interrupt_pending: bool,
    pub queues: Vec<QueueState>,
}

fn read_u16(mem: &GuestMemoryMmap, addr: u64) -> Option<u16> {
    mem.read_obj::<u16>(GuestAddress(addr))
        .ok()
        .map(u16::from_le)
}

pub(super) fn queue_state(
    index: usize,
    q: &Queue,
    usable: bool,
    mem: &GuestMemoryMmap,
) -> QueueState {
    let size = q.size();
    let avail = q.avail_ring();
    let used = q.used_ring();
    let ring = |base: u64, offset: u64| usable.then(|| read_u16(mem, base + offset)).flatten();
    QueueState {
        index,
        size,
        usable,
        next_avail: q.next_avail(),
        next_used: q.next_used(),
        avail_idx: ring(avail, 2),
        used_idx: ring(used, 2),
        event_idx: q.event_idx_enabled(),
        used_event: ring(avail, 4 + 2 * u64::from(size)),
        avail_event: ring(used, 4 + 8 * u64::from(size)),
        no_notify: ring(used, 0).map(|flags| flags & 1 != 0),
        stashed_chains: 0,
        stashed_buffers: 0,
        in_kernel: false,
        in_backend: false,
    }
}

impl<B: NetBackend> Net<B> {
    /// The device's queues as they are now.
    pub fn state(&self) -> NetState {
        let mut queues = Vec::new();
        let mut interrupt_pending = false;
        if let Some(active) = &self.active {
            interrupt_pending = active.interrupt.status() & VIRTIO_MMIO_INT_VRING != 0;
            for pair in &self.pairs {
                let Some(q) = &pair.queues else {
                    continue;
                };
                let mut rx = queue_state(rx_index(pair.number), &q.rx, q.usable, &active.mem);
                rx.stashed_chains = q.rx_stash.chains();
                rx.stashed_buffers = q.rx_stash.buffers();
                let mut tx = queue_state(tx_index(pair.number), &q.tx, q.usable, &active.mem);
                let running = pair.vhost.as_ref().filter(|v| v.running());
                rx.in_kernel = running.is_some_and(|v| !v.is_user());
                rx.in_backend = running.is_some_and(VhostPair::is_user);
                (tx.in_kernel, tx.in_backend) = (rx.in_kernel, rx.in_backend);
                queues.push(rx);
                queues.push(tx);
            }
            if let (Some(ctrl), Some(index)) = (&active.ctrl, self.ctrl_index()) {
                queues.push(queue_state(index, ctrl, true, &active.mem));
            }
        }
        NetState {
            name: self.name.clone(),
            active: self.active.is_some(),
            broken: self.broken.map(|e| e.to_string()),
            pairs_in_use: self.pairs_in_use,
            rx_pending: self.pairs.iter().map(|p| p.rx_pending).collect(),
            tx_blocked: self.pairs.iter().map(|p| p.tx_blocked).collect(),
            interrupt_pending,
            queues,
        }
    }
}

fn opt<T: fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

/// Several lines: the device, then one per queue.
impl fmt::Display for NetState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{}: {}, {} pair(s) in use, rx_pending {:?}, tx_blocked {:?}, interrupt pending {}",
            self.name,
            match (&self.broken, self.active) {
                (Some(why), _) => format!("stopped ({why})"),
                (None, true) => "running".into(),
                (None, false) => "not started".into(),
            },
            self.pairs_in_use,
            self.rx_pending,
            self.tx_blocked,
            self.interrupt_pending,
        )?;
        for q in &self.queues {
            write!(
                f,
                "  queue {}: size {}{}, device avail {} used {}, guest avail idx {} used idx {}",
                q.index,
                q.size,
                match (q.usable, q.in_kernel, q.in_backend) {
                    (false, _, _) => " (not set up)",
                    (true, true, _) => " (served by vhost-net)",
                    (true, false, true) => " (served by its vhost-user backend)",
                    (true, false, false) => "",
                },
                q.next_avail,
                q.next_used,
                opt(q.avail_idx),
                opt(q.used_idx),
            )?;
            if q.event_idx {
                write!(
                    f,
                    ", used_event {} avail_event {}",
                    opt(q.used_event),
                    opt(q.avail_event)
                )?;
            } else {
                write!(f, ", no_notify {}", opt(q.no_notify))?;
            }
            if q.index % 2 == 0 && q.stashed_chains > 0 {
                write!(
                    f,
                    ", stash {} chains / {} buffers",
                    q.stashed_chains, q.stashed_buffers
                )?;
            }
            writeln!(f)?;
        }
        Ok(())
    }
}
