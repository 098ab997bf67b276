//! The vhost-net data plane: the host kernel serves a queue pair's two virtqueues, reading and
//! writing the macvtap queue itself, with one `/dev/vhost-net` instance per pair (the `vhost`
//! crate's `vhost_kern::net`). Tapir keeps the control plane: features, configuration, the control
//! queue, offloads (TUNSETOFFLOAD still goes to the macvtap) and which queues the host steers
//! flows to.
//!
//! The kernel's contract, in the order it is followed on activation: the features the driver
//! acked, masked to what VHOST_GET_FEATURES offered (the offload bits are the macvtap's business
//! and never reach VHOST_SET_FEATURES); the guest's memory regions; per ring its size, addresses,
//! base (the next avail index), call and kick eventfds; the backend last. The kick eventfds are the
//! device's own QueueNotify ioeventfds, so a guest's notification wakes the kernel's worker
//! without a VM exit reaching Tapir. The vnet header size stays on the macvtap (12 bytes): vhost
//! then passes the header through untouched. Stopping (reset, driver restart, Tapir's exit) sets
//! the backend to none, which stops the rings, and reads their bases back; at Tapir's exit closing
//! the instance stops them (no ioctl then: the exiting thread's seccomp list has none of vhost's).
//!
//! Interrupts: vhost signals a ring's call eventfd when the driver wants an interrupt (it honours
//! EVENT_IDX itself). Two ways on to the guest ([`VhostIrq`]): `Relay`, the device's event loop
//! reads the call eventfd, sets VRING in InterruptStatus and raises the irqfd, so the guest's
//! handler finds why it was interrupted and the interrupt watchdog covers these interrupts as it
//! covers the userspace plane's; `Direct`, the call eventfd is the irqfd itself (KVM injects with
//! no Tapir thread woken) and InterruptStatus always shows VRING.

use std::fs::File;
use std::mem::ManuallyDrop;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd};
use std::sync::Arc;

use vhost::net::VhostNet as _;
use vhost::vhost_kern::net::Net as KernNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

/// The device features whose work vhost-net does: the ring layout and RX buffer merging. A
/// device on vhost offers the guest these only where VHOST_GET_FEATURES has them; the rest of its
/// features are Tapir's (configuration, control queue) or the macvtap's (offloads).
pub const VHOST_DATA_FEATURES: u64 = 1 << VIRTIO_F_VERSION_1
    | 1 << VIRTIO_RING_F_EVENT_IDX
    | 1 << VIRTIO_RING_F_INDIRECT_DESC
    | 1 << VIRTIO_NET_F_MRG_RXBUF;

/// How vhost-net's interrupts reach the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum VhostIrq {
    /// Through the device's event loop, which sets InterruptStatus and raises the irqfd.
    #[default]
    Relay,
    /// Straight to KVM's irqfd; InterruptStatus always shows VRING.
    Direct,
}

/// The ring indexes of a pair inside its vhost-net instance.
const RX: usize = 0;
const TX: usize = 1;

/// What went wrong talking to vhost-net: the step, and the kernel's answer.
#[derive(Debug, thiserror::Error)]
#[error("vhost-net: {what}: {source}")]
pub struct VhostError {
    what: String,
    #[source]
    source: vhost::Error,
}

fn step(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostError {
    let what = what.into();
    move |source| VhostError { what, source }
}

/// One queue pair's vhost-net instance.
pub struct VhostPair {
    net: KernNet<Arc<GuestMemoryMmap>>,
    /// What VHOST_GET_FEATURES offered.
    offered: u64,
    /// The call eventfds vhost signals, RX then TX.
    call: [EventFd; 2],
    /// The rings run (the backend is set).
    running: bool,
}

impl std::fmt::Debug for VhostPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostPair")
            .field("offered", &format_args!("{:#x}", self.offered))
            .field("running", &self.running)
            .finish_non_exhaustive()
    }
}

impl VhostPair {
    /// Opens `/dev/vhost-net` for a pair serving `mem` and makes this process its owner.
    pub fn open(mem: &GuestMemoryMmap) -> Result<Self, VhostError> {
        let net = KernNet::new(Arc::new(mem.clone())).map_err(step("opening /dev/vhost-net"))?;
        net.set_owner().map_err(step("VHOST_SET_OWNER"))?;
        let offered = net.get_features().map_err(step("VHOST_GET_FEATURES"))?;
        let eventfd = || {
            EventFd::new(libc::EFD_NONBLOCK).map_err(|e| VhostError {
                what: "creating a call eventfd".into(),
                source: vhost::Error::IOError(e),
            })
        };
        Ok(Self {
            net,
            offered,
            call: [eventfd()?, eventfd()?],
            running: false,
        })
    }

