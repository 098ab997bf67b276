//! The 8250/16550A UART on the guest's COM port, built on vm-superio's model.
//!
//! Output goes to whatever writer the VMM hands in. Input is pushed by the VMM with
//! [`SerialPort::enqueue_input`], which takes only what fits in the 64-byte receive FIFO; when the guest
//! has drained the FIFO the port signals `input_room`, so a feeder can wait for room instead of
//! dropping bytes.

use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use vm_superio::serial::SerialEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::BusDevice;

/// A vm-superio trigger that raises an interrupt by writing to an eventfd (an irqfd).
#[derive(Debug)]
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

struct Events {
    input_room: EventFd,
    lost_output: Arc<AtomicU64>,
}

impl SerialEvents for Events {
    fn buffer_read(&self) {}

    fn out_byte(&self) {}

    fn tx_lost_byte(&self) {
        self.lost_output.fetch_add(1, Ordering::Relaxed);
    }

    fn in_buffer_empty(&self) {
        if let Err(e) = self.input_room.write(1) {
            crate::warn_limited!("serial: signalling room for console input: {e}");
        }
    }
}

/// The UART as a port-I/O bus device (8 registers).
pub struct SerialPort {
    serial: Serial<EventFdTrigger, Events, Box<dyn Write + Send>>,
    lost_output: Arc<AtomicU64>,
}

impl std::fmt::Debug for SerialPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialPort")
            .field("lost_output", &self.lost_output())
            .finish_non_exhaustive()
    }
}

impl SerialPort {
    /// A UART that raises `irq`, writes the guest's output to `out`, and signals `input_room`
    /// whenever the guest has read its receive FIFO empty.
    pub fn new(irq: EventFd, input_room: EventFd, out: Box<dyn Write + Send>) -> Self {
        let lost_output = Arc::new(AtomicU64::new(0));
        let events = Events {
            input_room,
            lost_output: lost_output.clone(),
        };
        Self {
            serial: Serial::with_events(EventFdTrigger(irq), events, out),
            lost_output,
        }
    }

    /// Queues console input for the guest; returns how many bytes fitted (0 when the FIFO is full).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                // The bytes are in the FIFO; only the interrupt failed, and the guest's next poll of
                // LSR still finds them.
                crate::warn_limited!("serial: raising the receive interrupt: {e:?}");
                bytes.len().min(self.serial.fifo_capacity())
            }
        }
    }

    /// Output bytes the writer refused (the sink was closed or full).
    pub fn lost_output(&self) -> u64 {
        self.lost_output.load(Ordering::Relaxed)
    }
}

impl BusDevice for SerialPort {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        if let (Ok(offset), [first, ..]) = (u8::try_from(offset), data) {
            *first = self.serial.read(offset);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (Ok(offset), [value, ..]) = (u8::try_from(offset), data) else {
            return;
        };
        if let Err(e) = self.serial.write(offset, *value) {
            // Counted by tx_lost_byte; rate-limited so a closed sink cannot flood the log.
            crate::warn_limited!("serial: writing guest output: {e:?}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    const DATA: u64 = 0;
    const IER: u64 = 1;
    const IIR: u64 = 2;
    const LSR: u64 = 5;
    const LSR_DATA_READY: u8 = 1;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Closed;

    impl Write for Closed {
        fn write(&mut self, _: &[u8]) -> io::Result<usize> {
            Err(io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn evt() -> EventFd {
        EventFd::new(libc::EFD_NONBLOCK).unwrap()
    }

    fn read(port: &mut SerialPort, offset: u64) -> u8 {
        let mut b = [0xaa; 1];
        port.read(offset, &mut b);
        b[0]
    }

    #[test]
    fn output_reaches_the_writer_and_raises_the_interrupt() {
        let out = Shared::default();
        let irq = evt();
        let mut port = SerialPort::new(irq.try_clone().unwrap(), evt(), Box::new(out.clone()));
        port.write(IER, &[0x02]); // THR-empty interrupt on
        irq.read().unwrap();
        read(&mut port, IIR); // the guest acknowledges, as its interrupt handler does
        for b in b"hi\n" {
            port.write(DATA, &[*b]);
        }
        assert_eq!(out.0.lock().unwrap().as_slice(), b"hi\n");
        assert!(
            irq.read().is_ok(),
            "THR-empty interrupt raised after output"
        );
        assert_eq!(port.lost_output(), 0);
    }

    #[test]
    fn input_fills_the_fifo_and_signals_room_when_drained() {
        let room = evt();
        let mut port = SerialPort::new(evt(), room.try_clone().unwrap(), Box::new(io::sink()));
        let input: Vec<u8> = (0..100u8).collect();
        let taken = port.enqueue_input(&input);
        assert_eq!(taken, 64, "a 16550A FIFO holds 64 bytes");
        assert_eq!(
            port.enqueue_input(&input[taken..]),
            0,
            "full FIFO takes nothing"
        );
        assert!(
            room.read().is_err(),
            "no room signalled before the guest reads"
        );

        let mut got = Vec::new();
        while read(&mut port, LSR) & LSR_DATA_READY != 0 {
            got.push(read(&mut port, DATA));
        }
        assert_eq!(got, input[..64]);
        assert_eq!(room.read().unwrap(), 1);
        assert_eq!(port.enqueue_input(&input[taken..]), 36);
    }

    #[test]
    fn a_closed_sink_counts_lost_bytes() {
        let mut port = SerialPort::new(evt(), evt(), Box::new(Closed));
        port.write(DATA, b"x");
        port.write(DATA, b"y");
        assert_eq!(port.lost_output(), 2);
    }

    #[test]
    fn odd_offsets_and_empty_accesses_do_not_panic() {
        let mut port = SerialPort::new(evt(), evt(), Box::new(io::sink()));
        port.write(0x1_0000, &[1]);
        port.write(DATA, &[]);
        let mut empty = [];
        port.read(DATA, &mut empty);
        let mut wide = [0xffu8; 4];
        port.read(LSR, &mut wide);
        assert_eq!(&wide[1..], &[0, 0, 0]);
    }
}
