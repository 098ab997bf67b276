//! A vCPU's thread: KVM_RUN in a loop, port I/O and MMIO exits handed to the buses, and every way
//! the loop can end reported to the exit latch with the vCPU's index and the exit that ended it.
//!
//! The VMM interrupts KVM_RUN with a real-time signal ("kick"): to stop the vCPU, and to look at
//! whether it sleeps for good (the poweroff check).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Once};
use std::thread::JoinHandle;

use kvm_bindings::{KVM_SYSTEM_EVENT_CRASH, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN};
use kvm_ioctls::{VcpuExit, VcpuFd};
use tapir_devices::Bus;
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::exit::{ExitLatch, ExitReason};
use crate::seccomp::{self, Filters, Kind};
use crate::x86_64;

/// State the vCPU threads share with the VMM.
pub(crate) struct Shared {
    pub stop: AtomicBool,
    pub latch: Arc<ExitLatch>,
    /// Per vCPU: asleep with interrupts off when last kicked.
    pub halted: Vec<AtomicBool>,
    /// Set by a queue-state dump request: the main loop logs the IOAPIC and kicks the vCPUs.
    pub dump_requested: AtomicBool,
    /// Per vCPU: log its interrupt state at its next exit (the main loop kicks until it has).
    pub dump: Vec<AtomicBool>,
}

impl Shared {
    pub fn new(latch: Arc<ExitLatch>, vcpus: usize) -> Self {
        let flags = || (0..vcpus).map(|_| AtomicBool::new(false)).collect();
        Self {
            stop: AtomicBool::new(false),
            latch,
            halted: flags(),
            dump_requested: AtomicBool::new(false),
            dump: flags(),
        }
    }
}

/// The signal that kicks a vCPU out of KVM_RUN.
pub(crate) fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Installs the kick handler once per process (without SA_RESTART, so KVM_RUN returns EINTR).
pub(crate) fn install_kick_handler() -> std::io::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), on_kick).map_err(std::io::Error::from);
    });
    result
}

pub(crate) struct Vcpu {
    pub index: u8,
    pub fd: VcpuFd,
    pub pio: Arc<Bus>,
    pub mmio: Arc<Bus>,
    pub shared: Arc<Shared>,
}

impl Vcpu {
    /// Starts the vCPU's thread, under the vCPU allow-list of `filters`.
    pub fn spawn(self, filters: &Arc<Filters>) -> std::io::Result<JoinHandle<()>> {
        seccomp::spawn(
            format!("tapir-vcpu{}", self.index),
            filters,
            Kind::Vcpu,
            move || self.run(),
        )
    }

    fn fail(&self, exit: String) {
        self.shared.latch.request(ExitReason::VcpuFailed {
            vcpu: self.index,
            exit,
        });
    }

    fn run(mut self) {
        let index = self.index;
        while !self.shared.stop.load(Ordering::Acquire) {
            if self.shared.dump[usize::from(index)].swap(false, Ordering::AcqRel) {
                log::warn!(
                    target: crate::vm::QUEUE_STATE_TARGET,
                    "vCPU {index}: {}",
                    x86_64::describe_interrupt_state(&self.fd)
                );
            }
            let stop = match self.fd.run() {
                Ok(exit) => match exit {
                    VcpuExit::IoOut(port, data) => {
                        if !self.pio.write(u64::from(port), data) {
                            log::trace!("vCPU {index}: write to unused port {port:#x}");
                        }
                        None
                    }
                    VcpuExit::IoIn(port, data) => {
                        if !self.pio.read(u64::from(port), data) {
                            // An empty ISA port floats high.
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::MmioRead(addr, data) => {
                        if !self.mmio.read(addr, data) {
                            log::debug!("vCPU {index}: read from unmapped MMIO {addr:#x}");
                            data.fill(0xff);
                        }
                        None
                    }
                    VcpuExit::MmioWrite(addr, data) => {
                        if !self.mmio.write(addr, data) {
                            log::debug!("vCPU {index}: write to unmapped MMIO {addr:#x}");
                        }
                        None
                    }
                    VcpuExit::Shutdown => Some(ExitReason::TripleFault { vcpu: index }),
                    VcpuExit::SystemEvent(kind, data) => Some(match kind {
                        KVM_SYSTEM_EVENT_SHUTDOWN => ExitReason::Halted,
                        KVM_SYSTEM_EVENT_RESET => ExitReason::Reset,
                        KVM_SYSTEM_EVENT_CRASH => ExitReason::VcpuFailed {
                            vcpu: index,
                            exit: format!("KVM_EXIT_SYSTEM_EVENT crash {data:x?}"),
                        },
                        other => ExitReason::VcpuFailed {
                            vcpu: index,
                            exit: format!("KVM_EXIT_SYSTEM_EVENT of unknown type {other}"),
                        },
                    }),
                    VcpuExit::FailEntry(reason, cpu) => Some(ExitReason::VcpuFailed {
                        vcpu: index,
                        exit: format!(
                            "KVM_EXIT_FAIL_ENTRY (hardware entry failure reason {reason:#x}, host CPU {cpu})"
                        ),
                    }),
                    VcpuExit::InternalError => Some(ExitReason::VcpuFailed {
                        vcpu: index,
                        exit: "KVM_EXIT_INTERNAL_ERROR (KVM could not emulate an instruction)".into(),
                    }),
                    other => Some(ExitReason::VcpuFailed {
                        vcpu: index,
                        exit: format!("unexpected exit {other:?}"),
                    }),
                },
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.note_halted();
                    None
                }
                Err(e) => Some(ExitReason::VcpuFailed {
                    vcpu: index,
                    exit: format!("KVM_RUN failed: {e}"),
                }),
            };
            if let Some(reason) = stop {
                log::debug!("vCPU {index} stops: {reason}");
                if matches!(
                    reason,
                    ExitReason::TripleFault { .. } | ExitReason::VcpuFailed { .. }
                ) {
                    log::error!(
                        "{reason}; registers: {}",
                        x86_64::describe_registers(&self.fd)
                    );
                }
                self.shared.latch.request(reason);
                return;
            }
        }
    }

    fn note_halted(&self) {
        match x86_64::halted_for_good(&self.fd) {
            Ok(halted) => {
                self.shared.halted[usize::from(self.index)].store(halted, Ordering::Release)
            }
            Err(e) => self.fail(format!("reading the vCPU state after a kick: {e}")),
        }
    }
}

/// Interrupts a vCPU thread's KVM_RUN.
pub(crate) fn kick(thread: &JoinHandle<()>) {
    if thread.is_finished() {
        return;
    }
    if let Err(e) = thread.kill(kick_signal()) {
        log::debug!("kicking a vCPU thread: {e}");
    }
}
