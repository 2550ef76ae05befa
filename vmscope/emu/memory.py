"""Guest RAM for the emulated target: one memfd mapping shared by every CPU.

Each CPU's Unicorn instance maps the same host buffer (``mem_map_ptr``), so a
store by one vCPU is seen by all of them, and the debugger reads and patches
guest memory by slicing the mapping directly, without a Unicorn call. Backing
it with a memfd (as the KVM VMM does) lets another process map guest memory
too.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from vmscope.gdbserver.target import TargetError


class GuestRam:
    """``size`` bytes of guest-physical RAM starting at ``base``."""

    def __init__(self, base: int, size: int, name: str = "vmscope-emu-ram") -> None:
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(f"guest RAM size {size:#x} must be a positive multiple of {mmap.PAGESIZE:#x}")
        self.base = base
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size)
        self._anchor = ctypes.c_char.from_buffer(self.map)
        #: host address of the first byte (for ``Uc.mem_map_ptr``)
        self.host_address = ctypes.addressof(self._anchor)

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.end

    def read(self, addr: int, length: int) -> bytes:
        """Guest-physical read; the whole range must be RAM."""
        self._check(addr, length)
        off = addr - self.base
        return self.map[off : off + length]

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        off = addr - self.base
        self.map[off : off + len(data)] = data

    def _check(self, addr: int, length: int) -> None:
        if length < 0 or not self.contains(addr, max(length, 1)):
            raise TargetError(
                f"guest-physical range {addr:#x}+{length:#x} is outside RAM {self.base:#x}-{self.end:#x}",
                errno.EFAULT,
            )

    def close_fd(self) -> None:
        """Drop the memfd (the mapping stays valid for CPUs still holding it)."""
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = -1

    def close(self) -> None:
        """Release the mapping; Unicorn instances using it must be gone."""
        try:
            del self._anchor
            self.map.close()
        except (BufferError, AttributeError):
            pass  # a CPU still maps it: leave it to the process exit
        self.close_fd()
