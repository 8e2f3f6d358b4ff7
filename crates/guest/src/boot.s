# The CPL0 part of the Tern test guest: every instruction here runs in KVM-PVM's instruction emulator,
# so it is short, in assembly, and free of SSE/AVX (the build checks the .ktext and .ktramp sections).
#
#   pvh_entry32   PVH entry (32-bit protected mode, paging off, %ebx = hvm_start_info)
#   ap_tramp_*    real-mode AP trampoline, copied below 1 MiB by the BSP and started with INIT-SIPI-SIPI
#   common32      both: load our GDT, enable PAE + long mode with prebuilt identity page tables
#   long64        per-CPU: kernel stack, TSS (RSP0 + I/O bitmap), IDT, GS base, then iretq to CPL3
#   isr_*         interrupts: LAPIC timer EOI, the `int 0x80` system call (arrives as #UD or #GP),
#                 and every other exception, redirected to the CPL3 fault reporter
#
# System calls (`int 0x80`, %rax = number, arguments %rdi, %rsi, result %rax):
#   1 rdmsr(msr)          2 wrmsr(msr, value)
#   3 sleep(deadline, count): arm the LAPIC timer (TSC-deadline %rdi if %rsi == 0, else one-shot with
#     initial count %rsi), then sti; hlt; cli once and return (the caller re-checks the time)
#   4 stop: cli; hlt forever
#   5 cpuid(leaf, subleaf): %rax = eax | ebx << 32, %rdx = ecx | edx << 32. CPUID must run here: at
#     CPL3 it is not intercepted on KVM-PVM and would answer with the host's own CPUID.

.set MAX_CPUS, 32
.set KSTACK, 16384
.set USTACK, 65536
.set TSS_STRIDE, 304
.set NVEC, 48
.set TIMER_VEC, 32
.set SPURIOUS_VEC, 47

# ----------------------------------------------------------------------------------------- PVH note
# XEN_ELFNOTE_PHYS32_ENTRY: QEMU reads the descriptor as 8 bytes, linux-loader as 4 (little-endian).
.section .note.Xen, "a", @note
.balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .quad pvh_entry32

# ---------------------------------------------------------------------------------------------- entry
.section .ktext, "ax"
.code32
.globl pvh_entry32
pvh_entry32:
    cli
    cld
    mov %ebx, %edi
    xor %esi, %esi
    jmp common32

.globl ap_entry32
ap_entry32:
    cli
    cld
    mov $0x10, %eax             # %ds still holds the trampoline's real-mode base
    mov %eax, %ds
    mov ap_boot_cpu, %esi
    xor %edi, %edi

common32:
    lgdt gdt_ptr
    ljmp $0x18, $1f
1:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    mov %eax, %fs
    mov %eax, %gs
    mov %cr4, %eax
    or $0x620, %eax
    mov %eax, %cr4
    mov $pml4, %eax
    mov %eax, %cr3
    mov $0xC0000080, %ecx
    rdmsr
    or $0x100, %eax
    wrmsr
    mov %cr0, %eax
    and $0xfffffffb, %eax
    or $0x80000023, %eax
    mov %eax, %cr0
    ljmp $0x08, $long64

.code64
.globl long64
long64:
    mov $0x10, %eax
    mov %eax, %ds
    mov %eax, %es
    mov %eax, %ss
    xor %eax, %eax
    mov %eax, %fs
    mov %eax, %gs

    # kernel stack: kstacks + (cpu + 1) * KSTACK
    lea 1(%rsi), %eax
    shl $14, %eax
    lea kstacks(%rip), %rsp
    add %rax, %rsp

    # TSS descriptor for this CPU at gdt_tss + cpu * 16, for the TSS at tss_array + cpu * TSS_STRIDE
    imul $TSS_STRIDE, %esi, %eax
    lea tss_array(%rip), %rdx
    add %rax, %rdx
    mov %esi, %ecx
    shl $4, %ecx
    lea gdt_tss(%rip), %r8
    add %rcx, %r8
    mov %edx, %eax
    and $0xffff, %eax
    shl $16, %rax
    or $(TSS_STRIDE - 8), %rax
    mov %rdx, %rcx
    shr $16, %rcx
    and $0xff, %ecx
    shl $32, %rcx
    or %rcx, %rax
    mov $0x89, %ecx
    shl $40, %rcx
    or %rcx, %rax
    mov %rdx, %rcx
    shr $24, %rcx
    and $0xff, %ecx
    shl $56, %rcx
    or %rcx, %rax
    mov %rax, (%r8)
    mov %rdx, %rcx
    shr $32, %rcx
    mov %rcx, 8(%r8)
    mov %esi, %eax
    shl $4, %eax
    add $0x30, %eax
    ltr %ax

    test %esi, %esi
    jnz 2f
    call build_idt
