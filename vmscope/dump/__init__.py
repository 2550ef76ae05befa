"""Guest memory dumps in the format of QEMU's ``dump-guest-memory``.

:mod:`.elfcore` writes and reads the ELF core (PT_LOAD per RAM region,
NT_PRSTATUS and QEMU's CPU-state note per vCPU, a VMCOREINFO note), which
``crash`` and drgn open as a kernel dump; :mod:`.take` makes one from a live
guest through any gdbstub; :mod:`.offline` inspects one as if it were live.
"""
