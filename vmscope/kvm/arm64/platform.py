"""The platform around an arm64 Linux guest on KVM: what the kernel finds
in its device tree, and the VMM's side of each part.

=====================  ===========================================  ======================
part                   guest-physical                               who serves it
=====================  ===========================================  ======================
RAM                    0x40000000 + --mem                           KVM (memfd slot)
GICv3 (v2 fallback)    distributor 0x08000000, redistributors       KVM (in-kernel vGIC)
                       0x080a0000 (v2: CPU interface 0x08010000)
architected timer      PPIs 13, 14, 11, 10                          KVM
PSCI 0.2+ (``hvc``)    CPU_ON, SYSTEM_OFF, SYSTEM_RESET             KVM; OFF/RESET exit here
16550 UART             0x09000000, SPI 1 (level)                    this module, KVM_IRQ_LINE
=====================  ===========================================  ======================

The UART is a 16550 on MMIO (``ns16550a``, as kvmtool gives arm64 guests)
rather than a PL011: it is the same model as the x86 machine's COM1 with
its interrupt line (:class:`vmscope.kvm.devices.uart_irq.InterruptingSerial`),
so the console, its input, its interrupt behaviour and the console tail for
fault reports are one code base; the kernel's ``console=ttyS0`` names it.

Secondary vCPUs start powered off (``KVM_ARM_VCPU_POWER_OFF``) and come up
through PSCI CPU_ON, which KVM handles without a VMM exit. SYSTEM_OFF ends
the VMM with status 0; SYSTEM_RESET too, unless the console shows a kernel
panic just before (``panic=-1`` reboots), as on x86.
"""

from __future__ import annotations

from pathlib import Path

from vmscope.kvm.arm64.fdt import DeviceTreeSpec, build_fdt
from vmscope.kvm.arm64.gic import SpiLine, Vgic, create_vgic
from vmscope.kvm.arm64.image import LinuxLayout, load_image
from vmscope.kvm.devices.storm import ExitStormDetector
from vmscope.kvm.devices.uart_irq import InterruptingSerial
from vmscope.machine import ImageError, MachineUnavailable

UART_BASE = 0x0900_0000
UART_SIZE = 0x1000
UART_REGS = 8  # reg-shift 0, one byte per register
UART_SPI = 1

#: the command line when the user gives none (see vmscope.kvm.boot.linux)
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"


class LinuxPlatform:
    """Built by :class:`~vmscope.kvm.arm64.machine.Arm64KvmMachine` for a
    Linux Image: :meth:`__init__` before the vCPUs exist (the vGIC, the
    image), :meth:`finish` after (vGIC init, the device tree)."""

    def __init__(self, vm_fd: int, ram, kernel: Path, initrd: Path | None, append: str, cpus: int, out):
        self.layout: LinuxLayout = load_image(kernel, ram, initrd)
        self.ram = ram
        self.cmdline = append.strip() or DEFAULT_CMDLINE
        try:
            self.vgic: Vgic = create_vgic(vm_fd, cpus)
        except OSError as e:
            raise MachineUnavailable(f"this KVM cannot give the guest an interrupt controller: {e}") from None
        self.irq = SpiLine(vm_fd, UART_SPI)
        self.serial = InterruptingSerial(out, self.irq, base=UART_BASE)
        self.storm = ExitStormDetector(cpus)
        self.fdt: bytes | None = None

    def finish(self, mpidrs: list[int]) -> None:
        """Every vCPU exists: initialise the vGIC, write the device tree."""
        self.vgic.finalize()
        spec = DeviceTreeSpec(
            ram_base=self.ram.base, ram_size=self.ram.size, mpidrs=mpidrs,
            gic_version=self.vgic.version, gic_regs=self.vgic.regs,
            uart_base=UART_BASE, uart_size=UART_SIZE, uart_spi=UART_SPI,
            bootargs=self.cmdline, initrd=self.layout.initrd)
        self.fdt = build_fdt(spec)
        if len(self.fdt) > self.layout.fdt_max:
            raise ImageError(f"device tree of {len(self.fdt)} bytes exceeds its {self.layout.fdt_max} bytes")
        self.ram.write(self.layout.fdt_addr, self.fdt)

    def mmio(self, vcpu_index: int, addr: int, data, length: int, is_write: bool) -> str | None:
        """Serve one MMIO exit (``data``: kvm_run's 8 data bytes); returns an
        exit-storm description when the vCPU does nothing but this access."""
        offset = addr - UART_BASE
        if 0 <= offset < UART_REGS:
            if is_write:
                self.serial.write(addr, length, int.from_bytes(bytes(data[:length]), "little"))
            else:
                value = self.serial.read(addr, length)
                for i, b in enumerate(value.to_bytes(8, "little")[:length]):
                    data[i] = b
            return None
        if not is_write:  # nothing else is there: reads as 0, writes dropped
            for i in range(length):
                data[i] = 0
        return self.storm.io(vcpu_index, addr, is_write)

    def console_tail(self) -> list[str]:
        return self.serial.console_tail()


def is_linux_image(path: Path) -> bool:
    """Not an ELF: the arm64 machine boots ELF files as bare-metal guests
    and anything else as a Linux Image (whose loader says what is wrong)."""
    try:
        with open(path, "rb") as f:
            return f.read(4) != b"\x7fELF"
    except OSError:
        return True  # let the loader report it
