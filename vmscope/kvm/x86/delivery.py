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
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu

EFER_LMA = 1 << 10
RFLAGS_TF, RFLAGS_IF, RFLAGS_NT, RFLAGS_RF, RFLAGS_VM = 1 << 8, 1 << 9, 1 << 14, 1 << 16, 1 << 17
GATE_INTERRUPT, GATE_TRAP = 0xE, 0xF


class GateFrame:
    """What delivering one vector through a 64-bit IDT gate needs."""

    def __init__(self, handler: int, selector: int, gate_type: int, code_type: int, code_dpl: int,
                 touched: list[int]):
        self.handler = handler
        self.selector = selector
        self.gate_type = gate_type
        self.code_type = code_type
        self.code_dpl = code_dpl
        self.touched = touched  # guest-physical pages of the gate, descriptor and stack slots


def _read_virtual(target, v: Vcpu, vaddr: int, length: int) -> tuple[bytes, list[int]] | None:
    """Bytes at a guest-virtual address of ``v``, and the physical pages
    they came from (None when a page is not mapped)."""
    out, pages = bytearray(), []
    while length > 0:
        page = target.translator.page(v, vaddr & ~(PAGE - 1))
        if page is None or not target.mem.contains(page, PAGE):
            return None
        off = vaddr & (PAGE - 1)
        n = min(length, PAGE - off)
        out += target.mem.view[page + off : page + off + n]
        pages.append(page // PAGE)
        vaddr += n
        length -= n
    return bytes(out), pages


def gate_frame(target, v: Vcpu, vector: int, sregs, rsp: int) -> GateFrame | None:
    """The gate of ``vector`` when it can be delivered by hand (see the
    module's docstring), else None."""
    if not sregs.efer & EFER_LMA or not sregs.cs.l:
        return None
    if (vector + 1) * 16 - 1 > sregs.idt.limit:
        return None
    got = _read_virtual(target, v, sregs.idt.base + vector * 16, 16)
    if got is None:
        return None
    gate, touched = got
    lo, selector, ist, attrs, mid, hi, _ = struct.unpack("<HHBBHII", gate)
    gate_type, present = attrs & 0xF, attrs >> 7
    if not present or gate_type not in (GATE_INTERRUPT, GATE_TRAP) or ist & 7:
        return None
    if selector & 4 or selector >> 3 == 0 or (selector | 7) > sregs.gdt.limit:
        return None
    got = _read_virtual(target, v, sregs.gdt.base + (selector & ~7), 8)
    if got is None:
        return None
    desc, pages = got
    access, flags = desc[5], desc[6]
    code_dpl = (access >> 5) & 3
    long_code = (flags >> 5) & 1
    if not access & 0x80 or not access & 0x08 or not long_code or code_dpl != sregs.cs.dpl:
        return None  # not a present 64-bit code segment at the same level: KVM's job
    stack = ((rsp & ~0xF) - 40) & (2**64 - 1)
    got = _read_virtual(target, v, stack, 40)
    if got is None:
        return None
    touched += pages + got[1]
    handler = lo | mid << 16 | hi << 32
    return GateFrame(handler, selector, gate_type, access & 0xF, code_dpl, touched)


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
    rsp = (regs.rsp & ~0xF) - 40
    pushed = struct.pack("<5Q", return_rip, sregs.cs.selector, regs.rflags, regs.rsp, sregs.ss.selector)
    hits = []
    for i in range(0, 40, 8):
        vaddr = rsp + i
        page = target.translator.page(v, vaddr & ~(PAGE - 1))
        phys = page | (vaddr & (PAGE - 1))
        with target._lock:
            hit = target._watch_hit(phys, 8, True) if target.attached else None
        if hit is not None:
            hits.append(hit)
        target.mem.view[phys : phys + 8] = pushed[i : i + 8]
    regs.rsp = rsp
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
