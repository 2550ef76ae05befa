"""vmscope: debug and inspect virtual machines.

A KVM micro-VMM with a GDB stub, an emulated-CPU target, an RSP client and
VM introspection, sharing one sans-I/O Remote Serial Protocol core.
"""

__version__ = "0.1.0"
