"""Boot a bzImage without its decompressor: the kernel placed, relocated and
entered at ``startup_64`` by the VMM.

Why: under a nested KVM the decompressor's run (decompress, copy, relocate,
each new page a fault and an exit) was a quarter of the boot. The host
decompresses the payload once per bzImage (:mod:`vmscope.kvm.boot.payload`,
cached), and every boot then does what the decompressor would:

- choose where the kernel goes as ``arch/x86/boot/compressed/kaslr.c``
  does: a random 2 MiB-aligned physical slot in RAM that fits the image
  and avoids the initrd, and an independent random virtual slot in the
  1 GiB kernel image area; ``nokaslr`` on the command line keeps both at
  the link addresses (``LOAD_PHYSICAL_ADDR``);
- copy the ELF's PT_LOAD segments there and add the virtual slide at every
  place the relocation table lists (:mod:`vmscope.kvm.boot.relocs`);
- set ``KASLR_FLAG`` in ``boot_params.hdr.loadflags`` as the decompressor
  does, so the kernel randomizes its memory regions too;
- enter ``startup_64`` in long mode as the 64-bit boot protocol asks
  (Documentation/arch/x86/boot.rst): identity-mapped page tables over the
  kernel, a GDT with flat ``__BOOT_CS`` (0x10) and ``__BOOT_DS`` (0x18),
  ``rsi`` = boot_params. ``startup_64`` fixes its own page tables for the
  physical address it finds itself at, as after the decompressor.

This is how Firecracker and Cloud Hypervisor boot a vmlinux; the VMM also
knows where the kernel is from the first instruction (``BootPlan.kernel``),
which the debug target uses for symbols (:mod:`vmscope.kvm.linux_support`).
"""

from __future__ import annotations

import logging
import mmap
import os
import struct
import time
from dataclasses import dataclass
from pathlib import Path

from vmscope.devices.pvh import BootPlan
from vmscope.devices.ram import GuestRam
from vmscope.kvm.boot.linux import BOOT_PARAMS_ADDR, parse_header, write_boot_params
from vmscope.machine import ImageError

log = logging.getLogger(__name__)

ALIGN = 0x20_0000  # CONFIG_PHYSICAL_ALIGN: KASLR's slots, startup_64's requirement
KERNEL_IMAGE_SIZE = 1 << 30  # the kernel image area with KASLR (arch/x86/include/asm/page_64_types.h)
KASLR_FLAG = 1 << 1  # boot_params.hdr.loadflags: the loader randomized the kernel
PT_LOAD = 1
HEAD_BYTES = 64 << 10  # the setup header and more: what the loader reads of the bzImage at each boot

# long-mode set-up, where Firecracker puts it (below boot_params' 0x7000 and the 0x8ff0 stack)
GDT_ADDR = 0x500
PML4_ADDR = 0x9000
PDPT_ADDR = 0xA000
PD_ADDR = 0xB000
IDENTITY_MAPPED = 4 << 30  # 2 MiB pages over the first 4 GiB: 4 page directories
GDT = (0, 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)  # null, null, __BOOT_CS (64-bit code), __BOOT_DS


@dataclass(frozen=True)
class Segment:
    offset: int  # in the ELF file
    paddr: int
    filesz: int
    memsz: int


@dataclass(frozen=True)
class KernelPlacement:
    """Where this boot put the kernel image."""

    phys_text: int  # guest-physical address of _text
    text: int  # its virtual address, slide included
    end: int  # virtual address of the image's end (_end)
    link_text: int  # _text as linked (0xffffffff81000000)
    kaslr: bool

    @property
    def slide(self) -> int:
        return self.text - self.link_text


@dataclass(frozen=True)
class LongMode:
    """The page tables and GDT the VMM built for the 64-bit entry."""

    cr3: int = PML4_ADDR
    gdt_base: int = GDT_ADDR
    gdt_limit: int = len(GDT) * 8 - 1


