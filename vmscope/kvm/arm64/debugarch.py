"""Arm debug architecture pieces the KVM back end needs, as pure functions:
the exception syndrome (ESR) of a debug exit, the hardware breakpoint and
watchpoint control words, and what an instruction does to PSTATE.DAIF.

References are to the Arm ARM (DDI 0487): ESR_ELx.EC (D17.2.37), DBGBCR<n>_EL1
(D17.3.2), DBGWCR<n>_EL1 (D17.3.11).
"""

from __future__ import annotations

from dataclasses import dataclass

# ESR_ELx.EC values for the debug exceptions KVM forwards as KVM_EXIT_DEBUG.
# "lower EL": the guest runs at an EL below KVM's.
EC_BREAKPT_LOW = 0x30  # hardware breakpoint
EC_SOFTSTP_LOW = 0x32  # software step
EC_WATCHPT_LOW = 0x34  # watchpoint
EC_BRK64 = 0x3C  # BRK instruction (AArch64)
EC_NAMES = {EC_BREAKPT_LOW: "hw-breakpoint", EC_SOFTSTP_LOW: "step",
            EC_WATCHPT_LOW: "watchpoint", EC_BRK64: "brk"}

ESR_IL = 1 << 25
WATCH_ISS_WNR = 1 << 6  # write, not read
BRK_ENCODING, BRK_MASK = 0xD420_0000, 0xFFE0_001F  # BRK #imm16 with imm16 at bits 20:5


@dataclass(frozen=True)
class DebugExit:
    """What a KVM_EXIT_DEBUG says happened."""

    cause: str  # "brk" | "step" | "hw-breakpoint" | "watchpoint" | "unknown"
    ec: int
    comment: int | None = None  # BRK's imm16
    write: bool | None = None  # watchpoint: the access was a store


def decode_esr(esr: int) -> DebugExit:
    """Decode the syndrome KVM puts in ``kvm_run.debug.arch.hsr``."""
    ec = (esr >> 26) & 0x3F
    cause = EC_NAMES.get(ec, "unknown")
    if ec == EC_BRK64:
        return DebugExit(cause, ec, comment=esr & 0xFFFF)
    if ec == EC_WATCHPT_LOW:
        return DebugExit(cause, ec, write=bool(esr & WATCH_ISS_WNR))
    return DebugExit(cause, ec)


def brk_esr(comment: int) -> int:
    """ESR_EL1 the guest should see for its own ``BRK #comment`` (EC 0x3C,
    IL=1, ISS = the 16-bit comment)."""
    return EC_BRK64 << 26 | ESR_IL | (comment & 0xFFFF)


def is_brk(insn: int) -> bool:
    return insn & BRK_MASK == BRK_ENCODING


# --- breakpoint and watchpoint control registers ---------------------------------------

BCR_E = 1 << 0
PMC_EL1_EL0 = 0b11  # privileged and unprivileged (PMC, bits 2:1; PAC for watchpoints)
BCR_BAS_A64 = 0b1111 << 5  # an A64 instruction: all four bytes
WCR_LSC = {"read": 0b01, "write": 0b10, "access": 0b11}  # load/store control, bits 4:3


def bcr_value() -> int:
    """DBGBCR for an address-match execution breakpoint at EL1 and EL0
    (BT=0b0000 unlinked match, SSC=0, HMC=0)."""
    return BCR_BAS_A64 | PMC_EL1_EL0 << 1 | BCR_E


def bvr_value(addr: int) -> int:
    if addr & 3:
        raise ValueError(f"hardware breakpoint address {addr:#x} is not 4-byte aligned (A64 instructions are)")
    return addr


def watch_registers(addr: int, length: int, kind: str) -> tuple[int, int]:
    """(DBGWVR, DBGWCR) watching ``length`` bytes at ``addr``.

    A watchpoint covers bytes of one aligned doubleword through the byte
    address select (BAS, bits 12:5), or a naturally aligned power-of-two
    block of at least 8 bytes through MASK (bits 28:24, with BAS all ones).
    """
    if kind not in WCR_LSC:
        raise ValueError(f"watchpoint kind {kind!r} is not read, write or access")
    if length < 1:
        raise ValueError(f"watchpoint length {length} must be at least 1")
    control = WCR_LSC[kind] << 3 | PMC_EL1_EL0 << 1 | BCR_E
    offset = addr & 7
    if offset + length <= 8:
        bas = ((1 << length) - 1) << offset
        return addr & ~7, control | bas << 5
    if length & (length - 1) == 0 and addr % length == 0 and length <= 1 << 31:
        mask = length.bit_length() - 1
        return addr, control | 0xFF << 5 | mask << 24
    raise ValueError(f"cannot watch {length} bytes at {addr:#x}: a watchpoint covers bytes of one "
                     "aligned doubleword, or an aligned power-of-two block")


