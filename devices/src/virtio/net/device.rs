//! The virtio-net device's state machine: what it offers, what the driver accepted, activation
//! (offloads applied to the backend from the acked features) and reset, which can be repeated.

use std::io::{IoSlice, IoSliceMut};
use std::sync::Arc;

use tapir_net_backend::{offload, NetBackend};
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::counters::NetCounters;
use super::{
    config_space, offered_features, rx_frame_max, Malformed, QUEUE_SIZE, RX_QUEUE, TX_QUEUE,
};
use crate::virtio::{ActivateError, Interrupt, VirtioDevice};

/// What the device works with once the driver started it.
pub(super) struct Active {
    pub mem: GuestMemoryMmap,
    pub interrupt: Arc<Interrupt>,
    pub rx: Queue,
    pub tx: Queue,
    pub mrg_rxbuf: bool,
    pub rx_frame_max: usize,
}

/// A virtio-net device over backend `B` (a macvtap queue, or a socketpair in tests).
pub struct Net<B: NetBackend> {
    pub(super) name: String,
    pub(super) backend: B,
    avail_features: u64,
    pub(super) acked_features: u64,
    config: [u8; 12],
    mtu: u16,
    pub(super) queue_evts: [EventFd; 2],
    /// Written on activation and reset: the event loop then (un)registers the runtime fds.
    pub(super) state_evt: EventFd,
    pub(super) counters: Arc<NetCounters>,
    pub(super) active: Option<Active>,
    pub(super) registered: bool,
    /// The backend may hold frames not read yet (its fd is edge-triggered).
    pub(super) rx_pending: bool,
    /// The backend refused a frame with EAGAIN; TX waits for it to become writable.
    pub(super) tx_blocked: bool,
    // Scratch space reused for every frame.
    pub(super) rx_iov: Vec<IoSliceMut<'static>>,
    pub(super) tx_iov: Vec<IoSlice<'static>>,
    pub(super) rx_chains: Vec<(u16, u32)>,
    pub(super) rx_hdr_bufs: Vec<(GuestAddress, u32)>,
}

impl<B: NetBackend> Net<B> {
    /// A device named `name` (for logs) on `backend`, advertising `mac` and `mtu`, offering the
    /// guest offloads in `host_offloads` (TUN_F_* the backend accepts).
    pub fn new(
        name: impl Into<String>,
        backend: B,
        mac: [u8; 6],
        mtu: Option<u16>,
        host_offloads: u32,
    ) -> std::io::Result<Self> {
        let evt = || EventFd::new(libc::EFD_NONBLOCK);
        let mtu_value = mtu.unwrap_or(1500);
        Ok(Self {
            name: name.into(),
            backend,
            avail_features: offered_features(host_offloads, mtu.is_some()),
            acked_features: 0,
            config: config_space(mac, mtu_value),
            mtu: mtu_value,
            queue_evts: [evt()?, evt()?],
            state_evt: evt()?,
            counters: Arc::new(NetCounters::default()),
            active: None,
            registered: false,
            rx_pending: false,
            tx_blocked: false,
            rx_iov: Vec::with_capacity(64),
            tx_iov: Vec::with_capacity(64),
            rx_chains: Vec::with_capacity(64),
            rx_hdr_bufs: Vec::with_capacity(4),
        })
    }

    /// Clones of the RX and TX notification eventfds, to register as ioeventfds.
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

    /// Raises the interrupt if the driver wants one for what `queue` just used.
    pub(super) fn notify_guest(&mut self, queue: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let q = if queue == RX_QUEUE {
            &mut active.rx
        } else {
            &mut active.tx
        };
        match q.needs_notification(&active.mem) {
            Ok(false) => {}
            Ok(true) => {
                NetCounters::add(&self.counters.interrupts, 1);
                if let Err(e) = active.interrupt.signal_used() {
                    log::error!("{}: raising the interrupt: {e}", self.name);
                }
            }
            Err(e) => log::error!(
                "{}: reading the driver's notification state: {e}",
                self.name
            ),
        }
    }

    fn signal_state(&self) {
        if let Err(e) = self.state_evt.write(1) {
            log::error!("{}: signalling the event loop: {e}", self.name);
        }
    }
}

/// Counts a refused chain; the first one is worth a warning, a guest that keeps sending them must not
/// flood the log.
pub(super) fn report_malformed(name: &str, counters: &NetCounters, why: Malformed) {
    if counters
        .malformed_chains
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        == 0
    {
        log::warn!(
            "{name}: the guest sent a malformed descriptor chain ({why:?}); returned with length 0"
        );
    } else {
        log::debug!("{name}: malformed descriptor chain ({why:?})");
    }
}

impl<B: NetBackend> VirtioDevice for Net<B> {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
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
        let [rx, tx]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    got: q.len(),
                    want: 2,
                })?;
        for (i, q) in [(RX_QUEUE, &rx), (TX_QUEUE, &tx)] {
            if !q.is_valid(&mem) {
                return Err(ActivateError::BadQueue(i));
            }
        }
        let wanted = offload::tun_offloads_for(self.acked_features);
        let set = self
            .backend
            .set_offloads(wanted)
            .map_err(|e| ActivateError::Backend(format!("setting offloads {wanted:#x}: {e}")))?;
        log::info!(
            "{}: driver started: features {:#x}, offloads to the guest {set:#x}",
            self.name,
            self.acked_features
        );
        self.active = Some(Active {
            mem,
            interrupt,
            rx,
            tx,
            mrg_rxbuf: self.acked_features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            rx_frame_max: rx_frame_max(self.acked_features, self.mtu),
        });
        self.rx_pending = true;
        self.tx_blocked = false;
        self.signal_state();
        Ok(())
    }

    fn reset(&mut self) {
        log::info!("{}: reset by the driver", self.name);
        self.active = None;
        self.acked_features = 0;
        self.tx_blocked = false;
        if let Err(e) = self.backend.set_offloads(0) {
            log::warn!("{}: clearing offloads on reset: {e}", self.name);
        }
        self.signal_state();
    }
}
