#![warn(missing_debug_implementations)]
//! Tapir: a small KVM virtual machine monitor whose network device is backed by a macvtap.
//!
//! This crate is the VMM: the KVM VM and its vCPU threads, guest memory, x86_64 direct boot of a
//! Linux kernel, the legacy devices a guest needs (serial console, i8042 reset), and the embedding
//! API the `tapir` binary is a thin layer over:
//!
//! ```no_run
//! use tapir::{Console, VmBuilder};
//!
//! let vm = VmBuilder::new("bzImage")
//!     .initrd("initramfs.cpio.gz")
//!     .cmdline("console=ttyS0 reboot=k panic=-1")
//!     .vcpus(2)
//!     .memory_mib(512)
//!     .console(Console::Stdio)
//!     .build()?;
//! let stop = vm.stop_handle(); // stop.stop() from any thread ends the run
//! let report = vm.run()?;
//! println!("{} (clean: {})", report.reason, report.reason.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! Process-wide effects: `run` installs a handler for the first real-time signal (SIGRTMIN), which
//! it uses to interrupt its vCPU threads; with [`Console::Stdio`] it reads stdin and, when stdin is
//! a terminal, keeps it in raw mode until `run` returns.
//!
//! Device models live in [`tapir_devices`], the host side of NICs in [`tapir_net_backend`].

mod builder;
mod console;
mod device_loop;
mod device_manager;
mod exit;
mod guest_ram;
pub mod kvm_stats;
mod loader;
mod seccomp;
mod user_net;
mod vcpu;
mod vm;
pub mod x86_64;

pub use builder::{
    kernel_cmdline, BuildError, CmdlineError, VmBuilder, BOOT_TIMER_TARGET, DEFAULT_CMDLINE,
    DEFAULT_MEMORY_MIB, MAX_NICS, MIN_MEMORY_MIB,
};
pub use console::Console;
pub use exit::{ExitReason, RunReport};
pub use loader::LoadError;
pub use seccomp::{Seccomp, SeccompError, StopOnDenial};
pub use tapir_net_backend::{NicSpec, VhostMode};
pub use user_net::{UserNetDaemon, UserNetError, UserNetServer};
pub use vm::{DumpHandle, NetInfo, RunError, StopHandle, Vm, QUEUE_STATE_TARGET};

/// The loader's entry points, for the fuzz targets.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    pub use crate::loader::{load_initrd, load_kernel, LoadedKernel};
}

pub use tapir_devices;
pub use tapir_net_backend;
