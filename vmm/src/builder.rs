//! The embedding API's front door: a builder that checks what it is given, creates the KVM VM with
//! its memory, devices and vCPUs, and loads the kernel, so that [`Vm::run`](crate::Vm::run) only runs.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use linux_loader::cmdline::Cmdline;
use tapir_devices::legacy::{acpi_ports, AcpiPorts, DebugPort, ResetPort, SerialPort};
use tapir_devices::{Bus, BusError};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use tapir_devices::virtio::net::VhostError;
use tapir_net_backend::nic::NicKind;
use tapir_net_backend::{NicError, NicSpec};

use crate::console::{Console, GuestOutput};
use crate::device_manager::{DeviceManager, HostNic};
use crate::exit::{ExitLatch, ExitReason};
use crate::guest_ram;
use crate::loader::{self, LoadError};
use crate::seccomp::{Filters, Seccomp, SeccompError, THREAD_STACK};
use crate::vcpu::Shared;
use crate::vm::{BootClock, Vm};

use crate::x86_64::{self, acpi, layout, mptable, ArchError, VcpuTemplate};

/// The command line when none is given: console on the first UART, reboot through the i8042,
/// reboot at once on a panic (Tapir reports it as a panic).
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=-1";
/// The default and smallest guest memory, in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 256;
pub const MIN_MEMORY_MIB: u64 = 32;
pub const MAX_NICS: usize = 10;
/// Address of KVM's TSS pages (three pages just below the BIOS area at the top of 4 GiB).
const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// Target for the boot-timer log line, so a logger can show it without the rest of `info`.
pub const BOOT_TIMER_TARGET: &str = "tapir::boot_timer";

