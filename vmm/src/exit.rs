//! Why a VM stopped, and the latch every stop source (vCPUs, devices, the console, a stop handle)
//! reports through: the first reason wins and wakes the VMM's main loop.

use std::fmt;
use std::sync::Mutex;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use tapir_devices::bus::lock;

/// Why the guest stopped.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ExitReason {
    /// The guest rebooted through the i8042 reset line (Linux's `reboot`).
    Reset,
    /// Every vCPU sleeps with interrupts off: Linux's `poweroff` or `halt` on a machine without ACPI.
    Halted,
    /// The guest wrote the S5 (soft off) sleep type to the ACPI sleep control register: `poweroff`
    /// on a kernel that uses the ACPI tables.
    AcpiPowerOff,
    /// The guest wrote the ACPI reset register: `reboot` on a kernel that uses the ACPI tables.
    AcpiReset,
    /// Stopped from the host: a [`crate::StopHandle`] (the CLI's SIGINT/SIGTERM).
    Stopped,
    /// The console user typed the quit escape (Ctrl-A x).
    ConsoleQuit,
    /// The guest kernel panicked; the message is from its console.
    GuestPanic { message: String },
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault { vcpu: u8 },
    /// A vCPU stopped on an exit Tapir does not handle, or KVM_RUN failed.
    VcpuFailed { vcpu: u8, exit: String },
    /// The device thread ended on its own (its event loop failed).
    DevicesFailed,
}

impl ExitReason {
    /// True for the ways a guest is meant to stop: reboot, poweroff, or a stop from the host.
    pub fn is_clean(&self) -> bool {
        matches!(
            self,
            Self::Reset
                | Self::Halted
                | Self::AcpiPowerOff
                | Self::AcpiReset
                | Self::Stopped
                | Self::ConsoleQuit
        )
    }
}

impl fmt::Display for ExitReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Reset => write!(f, "guest rebooted (i8042 reset)"),
            Self::Halted => write!(
                f,
                "guest powered off (every vCPU halted with interrupts off)"
            ),
            Self::AcpiPowerOff => write!(f, "guest powered off (ACPI S5)"),
            Self::AcpiReset => write!(f, "guest rebooted (ACPI reset register)"),
            Self::Stopped => write!(f, "stopped from the host"),
            Self::ConsoleQuit => write!(f, "stopped from the console (Ctrl-A x)"),
            Self::GuestPanic { message } => write!(f, "guest kernel panicked: {message}"),
            Self::TripleFault { vcpu } => {
                write!(f, "vCPU {vcpu}: triple fault (KVM_EXIT_SHUTDOWN)")
            }
            Self::VcpuFailed { vcpu, exit } => write!(f, "vCPU {vcpu}: {exit}"),
            Self::DevicesFailed => write!(f, "the device thread ended on its own"),
        }
    }
}

/// What `Vm::run` returns.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunReport {
    pub reason: ExitReason,
    /// When the guest's init wrote the boot marker, counted from the builder's start instant.
    pub guest_init_after: Option<Duration>,
    /// Each virtio-net device's name and counters when the VM stopped.
    pub nets: Vec<(String, tapir_devices::virtio::net::NetStats)>,
}

/// Collects the first stop reason and wakes whoever waits on [`ExitLatch::wake_fd`].
pub(crate) struct ExitLatch {
    reason: Mutex<Option<ExitReason>>,
    panic: Mutex<Option<String>>,
    wake: EventFd,
}

impl ExitLatch {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Mutex::new(None),
            panic: Mutex::new(None),
            wake: EventFd::new(libc::EFD_NONBLOCK)?,
        })
    }

    /// Records `reason` unless one is already there. A reset, halt or triple fault after the kernel
    /// announced a panic is that panic (a kernel booted with `panic=N` reboots after it).
    pub fn request(&self, reason: ExitReason) {
        let mut slot = lock(&self.reason);
        if slot.is_some() {
            return;
        }
        let panic = lock(&self.panic).clone();
        *slot = Some(match (reason, panic) {
            (
                ExitReason::Reset | ExitReason::Halted | ExitReason::TripleFault { .. },
                Some(message),
            ) => ExitReason::GuestPanic { message },
            (reason, _) => reason,
        });
        if let Err(e) = self.wake.write(1) {
            log::error!("waking the VMM's main loop: {e}");
        }
    }

    /// The guest kernel has started to panic; its final message follows.
    pub fn note_panic(&self, message: String) {
        lock(&self.panic).get_or_insert(message);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        lock(&self.reason).clone()
    }

    pub fn wake_fd(&self) -> &EventFd {
        &self.wake
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins_and_wakes() {
        let latch = ExitLatch::new().unwrap();
        assert_eq!(latch.reason(), None);
        latch.request(ExitReason::Reset);
        latch.request(ExitReason::TripleFault { vcpu: 0 });
        assert_eq!(latch.reason(), Some(ExitReason::Reset));
        assert_eq!(latch.wake_fd().read().unwrap(), 1);
    }

    #[test]
    fn a_reboot_after_a_panic_is_the_panic() {
        for after in [
            ExitReason::Reset,
            ExitReason::Halted,
            ExitReason::TripleFault { vcpu: 1 },
        ] {
            let latch = ExitLatch::new().unwrap();
            latch.note_panic("Attempted to kill init!".into());
            latch.note_panic("second".into());
            latch.request(after);
            assert_eq!(
                latch.reason(),
                Some(ExitReason::GuestPanic {
                    message: "Attempted to kill init!".into()
                })
            );
        }
        let latch = ExitLatch::new().unwrap();
        latch.note_panic("x".into());
        latch.request(ExitReason::Stopped);
        assert_eq!(
            latch.reason(),
            Some(ExitReason::Stopped),
            "a host stop stays a stop"
        );
    }

    #[test]
    fn clean_reasons_and_messages() {
        assert!(ExitReason::Reset.is_clean() && ExitReason::Halted.is_clean());
        assert!(!ExitReason::TripleFault { vcpu: 0 }.is_clean());
        assert!(!ExitReason::GuestPanic {
            message: String::new()
        }
        .is_clean());
        assert_eq!(
            ExitReason::VcpuFailed {
                vcpu: 2,
                exit: "KVM_EXIT_INTERNAL_ERROR".into()
            }
            .to_string(),
            "vCPU 2: KVM_EXIT_INTERNAL_ERROR"
        );
        assert_eq!(
            ExitReason::TripleFault { vcpu: 1 }.to_string(),
            "vCPU 1: triple fault (KVM_EXIT_SHUTDOWN)"
        );
    }
}
