"""The direct boot's parts on Debian's real cloud kernel: the bzImage payload
decompressed on the host, the relocation table, KASLR placement and
relocation, the long-mode set-up, and kallsyms readable from the placed
image (symbols from the first instruction). The Debian kernel comes from
vmscope.images (downloaded once into the cache, as `vmscope guest linux`
does)."""

from __future__ import annotations

import gzip
import logging
import lzma
import struct

import pytest

from vmscope.kvm.boot import load_kernel
from vmscope.kvm.boot import payload as pl
from vmscope.kvm.boot import vmlinux as vl
from vmscope.kvm.boot.linux import BOOT_PARAMS_ADDR, HDR_LOADFLAGS, HDR_RAMDISK_IMAGE
from vmscope.kvm.boot.relocs import RelocTable, apply_relocs, elf_extent, parse_relocs, split_relocs
from vmscope.devices.ram import GuestRam

MiB = 1 << 20
LINK_TEXT = 0xFFFFFFFF81000000
START_KERNEL_MAP = 0xFFFFFFFF80000000


@pytest.fixture(scope="module")
def bzimage():
    from vmscope.images.kernel import cloud_kernel

    return cloud_kernel("amd64", quiet=True).vmlinuz


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache of our own, so the first use really decompresses."""
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("cache")
    mp.setenv("VMSCOPE_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def cached(bzimage, cache):
    first = pl.cached_vmlinux(bzimage)
    second = pl.cached_vmlinux(bzimage)
    return first, second


@pytest.fixture(scope="module")
def raw(bzimage):
    return pl.decompress(pl.find_payload(bzimage.read_bytes()))


@pytest.fixture(scope="module")
def table(cached):
    return parse_relocs(cached[0][1].read_bytes())


@pytest.fixture(scope="module")
def elf(cached):
    return cached[0][0].read_bytes()


def test_debians_payload_is_lz4_legacy_and_decodes_to_the_recorded_size(bzimage, raw):
    data = bzimage.read_bytes()
    p = pl.find_payload(data)
    assert p.fmt == "lz4"
    assert struct.unpack_from("<I", p.data, 0)[0] == pl.LZ4_LEGACY_MAGIC
    assert len(raw) == struct.unpack_from("<I", p.data, len(p.data) - 4)[0]
    assert raw[:4] == b"\x7fELF"
    assert len(raw) > 3 * pl.LZ4_LEGACY_BLOCK  # several 8 MiB blocks, the last one short


def test_cache_keeps_the_elf_and_its_relocations_by_the_images_hash(bzimage, cached, raw, cache):
    (elf_path, rel_path, was_cached), (elf2, rel2, was_cached2) = cached
    assert (was_cached, was_cached2) == (False, True)
    assert (elf_path, rel_path) == (elf2, rel2)
    assert elf_path.parent == cache / "vmlinux"
    assert elf_path.name.startswith(pl.image_key(bzimage.read_bytes()))
    # the two files are the payload, cut where the ELF ends
    assert elf_path.read_bytes() + rel_path.read_bytes() == raw
    assert elf_extent(elf_path.read_bytes()) == elf_path.stat().st_size


def test_relocation_table_lists_only_places_in_the_image_that_hold_kernel_addresses(elf, table):
    entry, segs = vl.parse_elf(elf)
    load = min(s.paddr for s in segs)
    span = max(s.paddr + s.memsz for s in segs) - load
    assert load == 0x1000000 and entry == load  # startup_64, physical, at LOAD_PHYSICAL_ADDR
    assert len(table.r64) > 50_000 and len(table.r32) > 20_000 and len(table.rinv) > 1000

    def file_bytes(offset: int, n: int) -> bytes:
        for s in segs:
            if s.paddr - load <= offset < s.paddr - load + s.filesz:
                at = s.offset + offset - (s.paddr - load)
                return elf[at : at + n]
        return b"\0" * n  # bss

    base = LINK_TEXT - (1 << 64)
    for e in table.r64[::997]:
        value = struct.unpack("<Q", file_bytes(e - base, 8))[0]
        # a kernel address, or (the early page tables: symbol - __START_KERNEL_map + flags) its link-time physical one
        assert LINK_TEXT <= value <= LINK_TEXT + span or load <= value & ~0xFFF < load + span, hex(value)
    for e in table.r32[::499]:
        value = struct.unpack("<i", file_bytes(e - base, 4))[0] + (1 << 64)
        assert START_KERNEL_MAP <= value <= LINK_TEXT + span, hex(value)
    for arr in (table.r32, table.rinv, table.r64):
        assert all(0 <= e - base < span for e in arr[::101])


def test_split_and_parse_agree_with_the_kernels_backward_walk(raw, table):
    body, rel = split_relocs(raw)
    words = struct.unpack(f"<{len(rel) // 4}i", rel)
    walk = list(reversed(words))  # as handle_relocations walks: from the end
    z1 = walk.index(0)
    z2 = walk.index(0, z1 + 1)
    assert sorted(walk[:z1]) == sorted(table.r32)
    assert sorted(walk[z1 + 1 : z2]) == sorted(table.rinv)
    assert sorted(walk[z2 + 1 : -1]) == sorted(table.r64)
    assert walk[-1] == 0 and len(body) + len(rel) == len(raw)


def test_machine_code_relocation_matches_the_python_loop(table):
    import ctypes

    size = 64 * MiB
    pattern = bytes(range(256)) * (size // 256)
    a, b = bytearray(pattern), bytearray(pattern)
    anchor = (ctypes.c_char * size).from_buffer(b)
    n_py = apply_relocs(memoryview(a), table, LINK_TEXT, 0x2A400000)
    n_native = apply_relocs(memoryview(b), table, LINK_TEXT, 0x2A400000, ctypes.addressof(anchor))
    del anchor
    assert n_py == n_native == len(table)
    assert a == b and a != bytearray(pattern)


def test_relocation_outside_the_image_is_refused():
    from array import array

    from vmscope.machine import ImageError

    t = RelocTable(array("i"), array("i"), array("i", [(LINK_TEXT + 0x1000 - (1 << 64))]))
    with pytest.raises(ImageError, match="outside the kernel image"):
        apply_relocs(memoryview(bytearray(0x800)), t, LINK_TEXT, 0x200000)


def test_machine_code_is_the_documented_loops():
    import capstone

    from vmscope.kvm.boot.reloc_native import CHECK_CODE, loop_code

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    text = [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(loop_code("add64"), 0)]
    assert text == ["test rdx, rdx", "je 0x15", "movsxd rax, dword ptr [rsi]", "add qword ptr [rdi + rax], rcx",
                    "add rsi, 4", "dec rdx", "jne 5", "ret"]
    assert "sub dword ptr [rdi + rax], ecx" in [f"{i.mnemonic} {i.op_str}" for i in md.disasm(loop_code("sub32"), 0)]
    assert [i.mnemonic for i in md.disasm(CHECK_CODE, 0)][-1] == "ret"


def _boot(bzimage, tmp_path, cmdline="console=ttyS0", pick=None, mem_mib=512):
    initrd = tmp_path / "initrd"
    initrd.write_bytes(b"\x07" * (3 * MiB))
    mem = GuestRam(0, mem_mib * MiB)
    plan = vl.load_vmlinux(bzimage, bzimage.read_bytes()[: vl.HEAD_BYTES], mem, cmdline, initrd,
                           randbelow=pick or vl.random_below)
    return mem, plan


def test_kaslr_places_the_kernel_at_random_aligned_slots_clear_of_the_initrd(bzimage, cached, tmp_path):
    seen = set()
    for _ in range(4):
        mem, plan = _boot(bzimage, tmp_path)
        k = plan.kernel
        initrd_at, initrd_len = struct.unpack_from("<II", mem.read(BOOT_PARAMS_ADDR + HDR_RAMDISK_IMAGE, 8))
        loadflags = mem.read(BOOT_PARAMS_ADDR + HDR_LOADFLAGS, 1)[0]
        mem.close()
        assert plan.mode == "linux64" and plan.start_info == BOOT_PARAMS_ADDR
        assert k.kaslr and loadflags & vl.KASLR_FLAG
        assert k.phys_text % vl.ALIGN == 0 and k.phys_text >= 0x1000000
        assert k.phys_text + (k.end - k.text) <= initrd_at  # the initrd sits at the top of RAM
        assert k.text % vl.ALIGN == 0 and LINK_TEXT <= k.text and k.end <= START_KERNEL_MAP + vl.KERNEL_IMAGE_SIZE
        assert plan.entry == k.phys_text  # startup_64 is at _text
        seen.add((k.phys_text, k.text))
    assert len(seen) > 1


def test_nokaslr_keeps_the_link_addresses(bzimage, cached, tmp_path):
    mem, plan = _boot(bzimage, tmp_path, "console=ttyS0 nokaslr")
    try:
        assert (plan.kernel.phys_text, plan.kernel.text, plan.kernel.slide) == (0x1000000, LINK_TEXT, 0)
        assert not mem.read(BOOT_PARAMS_ADDR + HDR_LOADFLAGS, 1)[0] & vl.KASLR_FLAG
    finally:
        mem.close()


def test_the_cached_kernel_is_sparse_and_its_holes_load_as_zeros(bzimage, cached, elf, tmp_path):
    """The cache writes the ELF's zero pages as holes (a third of Debian's
    loaded image is .bss, .brk and .init.scratch) and the loader copies
    only the data extents: the placed image must still equal every
    segment's bytes (nokaslr: no relocation changes them)."""
    path = cached[0][0]
    st = path.stat()
    assert st.st_size - st.st_blocks * 512 > 10 * MiB  # at least 10 MiB of holes
    with open(path, "rb") as f:
        extents = list(pl.data_extents(f.fileno(), 0, st.st_size))
    assert sum(e - s for s, e in extents) < st.st_size - 10 * MiB
    assert all(not any(elf[e:n]) for (_, e), (n, _) in zip(extents, extents[1:]))  # the gaps read as zeros
    mem, plan = _boot(bzimage, tmp_path, "console=ttyS0 nokaslr")
    try:
        _, segs = vl.parse_elf(elf)
        load_phys = min(seg.paddr for seg in segs)
        for seg in segs:
            at = plan.kernel.phys_text + (seg.paddr - load_phys)
            assert mem.read(at, seg.filesz) == elf[seg.offset : seg.offset + seg.filesz]
    finally:
        mem.close()


