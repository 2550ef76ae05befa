"""Guest memory as the x86 KVM debug target's debugger sees it: virtual
ranges split into guest-physical pieces through each vCPU's translation,
our INT3 bytes hidden from reads and kept under writes, physical access
straight through the RAM memfd.
"""

from __future__ import annotations

import errno
import os

from vmscope.gdbserver.target import TargetError
from vmscope.gdbserver.toolkit import hide_breakpoints, keep_breakpoints, physical_pieces
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu

INT3 = 0xCC


class X86Memory:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def translate(self, addr: int, tid: int) -> int:
        phys = self._phys_page(addr & ~(PAGE - 1), tid)
        if phys is None:
            raise TargetError(f"virtual address {addr:#x} is not mapped (thread {tid})")
        return phys | (addr & (PAGE - 1))

    def _phys_page(self, vpage: int, tid: int) -> int | None:
        """The selected vCPU's translation, then any other vCPU's. The image
        of a kernel caught at its entry comes first: the decompressor's page
        tables (still loaded then) do not map it, or map it wrongly."""
        image = self.kernel_image_page(vpage)
        if image is not None:
            return image
        first = self._vcpu(tid)
        phys = self.translator.page(first, vpage)
        if phys is None:
            for slot in self.m.vcpus:
                if slot.vcpu is not first and slot.online:
                    phys = self.translator.page(slot.vcpu, vpage)
                    if phys is not None:
                        break
        if phys is not None and not self.mem.contains(phys, PAGE):
            return None
        return phys

    def _pieces(self, addr: int, length: int, tid: int) -> tuple[list[tuple[int, int]], int | None]:
        """Physical (start, length) pieces of a virtual range, stopping at
        the first unmapped page (whose address is returned too)."""
        # Long ranges (memory dumps) walk the page tables once per large
        # page (Translator.leaf); not while a caught kernel's image is
        # mapped by hand, nor for the pages of a kernel image the VMM placed
        # (kernel_image_page: the boot page tables may not map it yet).
        big = length > 2 * PAGE and getattr(self, "_entry_trap", None) is None
        end = addr + length

        def phys_of(vaddr: int) -> int | tuple[int, int] | None:
            vpage = vaddr & ~(PAGE - 1)
            if big and self.kernel_image_page(vpage) is None:
                leaf = self.translator.leaf(self._vcpu(tid), vaddr)
                if leaf is not None and self.mem.contains(leaf[0], min(leaf[1], end - vaddr)):
                    return leaf
            page = self._phys_page(vpage, tid)
            return None if page is None else page | (vaddr & (PAGE - 1))

        pieces, bad, _ = physical_pieces(addr, length, phys_of)
        return pieces, bad

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        if length <= 0:
            return b""
        if addr < 0 or addr + length > 2**64:
            raise TargetError(f"address {addr:#x}+{length} is outside the 64-bit address space", errno.EINVAL)
        pieces, bad = self._pieces(addr, length, tid)
        if not pieces:
            raise TargetError(f"cannot read {addr:#x}: address not mapped")
        # pread, not the mapping: a never-touched page of the memfd then
        # reads as zeros without being allocated (first dumps of fresh RAM
        # spent half their time in page faults), and it is one copy.
        mem = self.mem
        if mem.fd >= 0:
            data = b"".join(os.pread(mem.fd, n, start - mem.base) for start, n in pieces)
        else:
            data = b"".join(mem.read(start, n) for start, n in pieces)
        with self._lock:
            if self.sw:
                data = hide_breakpoints(addr, data, self.sw)
        return data

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        if not data:
            return
        pieces, bad = self._pieces(addr, len(data), tid)
        if bad is not None:
            raise TargetError(f"cannot write {addr:#x}+{len(data)}: address {bad:#x} not mapped")
        self.translator.clear()  # the write may be to a page table
        with self._lock:
            buf = keep_breakpoints(addr, data, self.sw, bytes([INT3]))  # our 0xCC stays
            off = 0
            for start, n in pieces:
                self.mem.view[start : start + n] = buf[off : off + n]
                off += n

    def read_physical(self, addr: int, length: int) -> bytes:
        if not self.mem.contains(addr, 1):
            raise TargetError(f"guest-physical address {addr:#x} is outside RAM (0..{self.mem.size:#x})")
        return self.mem.read(addr, min(length, self.mem.size - addr))

    def write_physical(self, addr: int, data: bytes) -> None:
        if not self.mem.contains(addr, len(data)):
            raise TargetError(f"guest-physical range {addr:#x}+{len(data)} is outside RAM (0..{self.mem.size:#x})")
        self.translator.clear()  # the write may be to a page table
        self.mem.write(addr, data)

    def read_memory_raw(self, vaddr: int, v: Vcpu) -> int:
        phys = self._phys_page(vaddr & ~(PAGE - 1), v.index + 1)
        if phys is None:
            raise TargetError(f"{vaddr:#x} not mapped")
        return self.mem.view[phys | (vaddr & (PAGE - 1))]
