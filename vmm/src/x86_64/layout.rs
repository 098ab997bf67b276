//! Where things live in guest-physical memory (x86_64 direct boot). One table, so the boot code,
//! the e820 map and the device manager agree.

/// GDT for the 64-bit entry.
pub const GDT_START: u64 = 0x500;
/// An empty IDT right after it.
pub const IDT_START: u64 = 0x520;
/// The zero page (`boot_params`) handed to the kernel in %rsi.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Identity page tables: PML4, one PDPT, and four page directories of 2 MiB pages (the first 4 GiB).
pub const PML4_START: u64 = 0x9000;
pub const PDPTE_START: u64 = 0xa000;
pub const PDE_START: u64 = 0xb000;
/// Page directories mapped, 1 GiB each.
pub const PDE_COUNT: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Longest command line Tapir writes, terminating NUL included; a bzImage may ask for less.
pub const CMDLINE_MAX_SIZE: usize = 4096;
/// The MP table sits in the last KiB of base memory, where Linux's MP scan looks.
pub const MPTABLE_START: u64 = 0x9fc00;
/// End of base memory (640 KiB) in the e820 map.
pub const EBDA_START: u64 = 0x9fc00;
/// Where a CPU starts after reset (f000:fff0), and where Linux jumps to reboot through the BIOS.
pub const RESET_VECTOR: u64 = 0xf_fff0;
/// Kernels load at 1 MiB and above.
pub const HIMEM_START: u64 = 0x10_0000;

/// The 32-bit MMIO gap below 4 GiB: LAPIC, IOAPIC and virtio-mmio devices live here, RAM does not.
pub const MMIO_GAP_START: u64 = 0xd000_0000;
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// virtio-mmio devices start at the bottom of the gap.
pub const MMIO_DEVICES_START: u64 = MMIO_GAP_START;
pub const IOAPIC_START: u64 = 0xfec0_0000;
pub const APIC_START: u64 = 0xfee0_0000;

/// Legacy ports and IRQs.
pub const COM1_PORT: u64 = 0x3f8;
pub const COM1_IRQ: u32 = 4;
pub const I8042_PORT: u64 = 0x60;
/// The test guest's boot-marker port (QEMU: `-device isa-debugcon,iobase=0x402`).
pub const DEBUG_PORT: u64 = 0x402;
/// What the test guest's init writes to the debug port once it runs.
pub const BOOT_MARKER: u8 = 0x54;

/// Guest RAM ranges for `mem_size` bytes: below the MMIO gap, and the rest above 4 GiB.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    if mem_size <= MMIO_GAP_START {
        vec![(0, mem_size)]
    } else {
        vec![
            (0, MMIO_GAP_START),
            (MMIO_GAP_END, mem_size - MMIO_GAP_START),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_mmio_gap() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(MMIO_GAP_START), vec![(0, MMIO_GAP_START)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, MMIO_GAP_START), (1 << 32, (4 << 30) - MMIO_GAP_START)]
        );
    }

    #[test]
    fn fixed_structures_do_not_overlap() {
        let mut spans = [
            (GDT_START, GDT_START + 4 * 8),
            (IDT_START, IDT_START + 8),
            (ZERO_PAGE_START, ZERO_PAGE_START + 0x1000),
            (BOOT_STACK_POINTER - 0x100, BOOT_STACK_POINTER),
            (PML4_START, PML4_START + 0x1000),
            (PDPTE_START, PDPTE_START + 0x1000),
            (PDE_START, PDE_START + PDE_COUNT * 0x1000),
            (CMDLINE_START, CMDLINE_START + CMDLINE_MAX_SIZE as u64),
            (MPTABLE_START, 0xa0000),
            (super::super::acpi::ACPI_START, super::super::acpi::ACPI_END),
            (
                RESET_VECTOR,
                RESET_VECTOR + super::super::RESET_STUB.len() as u64,
            ),
        ];
        spans.sort();
        for pair in spans.windows(2) {
            assert!(
                pair[0].1 <= pair[1].0,
                "{:x?} overlaps {:x?}",
                pair[0],
                pair[1]
            );
        }
        assert!(spans.last().unwrap().1 <= HIMEM_START);
    }
}
