"""Guest-virtual to guest-physical translation for the x86 debug target.

Order: ``KVM_TRANSLATE`` on the vCPU that asked (one ioctl, and it knows
every paging mode; with paging off it answers the identity); if KVM cannot
answer (the ioctl fails, or the page tables sit in a page vmscope has
pulled out of the guest's memory slots to back a watchpoint) the shared
walker :class:`vmscope.vmi.paging.X86_64Paging` (4- and 5-level) over the
RAM memfd, from that vCPU's CR3; with paging off, the identity.

Why the vmi walker: one x86 page walker for the debug target and for
introspection (``vmscope inspect``), so a fix to one is a fix to both.

Results are cached per debug stop. When a vCPU runs (or the debugger
writes memory or control registers) the target calls :meth:`Translator.clear`:
the answers per vCPU go (a vCPU may load another CR3), and the walks' cache
is kept only if the page-table pages it read still hold the same bytes at
the next translation (``TranslationCache.still_valid``), as they mostly do
from one stop of a stepping or breakpoint loop to the next.
"""

from __future__ import annotations

from vmscope.vmi.errors import VmiError
from vmscope.vmi.paging import TranslationCache, X86_64Paging

PAGE_SHIFT = 12
PAGE = 1 << PAGE_SHIFT
CR0_PG = 1 << 31
EFER_LMA = 1 << 10


def software_walk(mem, cr3: int, vaddr: int, cr4: int = 0, cache: TranslationCache | None = None) -> int | None:
    """The long-mode walk of :class:`~vmscope.vmi.paging.X86_64Paging` over
    guest RAM ``mem``; None when a level is not present or a table lies
    outside RAM."""
    try:
        return X86_64Paging(mem, cr3, cr4=cr4, cache=cache).translate(vaddr).paddr
    except (VmiError, ValueError, IndexError, OSError):
        return None


def walk_leaf(mem, cr3: int, vaddr: int, cr4: int = 0, cache: TranslationCache | None = None) -> tuple[int, int] | None:
    """The same walk: (physical address of ``vaddr``, bytes from ``vaddr``
    to the end of the page, large or not, that maps it); None where
    :func:`software_walk` says None. Long reads take a whole 2 MiB or 1 GiB
    page in one piece this way."""
    try:
        t = X86_64Paging(mem, cr3, cr4=cr4, cache=cache).translate(vaddr)
    except (VmiError, ValueError, IndexError, OSError):
        return None
    return t.paddr, t.page.vbase + t.page.size - vaddr


class Translator:
    """Per-stop cache of vCPU page translations."""

    def __init__(self, mem):
        self.mem = mem
        self._cache: dict[tuple[int, int], int | None] = {}
        self._walks_cache = TranslationCache()
        self._recheck = False

    def clear(self) -> None:
        self._cache.clear()
        self._recheck = True

    @property
    def _walks(self) -> TranslationCache:
        """The walks' cache, checked against the page tables after a clear."""
        if self._recheck:
            self._recheck = False
            if not self._walks_cache.still_valid(self.mem):
                self._walks_cache.invalidate()
        return self._walks_cache

    def leaf(self, vcpu, vaddr: int) -> tuple[int, int] | None:
        """(physical address, bytes to the end of the mapping page) for
        long reads: one walk per 2 MiB or 1 GiB page instead of one
        KVM_TRANSLATE (8-20 us) per 4 KiB. None where this walk does not
        apply (32-bit paging): use :meth:`page`. Costs one KVM_GET_SREGS
        per stop, so short reads should not."""
        s = vcpu.sregs()
        if not s.cr0 & CR0_PG and not s.efer & EFER_LMA:  # paging off: identity, below 4 GiB
            low = vaddr & 0xFFFF_FFFF
            return low, (1 << 32) - low
        if not s.cr0 & CR0_PG or not s.efer & EFER_LMA:
            return None
        return walk_leaf(self.mem, s.cr3, vaddr, s.cr4, self._walks)

    def page(self, vcpu, vpage: int) -> int | None:
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

    def _lookup(self, vcpu, vpage: int) -> int | None:
        # With the control registers at hand for free (KVM_CAP_SYNC_REGS put
        # them in kvm_run at the exit), a walk of the tables in the memfd (a
        # few us, the vmi walker, 4- or 5-level) beats KVM_TRANSLATE (an
        # ioctl, 8-20 us), the first read of every stop. Else KVM_TRANSLATE
        # first: it knows every paging mode; control registers
        # (KVM_GET_SREGS, 3x dearer) only when it cannot answer.
        if vcpu.sregs_at_hand():
            sregs = vcpu.sregs()
            if not sregs.cr0 & CR0_PG and not sregs.efer & EFER_LMA:
                return vpage & 0xFFFF_F000
            if sregs.cr0 & CR0_PG and sregs.efer & EFER_LMA:
                phys = software_walk(self.mem, sregs.cr3, vpage, sregs.cr4, self._walks)
                if phys is not None:
                    return phys & ~(PAGE - 1)
        try:
            phys = vcpu.translate(vpage)
        except OSError:
            phys = None
        if phys is None:
            sregs = vcpu.sregs()
            if not sregs.cr0 & CR0_PG:
                phys = vpage & 0xFFFF_FFFF if not sregs.efer & EFER_LMA else vpage
            elif sregs.efer & EFER_LMA:
                phys = software_walk(self.mem, sregs.cr3, vpage, sregs.cr4, self._walks)
        return None if phys is None else phys & ~(PAGE - 1)
