"""What the x86 and arm64 KVM debug targets share: both drive a machine
whose run control (:mod:`vmscope.kvm.runcontrol`) parks every vCPU on a
stop, so threads, stop requests, the running state and the end of the
guest are the same calls on ``self.m`` for both.
"""

from __future__ import annotations

from vmscope.gdbserver.target import SIGINT, SIGTRAP, StopEvent
from vmscope.gdbserver.toolkit import StopNotifying, refuse_while_running, thread_ids, vcpu_index


class KvmTargetBase(StopNotifying):
    """Mixin of both KVM targets (``self.m``: the machine, with ``vcpus``
    slots, ``stopped``, ``ending``, ``request_stop`` and ``end``)."""

    def _vcpu(self, tid: int):
        return self.m.vcpus[vcpu_index(tid, len(self.m.vcpus))].vcpu

    def _require_stopped(self) -> None:
        refuse_while_running(not self.m.stopped)  # a vCPU ioctl would block until KVM_RUN returns

    def threads(self) -> list[int]:
        return thread_ids(len(self.m.vcpus))

    def interrupt(self) -> None:
        self.m.request_stop(StopEvent("signal", tid=1, signal=SIGINT))

    def is_running(self) -> bool:
        return not self.m.stopped and not self.m.ending

    def initial_stop(self) -> StopEvent:
        self.attached = True
        return StopEvent("signal", tid=1, signal=SIGTRAP)

    def debug_state(self) -> str:
        """One line for a hung guest's report (RunControl.state_report):
        whether a debugger is attached and what of it is in the guest."""
        return (f"{'a debugger' if self.attached else 'no debugger'} attached: {len(self.sw)} software breakpoints, "
                f"{len(self.hw)} hardware, {len(self.watches)} watchpoints")

    def kill(self) -> None:
        self.m.end(0, None)

    # --- the debugger served from the stepping vCPU's thread (kvm/runcontrol.py) ---------

    #: whether :meth:`offer_debugger` may be used (x86: measured and tested; arm64: not yet)
    serves_debugger_from_vcpu = False

    def offer_debugger(self, server) -> bool:
        """After a resume: offer the debugger to the vCPU that runs alone, if
        any (a step, or a continue with one vCPU online; ``server(index) ->
        keep``, in that vCPU's thread), so a breakpoint hit is answered by
        the thread that took it. False when nothing runs alone, and on a
        machine with more than one vCPU online: there, a stock gdb hitting
        a breakpoint that both vCPUs of a Linux guest reach hung 2 times in
        about 20 runs in the nested lab (tests/lab/test_linux_vmm.py),
        whose emulated SVM was later found to lose state under that very
        load, serving or not (docs/kvm-notes.md); not tried again since."""
        if not self.serves_debugger_from_vcpu:
            return False
        if sum(1 for slot in self.m.vcpus if slot.online) != 1:
            return False
        runnable = [slot.vcpu.index for slot in self.m.vcpus if slot.runnable]
        if len(runnable) != 1:
            return False
        self.m.offer_debugger(runnable[0], server)
        return True

    def withdraw_debugger(self) -> bool:
        return self.m.withdraw_debugger()

    def running_alone(self, index: int) -> bool:
        """True when the last resume ran vCPU ``index`` alone (a step or a
        continue), or ran nothing (a held-back stop was posted instead)."""
        return {s.vcpu.index for s in self.m.vcpus if s.runnable} <= {index}
