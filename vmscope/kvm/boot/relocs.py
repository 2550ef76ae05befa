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
    is not a relocation table (a kernel built without one)."""
    usable = len(blob) - len(blob) % 4
    a = array("i")
    a.frombytes(blob[len(blob) - usable :])
    lists, k = [], len(a) - 1
    for _ in range(3):
        start = k
        while k >= 0 and a[k]:
            k -= 1
        if k < 0:
            return None
        lists.append(a[k + 1 : start + 1][::-1])  # in the order the kernel walks them
        k -= 1
    return RelocTable(*lists), 4 * (len(a) - 1 - k)


def parse_relocs(blob: bytes) -> RelocTable:
    """The table from a file that holds only it (as the cache keeps it)."""
    if not blob:
        return EMPTY
    parsed = _lists(blob)
    if parsed is None or parsed[1] != len(blob):
        raise ImageError("the cached relocation table is damaged (not three zero-terminated lists)")
    return parsed[0]


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


def apply_relocs(image: memoryview, table: RelocTable, link_text: int, delta: int) -> int:
    """Add ``delta`` (the virtual slide) to every place the table lists, in
    ``image``: the loaded kernel, ``image[0]`` being ``_text`` (linked at
    ``link_text``). Returns how many places were changed.

    Entries at aligned offsets go through an integer view (one index
    operation each, the common case for 64-bit pointers); others through
    struct. The decompressor's bounds check is kept: a place outside the
    image is an error, not a write elsewhere.
    """
    if not delta or not len(table):
        return 0
    size = len(image)
    base = link_text - (1 << 64)  # entries are sign-extended kernel addresses: offset = entry - base
    unpack, pack = struct.unpack_from, struct.pack_into
    whole = size - size % 8
    q = image[:whole].cast("Q")
    d = image[: size - size % 4].cast("I")
    try:
        for entries, width in ((table.r32, 4), (table.rinv, -4), (table.r64, 8)):
            offsets = [e - base for e in entries]
            if offsets and (min(offsets) < 0 or max(offsets) + abs(width) > size):
                bad = next(o for o in offsets if o < 0 or o + abs(width) > size)
                raise ImageError(f"a relocation at {bad + link_text:#x} lies outside the kernel image")
            if width == 8:
                for o in offsets:
                    if o & 7:
                        pack("<Q", image, o, (unpack("<Q", image, o)[0] + delta) & MASK64)
                    else:
                        i = o >> 3
                        q[i] = (q[i] + delta) & MASK64
            else:
                step = delta if width > 0 else -delta
                for o in offsets:
                    if o & 3:
                        pack("<I", image, o, (unpack("<I", image, o)[0] + step) & MASK32)
                    else:
                        i = o >> 2
                        d[i] = (d[i] + step) & MASK32
    finally:
        q.release()
        d.release()
    return len(table)