/// What can fail while building a VM; each names the thing that failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{requested} vCPUs asked for; Tapir supports 1 to {max} on this host ({why})")]
    Vcpus {
        requested: u32,
        max: u32,
        why: &'static str,
    },
    #[error("{mib} MiB of guest memory asked for; at least {MIN_MEMORY_MIB} MiB are needed")]
    MemoryTooSmall { mib: u64 },
    #[error("{mib} MiB of guest memory is more than this host can address")]
    MemoryTooLarge { mib: u64 },
    #[error("opening {path} (is KVM loaded, and may this user open it?)")]
    OpenKvm {
        path: PathBuf,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("the host's KVM lacks {0}, which Tapir needs")]
    KvmLacks(&'static str),
    #[error("{what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("allocating {mib} MiB of guest memory")]
    AllocateMemory {
        mib: u64,
        #[source]
        source: guest_ram::RamError,
    },
    #[error("registering guest memory slot {slot} ({size} bytes at {addr:#x}) with KVM")]
    RegisterMemory {
        slot: u32,
        addr: u64,
        size: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("kernel command line {}", preview(cmdline))]
    Cmdline {
        cmdline: String,
        #[source]
        source: CmdlineError,
    },
    #[error("setting up guest boot state")]
    Arch(#[from] ArchError),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("placing a device on the bus")]
    Bus(#[from] BusError),
    #[error("{count} NICs asked for; Tapir supports at most {MAX_NICS}")]
    TooManyNics { count: usize },
    #[error("opening NIC {spec}")]
    Nic {
        spec: String,
        #[source]
        source: NicError,
    },
    #[error("NIC {spec}: vhost=on needs the host kernel's vhost-net (modprobe vhost_net; /dev/vhost-net readable and writable), or use vhost=off")]
    Vhost {
        spec: String,
        #[source]
        source: VhostError,
    },
    #[error("NIC {spec}: its vhost-user backend (is `tapir vhost-user-net` or another backend listening on that socket?)")]
    VhostUser {
        spec: String,
        #[source]
        source: VhostError,
    },
    #[error("setting up the sandbox")]
    Seccomp(#[from] SeccompError),
}

/// A long command line, shortened for a message.
fn preview(text: &str) -> String {
    const MAX: usize = 60;
    match text.char_indices().nth(MAX) {
        Some((cut, _)) => format!("{:?}... ({} bytes)", &text[..cut], text.len()),
        None => format!("{text:?}"),
    }
}

/// Why a command line was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    #[error("is {len} bytes; the kernel takes at most {max}")]
    TooLong { len: usize, max: usize },
    #[error("is not valid: {0}")]
    Invalid(String),
}

/// The kernel command line, checked against the longest the kernel takes (`capacity`, NUL included).
pub fn kernel_cmdline(text: &str, capacity: usize) -> Result<Cmdline, CmdlineError> {
    let text = text.trim();
    if text.len() >= capacity {
        return Err(CmdlineError::TooLong {
            len: text.len(),
            max: capacity - 1,
        });
    }
    if let Some(c) = text.chars().find(|c| c.is_control()) {
        return Err(CmdlineError::Invalid(format!("control character {c:?}")));
    }
    Cmdline::try_from(text, capacity).map_err(|e| CmdlineError::Invalid(e.to_string()))
}

/// Builds a VM step by step; `build` creates it.
///
/// ```no_run
/// use tapir::{Console, VmBuilder};
///
/// let report = VmBuilder::new("guest-images/out/bzImage")
///     .initrd("guest-images/out/initramfs.cpio.gz")
///     .vcpus(2)
///     .memory_mib(256)
///     .console(Console::Stdio)
///     .build()?
///     .run()?;
/// println!("{}", report.reason);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct VmBuilder {
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    cmdline: String,
    vcpus: u32,
    memory_mib: u64,
    console: Console,
    start: Instant,
    kvm_path: PathBuf,
    nets: Vec<NicSpec>,
    seccomp: Seccomp,
    acpi: bool,
    huge_pages: bool,
}

impl VmBuilder {
    /// A VM booting `kernel` (ELF vmlinux or bzImage) with one vCPU, 256 MiB, the default command
    /// line and no console.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        Self {
            kernel: kernel.into(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.into(),
            vcpus: 1,
            memory_mib: DEFAULT_MEMORY_MIB,
            console: Console::None,
            start: Instant::now(),
            kvm_path: "/dev/kvm".into(),
            nets: Vec::new(),
            seccomp: Seccomp::default(),
            acpi: true,
            huge_pages: true,
        }
    }

    /// Adds a virtio-net device on the host NIC `spec` names (`macvtap=`, `link=`, `tap=`, `fd=`);
    /// the guest sees them as eth0, eth1... in this order. A macvtap created for `link=` is deleted
    /// when the `Vm` is dropped.
    pub fn net(mut self, spec: NicSpec) -> Self {
        self.nets.push(spec);
        self
    }

    /// The initramfs.
    pub fn initrd(mut self, path: impl Into<PathBuf>) -> Self {
        self.initrd = Some(path.into());
        self
    }

    /// The whole kernel command line (replaces the default).
    pub fn cmdline(mut self, cmdline: impl Into<String>) -> Self {
        self.cmdline = cmdline.into();
        self
    }

    /// Number of vCPUs.
    pub fn vcpus(mut self, n: u32) -> Self {
        self.vcpus = n;
        self
    }

    /// Guest memory in MiB.
    pub fn memory_mib(mut self, mib: u64) -> Self {
        self.memory_mib = mib;
        self
    }

    /// Where the serial console goes.
    pub fn console(mut self, console: Console) -> Self {
        self.console = console;
        self
    }

    /// The instant the boot timer counts from (default: when the builder was made); the CLI
    /// passes its own start.
    pub fn start_instant(mut self, start: Instant) -> Self {
        self.start = start;
        self
    }

    /// Which threads run under a seccomp allow-list once the VM runs (default: Tapir's own,
    /// [`Seccomp::Threads`]; see the `seccomp` module's notes in the README).
    pub fn seccomp(mut self, seccomp: Seccomp) -> Self {
        self.seccomp = seccomp;
        self
    }

    /// Whether the guest gets ACPI tables (default on): the vCPUs in a MADT, the virtio-mmio NICs,
    /// COM1 and the i8042 in a DSDT, and the sleep and reset registers a hardware-reduced FADT
    /// names, so that a kernel using them powers off with [`ExitReason::AcpiPowerOff`] and reboots
    /// with [`ExitReason::AcpiReset`]. The MP table and the command line's `virtio_mmio.device=`
    /// entries are written either way, for kernels without ACPI.
    pub fn acpi(mut self, on: bool) -> Self {
        self.acpi = on;
        self
    }

    /// Whether guest RAM asks for transparent huge pages (default on): each region is placed at a
    /// 2 MiB-aligned host address and advised MADV_HUGEPAGE, so that KVM can map the guest with
    /// 2 MiB pages, and the guest takes one nested page fault per 2 MiB it touches instead of one
    /// per 4 KiB (as QEMU does). The host's THP setting still decides (`never` turns it off).
    pub fn huge_pages(mut self, on: bool) -> Self {
        self.huge_pages = on;
        self
    }

    /// The KVM device (default `/dev/kvm`).
    pub fn kvm_device(mut self, path: impl Into<PathBuf>) -> Self {
        self.kvm_path = path.into();
        self
    }

    /// Guest RAM is shared (memfds) where a vhost-user backend must map it.
    fn sharing(&self) -> guest_ram::Sharing {
        if self
            .nets
            .iter()
            .any(|n| matches!(n.kind, NicKind::VhostUser(_)))
        {
            guest_ram::Sharing::Memfd
        } else {
            guest_ram::Sharing::Private
        }
    }

    fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
        let what = what.into();
        move |source| BuildError::Io { what, source }
    }

    /// Creates the VM: checks the request, opens KVM, allocates memory, loads the kernel and
    /// initramfs, sets up devices and vCPUs.
    pub fn build(self) -> Result<Vm, BuildError> {
        if self.memory_mib < MIN_MEMORY_MIB {
            return Err(BuildError::MemoryTooSmall {
                mib: self.memory_mib,
            });
        }
        let mem_size = self
            .memory_mib
            .checked_mul(1 << 20)
            .filter(|size| size.checked_add(layout::MMIO_GAP_END).is_some())
            .ok_or(BuildError::MemoryTooLarge {
                mib: self.memory_mib,
            })?;
        let max = u32::from(mptable::MAX_VCPUS);
        if self.vcpus == 0 || self.vcpus > max {
            return Err(BuildError::Vcpus {
                requested: self.vcpus,
                max,
                why: "the MP table's limit",
            });
        }

        let vcpus = self.vcpus as u8;
        let ranges: Vec<(GuestAddress, usize)> = layout::ram_ranges(mem_size)
            .into_iter()
            .map(|(addr, len)| (GuestAddress(addr), len as usize))
            .collect();
        let (memory, _) =
            guest_ram::allocate(&ranges, self.huge_pages, self.sharing()).map_err(|source| {
                BuildError::AllocateMemory {
                    mib: self.memory_mib,
                    source,
                }
            })?;
        // The kernel is read on a thread while this one creates the KVM VM; KVM's errors wait
        // until the files, the command line and the NICs have been checked, so that those are
        // reported first. (The VM is created here, not on a helper thread: KVM names its
        // debugfs directory after the creating thread, and tools look it up by Tapir's pid.
        // After guest RAM: a thread's first allocation maps an arena, which must not fall
        // between guest_ram's probe and its mapping.)
        let kernel_loader = {
            let (memory, path) = (memory.clone(), self.kernel.clone());
            Beside::start("loading the kernel", "tapir-kernel", move || {
                loader::load_kernel(&memory, &path, mem_size).map_err(BuildError::from)
            })?
        };
        let kvm_vm = create_kvm_vm(&self.kvm_path, self.vcpus, max);
        let kernel = kernel_loader.finish()?;
        let (initrd, initrd_reader) = match &self.initrd {
            Some(path) => {
                let placed = loader::place_initrd(path, &kernel, mem_size)?;
                let at = (placed.addr, placed.size);
                // The clone shares the mappings (its regions are reference counted).
                let memory = memory.clone();
                let reader = Beside::start("reading the initramfs", "tapir-initrd", move || {
                    placed.read_into(&memory).map_err(BuildError::from)
                })?;
                (Some(at), Some(reader))
            }
            None => (None, None),
        };
        let capacity = kernel
            .cmdline_max
            .unwrap_or(layout::CMDLINE_MAX_SIZE)
            .min(layout::CMDLINE_MAX_SIZE);
        let devices = DeviceManager::new(self.nets.len())?;
        let cmdline = kernel_cmdline(&self.cmdline, capacity)
            .and_then(|mut c| devices.announce_on_cmdline(&mut c).map(|()| c))
            .map_err(|source| BuildError::Cmdline {
                cmdline: self.cmdline.clone(),
                source,
            })?;
        let cmdline_len = cmdline
            .as_cstring()
            .map(|c| c.as_bytes().len())
            .map_err(|e| BuildError::Cmdline {
                cmdline: self.cmdline.clone(),
                source: CmdlineError::Invalid(e.to_string()),
            })?;
        linux_loader::loader::load_cmdline(&memory, GuestAddress(layout::CMDLINE_START), &cmdline)
            .map_err(|e| BuildError::Cmdline {
                cmdline: self.cmdline.clone(),
                source: CmdlineError::Invalid(e.to_string()),
            })?;
        x86_64::write_boot_tables(&memory, vcpus)?;
        if self.acpi {
            x86_64::write_acpi_tables(&memory, vcpus, &devices.acpi_devices())?;
        }
        x86_64::write_zero_page(
            &memory,
            &x86_64::boot::boot_params(kernel.header, cmdline_len, initrd, mem_size),
        )?;
        log::info!(
            "kernel {} entry {:#x}, initramfs {:?}, {} MiB, {} vCPUs, cmdline {:?}",
            self.kernel.display(),
            kernel.entry,
            initrd,
            self.memory_mib,
            vcpus,
            self.cmdline
        );

        // The host NICs before KVM: a macvtap created for link= is deleted (Nic's Drop) on every
        // error path from here on.
        let mut nics = Vec::with_capacity(self.nets.len());
        for spec in &self.nets {
            nics.push(HostNic::open(spec)?);
        }

        // KVM's errors only now: a bad kernel, initramfs, command line or NIC is reported first.
        let (kvm, vm) = kvm_vm?;
        let kvm_err = |what| move |source| BuildError::Kvm { what, source };

        register_memory(&vm, &memory)?;

        let latch = Arc::new(ExitLatch::new().map_err(Self::io("creating the exit eventfd"))?);
        let clock = Arc::new(BootClock {
            start: self.start,
            marked: OnceLock::new(),
        });
        let filters = Filters::with(self.seccomp, self.sharing() == guest_ram::Sharing::Memfd)?;
        let console_input = matches!(self.console, Console::Stdio);
        let console_desc = format!("{:?}", self.console);
        let output = GuestOutput::new(self.console, latch.clone(), &filters).map_err(Self::io(
            format!("opening the console output {console_desc}"),
        ))?;
        let console_out = output.queue();
        let serial_irq =
            EventFd::new(libc::EFD_NONBLOCK).map_err(Self::io("creating the serial irqfd"))?;
        vm.register_irqfd(&serial_irq, layout::COM1_IRQ)
            .map_err(kvm_err("registering the serial port's irqfd"))?;
        let serial_room =
            EventFd::new(libc::EFD_NONBLOCK).map_err(Self::io("creating an eventfd"))?;
        let serial = Arc::new(Mutex::new(SerialPort::new(
            serial_irq,
            serial_room
                .try_clone()
                .map_err(Self::io("cloning an eventfd"))?,
            Box::new(output),
        )));
        let mut pio = Bus::new();
        pio.insert(serial.clone(), layout::COM1_PORT, 8)?;
        pio.insert(
            Arc::new(Mutex::new(ResetPort::new(ResetRequest(latch.clone())))),
            layout::I8042_PORT,
            5,
        )?;
        if self.acpi {
            pio.insert(
                Arc::new(Mutex::new(AcpiPorts::new(
                    acpi::S5_SLEEP_TYPE,
                    acpi::RESET_VALUE,
                    StopRequest(latch.clone(), ExitReason::AcpiPowerOff),
                    StopRequest(latch.clone(), ExitReason::AcpiReset),
                ))),
                u64::from(acpi::SLEEP_CONTROL_PORT),
                acpi_ports::PORTS,
            )?;
        }
        let marker_clock = clock.clone();
        pio.insert(
            Arc::new(Mutex::new(DebugPort::new(Box::new(move |byte| {
                if byte == layout::BOOT_MARKER {
                    marker_clock.mark();
                }
            })))),
            layout::DEBUG_PORT,
            1,
        )?;

        let mut mmio = Bus::new();
        let attached = devices.attach_nets(&vm, &memory, &mut nics, &self.nets, &mut mmio)?;

        let template = VcpuTemplate {
            cpuid: kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .map_err(kvm_err("reading KVM's supported CPUID"))?,
            msrs: supported_boot_msrs(&kvm)?,
            tsc_deadline: kvm.check_extension(Cap::TscDeadlineTimer),
            vcpus,
            entry: kernel.entry,
        };
        let mut vcpu_fds = Vec::with_capacity(usize::from(vcpus));
        for index in 0..vcpus {
            let fd = vm
                .create_vcpu(u64::from(index))
                .map_err(kvm_err("creating a vCPU"))?;
            x86_64::configure_vcpu(&fd, index, &template)?;
            vcpu_fds.push(fd);
        }

        if let Some(reader) = initrd_reader {
            reader.finish()?;
        }
        let shared = Arc::new(Shared::new(latch, usize::from(vcpus)));
        Vm::new(crate::vm::Parts {
            vm,
            memory,
            vcpus: vcpu_fds,
            pio: Arc::new(pio),
            mmio: Arc::new(mmio),
            subscribers: attached.subscribers,
            nics,
            net_infos: attached.net_infos,
            serial,
            serial_room,
            console_input,
            console_out,
            filters,
            shared,
            clock,
        })
        .map_err(Self::io("creating the stop eventfd"))
    }
}

