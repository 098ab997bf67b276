//! virtio: the device trait a transport drives, the interrupt a device raises, and the two pieces
//! Tapir has: the virtio-mmio transport (version 2) and the virtio-net device.

pub mod mmio;
pub mod net;
pub mod queue;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

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
    /// When the InterruptStatus bits last went from none to some, in ms after `epoch`.
    epoch: Instant,
    pending_since_ms: AtomicU64,
    resent: AtomicU64,
    /// Something outside the device (vhost-net, given the irqfd itself) raises used-buffer
    /// interrupts: InterruptStatus always shows VRING, as the device cannot know when.
    vring_from_outside: AtomicBool,
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
            epoch: Instant::now(),
            pending_since_ms: AtomicU64::new(0),
            resent: AtomicU64::new(0),
            vring_from_outside: AtomicBool::new(false),
        }
    }

    fn ms_since_epoch(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn raise(&self, bit: u32) -> std::io::Result<()> {
        if self.status.fetch_or(bit, Ordering::SeqCst) == 0 {
            self.pending_since_ms
                .store(self.ms_since_epoch(Instant::now()), Ordering::SeqCst);
        }
        self.raised.fetch_add(1, Ordering::Relaxed);
        self.irqfd.write(1)
    }

    /// Raises the interrupt again if the guest has left it unacknowledged for `after` or longer
    /// at `now`, and says whether it did. The irqfd gives the guest an edge, and an edge that
    /// never reaches the guest's handler would leave the device waiting for an acknowledgement
    /// that never comes (seen in nested KVM: the status bit set, the guest deaf for good); the
    /// InterruptStatus bits stay set until the handler acknowledges them, so raising the line
    /// again costs the guest at most one spurious interrupt.
    pub fn resend_if_overdue(&self, now: Instant, after: Duration) -> std::io::Result<bool> {
        if self.pending() == 0 {
            return Ok(false);
        }
        let now_ms = self.ms_since_epoch(now);
        let since = self.pending_since_ms.load(Ordering::SeqCst);
        let after_ms = u64::try_from(after.as_millis()).unwrap_or(u64::MAX);
        if now_ms.saturating_sub(since) < after_ms {
            return Ok(false);
        }
        self.pending_since_ms.store(now_ms, Ordering::SeqCst);
        self.resent.fetch_add(1, Ordering::Relaxed);
        self.irqfd.write(1)?;
        Ok(true)
    }

    /// Interrupts raised again by [`Interrupt::resend_if_overdue`].
    pub fn resent(&self) -> u64 {
        self.resent.load(Ordering::Relaxed)
    }

    /// "The device used buffers in a queue."
    pub fn signal_used(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_VRING)
    }

    /// "The configuration (or the device status) changed."
    pub fn signal_config(&self) -> std::io::Result<()> {
        self.raise(VIRTIO_MMIO_INT_CONFIG)
    }

    /// InterruptStatus as the driver reads it.
    pub fn status(&self) -> u32 {
        let outside = if self.vring_from_outside.load(Ordering::SeqCst) {
            VIRTIO_MMIO_INT_VRING
        } else {
            0
        };
        self.pending() | outside
    }

    /// The bits the device itself raised and the driver has not acknowledged.
    fn pending(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The irqfd, for something outside the device to raise used-buffer interrupts with (see
    /// [`Interrupt::set_vring_from_outside`]).
    pub fn irqfd(&self) -> &EventFd {
        &self.irqfd
    }

    /// Whether something outside the device raises used-buffer interrupts on the irqfd; until the
    /// transport resets the device.
    pub fn set_vring_from_outside(&self, on: bool) {
        self.vring_from_outside.store(on, Ordering::SeqCst);
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
        self.vring_from_outside.store(false, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;

    const OVERDUE: Duration = Duration::from_millis(500);

    fn interrupt() -> (Interrupt, EventFd) {
        let irqfd = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (Interrupt::new(irqfd.try_clone().unwrap()), irqfd)
    }

    #[test]
    fn an_interrupt_the_guest_leaves_unacknowledged_is_raised_again_once_overdue() {
        let (irq, line) = interrupt();
        let t0 = Instant::now();
        irq.signal_used().unwrap();
        assert_eq!(line.read().unwrap(), 1);
        assert!(!irq.resend_if_overdue(t0, OVERDUE).unwrap(), "not yet");
        let later = Instant::now() + OVERDUE;
        assert!(irq.resend_if_overdue(later, OVERDUE).unwrap());
        assert_eq!(line.read().unwrap(), 1, "the line raised again");
        assert!(
            !irq.resend_if_overdue(later, OVERDUE).unwrap(),
            "and then not again before another wait"
        );
        assert!(irq.resend_if_overdue(later + OVERDUE, OVERDUE).unwrap());
        assert_eq!(irq.resent(), 2);
    }

    #[test]
    fn an_acknowledged_interrupt_is_never_raised_again() {
        let (irq, line) = interrupt();
        irq.signal_used().unwrap();
        irq.ack(VIRTIO_MMIO_INT_VRING);
        let _ = line.read();
        let much_later = Instant::now() + 10 * OVERDUE;
        assert!(!irq.resend_if_overdue(much_later, OVERDUE).unwrap());
        assert!(line.read().is_err(), "no edge");
        assert_eq!(irq.resent(), 0);
    }

    #[test]
    fn interrupts_raised_from_outside_show_vring_and_are_never_resent() {
        let (irq, line) = interrupt();
        irq.set_vring_from_outside(true);
        assert_eq!(
            irq.status(),
            VIRTIO_MMIO_INT_VRING,
            "the driver always finds VRING"
        );
        irq.ack(VIRTIO_MMIO_INT_VRING);
        assert_eq!(
            irq.status(),
            VIRTIO_MMIO_INT_VRING,
            "an ack cannot clear it"
        );
        let much_later = Instant::now() + 10 * OVERDUE;
        assert!(!irq.resend_if_overdue(much_later, OVERDUE).unwrap());
        assert!(line.read().is_err(), "the watchdog raised nothing");
        irq.signal_config().unwrap();
        assert_eq!(irq.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        irq.reset();
        assert_eq!(irq.status(), 0, "a device reset ends it");
    }

    #[test]
    fn the_wait_starts_when_the_first_unacknowledged_interrupt_was_raised() {
        let (irq, _line) = interrupt();
        irq.signal_used().unwrap();
        irq.ack(VIRTIO_MMIO_INT_VRING);
        // raised anew after an acknowledgement: the clock starts again
        std::thread::sleep(Duration::from_millis(30));
        let raised = Instant::now();
        irq.signal_used().unwrap();
        let wait = Duration::from_millis(25);
        assert!(!irq.resend_if_overdue(raised, wait).unwrap());
        assert!(irq.resend_if_overdue(raised + wait, wait).unwrap());
    }
}