    /// What VHOST_GET_FEATURES offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// The call eventfds (RX, TX), for the event loop to relay.
    pub fn call_evts(&self) -> &[EventFd; 2] {
        &self.call
    }

    /// Whether the rings run.
    pub fn running(&self) -> bool {
        self.running
    }

    /// Hands the rings to the kernel: `acked` is what the driver acked (masked here to what
    /// vhost offered), `kick` the pair's QueueNotify eventfds (RX, TX), `call` the eventfd to
    /// signal used buffers on (None: this pair's own call eventfds, for a relay), `backend` its
    /// macvtap queue. On an error the rings are left stopped.
    pub fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: [&Queue; 2],
        kick: [&EventFd; 2],
        call: Option<&EventFd>,
        backend: BorrowedFd<'_>,
    ) -> Result<(), VhostError> {
        self.stop();
        let result = self.configure(acked, mem, queues, kick, call, backend);
        if result.is_err() {
            // (a ring the kernel accepted before the error must not run)
            self.running = true;
            self.stop();
        }
        result
    }

    fn configure(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        queues: [&Queue; 2],
        kick: [&EventFd; 2],
        call: Option<&EventFd>,
        backend: BorrowedFd<'_>,
    ) -> Result<(), VhostError> {
        let features = acked & self.offered;
        self.net
            .set_features(features)
            .map_err(step(format!("VHOST_SET_FEATURES {features:#x}")))?;
        let regions: Vec<VhostUserMemoryRegionInfo> = mem
            .iter()
            .map(|r| VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset: 0,
                mmap_handle: -1,
            })
            .collect();
        self.net
            .set_mem_table(&regions)
            .map_err(step("VHOST_SET_MEM_TABLE"))?;
        for (ring, (q, kick)) in queues.into_iter().zip(kick).enumerate() {
            let name = if ring == RX { "RX" } else { "TX" };
            self.net
                .set_vring_num(ring, q.size())
                .map_err(step(format!("{name} ring size {}", q.size())))?;
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: q.desc_table(),
                used_ring_addr: q.used_ring(),
                avail_ring_addr: q.avail_ring(),
                log_addr: None,
            };
            self.net
                .set_vring_addr(ring, &config)
                .map_err(step(format!("{name} ring addresses")))?;
            self.net
                .set_vring_base(ring, q.next_avail())
                .map_err(step(format!("{name} ring base")))?;
            self.net
                .set_vring_call(ring, call.unwrap_or(&self.call[ring]))
                .map_err(step(format!("{name} call eventfd")))?;
            self.net
                .set_vring_kick(ring, kick)
                .map_err(step(format!("{name} kick eventfd")))?;
        }
        // The crate wants a File; this one borrows the macvtap queue's fd and is never closed
        // (no dup: the vCPU thread that activates the device may not call fcntl). The kernel takes
        // its own reference.
        // SAFETY: `backend` is open for the duration of this call, and ManuallyDrop keeps the
        // File from closing it.
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(backend.as_raw_fd()) });
        for ring in [RX, TX] {
            self.running = true;
            self.net
                .set_backend(ring, Some(&*file))
                .map_err(step("VHOST_NET_SET_BACKEND"))?;
        }
        Ok(())
    }

    /// Stops the rings (the backend set to none) and returns their bases (next avail index, RX
    /// then TX) where the kernel gave them. Does nothing when they do not run.
    pub fn stop(&mut self) -> [Option<u16>; 2] {
        if !self.running {
            return [None, None];
        }
        self.running = false;
        let mut bases = [None, None];
        for ring in [RX, TX] {
            if let Err(e) = self.net.set_backend(ring, None) {
                crate::warn_limited!("vhost-net: stopping ring {ring}: {e}");
            }
            // the base is the ring's last avail index (u16 in the kernel)
            bases[ring] = self
                .net
                .get_vring_base(ring)
                .ok()
                .and_then(|b| u16::try_from(b).ok());
        }
        bases
    }
}
