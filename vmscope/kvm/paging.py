"""Guest-virtual to guest-physical translation for the debug target.

Order: paging off -> identity; else ``KVM_TRANSLATE`` on the vCPU that
asked; if KVM cannot answer (the ioctl fails, or the page tables sit in a
page vmscope has pulled out of the guest's memory slots to back a
watchpoint) a software walk of the 4-level tables from that vCPU's CR3,
reading RAM straight from the memfd. The Linux-guest issue extends the walk
(5-level paging, PAE for 32-bit kernels).

Results are cached per debug stop: the target drops the cache whenever a
vCPU runs, because the guest may change its page tables.
"""

from __future__ import annotations

from vmscope.devices.ram import GuestRam
from vmscope.kvm.vcpu import Vcpu

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
CR0_PG = 1 << 31
CR4_PAE = 1 << 5
CR4_LA57 = 1 << 12
EFER_LMA = 1 << 10
PTE_P = 1
PTE_PS = 1 << 7
ADDR_MASK = 0x000F_FFFF_FFFF_F000


def paging_enabled(vcpu: Vcpu) -> bool:
    return bool(vcpu.sregs().cr0 & CR0_PG)


def software_walk(mem: GuestRam, cr3: int, vaddr: int) -> int | None:
    """4-level (long mode) walk; None when a level is not present or the
    table lies outside RAM."""
    table = cr3 & ADDR_MASK
    for level, shift in ((4, 39), (3, 30), (2, 21), (1, 12)):
        entry_addr = table + ((vaddr >> shift) & 0x1FF) * 8
        if not mem.contains(entry_addr, 8):
            return None
        entry = mem.read_u64(entry_addr)
        if not entry & PTE_P:
            return None
        if level in (3, 2) and entry & PTE_PS:
            base = entry & ADDR_MASK & ~((1 << shift) - 1)
            return base | (vaddr & ((1 << shift) - 1))
        table = entry & ADDR_MASK
    return table | (vaddr & (PAGE - 1))


class Translator:
    """Per-stop cache of vCPU page translations."""

    def __init__(self, mem: GuestRam):
        self.mem = mem
        self._cache: dict[tuple[int, int], int | None] = {}

    def clear(self) -> None:
        self._cache.clear()

    def page(self, vcpu: Vcpu, vpage: int) -> int | None:
        """Physical address of the page holding virtual page ``vpage``
        (a page-aligned address) as ``vcpu`` sees it, or None."""
        key = (vcpu.index, vpage)
        try:
            return self._cache[key]
        except KeyError:
            pass
        phys = self._lookup(vcpu, vpage)
        self._cache[key] = phys
        return phys

    def _lookup(self, vcpu: Vcpu, vpage: int) -> int | None:
        # KVM_TRANSLATE first: one ioctl, and it knows every paging mode
        # (with paging off it answers the identity). Control registers
        # (KVM_GET_SREGS, 3x dearer) only when it cannot answer.
        try:
            phys = vcpu.translate(vpage)
        except OSError:
            phys = None
        if phys is None:
            sregs = vcpu.sregs()
            if not sregs.cr0 & CR0_PG:
                phys = vpage & 0xFFFF_FFFF if not sregs.efer & EFER_LMA else vpage
            elif sregs.efer & EFER_LMA and not sregs.cr4 & CR4_LA57:
                phys = software_walk(self.mem, sregs.cr3, vpage)
        return None if phys is None else phys & ~(PAGE - 1)
