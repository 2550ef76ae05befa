/*
 * walk: a small x86_64 PVH guest written the way any PVH kernel is, not
 * around vmscope's conventions (no start64, no "vmscope" note, nothing
 * shared with demo.S and idt.S but the DWARF helper).
 *
 * - Entry: the standard PVH one, _start, named by the Xen
 *   XEN_ELFNOTE_PHYS32_ENTRY note: 32-bit protected mode, paging off,
 *   %ebx = physical address of the hvm_start_info. Only the boot CPU starts
 *   (other CPUs wait for an INIT/SIPI this guest never sends).
 * - It sets up its own stack (first thing: the 32-bit code calls a
 *   function), its own GDT (Linux's boot selectors: code 0x10, data 0x18)
 *   and its own page tables: the first 4 MiB identity-mapped with 4 KiB
 *   pages (two page tables; demo and idt use 2 MiB pages over 1 GiB).
 * - It checks the hvm_start_info magic through %ebx while paging is still
 *   off and says on COM1 whether it found one:
 *   "walk guest: hvm_start_info ok" (or "... missing").
 * - Then it walks a ring of NODES list nodes in its data segment forever,
 *   in an order that jumps around (next = (13 * i + 5) mod NODES, one
 *   cycle through every node), calling visit(node) for each: visit folds
 *   the node's value into `checksum` (rotate left 5, xor) and increments
 *   the 64-bit `visits`. A debugger breaks on visit and watches visits.
 *
 * Loaded at 3 MiB, code and data in separate segments (walk.ld).
 */
        .include "dwarf_types.S"

        .equ COM1_DATA, 0x3f8
        .equ COM1_LSR, 0x3fd
        .equ LSR_THR_EMPTY, 0x20
        .equ HVM_START_MAGIC, 0x336ec578
        .equ BOOT_CS, 0x10
        .equ BOOT_DS, 0x18
        .equ MSR_EFER, 0xc0000080
        .equ EFER_LME, 0x100
        .equ NODES, 48
        .equ STACK_SIZE, 0x4000

/* The PVH entry note: 8-byte descriptor, as Linux's ELF64 vmlinux has it
 * (QEMU reads a pointer-sized value from ELF64 notes). */
        .section .note.Xen, "a", @note
        .balign 4
        .long 4, 8, 18                  /* namesz, descsz, XEN_ELFNOTE_PHYS32_ENTRY */
        .asciz "Xen"
        .balign 4
        .quad _start

        .section .text.boot, "ax"
        .code32
        .globl _start
        .type _start, @function
_start:
        cli
        cld
        movl $stack_top, %esp
        xorl %eax, %eax
        cmpl $HVM_START_MAGIC, (%ebx)   /* paging off: %ebx is the address itself */
        sete %al
        movl %eax, start_info_ok
        movl %ebx, start_info
        call map_first_4m
        lgdt gdt_desc
        movl $pml4, %eax
        movl %eax, %cr3
        movl %cr4, %eax
        orl $0x20, %eax                 /* PAE */
        movl %eax, %cr4
        movl $MSR_EFER, %ecx
        rdmsr
        orl $EFER_LME, %eax
        wrmsr
        movl %cr0, %eax
        orl $0x80000001, %eax           /* PG | PE */
        movl %eax, %cr0
        ljmp $BOOT_CS, $long_mode
        .size _start, . - _start

/* Identity-map [0, 4 MiB) with 4 KiB pages: PML4[0] -> PDPT[0] -> PD[0..1]
 * -> two page tables. The tables are in .bss, which the loader zeroed. */
        .type map_first_4m, @function
map_first_4m:
        movl $(pdpt + 3), pml4          /* present | writable */
        movl $(pd + 3), pdpt
        movl $(page_tables + 3), pd
        movl $(page_tables + 0x1000 + 3), pd + 8
        xorl %ecx, %ecx
