"""Delivering the guest's own #BP by hand when KVM could not.

Why: a page-protection watchpoint or breakpoint takes a guest page out of
the memory slots (or makes it read-only). When the guest then executes its
own ``int3`` and the stub hands the #BP back with ``KVM_SET_VCPU_EVENTS``,
KVM delivers it by reading the IDT gate and the GDT descriptor and pushing
the frame onto the stack, all from guest memory; if one of those lives on a
protected page (vmscope's idt test guest keeps its GDT beside the counter a
``rwatch`` protects), KVM cannot read or write it and the guest triple
faults. That happened in CI about once in sixteen ``rwatch`` runs: whenever
a vCPU was sitting on its ``int3`` as the guest resumed.

So, only when delivery would touch a protected page, the VMM delivers the
exception itself, as the CPU does in 64-bit mode for a gate that keeps the
privilege level and uses no IST stack: push SS, RSP, RFLAGS, CS and the
return RIP on the 16-byte aligned stack, clear TF/NT/RF (and IF for an
interrupt gate), load CS from the GDT and jump to the handler. The pushes
are checked against the write watchpoints, as the CPU's would be. Anything
else (a ring change, an IST stack, a gate that is not present, 32-bit mode)
returns False and is left to KVM, which reports the guest's own fault.
"""

from __future__ import annotations

import struct

from vmscope.gdbserver.target import StopEvent
from vmscope.gdbserver.toolkit import physical_pieces
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu

EFER_LMA = 1 << 10
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


class GateFrame:
    """What delivering one vector through a 64-bit IDT gate needs."""

    def __init__(self, handler: int, selector: int, gate_type: int, code_type: int, code_dpl: int,
                 touched: list[int], stack: list[tuple[int, int]], rsp: int):
        self.handler = handler
        self.selector = selector
        self.gate_type = gate_type
        self.code_type = code_type
        self.code_dpl = code_dpl
        self.touched = touched  # guest-physical pages of the gate, descriptor and stack slots
        self.stack = stack  # guest-physical pieces of the 40-byte frame, lowest address first
        self.rsp = rsp  # the stack pointer after the pushes


def _pieces(target, v: Vcpu, vaddr: int, length: int) -> list[tuple[int, int]] | None:
    """Guest-physical pieces of a virtual range of ``v`` (its own page
    tables, not another vCPU's), or None when part of it is not in RAM."""
    def phys_of(addr: int) -> int | None:
        page = target.translator.page(v, addr & ~(PAGE - 1))
        return None if page is None else page | (addr & (PAGE - 1))

    pieces, bad, _ = physical_pieces(vaddr, length, phys_of, target.mem.contains)
    return None if bad is not None else pieces


def _pages(pieces: list[tuple[int, int]]) -> list[int]:
    return [page for start, n in pieces for page in range(start // PAGE, (start + n - 1) // PAGE + 1)]


def _read(target, pieces: list[tuple[int, int]]) -> bytes:
    return b"".join(bytes(target.mem.view[start : start + n]) for start, n in pieces)


def gate_frame(target, v: Vcpu, vector: int, sregs, rsp: int) -> GateFrame | None:
    """The gate of ``vector`` when it can be delivered by hand (see the
    module's docstring), else None."""
    if not sregs.efer & EFER_LMA or not sregs.cs.l:
        return None
    if (vector + 1) * 16 - 1 > sregs.idt.limit:
        return None
    gate_at = _pieces(target, v, sregs.idt.base + vector * 16, 16)
    if gate_at is None:
        return None
    gate = _read(target, gate_at)
    lo, selector, ist, attrs, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    gate_type, present = attrs & 0xF, attrs >> 7
    if not present or gate_type not in (GATE_INTERRUPT, GATE_TRAP) or ist & 7:
        return None
    if selector & 4 or selector >> 3 == 0 or (selector | 7) > sregs.gdt.limit:
        return None
    desc_at = _pieces(target, v, sregs.gdt.base + (selector & ~7), 8)
    if desc_at is None:
        return None
    desc = _read(target, desc_at)
    access, flags = desc[5], desc[6]
    code_dpl = (access >> 5) & 3
    long_code = (flags >> 5) & 1
    if not access & 0x80 or not access & 0x08 or not long_code or code_dpl != sregs.cs.dpl:
        return None  # not a present 64-bit code segment at the same level: KVM's job
    frame_rsp = ((rsp & ~0xF) - 40) & (2**64 - 1)  # 16-byte aligned, then SS, RSP, RFLAGS, CS, RIP
    stack_at = _pieces(target, v, frame_rsp, 40)
    if stack_at is None:
        return None
    handler = lo | mid << 16 | hi << 32
    return GateFrame(handler, selector, gate_type, access & 0xF, code_dpl,
                     _pages(gate_at) + _pages(desc_at) + _pages(stack_at), stack_at, frame_rsp)


def deliver_by_hand(target, v: Vcpu, vector: int, return_rip: int) -> bool:
    """Deliver ``vector`` to ``v`` in the VMM when KVM's own delivery would
    touch a protected page; True when done (False: inject it as usual).
    A push onto a watched range is reported as that watchpoint's hit."""
    protected = target.m.slots.protected
    if not protected:
        return False
    regs, sregs = v.regs(), v.sregs()
    frame = gate_frame(target, v, vector, sregs, regs.rsp)
    if frame is None or not any(page in protected for page in frame.touched):
        return False
    pushed = struct.pack("<5Q", return_rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
    hits = []
    off = 0
    for start, n in frame.stack:  # the frame's own pieces, as gate_frame found them
        with target._lock:
            hit = target._watch_hit(start, n, True) if target.attached else None
        if hit is not None:
            hits.append(hit)
        target.mem.view[start : start + n] = pushed[off : off + n]
        off += n
    regs.rsp = frame.rsp
    regs.rip = frame.handler
    regs.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
    if frame.gate_type == GATE_INTERRUPT:
        regs.rflags &= ~RFLAGS_IF
    cs = sregs.cs
    cs.selector = (frame.selector & ~3) | frame.code_dpl
    cs.base, cs.limit, cs.type, cs.present, cs.dpl = 0, 0xFFFFFFFF, frame.code_type | 1, 1, frame.code_dpl
    cs.s, cs.l, cs.db, cs.g, cs.unusable = 1, 1, 0, 1, 0
    v.set_sregs(sregs)
    v.set_regs(regs)
    if hits:
        hit = hits[0]
        ev = StopEvent(hit.kind, tid=v.index + 1, addr=hit.addr)
        target.m.request_stop(ev, keep_if_busy=lambda e: target._pending.__setitem__(v.index, e))
    return True
