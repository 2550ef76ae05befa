"""The PVH loader (vmscope.kvm.boot): images in, guest memory and a boot
plan out; bad images rejected with a message naming file and problem.

Pure: guest RAM is a memfd, no /dev/kvm needed. ``make_pvh_elf`` (in
tests/kvm_support.py) builds the tiny single-purpose guests.
"""

from __future__ import annotations

import pytest

from tests.kvm_support import LOAD, make_pvh_elf
from vmscope.guests import guest_elf
from vmscope.kvm.boot import load_kernel
from vmscope.devices.pvh import CMDLINE_ADDR, HVM_START_MAGIC, HvmMemmapEntry, HvmModlistEntry, HvmStartInfo
from vmscope.devices.ram import GuestRam
from vmscope.machine import ImageError


@pytest.fixture
def mem():
    m = GuestRam(0, 16 << 20)
    yield m
    m.close()


def write(tmp_path, name: str, data: bytes):
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_loads_the_demo_guest_with_start_info(mem):
    path = guest_elf("demo", "x86_64")
    plan = load_kernel(path, mem, cmdline="console=ttyS0 quiet")
    assert plan.all_cpus_at_entry  # the demo guest carries the vmscope note
    assert plan.mode == "pvh32"
    info = HvmStartInfo.from_buffer_copy(mem.read(plan.start_info, 56))
    assert info.magic == HVM_START_MAGIC and info.version == 1
    assert mem.read(info.cmdline_paddr, 20) == b"console=ttyS0 quiet\0"
    entries = [HvmMemmapEntry.from_buffer_copy(mem.read(info.memmap_paddr + 24 * i, 24)) for i in range(info.memmap_entries)]
    ram = [(e.addr, e.size) for e in entries if e.type == 1]
    assert (0x100000, mem.size - 0x100000) in ram
    # the entry lies in a loaded segment whose bytes are the file's
    assert any(a <= plan.entry < a + s for a, s in plan.segments)


def test_entry_and_code_land_where_the_elf_says(tmp_path, mem):
    code = bytes(range(1, 65))
    path = write(tmp_path, "k.elf", make_pvh_elf(code, entry=LOAD + 8, extra_memsz=32))
    plan = load_kernel(path, mem)
    assert plan.entry == LOAD + 8
    assert not plan.all_cpus_at_entry
    assert mem.read(LOAD, len(code)) == code
    assert mem.read(LOAD + len(code), 32) == bytes(32)  # bss zeroed


def test_initrd_becomes_module_zero(tmp_path, mem):
    path = write(tmp_path, "k.elf", make_pvh_elf(b"\xf4"))
    initrd = write(tmp_path, "initrd", b"INITRD" * 1000)
    plan = load_kernel(path, mem, initrd=initrd)
    info = HvmStartInfo.from_buffer_copy(mem.read(plan.start_info, 56))
    assert info.nr_modules == 1
    mod = HvmModlistEntry.from_buffer_copy(mem.read(info.modlist_paddr, 32))
    assert mod.size == 6000 and mem.read(mod.paddr, 6000) == b"INITRD" * 1000


def test_missing_file(tmp_path, mem):
    with pytest.raises(ImageError, match=r"nope\.elf: no such file"):
        load_kernel(tmp_path / "nope.elf", mem)


def test_empty_file_and_directory(tmp_path, mem):
    with pytest.raises(ImageError, match="empty file"):
        load_kernel(write(tmp_path, "empty", b""), mem)
    with pytest.raises(ImageError, match="is a directory"):
        load_kernel(tmp_path, mem)


def test_not_elf(tmp_path, mem):
    with pytest.raises(ImageError, match=r"junk\.bin: not an ELF file"):
        load_kernel(write(tmp_path, "junk.bin", b"hello, world" * 10), mem)


def test_elf_without_pvh_note(tmp_path, mem):
    path = write(tmp_path, "nonote.elf", make_pvh_elf(b"\xf4", pvh_note=False))
    with pytest.raises(ImageError, match=r"nonote\.elf: ELF without a PVH entry note \(XEN_ELFNOTE_PHYS32_ENTRY\)"):
        load_kernel(path, mem)


def test_bzimage_goes_to_the_linux_loader(tmp_path, mem):
    """A bzImage (``HdrS`` at 0x202) is the Linux loader's business (the
    Linux-guest issue); a bogus setup header is refused with the file named."""
    image = bytearray(8192)
    image[0x1FE:0x200] = b"\x55\xaa"
    image[0x202:0x206] = b"HdrS"
    with pytest.raises(ImageError, match=r"bzImage: .*(boot protocol|Linux)"):
        load_kernel(write(tmp_path, "bzImage", bytes(image)), mem)


def test_truncated_segment(tmp_path, mem):
    data = make_pvh_elf(bytes(4096))
    with pytest.raises(ImageError, match=r"cut\.elf: truncated: segment 0 needs file bytes"):
        load_kernel(write(tmp_path, "cut.elf", data[:0x1800]), mem)


def test_truncated_header(tmp_path, mem):
    data = make_pvh_elf(b"\xf4")
    with pytest.raises(ImageError, match=r"short\.elf: malformed ELF"):
        load_kernel(write(tmp_path, "short.elf", data[:40]), mem)


def test_segment_outside_ram(tmp_path, mem):
    path = write(tmp_path, "high.elf", make_pvh_elf(b"\xf4", load=64 << 20))
    with pytest.raises(ImageError, match=r"high\.elf: segment 0 at 0x4000000\+0x1 does not fit in guest RAM \(16 MiB\)"):
        load_kernel(path, mem)


def test_entry_outside_segments(tmp_path, mem):
    path = write(tmp_path, "e.elf", make_pvh_elf(b"\xf4", entry=0x200000))
    with pytest.raises(ImageError, match="PVH entry 0x200000 is outside every PT_LOAD segment"):
        load_kernel(path, mem)


def test_segment_over_boot_area(tmp_path, mem):
    path = write(tmp_path, "low.elf", make_pvh_elf(b"\xf4" * 16, load=0x6000))
    with pytest.raises(ImageError, match="overlaps the boot area"):
        load_kernel(path, mem)


def test_wrong_architecture(mem):
    path = guest_elf("demo", "aarch64")
    with pytest.raises(ImageError, match="ELF for EM_AARCH64, expected an x86_64"):
        load_kernel(path, mem)


def test_overlong_command_line(tmp_path, mem):
    path = write(tmp_path, "k.elf", make_pvh_elf(b"\xf4"))
    with pytest.raises(ImageError, match="command line is"):
        load_kernel(path, mem, cmdline="x" * (CMDLINE_ADDR))
