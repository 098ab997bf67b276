//! Address buses that route a vCPU's port I/O or MMIO access to the device that owns the address.
//!
//! A bus is filled while the VM is built and only read afterwards, so the vCPU threads share it
//! without a lock; each device carries its own lock. Nothing here knows about KVM.

use std::sync::{Arc, Mutex};

/// A device that answers reads and writes at offsets within its own address range.
pub trait BusDevice: Send {
    /// Fills `data` with what the device returns at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Hands `data` written at `offset` to the device.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus and whoever else drives it (an input thread, the VMM).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors from filling a bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange { base: u64, len: u64 },
    /// The new range overlaps one that is already taken.
    #[error("bus range {base:#x}+{len:#x} overlaps {other_base:#x}+{other_len:#x}")]
    Overlap {
        base: u64,
        len: u64,
        other_base: u64,
        other_len: u64,
    },
}

struct Entry {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// Non-overlapping address ranges, each owned by one device.
#[derive(Default)]
pub struct Bus {
    // Sorted by base address.
    entries: Vec<Entry>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.entries
                    .iter()
                    .map(|e| format!("{:#x}+{:#x}", e.base, e.len)),
            )
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Gives `device` the range `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        if let Some(other) = self
            .entries
            .iter()
            .find(|e| base < e.base + e.len && e.base < end)
        {
            return Err(BusError::Overlap {
                base,
                len,
                other_base: other.base,
                other_len: other.len,
            });
        }
        let at = self.entries.partition_point(|e| e.base < base);
        self.entries.insert(at, Entry { base, len, device });
        Ok(())
    }

    fn find(&self, addr: u64, size: usize) -> Option<(&Entry, u64)> {
        let at = self.entries.partition_point(|e| e.base <= addr);
        let entry = self.entries.get(at.checked_sub(1)?)?;
        let offset = addr - entry.base;
        // An access must lie wholly inside one device's range.
        (offset + size as u64 <= entry.len).then_some((entry, offset))
    }

    /// Reads from the device at `addr`; false when no device owns the whole access.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).read(offset, data);
                true
            }
            None => false,
        }
    }

    /// Writes to the device at `addr`; false when no device owns the whole access.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr, data.len()) {
            Some((entry, offset)) => {
                lock(&entry.device).write(offset, data);
                true
            }
            None => false,
        }
    }
}

/// Locks a device, ignoring poisoning: a device whose lock holder panicked is still in a state
/// the guest can observe, and the panic itself already ends the VMM.
pub fn lock<T: ?Sized>(device: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    device.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)] // test values are small
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        writes: Vec<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.writes.push((offset, data.to_vec()));
        }
    }

    #[test]
    fn routes_by_range_with_offsets() {
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        let mut bus = Bus::new();
        bus.insert(b.clone(), 0x3f8, 8).unwrap();
        bus.insert(a.clone(), 0x60, 5).unwrap();

        let mut byte = [0u8; 1];
        assert!(bus.read(0x3fa, &mut byte));
        assert_eq!(byte, [2]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(a.lock().unwrap().writes, vec![(4, vec![0xfe])]);
        assert!(b.lock().unwrap().writes.is_empty());
    }

    #[test]
    fn unowned_and_straddling_accesses_are_refused() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 4)
            .unwrap();
        let mut two = [0u8; 2];
        assert!(!bus.read(0xff, &mut two), "below the range");
        assert!(!bus.read(0x103, &mut two), "straddles the end");
        assert!(!bus.write(0x104, &[0]), "just past the end");
        assert!(bus.read(0x102, &mut two));
    }

    #[test]
    fn overlapping_and_empty_ranges_are_errors() {
        let mut bus = Bus::new();
        let dev = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(dev(), 0x100, 0x10).unwrap();
        assert_eq!(
            bus.insert(dev(), 0x10f, 1),
            Err(BusError::Overlap {
                base: 0x10f,
                len: 1,
                other_base: 0x100,
                other_len: 0x10
            })
        );
        assert!(matches!(
            bus.insert(dev(), 0xf8, 0x9),
            Err(BusError::Overlap { .. })
        ));
        assert_eq!(
            bus.insert(dev(), 0x200, 0),
            Err(BusError::BadRange {
                base: 0x200,
                len: 0
            })
        );
        assert!(matches!(
            bus.insert(dev(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        bus.insert(dev(), 0xf0, 0x10).unwrap();
        bus.insert(dev(), 0x110, 0x10).unwrap();
    }
}
