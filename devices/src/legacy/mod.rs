//! The PC's legacy port-I/O devices a Linux guest needs to boot and stop: the 8250 UART (console),
//! the i8042's reset line, and a debug port the test guest writes its boot marker to.

mod debug_port;
mod i8042;
mod serial;

pub use debug_port::DebugPort;
pub use i8042::ResetPort;
pub use serial::{EventFdTrigger, SerialPort};