/// Set-up work that runs on a thread of its own beside the rest of [`VmBuilder::build`]: loading
/// the kernel (while the KVM VM is created) and reading the initramfs into guest memory (while the
/// devices and vCPUs are). In the lab, reading a 5 MB initramfs took 22-144 ms and creating the VM
/// with its irqchip 20-30 ms of the 150-280 ms from exec to the first KVM_RUN. [`Beside::finish`] joins it;
/// dropping it on an error path joins too, so nothing of it outlives `build`.
struct Beside<T> {
    what: &'static str,
    thread: Option<JoinHandle<Result<T, BuildError>>>,
}

impl<T: Send + 'static> Beside<T> {
    fn start<F>(what: &'static str, name: &str, work: F) -> Result<Self, BuildError>
    where
        F: FnOnce() -> Result<T, BuildError> + Send + 'static,
    {
        let thread = std::thread::Builder::new()
            .name(name.into())
            .stack_size(THREAD_STACK)
            .spawn(work)
            .map_err(VmBuilder::io(format!("starting a thread for {what}")))?;
        Ok(Self {
            what,
            thread: Some(thread),
        })
    }

    fn finish(mut self) -> Result<T, BuildError> {
        match self.thread.take().map(JoinHandle::join) {
            Some(Ok(done)) => done,
            Some(Err(_)) | None => Err(BuildError::Io {
                what: self.what.into(),
                source: std::io::Error::other("its thread panicked"),
            }),
        }
    }
}

