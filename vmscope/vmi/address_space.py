"""A virtual address space: a page-table walker over a physical source.

Reads spanning pages are split at page boundaries and physically contiguous
pieces are read in one go, so a large read of a linearly mapped range (the
kernel image, the direct map) costs one physical read per run, not per page.
"""

from __future__ import annotations

import struct

from vmscope.vmi.errors import TranslationError
from vmscope.vmi.memory import PhysicalMemory
from vmscope.vmi.paging.base import Translation, Walker

_U8, _U16, _U32, _U64 = (struct.Struct(f) for f in ("<B", "<H", "<I", "<Q"))


class AddressSpace:
    """Read and write virtual memory of one page-table root."""

    def __init__(self, walker: Walker):
        self.walker = walker
        self.phys: PhysicalMemory = walker.phys

    def translate(self, vaddr: int) -> Translation:
        return self.walker.translate(vaddr)

    def _runs(self, vaddr: int, size: int):
        """Yield (paddr, length) runs covering [vaddr, vaddr+size)."""
        run_start = run_len = None
        pos, end = vaddr, vaddr + size
        while pos < end:
            page = self.walker.page(pos)
            paddr = page.pbase + (pos - page.vbase)
            n = min(end, page.vbase + page.size) - pos
            if run_start is not None and run_start + run_len == paddr:
                run_len += n
            else:
                if run_start is not None:
                    yield run_start, run_len
                run_start, run_len = paddr, n
            pos += n
        if run_start is not None:
            yield run_start, run_len

    def read(self, vaddr: int, size: int) -> bytes:
        """``size`` bytes at ``vaddr``; raises :class:`TranslationError` for
        the first unmapped page."""
        if size <= 0:
            return b""
        page = self.walker.page(vaddr)
        offset = vaddr - page.vbase
        if offset + size <= page.size:  # the common case: one page, one physical read
            return self.phys.read(page.pbase + offset, size)
        parts = [self.phys.read(p, n) for p, n in self._runs(vaddr, size)]
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_partial(self, vaddr: int, size: int, fill: bytes = b"\0") -> tuple[bytes, list[tuple[int, int]]]:
        """Like :meth:`read` but unmapped pages read as ``fill``; also returns
        the (vaddr, length) holes. For scans over sparse ranges."""
        out = bytearray()
        holes: list[tuple[int, int]] = []
        pos, end = vaddr, vaddr + size
        while pos < end:
            try:
                page = self.walker.page(pos)
            except TranslationError:
                step = min(end, (pos | 0xFFF) + 1) - pos
                out += fill * step
                if holes and holes[-1][0] + holes[-1][1] == pos:
                    holes[-1] = (holes[-1][0], holes[-1][1] + step)
                else:
                    holes.append((pos, step))
                pos += step
                continue
            n = min(end, page.vbase + page.size) - pos
            out += self.phys.read(page.pbase + pos - page.vbase, n)
            pos += n
        return bytes(out), holes

    def write(self, vaddr: int, data: bytes) -> None:
        pos = 0
        runs = list(self._runs(vaddr, len(data)))  # translate all before writing any
        for paddr, n in runs:
            self.phys.write(paddr, data[pos : pos + n])
            pos += n

    def is_mapped(self, vaddr: int) -> bool:
        try:
            self.walker.page(vaddr)
            return True
        except TranslationError:
            return False

    # typed little-endian helpers
    def u8(self, vaddr: int) -> int:
        return _U8.unpack(self.read(vaddr, 1))[0]

    def u16(self, vaddr: int) -> int:
        return _U16.unpack(self.read(vaddr, 2))[0]

    def u32(self, vaddr: int) -> int:
        return _U32.unpack(self.read(vaddr, 4))[0]

    def u64(self, vaddr: int) -> int:
        return _U64.unpack(self.read(vaddr, 8))[0]

    def cstring(self, vaddr: int, limit: int = 256) -> str:
        """A NUL-terminated string, reading no further than ``limit`` bytes
        and never past the end of a page unless the string continues."""
        out = bytearray()
        pos = vaddr
        while len(out) < limit:
            chunk = self.read(pos, min(limit - len(out), 0x1000 - (pos & 0xFFF)))
            nul = chunk.find(b"\0")
            if nul >= 0:
                out += chunk[:nul]
                break
            out += chunk
            pos += len(chunk)
        return out.decode("utf-8", "replace")
