"""The flattened device tree an arm64 Linux guest boots with.

arm64 Linux learns its whole platform from the device tree in x0: RAM,
CPUs and how to start them (PSCI), the interrupt controller, the timer's
interrupts, the console UART, the command line and the initrd. This one
describes vmscope's platform (:mod:`vmscope.kvm.arm64.platform`), laid out
like QEMU's ``virt`` board so the addresses are familiar.

Built with libfdt's own Python binding (``pylibfdt``), the library dtc,
U-Boot, QEMU and kvmtool use: its sequential-write API produces a valid
blob (string table, alignment, header) by construction, where hand-packed
bytes would each need checking.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field

GIC_PHANDLE = 1

# interrupt specifier cells for the GIC bindings: <type number flags>
GIC_SPI, GIC_PPI = 0, 1
IRQ_TYPE_LEVEL_HIGH = 4
# the architected timer's PPIs (as interrupt numbers minus 16):
# secure physical, non-secure physical, virtual, hypervisor physical
TIMER_PPIS = (13, 14, 11, 10)


@dataclass
class DeviceTreeSpec:
    """Everything the device tree says; the platform fills it in."""

    ram_base: int
    ram_size: int
    mpidrs: list[int]  # one per vCPU, affinity fields only (the cpu nodes' reg)
    gic_version: int  # 3 or 2
    gic_regs: list[tuple[int, int]]  # v3: distributor, redistributors; v2: distributor, CPU interface
    uart_base: int
    uart_size: int
    uart_spi: int
    uart_clock: int = 1_843_200
    bootargs: str = ""
    initrd: tuple[int, int] | None = None  # (start, end)
    rtc: tuple[int, int, int] | None = None  # PL031 (base, size, spi), if present
    #: fresh entropy per boot unless a test pins it
    kaslr_seed: int = field(default_factory=lambda: int.from_bytes(os.urandom(8), "little"))
    rng_seed: bytes = field(default_factory=lambda: os.urandom(64))

    @property
    def uart_path(self) -> str:
        return f"/uart@{self.uart_base:x}"


def _reg(*pairs: tuple[int, int]) -> bytes:
    """A ``reg`` value with #address-cells = #size-cells = 2."""
    return b"".join(struct.pack(">QQ", addr, size) for addr, size in pairs)


def _cells(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def build_fdt(spec: DeviceTreeSpec) -> bytes:
    """The device tree blob for ``spec``."""
    import libfdt

    sw = libfdt.FdtSw()
    sw.finish_reservemap()
    with sw.add_node(""):
        sw.property_string("compatible", "linux,dummy-virt")
        sw.property_string("model", "vmscope arm64 KVM")
        sw.property_u32("#address-cells", 2)
        sw.property_u32("#size-cells", 2)
        sw.property_u32("interrupt-parent", GIC_PHANDLE)

        with sw.add_node("chosen"):
            sw.property_string("bootargs", spec.bootargs)
            sw.property_string("stdout-path", spec.uart_path)
            sw.property_u64("kaslr-seed", spec.kaslr_seed)
            sw.property("rng-seed", spec.rng_seed)
            if spec.initrd is not None:
                sw.property_u64("linux,initrd-start", spec.initrd[0])
                sw.property_u64("linux,initrd-end", spec.initrd[1])

        with sw.add_node(f"memory@{spec.ram_base:x}"):
            sw.property_string("device_type", "memory")
            sw.property("reg", _reg((spec.ram_base, spec.ram_size)))

        wide = any(m >> 32 for m in spec.mpidrs)  # Aff3 set: two address cells
        with sw.add_node("cpus"):
            sw.property_u32("#address-cells", 2 if wide else 1)
            sw.property_u32("#size-cells", 0)
            for mpidr in spec.mpidrs:
                with sw.add_node(f"cpu@{mpidr:x}"):
                    sw.property_string("device_type", "cpu")
                    sw.property_string("compatible", "arm,arm-v8")
                    sw.property_string("enable-method", "psci")
                    sw.property("reg", struct.pack(">Q", mpidr) if wide else _cells(mpidr))

        with sw.add_node("psci"):
            # KVM serves PSCI 0.2+ itself (KVM_ARM_VCPU_PSCI_0_2); the kernel
            # asks its version, so the 0.2 compatible covers 1.x too
            sw.property("compatible", b"arm,psci-1.0\0arm,psci-0.2\0")
            sw.property_string("method", "hvc")

        dist = spec.gic_regs[0][0]
        with sw.add_node(f"intc@{dist:x}"):
            sw.property_string("compatible", "arm,gic-v3" if spec.gic_version == 3 else "arm,cortex-a15-gic")
            sw.property("interrupt-controller", b"")
            sw.property_u32("#interrupt-cells", 3)
            # (as QEMU's virt: the GIC's children, an ITS say, use the parent's cells)
            sw.property_u32("#address-cells", 2)
            sw.property_u32("#size-cells", 2)
            sw.property("ranges", b"")
            sw.property("reg", _reg(*spec.gic_regs))
            sw.property_u32("phandle", GIC_PHANDLE)

        # GICv2 PPI specifiers carry a CPU mask in bits 8-15
        ppi_flags = IRQ_TYPE_LEVEL_HIGH
        if spec.gic_version == 2:
            ppi_flags |= ((1 << len(spec.mpidrs)) - 1) << 8 & 0xFF00
        with sw.add_node("timer"):
            sw.property_string("compatible", "arm,armv8-timer")
            sw.property("interrupts", _cells(*(c for ppi in TIMER_PPIS for c in (GIC_PPI, ppi, ppi_flags))))
            sw.property("always-on", b"")

        with sw.add_node(spec.uart_path[1:]):
            sw.property_string("compatible", "ns16550a")
            sw.property("reg", _reg((spec.uart_base, spec.uart_size)))
            sw.property_u32("clock-frequency", spec.uart_clock)
            sw.property("interrupts", _cells(GIC_SPI, spec.uart_spi, IRQ_TYPE_LEVEL_HIGH))

        if spec.rtc is not None:
            base, size, spi = spec.rtc
            with sw.add_node(f"rtc@{base:x}"):
                sw.property("compatible", b"arm,pl031\0arm,primecell\0")
                sw.property("reg", _reg((base, size)))
                sw.property("interrupts", _cells(GIC_SPI, spi, IRQ_TYPE_LEVEL_HIGH))

    fdt = sw.as_fdt()
    fdt.pack()
    return bytes(fdt.as_bytearray())
