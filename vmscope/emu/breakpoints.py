"""Software breakpoints patched into guest RAM, kept invisible to the debugger.

The breakpoint instruction sits in RAM while the debugger sees (and writes)
the original bytes underneath, as gdbserver does: reads overlay the saved
originals, writes over a breakpoint update its original and keep the
breakpoint in, and breakpoints that overlap (unaligned arm64 ones) keep each
other's bytes whatever order they are removed in.
"""

from __future__ import annotations

from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.toolkit import InsertedBreakpoint, hide_breakpoints, keep_breakpoints, overlapping


class PatchedBreakpoints:
    """Inserted software breakpoints by guest-virtual address (the hiding
    itself is the targets' shared :mod:`vmscope.gdbserver.toolkit`)."""

    def __init__(self, ram: GuestRam, opcode: bytes) -> None:
        self.ram = ram
        self.opcode = opcode
        self._by_addr: dict[int, InsertedBreakpoint] = {}

    def __contains__(self, addr: int) -> bool:
        return addr in self._by_addr

    def insert(self, addr: int, phys: int) -> None:
        original = self.hide(addr, self.ram.read(phys, len(self.opcode)))  # an overlapping breakpoint's bytes are not guest code
        self.ram.write(phys, self.opcode)
        self._by_addr[addr] = InsertedBreakpoint(phys, bytes(original))

    def remove(self, addr: int) -> bool:
        """Put the original bytes back; False if there was no breakpoint."""
        bp = self._by_addr.pop(addr, None)
        if bp is None:
            return False
        self.ram.write(bp.phys, bp.orig)
        for other, lo, hi, other_bp in overlapping(addr, len(self.opcode), self._by_addr):
            self.ram.write(other_bp.phys + (lo - other), self.opcode[lo - other : hi - other])  # they stay in
        return True

    def hide(self, addr: int, data: bytes | bytearray) -> bytes | bytearray:
        """``data`` (read at ``addr``) with breakpoint bytes replaced by the originals."""
        return hide_breakpoints(addr, data, self._by_addr)

    def write_through(self, addr: int, data: bytes) -> bytes:
        """What to store in RAM for a debugger write of ``data`` at ``addr``:
        bytes under a breakpoint become its new original, the breakpoint
        stays in."""
        return keep_breakpoints(addr, data, self._by_addr, self.opcode)
