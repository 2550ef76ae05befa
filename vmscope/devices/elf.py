"""Loading ELF images into guest RAM, for every back end and boot protocol.

The emulated CPU and arm64 KVM load bare-metal ELFs with :func:`load_elf`;
the PVH loader (:mod:`vmscope.devices.pvh`) reads the same segments and
notes through :func:`open_elf`, :func:`notes` and :func:`load_segments`.
Every error is an :class:`ImageError` that names the file and the field at
fault.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmscope.devices.ram import GuestRam
from vmscope.machine import ImageError

_MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}


@dataclass
class LoadedElf:
    entry: int
    symbols: dict[str, int] = field(default_factory=dict)
    #: (physical address, size in memory) of every loaded segment
    segments: list[tuple[int, int]] = field(default_factory=list)


def open_elf(path: Path) -> tuple[bytes, ELFFile]:
    """The file's bytes and its parsed ELF header; a file that is not an ELF
    (or whose header is cut off) is an ImageError saying which."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    if data[:4] != b"\x7fELF":
        raise ImageError(f"{path}: not a loadable ELF (starts with {data[:4].hex() or 'nothing'})")
    try:
        return data, ELFFile(io.BytesIO(data))
    except ELFError as e:
        raise ImageError(f"{path}: malformed ELF: {e}") from None
    except Exception as e:  # pyelftools raises assorted errors on garbage
        raise ImageError(f"{path}: malformed ELF: {type(e).__name__}: {e}") from None


def notes(elf: ELFFile) -> Iterator[tuple[str, int, bytes]]:
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


def check_file_ranges(path: Path, elf: ELFFile, size: int) -> None:
    """Every segment's bytes must be in the file (checked before the notes
    are read, so a cut-off image says "truncated", not "no note")."""
    for i, seg in enumerate(elf.iter_segments()):
        h = seg.header
        if h.p_type in ("PT_LOAD", "PT_NOTE") and h.p_offset + h.p_filesz > size:
            raise ImageError(
                f"{path}: truncated: segment {i} needs file bytes {h.p_offset:#x}..{h.p_offset + h.p_filesz:#x} "
                f"but the file is {size:#x} bytes"
            )


def load_segments(
    path: Path, elf: ELFFile, data: bytes, ram: GuestRam, reserved: tuple[tuple[int, int, str], ...] = ()
) -> list[tuple[int, int]]:
    """Copy every PT_LOAD segment to its physical address, zero-filling the
    rest of ``p_memsz``; return (paddr, memsz) of each. ``reserved`` lists
    (start, size, what) ranges the loader keeps for itself (boot tables,
    start info): a segment over one is refused, naming it."""
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
        if not ram.contains(paddr, memsz):
            raise ImageError(
                f"{path}: segment {i} at {paddr:#x}+{memsz:#x} does not fit in guest RAM ({ram.size >> 20} MiB): "
                f"PT_LOAD at p_paddr {paddr:#x} is outside guest RAM {ram.base:#x}-{ram.end:#x}; "
                "give the VM more memory or link the image elsewhere"
            )
        for start, size, what in reserved:
            if paddr < start + size and start < paddr + memsz:
                raise ImageError(
                    f"{path}: PT_LOAD at {paddr:#x} (+{memsz:#x}) overlaps {start:#x}-{start + size:#x}; "
                    f"segment {i} overlaps the boot area where {what}"
                )
        ram.write(paddr, data[off : off + filesz])
        if memsz > filesz:
            ram.write(paddr + filesz, bytes(memsz - filesz))
        segments.append((paddr, memsz))
    if not segments:
        raise ImageError(f"{path}: ELF has no loadable (PT_LOAD) segments")
    return segments


def symbols(elf: ELFFile) -> dict[str, int]:
    """Functions, objects and plain labels of the symbol table, by name."""
    found: dict[str, int] = {}
    symtab = elf.get_section_by_name(".symtab")
    if symtab is not None:
        for sym in symtab.iter_symbols():
            if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                found.setdefault(sym.name, sym["st_value"])
    return found


def load_elf(path: Path, arch: str, ram: GuestRam, reserved: tuple[tuple[int, int, str], ...] = ()) -> LoadedElf:
    """Load a bare-metal ELF for ``arch``: its segments into ``ram``, and
    its entry point and symbol table."""
    data, elf = open_elf(path)
    want = _MACHINES[arch]
    if elf["e_machine"] != want:
        raise ImageError(f"{path}: e_machine is {elf['e_machine']}, expected {want} for --arch {arch}")
    try:
        check_file_ranges(path, elf, len(data))
        segments = load_segments(path, elf, data, ram, reserved)
        return LoadedElf(elf["e_entry"], symbols(elf), segments)
    except ELFError as e:
        raise ImageError(f"{path}: malformed ELF: {e}") from None
