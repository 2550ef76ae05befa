"""The embedded guests as files: API, ELF layout, notes, symbols, DWARF.

These read the committed ELF files with pyelftools (no process runs), so
they pin down the conventions the VMM, the emulated target and the tests
rely on: load addresses, entry points, the two notes and typed symbols.
"""

from __future__ import annotations

import struct

import pytest
from elftools.elf.elffile import ELFFile

from vmscope.guests import GUESTS, guest_elf, guest_symbols, write_guest

ALL_GUESTS = [(arch, name) for arch, names in GUESTS.items() for name in names]
#: the guests written to vmscope's conventions (tick, counter, per_cpu_counter);
#: x86_64/walk is the standard PVH guest that follows none of them
CONVENTION_GUESTS = [guest for guest in ALL_GUESTS if guest != ("x86_64", "walk")]

XEN_ELFNOTE_PHYS32_ENTRY = 18
VMSCOPE_NOTE_ALL_CPUS = 1


def open_elf(arch: str, name: str):
    stream = guest_elf(name, arch).open("rb")
    return stream, ELFFile(stream)


def raw_notes(elf: ELFFile) -> list[tuple[str, int, bytes]]:
    """(name, type, descriptor) of every note in PT_NOTE segments, parsed by
    hand with the 4-byte padding PVH loaders (QEMU) assume."""
    notes = []
    for segment in elf.iter_segments():
        if segment["p_type"] != "PT_NOTE":
            continue
        assert segment["p_align"] == 4, "QEMU pads note names/descriptors to p_align; keep it 4"
        data = segment.data()
        offset = 0
        while offset < len(data):
            namesz, descsz, ntype = struct.unpack_from("<III", data, offset)
            offset += 12
            name = data[offset:offset + namesz].rstrip(b"\0").decode()
            offset += (namesz + 3) & ~3
            desc = data[offset:offset + descsz]
            offset += (descsz + 3) & ~3
            notes.append((name, ntype, desc))
    return notes


def symbol_table(elf: ELFFile) -> dict[str, dict]:
    return {sym.name: sym for sym in elf.get_section_by_name(".symtab").iter_symbols() if sym.name}


def test_guest_elf_returns_existing_files_for_every_listed_guest():
    for arch, name in ALL_GUESTS:
        path = guest_elf(name, arch)
        assert path.name == f"{name}.elf"
        assert path.read_bytes()[:4] == b"\x7fELF"
        assert path.stat().st_size < 16 * 1024, f"{arch}/{name} should stay tiny"


def test_guest_elf_defaults_to_the_x86_64_demo():
    assert guest_elf() == guest_elf("demo", "x86_64")


def test_unknown_guest_name_lists_what_exists():
    with pytest.raises(ValueError, match=r"no guest 'nope' for x86_64; guests for x86_64: demo, idt"):
        guest_elf("nope")


def test_unknown_arch_lists_architectures_and_guests():
    with pytest.raises(ValueError, match=r"no guests for architecture 'riscv64'.*x86_64, aarch64.*demo \(aarch64\)"):
        guest_elf("demo", "riscv64")


def test_write_guest_creates_the_directory_and_copies_the_bytes(tmp_path):
    out = tmp_path / "a" / "b"
    written = write_guest(out, "demo", "aarch64")
    assert written == out / "demo.elf"
    assert written.read_bytes() == guest_elf("demo", "aarch64").read_bytes()
    assert write_guest(str(out), "idt") == out / "idt.elf"


@pytest.mark.parametrize("name,load_address", [("demo", 0x100000), ("idt", 0x200000)])
def test_x86_guests_are_pvh_elfs_at_their_load_address(name, load_address):
    stream, elf = open_elf("x86_64", name)
    with stream:
        assert elf.elfclass == 64 and elf["e_machine"] == "EM_X86_64"
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [s["p_paddr"] for s in loads] == [load_address]
        assert loads[0]["p_vaddr"] == load_address
        assert loads[0]["p_memsz"] > loads[0]["p_filesz"], "page tables and stacks are zero-filled (bss)"
        symbols = symbol_table(elf)
        pvh_entry = symbols["pvh_entry"]["st_value"]
        assert elf["e_entry"] == pvh_entry
        notes = raw_notes(elf)
        xen = [desc for n, t, desc in notes if (n, t) == ("Xen", XEN_ELFNOTE_PHYS32_ENTRY)]
        assert len(xen) == 1 and len(xen[0]) == 8, "8-byte descriptor like Linux's ELF64 vmlinux"
        assert struct.unpack("<Q", xen[0])[0] == pvh_entry
        assert ("vmscope", VMSCOPE_NOTE_ALL_CPUS, b"") in notes


def test_aarch64_demo_starts_at_start_in_virt_ram():
    stream, elf = open_elf("aarch64", "demo")
    with stream:
        assert elf.elfclass == 64 and elf["e_machine"] == "EM_AARCH64"
        symbols = symbol_table(elf)
        assert elf["e_entry"] == symbols["_start"]["st_value"] == 0x40080000
        loads = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert [s["p_paddr"] for s in loads] == [0x40080000]
        assert raw_notes(elf) == [("vmscope", VMSCOPE_NOTE_ALL_CPUS, b"")]