def test_placed_kernel_is_relocated_and_its_kallsyms_decode_at_the_slid_addresses(bzimage, cached, tmp_path):
    """Symbols from the first instruction: kallsyms read from the physical
    image the VMM placed give the slid addresses, and the long-mode page
    tables map the entry point to itself."""
    from vmscope.vmi.linux.kallsyms import scan_for_kallsyms
    from vmscope.vmi.memory import BytesMemory
    from vmscope.vmi.paging.x86_64 import X86_64Paging

    picks = iter([7, 100])  # physical slot 7, virtual slot 100

    mem, plan = _boot(bzimage, tmp_path, pick=lambda n: next(picks))
    try:
        k = plan.kernel
        assert k.phys_text == 0x1000000 + 7 * vl.ALIGN and k.text == LINK_TEXT + 100 * vl.ALIGN
        syms = scan_for_kallsyms(mem.read, k.phys_text, k.phys_text + (k.end - k.text))
        assert syms["_text"] == k.text
        assert k.text < syms["start_kernel"] < k.end
        assert syms["startup_64"] == k.text
        paging = X86_64Paging(BytesMemory(mem.view), plan.long_mode.cr3, cr4=1 << 5)
        assert paging.translate(plan.entry).paddr == plan.entry
        last = k.phys_text + (k.end - k.text) - 1
        assert paging.translate(last).paddr == last
    finally:
        mem.close()


