"""The emulated-CPU back end: x86_64 and aarch64 guests on Unicorn.

:class:`EmuMachine` boots a bare-metal ELF (the embedded demo guests by
default) with a UART, and :class:`EmuTarget` is its GDB-stub target with
software and hardware breakpoints, watchpoints, stepping, Ctrl-C and one
thread per vCPU. It needs no /dev/kvm, so it is what ``vmscope run`` falls
back to where KVM is missing or unusable.
"""


# Lazy: importing the package (the CLI does, to pick a back end) must not pay
# for importing Unicorn (seconds under TCG in the lab) unless it is used.
def __getattr__(name: str):
    if name == "EmuMachine":
        from vmscope.emu.machine import EmuMachine

        return EmuMachine
    if name == "EmuTarget":
        from vmscope.emu.target import EmuTarget

        return EmuTarget
    raise AttributeError(f"module 'vmscope.emu' has no attribute {name!r}")
