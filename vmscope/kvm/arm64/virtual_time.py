"""A debug stop taken off an arm64 guest's virtual counter (QEMU's
``kvm-adjvtime``, on by default for its arm64 KVM guests).

Why: the virtual counter runs on while a debugger holds the guest, so after
the continue Linux's soft-lockup watchdog and RCU stall detector see CPUs
that did not run for the whole stop and print stall reports (see
:mod:`vmscope.kvm.runcontrol`). arm64 has no paravirtual "guest stopped"
flag like x86's kvmclock; instead, as QEMU does, the counter is set back
by the length of the stop, so to the guest the stop took no time (its wall
clock then runs that much behind, as under QEMU, until NTP corrects it).

Only stops of :data:`~vmscope.kvm.runcontrol.PAUSE_NOTICE_SECONDS` or more
are taken off: short stops cost no ioctl, and only the stop just ended can
be (the guest read the counter after earlier ones, and must never see it go
back). The counter's rate is measured, not assumed: from its value when the
machine was made and now, counting what was taken off since.
"""

from __future__ import annotations

import time

from vmscope.kvm.arm64.abi import sysreg

# KVM_REG_ARM_TIMER_CNT: CNTVCT_EL0. The uapi swapped this id with CVAL's
# (op2 2 with CRm 3 is CNTV_CVAL_EL0's encoding), and cannot change it now.
TIMER_CNT = sysreg(3, 3, 14, 3, 2)
# Taken off less than the stop lasted, so the counter never goes back even
# if the measured rate is off: 0.1% of the stop plus 5 ms. The rate is
# measured over at least a second (an ioctl's jitter is tens of
# microseconds: an error of 1e-4 at worst).
MARGIN_SECONDS, MARGIN_FRACTION, MIN_BASE_SECONDS = 0.005, 0.001, 1.0


class StopHider:
    """Sets the virtual counter back by the length of long debug stops."""

    def __init__(self, vcpus) -> None:
        """``vcpus``: the machine's vCPUs (``read_fresh``/``set``), before any runs."""
        self._vcpus = vcpus
        self._made = (time.monotonic(), vcpus[0].read_fresh(TIMER_CNT))
        self.taken_off = 0  # counter ticks taken off so far

    def rate(self, now: float, count: int) -> float | None:
        """Counter ticks per second since the machine was made, or None
        when too little time has passed to tell it well."""
        made_at, made_count = self._made
        if now - made_at < MIN_BASE_SECONDS:
            return None
        return (count + self.taken_off - made_count) / (now - made_at)

    def stop_ended(self, seconds: float) -> int:
        """A stop of ``seconds`` ends (every vCPU parked): set the counter
        back by it, on every vCPU (KVM keeps one offset per VM; QEMU writes
        each vCPU too). Returns the ticks taken off."""
        now, count = time.monotonic(), self._vcpus[0].read_fresh(TIMER_CNT)
        rate = self.rate(now, count)
        hidden = seconds * (1 - MARGIN_FRACTION) - MARGIN_SECONDS
        if rate is None or hidden <= 0:
            return 0
        ticks = int(hidden * rate)
        for v in self._vcpus:
            v.set(TIMER_CNT, count - ticks)
        self.taken_off += ticks
        return ticks
