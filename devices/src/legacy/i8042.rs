//! The i8042 keyboard controller, reduced to what a Linux guest uses to reboot: command 0xFE on port
//! 0x64 pulses the CPU reset line. vm-superio's model does the decoding; the VMM decides what a reset
//! means (Tapir ends the VM).

use vm_superio::{I8042Device, Trigger};

use crate::bus::BusDevice;

/// The i8042 at ports 0x60-0x64 (base 0x60) as a bus device; `T` fires on a reset request.
pub struct ResetPort<T: Trigger> {
    i8042: I8042Device<T>,
}

impl<T: Trigger> std::fmt::Debug for ResetPort<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ResetPort")
    }
}

impl<T: Trigger> ResetPort<T> {
    /// A controller whose reset command fires `on_reset`.
    pub fn new(on_reset: T) -> Self {
        Self {
            i8042: I8042Device::new(on_reset),
        }
    }
}

impl<T: Trigger + Send> BusDevice for ResetPort<T> {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        // Status 0: output buffer empty, input buffer empty, so the guest's kb_wait() succeeds at once.
        data.fill(0);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.i8042.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Ok(offset), [value, ..]) = (u8::try_from(offset), data) {
            if let Err(e) = self.i8042.write(offset, *value) {
                crate::error_limited!("i8042: signalling the guest's reset request: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;
    use std::rc::Rc;

    #[derive(Clone, Default)]
    struct Count(Rc<Cell<u32>>);

    impl Trigger for Count {
        type E = ();
        fn trigger(&self) -> Result<(), ()> {
            self.0.set(self.0.get() + 1);
            Ok(())
        }
    }

    // `Rc` is not Send; the tests call the methods directly rather than through a bus.
    fn write(port: &mut ResetPort<Count>, offset: u8, value: u8) {
        port.i8042.write(offset, value).unwrap();
    }

    #[test]
    fn only_command_0xfe_on_port_0x64_resets() {
        let count = Count::default();
        let mut port = ResetPort::new(count.clone());
        write(&mut port, 0, 0xfe); // data port: not a command
        write(&mut port, 4, 0xd1); // another command
        assert_eq!(count.0.get(), 0);
        write(&mut port, 4, 0xfe);
        assert_eq!(count.0.get(), 1);
        assert_eq!(port.i8042.read(4), 0, "status: controller ready");
    }
}
