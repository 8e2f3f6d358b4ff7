//! The build-time check of the guest's CPL0 code: over an `objdump -d` listing of the code that runs
//! in the kernel (the PVH entry, the interrupt and system-call paths, the AP trampoline), refuse any
//! SSE/AVX/x87-state instruction (KVM-PVM's emulator cannot execute them), anything objdump cannot
//! decode, indirect branches, and direct branches that leave the CPL0 code. Pure: text in, findings out.

/// One instruction the check refuses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Address of the instruction.
    pub addr: u64,
    /// The instruction as objdump printed it.
    pub text: String,
    /// Why it is refused.
    pub why: &'static str,
}

/// Register names that only SSE/AVX/MMX/AVX-512 instructions use.
const VECTOR_REGS: [&str; 5] = ["%xmm", "%ymm", "%zmm", "%mm", "%k"];

/// Mnemonics without vector-register operands that still need SSE/x87 state or that the emulator
/// lacks.
const FORBIDDEN: [&str; 20] = [
    "movnti",
    "ldmxcsr",
    "stmxcsr",
    "vldmxcsr",
    "vstmxcsr",
    "fxsave",
    "fxsave64",
    "fxrstor",
    "fxrstor64",
    "xsave",
    "xsave64",
    "xsaveopt",
    "xsaveopt64",
    "xrstor",
    "xrstor64",
    "emms",
    "lfence",
    "mfence",
    "sfence",
    "cmpxchg16b",
];

/// Checks every instruction line of `listing`; `allowed` are the address ranges (start inclusive,
/// end exclusive) that branches may reach. Returns the refused instructions and the number checked.
pub fn check(listing: &str, allowed: &[(u64, u64)]) -> (Vec<Violation>, usize) {
    let mut out = Vec::new();
    let mut count = 0;
    for line in listing.lines() {
        let Some((addr, insn)) = parse_line(line) else {
            continue;
        };
        count += 1;
        let mut parts = insn.splitn(2, char::is_whitespace);
        let mnemonic = parts.next().unwrap_or("");
        let operands = parts.next().unwrap_or("").trim();
        let mut refuse = |why| {
            out.push(Violation {
                addr,
                text: insn.to_string(),
                why,
            })
        };
        if insn.contains("(bad)") {
            refuse("not decodable");
            continue;
        }
        if VECTOR_REGS.iter().any(|r| mentions_register(operands, r)) {
            refuse("uses a vector register (SSE/AVX/MMX)");
            continue;
        }
        let base = mnemonic.trim_end_matches(['q', 'l', 'w']);
        if FORBIDDEN.contains(&mnemonic) || FORBIDDEN.contains(&base) {
            refuse("instruction the KVM-PVM emulator cannot run");
            continue;
        }
        if mnemonic.starts_with('j') || mnemonic.starts_with("call") || mnemonic.starts_with("ljmp")
        {
            if operands.starts_with('*') {
                refuse("indirect branch");
                continue;
            }
            let target = if mnemonic.starts_with("ljmp") {
                operands.rsplit('$').next().and_then(parse_hex)
            } else {
                operands.split_whitespace().next().and_then(parse_hex)
            };
            match target {
                Some(t) if allowed.iter().any(|&(s, e)| (s..e).contains(&t)) => {}
                Some(_) => refuse("branch leaves the CPL0 code"),
                None => refuse("branch target not understood"),
            }
        }
    }
    (out, count)
}

/// Whether `operands` names a register beginning with `prefix` followed by a digit (`%k1`, `%xmm0`).
fn mentions_register(operands: &str, prefix: &str) -> bool {
    operands.match_indices(prefix).any(|(i, _)| {
        operands[i + prefix.len()..]
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_digit())
    })
}

fn parse_hex(s: &str) -> Option<u64> {
    u64::from_str_radix(s.trim().trim_start_matches("0x"), 16).ok()
}

