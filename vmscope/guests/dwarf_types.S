/*
 * Hand-written DWARF 4 that gives the guests' global variables C types,
 * shared by every guest (x86_64 and arm64 GNU as both accept this file:
 * block comments only, '%' section types).
 *
 * Why: an ELF symbol with a size is not enough for gdb, which answers
 * "print counter" and "watch counter" with "'counter' has unknown type".
 * With these few DIEs `counter` is an `unsigned long` and
 * `per_cpu_counter` an `unsigned long[N]`, so the natural commands work.
 * Functions stay plain ELF symbols (no line table: the guests are assembly);
 * the guests' .cfi_* directives let gdb unwind tick -> main_loop and stop
 * there instead of walking into the empty top of the stack.
 *
 * Use: DWARF_BEGIN "name.S"; then DWARF_U64 sym / DWARF_U64_ARRAY sym, n
 * for each variable; then DWARF_END.
 */
/* Call frame information (the guests' .cfi_* directives) goes to
 * .debug_frame, which is not loaded, instead of an allocated .eh_frame. */
        .cfi_sections .debug_frame

        .equ DW_TAG_compile_unit, 0x11
        .equ DW_TAG_base_type, 0x24
        .equ DW_TAG_variable, 0x34
        .equ DW_TAG_array_type, 0x01
        .equ DW_TAG_subrange_type, 0x21
        .equ DW_AT_name, 0x03
        .equ DW_AT_byte_size, 0x0b
        .equ DW_AT_language, 0x13
        .equ DW_AT_producer, 0x25
        .equ DW_AT_encoding, 0x3e
        .equ DW_AT_external, 0x3f
        .equ DW_AT_type, 0x49
        .equ DW_AT_location, 0x02
        .equ DW_AT_upper_bound, 0x2f
        .equ DW_FORM_string, 0x08
        .equ DW_FORM_data1, 0x0b
        .equ DW_FORM_data2, 0x05
        .equ DW_FORM_ref4, 0x13
        .equ DW_FORM_flag_present, 0x19
        .equ DW_FORM_exprloc, 0x18
        .equ DW_ATE_unsigned, 0x07
        .equ DW_LANG_C99, 0x000c
        .equ DW_OP_addr, 0x03

        .equ ABBREV_CU, 1
        .equ ABBREV_BASE_TYPE, 2
        .equ ABBREV_VARIABLE, 3
        .equ ABBREV_ARRAY, 4
        .equ ABBREV_SUBRANGE, 5

.macro DWARF_BEGIN cu_name
        .pushsection .debug_abbrev, "", %progbits
        .uleb128 ABBREV_CU, DW_TAG_compile_unit
        .byte 1                                 /* has children */
        .uleb128 DW_AT_producer, DW_FORM_string
        .uleb128 DW_AT_language, DW_FORM_data2
        .uleb128 DW_AT_name, DW_FORM_string
        .byte 0, 0
        .uleb128 ABBREV_BASE_TYPE, DW_TAG_base_type
        .byte 0
        .uleb128 DW_AT_name, DW_FORM_string
        .uleb128 DW_AT_encoding, DW_FORM_data1
        .uleb128 DW_AT_byte_size, DW_FORM_data1
        .byte 0, 0
        .uleb128 ABBREV_VARIABLE, DW_TAG_variable
        .byte 0
        .uleb128 DW_AT_name, DW_FORM_string
        .uleb128 DW_AT_type, DW_FORM_ref4
        .uleb128 DW_AT_external, DW_FORM_flag_present
        .uleb128 DW_AT_location, DW_FORM_exprloc
        .byte 0, 0
        .uleb128 ABBREV_ARRAY, DW_TAG_array_type
        .byte 1
        .uleb128 DW_AT_type, DW_FORM_ref4
        .byte 0, 0
        .uleb128 ABBREV_SUBRANGE, DW_TAG_subrange_type
        .byte 0
        .uleb128 DW_AT_upper_bound, DW_FORM_data2
        .byte 0, 0
        .byte 0                                 /* end of abbreviations */
        .popsection

        .pushsection .debug_info, "", %progbits
.Ldw_cu:
        .long .Ldw_cu_end - .Ldw_cu_version     /* unit_length */
.Ldw_cu_version:
        .short 4                                /* DWARF version */
        .long 0                                 /* .debug_abbrev offset */
        .byte 8                                 /* address size */
        .uleb128 ABBREV_CU
        .asciz "vmscope guest (hand-written DWARF)"
        .short DW_LANG_C99                      /* C types; lldb resolves no types in an assembler CU */
        .asciz "\cu_name"
.Ldw_u64:
        .uleb128 ABBREV_BASE_TYPE
        .asciz "unsigned long"
        .byte DW_ATE_unsigned, 8
        .popsection
.endm

.macro DWARF_VARIABLE sym, type
        .uleb128 ABBREV_VARIABLE
        .asciz "\sym"
        .long \type - .Ldw_cu
        .uleb128 9                              /* expression length */
        .byte DW_OP_addr
        .quad \sym
.endm

/* unsigned long sym; */
.macro DWARF_U64 sym
        .pushsection .debug_info, "", %progbits
        DWARF_VARIABLE \sym, .Ldw_u64
        .popsection
.endm

/* unsigned long sym[count]; */
.macro DWARF_U64_ARRAY sym, count
        .pushsection .debug_info, "", %progbits
.Ldw_array_\sym:
        .uleb128 ABBREV_ARRAY
        .long .Ldw_u64 - .Ldw_cu
        .uleb128 ABBREV_SUBRANGE
        .short \count - 1
        .byte 0                                 /* end of array children */
        DWARF_VARIABLE \sym, .Ldw_array_\sym
        .popsection
.endm

.macro DWARF_END
        .pushsection .debug_info, "", %progbits
        .byte 0                                 /* end of CU children */
.Ldw_cu_end:
        .popsection
.endm
