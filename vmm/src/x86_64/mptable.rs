//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI learns its vCPUs, its
//! IOAPIC and how ISA interrupts are wired. Linux finds it by scanning the last KiB of base memory
//! for the floating pointer.

use super::layout::{APIC_START, IOAPIC_START, MPTABLE_START};

/// The table must fit in the KiB between MPTABLE_START and 640 KiB.
pub const MAX_VCPUS: u8 = 32;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
/// ISA interrupts wired straight to IOAPIC pins 0-15, as KVM's default routing does.
const ISA_IRQS: u8 = 16;
const HEADER_LEN: usize = 44;
const FLOATING_LEN: usize = 16;

const ENTRY_CPU: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IOINT: u8 = 3;
const ENTRY_LINT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;

/// Why a table could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MpTableError {
    #[error("the MP table supports 1 to {MAX_VCPUS} vCPUs, not {0}")]
    VcpuCount(u8),
}

/// The IOAPIC's APIC id: the first after the vCPUs'.
pub fn ioapic_id(vcpus: u8) -> u8 {
    vcpus
}

/// The bytes to write at MPTABLE_START for `vcpus` vCPUs with APIC ids 0..vcpus.
pub fn build(vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(MpTableError::VcpuCount(vcpus));
    }
    let ioapic = ioapic_id(vcpus);
    let mut entries = Vec::new();
    let mut count: u16 = 0;
    for id in 0..vcpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 };
        entries.extend([ENTRY_CPU, id, APIC_VERSION, flags]);
        // Signature: family 6; feature flags: FPU and APIC present.
        entries.extend(0x600u32.to_le_bytes());
        entries.extend(0x201u32.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, 0]);
    entries.extend(*b"ISA   ");
    count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic, IOAPIC_VERSION, 1]);
    entries.extend((IOAPIC_START as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // Type, flags (bus-default polarity and trigger), source bus 0, source IRQ, IOAPIC, pin.
        entries.extend([ENTRY_IOINT, INT_TYPE_INT, 0, 0, 0, irq, ioapic, irq]);
        count += 1;
    }
    // The 8259's output on every LAPIC's LINT0, NMI on LINT1.
    entries.extend([ENTRY_LINT, INT_TYPE_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend([ENTRY_LINT, INT_TYPE_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let table_start = MPTABLE_START + FLOATING_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut floating = Vec::with_capacity(FLOATING_LEN);
    floating.extend(*b"_MP_");
    floating.extend((table_start as u32).to_le_bytes());
    floating.extend([1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    floating[10] = checksum(&floating);

    let mut header = Vec::with_capacity(HEADER_LEN);
    header.extend(*b"PCMP");
    header.extend((table_len as u16).to_le_bytes());
    header.extend([SPEC_REV, 0]);
    header.extend(*b"TAPIR   ");
    header.extend(*b"TAPIR-VM    ");
    header.extend(0u32.to_le_bytes()); // no OEM table
    header.extend(0u16.to_le_bytes());
    header.extend(count.to_le_bytes());
    header.extend((APIC_START as u32).to_le_bytes());
    header.extend([0u8; 4]); // no extended entries
    let mut table = header;
    table.extend(entries);
    table[7] = checksum(&table);

    let mut out = floating;
    out.extend(table);
    Ok(out)
}

/// The byte that makes `bytes` sum to zero.
fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |sum, b| sum.wrapping_add(*b))
        .wrapping_neg()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(bytes: &[u8]) -> u8 {
        bytes.iter().fold(0u8, |s, b| s.wrapping_add(*b))
    }

    /// Parses what Linux's mpparse reads: the floating pointer, the header and its entries.
    fn parse(bytes: &[u8]) -> (Vec<(u8, u8)>, u8, usize) {
        assert_eq!(&bytes[..4], b"_MP_");
        assert_eq!(sum(&bytes[..16]), 0, "floating pointer checksum");
        let ptr = u32::from_le_bytes(bytes[4..8].try_into().unwrap()) as u64;
        let table = &bytes[(ptr - MPTABLE_START) as usize..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        let table = &table[..len];
        assert_eq!(sum(table), 0, "table checksum");
        let count = u16::from_le_bytes([table[34], table[35]]);
        let (mut cpus, mut ioapic, mut ints) = (Vec::new(), 0, 0);
        let mut at = HEADER_LEN;
        for _ in 0..count {
            match table[at] {
                ENTRY_CPU => {
                    cpus.push((table[at + 1], table[at + 3]));
                    at += 20;
                }
                ENTRY_IOAPIC => {
                    ioapic = table[at + 1];
                    at += 8;
                }
                ENTRY_IOINT | ENTRY_LINT => {
                    ints += 1;
                    at += 8;
                }
                ENTRY_BUS => at += 8,
                other => panic!("unknown entry {other}"),
            }
        }
        assert_eq!(at, len, "entry count matches the length");
        (cpus, ioapic, ints)
    }

    #[test]
    fn lists_every_vcpu_with_the_first_as_bsp() {
        for n in [1u8, 2, 4, 16, MAX_VCPUS] {
            let bytes = build(n).unwrap();
            let (cpus, ioapic, ints) = parse(&bytes);
            assert_eq!(cpus.len(), n as usize);
            assert_eq!(cpus[0], (0, CPU_ENABLED | CPU_BSP));
            assert!(cpus[1..]
                .iter()
                .enumerate()
                .all(|(i, c)| *c == (i as u8 + 1, CPU_ENABLED)));
            assert_eq!(ioapic, n);
            assert_eq!(ints, ISA_IRQS as usize + 2);
            assert!(
                MPTABLE_START + bytes.len() as u64 <= 0xa0000,
                "{n} vCPUs fit below 640 KiB"
            );
        }
    }

    #[test]
    fn vcpu_count_is_bounded() {
        assert_eq!(build(0), Err(MpTableError::VcpuCount(0)));
        assert_eq!(
            build(MAX_VCPUS + 1),
            Err(MpTableError::VcpuCount(MAX_VCPUS + 1))
        );
    }
}
