//! x86_64 direct boot: guest memory layout, the structures the Linux boot protocol and an MP-capable
//! guest expect in memory, and each vCPU's entry state.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod gdt;
pub mod layout;
pub mod mptable;
pub mod paging;
pub mod regs;

use kvm_bindings::{
    kvm_irqchip, kvm_mp_state, CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_MP_STATE_HALTED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
};
use kvm_ioctls::{VcpuFd, VmFd};
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use layout::{GDT_START, IDT_START, MPTABLE_START, ZERO_PAGE_START};

/// What can fail while writing boot structures or setting up a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum ArchError {
    #[error("writing the {what} to guest memory")]
    WriteMemory {
        what: &'static str,
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    #[error("building the MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("building the ACPI tables")]
    Acpi(#[from] acpi::AcpiError),
    #[error("writing the zero page (boot_params)")]
    ZeroPage(#[source] linux_loader::configurator::Error),
    #[error("vCPU {vcpu}: {what}")]
    Vcpu {
        vcpu: u8,
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {vcpu}: KVM accepted {set} of {wanted} boot MSRs; it refused MSR {refused:#x}")]
    Msrs {
        vcpu: u8,
        set: usize,
        wanted: usize,
        refused: u32,
    },
}

fn write(
    mem: &GuestMemoryMmap,
    what: &'static str,
    addr: u64,
    bytes: &[u8],
) -> Result<(), ArchError> {
    mem.write_slice(bytes, GuestAddress(addr))
        .map_err(|source| ArchError::WriteMemory { what, source })
}

/// What sits at the reset vector in place of a BIOS: real-mode code that pulses the reset line
/// through the i8042 (`mov al, 0xfe; out 0x64, al; hlt; jmp $-1`). Linux on a hardware-reduced
/// ACPI machine reboots the EFI way first (`reboot_init` picks it there), which without EFI does
/// nothing, and then the BIOS way: `machine_real_restart` jumps to f000:fff0. Without the stub
/// the guest ran whatever that memory held and hung.
pub const RESET_STUB: [u8; 7] = [0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd];

/// Writes the GDT, an empty IDT, the identity page tables, the MP table for `vcpus` vCPUs and the
/// reset vector's stub.
pub fn write_boot_tables(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), ArchError> {
    write(mem, "reset vector stub", layout::RESET_VECTOR, &RESET_STUB)?;
    let gdt: Vec<u8> = gdt::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", GDT_START, &gdt)?;
    write(mem, "IDT", IDT_START, &0u64.to_le_bytes())?;
    for (addr, entries) in paging::identity_tables() {
        let page: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        write(mem, "page tables", addr, &page)?;
    }
    write(mem, "MP table", MPTABLE_START, &mptable::build(vcpus)?)
}

/// Writes the ACPI tables for `vcpus` vCPUs and the virtio-mmio `devices` at [`acpi::ACPI_START`].
pub fn write_acpi_tables(
    mem: &GuestMemoryMmap,
    vcpus: u8,
    devices: &[acpi::MmioDevice],
) -> Result<(), ArchError> {
    write(
        mem,
        "ACPI tables",
        acpi::ACPI_START,
        &acpi::build(vcpus, devices)?,
    )
}

/// Writes the zero page.
pub fn write_zero_page(mem: &GuestMemoryMmap, params: &boot_params) -> Result<(), ArchError> {
    LinuxBootConfigurator::write_bootparams(
        &BootParams::new(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(ArchError::ZeroPage)
}

/// What every vCPU needs from the host's KVM to be configured.
#[derive(Debug)]
pub struct VcpuTemplate {
    /// KVM_GET_SUPPORTED_CPUID.
    pub cpuid: CpuId,
    /// The boot MSRs KVM lists (KVM_GET_MSR_INDEX_LIST).
    pub msrs: Vec<kvm_bindings::kvm_msr_entry>,
    pub tsc_deadline: bool,
    pub vcpus: u8,
    /// The kernel's 64-bit entry point.
    pub entry: u64,
}

/// Gives vCPU `index` its CPUID, registers, FPU, MSRs and LAPIC wiring for the 64-bit entry.
pub fn configure_vcpu(vcpu: &VcpuFd, index: u8, t: &VcpuTemplate) -> Result<(), ArchError> {
    let fail = |what| {
        move |source| ArchError::Vcpu {
            vcpu: index,
            what,
            source,
        }
    };
    let mut cpuid = t.cpuid.clone();
    cpuid::shape(
        cpuid.as_mut_slice(),
        cpuid::Shape {
            apic_id: index,
            vcpus: t.vcpus,
            tsc_deadline: t.tsc_deadline,
        },
    );
    vcpu.set_cpuid2(&cpuid).map_err(fail("setting CPUID"))?;

    // Start with every state component KVM supports enabled in XCR0 (Linux enables the same set at
    // once). Where a nested hypervisor does not intercept XSETBV (QEMU's TCG SVM, the KVM lab), KVM
    // never sees the guest's own XCR0 write; this way its CPUID.0xD sizes and the XCR0 it restores
    // on every entry still match what the guest uses, and the guest's FPU set-up check passes.
    let xcr0 = cpuid::supported_xcr0(cpuid.as_slice());
    if xcr0 != 0 {
        let mut xcrs = vcpu.get_xcrs().map_err(fail("reading XCRs"))?;
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = xcr0;
        vcpu.set_xcrs(&xcrs).map_err(fail("setting XCR0"))?;
    }

    let msrs = Msrs::from_entries(&t.msrs).map_err(|_| ArchError::Msrs {
        vcpu: index,
        set: 0,
        wanted: t.msrs.len(),
        refused: 0,
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(fail("setting MSRs"))?;
    if set != t.msrs.len() {
        return Err(ArchError::Msrs {
            vcpu: index,
            set,
            wanted: t.msrs.len(),
            refused: t.msrs[set].index,
        });
    }

    vcpu.set_regs(&regs::boot_regs(t.entry))
        .map_err(fail("setting general registers"))?;
    let sregs = vcpu
        .get_sregs()
        .map_err(fail("reading special registers"))?;
    vcpu.set_sregs(&regs::boot_sregs(sregs))
        .map_err(fail("setting special registers"))?;
    vcpu.set_fpu(&regs::boot_fpu())
        .map_err(fail("setting the FPU"))?;
    let mut lapic = vcpu.get_lapic().map_err(fail("reading the local APIC"))?;
    regs::wire_lints(&mut lapic);
    vcpu.set_lapic(&lapic)
        .map_err(fail("setting the local APIC"))
}

/// The vCPU's registers in one line, for the log when the guest stops on a triple fault or KVM
/// cannot go on: where it was (RIP, RSP, CR2 for a page fault) and in which mode.
pub fn describe_registers(vcpu: &VcpuFd) -> String {
    let regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return format!("(registers unreadable: {e})"),
    };
    let sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return format!("(special registers unreadable: {e})"),
    };
    // KVM on AMD re-initialises the vCPU after a triple fault (its VMCB is undefined then)
    let reset = if regs.rip == 0xfff0 && sregs.cs.selector == 0xf000 {
        " (the reset state: KVM on AMD re-initialises a vCPU that triple-faulted, so where it \
         faulted is lost)"
    } else {
        ""
    };
    format!(
        "rip={:#x} rsp={:#x} rflags={:#x} rax={:#x} rdi={:#x} cr0={:#x} cr2={:#x} cr3={:#x} \
         cr4={:#x} efer={:#x} cs={:#x} idt={:#x}/{:#x} pending_interrupt={:x?}",
        regs.rip,
        regs.rsp,
        regs.rflags,
        regs.rax,
        regs.rdi,
        sregs.cr0,
        sregs.cr2,
        sregs.cr3,
        sregs.cr4,
        sregs.efer,
        sregs.cs.selector,
        sregs.idt.base,
        sregs.idt.limit,
        sregs.interrupt_bitmap,
    ) + reset
}

/// The vCPU's interrupt state in one line, for the dump of a deaf guest: whether it sleeps, whether
/// it takes interrupts (RFLAGS.IF, an interrupt shadow, one being injected), and which vectors its
/// local APIC holds requested (IRR) and in service (ISR: taken, waiting for the guest's EOI).
pub fn describe_interrupt_state(vcpu: &VcpuFd) -> String {
    let mp_state = match vcpu.get_mp_state() {
        Ok(kvm_mp_state { mp_state }) => match mp_state {
            KVM_MP_STATE_RUNNABLE => "runnable".to_string(),
            KVM_MP_STATE_HALTED => "halted".to_string(),
            KVM_MP_STATE_UNINITIALIZED => "not started".to_string(),
            KVM_MP_STATE_INIT_RECEIVED => "waiting for SIPI".to_string(),
            other => format!("mp_state {other}"),
        },
        Err(e) => format!("(mp_state unreadable: {e})"),
    };
    let regs = match vcpu.get_regs() {
        Ok(r) => format!(
            "rip={:#x} interrupts {}",
            r.rip,
            if r.rflags & RFLAGS_IF != 0 {
                "on"
            } else {
                "off"
            }
        ),
        Err(e) => format!("(registers unreadable: {e})"),
    };
    let events = match vcpu.get_vcpu_events() {
        Ok(ev) => format!(
            "injecting {}, interrupt shadow {}, nmi pending {} masked {}",
            if ev.interrupt.injected != 0 {
                format!("vector {:#x}", ev.interrupt.nr)
            } else {
                "nothing".to_string()
            },
            ev.interrupt.shadow,
            ev.nmi.pending,
            ev.nmi.masked
        ),
        Err(e) => format!("(events unreadable: {e})"),
    };
    let apic = match vcpu.get_lapic() {
        Ok(lapic) => {
            let bytes: Vec<u8> = lapic.regs.iter().map(|b| *b as u8).collect();
            format!(
                "local APIC tpr {:#x} ppr {:#x} irr {} isr {}",
                apic_register(&bytes, APIC_TPR),
                apic_register(&bytes, APIC_PPR),
                vectors(&apic_bitmap(&bytes, APIC_IRR)),
                vectors(&apic_bitmap(&bytes, APIC_ISR)),
            )
        }
        Err(e) => format!("(local APIC unreadable: {e})"),
    };
    format!("{mp_state}, {regs}, {events}; {apic}")
}

const RFLAGS_IF: u64 = 1 << 9;
const APIC_TPR: usize = 0x80;
const APIC_PPR: usize = 0xa0;
const APIC_ISR: usize = 0x100;
const APIC_IRR: usize = 0x200;

/// One 32-bit local APIC register from `KVM_GET_LAPIC`'s page image (little-endian, 16-byte
/// stride); 0 past its end.
fn apic_register(page: &[u8], offset: usize) -> u32 {
    page.get(offset..offset + 4)
        .map_or(0, |b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// The vectors set in a 256-bit local APIC bitmap (ISR, TMR, IRR): eight registers from `base`.
fn apic_bitmap(page: &[u8], base: usize) -> Vec<u8> {
    (0..8u8)
        .flat_map(|word| {
            let bits = apic_register(page, base + 0x10 * usize::from(word));
            (0..32u8)
                .filter(move |bit| bits & (1 << bit) != 0)
                .map(move |bit| word * 32 + bit)
        })
        .collect()
}

fn vectors(v: &[u8]) -> String {
    if v.is_empty() {
        return "none".into();
    }
    let v: Vec<String> = v.iter().map(|n| format!("{n:#x}")).collect();
    v.join(",")
}

/// The IOAPIC's pins that matter to a deaf guest (unmasked, or with a request latched), one line
/// each: vector, trigger, mask, remote IRR (a level interrupt the guest has not EOI'd) and whether
/// a request waits in the IOAPIC.
pub fn describe_ioapic(vm: &VmFd) -> String {
    let mut chip = kvm_irqchip {
        chip_id: KVM_IRQCHIP_IOAPIC,
        ..Default::default()
    };
    if let Err(e) = vm.get_irqchip(&mut chip) {
        return format!("(IOAPIC unreadable: {e})");
    }
    // SAFETY: KVM filled the union's ioapic member, as chip_id asked.
    let ioapic = unsafe { chip.chip.ioapic };
    let pins: Vec<String> = (0..ioapic.redirtbl.len())
        .filter_map(|pin| {
            // SAFETY: every member of the redirection entry union is a view of the same 64 bits.
            let bits = unsafe { ioapic.redirtbl[pin].bits };
            describe_ioapic_pin(pin, bits, ioapic.irr & (1 << pin) != 0)
        })
        .collect();
    if pins.is_empty() {
        return "IOAPIC: every pin masked".into();
    }
    format!("IOAPIC: {}", pins.join("; "))
}

/// One IOAPIC redirection entry (82093AA layout), or None for a masked pin with nothing latched.
fn describe_ioapic_pin(pin: usize, bits: u64, requested: bool) -> Option<String> {
    let masked = bits & (1 << 16) != 0;
    if masked && !requested {
        return None;
    }
    Some(format!(
        "pin {pin} vector {:#x} {}{}{}{}",
        bits & 0xff,
        if bits & (1 << 15) != 0 {
            "level"
        } else {
            "edge"
        },
        if masked { " masked" } else { "" },
        if bits & (1 << 14) != 0 {
            " remote-irr"
        } else {
            ""
        },
        if requested { " requested" } else { "" },
    ))
}

/// True when the vCPU sleeps in HLT with interrupts off (only an NMI or INIT wakes it: how Linux
/// without ACPI leaves a CPU after poweroff or halt) or was never started by the guest.
pub fn halted_for_good(vcpu: &VcpuFd) -> Result<bool, kvm_ioctls::Error> {
    let kvm_mp_state { mp_state } = vcpu.get_mp_state()?;
    match mp_state {
        KVM_MP_STATE_UNINITIALIZED | KVM_MP_STATE_INIT_RECEIVED => Ok(true),
        KVM_MP_STATE_HALTED => Ok(vcpu.get_regs()?.rflags & RFLAGS_IF == 0),
        _ => Ok(false),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn apic_bitmaps_read_as_the_vectors_they_hold() {
        let mut page = vec![0u8; 1024];
        // ISR: vector 0x21 (word 1, bit 1) and 0xef (word 7, bit 15)
        page[APIC_ISR + 0x10..APIC_ISR + 0x14].copy_from_slice(&(1u32 << 1).to_le_bytes());
        page[APIC_ISR + 0x70..APIC_ISR + 0x74].copy_from_slice(&(1u32 << 15).to_le_bytes());
        page[APIC_TPR] = 0x20;
        assert_eq!(apic_bitmap(&page, APIC_ISR), vec![0x21, 0xef]);
        assert_eq!(vectors(&apic_bitmap(&page, APIC_ISR)), "0x21,0xef");
        assert_eq!(vectors(&apic_bitmap(&page, APIC_IRR)), "none");
        assert_eq!(apic_register(&page, APIC_TPR), 0x20);
        assert_eq!(
            apic_register(&page[..2], APIC_TPR),
            0,
            "past the end reads 0"
        );
    }

    #[test]
    fn ioapic_pins_show_what_keeps_an_interrupt_from_the_guest() {
        let masked = 1 << 16;
        assert_eq!(describe_ioapic_pin(3, masked | 0x30, false), None);
        assert_eq!(
            describe_ioapic_pin(3, masked | 0x30, true).as_deref(),
            Some("pin 3 vector 0x30 edge masked requested")
        );
        assert_eq!(
            describe_ioapic_pin(5, (1 << 15) | (1 << 14) | 0x25, false).as_deref(),
            Some("pin 5 vector 0x25 level remote-irr")
        );
        assert_eq!(
            describe_ioapic_pin(4, 0x24, false).as_deref(),
            Some("pin 4 vector 0x24 edge")
        );
    }
}
