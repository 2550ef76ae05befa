"""What every KVM vCPU does whatever the architecture: ``KVM_RUN`` and
closing its fd and ``kvm_run`` mapping. The x86 and arm64 vCPUs
(:mod:`vmscope.kvm.x86.vcpu`, :mod:`vmscope.kvm.arm64.vcpu`) add their
registers and debug state; run control (:mod:`vmscope.kvm.runcontrol`)
needs only this part.
"""

from __future__ import annotations

import errno
import os

from vmscope.kvm.abi import KVM_EXIT_INTR, KVM_RUN, KvmIoctlError, ioctl


class KvmVcpu:
    """Subclasses set ``index``, ``fd``, ``run`` (the mapped ``kvm_run``),
    ``_run_map`` and ``invalidate()`` (drop cached registers)."""

    index: int
    fd: int

    def invalidate(self) -> None:
        pass

    def exited(self) -> None:
        """Called once KVM_RUN returned (not interrupted by a signal): state
        KVM stores in ``kvm_run`` at every exit is fresh from here on."""

    def enter(self) -> bool:
        """One KVM_RUN. True when the guest exited with a reason to handle,
        False when interrupted (a kick or ``immediate_exit``)."""
        self.invalidate()
        try:
            ioctl(self.fd, KVM_RUN, 0, "KVM_RUN")
        except KvmIoctlError as e:
            if e.errno in (errno.EINTR, errno.EAGAIN):
                return False  # (no exited(): not every KVM stores synced state on this path)
            raise
        self.exited()
        return self.run.exit_reason != KVM_EXIT_INTR

    def close(self) -> None:
        del self.run
        try:
            self._run_map.close()
        except BufferError:
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass
