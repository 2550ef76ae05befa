"""The kallsyms -> ELF symbol file that GDB loads with add-symbol-file."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from elftools.elf.elffile import ELFFile

from vmscope.vmi.linux.kallsyms import Symbol
from vmscope.vmi.linux.symfile import slide_symbol_elf, symbol_elf

TEXT = 0xFFFFFFFF9C000000  # a KASLR-moved _text
SYMS = [
    Symbol("_text", TEXT, "T"),
    Symbol("startup_64", TEXT, "T"),
    Symbol("start_kernel", TEXT + 0x20A1234, "T"),
    Symbol("rest_init", TEXT + 0x20A1400, "t"),
    Symbol("linux_banner", TEXT + 0x2200040, "D"),
    Symbol("jiffies", TEXT + 0x2400000, "D"),
    Symbol("fixed_percpu_data", 0, "A"),  # per-CPU offsets: left out
    Symbol("cpu_number", 0x1A000, "D"),
]


def test_symbols_keep_their_addresses_types_and_sizes(tmp_path):
    path = tmp_path / "k.elf"
    path.write_bytes(symbol_elf(SYMS))
    with open(path, "rb") as f:
        elf = ELFFile(f)
        syms = {s.name: s for s in elf.get_section_by_name(".symtab").iter_symbols() if s.name}
        text = elf.get_section_by_name(".text")
        assert text["sh_type"] == "SHT_NOBITS" and text["sh_addr"] <= TEXT
        assert syms["start_kernel"]["st_value"] == TEXT + 0x20A1234
        assert syms["start_kernel"]["st_info"]["type"] == "STT_FUNC"
        assert syms["start_kernel"]["st_size"] == 0x1CC  # up to rest_init
        assert syms["rest_init"]["st_info"]["bind"] == "STB_LOCAL"
        assert syms["linux_banner"]["st_info"]["type"] == "STT_OBJECT"
        assert "cpu_number" not in syms and "fixed_percpu_data" not in syms


def test_gdb_reads_the_file(tmp_path):
    if not shutil.which("gdb"):
        pytest.fail("gdb is not installed (./dev.sh installs it)")
    path = tmp_path / "k.elf"
    path.write_bytes(symbol_elf(SYMS))
    out = subprocess.run(
        ["gdb", "-q", "-nx", "-batch", "-ex", f"add-symbol-file {path}", "-ex", "info address start_kernel",
         "-ex", f"info symbol {TEXT + 0x20A1240:#x}", "-ex", "p &jiffies"],
        capture_output=True, text=True, timeout=60,
    ).stdout
    assert f"start_kernel\" is at {TEXT + 0x20A1234:#x}" in out, out
    assert "start_kernel + 12 in section .text" in out, out
    assert f"{TEXT + 0x2400000:#x} <jiffies>" in out, out


def test_no_kernel_symbols_is_an_error():
    with pytest.raises(ValueError, match="no kernel symbols"):
        symbol_elf([Symbol("cpu_number", 0x1A000, "D")])


def test_a_slid_symbol_file_equals_one_built_at_the_new_placement():
    delta = 0x2E00000
    moved = [Symbol(s.name, s.address + delta if s.address >= TEXT else s.address, s.type) for s in SYMS]
    assert slide_symbol_elf(symbol_elf(SYMS), delta) == symbol_elf(moved)
    assert slide_symbol_elf(symbol_elf(moved), -delta) == symbol_elf(SYMS)


def test_build_cache_serves_the_symbol_file_of_a_known_build_slid(tmp_path, monkeypatch):
    from vmscope.vmi.linux.kallsyms import Kallsyms
    from vmscope.vmi.linux.symcache import BuildCache

    monkeypatch.setenv("VMSCOPE_CACHE", str(tmp_path))
    delta = 0x1200000
    moved = [Symbol(s.name, s.address + delta if s.address >= TEXT else s.address, s.type) for s in SYMS]
    BuildCache().symbol_file(Kallsyms(SYMS, "f" * 32), "x86_64")  # fills the disk cache
    assert list(tmp_path.rglob("*.elf")), "the symbol file must be kept on disk"
    fresh_process = BuildCache()  # another VMM run: only the disk cache
    assert fresh_process.symbol_file(Kallsyms(moved, "f" * 32), "x86_64") == symbol_elf(moved)
