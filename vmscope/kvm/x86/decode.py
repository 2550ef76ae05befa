"""Instruction decoding for page-protection watchpoints: which memory an
x86 instruction reads (capstone), so a step on a protected code page can
tell a read of watched data."""

from __future__ import annotations

from typing import Mapping

_REG32 = {"e" + n[1:]: n for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "rip")}


def memory_reads(code: bytes, rip: int, regs: Mapping[str, int], long_mode: bool = True) -> list[tuple[int, int]]:
    """(address, size) of the explicit memory operands the instruction at
    ``rip`` reads, per capstone. Implicit stack accesses are not listed."""
    import capstone
    from capstone import x86 as cs_x86

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if long_mode else capstone.CS_MODE_32)
    md.detail = True
    insn = next(md.disasm(code, rip, 1), None)
    if insn is None:
        return []

    def reg(reg_id: int) -> int:
        if reg_id == 0:
            return 0
        name = insn.reg_name(reg_id)
        if name == "rip":
            return rip + insn.size
        if name in regs:
            return regs[name]
        if name in _REG32:
            return regs.get(_REG32[name], 0) & 0xFFFFFFFF
        if name.endswith("d") and name[:-1] in regs:  # r8d..r15d
            return regs[name[:-1]] & 0xFFFFFFFF
        return 0

    out = []
    for op in insn.operands:
        if op.type == cs_x86.X86_OP_MEM and op.access & capstone.CS_AC_READ:
            m = op.mem
            addr = (reg(m.base) + reg(m.index) * m.scale + m.disp) & (2**64 - 1)
            out.append((addr, op.size or 1))
    return out
