"""PVH boot: an ELF kernel with a ``XEN_ELFNOTE_PHYS32_ENTRY`` note.

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
import io
import struct
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmscope.kvm.boot.common import BootPlan
from vmscope.kvm.memory import PAGE, GuestMemory
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


def _notes(elf: ELFFile):
    """(name, type, desc) of every note in PT_NOTE segments, or in SHT_NOTE
    sections when the image has no PT_NOTE (some linkers drop it).

    Parsed by hand because pyelftools renames well-known note types (type 1
    reads as ``NT_VERSION``) and vmscope's own note must be matched by the
    raw number.
    """
    blobs = [seg.data() for seg in elf.iter_segments() if seg.header.p_type == "PT_NOTE"]
    if not blobs:
        blobs = [sec.data() for sec in elf.iter_sections() if sec.header.sh_type == "SHT_NOTE"]
    for blob in blobs:
        off = 0
        while off + 12 <= len(blob):
            namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
            off += 12
            name = blob[off : off + namesz].rstrip(b"\0").decode("latin-1")
            off += (namesz + 3) & ~3
            desc = blob[off : off + descsz]
            off += (descsz + 3) & ~3
            if off > len(blob):
                raise ImageError("malformed ELF note (runs past its segment)")
            yield name, ntype, desc


def load_pvh(path: Path, mem: GuestMemory, cmdline: str = "", initrd: Path | None = None) -> BootPlan:
    data = Path(path).read_bytes()
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf["e_machine"] not in ("EM_X86_64", "EM_386"):
            raise ImageError(f"{path}: ELF for {elf['e_machine']}, expected an x86_64 (or i386) kernel")
        _check_file_ranges(path, elf, len(data))
        entry = None
        all_cpus = False
        for name, ntype, desc in _notes(elf):
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
        segments = _load_segments(path, elf, data, mem)
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


def _check_file_ranges(path: Path, elf: ELFFile, size: int) -> None:
    """Every segment's bytes must be in the file (checked before the notes
    are read, so a cut-off image says "truncated", not "no note")."""
    for i, seg in enumerate(elf.iter_segments()):
        h = seg.header
        if h.p_type in ("PT_LOAD", "PT_NOTE") and h.p_offset + h.p_filesz > size:
            raise ImageError(
                f"{path}: truncated: segment {i} needs file bytes {h.p_offset:#x}..{h.p_offset + h.p_filesz:#x} "
                f"but the file is {size:#x} bytes"
            )


def _load_segments(path: Path, elf: ELFFile, data: bytes, mem: GuestMemory) -> list[tuple[int, int]]:
    reserved = [(START_INFO_ADDR, PAGE), (CMDLINE_ADDR, CMDLINE_MAX)]
    segments = []
    for i, seg in enumerate(elf.iter_segments()):
        h = seg.header
        if h.p_type != "PT_LOAD" or h.p_memsz == 0:
            continue
        paddr, filesz, memsz, off = h.p_paddr, h.p_filesz, h.p_memsz, h.p_offset
        if filesz > memsz:
            raise ImageError(f"{path}: segment {i} has p_filesz {filesz:#x} > p_memsz {memsz:#x}")
        if off + filesz > len(data):
            raise ImageError(
                f"{path}: truncated: segment {i} needs file bytes {off:#x}..{off + filesz:#x} "
                f"but the file is {len(data):#x} bytes"
            )
        if not mem.contains(paddr, memsz):
            raise ImageError(
                f"{path}: segment {i} at {paddr:#x}+{memsz:#x} does not fit in guest RAM "
                f"({mem.size // (1 << 20)} MiB); give the VM more memory"
            )
        for rstart, rsize in reserved:
            if paddr < rstart + rsize and rstart < paddr + memsz:
                raise ImageError(
                    f"{path}: segment {i} at {paddr:#x}+{memsz:#x} overlaps the boot area "
                    f"{rstart:#x}+{rsize:#x} vmscope uses for start info/command line"
                )
        mem.write(paddr, data[off : off + filesz])
        if memsz > filesz:
            mem.write(paddr + filesz, bytes(memsz - filesz))
        segments.append((paddr, memsz))
    if not segments:
        raise ImageError(f"{path}: ELF has no loadable (PT_LOAD) segments")
    return segments


def _write_start_info(path, mem: GuestMemory, cmdline: str, initrd: Path | None, segments) -> None:
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