2:
    lidt idt_ptr(%rip)

    # GS base = percpu + cpu * 16 (cpu index, fault stack top), readable at CPL3 through %gs
    mov %esi, %eax
    shl $4, %eax
    lea percpu(%rip), %rdx
    add %rdx, %rax
    mov %rax, %rdx
    shr $32, %rdx
    mov $0xC0000101, %ecx
    wrmsr

    # to CPL3: user_entry(cpu, start_info) on this CPU's user stack. Interrupts stay off at CPL3:
    # they are taken only inside the sleep system call (sti; hlt).
    lea 1(%rsi), %eax
    shl $16, %eax
    lea ustacks(%rip), %rdx
    add %rdx, %rax
    sub $8, %rax
    pushq $0x23
    push %rax
    pushq $0x2
    pushq $0x2b
    lea user_entry(%rip), %rax
    push %rax
    xchg %esi, %edi
    iretq

build_idt:
    lea idt(%rip), %r9
    lea isr_stubs(%rip), %r10
    xor %ecx, %ecx
3:
    mov %r10, %rax
    mov %ax, (%r9)
    movw $0x08, 2(%r9)
    movw $0x8e00, 4(%r9)
    shr $16, %rax
    mov %ax, 6(%r9)
    shr $16, %rax
    mov %eax, 8(%r9)
    movl $0, 12(%r9)
    add $16, %r9
    add $16, %r10
    inc %ecx
    cmp $NVEC, %ecx
    jb 3b
    ret

# ----------------------------------------------------------------------------------------- interrupts
.balign 16
isr_stubs:
.set vec, 0
.rept NVEC
    .balign 16
    .if vec == 8 || vec == 10 || vec == 11 || vec == 12 || vec == 13 || vec == 14 || vec == 17 || vec == 21 || vec == 29 || vec == 30
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
.endr

# stack: vector, error code, rip, cs, rflags, rsp, ss
isr_common:
    cmpq $TIMER_VEC, (%rsp)
    je isr_timer
    cmpq $SPURIOUS_VEC, (%rsp)
    je isr_return
    cmpq $6, (%rsp)
    je isr_maybe_syscall
    cmpq $13, (%rsp)
    je isr_maybe_syscall
    jmp isr_fault

isr_timer:
    push %rax
    push %rcx
    push %rdx
    mov $0x80b, %ecx
    xor %eax, %eax
    xor %edx, %edx
    wrmsr
    pop %rdx
    pop %rcx
    pop %rax
isr_return:
    add $16, %rsp
    iretq

isr_maybe_syscall:
    # only from CPL3, and only when the faulting instruction is `int 0x80` (cd 80)
    testq $3, 24(%rsp)
    jz isr_fault
    push %rax
    mov 24(%rsp), %rax
    cmpw $0x80cd, (%rax)
    pop %rax
    jne isr_fault
    addq $2, 16(%rsp)
    push %rcx
    push %rdx
    cmp $1, %rax
    je sys_rdmsr
    cmp $2, %rax
    je sys_wrmsr
    cmp $3, %rax
    je sys_sleep
    cmp $4, %rax
    je sys_stop
    cmp $5, %rax
    je sys_cpuid
    mov $-1, %rax
    jmp sys_return

sys_rdmsr:
    mov %edi, %ecx
    rdmsr
    shl $32, %rdx
    or %rdx, %rax
    jmp sys_return

sys_wrmsr:
    mov %edi, %ecx
    mov %rsi, %rax
    mov %rsi, %rdx
    shr $32, %rdx
    wrmsr
    xor %eax, %eax
    jmp sys_return

sys_sleep:
    test %rsi, %rsi
    jnz 4f
    mov $0x6e0, %ecx
    mov %rdi, %rax
    mov %rdi, %rdx
    shr $32, %rdx
    wrmsr
    jmp 5f
4:
    mov $0x838, %ecx
    mov %esi, %eax
    xor %edx, %edx
    wrmsr
5:
    sti
    hlt
    cli
    xor %eax, %eax
    jmp sys_return

sys_cpuid:
    push %rbx
    mov %edi, %eax
    mov %esi, %ecx
    cpuid
    shl $32, %rbx
    or %rbx, %rax
    shl $32, %rdx
    mov %ecx, %ecx
    or %rcx, %rdx
    pop %rbx
    mov %rdx, (%rsp)
    jmp sys_return

