//! Saved state of a VM, apart from the live objects: what a snapshot or a live migration carries.
//!
//! Every part has a typed `…State` struct (the devices' own in their `persist` modules, see
//! [`crate::persist`]); [`VmState`] is the one aggregate. [`crate::Vm::save_state`] fills it
//! while the VM is paused and [`crate::Vm::restore_state`] checks all of it against the VM
//! before it puts any of it back. [`encode`] and [`decode`]
//! give the binary form snapshots and live migration carry: a header (magic, format version,
//! length, crc32c) and a compact binary body (bincode, no JSON). A decoder never trusts the
//! length or the checksum it has not verified.

use crate::devices::serial::persist::SerialDeviceState;
use crate::devices::virtio_blk::persist::VirtioBlkState;
use crate::persist::VcpuStateError;
use bincode::Options;
use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
};
use serde::{Deserialize, Serialize};

/// The MSRs saved with each vCPU (those of them KVM lists are saved).
pub const SAVED_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0x1a0,       // MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRRdefType
    0x6e0,       // TSC_DEADLINE
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SYSCALL_MASK
    0xc000_0102, // KERNEL_GS_BASE
    0xc000_0103, // TSC_AUX
    0x4b56_4d00, // KVM wall clock (new)
    0x4b56_4d01, // KVM system time (new)
    0x4b56_4d02, // KVM async PF
    0x4b56_4d03, // KVM steal time
    0x4b56_4d04, // KVM PV EOI
];

/// The legacy x87/SSE register view (`KVM_GET_FPU`), mirrored so that it can be serialized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// One vCPU's architectural state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// The vCPU's index (its APIC ID).
    pub id: u8,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment and control registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state (legacy view; XSAVE carries the full state).
    pub fpu: FpuState,
    /// The XSAVE area (KVM_GET_XSAVE's 4 KiB region).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// The saved MSRs.
    pub msrs: Vec<kvm_msr_entry>,
    /// The local APIC.
    pub lapic: kvm_lapic_state,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI…
    pub mp_state: kvm_mp_state,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The CPUID set the vCPU was given.
    pub cpuid: Vec<kvm_cpuid_entry2>,
}

/// Words in KVM's XSAVE area (`kvm_xsave::region`).
pub const XSAVE_WORDS: usize = 1024;

impl VcpuState {
    /// Checks that this state fits vCPU `index` of a VM whose KVM saves the MSRs `msrs`.
    pub fn check(&self, index: usize, msrs: &[u32]) -> Result<(), VcpuStateError> {
        if usize::from(self.id) != index {
            return Err(VcpuStateError::Id { found: self.id });
        }
        if self.xsave.len() > XSAVE_WORDS {
            return Err(VcpuStateError::Xsave {
                words: self.xsave.len(),
                max: XSAVE_WORDS,
            });
        }
        if let Some(m) = self.msrs.iter().find(|m| !msrs.contains(&m.index)) {
            return Err(VcpuStateError::Msr { index: m.index });
        }
        Ok(())
    }
}

impl std::fmt::Debug for VcpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VcpuState")
            .field("id", &self.id)
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("mp_state", &self.mp_state.mp_state)
            .field("msrs", &self.msrs.len())
            .finish_non_exhaustive()
    }
}

/// The in-kernel interrupt controllers: two 8259 PICs and the IOAPIC.
#[derive(Clone, Serialize, Deserialize)]
pub struct IrqchipState {
    /// The master PIC (chip 0).
    pub pic_master: kvm_irqchip,
    /// The slave PIC (chip 1).
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC (chip 2).
    pub ioapic: kvm_irqchip,
}

impl std::fmt::Debug for IrqchipState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IrqchipState").finish_non_exhaustive()
    }
}

/// The in-kernel PIT.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct PitState(pub kvm_pit_state2);

/// The VM's kvmclock.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct ClockState(pub kvm_clock_data);

