"""Page-table walkers on synthetic page tables built here, byte by byte."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from vmscope.vmi import (AddressSpace, Aarch64Paging, BytesMemory, PhysicalMemoryError, Region, RegionMemory,
                         TranslationCache, TranslationError, X86_64Paging)

P, RW, US, PS, NX = 1, 2, 4, 0x80, 1 << 63
KB, MB, GB = 1 << 10, 1 << 20, 1 << 30


class X86Tables:
    """Builds x86_64 page tables in a bytearray: tables are allocated from
    ``table_base`` upwards; data pages can live anywhere in the buffer."""

    def __init__(self, size: int = 4 * MB, levels: int = 4, table_base: int = 0x100000):
        self.mem = bytearray(size)
        self.levels = levels
        self.next_table = table_base
        self.root = self._alloc()

    def _alloc(self) -> int:
        addr = self.next_table
        self.next_table += 0x1000
        return addr

    def _get(self, addr):
        return struct.unpack_from("<Q", self.mem, addr)[0]

    def _set(self, addr, value):
        struct.pack_into("<Q", self.mem, addr, value)

    def map(self, va: int, pa: int, size: int = 4 * KB, flags: int = P | RW, table_flags: int = P | RW | US):
        shifts = [48, 39, 30, 21, 12][5 - self.levels :]
        leaf_shift = {4 * KB: 12, 2 * MB: 21, 1 * GB: 30}[size]
        table = self.root
        for shift in shifts:
            slot = table + ((va >> shift) & 0x1FF) * 8
            if shift == leaf_shift:
                self._set(slot, pa | flags | (PS if size > 4 * KB else 0))
                return
            entry = self._get(slot)
            if not entry & P:
                entry = self._alloc() | table_flags
                self._set(slot, entry)
            table = entry & 0x000FFFFFFFFFF000

    def walker(self, cache=None):
        return X86_64Paging(BytesMemory(self.mem), self.root, levels=self.levels, cache=cache)


def test_x86_4k_2m_1g_pages_translate_with_offsets():
    t = X86Tables()
    t.map(0x400000, 0x5000)
    t.map(0xFFFF_8880_0020_0000, 0x0020_0000, 2 * MB)
    t.map(0xFFFF_FFFF_8000_0000, 0x4000_0000, 1 * GB)
    w = t.walker()
    tr = w.translate(0x400123)
    assert (tr.paddr, tr.page_size, tr.page.level) == (0x5123, 4 * KB, "PT")
    tr = w.translate(0xFFFF_8880_0023_4567)
    assert (tr.paddr, tr.page_size, tr.page.level) == (0x0023_4567, 2 * MB, "PD")
    tr = w.translate(0xFFFF_FFFF_8123_4567)
    assert (tr.paddr, tr.page_size, tr.page.level) == (0x4123_4567, 1 * GB, "PDPT")


@pytest.mark.parametrize("va,level", [
    (0x0000_7000_0000_0000, "PML4"),   # empty PML4 slot
    (0x0000_0000_4000_0000, "PDPT"),   # PML4 present, PDPT slot empty
    (0x0000_0000_0060_0000, "PD"),     # PDPT present, PD slot empty
    (0x0000_0000_0040_1000, "PT"),     # PT present, PTE empty
])
def test_x86_unmapped_names_address_and_level(va, level):
    t = X86Tables()
    t.map(0x400000, 0x5000)
    with pytest.raises(TranslationError) as exc:
        t.walker().translate(va)
    assert exc.value.level == level and exc.value.vaddr == va
    msg = str(exc.value)
    assert f"0x{va:x}" in msg and level in msg and "not present" in msg


def test_x86_non_canonical_is_rejected():
    t = X86Tables()
    with pytest.raises(TranslationError, match="non-canonical"):
        t.walker().translate(0x0000_8000_0000_0000)


def test_x86_nx_and_user_bits_combine_across_levels():
    t = X86Tables()
    t.map(0x400000, 0x5000, flags=P | RW | US)
    t.map(0x7F00_0000_0000, 0x6000, flags=P | US | NX)
    t.map(0xFFFF_8880_0000_0000, 0x7000, flags=P | RW)  # supervisor
    w = t.walker()
    a, b, c = (w.translate(v).page for v in (0x400000, 0x7F00_0000_0000, 0xFFFF_8880_0000_0000))
    assert (a.user, a.writable, a.nx) == (True, True, False)
    assert (b.user, b.writable, b.nx) == (True, False, True)
    assert (c.user, c.writable, c.nx) == (False, True, False)
    # NX on an upper-level entry makes everything below non-executable.
    t2 = X86Tables()
    t2.map(0x400000, 0x5000, flags=P | RW | US, table_flags=P | RW | US | NX)
    assert t2.walker().translate(0x400000).page.nx


def test_x86_5_level_uses_bits_above_48():
    t = X86Tables(levels=5)
    va = 0x00FF_0000_1234_5000  # needs LA57: bit 55 set, canonical for 57-bit
    t.map(va, 0x9000)
    t.map(0xFF12_3456_0000_0000, 0x20_0000, 2 * MB)
    w = t.walker()
    assert w.translate(va + 0x10).paddr == 0x9010
    assert w.translate(0xFF12_3456_0000_0042).paddr == 0x20_0042
    with pytest.raises(TranslationError) as exc:
        w.translate(0x0001_0000_0000_0000)
    assert exc.value.level == "PML5"
    # The same address is non-canonical under 4-level paging.
    with pytest.raises(TranslationError, match="non-canonical"):
        X86_64Paging(BytesMemory(t.mem), t.root, levels=4).translate(va)


def test_x86_levels_from_cr4_la57():
    mem = BytesMemory(bytes(0x1000))
    assert X86_64Paging(mem, 0, cr4=1 << 12).levels == 5
    assert X86_64Paging(mem, 0, cr4=0).levels == 4


def test_cache_serves_stale_until_invalidated():
    t = X86Tables()
    t.map(0x400000, 0x5000)
    cache = TranslationCache()
    w = t.walker(cache)
    assert w.translate(0x400000).paddr == 0x5000
    t.map(0x400000, 0x8000)  # guest rewrites its PTE while "running"
    assert w.translate(0x400000).paddr == 0x5000
    cache.invalidate()
    assert w.translate(0x400000).paddr == 0x8000
    assert cache.hits >= 1


def test_cache_still_valid_only_while_every_table_page_it_read_is_unchanged():
    t = X86Tables()
    t.map(0x400000, 0x5000)
    t.map(0x7F00_0000_0000, 0x6000)
    cache = TranslationCache()
    w = t.walker(cache)
    assert [w.translate(v).paddr for v in (0x400000, 0x7F00_0000_0000)] == [0x5000, 0x6000]
    memory = BytesMemory(t.mem)
    assert cache.still_valid(memory)
    t.mem[0x5000] = 0xAA  # a data page changed: the walks still hold
    assert cache.still_valid(memory)
    t.map(0x401000, 0x9000)  # a new entry in a table page a walk read: unmapped before, mapped now
    assert not cache.still_valid(memory)
    cache.invalidate()
    assert w.translate(0x401000).paddr == 0x9000 and cache.still_valid(memory)
    t.mem[t.root + 8 * 0x1FF] |= 0x20  # even a bit the walk does not use (cheaper to walk again)
    assert not cache.still_valid(memory)


def test_cache_of_many_table_pages_is_not_compared():
    t = X86Tables(size=64 * MB)
    cache = TranslationCache()
    w = t.walker(cache)
    for i in range(TranslationCache.MAX_CHECKED_TABLES):  # one page table per 2 MiB, besides PML4, PDPT, PD
        t.map(i << 21, 0x5000)
    for i in range(TranslationCache.MAX_CHECKED_TABLES):
        w.translate(i << 21)
    assert not cache.still_valid(BytesMemory(t.mem))


def test_address_space_reads_across_discontiguous_pages():
    t = X86Tables()
    t.mem[0x5000:0x6000] = b"A" * 0x1000
    t.mem[0x9000:0xA000] = b"B" * 0x1000
    t.map(0x400000, 0x9000)
    t.map(0x401000, 0x5000)  # virtually after, physically before
    aspace = AddressSpace(t.walker())
    data = aspace.read(0x400FF0, 0x20)
    assert data == b"B" * 0x10 + b"A" * 0x10
    aspace.write(0x400FFE, b"xyzw")
    assert bytes(t.mem[0x9FFE:0xA000]) == b"xy" and bytes(t.mem[0x5000:0x5002]) == b"zw"
    with pytest.raises(TranslationError) as exc:
        aspace.read(0x401FF0, 0x20)  # runs into unmapped 0x402000
    assert exc.value.vaddr == 0x402000 and exc.value.level == "PT"
    data, holes = aspace.read_partial(0x401FF0, 0x20)
    assert data == b"A" * 0x10 + b"\0" * 0x10 and holes == [(0x402000, 0x10)]


def test_address_space_cstring_and_ints():
    t = X86Tables()
    t.mem[0x5FFC:0x6000] = b"swap"
    t.mem[0x7000:0x7008] = b"per/0\0zz"
    t.map(0x400000, 0x5000)
    t.map(0x401000, 0x7000)
    aspace = AddressSpace(t.walker())
    assert aspace.cstring(0x400FFC) == "swapper/0"
    assert aspace.u32(0x400FFC) == struct.unpack("<I", b"swap")[0]


def test_region_memory_stitches_regions_and_names_holes():
    low, high = bytes(range(256)) * 16, b"\xEE" * 4096
    mem = RegionMemory([Region(0x0, 4096, low), Region(0x1000, 4096, high), Region(0x10000, 4096, high)])
    assert mem.read(0xFFE, 4) == bytes([0xFE, 0xFF, 0xEE, 0xEE])
    with pytest.raises(PhysicalMemoryError, match="hole"):
        mem.read(0x1FF0, 0x20)
    with pytest.raises(PhysicalMemoryError, match="0x11000"):
        mem.read(0x11000, 1)


def test_bytes_memory_out_of_range():
    with pytest.raises(PhysicalMemoryError, match="0x2000"):
        BytesMemory(bytes(0x1000), base=0x1000).read(0x2000, 1)


# ---------------------------------------------------------------- AArch64

class ArmTables:
    """Stage-1 tables for one granule; tables take a full granule each."""

    def __init__(self, granule: int, size: int = 8 * MB):
        self.g = granule  # shift: 12, 14, 16
        self.mem = bytearray(size)
        self.next_table = 1 << 20
        self.roots: dict[str, int] = {}

    def _alloc(self):
        gsize = 1 << self.g
        addr = (self.next_table + gsize - 1) & ~(gsize - 1)
        self.next_table = addr + gsize
        return addr

    def root(self, which):
        if which not in self.roots:
            self.roots[which] = self._alloc()
        return self.roots[which]

    def map(self, which: str, va_bits: int, va: int, pa: int, level: int = 3, attrs: int = 0):
        stride = self.g - 3
        levels = -(-(va_bits - self.g) // stride)
        table = self.root(which)
        for lvl in range(4 - levels, 4):
            shift = self.g + (3 - lvl) * stride
            width = min(stride, va_bits - shift)
            slot = table + ((va >> shift) & ((1 << width) - 1)) * 8
            if lvl == level:
                desc = pa | attrs | 1 | (2 if lvl == 3 else 0) | (1 << 10)  # AF
                struct.pack_into("<Q", self.mem, slot, desc)
                return 1 << shift
            entry = struct.unpack_from("<Q", self.mem, slot)[0]
            if not entry & 1:
                entry = self._alloc() | 3
                struct.pack_into("<Q", self.mem, slot, entry)
            table = entry & 0x0000FFFFFFFFF000 & ~((1 << self.g) - 1)


def tcr(t0sz, t1sz, g0, g1):
    tg0 = {12: 0b00, 16: 0b01, 14: 0b10}[g0]
    tg1 = {12: 0b10, 16: 0b11, 14: 0b01}[g1]
    return t0sz | tg0 << 14 | t1sz << 16 | tg1 << 30


# (granule shift, VA bits, leaf levels to test with their expected sizes)
ARM_CASES = [
    (12, 48, {3: 4 * KB, 2: 2 * MB, 1: 1 * GB}),
    (12, 39, {3: 4 * KB, 2: 2 * MB, 1: 1 * GB}),
    (14, 48, {3: 16 * KB, 2: 32 * MB}),
    (14, 47, {3: 16 * KB, 2: 32 * MB}),
    (16, 48, {3: 64 * KB, 2: 512 * MB}),
    (16, 42, {3: 64 * KB, 2: 512 * MB}),
]


@pytest.mark.parametrize("g,va_bits,leaves", ARM_CASES, ids=[f"{1 << c[0] >> 10}K-{c[1]}bit" for c in ARM_CASES])
def test_arm64_granules_pages_and_blocks_via_ttbr0_and_ttbr1(g, va_bits, leaves):
    t = ArmTables(g)
    expected = []
    for i, (level, size) in enumerate(sorted(leaves.items())):
        user_va = (i + 1) * (1 << (va_bits - 3))  # well apart, inside TTBR0's range
        kern_va = (1 << 64) - (1 << va_bits) + (i + 1) * (1 << (va_bits - 3))
        pa = (i + 1) * (1 << 32) & ~(size - 1)
        assert t.map("ttbr0", va_bits, user_va, pa, level, attrs=1 << 6 | 1 << 54) == size
        assert t.map("ttbr1", va_bits, kern_va, pa + size, level, attrs=1 << 7 | 1 << 53) == size
        expected.append((user_va, pa, size, True))
        expected.append((kern_va, pa + size, size, False))
    w = Aarch64Paging(BytesMemory(t.mem), t.root("ttbr0") | (5 << 48), t.root("ttbr1") | 1,
                      tcr(64 - va_bits, 64 - va_bits, g, g))
    for va, pa, size, user in expected:
        off = size - 8 if size > 8 else 0
        tr = w.translate(va + off)
        assert tr.paddr == pa + off and tr.page_size == size
        assert tr.page.user is user and tr.page.writable is user and tr.page.nx
    # Unmapped slot in a populated table: the walk names the leaf level.
    va0 = expected[0][0] + expected[0][2] * 2
    with pytest.raises(TranslationError) as exc:
        w.translate(va0)
    assert exc.value.level.startswith("L") and f"0x{va0:x}" in str(exc.value)
    # Between the two halves: neither TTBR covers it.
    with pytest.raises(TranslationError, match="outside both"):
        w.translate(1 << va_bits)


def test_arm64_start_level_and_invalid_root_entry():
    t = ArmTables(12)
    w = Aarch64Paging(BytesMemory(t.mem), t.root("ttbr0"), t.root("ttbr1"), tcr(25, 25, 12, 12))  # 39-bit: L1 start
    with pytest.raises(TranslationError) as exc:
        w.translate(0x1000)
    assert exc.value.level == "L1" and exc.value.entry == 0
    w48 = Aarch64Paging(BytesMemory(t.mem), t.root("ttbr0"), t.root("ttbr1"), tcr(16, 16, 12, 12))
    with pytest.raises(TranslationError) as exc:
        w48.translate(0xFFFF_0000_0000_0000)
    assert exc.value.level == "L0"


def test_arm64_block_at_wrong_level_is_rejected():
    t = ArmTables(16)
    # A 64K-granule block at L1 (4 TiB) needs 52-bit addressing; refuse it.
    t.map("ttbr0", 48, 0, 0, level=1)
    w = Aarch64Paging(BytesMemory(t.mem), t.root("ttbr0"), t.root("ttbr1"), tcr(16, 16, 16, 16))
    with pytest.raises(TranslationError, match="block descriptor not allowed at L1"):
        w.translate(0x1234)


def test_arm64_epd_and_reserved_tg():
    t = ArmTables(12)
    with pytest.raises(ValueError, match="TG0"):
        Aarch64Paging(BytesMemory(t.mem), 0, 0, 0b11 << 14)
    w = Aarch64Paging(BytesMemory(t.mem), 0, 0, tcr(16, 16, 12, 12) | 1 << 7)
    with pytest.raises(TranslationError, match="EPD0"):
        w.translate(0x1000)


# ---------------------------------------------------------------- properties

@settings(max_examples=40, deadline=None)
@given(st.dictionaries(st.integers(0, (1 << 35) - 1), st.integers(0x200, 0x3FF), min_size=1, max_size=24),
       st.sampled_from([4, 5]))
def test_x86_random_4k_mappings_match_model(mapping, levels):
    """Any set of 4K mappings translates back exactly, and a read of two
    adjacent virtual pages returns the two physical pages' bytes."""
    t = X86Tables(size=8 * MB, levels=levels, table_base=0x400000)
    for vpn, ppn in mapping.items():
        t.map(vpn << 12, ppn << 12, flags=P | RW | US)
        struct.pack_into("<Q", t.mem, ppn << 12, vpn)  # tag each page
    w = t.walker()
    aspace = AddressSpace(w)
    for vpn, ppn in mapping.items():
        assert w.translate((vpn << 12) | 0xABC).paddr == (ppn << 12) | 0xABC
        if vpn + 1 in mapping and mapping[vpn + 1] != ppn:
            data = aspace.read((vpn << 12) + 0x1000 - 8, 16)
            assert data[:8] == t.mem[(ppn << 12) + 0xFF8 : (ppn << 12) + 0x1000]
            nxt = mapping[vpn + 1] << 12
            assert data[8:] == t.mem[nxt : nxt + 8]
    for vpn in range(4):
        if vpn not in mapping:
            with pytest.raises(TranslationError):
                w.translate(vpn << 12)


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([(12, 48), (12, 39), (14, 47), (16, 42)]),
       st.lists(st.tuples(st.integers(0, 1023), st.integers(1, 60)), min_size=1, max_size=12,
                unique_by=lambda t: t[0]),
       st.booleans())