def parse_elf(elf: bytes | mmap.mmap) -> tuple[int, list[Segment]]:
    """(entry, PT_LOAD segments) of a 64-bit little-endian x86 vmlinux."""
    if elf[:4] != b"\x7fELF" or elf[4] != 2 or elf[5] != 1:
        raise ImageError("the decompressed kernel is not a little-endian ELF64 file")
    e_machine, = struct.unpack_from("<H", elf, 0x12)
    if e_machine != 62:
        raise ImageError(f"the decompressed kernel is for ELF machine {e_machine}, not x86_64 (62)")
    entry, phoff = struct.unpack_from("<QQ", elf, 0x18)
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    segs = []
    for i in range(phnum):
        p_type, _, off, _vaddr, paddr, filesz, memsz = struct.unpack_from("<IIQQQQQ", elf, phoff + i * phentsize)
        if p_type == PT_LOAD and memsz:
            segs.append(Segment(off, paddr, filesz, memsz))
    if not segs:
        raise ImageError("the decompressed kernel has no PT_LOAD segment")
    return entry, segs


def nokaslr(cmdline: str) -> bool:
    return "nokaslr" in cmdline.split()


def random_below(n: int) -> int:
    """A random integer in [0, n) from the kernel's entropy pool (the
    decompressor takes RDRAND/RDTSC; ``random`` costs an import)."""
    return int.from_bytes(os.urandom(8), "little") % n


def choose_placement(randbelow, mem_size: int, needed: int, load_phys: int, avoid: list[tuple[int, int]],
                     randomize: bool) -> tuple[int, int]:
    """(physical address, virtual offset) for the kernel, as kaslr.c's
    ``find_random_phys_addr`` and ``find_random_virt_addr`` pick them: a
    uniform choice among 2 MiB-aligned slots where ``needed`` bytes fit,
    physical ones in RAM from ``load_phys`` up (below 4 GiB here: the
    identity map's reach) clear of ``avoid`` ranges, virtual ones in the
    1 GiB kernel image area. The virtual offset is what the kernel adds to
    ``__START_KERNEL_map``."""
    if not randomize:
        return load_phys, load_phys
    top = min(mem_size, IDENTITY_MAPPED)
    slots = [s for s in range(load_phys, top - needed + 1, ALIGN)
             if all(s + needed <= a or s >= a + n for a, n in avoid)]
    if not slots:
        raise ImageError(f"no room for the {needed >> 20} MiB kernel in {mem_size >> 20} MiB of guest RAM (--mem)")
    virt_slots = (KERNEL_IMAGE_SIZE - load_phys - needed) // ALIGN + 1
    return slots[randbelow(len(slots))], load_phys + randbelow(max(1, virt_slots)) * ALIGN


def forced_placement(phys: int, virt: int) -> tuple[int, int]:
    """``VMSCOPE_KASLR_PLACEMENT=PHYS:VIRT`` (hex: physical address, virtual
    offset as :func:`choose_placement` returns them) replaces the random
    choice: to boot again the placement a failing boot logged with ``-v``."""
    forced = os.environ.get("VMSCOPE_KASLR_PLACEMENT")
    if not forced:
        return phys, virt
    try:
        p, v = (int(x, 16) for x in forced.split(":"))
    except ValueError:
        raise ImageError(f"VMSCOPE_KASLR_PLACEMENT={forced!r}: expected PHYS:VIRT in hex") from None
    if p % ALIGN or v % ALIGN:
        raise ImageError(f"VMSCOPE_KASLR_PLACEMENT={forced!r}: both must be 2 MiB aligned")
    log.warning("kernel placement forced by VMSCOPE_KASLR_PLACEMENT: physical %#x, virtual offset %#x", p, v)
    return p, v


