//! The registers a hardware-reduced ACPI FADT points a guest at to power off and reboot (ACPI 6.4,
//! 4.8.3.7 and 4.8.3.6): a sleep control register, a sleep status register and a reset register,
//! one byte each on consecutive I/O ports. Linux's `poweroff` writes `SLP_EN | SLP_TYP << 2` with
//! the S5 type from `\_S5` to the control register; its `reboot` writes the FADT's reset value to
//! the reset register. The VMM decides what either means (Tapir ends the VM).

use vm_superio::Trigger;

use crate::bus::BusDevice;

/// Port offsets from the base.
pub const SLEEP_CONTROL: u64 = 0;
pub const SLEEP_STATUS: u64 = 1;
pub const RESET: u64 = 2;
/// How many ports the device takes.
pub const PORTS: u64 = 3;

/// Sleep control register: SLP_EN (bit 5) starts the transition to SLP_TYP (bits 2-4).
const SLP_EN: u8 = 1 << 5;
const SLP_TYP_SHIFT: u8 = 2;
const SLP_TYP_MASK: u8 = 0b111;

/// The three registers; `T` fires on a poweroff (S5) or a reset.
pub struct AcpiPorts<T: Trigger> {
    s5_type: u8,
    reset_value: u8,
    power_off: T,
    reset: T,
}

impl<T: Trigger> std::fmt::Debug for AcpiPorts<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AcpiPorts")
            .field("s5_type", &self.s5_type)
            .field("reset_value", &self.reset_value)
            .finish()
    }
}

impl<T: Trigger> AcpiPorts<T> {
    /// Registers for tables that announce `s5_type` as `\_S5`'s SLP_TYP and `reset_value` as the
    /// FADT's RESET_VALUE.
    pub fn new(s5_type: u8, reset_value: u8, power_off: T, reset: T) -> Self {
        Self {
            s5_type,
            reset_value,
            power_off,
            reset,
        }
    }

    fn sleep_control(&self, value: u8) {
        if value & SLP_EN == 0 {
            return;
        }
        let sleep_type = (value >> SLP_TYP_SHIFT) & SLP_TYP_MASK;
        if sleep_type == self.s5_type {
            if let Err(e) = self.power_off.trigger() {
                crate::error_limited!("ACPI: signalling the guest's poweroff: {e:?}");
            }
        } else {
            // Only \_S5 is announced: a guest asking for another state is not following the tables.
            crate::warn_limited!("ACPI: the guest asked for sleep type {sleep_type}, which Tapir does not offer; ignored");
        }
    }
}

impl<T: Trigger + Send> BusDevice for AcpiPorts<T> {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // Control and status read 0: no wake event, nothing in progress; the reset register is
        // write-only.
        data.fill(0);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let [value, ..] = data else { return };
        match offset {
            SLEEP_CONTROL => self.sleep_control(*value),
            // Writing WAK_STS clears it; there is never a wake event to clear.
            SLEEP_STATUS => {}
            RESET if *value == self.reset_value => {
                if let Err(e) = self.reset.trigger() {
                    crate::error_limited!("ACPI: signalling the guest's reset: {e:?}");
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    #[derive(Clone, Default)]
    struct Count(Arc<AtomicU32>);

    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    impl Count {
        fn get(&self) -> u32 {
            self.0.load(Ordering::SeqCst)
        }
    }

    fn ports() -> (AcpiPorts<Count>, Count, Count) {
        let (off, reset) = (Count::default(), Count::default());
        (AcpiPorts::new(5, 1, off.clone(), reset.clone()), off, reset)
    }

    #[test]
    fn slp_en_with_the_s5_type_powers_off_and_nothing_else_does() {
        let (mut p, off, reset) = ports();
        p.write(SLEEP_STATUS, &[0x80]); // Linux clears WAK_STS first
        p.write(SLEEP_CONTROL, &[5 << 2]); // the type without SLP_EN
        p.write(SLEEP_CONTROL, &[SLP_EN | 3 << 2]); // S3: not offered
        p.write(SLEEP_CONTROL, &[]);
        assert_eq!(off.get(), 0);
        p.write(SLEEP_CONTROL, &[SLP_EN | 5 << 2]);
        assert_eq!((off.get(), reset.get()), (1, 0));
    }

    #[test]
    fn only_the_announced_value_on_the_reset_register_resets() {
        let (mut p, off, reset) = ports();
        p.write(RESET, &[0]);
        p.write(RESET, &[0xfe]);
        p.write(SLEEP_CONTROL + 7, &[1]);
        assert_eq!(reset.get(), 0);
        p.write(RESET, &[1, 0, 0, 0]); // a wider write: its first byte counts
        assert_eq!((reset.get(), off.get()), (1, 0));
    }

    #[test]
    fn every_register_reads_zero() {
        let (mut p, _, _) = ports();
        for offset in [SLEEP_CONTROL, SLEEP_STATUS, RESET, 9] {
            let mut data = [0xffu8; 4];
            p.read(offset, &mut data);
            assert_eq!(data, [0; 4]);
        }
    }
}