impl<T> Drop for Beside<T> {
    fn drop(&mut self) {
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Opens KVM, checks what Tapir needs of it, and creates the VM with its TSS, in-kernel irqchip
/// and PIT.
fn create_kvm_vm(kvm_path: &Path, vcpus: u32, max: u32) -> Result<(Kvm, VmFd), BuildError> {
    let open_err = |source| BuildError::OpenKvm {
        path: kvm_path.to_owned(),
        source,
    };
    let c_path = CString::new(kvm_path.as_os_str().as_bytes())
        .map_err(|_| open_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    let kvm = Kvm::new_with_path(c_path).map_err(open_err)?;
    for (cap, name) in [
        (Cap::Irqchip, "an in-kernel irqchip (KVM_CAP_IRQCHIP)"),
        (Cap::UserMemory, "user memory regions (KVM_CAP_USER_MEMORY)"),
        (Cap::Irqfd, "irqfd (KVM_CAP_IRQFD)"),
        (Cap::Pit2, "the in-kernel PIT (KVM_CAP_PIT2)"),
    ] {
        if !kvm.check_extension(cap) {
            return Err(BuildError::KvmLacks(name));
        }
    }
    let kvm_max = kvm.get_max_vcpus() as u32;
    if vcpus > kvm_max {
        return Err(BuildError::Vcpus {
            requested: vcpus,
            max: kvm_max.min(max),
            why: "KVM_CAP_MAX_VCPUS",
        });
    }
    let kvm_err = |what| move |source| BuildError::Kvm { what, source };
    let vm = kvm.create_vm().map_err(kvm_err("creating the KVM VM"))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(kvm_err("setting KVM's TSS address"))?;
    vm.create_irq_chip()
        .map_err(kvm_err("creating the in-kernel irqchip"))?;
    vm.create_pit2(kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    })
    .map_err(kvm_err("creating the in-kernel PIT"))?;
    Ok((kvm, vm))
}

fn register_memory(vm: &VmFd, memory: &GuestMemoryMmap) -> Result<(), BuildError> {
    for (slot, region) in memory.iter().enumerate() {
        let slot = slot as u32;
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `memory_size` bytes that the Vm owns and keeps
        // until after the VM file descriptor is closed.
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| BuildError::RegisterMemory {
            slot,
            addr: r.guest_phys_addr,
            size: r.memory_size,
            source,
        })?;
    }
    Ok(())
}

fn supported_boot_msrs(kvm: &Kvm) -> Result<Vec<kvm_bindings::kvm_msr_entry>, BuildError> {
    let listed = kvm.get_msr_index_list().map_err(|source| BuildError::Kvm {
        what: "reading KVM's MSR list",
        source,
    })?;
    let listed = listed.as_slice();
    Ok(x86_64::regs::boot_msrs()
        .into_iter()
        .filter(|m| listed.contains(&m.index))
        .collect())
}

/// The i8042's reset line: ends the VM as a reboot.
struct ResetRequest(Arc<ExitLatch>);

impl vm_superio::Trigger for ResetRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(ExitReason::Reset);
        Ok(())
    }
}

