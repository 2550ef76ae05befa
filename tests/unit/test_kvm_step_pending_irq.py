"""A single step runs one instruction even with an interrupt pending.

Why it matters: gdb's ``stepi`` must move the guest by exactly one
instruction. KVM injects a pending interrupt before it runs the stepped
instruction unless the stub asks it not to (KVM_GUESTDBG_BLOCKIRQ); the
"step" then lands in (or, with no IDT, dies in) the interrupt handler.
The per-stop speed work (docs/performance.md) changed how steps are run
and how registers are read after them, so this is pinned down on the real
/dev/kvm: a synthetic bzImage (the VMM then builds the Linux platform with
KVM's in-kernel PIC, IOAPIC and LAPIC) enables interrupts and loops on
``inc %eax; inc %ebx; jmp``; with an ISA interrupt line raised (pending:
interrupts on, but no IDT), 30 steps must each move one instruction, and
continuing afterwards must deliver it (the guest dies of the missing IDT),
which proves the interrupt really was pending during the steps.
"""

from __future__ import annotations

import select

import pytest

from tests.kvm_support import stopped_bzimage_guest
from vmscope.gdbserver.target import SIGTRAP, ResumeAction, ResumeActions

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

LOAD = 0x100000
# 32-bit at LOAD (flat segments, interrupts off at the entry): sti; then
# 1: inc %eax; inc %ebx; jmp 1b
CODE = bytes.fromhex("fb" "40" "43" "ebfc")
LOOP = [LOAD + 1, LOAD + 2, LOAD + 3]  # where each step of the loop must stop, in turn
IRQ = 4  # COM1's ISA line


def wait(t, seconds: float = 30):
    ready, _, _ = select.select([t.stop_fd()], [], [], seconds)
    assert ready, "no stop reported"
    return t.take_stop()


def step(t):
    t.resume(ResumeActions(per_thread={1: ResumeAction("step")}))
    return wait(t)


def test_a_step_with_an_interrupt_pending_executes_one_instruction(tmp_path):
    from vmscope.kvm.devices.irq import IrqLine

    m, t = stopped_bzimage_guest(tmp_path, CODE, "loop.bzImage")
    try:
        assert t.read_registers(1)["rip"] == LOAD
        ev = step(t)  # sti
        assert ev.kind == "signal" and ev.signal == SIGTRAP
        assert t.read_registers(1)["eflags"] & 0x200, "sti did not set IF"
        IrqLine(m.vm_fd, IRQ).set(True)  # now pending: IF is on, nothing was delivered yet
        regs = t.read_registers(1)
        eax, rip = regs["rax"], regs["rip"]
        for i in range(30):
            ev = step(t)
            assert ev.kind == "signal" and ev.signal == SIGTRAP, f"step {i}: {ev} (the interrupt was delivered?)"
            regs = t.read_registers(1)
            expected = LOOP[(LOOP.index(rip) + 1) % 3]
            assert regs["rip"] == expected, f"step {i}: rip {regs['rip']:#x}, expected {expected:#x}"
            if rip == LOAD + 1:
                assert regs["rax"] == (eax + 1) & 0xFFFFFFFF  # the inc ran, once
                eax = regs["rax"]
            rip = regs["rip"]
        # Continue: now the interrupt is delivered, and with no IDT the guest dies.
        t.resume(ResumeActions(default=ResumeAction("continue")))
        ev = wait(t)
        assert ev.kind == "exited" and m.wait(10) == 1, f"the interrupt was not pending: {ev}"
    finally:
        m.shutdown()
