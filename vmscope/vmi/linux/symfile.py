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
from itertools import accumulate, repeat
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
    for kind in ("text", "data"):
        addrs_k = [s.address for s, k in kept if k == kind]
        if addrs_k:
            spans[kind] = [addrs_k[0], addrs_k[-1] + 1]  # kept is sorted

    # sections: 0 null, 1 .text, 2 .data, 3 .symtab, 4 .strtab, 5 .shstrtab
    shstr = b"\0.text\0.data\0.symtab\0.strtab\0.shstrtab\0"
    name_off = {n: shstr.index(n.encode() + b"\0") for n in (".text", ".data", ".symtab", ".strtab", ".shstrtab")}

    # Written for speed (90,000 symbols while GDB waits): one pass for
    # sizes, then the entries of each binding packed by a C-level map.
    addrs = [s.address for s, _ in kept]
    sizes = [0] * len(kept)  # up to the next higher symbol address (GDB: "in start_kernel")
    following = addrs[-1] + 1
    for i in range(len(addrs) - 1, -1, -1):
        sizes[i] = min(following - addrs[i], 1 << 20)
        if i and addrs[i - 1] < addrs[i]:
            following = addrs[i]
    local_rows, global_rows = [], []
    for (s, k), size in zip(kept, sizes):
        t = s.type
        bind = STB_WEAK if t in "Ww" else STB_GLOBAL if t.isupper() else STB_LOCAL
        row = (s.name.encode("ascii", "replace"), (bind << 4) | (STT_FUNC if k == "text" else STT_OBJECT),
               1 if k == "text" else 2, s.address, size)
        (local_rows if bind == STB_LOCAL else global_rows).append(row)
    rows = local_rows + global_rows
    names = [r[0] for r in rows]
    strtab = b"\0" + b"\0".join(names) + b"\0"
    name_offsets = list(accumulate((len(n) + 1 for n in names), initial=1))
    pack = struct.Struct("<IBBHQQ").pack
    symtab = bytes(SYMBOL_ENTRY) + b"".join(map(pack, name_offsets, (r[1] for r in rows), repeat(0, len(rows)),
                                                (r[2] for r in rows), (r[3] for r in rows), (r[4] for r in rows)))

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
        shdr(name_off[".symtab"], SHT_SYMTAB, 0, 0, symtab_off, len(symtab), link=4, info=1 + len(local_rows),
             align=8, entsize=SYMBOL_ENTRY),
        shdr(name_off[".strtab"], SHT_STRTAB, 0, 0, strtab_off, len(strtab)),
        shdr(name_off[".shstrtab"], SHT_STRTAB, 0, 0, shstr_off, len(shstr)),
    ]
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)  # 64-bit, little-endian, version 1
    header = ident + struct.pack("<HHIQQQIHHHHHH", 2, em, 1, 0, 0, sh_off, 0, ELF_HEADER, 0, 0,
                                 SECTION_HEADER, len(sections), 5)
    body = header + symtab + strtab + shstr
    return body + bytes(sh_off - len(body)) + b"".join(sections)


def slide_symbol_elf(elf: bytes, delta: int) -> bytes:
    """``elf`` (from :func:`symbol_elf`) with every symbol and section moved
    by ``delta``: the same kernel build placed elsewhere by KASLR. Every
    symbol in the file lives in the kernel half, so all of them move."""
    out = bytearray(elf)
    mask = (1 << 64) - 1
    sh_off, = struct.unpack_from("<Q", out, 0x28)
    shnum, = struct.unpack_from("<H", out, 0x3C)
    for i in range(shnum):
        base = sh_off + i * SECTION_HEADER
        sh_type, = struct.unpack_from("<I", out, base + 4)
        if sh_type == SHT_NOBITS:  # .text / .data: sh_addr
            addr, = struct.unpack_from("<Q", out, base + 16)
            struct.pack_into("<Q", out, base + 16, (addr + delta) & mask)
        elif sh_type == SHT_SYMTAB:
            off, size = struct.unpack_from("<QQ", out, base + 24)
            values = memoryview(out)[off : off + size].cast("Q")  # 3 per entry: st_value is the second
            for j in range(4, len(values), 3):  # entry 0 is the null symbol
                values[j] = (values[j] + delta) & mask
            values.release()
    return bytes(out)
