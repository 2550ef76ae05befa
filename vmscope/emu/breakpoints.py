"""Software breakpoints patched into guest RAM, kept invisible to the debugger.

The breakpoint instruction sits in RAM while the debugger sees (and writes)
the original bytes underneath, as gdbserver does: reads overlay the saved
originals, writes over a breakpoint update its original and keep the
breakpoint in, and breakpoints that overlap (unaligned arm64 ones) keep each
other's bytes whatever order they are removed in.
"""

from __future__ import annotations

from typing import Iterator

from vmscope.devices.ram import GuestRam


class PatchedBreakpoints:
    """Inserted software breakpoints by guest-virtual address."""

    def __init__(self, ram: GuestRam, opcode: bytes) -> None:
        self.ram = ram
        self.opcode = opcode
        self._by_addr: dict[int, tuple[int, bytes]] = {}  # address -> (physical, original bytes)

    def __contains__(self, addr: int) -> bool:
        return addr in self._by_addr

    def _overlapping(self, addr: int, length: int) -> Iterator[tuple[int, int, int, int, bytes]]:
        """(breakpoint address, start, end, physical, original) for each
        breakpoint overlapping ``[addr, addr + length)``."""
        size = len(self.opcode)
        for bp_addr, (phys, original) in list(self._by_addr.items()):
            lo, hi = max(bp_addr, addr), min(bp_addr + size, addr + length)
            if lo < hi:
                yield bp_addr, lo, hi, phys, original

    def insert(self, addr: int, phys: int) -> None:
        original = bytearray(self.ram.read(phys, len(self.opcode)))
        self.hide(addr, original)  # an overlapping breakpoint's bytes are not guest code
        self.ram.write(phys, self.opcode)
        self._by_addr[addr] = (phys, bytes(original))

    def remove(self, addr: int) -> bool:
        """Put the original bytes back; False if there was no breakpoint."""
        entry = self._by_addr.pop(addr, None)
        if entry is None:
            return False
        phys, original = entry
        self.ram.write(phys, original)
        for other, lo, hi, other_phys, _ in self._overlapping(addr, len(self.opcode)):
            self.ram.write(other_phys + (lo - other), self.opcode[lo - other : hi - other])  # they stay in
        return True

    def hide(self, addr: int, data: bytearray) -> None:
        """Replace breakpoint bytes in ``data`` (read at ``addr``) by the originals."""
        for bp_addr, lo, hi, _, original in self._overlapping(addr, len(data)):
            data[lo - addr : hi - addr] = original[lo - bp_addr : hi - bp_addr]

    def write_through(self, addr: int, data: bytes) -> bytes:
        """What to store in RAM for a debugger write of ``data`` at ``addr``:
        bytes under a breakpoint become its new original, the breakpoint
        stays in."""
        patched = bytearray(data)
        for bp_addr, lo, hi, phys, original in self._overlapping(addr, len(data)):
            new_original = bytearray(original)
            new_original[lo - bp_addr : hi - bp_addr] = data[lo - addr : hi - addr]
            self._by_addr[bp_addr] = (phys, bytes(new_original))
            patched[lo - addr : hi - addr] = self.opcode[lo - bp_addr : hi - bp_addr]
        return bytes(patched)
