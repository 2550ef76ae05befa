"""The Linux layer's decoders on data built here: kallsyms tables in both
layouts (with and without ``kallsyms_seqs_of_names``), BTF, the printk
data ring, task states."""

from __future__ import annotations

import struct

import pytest

from vmscope.vmi.linux.btf import Btf, BtfError
from vmscope.vmi.linux.kallsyms import KallsymsNotFound, parse_kallsyms
from vmscope.vmi.linux.printk import ring_text as _ring_text
from vmscope.vmi.linux.tasks import state_letter as _state_letter

BASE = 0xFFFF_FFFF_A420_0000


def _align(buf: bytearray, n: int = 8) -> None:
    while len(buf) % n:
        buf.append(0)


def build_kallsyms(symbols: list[tuple[str, str, int]], seqs: bool, rel_base: int = BASE) -> bytes:
    """Tables as scripts/kallsyms.c lays them out (absolute-percpu offsets)."""
    tokens = [b"\x01\x02"] + [bytes([i]) for i in range(1, 256)]
    tokens[0x80], tokens[0x81] = b"init_", b"task"  # two "compressed" tokens
    img = bytearray(b"\xAA" * 64)  # unrelated data before the tables
    _align(img)
    for _t, _n, addr in symbols:
        off = addr if addr < 1 << 31 else -(addr - rel_base) - 1
        img += struct.pack("<i", off)
    _align(img)
    img += struct.pack("<Q", rel_base)
    img += struct.pack("<I", len(symbols))
    _align(img)
    names_start = len(img)
    offsets = []
    for typ, name, _a in symbols:
        offsets.append(len(img) - names_start)
        enc = bytearray()
        text = (typ + name).encode()
        i = 0
        while i < len(text):
            if text.startswith(b"init_", i):
                enc.append(0x80)
                i += 5
            elif text.startswith(b"task", i):
                enc.append(0x81)
                i += 4
            else:
                enc.append(text[i])
                i += 1
        if len(enc) >= 0x80:
            img += bytes([(len(enc) & 0x7F) | 0x80, len(enc) >> 7])
        else:
            img.append(len(enc))
        img += enc
    _align(img)
    for i in range(0, len(symbols), 256):
        img += struct.pack("<I", offsets[i])
    _align(img)
    if seqs:
        order = sorted(range(len(symbols)), key=lambda i: symbols[i][1])
        for i in order:
            img += bytes([(i >> 16) & 0xFF, (i >> 8) & 0xFF, i & 0xFF])
        _align(img)
    for tok in tokens:
        img += tok + b"\0"
    _align(img)
    pos = 0
    for tok in tokens:
        img += struct.pack("<H", pos)
        pos += len(tok) + 1
    img += b"\xBB" * 64
    return bytes(img)


def sample_symbols(funcs: int = 700) -> list[tuple[str, str, int]]:
    syms = [("A", "fixed_percpu_data", 0), ("A", "cpu_debug_store", 0x1000)]
    syms += [("T" if i % 3 else "t", f"func_{i:04d}", BASE + 0x1000 + i * 16) for i in range(funcs)]
    syms += [("D", "init_task", BASE + 0x200000), ("d", "init_task_lock", BASE + 0x200100),
             ("T", "x" * 200, BASE + 0x300000)]  # a "big" symbol: two-byte length
    return syms


@pytest.mark.parametrize("seqs", [False, True], ids=["6.1-layout", "seqs_of_names-layout"])
def test_kallsyms_decodes_every_symbol(seqs):
    syms = sample_symbols()
    k = parse_kallsyms(build_kallsyms(syms, seqs), BASE)
    assert len(k) == len(syms)
    assert [(s.type, s.name, s.address) for s in k.symbols] == syms
    assert k["init_task"] == BASE + 0x200000
    sym, off = k.lookup(BASE + 0x1000 + 5 * 16 + 3)
    assert sym.name == "func_0005" and off == 3
    assert [s.name for s in k.search("init_task*")] == ["init_task", "init_task_lock"]
    assert [s.name for s in k.search("^func_069[89]$")] == ["func_0698", "func_0699"]
    with pytest.raises(KeyError, match="nosuch"):
        k["nosuch"]


def test_token_table_right_after_seqs_with_no_padding():
    """704 symbols: 3 * 704 bytes of seqs end on an 8-byte boundary, so the
    token table follows non-NUL data directly (as in Debian's arm64 kernel)."""
    syms = sample_symbols(699)
    assert len(syms) * 3 % 8 == 0
    img = build_kallsyms(syms, seqs=True)
    k = parse_kallsyms(img, BASE)
    assert [(s.type, s.name, s.address) for s in k.symbols] == syms