REQUIRED_SYMBOLS = {
    ("x86_64", "demo"): {"pvh_entry": "STT_FUNC", "start64": "STT_FUNC", "main_loop": "STT_FUNC",
                         "tick": "STT_FUNC", "counter": "STT_OBJECT", "per_cpu_counter": "STT_OBJECT"},
    ("x86_64", "idt"): {"pvh_entry": "STT_FUNC", "start64": "STT_FUNC", "main_loop": "STT_FUNC",
                        "tick": "STT_FUNC", "counter": "STT_OBJECT", "per_cpu_counter": "STT_OBJECT",
                        "bp_count": "STT_OBJECT", "bp_handler": "STT_FUNC", "guest_int3": "STT_NOTYPE"},
    ("aarch64", "demo"): {"_start": "STT_FUNC", "main_loop": "STT_FUNC", "tick": "STT_FUNC",
                          "counter": "STT_OBJECT", "per_cpu_counter": "STT_OBJECT"},
}


@pytest.mark.parametrize("arch,name", CONVENTION_GUESTS)
def test_guests_export_typed_sized_global_symbols(arch, name):
    stream, elf = open_elf(arch, name)
    with stream:
        symbols = symbol_table(elf)
        for symbol, kind in REQUIRED_SYMBOLS[(arch, name)].items():
            assert symbol in symbols, f"{arch}/{name} lacks {symbol}"
            sym = symbols[symbol]
            assert sym["st_info"]["bind"] == "STB_GLOBAL"
            assert sym["st_info"]["type"] == kind
            if kind != "STT_NOTYPE":
                assert sym["st_size"] > 0, f"{symbol} needs a size (gdb watch, disassembly)"
        assert symbols["counter"]["st_size"] == 8
        assert symbols["counter"]["st_value"] % 8 == 0
        assert not [s for s in symbols.values() if s["st_shndx"] == "SHN_ABS" and s["st_info"]["type"] != "STT_FILE"], \
            "assembler constants must not leak into the symbol table"


@pytest.mark.parametrize("arch,name", CONVENTION_GUESTS)
def test_guest_symbols_matches_the_symbol_table(arch, name):
    symbols = guest_symbols(name, arch)
    assert set(REQUIRED_SYMBOLS[(arch, name)]) <= set(symbols)
    stream, elf = open_elf(arch, name)
    with stream:
        assert symbols["counter"] == symbol_table(elf)["counter"]["st_value"]


@pytest.mark.parametrize("arch,name", CONVENTION_GUESTS)
def test_dwarf_types_counter_as_unsigned_long_at_its_symbol(arch, name):
    """gdb's `print counter`/`watch counter` need a type: check the DIEs."""
    stream, elf = open_elf(arch, name)
    with stream:
        symbols = symbol_table(elf)
        variables = {}
        for cu in elf.get_dwarf_info().iter_CUs():
            for die in cu.iter_DIEs():
                if die.tag == "DW_TAG_variable":
                    variables[die.attributes["DW_AT_name"].value.decode()] = die
        assert "counter" in variables and "per_cpu_counter" in variables
        for var_name, die in variables.items():
            location = bytes(die.attributes["DW_AT_location"].value)
            assert location[0] == 0x03  # DW_OP_addr
            assert int.from_bytes(location[1:9], "little") == symbols[var_name]["st_value"]
        counter_type = variables["counter"].get_DIE_from_attribute("DW_AT_type")
        assert counter_type.attributes["DW_AT_name"].value == b"unsigned long"
        assert counter_type.attributes["DW_AT_byte_size"].value == 8
        array_type = variables["per_cpu_counter"].get_DIE_from_attribute("DW_AT_type")
        (subrange,) = list(array_type.iter_children())
        count = subrange.attributes["DW_AT_upper_bound"].value + 1
        assert count * 8 == symbols["per_cpu_counter"]["st_size"]


def test_walk_is_a_standard_pvh_elf_without_vmscope_conventions():
    """The Xen note alone (no "vmscope" note, so one boot CPU), the ELF entry
    is the 32-bit PVH entry _start, no start64, and code and data in two
    PT_LOAD segments at 3 MiB."""
    stream, elf = open_elf("x86_64", "walk")
    with stream:
        symbols = symbol_table(elf)
        assert "start64" not in symbols and "pvh_entry" not in symbols
        start = symbols["_start"]["st_value"]
        assert elf["e_entry"] == start
        assert raw_notes(elf) == [("Xen", XEN_ELFNOTE_PHYS32_ENTRY, struct.pack("<Q", start))]
        loads = [(s["p_paddr"], s["p_flags"]) for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        assert loads == [(0x300000, 5), (0x301000, 6)], "code R+X, data R+W"
        for name, kind in {"walk_loop": "STT_FUNC", "visit": "STT_FUNC", "visits": "STT_OBJECT",
                           "checksum": "STT_OBJECT", "ring": "STT_OBJECT"}.items():
            assert symbols[name]["st_info"]["type"] == kind and symbols[name]["st_size"] > 0, name
        variables = {die.attributes["DW_AT_name"].value.decode()
                     for cu in elf.get_dwarf_info().iter_CUs() for die in cu.iter_DIEs() if die.tag == "DW_TAG_variable"}
        assert {"visits", "checksum"} <= variables, "gdb's watch visits needs its type"