def test_unknown_compression_falls_back_to_the_decompressor_and_says_why(bzimage, tmp_path, caplog):
    data = bytearray(bzimage.read_bytes())
    setup = (data[0x1F1] + 1) * 512
    off = struct.unpack_from("<I", data, 0x248)[0]
    data[setup + off : setup + off + 4] = b"\x89LZO"
    odd = tmp_path / "vmlinuz-lzo"
    odd.write_bytes(bytes(data))
    mem = GuestRam(0, 512 * MiB)
    try:
        with caplog.at_level(logging.INFO, logger="vmscope.kvm.boot.vmlinux"):
            plan = load_kernel(odd, mem, "console=ttyS0", boot="direct")
        assert plan.mode == "linux32" and plan.kernel is None
        assert "own decompressor" in caplog.text and "lzo" in caplog.text
        assert load_kernel(bzimage, mem, "console=ttyS0", boot="decompressor").mode == "linux32"
    finally:
        mem.close()


@pytest.mark.parametrize("fmt", ["gzip", "xz", "lzma", "bzip2"])
def test_other_formats_decode_as_the_kernels_build_writes_them(fmt):
    import bz2

    blob = b"\x7fELF" + bytes(range(256)) * 4000
    size = struct.pack("<I", len(blob))
    data = {
        "gzip": lambda: gzip.compress(blob),  # gzip carries its own size
        "xz": lambda: lzma.compress(blob, lzma.FORMAT_XZ, check=lzma.CHECK_CRC32) + size,
        "lzma": lambda: lzma.compress(blob, lzma.FORMAT_ALONE) + size,
        "bzip2": lambda: bz2.compress(blob) + size,
    }[fmt]()
    p = next(pl.Payload(f, data) for m, f in pl.MAGICS if data.startswith(m))
    assert p.fmt == fmt
    assert pl.decompress(p) == blob
    with pytest.raises(pl.PayloadUnsupported):
        pl.decompress(pl.Payload(fmt, data[: len(data) // 2] + size))


def test_a_logged_placement_can_be_forced_to_boot_it_again(bzimage, cached, tmp_path, monkeypatch):
    monkeypatch.setenv("VMSCOPE_KASLR_PLACEMENT", "b000000:1600000")
    mem, plan = _boot(bzimage, tmp_path)
    try:
        assert plan.kernel.phys_text == 0xB000000 and plan.kernel.slide == 0x600000
    finally:
        mem.close()
    monkeypatch.setenv("VMSCOPE_KASLR_PLACEMENT", "b000001:1600000")
    with pytest.raises(vl.ImageError, match="2 MiB aligned"):
        _boot(bzimage, tmp_path)
