"""Guest RAM: one ``memfd`` mapped into the VMM, shared by every back end.

Why a memfd: another process (``vmscope inspect``, a test, an
introspection tool) can map the very same pages through ``/proc/PID/fd/N``
or an inherited fd and read guest-physical memory with no protocol round
trip. The VMM itself reads big ranges straight from this mapping, which is
what makes bulk memory reads fast. KVM gets the mapping as a memory slot
(``host_address``); every emulated CPU maps the same host buffer
(``Uc.mem_map_ptr``), so a store by one vCPU is seen by all of them.

RAM is one contiguous range ``[base, base + size)``: 0 on x86, 1 GiB on
arm64 (QEMU's virt layout).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os

from vmscope.gdbserver.target import TargetError

PAGE = 4096


class OutsideRam(TargetError, IndexError):
    """A guest-physical range that is not all RAM. A TargetError, so the stub
    answers GDB with an error packet; an IndexError for code that only
    checks bounds."""


class GuestRam:
    """``size`` bytes of guest-physical RAM starting at ``base``.

    ``fd``, ``base`` and ``size`` are public so other mappers can share the
    pages; ``view`` is a memoryview of the mapping indexed by offset from
    ``base`` (byte-exact slices and stores without a copy).
    """

    def __init__(self, base: int, size: int, name: str = "vmscope-ram") -> None:
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM size must be a positive multiple of {PAGE}, got {size}")
        self.base = base
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
        anchor = ctypes.c_char.from_buffer(self._map)
        #: host virtual address of the first byte (KVM memory slot, Unicorn mem_map_ptr)
        self.host_address = ctypes.addressof(anchor)
        del anchor  # drop the buffer export so close() can unmap

    @property
    def end(self) -> int:
        return self.base + self.size

    def contains(self, addr: int, length: int = 1) -> bool:
        return self.base <= addr and addr + length <= self.end

    def _check(self, addr: int, length: int) -> None:
        if length < 0 or not self.contains(addr, max(length, 1)):
            raise OutsideRam(
                f"guest-physical range {addr:#x}+{length:#x} is outside RAM {self.base:#x}-{self.end:#x}",
                errno.EFAULT,
            )

    def read(self, addr: int, length: int) -> bytes:
        """Guest-physical read; the whole range must be RAM."""
        self._check(addr, length)
        off = addr - self.base
        return bytes(self.view[off : off + length])

    def write(self, addr: int, data: bytes) -> None:
        self._check(addr, len(data))
        off = addr - self.base
        self.view[off : off + len(data)] = data

    def read_u64(self, addr: int) -> int:
        return int.from_bytes(self.read(addr, 8), "little")

    def close_fd(self) -> None:
        """Drop the memfd (the mapping stays valid for CPUs still using it)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unmap and close. Exported views keep the mapping alive, so the
        unmap is best effort (the process exit then releases it)."""
        try:
            self.view.release()
            self._map.close()
        except (BufferError, ValueError):
            pass
        self.close_fd()
