"""The in-kernel interrupt controller (vGIC) and interrupt lines into it.

KVM emulates the GIC itself (distributor and redistributors in the kernel,
the CPU interface in hardware), as kvmtool, crosvm and Firecracker use it:
the architected timer and PSCI are wired to it inside KVM, so the VMM's
only part is to place it in the guest's physical map and to raise the
lines of its own devices with ``KVM_IRQ_LINE``.

Order (Documentation/virt/kvm/devices/arm-vgic-v3.rst): create the device
and set its addresses before the vCPUs run; ``KVM_DEV_ARM_VGIC_CTRL_INIT``
once every vCPU exists. GICv3 first; a host whose GIC cannot present a
GICv3 to guests (a GICv2 host) gets a GICv2.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

from vmscope.kvm.abi import KvmIoctlError, _iow, _iowr, ioctl
from vmscope.kvm.devices.irq import IrqLine

u32, u64 = ctypes.c_uint32, ctypes.c_uint64


class KvmCreateDevice(ctypes.Structure):
    _fields_ = [("type", u32), ("fd", u32), ("flags", u32)]


class KvmDeviceAttr(ctypes.Structure):
    _fields_ = [("flags", u32), ("group", u32), ("attr", u64), ("addr", u64)]


KVM_CREATE_DEVICE = _iowr(0xE0, KvmCreateDevice)
KVM_SET_DEVICE_ATTR = _iow(0xE1, KvmDeviceAttr)

KVM_DEV_TYPE_ARM_VGIC_V2 = 5
KVM_DEV_TYPE_ARM_VGIC_V3 = 7
KVM_DEV_ARM_VGIC_GRP_ADDR = 0
KVM_DEV_ARM_VGIC_GRP_NR_IRQS = 3
KVM_DEV_ARM_VGIC_GRP_CTRL = 4
KVM_DEV_ARM_VGIC_CTRL_INIT = 0
KVM_VGIC_V2_ADDR_TYPE_DIST, KVM_VGIC_V2_ADDR_TYPE_CPU = 0, 1
KVM_VGIC_V3_ADDR_TYPE_DIST, KVM_VGIC_V3_ADDR_TYPE_REDIST = 2, 3

# KVM_IRQ_LINE's irq field on arm64: type << 24 | vcpu << 16 | number
KVM_ARM_IRQ_TYPE_SPI = 1
SPI_BASE = 32  # interrupt ids 32+ are SPIs

# the guest-physical map (QEMU virt's addresses)
GIC_DIST = 0x0800_0000
GICV3_DIST_SIZE = 0x1_0000
GICV3_REDIST = 0x080A_0000
GICV3_REDIST_SIZE = 0x2_0000  # per vCPU: RD_base + SGI_base frames
GICV2_CPU = 0x0801_0000
GICV2_DIST_SIZE, GICV2_CPU_SIZE = 0x1000, 0x2000
NR_IRQS = 128  # 32 private + 96 SPIs: plenty for a UART


@dataclass
class Vgic:
    fd: int
    version: int  # 3 or 2
    regs: list[tuple[int, int]]  # for the device tree's reg property

    def finalize(self) -> None:
        """KVM_DEV_ARM_VGIC_CTRL_INIT: after every vCPU exists, before any runs."""
        _set_attr(self.fd, KVM_DEV_ARM_VGIC_GRP_CTRL, KVM_DEV_ARM_VGIC_CTRL_INIT, None, "CTRL_INIT")


def _set_attr(fd: int, group: int, attr: int, value: int | None, what: str) -> None:
    """KVM_SET_DEVICE_ATTR; ``value`` goes by pointer (a u32 for the number
    of interrupts, a u64 address otherwise), None for none."""
    buf = u32(value) if group == KVM_DEV_ARM_VGIC_GRP_NR_IRQS else u64(value or 0)
    arg = KvmDeviceAttr(flags=0, group=group, attr=attr, addr=0 if value is None else ctypes.addressof(buf))
    ioctl(fd, KVM_SET_DEVICE_ATTR, arg, f"KVM_SET_DEVICE_ATTR vGIC {what}")


def create_vgic(vm_fd: int, cpus: int, prefer: int = 3) -> Vgic:
    """Create the in-kernel GIC (v3, else v2) and place it; raises
    :class:`KvmIoctlError` when KVM offers neither."""
    errors = []
    for version in (3, 2) if prefer == 3 else (2,):
        dev = KvmCreateDevice(type=KVM_DEV_TYPE_ARM_VGIC_V3 if version == 3 else KVM_DEV_TYPE_ARM_VGIC_V2)
        try:
            ioctl(vm_fd, KVM_CREATE_DEVICE, dev, f"KVM_CREATE_DEVICE vGICv{version}")
        except KvmIoctlError as e:
            errors.append(str(e))
            continue
        if version == 3:
            regs = [(GIC_DIST, GICV3_DIST_SIZE), (GICV3_REDIST, GICV3_REDIST_SIZE * cpus)]
            _set_attr(dev.fd, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_DIST, GIC_DIST, "distributor")
            _set_attr(dev.fd, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V3_ADDR_TYPE_REDIST, GICV3_REDIST,
                      "redistributors")
        else:
            if cpus > 8:
                raise KvmIoctlError(22, f"a GICv2 serves at most 8 vCPUs, not {cpus}")
            regs = [(GIC_DIST, GICV2_DIST_SIZE), (GICV2_CPU, GICV2_CPU_SIZE)]
            _set_attr(dev.fd, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_DIST, GIC_DIST, "distributor")
            _set_attr(dev.fd, KVM_DEV_ARM_VGIC_GRP_ADDR, KVM_VGIC_V2_ADDR_TYPE_CPU, GICV2_CPU, "CPU interface")
        _set_attr(dev.fd, KVM_DEV_ARM_VGIC_GRP_NR_IRQS, 0, NR_IRQS, "number of interrupts")
        return Vgic(dev.fd, version, regs)
    raise KvmIoctlError(19, "KVM offers no in-kernel GIC (" + "; ".join(errors) + ")")


class SpiLine(IrqLine):
    """A level-triggered SPI into the vGIC: the ISA line's ``KVM_IRQ_LINE``
    contract (the ioctl only when the level changes), with arm64's encoding
    of the line number."""

    def __init__(self, vm_fd: int, spi: int):
        super().__init__(vm_fd, KVM_ARM_IRQ_TYPE_SPI << 24 | (SPI_BASE + spi))
        self.spi = spi
