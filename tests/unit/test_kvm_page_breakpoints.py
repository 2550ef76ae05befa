"""Execution breakpoints by page protection, on this host's real /dev/kvm.

The nested lab needs them (KVM under QEMU's TCG SVM sees neither INT3 nor
debug-register hits); ``VMSCOPE_KVM_BREAKPOINTS=pages`` selects the same
mechanism here, so it is tested without the lab's cost.
"""

from __future__ import annotations

import select

import pytest

from tests.kvm_support import SerialSink, make_machine, tiny_guest
from vmscope.gdbserver.target import ResumeAction, ResumeActions

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

LOAD = 0x100000
# 32-bit guest: mov $0x200000,%edi; mov $0x40000,%ecx; mov $0xa5a5a5a5,%eax; cld; rep stosl
# target: nop; mov $42,%al; out %al,$0xf4; hlt    (a 1 MiB fill on the breakpoint's own page)
FILL_THEN_TARGET = bytes.fromhex("bf00002000" "b900000400" "b8a5a5a5a5" "fc" "f3ab" "90" "b02ae6f4f4")
TARGET = LOAD + 18


def wait_stop(t, timeout: float = 120):
    r, _, _ = select.select([t.stop_fd()], [], [], timeout)
    assert r, f"no stop within {timeout} s"
    return t.take_stop()


def test_rep_fill_on_the_breakpoint_page_runs_whole(tmp_path, monkeypatch):
    """A 262144-iteration ``rep stosl`` runs on the protected page before
    the breakpoint: done whole, not one step per iteration (Linux's
    clear_bss beside start_kernel), then the breakpoint hits."""
    monkeypatch.setenv("VMSCOPE_KVM_BREAKPOINTS", "pages")
    m = make_machine(kernel=tiny_guest(tmp_path, FILL_THEN_TARGET), serial_out=SerialSink())
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        assert t.hw_pages and t.sw_pages
        t.add_hw_breakpoint(TARGET, 1)
        t.resume(ResumeActions(default=ResumeAction("continue")))
        ev = wait_stop(t)
        assert ev.kind == "hwbreak"
        r = t.read_registers(1)
        assert r["rip"] == TARGET
        assert (r["rcx"] & 0xFFFFFFFF, r["rdi"] & 0xFFFFFFFF) == (0, 0x300000)
        assert t.read_physical(0x200000, 1 << 20) == b"\xa5" * (1 << 20)
        assert t.read_physical(0x300000, 4) == b"\0" * 4
        t.remove_hw_breakpoint(TARGET, 1)
        t.resume(ResumeActions(default=ResumeAction("continue")))
        assert m.wait(60) == 42
    finally:
        m.shutdown()
