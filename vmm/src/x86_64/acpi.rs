//! ACPI tables for kernels that want them, as stock distribution kernels do: Debian's loads
//! virtio_mmio as a module without command-line devices, so its NICs must be described in a DSDT,
//! and its cloud flavour finds its vCPUs only in a MADT. Built with rust-vmm's `acpi_tables`:
//! an RSDP where Linux scans for it (the BIOS area at 0xe0000), an XSDT, a hardware-reduced FADT
//! with sleep control/status and reset registers on I/O ports, a MADT (one local APIC per vCPU and
//! the IOAPIC), and a DSDT with COM1 and one `LNRO0005` device per virtio-mmio window.
//!
//! Pure: [`build`] returns the bytes for [`ACPI_START`]; nothing here touches guest memory.

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{aml, Aml};
use tapir_devices::legacy::acpi_ports;

use super::layout::{APIC_START, COM1_IRQ, COM1_PORT, IOAPIC_START, RESET_VECTOR};
use super::mptable;

/// Where the tables go: the RSDP first, where Linux's scan of 0xe0000-0xfffff finds it.
pub const ACPI_START: u64 = 0xe_0000;
/// The region's end: the reset vector's stub follows.
pub const ACPI_END: u64 = RESET_VECTOR;
/// Hardware-reduced sleep registers (FADT SLEEP_CONTROL_REG / SLEEP_STATUS_REG) and the reset
/// register, one byte each on consecutive ports (the device's layout; 0x600 is clear of the ISA
/// and VGA ports a guest may probe).
pub const SLEEP_CONTROL_PORT: u16 = 0x600;
pub const SLEEP_STATUS_PORT: u16 = SLEEP_CONTROL_PORT + acpi_ports::SLEEP_STATUS as u16;
pub const RESET_PORT: u16 = SLEEP_CONTROL_PORT + acpi_ports::RESET as u16;
/// What the guest writes to [`RESET_PORT`] to reboot.
pub const RESET_VALUE: u8 = 1;
/// SLP_TYP of S5 (soft off), as `\_S5` announces it; the guest writes `SLP_EN | SLP_TYP << 2`.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Most virtio-mmio devices the DSDT names (VR00..VRFF).
pub const MAX_MMIO_DEVICES: usize = 256;

/// FADT IAPC_BOOT_ARCH (ACPI 6.4, 5.2.9.3): no legacy ISA devices or 8042 to enumerate, no VGA, no
/// MSI, no CMOS RTC (Linux's rtc_cmos spent 3 s probing the empty ports 0x70/0x71).
const IAPC_BOOT_ARCH: u16 = 1 << 2 | 1 << 3 | 1 << 5;

const OEM_ID: [u8; 6] = *b"TAPIR ";
const OEM_REVISION: u32 = 1;
const HYPERVISOR_ID: [u8; 8] = *b"TAPIRVMM";

/// A virtio-mmio window and its interrupt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioDevice {
    pub base: u64,
    pub len: u64,
    pub irq: u32,
}

/// Why the tables could not be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AcpiError {
    #[error("ACPI describes 1 to {max} vCPUs, not {0}", max = mptable::MAX_VCPUS)]
    VcpuCount(u8),
    #[error("the DSDT names at most {MAX_MMIO_DEVICES} virtio-mmio devices, not {0}")]
    DeviceCount(usize),
    #[error("virtio-mmio window {base:#x}+{len:#x} does not fit the 32-bit resource descriptor")]
    WindowOutOfRange { base: u64, len: u64 },
    #[error("the ACPI tables take {0} bytes, more than the {room} between 0xe0000 and the reset vector", room = ACPI_END - ACPI_START)]
    TooLarge(usize),
}

