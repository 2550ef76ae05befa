/*
 * vmscope's x86_64 demo guest: a PVH ELF that every vmscope target and
 * QEMU's "-kernel" can boot, small enough to run quickly even where guest
 * ring-0 code goes through KVM's instruction emulator.
 *
 * Each CPU takes an index (lock xadd), gets its own stack, prints
 * "vmscope demo guest: cpu N up\n" on COM1 and then calls tick() forever.
 * tick(cpu) increments the global 64-bit `counter` (atomically) and
 * per_cpu_counter[cpu]. The loop does no port I/O and no privileged
 * instruction, so once a CPU is up it never exits to the VMM, except that
 * CPU 0 reads the TSC every 4096 ticks and prints
 * "vmscope demo guest: heartbeat\n" when about 2^31 cycles (about a
 * second) have passed since the last one: a user (or a test) can see from
 * the console alone that the guest runs on, e.g. after a debugger detaches.
 *
 * Entry points and notes: see pvh_boot.S. Loaded at 1 MiB (demo.ld).
 */
        .include "pvh_boot.S"
        .include "dwarf_types.S"

        .equ MAX_CPUS, 64               /* vmscope runs 1..64 CPUs */
        .equ STACK_SHIFT, 12            /* 4 KiB per CPU */

        PVH_NOTES pvh_entry

        .text
        .globl pvh_entry
        .type pvh_entry, @function
pvh_entry:
        ENTER_LONG_MODE pml4, pdpt, pd, gdt_ptr, start64
        .size pvh_entry, . - pvh_entry

        .globl start64
        .type start64, @function
start64:
        .cfi_startproc
        .cfi_undefined %rip           /* outermost frame: gdb's backtrace ends here */
        cli
        movl $1, %eax
        lock xaddl %eax, next_cpu(%rip)
        cmpl $MAX_CPUS, %eax
        jae park
        movl %eax, %ebx                 /* the CPU index lives in %ebx */
        leal 1(%eax), %ecx
        shll $STACK_SHIFT, %ecx
        leaq stacks(%rcx), %rsp
        LOAD_OWN_GDT gdt_ptr                /* needs the stack (lretq) */
        call announce
        .cfi_endproc
        .size start64, . - start64

        .globl main_loop
        .type main_loop, @function
main_loop:
        .cfi_startproc
        .cfi_undefined %rip           /* outermost frame: gdb's backtrace ends here */
        movl %ebx, %edi
        call tick
        testl %ebx, %ebx                /* only CPU 0 beats */
        jnz main_loop
        testl $0xfff, per_cpu_counter(%rip)
        jnz main_loop
        call heartbeat
        jmp main_loop
        .cfi_endproc
        .size main_loop, . - main_loop

/* Print the heartbeat line when 2^31 TSC cycles have passed since the last. */
        .type heartbeat, @function
heartbeat:
        .cfi_startproc
        rdtsc
        shlq $32, %rdx
        orq %rax, %rdx
        movq %rdx, %rax
        subq last_beat(%rip), %rax
        shrq $31, %rax
        jz 1f
        movq %rdx, last_beat(%rip)
        leaq beat_text(%rip), %rsi
        call puts
1:      ret
        .cfi_endproc
        .size heartbeat, . - heartbeat

/* void tick(unsigned cpu) */
        .globl tick
        .type tick, @function
tick:
        .cfi_startproc
        lock incq counter(%rip)
        incq per_cpu_counter(,%rdi,8)
        ret
        .cfi_endproc
        .size tick, . - tick

/* CPUs beyond MAX_CPUS stop here, quietly (they have no stack); vmscope
 * never starts that many, and a VMM may report this hlt with interrupts off. */
        .type park, @function
park:
        hlt
        jmp park
        .size park, . - park

        DEFINE_CONSOLE banner, banner_end, announce_turn

        .section .rodata
        GDT64 gdt, gdt_ptr
banner:
        .asciz "vmscope demo guest: cpu "
banner_end:
        .asciz " up\n"
beat_text:
        .asciz "vmscope demo guest: heartbeat\n"

        .data
        .balign 8
        .globl counter
        .type counter, @object
        .size counter, 8
counter:
        .quad 0
        .globl per_cpu_counter
        .type per_cpu_counter, @object
        .size per_cpu_counter, MAX_CPUS * 8
per_cpu_counter:
        .fill MAX_CPUS, 8, 0
        .type next_cpu, @object
        .size next_cpu, 4
next_cpu:
        .long 0
        .type announce_turn, @object
        .size announce_turn, 4
announce_turn:
        .long 0
        .balign 8
        .type last_beat, @object
        .size last_beat, 8
last_beat:
        .quad 0

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
stacks: .skip MAX_CPUS << STACK_SHIFT

        DWARF_BEGIN "demo.S"
        DWARF_U64 counter
        DWARF_U64_ARRAY per_cpu_counter, MAX_CPUS
        DWARF_END
