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

    def kill(self) -> None:
        self.m.end(0, None)