/// The DSDT's AML body: the devices and `\_S5`.
fn dsdt_body(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    // COM1: an 8250 on its ISA ports and IRQ.
    let (com1_io, com1_irq) = (
        aml::IO::new(COM1_PORT as u16, COM1_PORT as u16, 1, 8),
        aml::Interrupt::new(true, true, false, false, COM1_IRQ),
    );
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_io, &com1_irq]);
    let com1_hid = aml::EISAName::new("PNP0501");
    aml::Device::new(
        aml::Path::new("COM1"),
        vec![
            &aml::Name::new(aml::Path::new("_HID"), &com1_hid),
            &aml::Name::new(aml::Path::new("_UID"), &aml::ZERO),
            &aml::Name::new(aml::Path::new("_CRS"), &com1_crs),
        ],
    )
    .to_aml_bytes(&mut body);
    // Not the i8042: Tapir's answers only the reset command, and Linux's i8042 driver, given a
    // PNP0303 device, spent a second probing it and failed ("Can't read CTR"). Without one, and
    // with the FADT's IAPC_BOOT_ARCH saying there is no 8042, the driver leaves it alone; a reboot
    // through the keyboard controller (reboot=k) still reaches it.
    for (i, d) in devices.iter().enumerate() {
        let (Ok(base), Ok(len)) = (u32::try_from(d.base), u32::try_from(d.len)) else {
            return Err(AcpiError::WindowOutOfRange {
                base: d.base,
                len: d.len,
            });
        };
        if base.checked_add(len).is_none() {
            return Err(AcpiError::WindowOutOfRange {
                base: d.base,
                len: d.len,
            });
        }
        // irqfds are edge-triggered
        let (window, irq) = (
            aml::Memory32Fixed::new(true, base, len),
            aml::Interrupt::new(true, true, false, false, d.irq),
        );
        let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
        let uid = u32::try_from(i).unwrap_or(u32::MAX);
        aml::Device::new(
            aml::Path::new(&format!("VR{i:02X}")),
            vec![
                &aml::Name::new(aml::Path::new("_HID"), &"LNRO0005"),
                &aml::Name::new(aml::Path::new("_UID"), &uid),
                &aml::Name::new(aml::Path::new("_CCA"), &aml::ONE),
                &aml::Name::new(aml::Path::new("_CRS"), &crs),
            ],
        )
        .to_aml_bytes(&mut body);
    }
    let s5 = aml::Package::new(vec![&S5_SLEEP_TYPE, &S5_SLEEP_TYPE, &0u8, &0u8]);
    aml::Name::new(aml::Path::new("_S5_"), &s5).to_aml_bytes(&mut body);
    Ok(body)
}

fn io_register(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(port),
    )
}

fn bytes(table: &dyn Aml) -> Vec<u8> {
    let mut out = Vec::new();
    table.to_aml_bytes(&mut out);
    out
}

/// Appends `table` to `image` (at `ACPI_START + image.len()`, 8-byte aligned) and returns its
/// guest-physical address.
fn place(image: &mut Vec<u8>, table: &[u8]) -> u64 {
    image.resize(image.len().next_multiple_of(8), 0);
    let addr = ACPI_START + image.len() as u64;
    image.extend_from_slice(table);
    addr
}

