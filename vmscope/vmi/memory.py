"""Physical memory sources: the bottom layer of introspection.

Everything above (page-table walkers, address spaces, the Linux layer) reads
guest-physical memory through the tiny :class:`PhysicalMemory` protocol, so a
test can hand it a ``bytearray`` holding synthetic page tables and a live
session can hand it guest RAM mapped from a memfd, QEMU's shared RAM file, or
a GDB stub in physical-memory mode.
"""

from __future__ import annotations

import mmap
import os
from dataclasses import dataclass
from typing import Protocol, Sequence, runtime_checkable

from vmscope.vmi.errors import PhysicalMemoryError


@runtime_checkable
class PhysicalMemory(Protocol):
    """Read (and optionally write) guest-physical memory.

    ``read`` returns exactly ``size`` bytes or raises
    :class:`PhysicalMemoryError`; it never returns a short read, so callers
    need no length checks.
    """

    def read(self, addr: int, size: int) -> bytes: ...

    def write(self, addr: int, data: bytes) -> None: ...


class BytesMemory:
    """Physical memory held in a buffer (``bytes``, ``bytearray``, ``mmap``),
    starting at guest-physical ``base``. Used by tests and for dumps."""

    def __init__(self, buf: bytes | bytearray | memoryview | mmap.mmap, base: int = 0):
        self._buf = buf
        self._view = memoryview(buf)
        self.base = base
        self.size = len(self._view)

    def read(self, addr: int, size: int) -> bytes:
        off = addr - self.base
        if size < 0 or off < 0 or off + size > self.size:
            raise PhysicalMemoryError(addr, size)
        return bytes(self._view[off : off + size])

    def write(self, addr: int, data: bytes) -> None:
        off = addr - self.base
        if off < 0 or off + len(data) > self.size:
            raise PhysicalMemoryError(addr, len(data))
        if self._view.readonly:
            raise PhysicalMemoryError(addr, len(data), "memory source is read-only")
        self._view[off : off + len(data)] = data


@dataclass(frozen=True)
class Region:
    """``size`` bytes of guest-physical memory at ``gpa`` held at ``offset``
    of a buffer. Several regions can share one buffer (QEMU's RAM above and
    below the PCI hole are two windows into one file)."""

    gpa: int
    size: int
    buffer: object  # bytes-like supporting memoryview
    offset: int = 0

    @property
    def end(self) -> int:
        return self.gpa + self.size


class RegionMemory:
    """Physical memory made of disjoint regions, e.g. RAM split by the PCI
    hole. A read spanning two adjacent regions is stitched together; a read
    touching a gap raises :class:`PhysicalMemoryError` naming the gap."""

    def __init__(self, regions: Sequence[Region]):
        self.regions = sorted(regions, key=lambda r: r.gpa)
        self._views = [memoryview(r.buffer) for r in self.regions]
        for a, b in zip(self.regions, self.regions[1:]):
            if a.end > b.gpa:
                raise ValueError(f"regions overlap: 0x{a.gpa:x}+0x{a.size:x} and 0x{b.gpa:x}")

    def _chunks(self, addr: int, size: int):
        """Yield (view, start, length) covering [addr, addr+size)."""
        pos, end = addr, addr + size
        for region, view in zip(self.regions, self._views):
            if pos >= end:
                break
            if region.end <= pos:
                continue
            if region.gpa > pos:
                raise PhysicalMemoryError(pos, end - pos, "falls in a hole between RAM regions")
            n = min(end, region.end) - pos
            start = region.offset + pos - region.gpa
            yield view, start, n
            pos += n
        if pos < end:
            raise PhysicalMemoryError(pos, end - pos)

    def read(self, addr: int, size: int) -> bytes:
        if size < 0:
            raise PhysicalMemoryError(addr, size, "negative size")
        for region, view in zip(self.regions, self._views):  # fast path: inside one region
            if region.gpa <= addr and addr + size <= region.end:
                start = region.offset + addr - region.gpa
                return view[start : start + size].tobytes()
        parts = [view[start : start + n] for view, start, n in self._chunks(addr, size)]
        return parts[0].tobytes() if len(parts) == 1 else b"".join(parts)

    def readinto(self, addr: int, buffer: bytearray | memoryview) -> int:
        """Fill ``buffer`` from ``addr`` without allocating: for bulk copies
        into a buffer that is reused (a fresh 64 MiB ``bytes`` costs page
        faults that dwarf the copy itself)."""
        out = memoryview(buffer).cast("B")
        pos = 0
        for view, start, n in self._chunks(addr, len(out)):
            out[pos : pos + n] = view[start : start + n]
            pos += n
        return pos

    def write(self, addr: int, data: bytes) -> None:
        pos = 0
        for view, start, n in list(self._chunks(addr, len(data))):
            view[start : start + n] = data[pos : pos + n]
            pos += n


def map_file_regions(path_or_fd: str | int, regions: Sequence[tuple[int, int, int]], writable: bool = False) -> RegionMemory:
    """Map a RAM file (QEMU's ``memory-backend-file``, a memfd via
    ``/proc/PID/fd/N``) once and expose ``(gpa, size, file_offset)`` windows
    of it as :class:`RegionMemory`."""
    fd = os.open(path_or_fd, os.O_RDWR if writable else os.O_RDONLY) if isinstance(path_or_fd, str) else path_or_fd
    try:
        length = os.fstat(fd).st_size
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        mapping = mmap.mmap(fd, length, mmap.MAP_SHARED, prot)
    finally:
        if isinstance(path_or_fd, str):
            os.close(fd)
    for gpa, size, off in regions:
        if off + size > length:
            raise ValueError(f"region 0x{gpa:x}+0x{size:x} at file offset 0x{off:x} runs past the file's end (0x{length:x})")
    return RegionMemory([Region(gpa, size, mapping, off) for gpa, size, off in regions])