/// The state of every device.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesState {
    /// COM1's registers and partial output line.
    pub serial: SerialDeviceState,
    /// Each virtio-blk device, with its slot.
    pub blocks: Vec<(usize, VirtioBlkState)>,
    /// Each virtio-net device, with its slot.
    pub nets: Vec<(usize, crate::devices::virtio_net::VirtioNetState)>,
}

/// The whole VM's state, taken while it is paused (guest memory apart).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// PICs and IOAPIC.
    pub irqchip: IrqchipState,
    /// The PIT.
    pub pit: PitState,
    /// kvmclock.
    pub clock: ClockState,
    /// Devices.
    pub devices: DevicesState,
    /// Host wall-clock time (CLOCK_REALTIME, ns) when the state was taken. The restore moves the
    /// guest's TSC and kvmclock forward by the time that passed since, so guest time keeps real
    /// time across a snapshot or a migration: no jump backwards, no frozen clock.
    pub saved_at_realtime_ns: u64,
}

/// The format version of [`encode`]'s output. Version 2 added each disk's capacity and offered
/// features to its state and keeps the queue in one struct; version 1 states are refused.
pub const STATE_VERSION: u32 = 2;
/// The magic that opens an encoded state.
pub const STATE_MAGIC: [u8; 8] = *b"TERNVMST";
/// Header bytes: magic, version (u32), body length (u64), crc32c of the body (u32).
pub const STATE_HEADER_BYTES: usize = 8 + 4 + 8 + 4;
/// The largest body [`decode`] accepts.
pub const MAX_STATE_BYTES: u64 = 64 << 20;

/// Why an encoded state was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum StateDecodeError {
    /// Shorter than its header or its stated length.
    #[error("saved state is truncated ({have} bytes, {need} needed)")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: u64,
    },
    /// Not a Tern VM state.
    #[error("not a Tern VM state (bad magic)")]
    Magic,
    /// A format this build does not read.
    #[error("saved state format {0} is not supported (this build reads format {STATE_VERSION})")]
    Version(u32),
    /// Longer than [`MAX_STATE_BYTES`].
    #[error("saved state claims {0} bytes, more than the {MAX_STATE_BYTES} allowed")]
    TooLong(u64),
    /// The checksum does not match.
    #[error("saved state checksum mismatch (corrupted)")]
    Checksum,
    /// The body does not decode.
    #[error("saved state body is malformed: {0}")]
    Body(String),
}

/// The host's CLOCK_REALTIME in nanoseconds.
pub fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

