"""vmscope's KVM micro-VMM and its debug target.

- :class:`KvmMachine` (``vm.py``): guest RAM as a memfd, vCPUs as threads,
  a 16550 on COM1, PVH boot (``boot/``), port devices (``devices/``).
- :class:`KvmTarget` (``debug.py``): what the GDB stub drives.
- ``console.py``: raw terminal and the ``Ctrl-A x`` escape.
- ``abi.py``: the KVM ioctls and structures, in ctypes.
"""

from vmscope.kvm.debug import KvmTarget
from vmscope.kvm.vm import KvmMachine

__all__ = ["KvmMachine", "KvmTarget"]
