"""Guest-virtual to guest-physical for the emulated CPUs.

Unicorn 2.1's Python binding has no public address translation, and the
debugger reads memory straight from the shared RAM mapping, so the target
walks the guest's page tables itself: x86_64 4-level paging (4 KiB, 2 MiB
and 1 GiB pages) and AArch64 stage-1 translation with a 4 KiB granule.
With paging off the address is physical.
"""

from __future__ import annotations

import errno
from typing import Callable

from vmscope.gdbserver.target import TargetError

ReadQword = Callable[[int], int]

_PHYS_MASK = (1 << 52) - 1


def _unmapped(addr: int, why: str) -> TargetError:
    return TargetError(f"virtual address {addr:#x} is not mapped ({why})", errno.EFAULT)


def x86_64_translate(addr: int, cr0: int, cr3: int, cr4: int, read_qword: ReadQword) -> int:
    """Translate with the 4-level tables at ``cr3`` (LA57 is not supported)."""
    if not cr0 & (1 << 31):
        return addr
    if cr4 & (1 << 12):
        raise _unmapped(addr, "5-level paging is not supported")
    table = cr3 & 0x000F_FFFF_FFFF_F000
    for level, shift in enumerate((39, 30, 21, 12)):
        entry = read_qword(table + ((addr >> shift) & 0x1FF) * 8)
        if not entry & 1:
            raise _unmapped(addr, f"level-{4 - level} entry not present")
        frame = entry & 0x000F_FFFF_FFFF_F000
        if shift in (30, 21) and entry & 0x80:  # 1 GiB or 2 MiB page
            return (frame & ~((1 << shift) - 1)) | (addr & ((1 << shift) - 1))
        table = frame
    return table | (addr & 0xFFF)


def aarch64_translate(addr: int, sctlr: int, tcr: int, ttbr0: int, ttbr1: int, read_qword: ReadQword) -> int:
    """Stage-1 EL1&0 translation, 4 KiB granule, no stage 2."""
    if not sctlr & 1:
        return addr
    upper = (addr >> 55) & 1
    txsz = (tcr >> 16) & 0x3F if upper else tcr & 0x3F
    granule_4k = ((tcr >> 30) & 3) == 2 if upper else ((tcr >> 14) & 3) == 0
    if not granule_4k:
        raise _unmapped(addr, "only the 4 KiB translation granule is supported")
    va_bits = 64 - txsz
    top = addr >> va_bits
    if top != (((1 << txsz) - 1) if upper else 0):
        raise _unmapped(addr, f"outside the {va_bits}-bit {'TTBR1' if upper else 'TTBR0'} range")
    table = (ttbr1 if upper else ttbr0) & 0x0000_FFFF_FFFF_FFFE
    level = 4 - -(-(va_bits - 12) // 9)
    while True:
        shift = 12 + 9 * (3 - level)
        index = (addr >> shift) & ((1 << min(9, va_bits - shift)) - 1)
        entry = read_qword(table + index * 8)
        kind = entry & 3
        out = entry & 0x0000_FFFF_FFFF_F000
        if kind == 3 and level < 3:  # next-level table
            table = out
            level += 1
            continue
        if kind == 3 or (kind == 1 and level in (1, 2)):  # page or block
            return (out & ~((1 << shift) - 1)) | (addr & ((1 << shift) - 1))
        raise _unmapped(addr, f"level-{level} descriptor {entry:#x} is not valid")
