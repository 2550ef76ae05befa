"""Data symbols a kernel's kallsyms lacks, read off the code that uses them.

Why: Debian's arm64 kernel is built without ``CONFIG_KALLSYMS_ALL``, so its
kallsyms has text symbols only, and ``watch jiffies`` in GDB finds no
symbol. The kernel's own code names the address: ``do_timer()`` is
``jiffies_64 += ticks`` (``kernel/time/timekeeping.c``), compiled to an
``adrp``/``ldr``/``str`` on arm64 and an ``add`` to a RIP-relative operand
on x86_64. On 64-bit kernels ``jiffies`` is ``jiffies_64`` (the linker
script aliases them). Each recipe here names a function, the symbols it
yields, and reads the first data address the function's code computes;
symbols kallsyms has already are never replaced.
"""

from __future__ import annotations

from typing import Callable

from vmscope.vmi.linux.kallsyms import Kallsyms, Symbol

#: per ELF machine: (function whose first data reference is the address, names it gets)
RECIPES: dict[str, list[tuple[str, tuple[str, ...]]]] = {
    "aarch64": [("do_timer", ("jiffies_64", "jiffies"))],
    "x86_64": [("do_timer", ("jiffies_64", "jiffies"))],
}
SCAN_BYTES = 64
MASK64 = 2**64 - 1


def _first_data_address(machine: str, code: bytes, address: int) -> int | None:
    import capstone

    if machine == "aarch64":
        md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
        md.detail = True
        pages: dict[int, int] = {}  # register -> page from adrp
        for insn in md.disasm(code, address):
            ops = insn.operands
            if insn.mnemonic == "adrp" and len(ops) == 2:
                pages[ops[0].reg] = ops[1].imm & MASK64  # capstone's immediates are signed
            elif insn.mnemonic in ("ldr", "str", "add") and pages:
                for op in ops:
                    if op.type == capstone.arm64.ARM64_OP_MEM and op.mem.base in pages:
                        return (pages[op.mem.base] + op.mem.disp) & MASK64
                if insn.mnemonic == "add" and len(ops) == 3 and ops[1].reg in pages \
                        and ops[2].type == capstone.arm64.ARM64_OP_IMM:
                    return (pages[ops[1].reg] + ops[2].imm) & MASK64
        return None
    if machine == "x86_64":
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
        md.detail = True
        for insn in md.disasm(code, address):
            for op in insn.operands:
                if op.type == capstone.x86.X86_OP_MEM and op.mem.base == capstone.x86.X86_REG_RIP:
                    return (insn.address + insn.size + op.mem.disp) & MASK64
        return None
    return None


def with_derived_symbols(syms: Kallsyms, read: Callable[[int, int], bytes], machine: str) -> Kallsyms:
    """``syms`` plus the data symbols :data:`RECIPES` find; ``read(vaddr,
    n)`` reads the kernel image by virtual address. The same object when
    nothing is added."""
    added: list[Symbol] = []
    for function, names in RECIPES.get(machine, []):
        missing = [n for n in names if n not in syms]
        fn = syms.get(function)
        if not missing or fn is None:
            continue
        try:
            code = read(fn.address, SCAN_BYTES)
        except Exception:  # noqa: BLE001 - an unreadable image just gets no derived symbol
            continue
        address = _first_data_address(machine, code, fn.address)
        if address is not None:
            added += [Symbol(n, address, "D") for n in missing]
    if not added:
        return syms
    fingerprint = f"{syms.fingerprint}+derived" if syms.fingerprint else None
    return Kallsyms(syms.symbols + added, fingerprint, syms.cached)
