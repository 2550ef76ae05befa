"""The small bare-metal guests that vmscope carries with it.

``vmscope run`` with no ``--kernel`` boots the demo guest of its
architecture, tests boot them under vmscope and QEMU alike, and
``vmscope guest demo --out DIR`` writes one out for other tools.

The guests are written in assembly (``x86_64/*.S``, ``aarch64/*.S``); their
ELF files are committed next to the sources and rebuilt with
``python -m vmscope.guests.build``. Every guest:

- prints ``vmscope <name> guest: cpu N up`` once per CPU on the serial port,
- then loops calling ``tick``, which increments the global 64-bit
  ``counter`` and ``per_cpu_counter[N]`` (both typed in a little DWARF, so
  ``print counter`` and ``watch counter`` work in gdb),
- carries an ELF note ("vmscope", type 1, empty) meaning "every CPU may
  start at the entry point".

x86_64 guests are PVH ELFs (``pvh_entry``, 32-bit, via the Xen
PHYS32_ENTRY note) and also offer ``start64`` for 64-bit starts; see
``x86_64/pvh_boot.S`` for the exact entry states.

Except ``walk`` (x86_64), deliberately written like any PVH kernel and not
to the conventions above: the Xen note only (boot CPU only), entry
``_start``, its own GDT, 4 KiB page tables and stack, two segments, and a
different loop (``walk_loop`` calls ``visit`` on a ring of list nodes,
which increments ``visits`` and folds the node into ``checksum``); see
``x86_64/walk.S``. It shows that the targets run standard PVH guests.
"""

from __future__ import annotations

from pathlib import Path

from elftools.elf.elffile import ELFFile

GUESTS_DIR = Path(__file__).resolve().parent

#: The guests that exist, by architecture.
GUESTS: dict[str, tuple[str, ...]] = {
    "x86_64": ("demo", "idt", "walk"),
    "aarch64": ("demo",),
}


def _known() -> str:
    return ", ".join(f"{name} ({arch})" for arch, names in GUESTS.items() for name in names)


def guest_elf(name: str = "demo", arch: str = "x86_64") -> Path:
    """The path of the packaged ELF of guest ``name`` for ``arch``.

    Raises ValueError naming the guests that exist when there is no such
    guest, and FileNotFoundError if the package lost the file.
    """
    if arch not in GUESTS:
        raise ValueError(f"no guests for architecture {arch!r}; architectures: {', '.join(GUESTS)}; guests: {_known()}")
    if name not in GUESTS[arch]:
        raise ValueError(f"no guest {name!r} for {arch}; guests for {arch}: {', '.join(GUESTS[arch])}")
    path = GUESTS_DIR / arch / f"{name}.elf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the vmscope package (rebuild: python -m vmscope.guests.build)")
    return path


def write_guest(out_dir: str | Path, name: str = "demo", arch: str = "x86_64") -> Path:
    """Write guest ``name`` for ``arch`` to ``out_dir/<name>.elf`` (creating
    ``out_dir``) and return that path."""
    source = guest_elf(name, arch)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{name}.elf"
    target.write_bytes(source.read_bytes())
    return target


def guest_symbols(name: str = "demo", arch: str = "x86_64") -> dict[str, int]:
    """Address of every named symbol of a guest (``tick``, ``counter``...),
    read from its ELF symbol table."""
    with guest_elf(name, arch).open("rb") as stream:
        symtab = ELFFile(stream).get_section_by_name(".symtab")
        return {sym.name: sym["st_value"] for sym in symtab.iter_symbols()
                if sym.name and sym["st_info"]["type"] in ("STT_FUNC", "STT_OBJECT", "STT_NOTYPE")}
