//! CPUID as the guest sees it: KVM's supported set, shaped per vCPU so the topology matches the MP
//! table (one thread per core, all cores in one package), the hypervisor bit is on, and the leaves
//! the guest sizes its FPU state from agree with what KVM can save.
//!
//! Pure functions over `kvm_cpuid_entry2` slices, so each rule has a table test.

use kvm_bindings::kvm_cpuid_entry2;

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_INTEL: u32 = 0x4;
const LEAF_TOPOLOGY: u32 = 0xb;
const LEAF_XSAVE: u32 = 0xd;
const LEAF_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_EXT_FEATURES: u32 = 0x8000_0001;
const LEAF_EXT_SIZES: u32 = 0x8000_0008;

const ECX_TSC_DEADLINE: u32 = 1 << 24;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const EXT_ECX_CMP_LEGACY: u32 = 1 << 1;
const EXT_ECX_TOPOEXT: u32 = 1 << 22;

const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// How one vCPU's CPUID is to be shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shape {
    /// This vCPU's (x2)APIC id, also its index.
    pub apic_id: u8,
    /// vCPUs in the VM, all cores of one package.
    pub vcpus: u8,
    /// KVM can emulate the TSC-deadline timer (KVM_CAP_TSC_DEADLINE_TIMER).
    pub tsc_deadline: bool,
}

