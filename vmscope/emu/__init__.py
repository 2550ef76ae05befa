"""The emulated-CPU back end: x86_64 and aarch64 guests on Unicorn.

:class:`EmuMachine` boots a bare-metal ELF (the embedded demo guests by
default) with a UART, and :class:`EmuTarget` is its GDB-stub target with
software and hardware breakpoints, watchpoints, stepping, Ctrl-C and one
thread per vCPU. It needs no /dev/kvm, so it is what ``vmscope run`` falls
back to where KVM is missing or unusable.
"""

from vmscope.emu.machine import EmuMachine  # noqa: F401
from vmscope.emu.target import EmuTarget  # noqa: F401
