"""An ISA interrupt line into KVM's in-kernel PIC and IOAPIC (KVM_IRQ_LINE).

Devices say what level their line should have; the ioctl goes out only when
the level changes (the ISA lines are edge-triggered, so a rising edge is an
interrupt, and repeating a level would be a wasted system call per access).
"""

from __future__ import annotations

import ctypes
import threading

from vmscope.kvm import abi
from vmscope.kvm.abi import ioctl


class KvmIrqLevel(ctypes.Structure):
    _fields_ = [("irq", ctypes.c_uint32), ("level", ctypes.c_uint32)]


KVM_IRQ_LINE = abi._iow(0x61, KvmIrqLevel)


class IrqLine:
    def __init__(self, vm_fd: int, irq: int):
        self.vm_fd = vm_fd
        self.irq = irq
        self.level = False
        self._lock = threading.Lock()
        #: rising edges sent, for tests and exit statistics
        self.raised = 0

    def set(self, level: bool) -> None:
        with self._lock:
            if level == self.level:
                return
            self.level = level
            if level:
                self.raised += 1
            ioctl(self.vm_fd, KVM_IRQ_LINE, KvmIrqLevel(self.irq, int(level)), "KVM_IRQ_LINE")
