/*
 * Shared pieces of vmscope's x86_64 PVH test guests, included (".include")
 * by demo.S and idt.S. Assembled with plain GNU as (no C preprocessor), so
 * everything here is a GAS macro; nothing is emitted until a guest uses it.
 *
 * Boot conventions (identical for every guest that uses these macros):
 *   - ELF note "Xen"/18 (XEN_ELFNOTE_PHYS32_ENTRY) names pvh_entry. Its
 *     descriptor is 8 bytes (the 32-bit address zero-extended), as in Linux's
 *     64-bit vmlinux, because QEMU reads a pointer-sized value from ELF64
 *     notes. Readers should use the low 4 bytes.
 *   - ELF note "vmscope"/1, no descriptor: every vCPU may start at the PVH
 *     entry at the same time (vmscope's VMM does that; QEMU starts only the
 *     boot CPU there, which is fine).
 *   - pvh_entry: 32-bit protected mode, paging off, flat CS/DS/ES/SS,
 *     interrupts off; %ebx (hvm_start_info) is ignored. No stack is needed.
 *   - start64: 64-bit entry for targets that cannot run the mode switch
 *     (the emulated CPU): long mode, first 1 GiB identity-mapped, interrupts
 *     off, no stack needed: the CPU first takes its index and switches to
 *     its own stack, then loads the guest's GDT (0x08 code, 0x10 data) and
 *     reloads every segment register, so any GDT and selectors will do.
 *   - Each CPU's index (0, 1, ... in start order, from `lock xadd`) stays
 *     in %ebx; tick(cpu) takes it in %edi (SysV ABI).
 */

        .equ COM1_DATA, 0x3f8
        .equ COM1_LSR, 0x3fd
        .equ LSR_THR_EMPTY, 0x20

        .equ GDT_CODE64, 0x08
        .equ GDT_DATA, 0x10

        .equ MSR_EFER, 0xc0000080
        .equ EFER_LME, 0x100
        .equ CR0_PE_PG, 0x80000001
        .equ CR4_PAE, 0x20

/* The two ELF notes every guest carries; section .note.vmscope is put into
 * a PT_NOTE segment (4-byte aligned, as QEMU's note walker pads names and
 * descriptors to the segment's alignment) by the linker script. */
.macro PVH_NOTES entry
        .pushsection .note.vmscope, "a", @note
        .balign 4
        .long 4                 /* namesz: "Xen\0" */
        .long 8                 /* descsz */
        .long 18                /* XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .quad \entry
        .balign 4
        .long 8                 /* namesz: "vmscope\0" */
        .long 0                 /* descsz */
        .long 1                 /* every vCPU starts at the PVH entry */
        .asciz "vmscope"
        .popsection
.endm

/* 32-bit code: identity-map the first GiB with 2 MiB pages, load a 64-bit
 * GDT, enable long mode and far-jump to \target. Several vCPUs may run this
 * at once: every store writes the value already there (or about to be), so
 * a CPU already in long mode never sees a changing page-table entry.
 * The tables (\pml4, \pdpt, \pd: 4 KiB aligned, 4 KiB each) live in .bss;
 * only entry 0 of the upper two levels is ever used. */
.macro ENTER_LONG_MODE pml4, pdpt, pd, gdt_ptr, target
        .code32
        cli
        cld
        movl $(\pdpt + 3), \pml4          /* present | writable */
        movl $0, \pml4 + 4
        movl $(\pd + 3), \pdpt
        movl $0, \pdpt + 4
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $21, %eax
        orl $0x83, %eax                   /* present | writable | 2 MiB page */
        movl %eax, \pd(,%ecx,8)
        movl $0, \pd + 4(,%ecx,8)
        incl %ecx
        cmpl $512, %ecx
        jne 1b

        lgdt \gdt_ptr
        movw $GDT_DATA, %ax
        movw %ax, %ds
        movw %ax, %es
        movw %ax, %ss
        movl $\pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $CR4_PAE, %eax
        movl %eax, %cr4
        movl $MSR_EFER, %ecx
        rdmsr
        orl $EFER_LME, %eax
        wrmsr
        movl %cr0, %eax
        orl $CR0_PE_PG, %eax
        movl %eax, %cr0
        ljmp $GDT_CODE64, $\target
        .code64
.endm

/* A GDT with a flat 64-bit code segment (0x08) and a flat data segment
 * (0x10), and the 10-byte pseudo-descriptor lgdt takes (in 32-bit mode only
 * the low 4 bytes of the base are used). */
.macro GDT64 gdt, gdt_ptr
        .balign 16
\gdt:
        .quad 0
        .quad 0x00af9a000000ffff
        .quad 0x00cf92000000ffff
\gdt_ptr:
        .word 3 * 8 - 1
        .quad \gdt
.endm

/* putc: write %al to COM1, waiting for the transmitter first (one port
 * read per byte; the write is the only other exit). Clobbers %edx, %ecx. */
.macro DEFINE_PUTC name
        .type \name, @function
\name:
        movl %eax, %ecx
        movw $COM1_LSR, %dx
1:      inb %dx, %al
        testb $LSR_THR_EMPTY, %al
        jz 1b
        movl %ecx, %eax
        movw $COM1_DATA, %dx
        outb %al, %dx
        ret
        .size \name, . - \name
.endm

/* 64-bit code run by start64 on every entry path: load the guest's own GDT
 * and reload every segment register from it, so the guest does not depend on
 * the GDT (or hidden segment state) whoever started it left behind. */
.macro LOAD_OWN_GDT gdt_ptr
        lgdt \gdt_ptr(%rip)
        pushq $GDT_CODE64
        leaq 1f(%rip), %rax
        pushq %rax
        lretq
1:      movl $GDT_DATA, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
.endm

/* Console routines: putc (%al), puts (%rsi -> NUL-terminated string),
 * put_dec (%eax < 100) and announce, which prints "<prefix>N up\n" for the
 * CPU index in %ebx. CPUs announce in index order: CPU N waits until \turn
 * (a 4-byte word in .data that starts at 0) equals N, prints, then passes
 * the turn on. Lines never interleave, their order is deterministic, and
 * no read-modify-write has to be atomic (only the CPU whose turn it is
 * writes \turn), so it also holds on targets that interleave CPUs between
 * instructions without a shared exclusive monitor. */
.macro DEFINE_CONSOLE prefix, suffix, turn
        DEFINE_PUTC putc

        .type puts, @function
puts:
        movzbl (%rsi), %eax
        testl %eax, %eax
        jz 1f
        call putc
        incq %rsi
        jmp puts
1:      ret
        .size puts, . - puts

        .type put_dec, @function
put_dec:
        cmpl $10, %eax
        jb 1f
        xorl %edx, %edx
        movl $10, %ecx
        divl %ecx
        pushq %rdx
        addl $'0', %eax
        call putc
        popq %rax
1:      addl $'0', %eax
        call putc
        ret
        .size put_dec, . - put_dec

        .type announce, @function
announce:
1:      cmpl %ebx, \turn(%rip)
        je 2f
        pause
        jmp 1b
2:      leaq \prefix(%rip), %rsi
        call puts
        movl %ebx, %eax
        call put_dec
        leaq \suffix(%rip), %rsi
        call puts
        incl \turn(%rip)
        ret
        .size announce, . - announce
.endm