def write_long_mode(mem: GuestRam) -> LongMode:
    """Identity-mapped page tables for the first 4 GiB (2 MiB pages) and a
    GDT with the boot protocol's segments."""
    present_rw, huge = 0x3, 0x80
    mem.write(PML4_ADDR, struct.pack("<Q", PDPT_ADDR | present_rw).ljust(0x1000, b"\0"))
    pds = IDENTITY_MAPPED >> 30
    mem.write(PDPT_ADDR, struct.pack(f"<{pds}Q", *(PD_ADDR + i * 0x1000 | present_rw for i in range(pds)))
              .ljust(0x1000, b"\0"))
    mem.write(PD_ADDR, struct.pack(f"<{pds * 512}Q", *((i << 21) | present_rw | huge for i in range(pds * 512))))
    mem.write(GDT_ADDR, struct.pack(f"<{len(GDT)}Q", *GDT))
    return LongMode()


def load_vmlinux(path: Path, head: bytes, mem: GuestRam, cmdline: str = "", initrd: Path | None = None,
                 randbelow=random_below) -> BootPlan:
    """Boot the bzImage at ``path`` (``head``: its first bytes, the setup
    header) by its decompressed kernel: see the module's docstring. Raises
    :class:`~vmscope.kvm.boot.payload.PayloadUnsupported` when the payload
    cannot be decompressed here."""
    from vmscope.kvm.boot.payload import cached_vmlinux
    from vmscope.kvm.boot.relocs import apply_relocs, parse_relocs

    t0 = time.monotonic()
    hdr = parse_header(head, path)
    elf_path, relocs_path, cached = cached_vmlinux(path)
    t1 = time.monotonic()
    elf_file = open(elf_path, "rb")
    elf = mmap.mmap(elf_file.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        entry, segs = parse_elf(elf)
        load_phys = min(s.paddr for s in segs)
        total = max(s.paddr + s.memsz for s in segs) - load_phys
        table = parse_relocs(relocs_path.read_bytes())
        # the decompressor's needed_size: the image or the whole payload, whichever is larger
        needed = -(-max(total, len(elf) + 12 + 4 * len(table)) // ALIGN) * ALIGN
        randomize = not nokaslr(cmdline or "")
        if mem.size < load_phys + needed:
            raise ImageError(f"{path}: the kernel needs {(load_phys + needed) >> 20} MiB of guest RAM; "
                             f"there are {mem.size >> 20} MiB (--mem)")
        flags = KASLR_FLAG if randomize and len(table) else 0
        initrd_at = write_boot_params(head, hdr, mem, cmdline, initrd, load_phys + needed, loadflags=flags)
        phys, virt = choose_placement(randbelow, mem.size, needed, load_phys,
                                      [initrd_at] if initrd_at else [], randomize)
        phys, virt = forced_placement(phys, virt)
        if not len(table) or not hdr.relocatable:
            virt = load_phys  # no relocation table: the virtual address is the linked one
        if not hdr.relocatable:
            phys = load_phys
        for s in segs:
            copy_to_ram(mem, phys + (s.paddr - load_phys), elf_file.fileno(), elf, s.offset, s.filesz)
        text_vaddr = _text_vaddr(elf, segs, load_phys)
        start_map = text_vaddr - load_phys  # __START_KERNEL_map
        delta = virt - load_phys
        t_populate = time.monotonic()
        populate(mem, phys, total)
        t2 = time.monotonic()
        image_view = mem.view[phys - mem.base : phys - mem.base + (total & ~7)]
        try:
            apply_relocs(image_view, table, text_vaddr, delta, mem.host_address + phys - mem.base)
        finally:
            image_view.release()
    finally:
        elf.close()
        elf_file.close()
    t3 = time.monotonic()
    if entry >= start_map:  # a virtual e_entry: make it physical
        entry -= start_map
    placement = KernelPlacement(phys, start_map + virt, start_map + virt + total, text_vaddr, bool(flags))
    log.info("vmlinux: %s (%s, %.0f ms), segments copied in %.0f ms (mapping the image in: %.0f ms of it), "
             "%d relocations (slide %#x) in %.0f ms; "
             "_text at physical %#x, virtual %#x", elf_path.name, "cached" if cached else "decompressed now",
             (t1 - t0) * 1000, (t2 - t1) * 1000, (t2 - t_populate) * 1000, len(table) if delta else 0,
             placement.slide, (t3 - t2) * 1000, phys, placement.text)
    return BootPlan(
        entry=phys + (entry - load_phys),
        start_info=BOOT_PARAMS_ADDR,
        mode="linux64",
        segments=[(phys + (s.paddr - load_phys), s.memsz) for s in segs],
        kernel=placement,
        long_mode=write_long_mode(mem),
    )


def copy_to_ram(mem: GuestRam, at: int, fd: int, src: mmap.mmap, offset: int, size: int) -> None:
    """Copy ``size`` bytes of the file ``fd`` (mapped at ``src``) into guest RAM at
    ``at``: by ``sendfile`` into the RAM's memfd, where the kernel copies
    page-cache pages without a page fault per page in this process (in the
    nested lab the faults of a 48 MB copy cost seconds); through the
    mapping where that is refused. Only the file's data extents are copied:
    its holes are zeros, which fresh guest RAM already holds (the cache
    writes the kernel sparse, :func:`~vmscope.kvm.boot.payload.data_extents`)."""
    from vmscope.kvm.boot.payload import data_extents

    mem._check(at, size)
    for start, end in data_extents(fd, offset, offset + size):
        _copy_extent(mem, at + (start - offset), fd, src, start, end - start)


def _copy_extent(mem: GuestRam, at: int, fd: int, src: mmap.mmap, offset: int, size: int) -> None:
    done = 0
    try:
        os.lseek(mem.fd, at - mem.base, os.SEEK_SET)
        while done < size:
            n = os.sendfile(mem.fd, fd, offset + done, size - done)
            if n <= 0:
                break
            done += n
    except OSError:
        pass
    if done < size:
        with memoryview(src) as view:
            mem.write(at + done, view[offset + done : offset + size])


MADV_POPULATE_WRITE = getattr(mmap, "MADV_POPULATE_WRITE", 23)  # Linux 5.14


def populate(mem: GuestRam, at: int, size: int) -> None:
    """Map guest RAM ``[at, at+size)`` into this process in one system call
    before the relocations write all over it: in the nested lab each page
    fault is an emulated exception, and the image is 12,000 pages."""
    mapping = getattr(mem, "_map", None)
    if mapping is None:
        return
    start = (at - mem.base) & ~(mmap.PAGESIZE - 1)
    try:
        mapping.madvise(MADV_POPULATE_WRITE, start, min(mem.size, at - mem.base + size) - start)
    except (OSError, ValueError):
        pass  # an older kernel: the writes fault the pages in


def _text_vaddr(elf, segs: list[Segment], load_phys: int) -> int:
    """The linked virtual address of the first segment (_text)."""
    entry_off = struct.unpack_from("<Q", elf, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", elf, 0x36)
    for i in range(phnum):
        p_type, _, _off, vaddr, paddr = struct.unpack_from("<IIQQQ", elf, entry_off + i * phentsize)
        if p_type == PT_LOAD and paddr == load_phys:
            return vaddr
    raise ImageError("the decompressed kernel has no segment at its lowest physical address")


def load_bzimage_direct(path: Path, mem: GuestRam, cmdline: str = "", initrd: Path | None = None) -> BootPlan | None:
    """The fast path for :func:`vmscope.kvm.boot.load_kernel`: the plan, or
    None (with a log line saying why) when the kernel's own decompressor
    has to run instead."""
    from vmscope.kvm.boot.payload import PayloadUnsupported

    try:
        with open(path, "rb") as f:
            head = f.read(HEAD_BYTES)
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    try:
        return load_vmlinux(path, head, mem, cmdline, initrd)
    except PayloadUnsupported as e:
        log.info("%s: booting through the kernel's own decompressor: %s", path, e)
        return None
