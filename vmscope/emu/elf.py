"""Loading a guest ELF into emulated RAM."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

from vmscope.emu.memory import GuestRam
from vmscope.machine import ImageError

_MACHINES = {"x86_64": "EM_X86_64", "aarch64": "EM_AARCH64"}


@dataclass
class LoadedElf:
    entry: int
    symbols: dict[str, int] = field(default_factory=dict)
    #: (physical address, size in memory) of every loaded segment
    segments: list[tuple[int, int]] = field(default_factory=list)


def load_elf(path: Path, arch: str, ram: GuestRam) -> LoadedElf:
    """Copy every PT_LOAD segment to its physical address (zero-filling the
    rest of ``p_memsz``) and return the entry point and symbol table.

    Raises :class:`ImageError` naming the file and the field at fault.
    """
    try:
        with open(path, "rb") as f:
            elf = ELFFile(f)
            want = _MACHINES[arch]
            if elf["e_machine"] != want:
                raise ImageError(f"{path}: e_machine is {elf['e_machine']}, expected {want} for --arch {arch}")
            for seg in elf.iter_segments():
                if seg["p_type"] != "PT_LOAD" or seg["p_memsz"] == 0:
                    continue
                paddr, memsz = seg["p_paddr"], seg["p_memsz"]
                if not ram.contains(paddr, memsz):
                    raise ImageError(
                        f"{path}: PT_LOAD at p_paddr {paddr:#x} (+{memsz:#x}) is outside guest RAM "
                        f"{ram.base:#x}-{ram.end:#x}"
                    )
                data = seg.data()
                ram.write(paddr, data + bytes(memsz - len(data)))
            segments = [(s["p_paddr"], s["p_memsz"]) for s in elf.iter_segments()
                        if s["p_type"] == "PT_LOAD" and s["p_memsz"]]
            symbols: dict[str, int] = {}
            symtab = elf.get_section_by_name(".symtab")
            if symtab is not None:
                for sym in symtab.iter_symbols():
                    if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE"):
                        symbols.setdefault(sym.name, sym["st_value"])
            return LoadedElf(elf["e_entry"], symbols, segments)
    except (ELFError, OSError) as e:
        raise ImageError(f"{path}: not a loadable ELF ({e})") from None
