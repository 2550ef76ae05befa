"""A time limit on one KVM_RUN, for runs that must not block.

Why: the debug target single-steps a vCPU through a protected code page
with every other vCPU parked (vmscope.kvm.x86.pagestep). That KVM_RUN normally
returns after one instruction, but it can block inside the kernel for good:
a Linux guest with paravirtual spinlocks halts with interrupts off
(``kvm_wait``) until the lock holder kicks it by hypercall, and the holder
is one of the parked vCPUs; or the single-step trap is lost and the guest
spins waiting for an IPI that a parked vCPU must answer. Nothing exits, so
the VMM hangs and the guest logs soft lockups (seen in the nested lab).

One thread per machine serves every vCPU: :meth:`RunWatchdog.limit` arms a
deadline for the calling thread's next KVM_RUN; when it passes, the
watchdog sets ``immediate_exit`` (in case the kick lands before the ioctl)
and sends the vCPU thread the kick signal, so KVM_RUN returns EINTR. The
caller then gives up the step and lets the others run. Arming costs a lock
and a notify, not a thread per step.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time


class RunWatchdog:
    def __init__(self, kick_signal: int):
        self.kick_signal = kick_signal
        self._cond = threading.Condition()
        self._armed: dict[int, tuple[float, object]] = {}  # thread ident -> (deadline, vcpu)
        self._fired: set[int] = set()
        self._thread: threading.Thread | None = None
        self._closed = False

    @contextlib.contextmanager
    def limit(self, vcpu, seconds: float):
        """Within the block, the calling thread's KVM_RUN on ``vcpu`` is
        interrupted after ``seconds``. Yields a callable telling whether
        that happened."""
        me = threading.get_ident()
        with self._cond:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name="kvm-run-watchdog", daemon=True)
                self._thread.start()
            self._fired.discard(me)
            self._armed[me] = (time.monotonic() + seconds, vcpu)
            self._cond.notify()
        try:
            yield lambda: me in self._fired
        finally:
            with self._cond:
                self._armed.pop(me, None)
                if me in self._fired:
                    vcpu.run.immediate_exit = 0

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify()

    def _loop(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                due = [(ident, v) for ident, (deadline, v) in self._armed.items() if deadline <= now]
                for ident, v in due:
                    del self._armed[ident]
                    self._fired.add(ident)
                    v.run.immediate_exit = 1
                    try:
                        signal.pthread_kill(ident, self.kick_signal)
                    except (ProcessLookupError, OSError):
                        pass
                nxt = min((d for d, _ in self._armed.values()), default=None)
                self._cond.wait(None if nxt is None else max(0.0, nxt - time.monotonic()))
