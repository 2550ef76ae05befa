"""Guest RAM: one ``memfd`` mapped into the VMM.

Why a memfd: another process (``vmscope inspect``, a test, an
introspection tool) can map the very same pages through ``/proc/PID/fd/N``
or an inherited fd and read guest-physical memory with no protocol round
trip. The VMM itself reads big ranges straight from this mapping, which is
what makes bulk memory reads fast.

RAM starts at guest-physical 0 and is contiguous; there is no PCI hole
below 4 GiB yet (the Linux-guest issue adds one when it needs MMIO there).
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os

PAGE = 4096


class GuestMemory:
    """Guest-physical RAM ``[0, size)`` backed by a memfd.

    ``fd`` and ``size`` are public so other mappers can share the pages.
    """

    def __init__(self, size: int, name: str = "vmscope-ram"):
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM size must be a positive multiple of {PAGE}, got {size}")
        self.size = size
        self.fd = os.memfd_create(name, os.MFD_CLOEXEC)
        os.ftruncate(self.fd, size)
        self._map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        # Huge pages where the host allows them for shared memory
        # (/sys/kernel/mm/transparent_hugepage/shmem_enabled = advise): KVM
        # then maps guest RAM in 2 MiB pages, and a Linux guest's first
        # touch of its memory costs far fewer nested-paging faults (about
        # 1.5 s of a 9 s boot in the nested lab). A no-op otherwise.
        with contextlib.suppress(OSError, AttributeError):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.view = memoryview(self._map)
        # The host virtual address KVM needs for the memory slot.
        anchor = ctypes.c_char.from_buffer(self._map)
        self.host_addr = ctypes.addressof(anchor)
        del anchor  # drop the buffer export so close() can unmap

    def contains(self, addr: int, length: int = 1) -> bool:
        return 0 <= addr and addr + length <= self.size

    def _check(self, addr: int, length: int) -> None:
        if not self.contains(addr, length):
            raise IndexError(
                f"guest-physical range {addr:#x}+{length:#x} is outside RAM (0..{self.size:#x})"
            )

    def read(self, addr: int, length: int) -> bytes:
        self._check(addr, length)
        return bytes(self.view[addr : addr + length])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        self.view[addr : addr + len(data)] = data

    def read_u64(self, addr: int) -> int:
        self._check(addr, 8)
        return int.from_bytes(self.view[addr : addr + 8], "little")

    def close(self) -> None:
        """Unmap and close. Exported views (from ``c_char.from_buffer``) keep
        the mapping alive, so the mmap close is best effort."""
        try:
            self.view.release()
            self._map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
