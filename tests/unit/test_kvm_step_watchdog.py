"""Steps through a protected code page must not freeze the guest.

In the nested lab a Debian guest froze under page-protection breakpoints:
a step let KVM inject an interrupt first, its handler ran with TF clear
(so the "step" ran on), met a contended paravirtual spinlock and halted
with interrupts off, waiting for a kick from a vCPU the step kept parked.
Two defences, both on this host's /dev/kvm with the in-kernel LAPIC (a
synthetic bzImage, so the VMM builds the Linux platform):

- steps block interrupts (KVM_GUESTDBG_BLOCKIRQ), and a ``hlt`` with
  interrupts off on a breakpoint's page neither hangs the VMM nor freezes
  the other vCPU;
- a KVM_RUN that blocks anyway is cut short by the run watchdog
  (vmscope.kvm.run_watchdog), shown on a real halted vCPU.
"""

from __future__ import annotations

import select
import time

import pytest

from tests.kvm_support import SerialSink, bzimage, make_machine
from vmscope.gdbserver.target import ResumeAction, ResumeActions

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(180)]

LOAD = 0x100000
COUNTER = 0x9000  # vCPU 1's count (physical)
# 32-bit, at LOAD: copy the AP loop to 0x8000 (rep movsb); software-enable
# the LAPIC (SVR = 0x1ff); INIT to all but self; delay; SIPI vector 8 twice;
# jmp LOAD+0x1000. Then the AP's 16-bit loop: xor %ax,%ax; mov %ax,%ds;
# 1: incl 0x9000; jmp 1b
BSP = bytes.fromhex(
    "be4d001000" "bf00800000" "b90b000000" "fc" "f3a4"
    "c705f000e0feff010000" "c7050003e0fe00450c00" "b9a0860100" "e2fe"
    "c7050003e0fe08460c00" "b9e8030000" "e2fe" "c7050003e0fe08460c00"
    "e9b30f0000"
    "31c0" "8ed8" "66ff060090" "ebf9"
)
HALT_PAGE = bytes.fromhex("9090" "f4" "ebfb")  # nop; nop; hlt (interrupts are off from the entry on); jmp back
NEVER = bytes.fromhex("90" "ebfd")  # the breakpoint's spot, on no path


def kernel() -> bytes:
    code = bytearray(0x2000)
    code[: len(BSP)] = BSP
    code[0x1000 : 0x1000 + len(HALT_PAGE)] = HALT_PAGE
    code[0x1800 : 0x1800 + len(NEVER)] = NEVER
    return bzimage(kernel=bytes(code))


def count(t) -> int:
    return int.from_bytes(t.read_physical(COUNTER, 4), "little")


def test_a_halt_with_interrupts_off_on_a_breakpoints_page_does_not_freeze_the_other_vcpu(tmp_path, monkeypatch):
    monkeypatch.setenv("VMSCOPE_KVM_BREAKPOINTS", "pages")
    image = tmp_path / "halt.bzImage"
    image.write_bytes(kernel())
    m = make_machine(kernel=image, cpus=2, serial_out=SerialSink())
    try:
        m.start(paused=True)
        t = m.debug_target()
        t.initial_stop()
        t.add_sw_breakpoint(LOAD + 0x1800, 1)
        t.resume(ResumeActions(default=ResumeAction("continue")))
        deadline = time.monotonic() + 60
        while count(t) == 0 and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)  # vCPU 0 is on the halt page by now
        first = count(t)
        time.sleep(1.0)
        second = count(t)
        assert second > first, f"vCPU 1 stopped counting ({first} -> {second}) while vCPU 0 sat halted"
        t.interrupt()
        r, _, _ = select.select([t.stop_fd()], [], [], 30)
        assert r, "Ctrl-C did not stop the machine"
        assert t.take_stop().kind in ("signal", "stop")
        assert t.read_registers(1)["rip"] >> 12 == (LOAD + 0x1000) >> 12  # vCPU 0 sat on the halt page
        stopped = count(t)
        time.sleep(0.3)
        assert count(t) == stopped  # really stopped
    finally:
        m.shutdown()


def test_the_run_watchdog_cuts_a_blocked_kvm_run_short(tmp_path):
    """A vCPU halted with interrupts off (the in-kernel LAPIC: KVM_RUN
    waits in the kernel for good) returns from KVM_RUN at the limit; a
    block that ends in time leaves the vCPU untouched."""
    from vmscope.kvm.run_watchdog import RunWatchdog
    from vmscope.kvm.system import KICK_SIGNAL

    code = bytearray(0x1000)
    code[:3] = bytes.fromhex("f4" "ebfd")  # hlt (interrupts are off from the entry on); jmp back
    image = tmp_path / "hlt.bzImage"
    image.write_bytes(bzimage(kernel=bytes(code)))
    m = make_machine(kernel=image, cpus=1, serial_out=SerialSink())
    wd = RunWatchdog(KICK_SIGNAL)
    try:
        m.start(paused=True)  # the vCPU thread waits, parked: this thread drives the vCPU
        v = m.vcpus[0].vcpu
        with wd.limit(v, 5.0) as fired:
            pass
        assert not fired() and v.run.immediate_exit == 0
        t0 = time.monotonic()
        with wd.limit(v, 0.3) as fired:
            returned = v.enter()
            took = time.monotonic() - t0
            cut = fired()
        assert cut and returned is False, "KVM_RUN ended by itself: the vCPU did not block in hlt"
        assert 0.25 <= took < 10, took
        assert v.run.immediate_exit == 0  # the next KVM_RUN runs normally
        assert v.regs().rip == LOAD + 1  # halted after the hlt, as KVM leaves it
    finally:
        wd.close()
        m.shutdown()
