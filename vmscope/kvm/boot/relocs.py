"""The x86_64 kernel's relocation table, and KASLR's virtual slide applied with it.

Why: with KASLR the kernel runs at a virtual address chosen at boot, but it
is linked at ``0xffffffff81000000`` (``__START_KERNEL_map`` +
``LOAD_PHYSICAL_ADDR``). The build (arch/x86/tools/relocs) appends to
``vmlinux`` the places that hold absolute kernel addresses, and the
decompressor adds the slide to each (arch/x86/boot/compressed/misc.c,
``handle_relocations``). The VMM does the same when it loads the kernel
itself (:mod:`vmscope.kvm.boot.vmlinux`).

The table, read backwards from the end of the decompressed payload, is
three lists of 32-bit entries, each ended by a zero: the 32-bit relocations
(``+= delta`` on 32 bits), then the inverse 32-bit ones (``-= delta``:
PC-relative references from the image to per-CPU data, which does not
move), then the 64-bit ones (``+= delta`` on 64 bits). Each entry is the
kernel virtual address of the place, truncated to 32 bits (sign-extend it).
"""

from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass

from vmscope.machine import ImageError

MASK32, MASK64 = (1 << 32) - 1, (1 << 64) - 1


@dataclass(frozen=True)
class RelocTable:
    """Kernel virtual addresses (sign-extended int32 entries) of each kind."""

    r32: array
    rinv: array
    r64: array

    def __len__(self) -> int:
        return len(self.r32) + len(self.rinv) + len(self.r64)


EMPTY = RelocTable(array("i"), array("i"), array("i"))


def _lists(blob: bytes) -> tuple[RelocTable, int] | None:
    """Parse the three lists from the end of ``blob``; None when its tail
    is not a relocation table (a kernel built without one). With array
    operations only (C loops): in the nested lab a Python loop over
    200,000 entries took most of a second."""
    usable = len(blob) - len(blob) % 4
    a = array("i")
    a.frombytes(blob[len(blob) - usable :])
    a.reverse()  # the order the kernel walks the lists in
    lists, k = [], 0
    for _ in range(3):
        try:
            z = a.index(0, k)
        except ValueError:
            return None
        lists.append(a[k:z])
        k = z + 1
    return RelocTable(*lists), 4 * k


def _zero_word(blob: bytes, start: int) -> int:
    """Offset of the next 4-byte-aligned zero word at or after ``start``."""
    pos = start
    while True:
        pos = blob.find(b"\0\0\0\0", pos)
        if pos < 0:
            raise ImageError("the cached relocation table is damaged (a list without its terminator)")
        if pos % 4 == 0:
            return pos
        pos += 1


def parse_relocs(blob: bytes) -> RelocTable:
    """The table from a file that holds only it (as the cache keeps it).

    In file order it is ``0, 64-bit entries, 0, inverse entries, 0, 32-bit
    entries`` (the kernel walks it from the end); each list keeps file
    order here, which changes nothing (every place is listed once). Found
    with ``bytes.find``: a kernel address's top byte is never zero, so a
    zero word is a terminator.
    """
    if not blob:
        return EMPTY
    if len(blob) % 4 or blob[:4] != b"\0\0\0\0":
        raise ImageError("the cached relocation table is damaged (it must start with a zero word)")
    inv_at = _zero_word(blob, 4)
    r32_at = _zero_word(blob, inv_at + 4)
    lists = []
    for a, b in ((r32_at + 4, len(blob)), (inv_at + 4, r32_at), (4, inv_at)):
        arr = array("i")
        arr.frombytes(blob[a:b])
        lists.append(arr)
    return RelocTable(*lists)


def elf_extent(elf: bytes) -> int:
    """Where an ELF64 file's own contents end (program headers' data,
    section headers and their data)."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2:
        raise ImageError("the decompressed kernel is not an ELF64 file")
    e_phoff, e_shoff = struct.unpack_from("<QQ", elf, 0x20)
    e_phentsize, e_phnum, e_shentsize, e_shnum = struct.unpack_from("<HHHH", elf, 0x36)
    end = max(e_phoff + e_phentsize * e_phnum, e_shoff + e_shentsize * e_shnum)
    for i in range(e_phnum):
        _, _, off, _, _, filesz = struct.unpack_from("<IIQQQQ", elf, e_phoff + i * e_phentsize)
        end = max(end, off + filesz)
    for i in range(e_shnum):
        sh_type, = struct.unpack_from("<I", elf, e_shoff + i * e_shentsize + 4)
        off, size = struct.unpack_from("<QQ", elf, e_shoff + i * e_shentsize + 0x18)
        if sh_type != 8:  # SHT_NOBITS takes no file space
            end = max(end, off + size)
    return end


def split_relocs(raw: bytes) -> tuple[bytes, bytes]:
    """(vmlinux ELF, relocation table) from the decompressed payload
    (``vmlinux.bin`` with ``vmlinux.relocs`` appended by the build)."""
    end = elf_extent(raw)
    if end > len(raw):
        raise ImageError(f"the decompressed kernel ELF is truncated ({len(raw)} bytes, its headers say {end})")
    if end == len(raw):
        return raw, b""  # built without relocations (no KASLR)
    parsed = _lists(raw[end:])
    if parsed is None or len(raw) - parsed[1] < end:
        raise ImageError("the data after the kernel ELF is not a relocation table")
    start = len(raw) - parsed[1]
    return raw[:start], raw[start:]


def apply_relocs(image: memoryview, table: RelocTable, link_text: int, delta: int,
                 host_addr: int | None = None) -> int:
    """Add ``delta`` (the virtual slide) to every place the table lists, in
    ``image``: the loaded kernel, ``image[0]`` being ``_text`` (linked at
    ``link_text``); ``host_addr`` is where ``image`` is in this process
    (for the machine-code loops of :mod:`vmscope.kvm.boot.reloc_native`;
    without it, or where they cannot run, a Python loop does the work).
    Returns how many places were changed.

    The decompressor's bounds check is kept: a place outside the image is
    an error, not a write elsewhere.
    """
    if not delta or not len(table):
        return 0
    size = len(image)
    base = link_text - (1 << 64)  # entries are sign-extended kernel addresses: offset = entry - base
    kinds = (("add32", table.r32, 4), ("sub32", table.rinv, 4), ("add64", table.r64, 8))
    from vmscope.kvm.boot.reloc_native import native_loops

    loops = native_loops() if host_addr is not None else None
    for _, entries, width in kinds:
        if not entries:
            continue
        lo, hi = base, base + size - width
        if loops is not None:
            outside = loops["outside"](lo, entries.buffer_info()[0], len(entries), hi)
        else:
            outside = min(entries) < lo or max(entries) > hi
        if outside:
            bad = next(e for e in entries if not lo <= e <= hi)
            raise ImageError(f"a relocation at {(bad - base) + link_text:#x} lies outside the kernel image")
    if loops is not None:
        start = (host_addr - link_text) & MASK64
        for op, entries, _ in kinds:
            if entries:
                loops[op](start, entries.buffer_info()[0], len(entries), delta & MASK64)
        return len(table)
    unpack, pack = struct.unpack_from, struct.pack_into
    for op, entries, width in kinds:
        fmt, mask = ("<Q", MASK64) if width == 8 else ("<I", MASK32)
        step = -delta if op == "sub32" else delta
        for e in entries:
            o = e - base
            pack(fmt, image, o, (unpack(fmt, image, o)[0] + step) & mask)
    return len(table)
