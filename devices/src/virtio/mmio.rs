//! The virtio-mmio transport, version 2 ("modern"): the register block a guest finds at the address
//! the kernel command line announces (`virtio_mmio.device=4K@ADDR:IRQ`). Queue notifications arrive
//! on ioeventfds the VMM registers with KVM for the QueueNotify register; interrupts leave through
//! an irqfd. Only the control path runs here, on the vCPU thread that touched a register.

use std::sync::{Arc, Mutex};

use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_mmio::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::{status, Interrupt, VirtioDevice};
use crate::bus::{lock, BusDevice};
use crate::{error_limited, warn_limited};

/// Size of one device's register window.
pub const MMIO_WINDOW: u64 = 0x1000;
/// "virt" in little endian.
const MAGIC: u32 = 0x7472_6976;
const VERSION_MODERN: u32 = 2;
/// "TAPR".
const VENDOR_ID: u32 = 0x5250_4154;

/// One virtio device behind an MMIO register window.
#[derive(Debug)]
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    /// The queues' notification eventfds (also registered as ioeventfds), for a QueueNotify write
    /// that reaches the bus anyway.
    notifiers: Vec<EventFd>,
    queues: Vec<Queue>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The driver wrote a queue setting the device cannot take (a size that is not a power of two
    /// up to the maximum, a misaligned ring address): the device will not start until a reset.
    bad_queue_setting: bool,
}

