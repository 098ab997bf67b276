//! The GDT for the 64-bit entry and the KVM segment registers built from it.

use kvm_bindings::kvm_segment;

/// Null, 64-bit code, data, TSS: the selectors the kernel's startup code expects (0x8, 0x10, 0x18).
pub const BOOT_GDT: [u64; 4] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];
pub const CODE_INDEX: usize = 1;
pub const DATA_INDEX: usize = 2;
pub const TSS_INDEX: usize = 3;

/// Packs a descriptor from its flags (access byte and the high flag nibble), base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    let (flags, base, limit) = (flags as u64, base as u64, limit as u64);
    ((base & 0xff00_0000) << (56 - 24))
        | ((flags & 0x0000_f0ff) << 40)
        | ((limit & 0x000f_0000) << (48 - 16))
        | ((base & 0x00ff_ffff) << 16)
        | (limit & 0x0000_ffff)
}

/// The KVM view of descriptor `index` of `table`.
pub fn segment(table: &[u64], index: usize) -> kvm_segment {
    let entry = table[index];
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let granular = (entry >> 55) & 1 == 1;
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0x000f_0000)) as u32;
    let limit = if granular {
        (raw_limit << 12) | 0xfff
    } else {
        raw_limit
    };
    let present = ((entry >> 47) & 1) as u8;
    kvm_segment {
        base,
        limit,
        selector: (index * 8) as u16,
        type_: ((entry >> 40) & 0xf) as u8,
        present,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: granular as u8,
        avl: ((entry >> 52) & 1) as u8,
        unusable: u8::from(present == 0),
        padding: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptors_decode_to_the_segments_long_mode_needs() {
        let code = segment(&BOOT_GDT, CODE_INDEX);
        assert_eq!(
            (code.selector, code.l, code.db, code.s, code.present),
            (0x8, 1, 0, 1, 1)
        );
        assert_eq!((code.type_, code.limit, code.base), (0xb, 0xffff_ffff, 0));
        let data = segment(&BOOT_GDT, DATA_INDEX);
        assert_eq!(
            (data.selector, data.l, data.db, data.type_),
            (0x10, 0, 1, 0x3)
        );
        let tss = segment(&BOOT_GDT, TSS_INDEX);
        assert_eq!((tss.selector, tss.s, tss.type_), (0x18, 0, 0xb));
        let null = segment(&BOOT_GDT, 0);
        assert_eq!((null.present, null.unusable), (0, 1));
    }

    #[test]
    fn base_and_limit_survive_packing() {
        let e = gdt_entry(0x4093, 0x1234_5678, 0xabcde);
        let s = segment(&[e], 0);
        assert_eq!((s.base, s.limit, s.g), (0x1234_5678, 0xabcde, 0));
    }
}