def watch_covers(wvr: int, wcr: int, addr: int) -> bool:
    """Does the watchpoint (wvr, wcr) cover byte ``addr``?"""
    mask = (wcr >> 24) & 0x1F
    if mask:
        return addr >> mask == wvr >> mask
    bas = (wcr >> 5) & 0xFF
    return addr & ~7 == wvr & ~7 and bool(bas >> (addr & 7) & 1)


# --- instructions that change DAIF -----------------------------------------------------

def changes_daif(insn: int) -> bool:
    """True when the instruction writes PSTATE.DAIF (``msr daifset/daifclr,
    #imm``, ``msr daif, xN``, ``eret``), so a debugger that masked
    interrupts for a single step must not put its saved DAIF back."""
    if insn & 0xFFFF_F01F == 0xD503_401F:  # MSR (immediate), op1/op2 bits below
        op1, op2 = (insn >> 16) & 7, (insn >> 5) & 7
        return op1 == 3 and op2 in (6, 7)  # DAIFSet, DAIFClr
    if insn & 0xFFFF_FFE0 == 0xD51B_4220:  # MSR DAIF, Xt
        return True
    return insn in (0xD69F_03E0, 0xD69F_0BFF, 0xD69F_0FFF)  # ERET, ERETAA, ERETAB


# --- load/store-exclusive sequences ---------------------------------------------------------

EXCLUSIVE_CLASS_MASK, EXCLUSIVE_CLASS = 0x3F80_0000, 0x0800_0000  # load/store exclusive, o2=0
EXCLUSIVE_L = 1 << 22
MAX_SEQUENCE = 16  # instructions between a load- and a store-exclusive (GDB scans as far)


def is_load_exclusive(insn: int) -> bool:
    """LDXR/LDAXR/LDXP/LDAXP (any size)."""
    return insn & EXCLUSIVE_CLASS_MASK == EXCLUSIVE_CLASS and bool(insn & EXCLUSIVE_L)


def is_store_exclusive(insn: int) -> bool:
    """STXR/STLXR/STXP/STLXP (any size); the status register is Rs (20:16)."""
    return insn & EXCLUSIVE_CLASS_MASK == EXCLUSIVE_CLASS and not insn & EXCLUSIVE_L


@dataclass(frozen=True)
class ExclusiveSequence:
    start: int  # the load-exclusive
    end: int  # the instruction after the store-exclusive
    status_reg: int  # the store-exclusive's status register (0 = stored)


def exclusive_sequence(pc: int, fetch) -> ExclusiveSequence | None:
    """The load/store-exclusive sequence ``pc`` is in, if any.

    ``fetch(addr)`` returns the instruction word at ``addr`` (or None). A
    debug exception inside such a sequence clears the exclusive monitor
    (an exit to the hypervisor does), so the store-exclusive fails and the
    guest loops back: a debugger that stops or steps there livelocks the
    guest. Restarting at the load-exclusive is what a failed store does
    anyway, so the sequence can be rerun from ``start`` to ``end`` without
    debug exits in between.
    """
    start = None
    for back in range(0, MAX_SEQUENCE):
        insn = fetch(pc - 4 * back)
        if insn is None:
            return None
        if is_load_exclusive(insn):
            start = pc - 4 * back
            break
        if back and is_store_exclusive(insn):
            return None  # a sequence that ended before pc
    if start is None:
        return None
    for ahead in range(1, MAX_SEQUENCE + 1):
        addr = start + 4 * ahead
        insn = fetch(addr)
        if insn is None:
            return None
        if is_store_exclusive(insn):
            if addr < pc:
                return None
            return ExclusiveSequence(start, addr + 4, (insn >> 16) & 0x1F)
    return None