impl MmioTransport {
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        notifiers: Vec<EventFd>,
    ) -> Self {
        let queues = Self::fresh_queues(&device);
        Self {
            device,
            mem,
            interrupt,
            notifiers,
            queues,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            bad_queue_setting: false,
        }
    }

    fn fresh_queues(device: &Mutex<dyn VirtioDevice>) -> Vec<Queue> {
        lock(device)
            .queue_max_sizes()
            .iter()
            .filter_map(|max| Queue::new(*max).ok())
            .collect()
    }

    fn queue(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the device runs.
        if self.status & status::DRIVER_OK != 0 {
            return None;
        }
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        if self.activated {
            lock(&self.device).reset();
        }
        self.activated = false;
        self.queues = Self::fresh_queues(&self.device);
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.status = 0;
        self.bad_queue_setting = false;
        self.interrupt.reset();
    }

    /// A queue setting the driver wrote was refused: say so, and refuse to start until a reset.
    fn refuse_queue_setting(&mut self, what: &str, value: u64) {
        self.bad_queue_setting = true;
        warn_limited!(
            "virtio-mmio: queue {}: the driver wrote {what} {value:#x}, which the device cannot take",
            self.queue_sel
        );
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        // Only a reset clears status bits (virtio 1.2, 2.1.2): a driver that writes ACKNOWLEDGE
        // again after DRIVER_OK must not get to negotiate features anew under a running device.
        if value & self.status != self.status {
            warn_limited!(
                "virtio-mmio: the driver wrote status {value:#x} over {:#x} without a reset; ignored",
                self.status
            );
            return;
        }
        let newly = value & !self.status;
        let mut value = value;
        if newly & status::FEATURES_OK != 0 {
            let offered = lock(&self.device).features();
            let acceptable = self.driver_features & !offered == 0
                && self.driver_features & (1 << VIRTIO_F_VERSION_1) != 0;
            if acceptable {
                lock(&self.device).ack_features(self.driver_features);
            } else {
                warn_limited!(
                    "virtio-mmio: driver features {:#x} are not a subset of {offered:#x} with VERSION_1",
                    self.driver_features
                );
                value &= !status::FEATURES_OK;
            }
        }
        self.status = value;
        if newly & status::DRIVER_OK != 0 && value & status::FEATURES_OK != 0 && !self.activated {
            if self.bad_queue_setting {
                self.needs_reset("a queue setting was refused");
            } else {
                self.activate();
            }
        }
    }

    fn needs_reset(&mut self, why: &str) {
        error_limited!("virtio-mmio: the device cannot start: {why}");
        if let Err(e) = self.interrupt.signal_needs_reset() {
            error_limited!("virtio-mmio: raising the config interrupt: {e}");
        }
    }

    fn activate(&mut self) {
        let event_idx = self.driver_features
            & (1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX)
            != 0;
        for q in &mut self.queues {
            q.set_event_idx(event_idx);
        }
        let queues = std::mem::take(&mut self.queues);
        let result = lock(&self.device).activate(self.mem.clone(), self.interrupt.clone(), queues);
        match result {
            Ok(()) => self.activated = true,
            Err(e) => self.needs_reset(&e.to_string()),
        }
    }

    fn read_register(&mut self, offset: u32) -> u32 {
        match offset {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION_MODERN,
            VIRTIO_MMIO_DEVICE_ID => lock(&self.device).device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR_ID,
            VIRTIO_MMIO_DEVICE_FEATURES => {
                let features = lock(&self.device).features().to_le_bytes();
                match self.device_features_sel {
                    0 => u32::from_le_bytes([features[0], features[1], features[2], features[3]]),
                    1 => u32::from_le_bytes([features[4], features[5], features[6], features[7]]),
                    _ => 0,
                }
            }
            VIRTIO_MMIO_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size())),
            VIRTIO_MMIO_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready())),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS if self.interrupt.needs_reset() => {
                self.status | status::DEVICE_NEEDS_RESET
            }
            VIRTIO_MMIO_STATUS => self.status,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_register(&mut self, offset: u32, value: u32) {
        match offset {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            VIRTIO_MMIO_DRIVER_FEATURES if self.status & status::FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = value,
            VIRTIO_MMIO_QUEUE_NUM => {
                let taken = match (self.queue(), u16::try_from(value)) {
                    (Some(q), Ok(size)) => q.try_set_size(size).is_ok(),
                    (Some(_), Err(_)) => false,
                    (None, _) => true,
                };
                if !taken {
                    self.refuse_queue_setting("size", u64::from(value));
                }
            }
            VIRTIO_MMIO_QUEUE_READY => {
                if let Some(q) = self.queue() {
                    q.set_ready(value == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => match self.notifiers.get(value as usize) {
                Some(evt) => {
                    if let Err(e) = evt.write(1) {
                        error_limited!("virtio-mmio: forwarding a queue notification: {e}");
                    }
                }
                None => log::debug!("virtio-mmio: notification for unknown queue {value}"),
            },
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(value),
            VIRTIO_MMIO_STATUS => self.set_status(value),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH => self.set_queue_address(offset, value),
            _ => log::debug!(
                "virtio-mmio: write {value:#x} to unknown or read-only register {offset:#x}"
            ),
        }
    }
}

impl MmioTransport {
    /// One half of a queue's descriptor table, avail ring or used ring address.
    fn set_queue_address(&mut self, register: u32, value: u32) {
        let Some(q) = self.queue() else {
            return;
        };
        let merge = |old: u64, high: bool| {
            if high {
                (old & 0xffff_ffff) | (u64::from(value) << 32)
            } else {
                (old & !0xffff_ffff) | u64::from(value)
            }
        };
        let (what, result) = match register {
            VIRTIO_MMIO_QUEUE_DESC_LOW | VIRTIO_MMIO_QUEUE_DESC_HIGH => {
                let addr = merge(q.desc_table(), register == VIRTIO_MMIO_QUEUE_DESC_HIGH);
                (
                    "descriptor table",
                    q.try_set_desc_table_address(GuestAddress(addr)),
                )
            }
            VIRTIO_MMIO_QUEUE_AVAIL_LOW | VIRTIO_MMIO_QUEUE_AVAIL_HIGH => {
                let addr = merge(q.avail_ring(), register == VIRTIO_MMIO_QUEUE_AVAIL_HIGH);
                (
                    "avail ring",
                    q.try_set_avail_ring_address(GuestAddress(addr)),
                )
            }
            _ => {
                let addr = merge(q.used_ring(), register == VIRTIO_MMIO_QUEUE_USED_HIGH);
                ("used ring", q.try_set_used_ring_address(GuestAddress(addr)))
            }
        };
        if result.is_err() {
            self.refuse_queue_setting(what, u64::from(value));
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).read_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            return;
        }
        data.fill(0);
        if data.len() != 4 {
            log::debug!(
                "virtio-mmio: {}-byte read of register {offset:#x}",
                data.len()
            );
            return;
        }
        // Below the config space, so it fits.
        let Ok(offset) = u32::try_from(offset) else {
            return;
        };
        let value = self.read_register(offset);
        data.copy_from_slice(&value.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= u64::from(VIRTIO_MMIO_CONFIG) {
            lock(&self.device).write_config(offset - u64::from(VIRTIO_MMIO_CONFIG), data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write to register {offset:#x}",
                data.len()
            );
            return;
        };
        if let Ok(offset) = u32::try_from(offset) {
            self.write_register(offset, u32::from_le_bytes(bytes));
        }
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test values are small
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use vm_memory::GuestAddress;

    /// A device that records what the transport asks of it.
    #[derive(Debug, Default)]
    struct Fake {
        acked: u64,
        acked_out: Option<Arc<std::sync::atomic::AtomicU64>>,
        activations: Arc<AtomicUsize>,
        resets: Arc<AtomicUsize>,
    }

    const OFFERED: u64 = (1 << VIRTIO_F_VERSION_1) | 0b101;

    impl VirtioDevice for Fake {
        fn device_type(&self) -> u32 {
            1
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16, 16]
        }
        fn features(&self) -> u64 {
            OFFERED
        }
        fn ack_features(&mut self, features: u64) {
            self.acked = features;
            if let Some(out) = &self.acked_out {
                out.store(features, Ordering::SeqCst);
            }
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8 + 0x40);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            _: GuestMemoryMmap,
            _: Arc<Interrupt>,
            queues: Vec<Queue>,
        ) -> Result<(), super::super::ActivateError> {
            assert_eq!(queues.len(), 2);
            assert!(queues.iter().all(|q| q.ready() && q.size() == 8));
            self.activations.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        fn reset(&mut self) {
            self.resets.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn transport() -> (MmioTransport, Arc<AtomicUsize>, Arc<AtomicUsize>, EventFd) {
        let fake = Fake::default();
        let (a, r) = (fake.activations.clone(), fake.resets.clone());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let notify = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(
            Arc::new(Mutex::new(fake)),
            mem,
            Arc::new(Interrupt::new(irq)),
            vec![notify.try_clone().unwrap()],
        );
        (t, a, r, notify)
    }

    fn rd(t: &mut MmioTransport, reg: u32) -> u32 {
        let mut b = [0u8; 4];
        t.read(u64::from(reg), &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(t: &mut MmioTransport, reg: u32, v: u32) {
        t.write(u64::from(reg), &v.to_le_bytes());
    }

    /// Sets up both queues as a driver does: size 8 and ring addresses in guest memory.
    fn set_up_queues(t: &mut MmioTransport) {
        for q in 0..2u32 {
            wr(t, VIRTIO_MMIO_QUEUE_SEL, q);
            assert_eq!(rd(t, VIRTIO_MMIO_QUEUE_NUM_MAX), 16);
            wr(t, VIRTIO_MMIO_QUEUE_NUM, 8);
            wr(t, VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1000 + q * 0x1000);
            wr(t, VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1200 + q * 0x1000);
            wr(t, VIRTIO_MMIO_QUEUE_USED_LOW, 0x1400 + q * 0x1000);
            wr(t, VIRTIO_MMIO_QUEUE_READY, 1);
        }
    }

    #[test]
    fn a_driver_negotiates_sets_up_queues_and_starts_the_device() {
        let (mut t, activations, resets, notify) = transport();
        assert_eq!(rd(&mut t, VIRTIO_MMIO_MAGIC_VALUE), 0x7472_6976);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_VERSION), 2);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_ID), 1);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER,
        );
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 0b101);
        wr(&mut t, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_DEVICE_FEATURES), 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b100);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        assert_ne!(
            rd(&mut t, VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
            0,
            "features accepted"
        );
        set_up_queues(&mut t);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        // Queue set-up is frozen while the device runs.
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 4);
        // A notification that reaches the bus is forwarded to the queue's eventfd.
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
        assert_eq!(notify.read().unwrap(), 1);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NOTIFY, 7); // unknown queue: ignored
                                                 // Config space reads go to the device.
        let mut cfg = [0u8; 2];
        t.read(u64::from(VIRTIO_MMIO_CONFIG) + 2, &mut cfg);
        assert_eq!(cfg, [0x42, 0x42]);
        // Reset, and the driver can do it all again.
        wr(&mut t, VIRTIO_MMIO_STATUS, 0);
        assert_eq!(resets.load(Ordering::SeqCst), 1);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 0);
        assert_eq!(
            rd(&mut t, VIRTIO_MMIO_QUEUE_READY),
            0,
            "fresh queues after reset"
        );
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(&mut t, VIRTIO_MMIO_STATUS, status::FEATURES_OK);
        set_up_queues(&mut t);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status::FEATURES_OK | status::DRIVER_OK,
        );
        assert_eq!(activations.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn features_outside_the_offer_or_without_version_1_are_refused() {
        for (low, high) in [(0b010u32, 1u32), (0b100, 0)] {
            let (mut t, activations, _, _) = transport();
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, low);
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
            wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, high);
            wr(&mut t, VIRTIO_MMIO_STATUS, status::FEATURES_OK);
            assert_eq!(
                rd(&mut t, VIRTIO_MMIO_STATUS) & status::FEATURES_OK,
                0,
                "{low:#x} {high:#x}"
            );
            set_up_queues(&mut t);
            wr(
                &mut t,
                VIRTIO_MMIO_STATUS,
                status::FEATURES_OK | status::DRIVER_OK,
            );
            assert_eq!(
                activations.load(Ordering::SeqCst),
                0,
                "never started without FEATURES_OK"
            );
        }
    }

    #[test]
    fn odd_accesses_do_not_panic() {
        let (mut t, ..) = transport();
        let mut two = [0xffu8; 2];
        t.read(u64::from(VIRTIO_MMIO_STATUS), &mut two);
        assert_eq!(two, [0, 0]);
        t.write(u64::from(VIRTIO_MMIO_STATUS), &[1, 2]);
        wr(&mut t, 0x0ff0 - 0x100, 5);
        assert_eq!(rd(&mut t, 0x0a8), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 99);
        assert_eq!(rd(&mut t, VIRTIO_MMIO_QUEUE_NUM_MAX), 0);
        wr(&mut t, VIRTIO_MMIO_QUEUE_NUM, 8);
        wr(&mut t, VIRTIO_MMIO_INTERRUPT_ACK, 1);
    }

    /// The whole start-up with features `low` (word 0) and VERSION_1.
    fn start(t: &mut MmioTransport, low: u32) {
        wr(t, VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE | status::DRIVER);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, low);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
        wr(t, VIRTIO_MMIO_DRIVER_FEATURES, 1);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK,
        );
        set_up_queues(t);
        wr(
            t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK | status::DRIVER_OK,
        );
    }

    #[test]
    fn a_running_device_keeps_its_features_whatever_the_driver_writes_without_a_reset() {
        let acked = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let fake = Fake {
            acked_out: Some(acked.clone()),
            ..Fake::default()
        };
        let activations = fake.activations.clone();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut t = MmioTransport::new(
            Arc::new(Mutex::new(fake)),
            mem,
            Arc::new(Interrupt::new(irq)),
            vec![],
        );
        start(&mut t, 0b001);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
        let running = rd(&mut t, VIRTIO_MMIO_STATUS);
        // ACKNOWLEDGE alone, other features, FEATURES_OK: a renegotiation without a reset.
        wr(&mut t, VIRTIO_MMIO_STATUS, status::ACKNOWLEDGE);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
        wr(&mut t, VIRTIO_MMIO_DRIVER_FEATURES, 0b100);
        wr(
            &mut t,
            VIRTIO_MMIO_STATUS,
            status::ACKNOWLEDGE | status::FEATURES_OK,
        );
        assert_eq!(
            acked.load(Ordering::SeqCst),
            (1 << VIRTIO_F_VERSION_1) | 0b001,
            "the running device's features did not change"
        );
        assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), running);
        assert_eq!(activations.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn queue_settings_the_device_cannot_take_keep_it_from_starting() {
        for (reg, value) in [
            (VIRTIO_MMIO_QUEUE_NUM, 0x1_0008), // 8 once narrowed to u16
            (VIRTIO_MMIO_QUEUE_NUM, 12),       // not a power of two
            (VIRTIO_MMIO_QUEUE_NUM, 32),       // above the maximum
            (VIRTIO_MMIO_QUEUE_DESC_LOW, 0x1008),
            (VIRTIO_MMIO_QUEUE_AVAIL_LOW, 0x1201),
            (VIRTIO_MMIO_QUEUE_USED_LOW, 0x1402),
        ] {
            let (mut t, activations, _, _) = transport();
            wr(&mut t, VIRTIO_MMIO_QUEUE_SEL, 1);
            wr(&mut t, reg, value);
            start(&mut t, 0);
            assert_eq!(activations.load(Ordering::SeqCst), 0, "{reg:#x}={value:#x}");
            assert_ne!(
                rd(&mut t, VIRTIO_MMIO_STATUS) & status::DEVICE_NEEDS_RESET,
                0,
                "{reg:#x}={value:#x}"
            );
            // A reset clears it and the device starts.
            wr(&mut t, VIRTIO_MMIO_STATUS, 0);
            assert_eq!(rd(&mut t, VIRTIO_MMIO_STATUS), 0);
            start(&mut t, 0);
            assert_eq!(activations.load(Ordering::SeqCst), 1, "{reg:#x}={value:#x}");
        }
    }
}
