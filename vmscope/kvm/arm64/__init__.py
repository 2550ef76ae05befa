"""vmscope's KVM back end for arm64 hosts.

- :class:`Arm64KvmMachine` (``machine.py``): a ``virt``-like VM (RAM at
  0x40000000, PL011, PSCI from KVM) with vCPUs as threads; for a Linux
  Image the platform of ``platform.py`` (in-kernel GICv3 ``gic.py``, timer,
  PSCI, a 16550 with its interrupt, the device tree of ``fdt.py``; loader
  ``image.py``), kernel symbols for GDB in ``linux_symbols.py``.
- :class:`Arm64KvmTarget` (``target.py``): what the GDB stub drives.
- ``abi.py`` (ONE_REG ids, ioctls), ``debugarch.py`` (ESR decoding,
  breakpoint/watchpoint control words), ``icache.py`` (cache maintenance
  after patching code).

``python3 -m vmscope.kvm.arm64 --gdb HOST:PORT`` runs the demo guest with
the stub, for arm64 hosts whose ``vmscope run`` does not route here yet.
"""

from vmscope.kvm.arm64.machine import Arm64KvmMachine
from vmscope.kvm.arm64.target import Arm64KvmTarget

__all__ = ["Arm64KvmMachine", "Arm64KvmTarget"]
