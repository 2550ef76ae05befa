"""AArch64 stage-1 translation (EL1&0 regime) with 4 KiB, 16 KiB and
64 KiB granules, the TTBR0/TTBR1 split decided by TCR_EL1.T0SZ/T1SZ.

Addresses below ``2**(64-T0SZ)`` walk TTBR0's tables, addresses at or above
``2**64 - 2**(64-T1SZ)`` walk TTBR1's; anything between is a translation
fault. A granule of ``2**g`` bytes gives ``g-3`` index bits per level; the
walk starts at the level that covers the VA size, so a 39-bit 4K setup has
three levels (L1-L3) and a 48-bit one four (L0-L3). Descriptors: bit 0
valid, bit 1 table (or page at L3), otherwise a block; AP[2] (bit 7) read
only, AP[1] (bit 6) EL0 access, PXN bit 53, UXN bit 54; table descriptors
can restrict further with APTable (62:61), UXNTable (60) and PXNTable (59).
52-bit addressing (FEAT_LPA/LPA2) is not handled.
"""

from __future__ import annotations

from vmscope.vmi.errors import TranslationError
from vmscope.vmi.paging.base import Page, TranslationCache, Walker
from vmscope.vmi.memory import PhysicalMemory

OA_MASK = 0x0000_FFFF_FFFF_F000
TTBR_BADDR_MASK = 0x0000_FFFF_FFFF_FFFE

_TG0 = {0b00: 12, 0b01: 16, 0b10: 14}  # TCR.TG0 -> granule shift
_TG1 = {0b10: 12, 0b11: 16, 0b01: 14}  # TCR.TG1 -> granule shift
# Which levels may hold a block descriptor, per granule (48-bit OA).
_BLOCK_LEVELS = {12: {1, 2}, 14: {2}, 16: {2}}
SCTLR_M = 1  # SCTLR_EL1.M: stage-1 MMU enable


def _field(value: int, lo: int, width: int) -> int:
    return (value >> lo) & ((1 << width) - 1)


class Aarch64Paging(Walker):
    """Translate through TTBR0_EL1/TTBR1_EL1 as configured by ``tcr``."""

    def __init__(self, phys: PhysicalMemory, ttbr0: int, ttbr1: int, tcr: int, cache: TranslationCache | None = None):
        super().__init__(phys, cache)
        self.ttbr0, self.ttbr1, self.tcr = ttbr0, ttbr1, tcr
        self.t0sz = _field(tcr, 0, 6)
        self.t1sz = _field(tcr, 16, 6)
        tg0, tg1 = _field(tcr, 14, 2), _field(tcr, 30, 2)
        if tg0 not in _TG0:
            raise ValueError(f"TCR.TG0={tg0:#b} is reserved")
        if tg1 not in _TG1:
            raise ValueError(f"TCR.TG1={tg1:#b} is reserved")
        self.granule0, self.granule1 = _TG0[tg0], _TG1[tg1]
        self.epd0, self.epd1 = bool(tcr >> 7 & 1), bool(tcr >> 23 & 1)
        self.root_key = (ttbr0 & TTBR_BADDR_MASK) ^ ((ttbr1 & TTBR_BADDR_MASK) << 1) ^ tcr

    def _select(self, vaddr: int) -> tuple[int, int, int, str]:
        """(table base, VA bits, granule shift, TTBR name) for ``vaddr``."""
        bits0, bits1 = 64 - self.t0sz, 64 - self.t1sz
        if vaddr < 1 << bits0:
            if self.epd0:
                raise TranslationError(vaddr, "TTBR0", "walks disabled by TCR.EPD0")
            return self.ttbr0 & TTBR_BADDR_MASK, bits0, self.granule0, "TTBR0"
        if vaddr >= (1 << 64) - (1 << bits1):
            if self.epd1:
                raise TranslationError(vaddr, "TTBR1", "walks disabled by TCR.EPD1")
            return self.ttbr1 & TTBR_BADDR_MASK, bits1, self.granule1, "TTBR1"
        raise TranslationError(vaddr, "TTBR", f"outside both TTBR0 ({bits0}-bit) and TTBR1 ({bits1}-bit) ranges")

    def _walk(self, vaddr: int) -> Page:
        if not 0 <= vaddr < 1 << 64:
            raise TranslationError(vaddr & ((1 << 64) - 1), "TTBR", "address out of 64-bit range")
        table, va_bits, g, _ttbr = self._select(vaddr)
        stride = g - 3
        levels = -(-(va_bits - g) // stride)
        start = 4 - levels
        writable = user = True
        uxn = pxn = False
        for level in range(start, 4):
            shift = g + (3 - level) * stride
            width = min(stride, va_bits - shift)
            name = f"L{level}"
            entry_addr = table + ((vaddr >> shift) & ((1 << width) - 1)) * 8
            entry = self._entry(entry_addr)
            if not entry & 1:
                raise TranslationError(vaddr, name, "invalid descriptor", entry, entry_addr)
            is_table = bool(entry & 2)
            if level == 3 or not is_table:
                if level == 3 and not is_table:
                    raise TranslationError(vaddr, name, "reserved descriptor at last level", entry, entry_addr)
                if level != 3 and level not in _BLOCK_LEVELS[g]:
                    raise TranslationError(vaddr, name, f"block descriptor not allowed at {name} with {1 << g >> 10}K granule", entry, entry_addr)
                size = 1 << shift
                writable &= not entry >> 7 & 1
                user &= bool(entry >> 6 & 1)
                pxn |= bool(entry >> 53 & 1)
                uxn |= bool(entry >> 54 & 1)
                pbase = entry & OA_MASK & ~(size - 1)
                return Page(vaddr & ~(size - 1), pbase, size, writable, user, uxn if user else pxn, name)
            aptable = entry >> 61 & 3
            user &= not aptable & 1
            writable &= not aptable & 2
            uxn |= bool(entry >> 60 & 1)
            pxn |= bool(entry >> 59 & 1)
            table = entry & OA_MASK & ~((1 << g) - 1)
        raise AssertionError("unreachable")


def stage1_address(phys: PhysicalMemory, vaddr: int, sctlr: int, tcr: int, ttbr0: int, ttbr1: int,
                   cache: TranslationCache | None = None) -> int:
    """Guest-physical address of ``vaddr`` for a CPU with these EL1 system
    registers: ``vaddr`` itself while SCTLR_EL1.M is clear (MMU off), else
    the stage-1 walk. One rule for every arm64 back end (KVM and the
    emulated CPU). Raises what the walk raises (VmiError, ValueError)."""
    if not sctlr & SCTLR_M:
        return vaddr
    return Aarch64Paging(phys, ttbr0, ttbr1, tcr, cache).translate(vaddr).paddr
