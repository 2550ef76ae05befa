"""Whole REP string instructions on guest memory (page-protection stepping)."""

from __future__ import annotations

import pytest

from vmscope.kvm.x86.rep_string import decode, emulate

REP_STOSQ = bytes.fromhex("f348ab")
REP_STOSD = bytes.fromhex("f3ab")
REP_MOVSB = bytes.fromhex("f3a4")
REP_STOSB_FS = bytes.fromhex("64f3aa")  # fs: override: declined
ADDR32_REP_STOSB = bytes.fromhex("67f3aa")  # 32-bit addressing in 64-bit code: declined


class Ram:
    """Guest RAM as a bytearray, identity-mapped; ``holes`` are protected pages."""

    def __init__(self, size: int = 1 << 20, holes: tuple[int, ...] = ()):
        self.b = bytearray(size)
        self.holes = holes

    def phys_range(self, vaddr: int, n: int):
        if vaddr + n > len(self.b) or any(vaddr <= h * 4096 + 4095 and h * 4096 < vaddr + n for h in self.holes):
            return None
        return [(vaddr, n)]

    def read(self, p: int, n: int) -> bytes:
        return bytes(self.b[p : p + n])

    def write(self, p: int, data: bytes) -> None:
        self.b[p : p + len(data)] = data


def regs(**kw):
    base = {"rip": 0x1000, "rax": 0, "rcx": 0, "rdi": 0, "rsi": 0, "eflags": 0x2}
    base.update(kw)
    return base


@pytest.mark.parametrize("code,long_mode,want", [
    (REP_STOSQ, True, ("stos", 8, 3)), (REP_STOSD, False, ("stos", 4, 2)), (REP_MOVSB, True, ("movs", 1, 2)),
    (REP_STOSB_FS, True, None), (ADDR32_REP_STOSB, True, None), (bytes.fromhex("90"), True, None),
    (bytes.fromhex("ab"), True, None),  # stos without rep: a single store, stepped as usual
])
def test_decode(code, long_mode, want):
    assert decode(code, 0x1000, long_mode) == want


def test_rep_stosq_fills_and_advances():
    ram = Ram()
    out = emulate(regs(rax=0x1122334455667788, rcx=0x1000, rdi=0x10000), REP_STOSQ, True,
                  ram.phys_range, ram.read, ram.write)
    assert ram.b[0x10000:0x18000] == bytes.fromhex("8877665544332211") * 0x1000
    assert ram.b[0x18000] == 0 and ram.b[0xFFFF] == 0
    assert (out["rcx"], out["rdi"], out["rip"]) == (0, 0x18000, 0x1003)


def test_rep_stosd_downwards_in_32_bit_code():
    ram = Ram()
    out = emulate(regs(rax=0xFFFFFFFF_AABBCCDD, rcx=4, rdi=0x2000 + 12, eflags=0x402), REP_STOSD, False,
                  ram.phys_range, ram.read, ram.write)
    assert ram.b[0x2000:0x2010] == bytes.fromhex("ddccbbaa") * 4 and ram.b[0x2010] == 0
    assert (out["rcx"], out["rdi"], out["rip"]) == (0, 0x2000 - 4, 0x1002)


def test_rep_movsb_copies_and_moves_both_pointers():
    ram = Ram()
    ram.b[0x3000:0x3100] = bytes(range(256))
    out = emulate(regs(rcx=256, rsi=0x3000, rdi=0x5000), REP_MOVSB, True, ram.phys_range, ram.read, ram.write)
    assert ram.b[0x5000:0x5100] == bytes(range(256))
    assert (out["rsi"], out["rdi"], out["rcx"]) == (0x3100, 0x5100, 0)


def test_declines_protected_pages_overlap_and_zero_is_a_no_op():
    ram = Ram(holes=(0x11,))
    assert emulate(regs(rcx=0x1000, rdi=0x10000), REP_STOSQ, True, ram.phys_range, ram.read, ram.write) is None
    assert not any(ram.b)  # nothing written when declined
    assert emulate(regs(rcx=16, rsi=0x3000, rdi=0x3008), REP_MOVSB, True, ram.phys_range, ram.read, ram.write) is None
    out = emulate(regs(rcx=0, rdi=0x10000), REP_STOSQ, True, ram.phys_range, ram.read, ram.write)
    assert out["rip"] == 0x1003 and out["rdi"] == 0x10000