/// Splits `  100002:\tmov    %ebx,%edi` into (0x100002, "mov    %ebx,%edi").
fn parse_line(line: &str) -> Option<(u64, &str)> {
    let (addr, rest) = line.split_once(':')?;
    let addr = addr.trim();
    if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit()) || !line.starts_with(' ') {
        return None;
    }
    let insn = rest.trim();
    if insn.is_empty() {
        return None;
    }
    Some((u64::from_str_radix(addr, 16).ok()?, insn))
}

/// Finds the address of `name` in an `objdump -t` symbol listing.
pub fn symbol(symtab: &str, name: &str) -> Option<u64> {
    symtab.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let addr = f.next()?;
        (l.split_whitespace().last()? == name)
            .then(|| u64::from_str_radix(addr, 16).ok())
            .flatten()
    })
}

/// Finds section `name` in an `objdump -h` listing; returns (start address, size).
pub fn section(headers: &str, name: &str) -> Option<(u64, u64)> {
    headers.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() >= 4 && f[1] == name && f[0].bytes().all(|b| b.is_ascii_digit()) {
            Some((
                u64::from_str_radix(f[3], 16).ok()?,
                u64::from_str_radix(f[2], 16).ok()?,
            ))
        } else {
            None
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK: &str = "\n0000000000100000 <x>:\n  100000:\tcli\n  100001:\tmov    %ebx,%edi\n  100003:\tjmp    100000 <x>\n  100005:\tiretq\n";

    #[test]
    fn clean_listing_passes_and_counts_instructions() {
        let (v, n) = check(OK, &[(0x100000, 0x100010)]);
        assert!(v.is_empty(), "{v:?}");
        assert_eq!(n, 4);
    }

    #[test]
    fn xmm_register_is_refused() {
        let l = "  100000:\txorps  %xmm0,%xmm0\n  100003:\tmovq   %mm1,%rax\n";
        let (v, _) = check(l, &[]);
        assert_eq!(v.len(), 2);
        assert!(v[0].why.contains("vector"));
    }

    #[test]
    fn fences_and_fxsave_are_refused() {
        let l = "  100000:\tmfence\n  100003:\tfxsaveq (%rax)\n  100006:\tmovnti %eax,(%rdx)\n";
        assert_eq!(check(l, &[]).0.len(), 3);
    }

    #[test]
    fn branch_out_of_cpl0_code_is_refused() {
        let l = "  100000:\tcall   104640 <user_entry>\n  100005:\tjmp    *%rax\n";
        let (v, _) = check(l, &[(0x100000, 0x100100)]);
        assert_eq!(v[0].why, "branch leaves the CPL0 code");
        assert_eq!(v[1].why, "indirect branch");
    }

    #[test]
    fn far_jump_target_is_checked() {
        let l = "  1005f5:\tljmpl  $0x18,$0x100008\n";
        assert!(check(l, &[(0x100000, 0x100100)]).0.is_empty());
        assert_eq!(check(l, &[(0x200000, 0x200100)]).0.len(), 1);
    }

    #[test]
    fn general_register_names_are_not_vector_registers() {
        let l = "  100000:\tmov    %r8,%rax\n  100003:\tmov    %ecx,%edx\n";
        assert!(check(l, &[]).0.is_empty());
    }

    #[test]
    fn sections_are_found_with_address_and_size() {
        let h = "Idx Name          Size      VMA               LMA               File off  Algn\n  0 .ktext        000005ec  0000000000100000  0000000000100000  00001000  2**4\n                  CONTENTS, ALLOC, LOAD, READONLY, CODE\n  1 .ktramp       00000026  00000000001005f0  00000000001005f0  000015f0  2**4\n";
        assert_eq!(section(h, ".ktext"), Some((0x100000, 0x5ec)));
        assert_eq!(section(h, ".ktramp"), Some((0x1005f0, 0x26)));
        assert_eq!(section(h, ".text"), None);
    }

    #[test]
    fn symbols_are_found_by_exact_name() {
        let t = "0000000000100065 l       .ktext\t0000000000000000 long64\n0000000000100000 g       .ktext\t0000000000000000 pvh_entry32\n";
        assert_eq!(symbol(t, "long64"), Some(0x100065));
        assert_eq!(symbol(t, "pvh_entry"), None);
    }
}
