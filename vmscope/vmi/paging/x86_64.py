"""x86_64 long-mode paging: 4-level (48-bit) and 5-level (LA57, 57-bit),
with 1 GiB pages at PDPT and 2 MiB pages at PD.

Each level indexes 9 bits of the address. An entry's bit 0 is Present,
bit 1 R/W, bit 2 U/S, bit 7 PS (a large page at PDPT/PD) and bit 63 NX;
bits 51:12 hold the next table's (or the page's) physical address.
"""

from __future__ import annotations

from vmscope.vmi.errors import TranslationError
from vmscope.vmi.paging.base import Page, TranslationCache, Walker
from vmscope.vmi.memory import PhysicalMemory

PRESENT = 1 << 0
WRITABLE = 1 << 1
USER = 1 << 2
PAGE_SIZE_BIT = 1 << 7
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000

CR4_LA57 = 1 << 12

# (name, shift) from the top level down; 5-level adds PML5 above PML4.
_LEVELS_5 = (("PML5", 48), ("PML4", 39), ("PDPT", 30), ("PD", 21), ("PT", 12))
_LARGE_OK = {"PDPT", "PD"}


class X86_64Paging(Walker):
    """Translate virtual addresses through the tables rooted at ``cr3``.

    ``levels`` is 4 or 5 (pass ``cr4`` instead to read LA57 from it).
    """

    def __init__(self, phys: PhysicalMemory, cr3: int, levels: int | None = None, cr4: int | None = None,
                 cache: TranslationCache | None = None):
        super().__init__(phys, cache)
        if levels is None:
            levels = 5 if cr4 is not None and cr4 & CR4_LA57 else 4
        if levels not in (4, 5):
            raise ValueError(f"x86_64 paging has 4 or 5 levels, not {levels}")
        self.levels = levels
        self.cr3 = cr3
        self.root = cr3 & ADDR_MASK
        self.root_key = self.root | (levels == 5)
        self._table = _LEVELS_5[5 - levels :]
        self.va_bits = 57 if levels == 5 else 48

    def is_canonical(self, vaddr: int) -> bool:
        top = vaddr >> (self.va_bits - 1)
        return top == 0 or top == (1 << (65 - self.va_bits)) - 1

    def _walk(self, vaddr: int) -> Page:
        if not 0 <= vaddr < 1 << 64:
            raise TranslationError(vaddr & ((1 << 64) - 1), self._table[0][0], "address out of 64-bit range")
        if not self.is_canonical(vaddr):
            raise TranslationError(vaddr, self._table[0][0], f"non-canonical for {self.levels}-level paging")
        # Each 1 GiB shares its page directory: remember where the walk
        # stood there, so the next page in that GiB costs two entries, not 4-5.
        upper_key = (self.root_key, vaddr >> 30)
        resume = self.cache.upper.get(upper_key)
        if resume is not None:
            table, writable, user, nx = resume
            levels = self._table[-2:]
        else:
            table = self.root
            writable = user = True
            nx = False
            levels = self._table
        for name, shift in levels:
            if shift == 21 and resume is None:
                self.cache.upper[upper_key] = (table, writable, user, nx)
            entry_addr = table + ((vaddr >> shift) & 0x1FF) * 8
            entry = self._entry(entry_addr)
            if not entry & PRESENT:
                raise TranslationError(vaddr, name, "not present", entry, entry_addr)
            writable &= bool(entry & WRITABLE)
            user &= bool(entry & USER)
            nx |= bool(entry & NX)
            if shift == 12 or (entry & PAGE_SIZE_BIT and name in _LARGE_OK):
                size = 1 << shift
                pbase = entry & ADDR_MASK & ~(size - 1)
                return Page(vaddr & ~(size - 1), pbase, size, writable, user, nx, name)
            if entry & PAGE_SIZE_BIT:
                raise TranslationError(vaddr, name, "reserved PS bit set", entry, entry_addr)
            table = entry & ADDR_MASK
        raise AssertionError("unreachable")
