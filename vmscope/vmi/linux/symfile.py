"""An ELF symbol file for GDB, made from a kernel's kallsyms.

Why: Debian ships no usable System.map (a placeholder) and no vmlinux
unless the user installs the ``-dbg`` package, and with KASLR every boot
moves the kernel. kallsyms in guest memory has every function and most data
symbols at their relocated addresses; written out as an ELF symbol table,
GDB takes them with ``add-symbol-file`` (``break start_kernel``,
``x/s &linux_banner``, ``info symbol $pc``, backtraces with names).

The file has no contents, only ``SHT_NOBITS`` sections spanning the symbols
(GDB needs a section around an address to treat a symbol there as code or
data) and the symbol table, so GDB reads code and data from the target.
Per-CPU offsets and absolute symbols are left out: at their small values
they would name unrelated low addresses.
"""

from __future__ import annotations

import struct
from typing import Iterable

from vmscope.vmi.linux.kallsyms import Symbol

EM_X86_64, EM_AARCH64 = 62, 183
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOBITS = 1, 2, 3, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
STB_LOCAL, STB_GLOBAL, STB_WEAK = 0, 1, 2
STT_OBJECT, STT_FUNC = 1, 2
ELF_HEADER, SECTION_HEADER, SYMBOL_ENTRY = 64, 64, 24
TEXT_TYPES = set("TtWw")
KERNEL_HALF = 1 << 63  # both arches: kernel symbols live in the upper half


def _kind(sym: Symbol) -> str | None:
    """'text', 'data' or None (left out)."""
    if sym.type in "Aa" or sym.address < KERNEL_HALF or not sym.name:
        return None
    return "text" if sym.type in TEXT_TYPES else "data"


def symbol_elf(symbols: Iterable[Symbol], machine: str = "x86_64") -> bytes:
    """The bytes of an ELF64 file whose symbol table is ``symbols``: text
    symbols as functions in ``.text``, the rest as objects in ``.data``,
    each sized up to the next symbol (so GDB can say "in start_kernel")."""
    em = {"x86_64": EM_X86_64, "aarch64": EM_AARCH64}[machine]
    kept = sorted(((s, k) for s in symbols if (k := _kind(s))), key=lambda sk: sk[0].address)
    if not kept:
        raise ValueError("no kernel symbols to write (none in the kernel half of the address space)")
    spans: dict[str, list[int]] = {}
    for s, k in kept:
        lo_hi = spans.setdefault(k, [s.address, s.address + 1])
        lo_hi[0] = min(lo_hi[0], s.address)
        lo_hi[1] = max(lo_hi[1], s.address + 1)

    # sections: 0 null, 1 .text, 2 .data, 3 .symtab, 4 .strtab, 5 .shstrtab
    shstr = b"\0.text\0.data\0.symtab\0.strtab\0.shstrtab\0"
    name_off = {n: shstr.index(n.encode() + b"\0") for n in (".text", ".data", ".symtab", ".strtab", ".shstrtab")}
    section_of = {"text": 1, "data": 2}

    strtab = bytearray(b"\0")
    locals_, globals_ = [], []
    next_addr = [0] * len(kept)  # the next higher symbol address, for sizes
    following = kept[-1][0].address + 1
    for i in range(len(kept) - 1, -1, -1):
        addr = kept[i][0].address
        next_addr[i] = following
        if i and kept[i - 1][0].address < addr:
            following = addr
    for i, (s, k) in enumerate(kept):
        size = min(next_addr[i] - s.address, 1 << 20)
        upper = s.type.isupper()
        bind = STB_WEAK if s.type in "Ww" else STB_GLOBAL if upper else STB_LOCAL
        info = (bind << 4) | (STT_FUNC if k == "text" else STT_OBJECT)
        entry = (len(strtab), info, section_of[k], s.address, size)
        strtab += s.name.encode("ascii", "replace") + b"\0"
        (locals_ if bind == STB_LOCAL else globals_).append(entry)
    symtab = bytearray(SYMBOL_ENTRY)  # the null symbol
    for name, info, shndx, value, size in locals_ + globals_:
        symtab += struct.pack("<IBBHQQ", name, info, 0, shndx, value, size)

    symtab_off = ELF_HEADER
    strtab_off = symtab_off + len(symtab)
    shstr_off = strtab_off + len(strtab)
    sh_off = (shstr_off + len(shstr) + 7) & ~7
    text = spans.get("text", [0, 0])
    data = spans.get("data", [0, 0])

    def shdr(name, type_, flags, addr, off, size, link=0, info=0, align=1, entsize=0) -> bytes:
        return struct.pack("<IIQQQQIIQQ", name, type_, flags, addr, off, size, link, info, align, entsize)

    sections = [
        bytes(SECTION_HEADER),
        shdr(name_off[".text"], SHT_NOBITS, SHF_ALLOC | SHF_EXECINSTR, text[0], 0, text[1] - text[0], align=16),
        shdr(name_off[".data"], SHT_NOBITS, SHF_ALLOC | SHF_WRITE, data[0], 0, data[1] - data[0], align=16),
        shdr(name_off[".symtab"], SHT_SYMTAB, 0, 0, symtab_off, len(symtab), link=4, info=1 + len(locals_),
             align=8, entsize=SYMBOL_ENTRY),
        shdr(name_off[".strtab"], SHT_STRTAB, 0, 0, strtab_off, len(strtab)),
        shdr(name_off[".shstrtab"], SHT_STRTAB, 0, 0, shstr_off, len(shstr)),
    ]
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, em, 1, 0, 0, sh_off, 0, ELF_HEADER, 0, 0,
                                 SECTION_HEADER, len(sections), 5)
    body = header + symtab + strtab + shstr
    return body + bytes(sh_off - len(body)) + b"".join(sections)
