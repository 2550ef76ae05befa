"""PVH boot: an ELF kernel with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note, for every
x86 back end (the KVM VMM and the emulated CPU start the same images the
same way).

This is the direct-boot protocol QEMU, Firecracker and Cloud Hypervisor
use: load every ``PT_LOAD`` segment at its physical address, build an
``hvm_start_info`` (memory map, command line, optional initrd as module 0)
and enter the 32-bit entry point with flat segments, paging off and
``ebx`` pointing at the start info.

vmscope adds one convention for its own SMP demo guests: an ELF note named
``"vmscope"`` of type 1 (no descriptor) asks that every vCPU start at the
entry; without it only vCPU 0 does.

Guest-physical layout used here (below the 1 MiB kernels usually load at):
start info at 0x6000, memory map right after it, command line at 0x20000.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from pathlib import Path

from vmscope.devices.ram import PAGE, GuestRam
from vmscope.machine import ImageError

XEN_ELFNOTE_PHYS32_ENTRY = 18
VMSCOPE_NOTE_ALL_CPUS = 1
HVM_START_MAGIC = 0x336EC578

START_INFO_ADDR = 0x6000
MEMMAP_ADDR = 0x6040
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
LOW_RAM_END = 0x9FC00  # conventional memory ends; EBDA/VGA/BIOS follow
HIGH_RAM_START = 0x100000

E820_RAM, E820_RESERVED = 1, 2


@dataclass
class BootPlan:
    """How to start the vCPUs after the image is in guest memory.

    ``mode`` is ``"pvh32"``: 32-bit protected mode, flat segments, paging
    off, ``ebx = start_info``; or ``"linux32"``: the same, but ``esi =
    start_info`` (the Linux boot protocol's boot_params) and a PC platform
    around the vCPUs (``vmscope.kvm.boot.linux.attach_platform``); or
    ``"linux64"``: the 64-bit boot protocol, long mode on the identity
    page tables and GDT at ``long_mode`` (``vmscope.kvm.boot.vmlinux``),
    ``rsi = start_info``, the same platform; ``kernel`` then says where
    the VMM placed the decompressed Linux kernel. ``all_cpus_at_entry``: every vCPU starts at ``entry`` (vmscope's SMP
    convention for its demo guests); otherwise only vCPU 0 does and the
    others wait for INIT/SIPI.
    """

    entry: int
    start_info: int
    mode: str = "pvh32"
    all_cpus_at_entry: bool = False
    segments: list[tuple[int, int]] = field(default_factory=list)  # (paddr, memsz)
    #: initial rsp. PVH defines none, but guests often push before setting
    #: their own stack; Firecracker gives them 0x8ff0 too.
    boot_stack: int = 0x8FF0
    #: vmscope.kvm.boot.vmlinux.KernelPlacement for "linux64"
    kernel: object | None = None
    #: vmscope.kvm.boot.vmlinux.LongMode (page tables, GDT) for "linux64"
    long_mode: object | None = None

    @property
    def linux(self) -> bool:
        """A Linux guest on the PC platform (either entry)."""
        return self.mode.startswith("linux")


def has_pvh_entry(path: Path) -> bool:
    """Whether ``path`` is an ELF with a PVH entry note (a cheap look at
    the notes; an unreadable or malformed file answers False)."""
    from elftools.common.exceptions import ELFError  # pyelftools only when an ELF is read: 0.1 s of start-up

    from vmscope.devices.elf import notes, open_elf

    try:
        _, elf = open_elf(path)
        return any(name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY for name, ntype, _ in notes(elf))
    except (ImageError, ELFError):
        return False
    except Exception:  # pyelftools raises assorted errors on garbage
        return False


class HvmStartInfo(ctypes.Structure):
    _fields_ = [
        ("magic", ctypes.c_uint32), ("version", ctypes.c_uint32), ("flags", ctypes.c_uint32),
        ("nr_modules", ctypes.c_uint32), ("modlist_paddr", ctypes.c_uint64),
        ("cmdline_paddr", ctypes.c_uint64), ("rsdp_paddr", ctypes.c_uint64),
        ("memmap_paddr", ctypes.c_uint64), ("memmap_entries", ctypes.c_uint32),
        ("reserved", ctypes.c_uint32),
    ]


class HvmMemmapEntry(ctypes.Structure):
    _fields_ = [("addr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("type", ctypes.c_uint32), ("reserved", ctypes.c_uint32)]


class HvmModlistEntry(ctypes.Structure):
    _fields_ = [("paddr", ctypes.c_uint64), ("size", ctypes.c_uint64), ("cmdline_paddr", ctypes.c_uint64), ("reserved", ctypes.c_uint64)]


def load_pvh(path: Path, mem: GuestRam, cmdline: str = "", initrd: Path | None = None) -> BootPlan:
    """Load a PVH ELF into ``mem`` (based at 0) and write its start info."""
    from elftools.common.exceptions import ELFError  # imported here: a bzImage boot never needs pyelftools

    from vmscope.devices.elf import check_file_ranges, load_segments, notes, open_elf

    data, elf = open_elf(path)
    try:
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise ImageError(f"{path}: ELF for {elf['e_machine']}, expected an x86_64 (or i386) kernel")
        check_file_ranges(path, elf, len(data))
        entry = None
        all_cpus = False
        for name, ntype, desc in notes(elf):
            if name == "Xen" and ntype == XEN_ELFNOTE_PHYS32_ENTRY:
                if len(desc) not in (4, 8):
                    raise ImageError(f"{path}: PVH entry note has a {len(desc)}-byte descriptor, expected 4 or 8")
                entry = int.from_bytes(desc, "little")
            elif name == "vmscope" and ntype == VMSCOPE_NOTE_ALL_CPUS:
                all_cpus = True
        if entry is None:
            raise ImageError(
                f"{path}: ELF without a PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY); "
                "build the kernel with CONFIG_PVH or add the note"
            )
        reserved = ((START_INFO_ADDR, PAGE, "vmscope puts the PVH start info"),
                    (CMDLINE_ADDR, CMDLINE_MAX, "vmscope puts the command line"))
        segments = load_segments(path, elf, data, mem, reserved)
    except ImageError as e:
        msg = str(e)
        raise ImageError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    except ELFError as e:
        raise ImageError(f"{path}: malformed ELF: {e}") from None
    except Exception as e:  # pyelftools raises assorted errors on garbage
        raise ImageError(f"{path}: malformed ELF: {type(e).__name__}: {e}") from None
    if not any(start <= entry < start + size for start, size in segments):
        raise ImageError(f"{path}: PVH entry {entry:#x} is outside every PT_LOAD segment")
    _write_start_info(path, mem, cmdline, initrd, segments)
    return BootPlan(entry=entry, start_info=START_INFO_ADDR, all_cpus_at_entry=all_cpus, segments=segments)


def _write_start_info(path, mem: GuestRam, cmdline: str, initrd: Path | None, segments) -> None:
    raw_cmdline = cmdline.encode() + b"\0"
    if len(raw_cmdline) > CMDLINE_MAX:
        raise ImageError(f"command line is {len(raw_cmdline)} bytes, at most {CMDLINE_MAX - 1} fit")
    mem.write(CMDLINE_ADDR, raw_cmdline)

    info = HvmStartInfo(magic=HVM_START_MAGIC, version=1, cmdline_paddr=CMDLINE_ADDR)
    top = mem.size
    if initrd is not None:
        try:
            blob = Path(initrd).read_bytes()
        except OSError as e:
            raise ImageError(f"{initrd}: cannot read initrd: {e.strerror}") from None
        end_of_kernel = max(a + s for a, s in segments)
        addr = (top - len(blob)) & ~(PAGE - 1)
        if addr < end_of_kernel or addr < HIGH_RAM_START:
            raise ImageError(f"{initrd}: initrd of {len(blob)} bytes does not fit above the kernel in guest RAM")
        mem.write(addr, blob)
        mod = HvmModlistEntry(paddr=addr, size=len(blob))
        modlist_addr = START_INFO_ADDR + 0x400
        mem.write(modlist_addr, bytes(mod))
        info.nr_modules = 1
        info.modlist_paddr = modlist_addr

    memmap = [HvmMemmapEntry(0, LOW_RAM_END, E820_RAM), HvmMemmapEntry(LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED)]
    if mem.size > HIGH_RAM_START:
        memmap.append(HvmMemmapEntry(HIGH_RAM_START, mem.size - HIGH_RAM_START, E820_RAM))
    info.memmap_paddr = MEMMAP_ADDR
    info.memmap_entries = len(memmap)
    mem.write(START_INFO_ADDR, bytes(info))
    mem.write(MEMMAP_ADDR, b"".join(bytes(e) for e in memmap))
