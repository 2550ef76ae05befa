"""ELF cores in QEMU's dump-guest-memory format: written, read back, and
refused with a clear error when damaged; the fleet's target list; the
kernel-text comparison that sees through KASLR relocations."""

from __future__ import annotations

import io
import os
import struct

import pytest
from elftools.elf.elffile import ELFFile

from vmscope.dump.elfcore import CoreError, CoreFile, DumpPlan, write_core
from vmscope.fleet.targets import Target, TargetListError, parse_targets

RAM = [(0, 0x9F000), (0x100000, 0x300000)]


def _ram_bytes(gpa: int, n: int) -> bytes:
    return bytes(((gpa + i) * 7) & 0xFF if (gpa + i) // 0x10000 % 3 else 0 for i in range(n))


def _write(tmp_path, **kw):
    regs0 = {"rip": 0xFFFFFFFF81000000, "rsp": 0x1234, "rax": 7, "cs": 0x10, "cr3": 0x5A000, "cr4": 0x6B0,
             "gs_base": 0xFFFF888007C00000}
    regs1 = {"rip": 0x401000, "rsp": 0x7FFD0000, "cr3": 0x6B000, "cr4": 0x6B0}
    plan = DumpPlan("x86_64", RAM, [regs0, regs1], b"OSRELEASE=6.1.0\nPAGESIZE=4096\nKERNELOFFSET=3a00000\n", **kw)
    path = tmp_path / "guest.core"
    with open(path, "wb") as f:
        size = write_core(f, plan, _ram_bytes, chunk=0x10000)
    return path, plan, size


def test_core_roundtrip_ram_registers_and_vmcoreinfo(tmp_path):
    path, plan, size = _write(tmp_path)
    assert os.path.getsize(path) == size
    core = CoreFile.open(path)
    assert core.arch == "x86_64"
    for gpa, n in RAM:
        assert core.memory.read(gpa + 5, 100) == _ram_bytes(gpa + 5, 100)
        assert core.memory.read(gpa + n - 16, 16) == _ram_bytes(gpa + n - 16, 16)
    assert core.vmcoreinfo.startswith(b"OSRELEASE=6.1.0\n")
    assert [c["rip"] for c in core.cpus] == [0xFFFFFFFF81000000, 0x401000]
    assert core.cpus[0]["cr3"] == 0x5A000 and core.cpus[1]["cr3"] == 0x6B000  # from QEMU's CPU-state note
    assert core.cpus[0]["gs_base"] == 0xFFFF888007C00000


def test_core_is_an_elf_core_as_qemu_writes_it(tmp_path):
    path, _, _ = _write(tmp_path)
    with open(path, "rb") as f:
        elf = ELFFile(f)
        assert elf["e_type"] == "ET_CORE" and elf["e_machine"] == "EM_X86_64"
        segs = list(elf.iter_segments())
        assert segs[0]["p_type"] == "PT_NOTE"
        loads = [(s["p_paddr"], s["p_filesz"], s["p_vaddr"]) for s in segs[1:]]
        assert loads == [(gpa, n, 0) for gpa, n in RAM]
        notes = [(n["n_name"], n["n_type"]) for n in segs[0].iter_notes()]
        assert notes[:2] == [("CORE", "NT_PRSTATUS")] * 2
        assert [n for n, _ in notes[2:]] == ["QEMU", "QEMU", "VMCOREINFO"]
        prstatus = list(segs[0].iter_notes())[0]
        assert len(prstatus["n_descdata"]) == 336  # sizeof(struct elf_prstatus) on x86_64


def test_zero_ram_becomes_holes_in_the_file(tmp_path):
    path, plan, size = _write(tmp_path)
    st = os.stat(path)
    assert st.st_blocks * 512 < size, "all-zero chunks must be holes (sparse file), not zeros on disk"


@pytest.mark.parametrize("damage, message", [
    (lambda b: b[: len(b) // 2], "truncated"),
    (lambda b: b"\x7fELF" + b[4:5] + b"\x02" + b[6:], "little-endian"),
    (lambda b: b[:16] + struct.pack("<H", 2) + b[18:], "not a core"),
    (lambda b: b"garbage" * 20, "not a 64-bit"),
    (lambda b: b[:40], "too short"),
], ids=["truncated", "big-endian", "executable", "garbage", "short"])
def test_damaged_cores_are_refused_with_the_reason(tmp_path, damage, message):
    path, _, _ = _write(tmp_path)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(CoreError, match=message):
        CoreFile.open(path)


def test_missing_core_names_the_file(tmp_path):
    with pytest.raises(CoreError, match="nope.core"):
        CoreFile.open(tmp_path / "nope.core")


def test_write_core_reports_progress_to_the_total():
    seen = []
    plan = DumpPlan("x86_64", RAM, [{}])
    write_core(io.BytesIO(), plan, _ram_bytes, chunk=0x40000, progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (plan.ram_bytes, plan.ram_bytes) and len(seen) > 3


# --- the fleet's target list ---------------------------------------------------------------------

def test_targets_file_parses_live_stubs_and_cores():
    text = """
    # two live guests and a core
    gdb=127.0.0.1:1234 qmp=127.0.0.1:4444
    gdb=10.0.0.7:1234 name=web-3   # a comment
    core=/dumps/a.core
    """
    assert parse_targets(text) == [Target("127.0.0.1:1234", "127.0.0.1:1234", "127.0.0.1:4444"),
                                   Target("web-3", "10.0.0.7:1234"), Target("/dumps/a.core", core="/dumps/a.core")]


@pytest.mark.parametrize("line, message", [
    ("gdb=1:2 core=/x", "not both"), ("qmp=1:2", "give gdb="), ("host=1", "not one of"),
    ("gdb=1:2 gdb=1:3", "twice"), ("", "no targets"),
])
def test_bad_target_lines_name_the_line(line, message):
    with pytest.raises(TargetListError, match=message):
        parse_targets(line, "t.txt")


def test_duplicate_targets_need_names():
    with pytest.raises(TargetListError, match="t.txt:2: .*listed twice"):
        parse_targets("core=/a\ncore=/a\n", "t.txt")


# --- kernel text through KASLR ---------------------------------------------------------------------

def _text(slide: int, patch: tuple[int, bytes] | None = None):
    """Synthetic kernel text: code bytes with relocated references (absolute
    64-bit, sign-extended 32-bit, and 'inverse' per-CPU 32-bit ones)."""
    from vmscope.fleet.textdiff import KernelText

    import random

    rng = random.Random(5)
    base = 0xFFFFFFFF81000000
    buf = bytearray(rng.randbytes(64 * 1024))
    for i in range(0, len(buf) - 16, 97):
        kind = i % 3
        target = base + rng.randrange(0, 0x2000000)
        if kind == 0:
            struct.pack_into("<Q", buf, i, target + slide)
        elif kind == 1:
            struct.pack_into("<I", buf, i, (target + slide) & 0xFFFFFFFF)
        else:
            struct.pack_into("<I", buf, i, (0x2000 - slide) & 0xFFFFFFFF)  # per-CPU: moves the other way
    if patch:
        buf[patch[0] : patch[0] + len(patch[1])] = patch[1]
    return KernelText(base + slide, slide, bytes(buf))


def test_kaslr_relocations_are_not_differences_but_a_patch_is():
    from vmscope.fleet.textdiff import unexplained_pages

    a, b = _text(0x10C00000), _text(0x19600000)
    assert a.data != b.data
    assert unexplained_pages(a, b) == []
    patched = _text(0x19600000, (0x5123, b"\xcc\xcc\x90"))
    assert unexplained_pages(a, patched) == [0x5000]
    assert unexplained_pages(a, _text(0x10C00000, (0x9000, b"\xe9\x00\x00\x00\x00"))) == [0x9000]
