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
//! EVENT_IDX itself), and that eventfd is the device's irqfd: KVM injects the interrupt with no
//! Tapir thread woken, and InterruptStatus always shows VRING (the device cannot know when vhost
//! raised one). A relay through Tapir's event loop (read the call eventfd, set VRING, raise the
//! irqfd) was measured against it in the lab (3 rounds, QEMU vhost=on beside both): direct moved TCP
//! guest->peer 1.23x, TCP peer->guest 1.07x and 64-byte UDP guest->peer 1.54x the relay's rate, at
//! 0.64-0.91x its VMM CPU per frame and a lower RTT, and 0.68x its 64-byte UDP peer->guest rate (a
//! case where vhost-net on a macvtap is slow either way). What the relay had and this lacks: the
//! interrupt watchdog cannot raise again a vhost interrupt the guest never took.

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

/// What a pair's rings are made of when they go to the kernel.
#[derive(Debug)]
pub struct Rings<'a> {
    /// The virtqueues, RX then TX.
    pub queues: [&'a Queue; 2],
    /// Their QueueNotify eventfds, RX then TX: the kernel's kick eventfds.
    pub kick: [&'a EventFd; 2],
    /// The eventfd to signal used buffers on: the device's irqfd.
    pub call: &'a EventFd,
    /// The pair's macvtap queue.
    pub backend: BorrowedFd<'a>,
}

/// One queue pair's vhost-net instance.
pub struct VhostPair {
    net: KernNet<Arc<GuestMemoryMmap>>,
    /// What VHOST_GET_FEATURES offered.
    offered: u64,
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
        Ok(Self {
            net,
            offered,
            running: false,
        })
    }

    /// What VHOST_GET_FEATURES offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Whether the rings run.
    pub fn running(&self) -> bool {
        self.running
    }

    /// Hands the rings to the kernel: `acked` is what the driver acked (masked here to what
    /// vhost offered). On an error the rings are left stopped.
    pub fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        rings: &Rings<'_>,
    ) -> Result<(), VhostError> {
        self.stop();
        let result = self.configure(acked, mem, rings);
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
        rings: &Rings<'_>,
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
        for (ring, (q, kick)) in rings.queues.into_iter().zip(rings.kick).enumerate() {
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
                .set_vring_call(ring, rings.call)
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
        let file = ManuallyDrop::new(unsafe { File::from_raw_fd(rings.backend.as_raw_fd()) });
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
