"""Run a whole ``rep stos``/``rep movs`` at once for page-protection stepping.

Why: where INT3 and debug-register hits do not reach KVM (KVM nested under
QEMU's TCG SVM), an execution breakpoint pulls its code page out of the
memory slots and the target steps every other instruction that runs from
that page, one trap each. A single step of a REP string instruction does
one iteration, so Linux's ``clear_bss`` (a ``rep stosq`` over megabytes, in
``.init.text`` beside ``start_kernel``) would take hundreds of thousands of
steps. Doing the whole instruction on guest memory here takes one.

Only the plain forms are taken: ``rep stos`` and ``rep movs`` in 64- or
32-bit code with the default address size and no segment override, on
guest RAM that no watchpoint or breakpoint protects, without overlap for
``movs``. Anything else returns False and the caller steps it as before.
"""

from __future__ import annotations

from typing import Callable

PAGE = 4096
MAX_BYTES = 256 << 20  # beyond this, step (a guest clearing GiBs is not worth a copy)
DF = 1 << 10
_WIDTH = {"b": 1, "w": 2, "d": 4, "q": 8}
_PREFIXES_WE_DECLINE = {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x67}  # segment overrides, address size


def decode(code: bytes, rip: int, long_mode: bool):
    """(op, width, length) for ``rep stos*``/``rep movs*`` at ``rip``, else None."""
    import capstone

    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64 if long_mode else capstone.CS_MODE_32)
    insn = next(md.disasm(code, rip, 1), None)
    if insn is None:
        return None
    words = insn.mnemonic.split()
    if len(words) != 2 or words[0] != "rep" or words[1][:4] not in ("stos", "movs") or len(words[1]) != 5:
        return None
    width = _WIDTH.get(words[1][4])
    if width is None:
        return None
    for b in bytes(insn.bytes):
        if 0xA4 <= b <= 0xAB:  # the opcode: prefixes are behind us
            break
        if b in _PREFIXES_WE_DECLINE:
            return None
    return words[1][:4], width, insn.size


def emulate(regs: dict[str, int], code: bytes, long_mode: bool,
            phys_range: Callable[[int, int], list[tuple[int, int]] | None],
            read_phys: Callable[[int, int], bytes], write_phys: Callable[[int, bytes], None]) -> dict[str, int] | None:
    """The registers after running the REP string instruction ``code`` at
    ``regs['rip']`` to completion, with its memory effects done through
    ``write_phys``; None to decline. ``phys_range(vaddr, n)`` gives the
    guest-physical pieces of a virtual range, or None when any page is
    unmapped or must not be touched directly (protected, not RAM)."""
    found = decode(code, regs["rip"], long_mode)
    if found is None:
        return None
    op, width, length = found
    mask = (1 << 64) - 1 if long_mode else 0xFFFF_FFFF
    count = regs["rcx"] & mask
    out = dict(regs)
    out["rip"] = (regs["rip"] + length) & mask
    if count == 0:
        return out
    size = count * width
    if size > MAX_BYTES:
        return None
    down = bool(regs["eflags"] & DF)

    def span(addr: int) -> int:  # lowest address of the range an op walks from addr
        return (addr - size + width) & mask if down else addr

    dst = regs["rdi"] & mask
    dst_pieces = phys_range(span(dst), size)
    if dst_pieces is None:
        return None
    if op == "stos":
        data = (regs["rax"] & ((1 << (8 * width)) - 1)).to_bytes(width, "little") * count
    else:
        src = regs["rsi"] & mask
        lo_s, lo_d = span(src), span(dst)
        if lo_s < lo_d + size and lo_d < lo_s + size:
            return None  # overlapping movs: element order matters, step it
        src_pieces = phys_range(lo_s, size)
        if src_pieces is None:
            return None
        data = b"".join(read_phys(p, n) for p, n in src_pieces)
        # Descending copies move the same bytes to the same places as ascending ones.
        out["rsi"] = (src + (-size if down else size)) & mask
    pos = 0
    for p, n in dst_pieces:
        write_phys(p, data[pos : pos + n])
        pos += n
    out["rdi"] = (dst + (-size if down else size)) & mask
    out["rcx"] = 0
    return out