1:      movl %ecx, %eax
        shll $12, %eax
        orl $3, %eax
        movl %eax, page_tables(,%ecx,8)
        incl %ecx
        cmpl $1024, %ecx
        jne 1b
        ret
        .size map_first_4m, . - map_first_4m

        .code64
        .type long_mode, @function
long_mode:
        movl $BOOT_DS, %eax
        movl %eax, %ds
        movl %eax, %es
        movl %eax, %ss
        xorl %eax, %eax
        movl %eax, %fs
        movl %eax, %gs
        leaq stack_top(%rip), %rsp
        leaq msg_ok(%rip), %rsi
        leaq msg_missing(%rip), %rax
        cmpl $0, start_info_ok(%rip)
        cmoveq %rax, %rsi
        call print
        jmp walk_loop
        .size long_mode, . - long_mode

        .text
/* Walk the ring for ever: visit(node); node = node->next. */
        .globl walk_loop
        .type walk_loop, @function
walk_loop:
        .cfi_startproc
        .cfi_undefined %rip             /* outermost frame: gdb's backtrace ends here */
        movq ring_head(%rip), %rbx
1:      movq %rbx, %rdi
        call visit
        movq (%rbx), %rbx
        jmp 1b
        .cfi_endproc
        .size walk_loop, . - walk_loop

/* void visit(struct node *node): checksum = rol(checksum, 5) ^ node->value; visits++ */
        .globl visit
        .type visit, @function
visit:
        .cfi_startproc
        movq checksum(%rip), %rax
        rolq $5, %rax
        xorq 8(%rdi), %rax
        movq %rax, checksum(%rip)
        incq visits(%rip)
        ret
        .cfi_endproc
        .size visit, . - visit

/* print: the NUL-terminated string at %rsi to COM1, polling the LSR. */
        .type print, @function
print:
        movzbl (%rsi), %ecx
        testl %ecx, %ecx
        jz 3f
        movw $COM1_LSR, %dx
2:      inb %dx, %al
        testb $LSR_THR_EMPTY, %al
        jz 2b
        movl %ecx, %eax
        movw $COM1_DATA, %dx
        outb %al, %dx
        incq %rsi
        jmp print
3:      ret
        .size print, . - print

        .section .rodata
        .balign 8
gdt:    .quad 0, 0
        .quad 0x00af9a000000ffff        /* 0x10: 64-bit code */
        .quad 0x00cf92000000ffff        /* 0x18: data */
gdt_end:
gdt_desc:
        .word gdt_end - gdt - 1
        .quad gdt
msg_ok:
        .asciz "walk guest: hvm_start_info ok\n"
msg_missing:
        .asciz "walk guest: hvm_start_info missing\n"

        .data
        .balign 8
        .globl visits
        .type visits, @object
        .size visits, 8
visits: .quad 0
        .globl checksum
        .type checksum, @object
        .size checksum, 8
checksum:
        .quad 0
        .globl start_info
        .type start_info, @object
        .size start_info, 8
start_info:
        .quad 0                         /* %ebx at entry */
        .globl start_info_ok
        .type start_info_ok, @object
        .size start_info_ok, 4
start_info_ok:
        .long 0
        .balign 8
        .globl ring_head
        .type ring_head, @object
        .size ring_head, 8
ring_head:
        .quad ring
/* struct node { struct node *next; u64 value; } ring[NODES] */
        .balign 16
        .globl ring
        .type ring, @object
        .size ring, NODES * 16
ring:
        .set node, 0
        .rept NODES
        .quad ring + 16 * ((13 * node + 5) % NODES)
        .quad (node * 0x01000193) ^ 0x811c9dc5
        .set node, node + 1
        .endr

        .bss
        .balign 4096
pml4:   .skip 4096
pdpt:   .skip 4096
pd:     .skip 4096
page_tables:
        .skip 2 * 4096
stack:  .skip STACK_SIZE
stack_top:

        DWARF_BEGIN "walk.S"
        DWARF_U64 visits
        DWARF_U64 checksum
        DWARF_U64 start_info
        DWARF_END