/// Encodes a state: header, then the bincode body.
pub fn encode(state: &VmState) -> Vec<u8> {
    let body = bincode::serialize(state).unwrap_or_default();
    let mut out = Vec::with_capacity(STATE_HEADER_BYTES + body.len());
    out.extend_from_slice(&STATE_MAGIC);
    out.extend_from_slice(&STATE_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
    out
}

/// Decodes what [`encode`] wrote; returns the state and the bytes consumed.
pub fn decode(bytes: &[u8]) -> Result<(VmState, usize), StateDecodeError> {
    if bytes.len() < STATE_HEADER_BYTES {
        return Err(StateDecodeError::Truncated {
            have: bytes.len(),
            need: STATE_HEADER_BYTES as u64,
        });
    }
    if bytes[..8] != STATE_MAGIC {
        return Err(StateDecodeError::Magic);
    }
    let word = |a: usize| u32::from_le_bytes([bytes[a], bytes[a + 1], bytes[a + 2], bytes[a + 3]]);
    let version = word(8);
    if version != STATE_VERSION {
        return Err(StateDecodeError::Version(version));
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[12..20]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_STATE_BYTES {
        return Err(StateDecodeError::TooLong(len));
    }
    let end = STATE_HEADER_BYTES as u64 + len;
    if (bytes.len() as u64) < end {
        return Err(StateDecodeError::Truncated {
            have: bytes.len(),
            need: end,
        });
    }
    let body = &bytes[STATE_HEADER_BYTES..end as usize];
    if crc32c::crc32c(body) != word(20) {
        return Err(StateDecodeError::Checksum);
    }
    let state = bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .allow_trailing_bytes()
        .with_limit(MAX_STATE_BYTES)
        .deserialize(body)
        .map_err(|e| StateDecodeError::Body(e.to_string()))?;
    Ok((state, end as usize))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio_mmio::QueueState;
    use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry};
    use proptest::prelude::*;
    use vm_superio::serial::SerialState;

    fn any_vcpu() -> impl Strategy<Value = VcpuState> {
        (
            any::<u8>(),
            proptest::collection::vec(any::<u64>(), 18),
            proptest::collection::vec(any::<u64>(), 8),
            proptest::collection::vec(any::<u32>(), 0..1024),
            proptest::collection::vec((any::<u32>(), any::<u64>()), 0..40),
            proptest::collection::vec(any::<u8>(), 1024),
            (any::<u32>(), any::<u8>(), any::<u64>(), any::<u64>()),
            proptest::collection::vec(any::<[u32; 6]>(), 0..80),
        )
            .prop_map(
                |(id, r, sr, xsave, msrs, lapic, (mp, ev, dr6, xcr0), cpuid)| {
                    let mut s = VcpuState {
                        id,
                        regs: kvm_regs {
                            rax: r[0],
                            rbx: r[1],
                            rcx: r[2],
                            rdx: r[3],
                            rsi: r[4],
                            rdi: r[5],
                            rsp: r[6],
                            rbp: r[7],
                            r8: r[8],
                            r9: r[9],
                            r10: r[10],
                            r11: r[11],
                            r12: r[12],
                            r13: r[13],
                            r14: r[14],
                            r15: r[15],
                            rip: r[16],
                            rflags: r[17],
                        },
                        sregs: kvm_sregs::default(),
                        fpu: (&kvm_fpu::default()).into(),
                        xsave,
                        xcrs: kvm_xcrs::default(),
                        msrs: msrs
                            .into_iter()
                            .map(|(index, data)| kvm_msr_entry {
                                index,
                                data,
                                ..Default::default()
                            })
                            .collect(),
                        lapic: kvm_lapic_state::default(),
                        events: kvm_vcpu_events::default(),
                        mp_state: kvm_mp_state { mp_state: mp },
                        debugregs: kvm_debugregs::default(),
                        cpuid: cpuid
                            .into_iter()
                            .map(|e| kvm_cpuid_entry2 {
                                function: e[0],
                                index: e[1],
                                eax: e[2],
                                ebx: e[3],
                                ecx: e[4],
                                edx: e[5],
                                ..Default::default()
                            })
                            .collect(),
                    };
                    s.sregs.cr0 = sr[0];
                    s.sregs.cr3 = sr[1];
                    s.sregs.cr4 = sr[2];
                    s.sregs.efer = sr[3];
                    s.sregs.cs.base = sr[4];
                    s.sregs.gdt.base = sr[5];
                    s.sregs.apic_base = sr[6];
                    s.fpu.mxcsr = sr[7] as u32;
                    s.fpu.xmm[3] = sr[7].to_le_bytes().repeat(2).try_into().unwrap();
                    for (d, b) in s.lapic.regs.iter_mut().zip(lapic) {
                        *d = b as libc::c_char;
                    }
                    s.events.exception.injected = ev;
                    s.events.interrupt.nr = ev;
                    s.debugregs.dr6 = dr6;
                    s.debugregs.db[2] = dr6 ^ xcr0;
                    s.xcrs.nr_xcrs = 1;
                    s.xcrs.xcrs[0].value = xcr0;
                    s
                },
            )
    }

    fn any_state() -> impl Strategy<Value = VmState> {
        (
            proptest::collection::vec(any_vcpu(), 1..4),
            any::<[u8; 9]>(),
            proptest::collection::vec(any::<u8>(), 0..64),
            proptest::collection::vec((any::<usize>(), any::<[u64; 4]>()), 0..3),
            (any::<u64>(), any::<u32>(), any::<u64>(), any::<u8>()),
        )
            .prop_map(|(vcpus, sr, inbuf, blocks, (clock, flags, at, chip))| {
                let mut irq = kvm_irqchip {
                    chip_id: 2,
                    ..Default::default()
                };
                // Writing a union field is safe; the IOAPIC view is plain integers.
                irq.chip.ioapic.base_address = u64::from(chip);
                let mut pit = kvm_pit_state2::default();
                pit.channels[0].count = flags;
                pit.flags = flags;
                VmState {
                    vcpus,
                    irqchip: IrqchipState {
                        pic_master: kvm_irqchip::default(),
                        pic_slave: kvm_irqchip {
                            chip_id: 1,
                            ..Default::default()
                        },
                        ioapic: irq,
                    },
                    pit: PitState(pit),
                    clock: ClockState(kvm_clock_data {
                        clock,
                        flags,
                        ..Default::default()
                    }),
                    devices: DevicesState {
                        serial: SerialDeviceState {
                            baud_divisor_low: sr[0],
                            baud_divisor_high: sr[1],
                            interrupt_enable: sr[2],
                            interrupt_identification: sr[3],
                            line_control: sr[4],
                            line_status: sr[5],
                            modem_control: sr[6],
                            modem_status: sr[7],
                            scratch: sr[8],
                            pending_output: inbuf.iter().rev().copied().collect(),
                            in_buffer: inbuf,
                        },
                        blocks: blocks
                            .into_iter()
                            .map(|(slot, w)| {
                                (
                                    slot,
                                    VirtioBlkState {
                                        capacity_sectors: w[0] ^ w[1],
                                        device_features: w[3] ^ w[1],
                                        status: w[0] as u32,
                                        driver_features: w[1],
                                        device_features_sel: (w[0] >> 32) as u32,
                                        driver_features_sel: w[2] as u32,
                                        interrupt_status: (w[2] >> 32) as u32,
                                        queue_sel: w[3] as u32,
                                        queue: QueueState {
                                            size: (w[3] >> 32) as u16,
                                            ready: w[3] & 1 == 1,
                                            desc_table: w[1] ^ w[2],
                                            avail_ring: w[2] ^ w[3],
                                            used_ring: w[0] ^ w[3],
                                            next_avail: (w[1] >> 48) as u16,
                                            next_used: (w[2] >> 48) as u16,
                                        },
                                    },
                                )
                            })
                            .collect(),
                        nets: vec![],
                    },
                    saved_at_realtime_ns: at,
                }
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        #[test]
        fn every_state_struct_round_trips_through_the_binary_encoding(s in any_state()) {
            let bytes = encode(&s);
            let (back, used) = decode(&bytes).unwrap();
            prop_assert_eq!(used, bytes.len());
            // Every field, compared through a second encoding (the KVM structs hold unions).
            prop_assert_eq!(encode(&back), bytes);
            prop_assert_eq!(back.vcpus.len(), s.vcpus.len());
            for (a, b) in back.vcpus.iter().zip(&s.vcpus) {
                prop_assert_eq!(a.regs, b.regs);
                prop_assert_eq!(&a.xsave, &b.xsave);
                prop_assert_eq!(a.fpu, b.fpu);
                prop_assert_eq!(a.msrs.len(), b.msrs.len());
                prop_assert_eq!(a.sregs.cr3, b.sregs.cr3);
                prop_assert_eq!(a.lapic.regs.to_vec(), b.lapic.regs.to_vec());
                prop_assert_eq!(a.mp_state.mp_state, b.mp_state.mp_state);
                prop_assert_eq!(a.debugregs.dr6, b.debugregs.dr6);
                prop_assert_eq!(a.cpuid.len(), b.cpuid.len());
            }
            prop_assert_eq!(&back.devices.serial, &s.devices.serial);
            prop_assert_eq!(&back.devices.blocks, &s.devices.blocks);
            prop_assert_eq!(back.clock.0.clock, s.clock.0.clock);
            prop_assert_eq!(back.pit.0.channels[0].count, s.pit.0.channels[0].count);
            prop_assert_eq!(back.saved_at_realtime_ns, s.saved_at_realtime_ns);
        }

        #[test]
        fn any_damaged_byte_is_caught(s in any_state(), at in any::<prop::sample::Index>(), x in 1u8..) {
            let mut bytes = encode(&s);
            let i = at.index(bytes.len());
            bytes[i] ^= x;
            prop_assert!(decode(&bytes).is_err());
        }

        #[test]
        fn random_bytes_never_panic_the_decoder(b in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&b);
            let mut with_header = STATE_MAGIC.to_vec();
            with_header.extend_from_slice(&STATE_VERSION.to_le_bytes());
            with_header.extend_from_slice(&(b.len() as u64).to_le_bytes());
            with_header.extend_from_slice(&crc32c::crc32c(&b).to_le_bytes());
            with_header.extend_from_slice(&b);
            let _ = decode(&with_header);
        }
    }

    #[test]
    fn other_versions_and_truncations_are_refused_with_a_reason() {
        let s = VmState {
            vcpus: vec![],
            irqchip: IrqchipState {
                pic_master: kvm_irqchip::default(),
                pic_slave: kvm_irqchip::default(),
                ioapic: kvm_irqchip::default(),
            },
            pit: PitState(kvm_pit_state2::default()),
            clock: ClockState(kvm_clock_data::default()),
            devices: DevicesState {
                serial: (&SerialState::default()).into(),
                blocks: vec![],
                nets: vec![],
            },
            saved_at_realtime_ns: 1,
        };
        let mut b = encode(&s);
        assert!(matches!(
            decode(&b[..b.len() - 1]),
            Err(StateDecodeError::Truncated { .. })
        ));
        b[8] = 1;
        assert_eq!(decode(&b).unwrap_err(), StateDecodeError::Version(1));
        assert_eq!(
            StateDecodeError::Version(1).to_string(),
            "saved state format 1 is not supported (this build reads format 2)"
        );
        b[0] = b'X';
        assert_eq!(decode(&b).unwrap_err(), StateDecodeError::Magic);
    }

    #[test]
    fn vcpu_states_of_another_vcpu_or_with_unknown_msrs_do_not_fit() {
        let mut v = VcpuState {
            id: 1,
            regs: kvm_regs::default(),
            sregs: kvm_sregs::default(),
            fpu: (&kvm_fpu::default()).into(),
            xsave: vec![0; XSAVE_WORDS],
            xcrs: kvm_xcrs::default(),
            msrs: vec![kvm_msr_entry {
                index: 0x10,
                ..Default::default()
            }],
            lapic: kvm_lapic_state::default(),
            events: kvm_vcpu_events::default(),
            mp_state: kvm_mp_state::default(),
            debugregs: kvm_debugregs::default(),
            cpuid: vec![],
        };
        assert_eq!(v.check(1, &[0x10, 0x1b]), Ok(()));
        assert_eq!(v.check(0, &[0x10]), Err(VcpuStateError::Id { found: 1 }));
        assert_eq!(
            v.check(1, &[0x1b]),
            Err(VcpuStateError::Msr { index: 0x10 })
        );
        v.xsave.push(0);
        assert_eq!(
            v.check(1, &[0x10]),
            Err(VcpuStateError::Xsave {
                words: XSAVE_WORDS + 1,
                max: XSAVE_WORDS
            })
        );
    }
}
