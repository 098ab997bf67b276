//! The PC's legacy port-I/O devices a Linux guest needs to boot and stop: the 8250 UART (console),
//! the i8042's reset line, a debug port the test guest writes its boot marker to, and the ACPI
//! sleep and reset registers.

pub mod acpi_ports;
mod debug_port;
mod i8042;
mod serial;

pub use acpi_ports::AcpiPorts;
pub use debug_port::DebugPort;
pub use i8042::ResetPort;
pub use serial::{EventFdTrigger, SerialPort};