sys_stop:
    cli
    hlt
    jmp sys_stop

sys_return:
    pop %rdx
    pop %rcx
    add $16, %rsp
    iretq

isr_fault:
    # Report at CPL3: user_fault(vector, error, rip, cr2) on this CPU's fault stack, interrupts off.
    mov (%rsp), %rdi
    mov 8(%rsp), %rsi
    mov 16(%rsp), %rdx
    mov %cr2, %rcx
    add $16, %rsp
    lea user_fault(%rip), %rax
    mov %rax, (%rsp)
    movq $0x2b, 8(%rsp)
    movq $0x2, 16(%rsp)
    mov %gs:8, %rax
    mov %rax, 24(%rsp)
    movq $0x23, 32(%rsp)
    iretq
.globl cpl0_text_end
cpl0_text_end:

# ------------------------------------------------------------------------------------ AP trampoline
# Copied to AP_TRAMPOLINE (0x8000) and entered in real mode at CS = 0x0800, IP = 0.
.section .ktramp, "ax"
.code16
.globl ap_tramp_start
ap_tramp_start:
    cli
    mov %cs, %ax
    mov %ax, %ds
    lgdtl (tramp_gdt_ptr - ap_tramp_start)
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $0x18, $ap_entry32
.globl ap_tramp_code_end
ap_tramp_code_end:
.balign 8
tramp_gdt_ptr:
    .word gdt_end - gdt - 1
    .long gdt
.globl ap_tramp_end
ap_tramp_end:
.code64

# ---------------------------------------------------------------------------------------------- data
.section .kdata, "aw"
.balign 16
gdt:
    .quad 0
    .quad 0x00AF9A000000FFFF    # 0x08 kernel code, 64-bit
    .quad 0x00CF92000000FFFF    # 0x10 kernel data
    .quad 0x00CF9A000000FFFF    # 0x18 kernel code, 32-bit
    .quad 0x00CFF2000000FFFF    # 0x20 user data (selector 0x23)
    .quad 0x00AFFA000000FFFF    # 0x28 user code, 64-bit (selector 0x2b)
gdt_tss:                        # 0x30 + 16 * cpu: one TSS descriptor per CPU
    .fill MAX_CPUS * 2, 8, 0
gdt_end:

.balign 16
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
.balign 16
idt_ptr:
    .word NVEC * 16 - 1
    .quad idt

.balign 16
.globl ap_boot_cpu
ap_boot_cpu:
    .long 0

.balign 16
percpu:
.set i, 0
.rept MAX_CPUS
    .quad i
    .quad ustacks + (i + 1) * USTACK - 8
    .set i, i + 1
.endr

# One TSS per CPU: RSP0 = its kernel stack, and an I/O permission bitmap covering ports 0-0x5ff that
# lets CPL3 reach COM1 (0x3f8-0x3ff), the i8042 command port (0x64) and the exit port (0x501).
.balign 16
tss_array:
.set i, 0
.rept MAX_CPUS
    .long 0
    .quad kstacks + (i + 1) * KSTACK
    .fill 88, 1, 0
    .word 0
    .word 104
    .fill 12, 1, 0xff
    .byte 0xef
    .fill 114, 1, 0xff
    .byte 0x00
    .fill 32, 1, 0xff
    .byte 0xfd
    .fill 31, 1, 0xff
    .byte 0xff
    .fill 7, 1, 0
    .set i, i + 1
.endr

.balign 16
idt:
    .fill NVEC * 16, 1, 0

# Identity map of the first 16 GiB (MAP_GIB) with 2 MiB pages, user-accessible (the workloads run at
# CPL3 and drive devices directly); the GiB below 4 GiB (MMIO: virtio-mmio, LAPIC) uncached. RAM above
# the 32-bit MMIO hole (a guest of more than 3 GiB) is mapped too, for the memory writer's buffer.
.set MAP_GIB, 16
.balign 4096
.globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
pdpt:
.set i, 0
.rept MAP_GIB
    .quad pd + i * 0x1000 + 0x7
    .set i, i + 1
.endr
    .fill 512 - MAP_GIB, 8, 0
pd:
.set i, 0
.rept MAP_GIB * 512
    .if i < 1536 || i >= 2048
    .quad (i << 21) | 0x87
    .else
    .quad (i << 21) | 0x9f
    .endif
    .set i, i + 1
.endr

.section .bss
.balign 4096
kstacks:
    .skip MAX_CPUS * KSTACK
.globl ustacks
ustacks:
    .skip MAX_CPUS * USTACK
