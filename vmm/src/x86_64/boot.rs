//! The zero page (`boot_params`) and e820 map of the Linux x86 boot protocol, and where the
//! initramfs goes. Pure functions, so the layout rules are tested without a VM.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};

use super::layout::{CMDLINE_START, EBDA_START, HIMEM_START, MMIO_GAP_END, MMIO_GAP_START};

pub const E820_RAM: u32 = 1;
const BOOT_FLAG: u16 = 0xaa55;
const HDRS_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id: Tapir has none assigned.
const LOADER_ID: u8 = 0xff;
const KERNEL_ALIGNMENT: u32 = 0x0100_0000;
const PAGE_SIZE: u64 = 0x1000;

/// Where the initramfs cannot go.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InitrdPlacementError {
    #[error(
        "initramfs of {size} bytes does not fit between the kernel's end at {kernel_end:#x} and \
         {top:#x}; give the VM more memory"
    )]
    TooLarge {
        size: u64,
        kernel_end: u64,
        top: u64,
    },
}

/// The e820 map for `mem_size` bytes of RAM laid out by `layout::ram_ranges`: base memory up to
/// the EBDA, then from 1 MiB to the MMIO gap, then above 4 GiB.
pub fn e820_map(mem_size: u64) -> Vec<boot_e820_entry> {
    let ram = |addr: u64, end: u64| boot_e820_entry {
        addr,
        size: end - addr,
        r#type: E820_RAM,
    };
    let low_end = mem_size.min(MMIO_GAP_START);
    let mut map = vec![ram(0, EBDA_START.min(low_end))];
    if low_end > HIMEM_START {
        map.push(ram(HIMEM_START, low_end));
    }
    if mem_size > MMIO_GAP_START {
        map.push(ram(MMIO_GAP_END, MMIO_GAP_END + mem_size - MMIO_GAP_START));
    }
    map
}

/// Where an initramfs of `size` bytes goes: as high as possible below `top` (the end of low RAM or
/// the kernel's `initrd_addr_max`), page aligned, and not below `kernel_end`.
pub fn initrd_address(size: u64, kernel_end: u64, top: u64) -> Result<u64, InitrdPlacementError> {
    top.checked_sub(size)
        .map(|start| start & !(PAGE_SIZE - 1))
        .filter(|start| *start >= kernel_end)
        .ok_or(InitrdPlacementError::TooLarge {
            size,
            kernel_end,
            top,
        })
}

/// The zero page: the kernel's own setup header when it has one (bzImage), the command line of
/// `cmdline_len` bytes (without NUL) at CMDLINE_START, the initramfs and the e820 map.
pub fn boot_params(
    header: Option<setup_header>,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
    mem_size: u64,
) -> boot_params {
    let mut params = boot_params::default();
    if let Some(header) = header {
        params.hdr = header;
    }
    params.hdr.type_of_loader = LOADER_ID;
    params.hdr.boot_flag = BOOT_FLAG;
    params.hdr.header = HDRS_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        // Both below 4 GiB: initrd_address keeps the initramfs under the MMIO gap.
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    let map = e820_map(mem_size);
    for (slot, entry) in params.e820_table.iter_mut().zip(&map) {
        *slot = *entry;
    }
    params.e820_entries = map.len() as u8;
    params
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans(map: &[boot_e820_entry]) -> Vec<(u64, u64)> {
        map.iter().map(|e| (e.addr, e.addr + e.size)).collect()
    }

    #[test]
    fn e820_covers_ram_and_skips_the_hole_and_gap() {
        assert_eq!(
            spans(&e820_map(256 << 20)),
            vec![(0, EBDA_START), (HIMEM_START, 256 << 20)]
        );
        assert_eq!(
            spans(&e820_map(MMIO_GAP_START)),
            vec![(0, EBDA_START), (HIMEM_START, MMIO_GAP_START)]
        );
        assert_eq!(
            spans(&e820_map(6 << 30)),
            vec![
                (0, EBDA_START),
                (HIMEM_START, MMIO_GAP_START),
                (1 << 32, (1 << 32) + (6 << 30) - MMIO_GAP_START)
            ]
        );
        let total: u64 = e820_map(6 << 30).iter().map(|e| e.size).sum();
        assert_eq!(total, (6 << 30) - (HIMEM_START - EBDA_START));
        assert!(e820_map(6 << 30).iter().all(|e| e.r#type == E820_RAM));
    }

    #[test]
    fn initrd_goes_high_and_page_aligned() {
        let top = 256 << 20;
        assert_eq!(initrd_address(0x1800, 0x200_0000, top), Ok(top - 0x2000));
        assert_eq!(initrd_address(0x2000, 0x200_0000, top), Ok(top - 0x2000));
        assert_eq!(
            initrd_address(top - 0x200_0000, 0x200_0000, top),
            Ok(0x200_0000)
        );
        assert_eq!(
            initrd_address(top, 0x200_0000, top),
            Err(InitrdPlacementError::TooLarge {
                size: top,
                kernel_end: 0x200_0000,
                top
            })
        );
        assert!(
            initrd_address(top + 1, 0, top).is_err(),
            "larger than all memory"
        );
    }

    #[test]
    fn zero_page_keeps_the_kernel_header_and_fills_ours() {
        let header = setup_header {
            setup_sects: 27,
            version: 0x020f,
            kernel_alignment: 0x20_0000,
            init_size: 0x123_4000,
            xloadflags: 1,
            ..Default::default()
        };
        let p = boot_params(Some(header), 42, Some((0x0ff0_0000, 0x1_0000)), 256 << 20);
        let hdr = p.hdr;
        assert_eq!(
            (hdr.setup_sects, hdr.version, hdr.init_size),
            (27, 0x020f, 0x123_4000)
        );
        assert_eq!(
            { hdr.kernel_alignment },
            0x20_0000,
            "the kernel's own alignment wins"
        );
        assert_eq!(
            (hdr.boot_flag, hdr.header, hdr.type_of_loader),
            (0xaa55, 0x5372_6448, 0xff)
        );
        assert_eq!(
            (hdr.cmd_line_ptr, hdr.cmdline_size),
            (CMDLINE_START as u32, 42)
        );
        assert_eq!(
            (hdr.ramdisk_image, hdr.ramdisk_size),
            (0x0ff0_0000, 0x1_0000)
        );
        assert_eq!(p.e820_entries, 2);

        let elf = boot_params(None, 0, None, 8 << 30);
        let hdr = elf.hdr;
        assert_eq!(
            (hdr.kernel_alignment, hdr.ramdisk_image, hdr.ramdisk_size),
            (KERNEL_ALIGNMENT, 0, 0)
        );
        assert_eq!(elf.e820_entries, 3);
    }
}