/// Bits needed to number `n` items (ceil(log2 n)).
fn width(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `entries` (KVM's supported CPUID) for the vCPU described by `shape`.
pub fn shape(entries: &mut [kvm_cpuid_entry2], shape: Shape) {
    let apic = u32::from(shape.apic_id);
    let n = u32::from(shape.vcpus);
    let xcr0 = supported_xcr0(entries);
    for e in entries.iter_mut() {
        match e.function {
            LEAF_FEATURES => {
                // APIC id, logical processors per package, CLFLUSH line size (8 x 8 bytes).
                e.ebx = (apic << 24) | (n << 16) | (8 << 8) | (e.ebx & 0xff);
                e.ecx |= ECX_HYPERVISOR;
                if shape.tsc_deadline {
                    e.ecx |= ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !ECX_TSC_DEADLINE;
                }
                if n > 1 {
                    e.edx |= EDX_HTT;
                } else {
                    e.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_INTEL => {
                // Cores per package - 1 in 31:26; caches above L2 shared by all vCPUs, L1/L2 private.
                let level = (e.eax >> 5) & 0x7;
                let sharing = if level >= 3 { n - 1 } else { 0 };
                e.eax = (e.eax & 0x3fff) | (sharing << 14) | ((n - 1) << 26);
            }
            LEAF_TOPOLOGY | LEAF_TOPOLOGY_V2 => {
                let (eax, ebx, level_type) = match e.index {
                    0 => (0, 1, LEVEL_SMT),
                    1 => (width(n), n, LEVEL_CORE),
                    _ => (0, 0, 0),
                };
                e.eax = eax;
                e.ebx = ebx;
                e.ecx = (level_type << 8) | (e.index & 0xff);
                e.edx = apic;
            }
            // A state component KVM cannot save must not be described.
            LEAF_XSAVE if e.index >= 2 && e.index < 63 && xcr0 & (1u64 << e.index) == 0 => {
                (e.eax, e.ebx, e.ecx, e.edx) = (0, 0, 0, 0);
            }
            LEAF_EXT_FEATURES => {
                // No TOPOEXT: the guest takes the core count from 0x80000008 instead of leaves
                // 0x8000001d/1e, which KVM copies from the host's topology.
                e.ecx &= !EXT_ECX_TOPOEXT;
                if n > 1 {
                    e.ecx |= EXT_ECX_CMP_LEGACY;
                } else {
                    e.ecx &= !EXT_ECX_CMP_LEGACY;
                }
            }
            LEAF_EXT_SIZES => {
                // AMD: APIC-id bits for cores in 15:12, cores - 1 in 7:0.
                e.ecx = (width(n) << 12) | (n - 1);
            }
            _ => {}
        }
    }
}

/// The XCR0 bits KVM supports, from leaf 0xD sub-leaf 0.
pub fn supported_xcr0(entries: &[kvm_cpuid_entry2]) -> u64 {
    entries
        .iter()
        .find(|e| e.function == LEAF_XSAVE && e.index == 0)
        .map_or(0, |e| u64::from(e.eax) | (u64::from(e.edx) << 32))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32, regs: [u32; 4]) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0x1, 0, [0x00a2_0f12, 0x0b10_0800, 0x0000_0001, 0x0000_0001]),
            entry(0x4, 0, [0x0400_0121, 0, 0, 0]),
            entry(0x4, 3, [0x0400_0163, 0, 0, 0]),
            entry(0xb, 0, [1, 2, 0x100, 7]),
            entry(0xb, 1, [7, 96, 0x201, 7]),
            entry(0xb, 2, [0, 0, 2, 7]),
            entry(0xd, 0, [0x7, 0x340, 0x988, 0]),
            entry(0xd, 1, [0xf, 0, 0, 0]),
            entry(0xd, 2, [0x100, 0x240, 0, 0]),
            entry(0xd, 17, [0x40, 0xac0, 0x2, 0]),
            entry(
                0x4000_0000,
                0,
                [0x4000_0001, 0x4b4d_564b, 0x564b_4d56, 0x4d],
            ),
            entry(0x8000_0001, 0, [0, 0, EXT_ECX_TOPOEXT, 0]),
            entry(0x8000_0008, 0, [0x3030, 0, 0x705f, 0]),
        ]
    }

    fn get(e: &[kvm_cpuid_entry2], function: u32, index: u32) -> [u32; 4] {
        let e = e
            .iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap();
        [e.eax, e.ebx, e.ecx, e.edx]
    }

    fn shaped(apic_id: u8, vcpus: u8) -> Vec<kvm_cpuid_entry2> {
        let mut e = host();
        shape(
            &mut e,
            Shape {
                apic_id,
                vcpus,
                tsc_deadline: true,
            },
        );
        e
    }

    #[test]
    fn leaf_1_carries_apic_id_count_and_hypervisor_bit() {
        let e = shaped(3, 4);
        let [_, ebx, ecx, edx] = get(&e, 1, 0);
        assert_eq!(ebx >> 24, 3);
        assert_eq!((ebx >> 16) & 0xff, 4);
        assert_eq!((ebx >> 8) & 0xff, 8);
        assert_ne!(ecx & ECX_HYPERVISOR, 0);
        assert_ne!(ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(edx & EDX_HTT, 0);

        let mut one = host();
        shape(
            &mut one,
            Shape {
                apic_id: 0,
                vcpus: 1,
                tsc_deadline: false,
            },
        );
        let [_, ebx, ecx, edx] = get(&one, 1, 0);
        assert_eq!(((ebx >> 24), (ebx >> 16) & 0xff), (0, 1));
        assert_eq!((ecx & ECX_TSC_DEADLINE, edx & EDX_HTT), (0, 0));
    }

    #[test]
    fn topology_leaf_describes_one_thread_per_core_and_n_cores() {
        for (n, bits) in [
            (1u8, 0u32),
            (2, 1),
            (3, 2),
            (4, 2),
            (5, 3),
            (16, 4),
            (32, 5),
        ] {
            let e = shaped(n - 1, n);
            assert_eq!(
                get(&e, 0xb, 0),
                [0, 1, 0x100, u32::from(n) - 1],
                "{n} vCPUs, SMT level"
            );
            assert_eq!(
                get(&e, 0xb, 1),
                [bits, u32::from(n), 0x201, u32::from(n) - 1],
                "{n} vCPUs, core level"
            );
            assert_eq!(
                get(&e, 0xb, 2),
                [0, 0, 2, u32::from(n) - 1],
                "{n} vCPUs, end of levels"
            );
        }
    }

    #[test]
    fn intel_cache_leaf_counts_cores_and_sharing() {
        let e = shaped(0, 4);
        let l1 = get(&e, 4, 0)[0];
        let l3 = get(&e, 4, 3)[0];
        assert_eq!((l1 >> 26, (l1 >> 14) & 0xfff, l1 & 0x3fff), (3, 0, 0x121));
        assert_eq!((l3 >> 26, (l3 >> 14) & 0xfff), (3, 3));
    }

    #[test]
    fn xsave_components_kvm_cannot_save_are_hidden() {
        let e = shaped(0, 1);
        assert_eq!(
            get(&e, 0xd, 2),
            [0x100, 0x240, 0, 0],
            "AVX state is in XCR0 (bit 2)"
        );
        assert_eq!(get(&e, 0xd, 17), [0, 0, 0, 0], "AMX tile data is not");
        assert_eq!(
            get(&e, 0xd, 0),
            [0x7, 0x340, 0x988, 0],
            "sub-leaf 0 is KVM's"
        );
    }

    #[test]
    fn amd_leaves_count_cores_without_topoext() {
        let e = shaped(1, 6);
        let ext = get(&e, 0x8000_0001, 0)[2];
        assert_eq!(ext & EXT_ECX_TOPOEXT, 0);
        assert_ne!(ext & EXT_ECX_CMP_LEGACY, 0);
        assert_eq!(get(&e, 0x8000_0008, 0)[2], (3 << 12) | 5);
    }

    #[test]
    fn kvm_paravirt_leaves_are_kept() {
        let e = shaped(0, 2);
        assert_eq!(get(&e, 0x4000_0000, 0), get(&host(), 0x4000_0000, 0));
    }
}
