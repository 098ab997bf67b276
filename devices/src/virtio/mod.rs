//! virtio: the device trait a transport drives, the interrupt a device raises, and the two pieces
//! Tapir has: the virtio-mmio transport (version 2) and the virtio-net device.

pub mod mmio;
pub mod net;
pub mod queue;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};

use virtio_bindings::virtio_mmio::{VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

pub use mmio::MmioTransport;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    pub const FAILED: u32 = 0x80;
}

/// The interrupt of one virtio-mmio device: the InterruptStatus register's bits and the irqfd that
/// raises the guest IRQ; also how the device tells the transport that it needs a reset.
pub struct Interrupt {
    irqfd: EventFd,
    status: AtomicU32,
    raised: AtomicU64,
    needs_reset: AtomicBool,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("raised", &self.raised())
            .field("needs_reset", &self.needs_reset())
            .finish()
    }
}

impl Interrupt {
    pub fn new(irqfd: EventFd) -> Self {
        Self {
            irqfd,
            status: AtomicU32::new(0),
            raised: AtomicU64::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        self.status.fetch_or(bit, Ordering::SeqCst);
        self.raised.fetch_add(1, Ordering::Relaxed);
        self.irqfd.write(1)
    }

    /// "The device used buffers in a queue."
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// "The configuration (or the device status) changed."
    pub fn signal_config(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// The driver broke the virtio rules: the status register shows DEVICE_NEEDS_RESET from now
    /// until the driver resets the device, and the driver hears of it by a configuration
    /// interrupt (virtio 1.2, 2.1.2).
    pub fn signal_needs_reset(&self) -> std::io::Result<()> {
        if self.needs_reset.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.signal_config()
    }

    pub fn needs_reset(&self) -> bool {
        self.needs_reset.load(Ordering::SeqCst)
    }

    /// Clears the interrupt state on a device reset.
    pub fn reset(&self) {
        self.needs_reset.store(false, Ordering::SeqCst);
        self.status.store(0, Ordering::SeqCst);
    }

    /// Interrupts raised so far.
    pub fn raised(&self) -> u64 {
        self.raised.load(Ordering::Relaxed)
    }
}

/// Why a device refused to start.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    #[error("the driver set up {got} queues; the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("queue {0} is not valid (size, addresses or alignment)")]
    BadQueue(usize),
    #[error("{0}")]
    Backend(String),
}

/// A virtio device as its transport sees it. Runtime work (queues, host I/O) happens in the
/// device's own event handler, not in these calls, which come from vCPU threads.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// VIRTIO_ID_*.
    fn device_type(&self) -> u32;
    /// Largest size of each queue; their number is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features the device offers.
    fn features(&self) -> u64;
    /// The features the driver accepted (a subset of `features`), at FEATURES_OK.
    fn ack_features(&mut self, features: u64);
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the device at DRIVER_OK with the driver's queues.
    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: std::sync::Arc<Interrupt>,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError>;
    /// Stops the device and forgets the driver's queues and features (status written 0).
    fn reset(&mut self);
}
