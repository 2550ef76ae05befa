"""Instruction-cache maintenance after the VMM patches guest code.

The VMM writes breakpoints through its own mapping of guest RAM; on arm64
the data and instruction caches are not coherent for that (unless the CPU
has CTR_EL0.IDC/DIC), so a vCPU could go on executing the old
instruction. The fix is what ``__builtin___clear_cache`` does: ``dc cvau``
(clean to the point of unification) over the range, ``dsb ish``, ``ic ivau``,
``dsb ish``, ``isb``. Linux lets EL0 run these (SCTLR_EL1.UCI). Python has
no way to emit them, so a 56-byte routine is placed in an executable page
and called through ctypes.

The loop steps 16 bytes, the smallest cache line the architecture allows
(CTR_EL0 line sizes are at least 4 words), so it is right on every CPU.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import platform

# void clear_cache(uint64_t start, uint64_t end); assembled from:
#   mov x2, x0; 1: dc cvau, x2; add x2, x2, #16; cmp x2, x1; b.lo 1b; dsb ish
#   mov x2, x0; 2: ic ivau, x2; add x2, x2, #16; cmp x2, x1; b.lo 2b; dsb ish; isb; ret
CLEAR_CACHE_A64 = bytes.fromhex(
    "e20300aa227b0bd5424000915f0001eba3ffff549f3b03d5"
    "e20300aa22750bd5424000915f0001eba3ffff549f3b03d5df3f03d5c0035fd6"
)
LINE = 16


@functools.lru_cache(maxsize=1)
def _routine():
    page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
    page.write(CLEAR_CACHE_A64)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(page))
    fn = ctypes.CFUNCTYPE(None, ctypes.c_uint64, ctypes.c_uint64)(addr)
    return page, fn


def clear_cache(host_addr: int, length: int) -> None:
    """Make instructions written at host ``[host_addr, host_addr+length)``
    visible to instruction fetch (no-op on hosts that are not arm64)."""
    if length <= 0 or platform.machine() not in ("aarch64", "arm64"):
        return
    start = host_addr & ~(LINE - 1)
    _routine()[1](start, host_addr + length)
