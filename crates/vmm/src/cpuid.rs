//! The CPUID set a vCPU sees: the host's KVM-supported set, filtered, with Tern's own leaves.
//!
//! [`shape`] is pure; it takes KVM's supported entries and returns the set for one vCPU.

use kvm_bindings::kvm_cpuid_entry2;

/// Hypervisor leaf base (signature, maximum hypervisor leaf).
pub const LEAF_HYPERVISOR: u32 = 0x4000_0000;
/// Timing leaf: EAX = TSC frequency in kHz, EBX = local APIC bus frequency in kHz.
pub const LEAF_TIMING: u32 = 0x4000_0010;
/// KVM's local APIC timer runs at 1 GHz.
const APIC_BUS_KHZ: u32 = 1_000_000;

const LEAF1_ECX_X2APIC: u32 = 1 << 21;
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7 EDX bit 29: IA32_ARCH_CAPABILITIES. This machine's KVM refuses that MSR, so it is hidden.
const LEAF7_EDX_ARCH_CAPABILITIES: u32 = 1 << 29;

/// What shapes the CPUID set of one vCPU.
#[derive(Debug, Clone, Copy)]
pub struct CpuidParams {
    /// This vCPU's index (its APIC ID).
    pub vcpu_id: u8,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// The TSC frequency the guest should use, in kHz (from KVM_GET_TSC_KHZ).
    pub tsc_khz: u32,
}

fn find(
    entries: &mut [kvm_cpuid_entry2],
    function: u32,
    index: u32,
) -> Option<&mut kvm_cpuid_entry2> {
    entries
        .iter_mut()
        .find(|e| e.function == function && e.index == index)
}

fn upsert(entries: &mut Vec<kvm_cpuid_entry2>, entry: kvm_cpuid_entry2) {
    match find(entries, entry.function, entry.index) {
        Some(e) => *e = entry,
        None => entries.push(entry),
    }
}

/// Shapes KVM's supported CPUID entries into the set for one vCPU:
/// - leaf 1: the APIC ID and CPU count, x2APIC, TSC-deadline and hypervisor bits set;
/// - leaves 0xB/0x1F: this vCPU's x2APIC ID;
/// - leaf 7: IA32_ARCH_CAPABILITIES hidden;
/// - 0x40000000: KVM's signature kept, maximum hypervisor leaf raised to 0x40000010;
/// - 0x40000010: the TSC frequency in kHz and the APIC bus frequency.
pub fn shape(supported: &[kvm_cpuid_entry2], p: CpuidParams) -> Vec<kvm_cpuid_entry2> {
    let mut entries: Vec<kvm_cpuid_entry2> = supported.to_vec();
    if let Some(e) = find(&mut entries, 1, 0) {
        e.ecx |= LEAF1_ECX_X2APIC | LEAF1_ECX_TSC_DEADLINE | LEAF1_ECX_HYPERVISOR;
        e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(p.vcpus) << 16) | (u32::from(p.vcpu_id) << 24);
        // HTT: more than one logical processor.
        if p.vcpus > 1 {
            e.edx |= 1 << 28;
        }
    }
    if let Some(e) = find(&mut entries, 7, 0) {
        e.edx &= !LEAF7_EDX_ARCH_CAPABILITIES;
    }
    for e in entries.iter_mut() {
        if e.function == 0xb || e.function == 0x1f {
            e.edx = u32::from(p.vcpu_id);
        }
    }
    let mut hv = find(&mut entries, LEAF_HYPERVISOR, 0)
        .map(|e| *e)
        .unwrap_or(kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            // "KVMKVMKVM\0\0\0"
            ebx: 0x4b4d_564b,
            ecx: 0x564b_4d56,
            edx: 0x0000_004d,
            ..Default::default()
        });
    hv.eax = hv.eax.max(LEAF_TIMING);
    upsert(&mut entries, hv);
    upsert(
        &mut entries,
        kvm_cpuid_entry2 {
            function: LEAF_TIMING,
            eax: p.tsc_khz,
            ebx: APIC_BUS_KHZ,
            ..Default::default()
        },
    );
    entries
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ebx: 0x0008_0800,
            edx: u32::MAX,
            ..Default::default()
        }
    }

    #[test]
    fn timing_leaf_reports_the_tsc_frequency_and_is_reachable() {
        let out = shape(
            &[leaf(0, 0), leaf(1, 0)],
            CpuidParams {
                vcpu_id: 0,
                vcpus: 1,
                tsc_khz: 2_596_120,
            },
        );
        let hv = out.iter().find(|e| e.function == LEAF_HYPERVISOR).unwrap();
        assert!(hv.eax >= LEAF_TIMING);
        let t = out.iter().find(|e| e.function == LEAF_TIMING).unwrap();
        assert_eq!(t.eax, 2_596_120);
    }

    #[test]
    fn leaf1_advertises_x2apic_and_tsc_deadline_with_this_vcpus_apic_id() {
        let out = shape(
            &[leaf(1, 0), leaf(7, 0), leaf(0xb, 0), leaf(0xb, 1)],
            CpuidParams {
                vcpu_id: 3,
                vcpus: 4,
                tsc_khz: 1,
            },
        );
        let l1 = out.iter().find(|e| e.function == 1).unwrap();
        assert_ne!(l1.ecx & (1 << 21), 0);
        assert_ne!(l1.ecx & (1 << 24), 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "low bits (CLFLUSH size) kept");
        let l7 = out.iter().find(|e| e.function == 7).unwrap();
        assert_eq!(l7.edx & (1 << 29), 0);
        assert!(out.iter().filter(|e| e.function == 0xb).all(|e| e.edx == 3));
    }

    #[test]
    fn an_existing_kvm_signature_is_kept() {
        let kvm = kvm_cpuid_entry2 {
            function: LEAF_HYPERVISOR,
            eax: 0x4000_0001,
            ebx: 1,
            ecx: 2,
            edx: 3,
            ..Default::default()
        };
        let out = shape(
            &[kvm],
            CpuidParams {
                vcpu_id: 0,
                vcpus: 1,
                tsc_khz: 5,
            },
        );
        let hv: Vec<_> = out
            .iter()
            .filter(|e| e.function == LEAF_HYPERVISOR)
            .collect();
        assert_eq!(hv.len(), 1);
        assert_eq!((hv[0].ebx, hv[0].ecx, hv[0].edx), (1, 2, 3));
        assert_eq!(hv[0].eax, LEAF_TIMING);
    }
}
