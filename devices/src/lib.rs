#![warn(clippy::cast_possible_truncation, missing_debug_implementations)]
//! Device models for Tapir's guests: the virtio-mmio transport, the virtio-net device, the 8250 serial
//! port and the i8042 reset line. Nothing here opens host files or knows about macvtap: the net device
//! reaches the host only through the backend trait it is handed, and interrupts leave through eventfds
//! the VMM has wired to KVM.

pub mod bus;
pub mod legacy;
pub mod ratelimit;
pub mod virtio;

pub use bus::{Bus, BusDevice, BusError, SharedDevice};