@pytest.mark.parametrize("seqs", [False, True], ids=["6.1-layout", "seqs_of_names-layout"])
def test_kallsyms_of_a_known_build_come_from_the_cache_slid_to_this_boot(seqs):
    """A second boot of the same kernel build (another KASLR placement) is
    served from the per-build cache, with every relative symbol moved and
    the absolute per-CPU ones left alone, exactly as a fresh decode."""
    from vmscope.vmi.linux.symcache import BuildCache

    cache = BuildCache(disk=False)
    syms = sample_symbols()
    first = parse_kallsyms(build_kallsyms(syms, seqs), BASE, cache)
    assert first.fingerprint is not None
    moved_base = BASE + 0x3A00000
    moved = [(t, n, a + 0x3A00000 if a >= BASE else a) for t, n, a in syms]
    img = build_kallsyms(moved, seqs, rel_base=moved_base)
    fresh = parse_kallsyms(img, moved_base)

    def no_decode(*_a, **_k):
        raise AssertionError("a cached build must not be decoded again")

    import vmscope.vmi.linux.kallsyms as kallsyms

    real = kallsyms._decode_at
    kallsyms._decode_at = no_decode  # proves the second parse skipped the decode
    try:
        cached = parse_kallsyms(img, moved_base, cache)
    finally:
        kallsyms._decode_at = real
    assert cached.symbols == fresh.symbols
    assert [(s.type, s.name, s.address) for s in cached.symbols] == moved
    assert cached.fingerprint == first.fingerprint and cached.cached and not first.cached
    # another build (one symbol renamed) is not mistaken for it
    other = [("T", "func_zzzz", a) if n == "func_0005" else (t, n, a) for t, n, a in syms]
    assert parse_kallsyms(build_kallsyms(other, seqs), BASE, cache).fingerprint != first.fingerprint


def test_kallsyms_absent_is_a_clear_error():
    with pytest.raises(KallsymsNotFound, match="no kallsyms"):
        parse_kallsyms(bytes(1 << 16), BASE)


# ---------------------------------------------------------------- BTF

def build_btf() -> bytes:
    strings = bytearray(b"\0")

    def s(name: str) -> int:
        if not name:
            return 0
        off = len(strings)
        strings.extend(name.encode() + b"\0")
        return off

    types = bytearray()

    def t(name, kind, vlen, size_or_type, extra=b"", kflag=0):
        types.extend(struct.pack("<III", s(name), kind << 24 | vlen | kflag << 31, size_or_type) + extra)

    t("int", 1, 0, 4, struct.pack("<I", 1 << 24 | 32))  # 1: signed int
    t("unsigned long", 1, 0, 8, struct.pack("<I", 64))  # 2
    t("", 2, 0, 4)  # 3: struct task *
    t("task", 4, 4, 32, struct.pack("<12I", s("pid"), 1, 0, s("comm"), 5, 32, 0, 6, 128, s("next"), 3, 192))  # 4
    t("", 3, 0, 0, struct.pack("<III", 7, 1, 8))  # 5: char[8]
    t("", 5, 2, 8, struct.pack("<6I", s("state"), 2, 0, s("__state"), 8, 0))  # 6: anonymous union
    t("char", 1, 0, 1, struct.pack("<I", 8))  # 7
    t("u32", 8, 0, 9)  # 8: typedef
    t("unsigned int", 1, 0, 4, struct.pack("<I", 32))  # 9
    t("colour", 6, 2, 4, struct.pack("<IiIi", s("RED"), 0, s("BLUE"), 5))  # 10
    t("bits", 4, 2, 4, struct.pack("<6I", s("a"), 9, 3 << 24 | 0, s("b"), 9, 5 << 24 | 3), kflag=1)  # 11
    hdr = struct.pack("<HBBIIIII", 0xEB9F, 1, 0, 24, 0, len(types), len(types), len(strings))
    return hdr + bytes(types) + bytes(strings)


def test_btf_fields_through_typedefs_arrays_and_anonymous_unions():
    blob = build_btf()
    assert Btf.header_size(blob[:24]) == len(blob)
    btf = Btf(blob)
    assert btf.struct_size("task") == 32
    pid = btf.field("task", "pid")
    assert (pid.offset, pid.size, pid.signed) == (0, 4, True)
    comm = btf.field("task", "comm")
    assert (comm.offset, comm.size, comm.count, comm.elem_size) == (4, 8, 8, 1)
    assert btf.offsetof("task", "state") == 16 and btf.offsetof("task", "__state") == 16
    assert btf.field("task", "__state").size == 4  # through the u32 typedef
    assert btf.field("task", "next").size == 8
    assert btf.enum_value("BLUE") == 5 and btf.enumerators("colour") == {0: "RED", 5: "BLUE"}
    b = btf.field("bits", "b")
    assert (b.offset, b.bitfield_size, b.bit_offset) == (0, 5, 3)
    with pytest.raises(BtfError, match="no member 'nosuch'"):
        btf.field("task", "nosuch")
    with pytest.raises(BtfError, match="no struct 'nosuch'"):
        btf.struct_size("nosuch")


def test_btf_rejects_bad_magic():
    with pytest.raises(BtfError, match="magic"):
        Btf(b"\0" * 64)


# ---------------------------------------------------------------- printk ring, states

def test_ring_text_plain_wrapped_and_dataless():
    size = 64
    data = bytearray(size)
    data[8:13] = b"hello"  # block at lpos 0: 8-byte id then text
    assert _ring_text(bytes(data), size, 0, 16, 5) == b"hello"
    # A block that would cross the end is stored whole at the start of the ring
    # (begin in one wrap, next in the following one).
    data[8:14] = b"wraps!"
    assert _ring_text(bytes(data), size, 56, 64 + 16, 6) == b"wraps!"
    assert _ring_text(bytes(data), size, 1, 1, 0) == b""  # data-less record (FAILED_LPOS)


@pytest.mark.parametrize("state,exit_state,letter", [
    (0, 0, "R"), (1, 0, "S"), (2, 0, "D"), (4, 0, "T"), (8, 0, "t"),
    (0, 32, "Z"), (0, 16, "X"), (0x402, 0, "I"), (0x40, 0, "P"),
])
def test_task_state_letters_follow_the_kernel(state, exit_state, letter):
    assert _state_letter(state, exit_state) == letter
