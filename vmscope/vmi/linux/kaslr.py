"""Where the x86_64 kernel image is: the KASLR slide, virtual and physical.

The first 2 MiB page mapped in the top 1 GiB of the address space is
``_text``: the boot code unmaps the rest of the kernel mapping outside
``_text`` .. ``_end``.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.vmi.errors import TranslationError, VmiError
from vmscope.vmi.memory import PhysicalMemory
from vmscope.vmi.paging.base import TranslationCache
from vmscope.vmi.paging.x86_64 import X86_64Paging

START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # x86_64 __START_KERNEL_map
DEFAULT_TEXT = 0xFFFF_FFFF_8100_0000  # _text without KASLR (LOAD_PHYSICAL_ADDR 16 MiB)
KERNEL_IMAGE_END = 0xFFFF_FFFF_C000_0000  # KERNEL_IMAGE_SIZE with KASLR: 1 GiB
PTI_USER_PGD = 1 << 12  # with PTI, the user half of an 8 KiB PGD pair

class KernelNotFound(VmiError):
    """No Linux kernel image in the memory these page tables map."""


@dataclass(frozen=True)
class KernelLocation:
    text: int  # virtual _text (rounded down to its 2 MiB page)
    end: int  # end of the contiguous kernel image mapping
    slide: int  # KASLR virtual slide: text - 0xffffffff81000000
    phys_text: int  # physical address of _text
    root: int  # page-table root the image was found through


def find_kernel_image(phys: PhysicalMemory, cr3: int, cr4: int = 0, cache: TranslationCache | None = None) -> KernelLocation:
    """Find the kernel image in the top 1 GiB of the address space: the first
    2 MiB page mapped there is ``_text`` (the boot code unmaps the rest of the
    kernel mapping outside ``_text``.. ``_end``). With PTI the CPU may have
    stopped on the user PGD, which maps almost none of the kernel; then the
    kernel PGD is the other half of the 8 KiB pair."""
    tried = []
    for root in dict.fromkeys((cr3 & ~0xFFF, cr3 & ~0xFFF & ~PTI_USER_PGD)):
        walker = X86_64Paging(phys, root, cr4=cr4, cache=cache)
        start = end = None
        for va in range(START_KERNEL_MAP, KERNEL_IMAGE_END, 0x200000):
            try:
                walker.page(va)
            except TranslationError:
                if start is not None:
                    break
                continue
            except VmiError:
                break
            if start is None:
                start = va
            end = va + 0x200000
        tried.append(f"0x{root:x}")
        if start is not None and end is not None and end - start >= 4 << 20:
            return KernelLocation(start, end, start - DEFAULT_TEXT, walker.translate(start).paddr, root)
    raise KernelNotFound(f"no kernel image mapped at 0x{START_KERNEL_MAP:x}-0x{KERNEL_IMAGE_END:x} "
                         f"through page tables at {', '.join(tried)} (is this an x86_64 Linux guest in long mode?)")




# ---------------------------------------------------------------- arm64

ARM64_IMAGE_MAGIC = b"ARM\x64"  # at offset 0x38 of the arm64 Image header
MODULES_VSIZE = 128 << 20
HEAD_TEXT_SIZE = 64 << 10  # .head.text: _text .. _stext (SEGMENT_ALIGN)


def arm64_kimage_vaddr(walker) -> int:
    """KIMAGE_VADDR: the unrandomised ``_text``, 128 MiB above the start of
    the kernel half (``MODULES_END``) for the configured VA size."""
    va_bits = 64 - walker.t1sz
    return (1 << 64) - (1 << (va_bits - 1)) + MODULES_VSIZE


def find_arm64_kernel_image(boot, text_address: int, walker, max_image: int = 512 << 20,
                            loaded: tuple[int, int] | None = None) -> KernelLocation:
    """Walk down from a kernel text address to the first unmapped page:
    that is where ``_stext`` starts. The 64 KiB before it (``_text``, the
    Image header) is not mapped once the kernel runs, but the image is
    physically contiguous, so the header is read from physical memory; its
    size field gives the end of the image.

    ``loaded``: (physical ``_text``, image size) when the caller put the
    Image there itself (a VMM's loader). Then no header is read: the kernel
    reserves only ``_stext`` onwards, so once it runs the page allocator
    may reuse the 64 KiB header page (it did under vmscope's arm64 VMM)."""
    granule = 1 << walker.granule1
    pos = text_address & ~(granule - 1)
    if not boot.is_mapped(pos):
        raise KernelNotFound(f"0x{text_address:x} is not mapped through TTBR1: not a kernel text address")
    lowest = pos - max_image
    while pos - granule >= lowest and boot.is_mapped(pos - granule):
        pos -= granule
    phys = walker.translate(pos).paddr
    if loaded is not None:
        phys_text, size = loaded
        text = pos - (phys - phys_text)
        return KernelLocation(text, text + size, text - arm64_kimage_vaddr(walker), phys_text, walker.ttbr1)
    for head in (0, HEAD_TEXT_SIZE):  # _text itself mapped, or 64 KiB below _stext
        try:
            header = boot.phys.read(phys - head, 64)
        except VmiError:
            continue
        if header[0x38:0x3C] == ARM64_IMAGE_MAGIC:
            break
    else:
        return _arm64_image_without_header(boot, walker, pos, phys, text_address, max_image)
    text = pos - head
    size = int.from_bytes(header[0x10:0x18], "little")
    if not 0 < size <= max_image:
        raise KernelNotFound(f"arm64 Image header at 0x{text:x} gives an image size of {size} bytes")
    return KernelLocation(text, text + size, text - arm64_kimage_vaddr(walker), phys - head, walker.ttbr1)


def _arm64_image_without_header(boot, walker, stext: int, phys: int, text_address: int,
                                max_image: int) -> KernelLocation:
    """A running kernel whose Image header is gone from memory (Debian's 6.1
    booted with QEMU's ``-kernel`` on ``virt`` reuses that page): ``_text``
    is then taken 64 KiB below ``_stext`` (the arm64 linker script's
    ``.head.text``) and the image to end where its mapping does, which
    covers text and rodata (kallsyms, BTF); init is unmapped after boot."""
    granule = 1 << walker.granule1
    end = stext
    while end - stext < max_image and boot.is_mapped(end):
        end += granule
    if end - stext < 1 << 20:
        raise KernelNotFound(f"no arm64 Image header below physical 0x{phys:x} and only {end - stext} bytes mapped "
                             f"from 0x{stext:x} (around 0x{text_address:x}); is this a Linux kernel?")
    text = stext - HEAD_TEXT_SIZE
    return KernelLocation(text, end, text - arm64_kimage_vaddr(walker), phys - HEAD_TEXT_SIZE, walker.ttbr1)


# KPTI (CONFIG_UNMAP_KERNEL_AT_EL0): while a CPU runs EL0 code, TTBR1 holds
# tramp_pg_dir, which maps only the entry trampoline, and VBAR_EL1 points at
# the trampoline's vectors. The linker script puts tramp_pg_dir,
# reserved_pg_dir and swapper_pg_dir on consecutive pages, and the
# trampoline's exit code finds swapper_pg_dir by adding TRAMP_SWAPPER_OFFSET
# (two pages, Linux 4.16 to 6.x) to TTBR1. The other offsets are tried too,
# and every guess must map a whole kernel image before it is believed; 0 is
# a vCPU stopped in the exception entry between the switch of TTBR1 to
# swapper_pg_dir and the switch of VBAR to the kernel's own vectors.
KPTI_SWAPPER_PAGES = (2, 0, 1, 3)
TRAMP_SCAN_PAGES = 4  # the trampoline's text and its literal pool sit within a few pages of VBAR
VECTORS_ALIGN = 1 << 11  # the kernel's `vectors` table is 2 KiB aligned


def find_arm64_kernel_behind_trampoline(phys: PhysicalMemory, walker, vbar: int, cache: TranslationCache | None = None):
    """(walker through swapper_pg_dir, KernelLocation) for a vCPU stopped in
    EL0 under KPTI, or ``None`` when TTBR1 is not a trampoline's table.

    The trampoline reads the kernel's own ``vectors`` address from a literal
    next to its code (``tramp_data_read_var``, relocated at boot like any
    kernel pointer), so the 2 KiB-aligned kernel-half words on the pages
    around VBAR are the text addresses to try; each swapper guess is walked
    from them, and the first that maps a kernel image wins."""
    from vmscope.vmi.address_space import AddressSpace
    from vmscope.vmi.paging.aarch64 import TTBR_BADDR_MASK, Aarch64Paging

    granule = 1 << walker.granule1
    kernel_half = (1 << 64) - (1 << (64 - walker.t1sz))
    base = vbar & ~(granule - 1)
    lo, hi = base - TRAMP_SCAN_PAGES * granule, base + (TRAMP_SCAN_PAGES + 1) * granule  # the pages scanned
    root = walker.ttbr1 & TTBR_BADDR_MASK
    guesses = [Aarch64Paging(phys, walker.ttbr0, root + pages * granule, walker.tcr, cache=cache)
               for pages in KPTI_SWAPPER_PAGES]
    tried = set()
    for table in [walker, *guesses]:  # the literal is on the trampoline's pages, or on swapper's fixmap
        space = AddressSpace(table)
        for page in range(lo, hi, granule):
            try:
                data = space.read(page, granule)
            except VmiError:
                continue
            words = {int.from_bytes(data[i : i + 8], "little") for i in range(0, granule, 8)}
            for text in sorted(w for w in words if w >= kernel_half and not w % VECTORS_ALIGN and not lo <= w < hi):
                for swapper in guesses:
                    if (text, swapper.ttbr1) in tried:
                        continue
                    tried.add((text, swapper.ttbr1))
                    try:
                        return swapper, find_arm64_kernel_image(AddressSpace(swapper), text, swapper)
                    except VmiError:
                        continue
    return None
