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
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use super::user_link::UserLink;

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

/// What went wrong talking to vhost-net or a vhost-user backend: the step, and the answer.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VhostError {
    what: String,
    #[source]
    source: vhost::Error,
}

impl VhostError {
    pub(super) fn new(what: impl Into<String>, source: vhost::Error) -> Self {
        Self {
            what: what.into(),
            source,
        }
    }
}

fn step(what: impl Into<String>) -> impl FnOnce(vhost::Error) -> VhostError {
    let what = format!("vhost-net: {}", what.into());
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

/// The requests a pair's rings take, from either server: the `vhost` crate's [`VhostBackend`]
/// as a trait object (that one is not dyn-compatible).
pub(super) trait RingServer {
    fn set_features(&self, features: u64) -> vhost::Result<()>;
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()>;
    fn set_vring_num(&self, ring: usize, num: u16) -> vhost::Result<()>;
    fn set_vring_base(&self, ring: usize, base: u16) -> vhost::Result<()>;
    fn set_vring_addr(&self, ring: usize, config: &VringConfigData) -> vhost::Result<()>;
    fn set_vring_call(&self, ring: usize, fd: &EventFd) -> vhost::Result<()>;
    fn set_vring_kick(&self, ring: usize, fd: &EventFd) -> vhost::Result<()>;
    fn get_vring_base(&self, ring: usize) -> vhost::Result<u32>;
}

impl<T: VhostBackend> RingServer for T {
    fn set_features(&self, features: u64) -> vhost::Result<()> {
        VhostBackend::set_features(self, features)
    }
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()> {
        VhostBackend::set_mem_table(self, regions).map(|_| ())
    }
    fn set_vring_num(&self, ring: usize, num: u16) -> vhost::Result<()> {
        VhostBackend::set_vring_num(self, ring, num)
    }
    fn set_vring_base(&self, ring: usize, base: u16) -> vhost::Result<()> {
        VhostBackend::set_vring_base(self, ring, base)
    }
    fn set_vring_addr(&self, ring: usize, config: &VringConfigData) -> vhost::Result<()> {
        VhostBackend::set_vring_addr(self, ring, config)
    }
    fn set_vring_call(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        VhostBackend::set_vring_call(self, ring, fd)
    }
    fn set_vring_kick(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        VhostBackend::set_vring_kick(self, ring, fd)
    }
    fn get_vring_base(&self, ring: usize) -> vhost::Result<u32> {
        VhostBackend::get_vring_base(self, ring)
    }
}

/// Who serves a pair's rings.
enum Plane {
    /// The pair's own `/dev/vhost-net` instance.
    Kernel(KernNet<Arc<GuestMemoryMmap>>),
    /// A vhost-user backend, over the NIC's connection: this pair's rings are `2 * pair` and
    /// `2 * pair + 1` there.
    User { link: Arc<UserLink>, pair: usize },
}

/// One queue pair's rings served outside Tapir: by the kernel's vhost-net, or by a vhost-user
/// backend.
pub struct VhostPair {
    plane: Plane,
    /// What the server offered: VHOST_GET_FEATURES's answer, or the backend's GET_FEATURES.
    offered: u64,
    /// The rings run (the backend is set, or the vhost-user rings were started).
    running: bool,
}

impl std::fmt::Debug for VhostPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhostPair")
            .field(
                "plane",
                &match &self.plane {
                    Plane::Kernel(_) => "vhost-net".to_string(),
                    Plane::User { link, pair } => {
                        format!("vhost-user {} pair {pair}", link.path().display())
                    }
                },
            )
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
            plane: Plane::Kernel(net),
            offered,
            running: false,
        })
    }

    /// Pair `pair` of a NIC whose vhost-user backend is at the other end of `link`.
    pub fn user(link: Arc<UserLink>, pair: usize) -> Self {
        Self {
            offered: link.offered_features(),
            plane: Plane::User { link, pair },
            running: false,
        }
    }

    /// What the server offered.
    pub fn offered_features(&self) -> u64 {
        self.offered
    }

    /// Whether the rings run.
    pub fn running(&self) -> bool {
        self.running
    }

    /// Whether a vhost-user backend (not the kernel) serves the rings.
    pub fn is_user(&self) -> bool {
        matches!(self.plane, Plane::User { .. })
    }

    /// Runs `f` with the server as the generic vhost interface, and the index of the pair's RX
    /// ring there.
    fn with<R>(&self, f: impl FnOnce(&dyn RingServer, usize) -> R) -> R {
        match &self.plane {
            Plane::Kernel(net) => f(net, 0),
            Plane::User { link, pair } => link.with_backend(|b| f(b, 2 * pair)),
        }
    }

    /// Says what failed: the kernel's steps are named as before, a backend's with its socket.
    fn step(&self, what: String) -> impl FnOnce(vhost::Error) -> VhostError {
        let what = match &self.plane {
            Plane::Kernel(_) => format!("vhost-net: {what}"),
            Plane::User { link, pair } => {
                format!("vhost-user {} pair {pair}: {what}", link.path().display())
            }
        };
        move |source| VhostError { what, source }
    }

    /// Hands the rings to the server: `acked` is what the driver acked (masked here to what
    /// the server offered). On an error the rings are left stopped.
    pub fn start(
        &mut self,
        acked: u64,
        mem: &GuestMemoryMmap,
        rings: &Rings<'_>,
    ) -> Result<(), VhostError> {
        self.stop();
        let result = self.configure(acked, mem, rings);
        if result.is_err() {
            // (a ring the server accepted before the error must not run)
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
        let (features, user) = match &self.plane {
            Plane::Kernel(_) => (acked & self.offered, false),
            Plane::User { link, .. } => (link.features_for(acked), true),
        };
        self.with(|b, _| b.set_features(features))
            .map_err(self.step(format!("SET_FEATURES {features:#x}")))?;
        let mut regions = Vec::with_capacity(mem.num_regions());
        for r in mem.iter() {
            // a vhost-user backend maps guest RAM from its files (memfds); the kernel needs none
            let (mmap_handle, mmap_offset) = match (user, r.file_offset()) {
                (false, _) => (-1, 0),
                (true, Some(file)) => (file.file().as_raw_fd(), file.start()),
                (true, None) => {
                    return Err((self.step(format!(
                        "guest RAM at {:#x} is not shared (no memfd)",
                        r.start_addr().0
                    )))(vhost::Error::InvalidGuestMemory))
                }
            };
            regions.push(VhostUserMemoryRegionInfo {
                guest_phys_addr: r.start_addr().0,
                memory_size: r.len(),
                userspace_addr: r.as_ptr() as u64,
                mmap_offset,
                mmap_handle,
            });
        }
        self.with(|b, _| b.set_mem_table(&regions))
            .map_err(self.step("SET_MEM_TABLE".into()))?;
        for (side, (q, kick)) in rings.queues.into_iter().zip(rings.kick).enumerate() {
            let name = if side == RX { "RX" } else { "TX" };
            // The kernel translates guest addresses itself; a vhost-user backend takes them as
            // this process's (it maps them through the memory table's user addresses).
            let addr = |gpa: u64| -> Result<u64, VhostError> {
                if !user {
                    return Ok(gpa);
                }
                mem.get_host_address(GuestAddress(gpa))
                    .map(|p| p as u64)
                    .map_err(|_| {
                        (self.step(format!("{name} ring at {gpa:#x} outside guest RAM")))(
                            vhost::Error::InvalidGuestMemory,
                        )
                    })
            };
            let config = VringConfigData {
                queue_max_size: q.max_size(),
                queue_size: q.size(),
                flags: 0,
                desc_table_addr: addr(q.desc_table())?,
                used_ring_addr: addr(q.used_ring())?,
                avail_ring_addr: addr(q.avail_ring())?,
                log_addr: None,
            };
            self.with(|b, base| {
                let ring = base + side;
                b.set_vring_num(ring, q.size())
                    .map_err(self.step(format!("{name} ring size {}", q.size())))?;
                b.set_vring_base(ring, q.next_avail())
                    .map_err(self.step(format!("{name} ring base")))?;
                b.set_vring_addr(ring, &config)
                    .map_err(self.step(format!("{name} ring addresses")))?;
                b.set_vring_call(ring, rings.call)
                    .map_err(self.step(format!("{name} call eventfd")))?;
                // (the kick last: a backend may start the ring with it)
                b.set_vring_kick(ring, kick)
                    .map_err(self.step(format!("{name} kick eventfd")))
            })?;
        }
        match &self.plane {
            Plane::Kernel(net) => {
                // The crate wants a File; this one borrows the macvtap queue's fd and is never
                // closed (no dup: the vCPU thread that activates the device may not call fcntl).
                // The kernel takes its own reference.
                // SAFETY: `backend` is open for the duration of this call, and ManuallyDrop keeps
                // the File from closing it.
                let file =
                    ManuallyDrop::new(unsafe { File::from_raw_fd(rings.backend.as_raw_fd()) });
                for ring in [RX, TX] {
                    self.running = true;
                    net.set_backend(ring, Some(&*file))
                        .map_err(step("VHOST_NET_SET_BACKEND"))?;
                }
            }
            Plane::User { link, pair } => {
                self.running = true;
                link.pair_running(*pair, true)?;
            }
        }
        Ok(())
    }

    /// Stops the rings and returns their bases (next avail index, RX then TX) where the server
    /// gave them: the kernel's with the backend set to none first; a vhost-user backend's with
    /// GET_VRING_BASE, which stops each ring. Does nothing when they do not run.
    pub fn stop(&mut self) -> [Option<u16>; 2] {
        if !self.running {
            return [None, None];
        }
        self.running = false;
        let mut bases = [None, None];
        if let Plane::User { link, pair } = &self.plane {
            // (nothing to send: the rings stop below)
            let _ = link.pair_running(*pair, false);
        }
        for side in [RX, TX] {
            if let Plane::Kernel(net) = &self.plane {
                if let Err(e) = net.set_backend(side, None) {
                    crate::warn_limited!("vhost-net: stopping ring {side}: {e}");
                }
            }
            // the base is the ring's last avail index (u16 in the kernel and the protocol)
            bases[side] = self
                .with(|b, base| b.get_vring_base(base + side))
                .map_err(|e| {
                    crate::warn_limited!("{self:?}: reading ring {side}'s base back: {e}");
                })
                .ok()
                .and_then(|b| u16::try_from(b).ok());
        }
        bases
    }
}
