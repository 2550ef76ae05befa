"""A guest held at a debug stop is told so through kvmclock, as under QEMU.

Why it matters: Linux's soft-lockup watchdog and RCU stall detector count
the time a debugger held the machine as time the CPUs did not run, and
after the continue print stall reports with backtraces (through the serial
console: seconds of output, a vCPU busy in the UART). QEMU calls
``KVM_KVMCLOCK_CTRL`` when a stopped VM resumes; KVM then sets the
PVCLOCK_GUEST_STOPPED flag in the guest's kvmclock page, which both
detectors check before they report. vmscope does it once the machine has
been held for :data:`vmscope.kvm.runcontrol.PAUSE_NOTICE_SECONDS` in all.

On the real /dev/kvm: a synthetic bzImage registers a kvmclock page
(MSR_KVM_SYSTEM_TIME_NEW) and spins. A short stop leaves the flag clear;
a stop held past the notice time sets it, seen in guest memory after the
continue. (arm64 takes long stops off the virtual counter instead:
tests/lab/test_arm64_linux_vmm.py, in the arm64 lab.)
"""

from __future__ import annotations

import select
import struct
import time

import pytest

from tests.kvm_support import stopped_bzimage_guest
from vmscope.gdbserver.target import SIGINT, ResumeAction, ResumeActions
from vmscope.kvm.runcontrol import PAUSE_NOTICE_SECONDS

pytestmark = [pytest.mark.kvm, pytest.mark.timeout(120)]

CLOCK = 0x200000  # where the guest puts its pvclock_vcpu_time_info
FLAGS = CLOCK + 29  # u8 flags after version, pad, tsc_timestamp, system_time, mul, shift
PVCLOCK_GUEST_STOPPED = 1 << 1
# 32-bit, flat, paging off: mov $MSR_KVM_SYSTEM_TIME_NEW, %ecx; mov $(CLOCK | enable), %eax;
# xor %edx, %edx; wrmsr; 1: pause; jmp 1b
CODE = (b"\xb9" + struct.pack("<I", 0x4B564D01) + b"\xb8" + struct.pack("<I", CLOCK | 1)
        + b"\x31\xd2" + b"\x0f\x30" + b"\xf3\x90" + b"\xeb\xfc")


def run_then_stop(t, seconds: float = 0.3):
    t.resume(ResumeActions(default=ResumeAction("continue")))
    time.sleep(seconds)
    t.interrupt()
    ready, _, _ = select.select([t.stop_fd()], [], [], 30)
    assert ready, "no stop reported"
    ev = t.take_stop()
    assert ev.kind == "signal" and ev.signal == SIGINT, ev


def clock_page(t) -> tuple[int, int]:
    """(version, flags) of the guest's kvmclock page."""
    raw = t.read_memory(CLOCK, 32, 1)
    return struct.unpack_from("<I", raw)[0], raw[29]


def test_a_guest_held_at_a_stop_finds_the_guest_stopped_flag(tmp_path):
    m, t = stopped_bzimage_guest(tmp_path, CODE, "kvmclock.bzImage")
    try:
        run_then_stop(t)
        version, flags = clock_page(t)
        assert version != 0, "KVM never wrote the guest's kvmclock page"
        assert not flags & PVCLOCK_GUEST_STOPPED, "set after a short stop"

        run_then_stop(t)  # a few short stops do not add up to the notice time
        assert not clock_page(t)[1] & PVCLOCK_GUEST_STOPPED, "set after two short stops"

        time.sleep(PAUSE_NOTICE_SECONDS + 0.2)  # a debugger holding the machine
        run_then_stop(t)
        assert clock_page(t)[1] & PVCLOCK_GUEST_STOPPED, "the held guest was not told it was paused"
    finally:
        m.shutdown()
