"""vmscope's KVM micro-VMMs and their debug targets.

Architecture-neutral KVM (this package): ``system.py`` (``/dev/kvm``,
capabilities, the kick signal), ``runcontrol.py`` (vCPU threads, debug
stops, exclusive turns; both machines subclass it), ``slots.py`` (memory
slots with protected pages), ``run_watchdog.py`` (a time limit on one
KVM_RUN), ``vcpu.py`` (KVM_RUN itself), ``fields.py`` (register-table paths
in KVM's structures), ``abi.py`` (ioctls and structures in ctypes), ``boot/``
(image loading) and ``devices/`` (KVM-only port devices of the x86 PC).
Guest RAM, the 16550, the PL011, the console and the PVH/ELF loaders are
:mod:`vmscope.devices`, shared with the other back ends.

- :class:`KvmMachine` and :class:`KvmTarget`: x86 (``x86/``).
- ``arm64/``: :class:`~vmscope.kvm.arm64.Arm64KvmMachine` and its target.
"""

from vmscope.kvm.x86.machine import KvmMachine
from vmscope.kvm.x86.target import KvmTarget

__all__ = ["KvmMachine", "KvmTarget"]
