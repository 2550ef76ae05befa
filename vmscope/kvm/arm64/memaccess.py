"""Guest memory as the arm64 KVM debug target's debugger sees it: virtual
addresses through a software walk of TTBR0_EL1/TTBR1_EL1 per TCR_EL1 (the
shared :class:`vmscope.vmi.paging.Aarch64Paging`; KVM_TRANSLATE does not
exist on arm64), our BRKs hidden from reads and kept under writes, the
instruction cache cleaned after code changes.
"""

from __future__ import annotations

import errno
import struct

from vmscope.arch.aarch64 import AARCH64
from vmscope.gdbserver.target import TargetError
from vmscope.gdbserver.toolkit import hide_breakpoints, keep_breakpoints, physical_pieces
from vmscope.kvm.arm64.icache import clear_cache
from vmscope.kvm.arm64.vcpu import Arm64Vcpu
from vmscope.vmi.errors import VmiError
from vmscope.vmi.paging import stage1_address

BRK0 = AARCH64.breakpoint  # d4200000, little-endian


class Arm64Memory:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: guest memory."""

    def _phys(self, vaddr: int, v: Arm64Vcpu) -> int:
        """Guest-physical address of ``vaddr`` for vCPU ``v`` (TargetError if unmapped)."""
        try:
            regs = (v.sys(name) for name in ("SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1"))  # cached per stop
            return stage1_address(self.ram, vaddr, *regs, cache=self.walks)
        except (VmiError, TargetError, ValueError) as e:
            raise TargetError(f"virtual address {vaddr:#x} is not mapped: {e}") from None

    def translate(self, addr: int, tid: int) -> int:
        return self._phys(addr, self._vcpu(tid))

    def _pieces(self, addr: int, length: int, tid: int) -> tuple[list[tuple[int, int]], int | None]:
        """Physical (start, length) pieces of a virtual range inside RAM, up
        to the first page that is unmapped or not RAM (returned too)."""
        v = self._vcpu(tid)
        pieces, bad, _ = physical_pieces(addr, length, lambda vaddr: self._phys(vaddr, v), self.ram.contains)
        return pieces, bad

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        if length <= 0:
            return b""
        if addr < 0 or addr + length > 1 << 64:
            raise TargetError(f"address {addr:#x}+{length} is outside the 64-bit address space", errno.EINVAL)
        pieces, bad = self._pieces(addr, length, tid)
        if not pieces:
            raise TargetError(f"cannot read {addr:#x}: not mapped to guest RAM")
        data = bytearray()
        for start, n in pieces:
            data += self.ram.read(start, n)
        with self._lock:
            data = hide_breakpoints(addr, data, self.sw)
        return bytes(data)

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        if not data:
            return
        pieces, bad = self._pieces(addr, len(data), tid)
        if bad is not None:
            raise TargetError(f"cannot write {addr:#x}+{len(data)}: {bad:#x} is not mapped to guest RAM")
        with self._lock:
            buf = keep_breakpoints(addr, data, self.sw, BRK0)  # our BRKs stay
            off = 0
            for start, n in pieces:
                self.ram.write(start, buf[off: off + n])
                self._code_changed(start, n)
                off += n

    def _code_changed(self, phys: int, length: int) -> None:
        clear_cache(self.ram.host_address + phys - self.ram.base, length)

    def read_physical(self, addr: int, length: int) -> bytes:
        if not self.ram.contains(addr, 1):
            raise TargetError(f"guest-physical address {addr:#x} is outside RAM ({self.ram.base:#x}-{self.ram.end:#x})")
        return self.ram.read(addr, min(length, self.ram.end - addr))

    def write_physical(self, addr: int, data: bytes) -> None:
        if not self.ram.contains(addr, len(data)):
            raise TargetError(f"guest-physical range {addr:#x}+{len(data)} is outside RAM")
        self.ram.write(addr, data)
        self._code_changed(addr, len(data))

    def _insn_at(self, v: Arm64Vcpu, pc: int) -> int | None:
        """The instruction in guest RAM at ``pc`` (our BRKs included)."""
        try:
            phys = self._phys(pc, v)
            return struct.unpack("<I", self.ram.read(phys, 4))[0]
        except TargetError:
            return None