def test_arm64_random_page_mappings_match_model(shape, pages, kernel_half):
    """Pages of the granule size mapped at random indices translate back
    exactly through either TTBR, and nothing else in the range is mapped."""
    g, va_bits = shape
    gsize = 1 << g
    t = ArmTables(g, size=16 * MB)
    base = (1 << 64) - (1 << va_bits) if kernel_half else 0
    which = "ttbr1" if kernel_half else "ttbr0"
    for vpn, ppn in pages:
        t.map(which, va_bits, base + vpn * gsize, ppn * gsize * 4, level=3)
    w = Aarch64Paging(BytesMemory(t.mem), t.root("ttbr0"), t.root("ttbr1"), tcr(64 - va_bits, 64 - va_bits, g, g))
    mapped = dict(pages)
    for vpn, ppn in pages:
        tr = w.translate(base + vpn * gsize + 0x10)
        assert tr.paddr == ppn * gsize * 4 + 0x10 and tr.page_size == gsize
    for vpn in range(8):
        if vpn not in mapped:
            with pytest.raises(TranslationError):
                w.translate(base + vpn * gsize)


def test_arm64_kernel_image_placed_by_a_loader_needs_no_header():
    """Once arm64 Linux runs, only ``_stext`` onwards is mapped (and
    reserved: the 64 KiB head page below it may be reused, as under
    vmscope's VMM). A VMM that loaded the Image knows where ``_text`` is
    physically; the walk from a text address to ``_stext`` then gives the
    virtual ``_text`` without reading a header."""
    from vmscope.vmi.linux.kaslr import KernelNotFound, find_arm64_kernel_image

    t = ArmTables(12)
    phys_text, text = 0x40_0000, 0xFFFF_A859_BD20_0000
    for i in range(8):  # _stext .. 8 pages on; nothing maps _text itself
        t.map("ttbr1", 48, text + 0x1_0000 + i * 4 * KB, phys_text + 0x1_0000 + i * 4 * KB)
    w = Aarch64Paging(BytesMemory(t.mem), 0, t.root("ttbr1"), tcr(16, 16, 12, 12))
    vbar = text + 0x1_0000 + 5 * 4 * KB + 0x800
    loc = find_arm64_kernel_image(AddressSpace(w), vbar, w, loaded=(phys_text, 0x200_0000))
    assert (loc.text, loc.end, loc.phys_text) == (text, text + 0x200_0000, phys_text)
    with pytest.raises(KernelNotFound, match="no arm64 Image header"):  # the header page was reused
        find_arm64_kernel_image(AddressSpace(w), vbar, w)
