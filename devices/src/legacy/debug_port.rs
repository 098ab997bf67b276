//! A write-only debug port (QEMU's isa-debugcon does the same at its port): each byte the guest
//! writes is handed to a callback. The test guest writes its boot marker here.

use crate::bus::BusDevice;

/// Hands each byte written to the port to `on_byte`; reads return 0xff like an empty ISA port.
pub struct DebugPort {
    on_byte: Box<dyn FnMut(u8) + Send>,
}

impl std::fmt::Debug for DebugPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DebugPort")
    }
}

impl DebugPort {
    /// A port that calls `on_byte` for every byte written.
    pub fn new(on_byte: Box<dyn FnMut(u8) + Send>) -> Self {
        Self { on_byte }
    }
}

impl BusDevice for DebugPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        data.iter().for_each(|b| (self.on_byte)(*b));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[test]
    fn every_written_byte_reaches_the_callback() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        let mut port = DebugPort::new(Box::new(move |b| sink.lock().unwrap().push(b)));
        port.write(0, &[0x54]);
        port.write(0, &[1, 2]);
        let mut r = [0u8; 2];
        port.read(0, &mut r);
        assert_eq!(r, [0xff, 0xff]);
        assert_eq!(*seen.lock().unwrap(), vec![0x54, 1, 2]);
    }
}
