"""KVM memory slots over one RAM mapping, with pages that can be made
read-only or absent.

Normally one slot covers all RAM. Watchpoints and breakpoints that debug
registers cannot serve split it: the watched page gets a read-only slot
(write watches) or no slot at all (read/access watches, execution
breakpoints), so guest accesses exit to the VMM as MMIO. The slots are
rebuilt from the protected-page set on every change, which is cheap (a
handful of ioctls per watchpoint edit). Architecture-neutral: the x86 and
arm64 machines both map their RAM through it.
"""

from __future__ import annotations

from vmscope.kvm.abi import KVM_MEM_READONLY, KVM_SET_USER_MEMORY_REGION, KvmUserspaceMemoryRegion, ioctl

PAGE = 4096


class MemorySlots:
    def __init__(self, vm_fd: int, host_addr: int, base: int, size: int):
        self.vm_fd = vm_fd
        self.host_addr = host_addr  # where guest-physical ``base`` is mapped in the VMM
        self.base = base
        self.size = size
        self.active: int = 0  # slots currently defined
        self.protected: dict[int, str] = {}  # page number -> "readonly" | "absent"

    def map_ram(self) -> None:
        self._rebuild()

    def set_protection(self, protected: dict[int, str]) -> None:
        if protected != self.protected:
            self.protected = dict(protected)
            self._rebuild()

    def _set(self, slot: int, gpa: int, size: int, flags: int) -> None:
        host = self.host_addr + gpa - self.base if size else 0
        region = KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size,
                                          userspace_addr=host)
        ioctl(self.vm_fd, KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def _rebuild(self) -> None:
        end = self.base + self.size
        pieces: list[tuple[int, int, int]] = []  # gpa, size, flags
        cursor = self.base
        for page in sorted(self.protected):
            start = page * PAGE
            if start >= end or start < self.base:
                continue
            if start > cursor:
                pieces.append((cursor, start - cursor, 0))
            if self.protected[page] == "readonly":
                pieces.append((start, PAGE, KVM_MEM_READONLY))
            cursor = start + PAGE
        if cursor < end:
            pieces.append((cursor, end - cursor, 0))
        # Delete old slots first: KVM refuses overlapping slots.
        for slot in range(self.active):
            self._set(slot, 0, 0, 0)
        for slot, (gpa, sz, flags) in enumerate(pieces):
            self._set(slot, gpa, sz, flags)
        self.active = len(pieces)
