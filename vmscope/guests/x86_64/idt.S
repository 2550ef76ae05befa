/*
 * vmscope's second x86_64 PVH test guest. It differs from demo.S on
 * purpose, so tests that pass on both do not lean on one guest's layout:
 * it is loaded at 2 MiB, its data comes before its code (idt.ld), and it
 * owns an IDT whose #BP handler counts the guest's own breakpoints.
 *
 * Each CPU prints "vmscope idt guest: cpu N up\n" on COM1, then calls
 * tick() forever and executes its own int3 (at `guest_int3`) every 16 ticks;
 * the handler increments `bp_count` and returns with iretq. A debugger stub
 * must therefore tell its own breakpoints from the guest's and deliver the
 * guest's int3 to the guest: while the guest runs under a stub, `bp_count`
 * keeps rising.
 *
 * Entry points and notes: see pvh_boot.S.
 */
        .include "pvh_boot.S"
        .include "dwarf_types.S"

        .equ MAX_CPUS, 64               /* vmscope runs 1..64 CPUs */
        .equ STACK_SHIFT, 12
        .equ BP_VECTOR, 3
        .equ INT3_EVERY, 16

        PVH_NOTES pvh_entry

        .data
        .balign 8
        .globl counter
        .type counter, @object
        .size counter, 8
counter:
        .quad 0
        .globl bp_count
        .type bp_count, @object
        .size bp_count, 8
bp_count:
        .quad 0
        .globl per_cpu_counter
        .type per_cpu_counter, @object
        .size per_cpu_counter, MAX_CPUS * 8
per_cpu_counter:
        .fill MAX_CPUS, 8, 0
        .type cpus_started, @object
        .size cpus_started, 4
cpus_started:
        .long 0
        .type announce_turn, @object
        .size announce_turn, 4
announce_turn:
        .long 0
        .balign 16
        .type idt_ptr, @object
        .size idt_ptr, 10
idt_ptr:
        .word (BP_VECTOR + 1) * 16 - 1
        .quad idt
        GDT64 gdt64, gdt64_ptr
hello:
        .asciz "vmscope idt guest: cpu "
up:
        .asciz " up\n"

        .text
/* void tick(unsigned cpu) */
        .globl tick
        .type tick, @function
tick:
        .cfi_startproc
        incq per_cpu_counter(,%rdi,8)
        lock incq counter(%rip)
        ret
        .cfi_endproc
        .size tick, . - tick

        .globl bp_handler
        .type bp_handler, @function
bp_handler:
        .cfi_startproc
        .cfi_def_cfa %rsp, 40         /* the CPU pushed rip, cs, rflags, rsp, ss */
        .cfi_offset %rip, -40
        .cfi_offset %rsp, -16
        lock incq bp_count(%rip)
        iretq
        .cfi_endproc
        .size bp_handler, . - bp_handler

        DEFINE_CONSOLE hello, up, announce_turn

        .globl start64
        .type start64, @function
start64:
        .cfi_startproc
        .cfi_undefined %rip           /* outermost frame: gdb's backtrace ends here */
        cli
        movl $1, %eax
        lock xaddl %eax, cpus_started(%rip)
        cmpl $MAX_CPUS, %eax
        jae 2f
        movl %eax, %ebx                 /* the CPU index lives in %ebx */
        leal 1(%eax), %ecx
        shll $STACK_SHIFT, %ecx
        leaq stacks(%rcx), %rsp
        LOAD_OWN_GDT gdt64_ptr                /* needs the stack (lretq) */
        /* #BP gate: 64-bit interrupt gate, present, DPL 3 (so int3 works
         * from any ring), selector = our code segment. Every CPU writes
         * the same bytes, so concurrent starts are harmless. */
        leaq bp_handler(%rip), %rax
        movw %ax, idt + BP_VECTOR * 16
        movw $GDT_CODE64, idt + BP_VECTOR * 16 + 2
        movw $0xee00, idt + BP_VECTOR * 16 + 4
        shrq $16, %rax
        movw %ax, idt + BP_VECTOR * 16 + 6
        shrq $16, %rax
        movl %eax, idt + BP_VECTOR * 16 + 8
        movl $0, idt + BP_VECTOR * 16 + 12
        lidt idt_ptr(%rip)
        call announce
        xorl %r12d, %r12d               /* ticks since the last int3 */
        jmp main_loop
2:      hlt
        jmp 2b
        .cfi_endproc
        .size start64, . - start64

        .globl main_loop
        .type main_loop, @function
main_loop:
        .cfi_startproc
        .cfi_undefined %rip           /* outermost frame: gdb's backtrace ends here */
        movl %ebx, %edi
        call tick
        incl %r12d
        testl $(INT3_EVERY - 1), %r12d
        jnz main_loop
        .globl guest_int3
guest_int3:
        int3
        jmp main_loop
        .cfi_endproc
        .size main_loop, . - main_loop

        .globl pvh_entry
        .type pvh_entry, @function
pvh_entry:
        ENTER_LONG_MODE pml4, pdpt, pd, gdt64_ptr, start64
        .size pvh_entry, . - pvh_entry

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
idt:    .skip (BP_VECTOR + 1) * 16
        .balign 16
stacks: .skip MAX_CPUS << STACK_SHIFT

        DWARF_BEGIN "idt.S"
        DWARF_U64 counter
        DWARF_U64 bp_count
        DWARF_U64_ARRAY per_cpu_counter, MAX_CPUS
        DWARF_END
