//! Tapir's VMM: the KVM VM, its vCPUs, guest memory, x86_64 boot, the device manager and the event loop,
//! plus the embedding API the `tapir` binary is built on.
//!
//! Not written yet: the boot work is tracked as its own issue. This crate only ties the workspace
//! together for now.

pub use tapir_devices as devices;
pub use tapir_net_backend as net_backend;