/// The tables for `vcpus` vCPUs (APIC ids 0..vcpus, the IOAPIC's id after them, as in the MP
/// table) and `devices`, as one image to write at [`ACPI_START`].
pub fn build(vcpus: u8, devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    if vcpus == 0 || vcpus > mptable::MAX_VCPUS {
        return Err(AcpiError::VcpuCount(vcpus));
    }
    if devices.len() > MAX_MMIO_DEVICES {
        return Err(AcpiError::DeviceCount(devices.len()));
    }
    // The RSDP's room first; its XSDT address is known last.
    let mut image = vec![0u8; Rsdp::len()];

    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"TAPIRDSD", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices)?);
    let dsdt_addr = place(&mut image, dsdt.as_slice());

    let mut fadt = FADTBuilder::new(OEM_ID, *b"TAPIRFAC", OEM_REVISION)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::ResetRegSup)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .dsdt_64(dsdt_addr);
    fadt.sleep_control_reg = io_register(SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_register(SLEEP_STATUS_PORT);
    fadt.reset_reg = io_register(RESET_PORT);
    fadt.reset_value = RESET_VALUE;
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_ID).into();
    let fadt_addr = place(&mut image, &bytes(&fadt.finalize()));

    let mut madt = MADT::new(
        OEM_ID,
        *b"TAPIRMAD",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_START as u32),
    );
    for id in 0..vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(
        mptable::ioapic_id(vcpus),
        IOAPIC_START as u32,
        0,
    ));
    let madt_addr = place(&mut image, &bytes(&madt));

    let mut xsdt = XSDT::new(OEM_ID, *b"TAPIRXSD", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt_addr = place(&mut image, &bytes(&xsdt));

    image[..Rsdp::len()].copy_from_slice(&bytes(&Rsdp::new(OEM_ID, xsdt_addr)));
    if ACPI_START + image.len() as u64 > ACPI_END {
        return Err(AcpiError::TooLarge(image.len()));
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEVICES: [MmioDevice; 2] = [
        MmioDevice {
            base: 0xd000_0000,
            len: 0x1000,
            irq: 5,
        },
        MmioDevice {
            base: 0xd000_1000,
            len: 0x1000,
            irq: 6,
        },
    ];

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr` in `image`, checked: signature and a zero byte sum.
    fn table<'a>(image: &'a [u8], addr: u64, signature: &[u8; 4]) -> &'a [u8] {
        let at = usize::try_from(addr - ACPI_START).unwrap();
        let len = u32_at(image, at + 4) as usize;
        let t = &image[at..at + len];
        assert_eq!(&t[..4], signature);
        assert_eq!(
            t.iter().fold(0u8, |a, b| a.wrapping_add(*b)),
            0,
            "{} checksum",
            String::from_utf8_lossy(signature)
        );
        t
    }

    fn find(hay: &[u8], needle: &[u8]) -> usize {
        hay.windows(needle.len()).filter(|w| *w == needle).count()
    }

    #[test]
    fn the_rsdp_leads_through_the_xsdt_to_every_table() {
        let image = build(2, &DEVICES).unwrap();
        let rsdp = &image[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[15], 2, "revision 2: XSDT");
        let sum = |b: &[u8]| b.iter().fold(0u8, |a, x| a.wrapping_add(*x));
        assert_eq!(sum(&rsdp[..20]), 0);
        assert_eq!(sum(rsdp), 0);
        let xsdt = table(&image, u64_at(rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64_at(c, 0)).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&image, entries[0], b"FACP");
        table(&image, entries[1], b"APIC");
        table(&image, u64_at(fadt, 140), b"DSDT");
        assert!(ACPI_START + image.len() as u64 <= ACPI_END);
    }

    #[test]
    fn the_fadt_is_hardware_reduced_with_io_port_sleep_and_reset_registers() {
        let image = build(1, &DEVICES).unwrap();
        let xsdt = table(&image, u64_at(&image, 24), b"XSDT");
        let fadt = table(&image, u64_at(xsdt, 36), b"FACP");
        let flags = u32_at(fadt, 112);
        assert_ne!(flags & (1 << 20), 0, "HW_REDUCED_ACPI");
        assert_ne!(flags & (1 << 10), 0, "RESET_REG_SUP");
        // Generic address structures: space 1 (I/O), 8 bits wide, byte access, the port.
        let gas = |at: usize| (fadt[at], fadt[at + 1], fadt[at + 3], u64_at(fadt, at + 4));
        assert_eq!(gas(116), (1, 8, 1, u64::from(RESET_PORT)), "RESET_REG");
        assert_eq!(fadt[128], RESET_VALUE);
        assert_eq!(gas(244), (1, 8, 1, u64::from(SLEEP_CONTROL_PORT)));
        assert_eq!(gas(256), (1, 8, 1, u64::from(SLEEP_STATUS_PORT)));
        assert_eq!(&fadt[268..276], b"TAPIRVMM", "hypervisor vendor identity");
        let boot_arch = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_eq!(boot_arch & 0b11, 0, "no legacy devices, no 8042");
        assert_ne!(boot_arch & (1 << 5), 0, "no CMOS RTC");
    }

    #[test]
    fn the_madt_lists_each_vcpu_and_the_ioapic_as_the_mp_table_does() {
        for vcpus in [1u8, 4, 32] {
            let image = build(vcpus, &[]).unwrap();
            let xsdt = table(&image, u64_at(&image, 24), b"XSDT");
            let madt = table(&image, u64_at(xsdt, 44), b"APIC");
            assert_eq!(u32_at(madt, 36), APIC_START as u32);
            let mut at = 44;
            let mut apics = Vec::new();
            let mut ioapic = None;
            while at < madt.len() {
                let (kind, len) = (madt[at], madt[at + 1] as usize);
                match kind {
                    0 => {
                        assert_eq!(u32_at(madt, at + 4), 1, "enabled");
                        apics.push(madt[at + 3]);
                    }
                    1 => ioapic = Some((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
                    other => panic!("unexpected MADT structure {other}"),
                }
                at += len;
            }
            assert_eq!(apics, (0..vcpus).collect::<Vec<_>>());
            assert_eq!(
                ioapic,
                Some((mptable::ioapic_id(vcpus), IOAPIC_START as u32, 0))
            );
        }
    }

    #[test]
    fn the_dsdt_names_each_virtio_mmio_window_with_its_edge_triggered_interrupt() {
        let image = build(1, &DEVICES).unwrap();
        let xsdt = table(&image, u64_at(&image, 24), b"XSDT");
        let fadt = table(&image, u64_at(xsdt, 36), b"FACP");
        let dsdt = table(&image, u64_at(fadt, 140), b"DSDT");
        assert_eq!(find(dsdt, b"LNRO0005\0"), 2);
        for (name, d) in [(b"VR00", DEVICES[0]), (b"VR01", DEVICES[1])] {
            assert_eq!(find(dsdt, name), 1);
            // Memory32Fixed: tag 0x86, length 9, read-write, base, length
            let mut mem = vec![0x86, 9, 0, 1];
            mem.extend((d.base as u32).to_le_bytes());
            mem.extend((d.len as u32).to_le_bytes());
            assert_eq!(find(dsdt, &mem), 1);
            // Extended interrupt: tag 0x89, length 6, consumer + edge, active high, exclusive, one
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend(d.irq.to_le_bytes());
            assert_eq!(find(dsdt, &irq), 1);
        }
        assert_eq!(find(dsdt, b"COM1"), 1);
        assert_eq!(find(dsdt, b"PNP0303"), 0, "no i8042 for Linux to probe");
        assert_eq!(find(dsdt, b"_S5_"), 1);
    }

    /// ACPICA's own disassembler reads every table back without an error or a warning.
    #[test]
    #[ignore = "needs iasl (Debian's acpica-tools, which scripts/test installs)"]
    fn iasl_disassembles_every_table_without_complaint() {
        let dir = std::env::temp_dir().join(format!("tapir-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let image = build(4, &DEVICES).unwrap();
        let xsdt_addr = u64_at(&image, 24);
        let xsdt = table(&image, xsdt_addr, b"XSDT");
        let fadt = table(&image, u64_at(xsdt, 36), b"FACP");
        let tables = [
            ("xsdt", xsdt),
            ("facp", fadt),
            ("apic", table(&image, u64_at(xsdt, 44), b"APIC")),
            ("dsdt", table(&image, u64_at(fadt, 140), b"DSDT")),
        ];
        for (name, bytes) in tables {
            let file = dir.join(format!("{name}.dat"));
            std::fs::write(&file, bytes).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&file)
                .output()
                .expect("running iasl (apt-get install acpica-tools)");
            let text = String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "iasl -d {name}: {text}");
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            for bad in ["Error", "Warning", "**** Unknown", "Invalid"] {
                assert!(
                    !dsl.contains(bad) && !text.contains(bad),
                    "iasl on {name}: {bad}\n{dsl}\n{text}"
                );
            }
            if name == "dsdt" {
                for want in [
                    "LNRO0005",
                    "PNP0501",
                    "Memory32Fixed (ReadWrite,",
                    "0xD0001000",
                    "_S5_",
                ] {
                    assert!(dsl.contains(want), "the DSDT lacks {want}:\n{dsl}");
                }
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn what_the_tables_cannot_describe_is_refused_by_name() {
        assert_eq!(build(0, &[]), Err(AcpiError::VcpuCount(0)));
        assert_eq!(build(33, &[]), Err(AcpiError::VcpuCount(33)));
        let many = vec![DEVICES[0]; MAX_MMIO_DEVICES + 1];
        assert_eq!(
            build(1, &many),
            Err(AcpiError::DeviceCount(MAX_MMIO_DEVICES + 1))
        );
        let high = MmioDevice {
            base: 0x1_0000_0000,
            len: 0x1000,
            irq: 5,
        };
        assert_eq!(
            build(1, &[high]),
            Err(AcpiError::WindowOutOfRange {
                base: high.base,
                len: high.len
            })
        );
        assert!(build(32, &vec![DEVICES[0]; MAX_MMIO_DEVICES]).is_ok());
    }
}
