/*
 * vmscope's arm64 demo guest: bare metal, MMU off, for
 * "qemu-system-aarch64 -M virt -cpu max -kernel demo.elf" and for vmscope's
 * emulated target.
 *
 * Entry (_start): EL1, MMU and caches off, any registers. QEMU's virt board
 * starts only CPU 0 there (secondaries stay powered off until PSCI CPU_ON);
 * vmscope's emulated target starts every CPU there. Each CPU takes its index
 * from MPIDR_EL1.Aff0, sets up its own stack, prints
 * "vmscope demo guest: cpu N up\n" on the PL011 at 0x09000000 and calls
 * tick(cpu) forever; tick increments the global 64-bit `counter`
 * (atomically, with a load/store-exclusive loop that works on every ARMv8.0
 * CPU, LSE atomics being optional) and per_cpu_counter[cpu]. Where CPUs do
 * not share an exclusive monitor (an emulator running one instance per CPU
 * and switching between instructions) an increment can be lost, so
 * `counter` may lag the sum of per_cpu_counter there; it still only grows.
 *
 * Memory: RAM starts at 0x40000000 on virt and QEMU puts the DTB at its
 * start for bare-metal images, so the guest links at 0x40080000 (demo.ld).
 * With the MMU off every data access is Device memory, so every access here
 * is naturally aligned.
 */
        .include "dwarf_types.S"

        .equ UART_BASE, 0x09000000
        .equ UART_FR, 0x18
        .equ UART_FR_TXFF, 1 << 5
        .equ MAX_CPUS, 64               // vmscope runs 1..64 CPUs
        .equ STACK_SHIFT, 12            // 4 KiB per CPU

        .pushsection .note.vmscope, "a", %note
        .balign 4
        .long 8                 // namesz: "vmscope\0"
        .long 0                 // descsz
        .long 1                 // every CPU starts at the ELF entry
        .asciz "vmscope"
        .popsection

        .text
        .globl _start
        .type _start, %function
_start:
        .cfi_startproc
        .cfi_undefined x30           /* outermost frame: gdb's backtrace ends here */
        msr daifset, #0xf               // interrupts off
        mrs x19, mpidr_el1
        and x19, x19, #0xff             // the CPU index lives in x19
        cmp x19, #MAX_CPUS
        b.hs park
        add x0, x19, #1
        lsl x0, x0, #STACK_SHIFT
        ldr x1, =stacks
        add x0, x1, x0
        mov sp, x0
        bl announce
        .cfi_endproc
        .size _start, . - _start

        .globl main_loop
        .type main_loop, %function
main_loop:
        .cfi_startproc
        .cfi_undefined x30           /* outermost frame: gdb's backtrace ends here */
        mov x0, x19
        bl tick
        b main_loop
        .cfi_endproc
        .size main_loop, . - main_loop

// void tick(unsigned long cpu)
        .globl tick
        .type tick, %function
tick:
        .cfi_startproc
        ldr x1, =counter
1:      ldxr x2, [x1]
        add x2, x2, #1
        stxr w3, x2, [x1]
        cbnz w3, 1b
        ldr x1, =per_cpu_counter
        ldr x2, [x1, x0, lsl #3]
        add x2, x2, #1
        str x2, [x1, x0, lsl #3]
        ret
        .cfi_endproc
        .size tick, . - tick

// CPUs beyond MAX_CPUS stop here.
        .type park, %function
park:
        wfe
        b park
        .size park, . - park

// putc(w0): wait while the transmit FIFO is full, then write the byte.
        .type putc, %function
putc:
        ldr x1, =UART_BASE
1:      ldr w2, [x1, #UART_FR]
        tst w2, #UART_FR_TXFF
        b.ne 1b
        str w0, [x1]
        ret
        .size putc, . - putc

// puts(x0 = NUL-terminated string)
        .type puts, %function
puts:
        stp x29, x30, [sp, #-32]!
        str x20, [sp, #16]
        mov x20, x0
1:      ldrb w0, [x20], #1
        cbz w0, 2f
        bl putc
        b 1b
2:      ldr x20, [sp, #16]
        ldp x29, x30, [sp], #32
        ret
        .size puts, . - puts

// announce: print "vmscope demo guest: cpu <x19> up\n". CPUs announce in
// index order: CPU N waits until announce_turn == N, prints, then passes the
// turn on. Only the CPU whose turn it is writes the word, so this needs no
// exclusive monitor shared between CPUs (an emulator running each CPU as a
// separate instance has none) and the output order is deterministic.
        .type announce, %function
announce:
        stp x29, x30, [sp, #-32]!
        stp x21, x22, [sp, #16]
        ldr x1, =announce_turn
1:      ldar w2, [x1]
        cmp w2, w19
        b.ne 1b
        ldr x0, =banner
        bl puts
        mov x2, #10
        udiv x21, x19, x2               // tens (the index is below 100)
        msub x22, x21, x2, x19          // ones
        cbz x21, 2f
        add x0, x21, #'0'
        bl putc
2:      add x0, x22, #'0'
        bl putc
        ldr x0, =banner_end
        bl puts
        add w2, w19, #1
        ldr x1, =announce_turn
        stlr w2, [x1]
        ldp x21, x22, [sp, #16]
        ldp x29, x30, [sp], #32
        ret
        .size announce, . - announce

        .ltorg

        .section .rodata
banner:
        .asciz "vmscope demo guest: cpu "
banner_end:
        .asciz " up\n"

        .data
        .balign 8
        .globl counter
        .type counter, %object
        .size counter, 8
counter:
        .quad 0
        .globl per_cpu_counter
        .type per_cpu_counter, %object
        .size per_cpu_counter, MAX_CPUS * 8
per_cpu_counter:
        .fill MAX_CPUS, 8, 0
        .type announce_turn, %object
        .size announce_turn, 4
announce_turn:
        .long 0

        .bss
        .balign 16
stacks: .skip MAX_CPUS << STACK_SHIFT

        DWARF_BEGIN "demo.S"
        DWARF_U64 counter
        DWARF_U64_ARRAY per_cpu_counter, MAX_CPUS
        DWARF_END
