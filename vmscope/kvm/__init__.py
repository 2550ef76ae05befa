"""vmscope's KVM micro-VMM and its debug target.

- :class:`KvmMachine` (``vm.py``): vCPUs as threads, image loading
  (``boot/``), KVM-only port devices (``devices/``); guest RAM, the 16550,
  the console and the PVH/ELF loaders are :mod:`vmscope.devices`, shared
  with the other back ends.
- :class:`KvmTarget` (``debug.py``): what the GDB stub drives.
- ``abi.py``: the KVM ioctls and structures, in ctypes.
"""

from vmscope.kvm.debug import KvmTarget
from vmscope.kvm.vm import KvmMachine

__all__ = ["KvmMachine", "KvmTarget"]
