//! Identity page tables for the 64-bit entry: the first 4 GiB in 2 MiB pages, enough for the kernel,
//! its zero page, command line and an initramfs anywhere below the MMIO gap. The kernel replaces
//! them with its own almost at once.

use super::layout::{PDE_COUNT, PDE_START, PDPTE_START, PML4_START};

const PRESENT_RW: u64 = 0x3;
const HUGE: u64 = 0x80;

/// The tables as (guest address, 512 entries) pages.
pub fn identity_tables() -> Vec<(u64, Vec<u64>)> {
    let mut pml4 = vec![0u64; 512];
    pml4[0] = PDPTE_START | PRESENT_RW;
    let mut pdpt = vec![0u64; 512];
    let mut pages = Vec::new();
    for dir in 0..PDE_COUNT {
        let pd_addr = PDE_START + dir * 0x1000;
        pdpt[dir as usize] = pd_addr | PRESENT_RW;
        let pd = (0..512u64)
            .map(|i| (((dir << 9) + i) << 21) | PRESENT_RW | HUGE)
            .collect();
        pages.push((pd_addr, pd));
    }
    let mut all = vec![(PML4_START, pml4), (PDPTE_START, pdpt)];
    all.extend(pages);
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Walks the tables like the MMU does for a 2 MiB page.
    fn translate(tables: &[(u64, Vec<u64>)], va: u64) -> Option<u64> {
        let page = |addr: u64| tables.iter().find(|(a, _)| *a == addr).map(|(_, p)| p);
        let pml4e = page(PML4_START)?[((va >> 39) & 0x1ff) as usize];
        let pdpte = page(pml4e & !0xfff)?
            .get(((va >> 30) & 0x1ff) as usize)
            .copied()?;
        if pdpte & 1 == 0 {
            return None;
        }
        let pde = page(pdpte & !0xfff)?[((va >> 21) & 0x1ff) as usize];
        (pde & HUGE != 0 && pde & 1 != 0).then_some((pde & !0x1f_ffff) | (va & 0x1f_ffff))
    }

    #[test]
    fn first_four_gib_are_identity_mapped() {
        let t = identity_tables();
        for va in [
            0,
            0x7000,
            0x100_0000,
            0x3fff_ffff,
            0x4000_0000,
            0xcfff_f000,
            0xffff_ffff,
        ] {
            assert_eq!(translate(&t, va), Some(va), "{va:#x}");
        }
        assert_eq!(translate(&t, 0x1_0000_0000), None);
        assert!(t.iter().all(|(_, p)| p.len() == 512));
    }
}