/// Ends the VM with the given reason when a device fires it.
struct StopRequest(Arc<ExitLatch>, ExitReason);

impl vm_superio::Trigger for StopRequest {
    type E = std::convert::Infallible;

    fn trigger(&self) -> Result<(), Self::E> {
        self.0.request(self.1.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_is_checked_against_the_kernels_limit() {
        let c = kernel_cmdline("  console=ttyS0 reboot=k  ", 2048).unwrap();
        assert_eq!(
            c.as_cstring().unwrap().to_str().unwrap(),
            "console=ttyS0 reboot=k"
        );
        assert_eq!(
            kernel_cmdline(&"a".repeat(2048), 2048).unwrap_err(),
            CmdlineError::TooLong {
                len: 2048,
                max: 2047
            }
        );
        assert!(kernel_cmdline(&"a".repeat(2047), 2048).is_ok());
        assert_eq!(
            kernel_cmdline("a\nb", 2048).unwrap_err(),
            CmdlineError::Invalid("control character '\\n'".into())
        );
        assert!(
            kernel_cmdline("", 2048).is_ok(),
            "an empty command line is the user's choice"
        );
    }

    #[test]
    fn long_command_lines_are_shortened_in_messages() {
        assert_eq!(preview("console=ttyS0"), "\"console=ttyS0\"");
        let long = "a".repeat(100);
        assert_eq!(
            preview(&long),
            format!("{:?}... (100 bytes)", "a".repeat(60))
        );
    }

    #[test]
    fn requests_are_checked_before_kvm_is_opened() {
        let nowhere = "/nonexistent/kvm";
        let err = VmBuilder::new("k")
            .vcpus(0)
            .kvm_device(nowhere)
            .build()
            .unwrap_err();
        assert!(
            matches!(err, BuildError::Vcpus { requested: 0, .. }),
            "{err}"
        );
        let err = VmBuilder::new("k")
            .vcpus(33)
            .kvm_device(nowhere)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "33 vCPUs asked for; Tapir supports 1 to 32 on this host (the MP table's limit)"
        );
        let err = VmBuilder::new("k")
            .memory_mib(8)
            .kvm_device(nowhere)
            .build()
            .unwrap_err();
        assert!(matches!(err, BuildError::MemoryTooSmall { mib: 8 }));
        let err = VmBuilder::new("k")
            .memory_mib(u64::MAX >> 10)
            .kvm_device(nowhere)
            .build()
            .unwrap_err();
        assert!(matches!(err, BuildError::MemoryTooLarge { .. }));
        let err = VmBuilder::new("/nonexistent/kernel")
            .kvm_device(nowhere)
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "opening kernel /nonexistent/kernel",
            "files come before KVM"
        );
    }
}
