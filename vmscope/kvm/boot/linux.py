"""The Linux x86 boot protocol: a bzImage straight into the kernel, no firmware.

What a boot loader does (Documentation/arch/x86/boot.rst), and no more:

- check the setup header ("HdrS", protocol >= 2.12 so the kernel is
  relocatable, 64-bit capable and takes its command line and initrd above
  4 GiB if it must);
- copy the protected-mode part of the image to 1 MiB (the decompressor
  moves itself from there, and picks a random place for the kernel: KASLR
  stays on);
- build ``boot_params`` (the "zero page"): the setup header, an e820 map,
  the command line pointer, the initrd;
- enter the 32-bit entry point (``code32_start``) in flat protected mode,
  paging off, ``esi`` = boot_params. The decompressor loads its own GDT and
  page tables before it needs any of ours, so this is the cheapest correct
  entry.

:func:`attach_platform` adds what a stock kernel expects of a PC around the
vCPUs: the in-kernel interrupt controllers and PIT, COM1 with an interrupt
line, a CMOS clock, the ACPI power-management ports and the reset ports,
and ACPI tables (:mod:`vmscope.kvm.boot.acpi`: how the kernel learns the
vCPU count, since Debian's kernel has no MP-table parser).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

from vmscope.devices.pvh import BootPlan
from vmscope.devices.ram import PAGE, GuestRam
from vmscope.machine import ImageError

#: the command line when the user gives none: the serial console, few
#: console lines (each character is a VM exit), reboot on panic (the VMM
#: turns that reboot into a report and a non-zero exit)
DEFAULT_CMDLINE = "console=ttyS0 quiet panic=-1"

MIN_PROTOCOL = 0x020C  # 2.12: xloadflags, 64-bit entry, relocatable kernels
BOOT_PARAMS_ADDR = 0x7000
CMDLINE_ADDR = 0x20000
CMDLINE_MAX = 0x10000
KERNEL_LOAD_ADDR = 0x100000
LOW_RAM_END = 0x9FC00
HIGH_RAM_START = 0x100000
E820_RAM, E820_RESERVED, E820_ACPI = 1, 2, 3

# offsets inside boot_params (struct boot_params, arch/x86/include/uapi/asm/bootparam.h)
BP_ACPI_RSDP_ADDR = 0x070
BP_EXT_RAMDISK_IMAGE = 0x0C0
BP_EXT_RAMDISK_SIZE = 0x0C4
BP_EXT_CMD_LINE_PTR = 0x0C8
BP_E820_ENTRIES = 0x1E8
BP_SETUP_HEADER = 0x1F1
BP_E820_TABLE = 0x2D0
E820_MAX_ENTRIES = 128

# setup header fields (offsets are the same in the image and in boot_params)
HDR_SETUP_SECTS = 0x1F1
HDR_BOOT_FLAG = 0x1FE
HDR_JUMP = 0x200
HDR_MAGIC = 0x202
HDR_VERSION = 0x206
HDR_TYPE_OF_LOADER = 0x210
HDR_LOADFLAGS = 0x211
HDR_CODE32_START = 0x214
HDR_RAMDISK_IMAGE = 0x218
HDR_RAMDISK_SIZE = 0x21C
HDR_HEAP_END_PTR = 0x224
HDR_CMD_LINE_PTR = 0x228
HDR_INITRD_ADDR_MAX = 0x22C
HDR_RELOCATABLE = 0x234
HDR_XLOADFLAGS = 0x236
HDR_CMDLINE_SIZE = 0x238
HDR_INIT_SIZE = 0x260

LOADED_HIGH = 0x01
CAN_USE_HEAP = 0x80
XLF_KERNEL_64 = 0x01
LOADER_UNDEFINED = 0xFF  # "a boot loader without an assigned id"


@dataclass(frozen=True)
class BzImageHeader:
    """The setup-header facts the loader acts on."""

    version: int
    setup_sects: int
    loadflags: int
    code32_start: int
    initrd_addr_max: int
    relocatable: bool
    xloadflags: int
    cmdline_size: int
    init_size: int
    header_end: int  # end of the setup header (offset in the image)

    @property
    def setup_size(self) -> int:
        """Bytes of real-mode setup code before the protected-mode kernel."""
        return (self.setup_sects + 1) * 512

    @property
    def version_text(self) -> str:
        return f"{self.version >> 8}.{self.version & 0xFF:02d}"


def parse_header(data: bytes, path: str | Path = "image") -> BzImageHeader:
    """Check that ``data`` is a bzImage this loader can boot; the error
    names the field that is wrong."""
    if len(data) < 0x264:
        raise ImageError(f"{path}: {len(data)} bytes is too short for a Linux bzImage (the setup header alone ends at 0x264)")
    if data[HDR_MAGIC : HDR_MAGIC + 4] != b"HdrS":
        raise ImageError(f"{path}: not a Linux bzImage (no 'HdrS' signature at 0x202)")
    (boot_flag,) = struct.unpack_from("<H", data, HDR_BOOT_FLAG)
    if boot_flag != 0xAA55:
        raise ImageError(f"{path}: setup header boot_flag is {boot_flag:#06x}, expected 0xaa55")
    (version,) = struct.unpack_from("<H", data, HDR_VERSION)
    if version < MIN_PROTOCOL:
        raise ImageError(
            f"{path}: Linux boot protocol {version >> 8}.{version & 0xFF:02d} is too old; "
            f"vmscope boots bzImages with protocol 2.12 or newer (Linux 3.8+)"
        )
    setup_sects = data[HDR_SETUP_SECTS] or 4
    loadflags = data[HDR_LOADFLAGS]
    if not loadflags & LOADED_HIGH:
        raise ImageError(f"{path}: a zImage (loadflags.LOADED_HIGH clear): vmscope boots bzImages only")
    code32_start, = struct.unpack_from("<I", data, HDR_CODE32_START)
    initrd_addr_max, = struct.unpack_from("<I", data, HDR_INITRD_ADDR_MAX)
    xloadflags, = struct.unpack_from("<H", data, HDR_XLOADFLAGS)
    cmdline_size, = struct.unpack_from("<I", data, HDR_CMDLINE_SIZE)
    init_size, = struct.unpack_from("<I", data, HDR_INIT_SIZE)
    relocatable = bool(data[HDR_RELOCATABLE])
    if not xloadflags & XLF_KERNEL_64:
        raise ImageError(f"{path}: a 32-bit kernel (xloadflags.XLF_KERNEL_64 clear): vmscope boots x86_64 kernels")
    setup_size = (setup_sects + 1) * 512
    if setup_size >= len(data):
        raise ImageError(f"{path}: truncated: setup_sects={setup_sects} says the kernel starts at {setup_size:#x}, the file is {len(data):#x} bytes")
    header_end = HDR_JUMP + 2 + data[HDR_JUMP + 1]
    return BzImageHeader(version, setup_sects, loadflags, code32_start, initrd_addr_max, relocatable,
                         xloadflags, cmdline_size, init_size, min(header_end, 0x290))


def e820_map(mem_size: int) -> list[tuple[int, int, int]]:
    """(addr, size, type): low RAM, the legacy hole (where the ACPI tables
    live), and everything from 1 MiB up."""
    entries = [(0, LOW_RAM_END, E820_RAM), (LOW_RAM_END, HIGH_RAM_START - LOW_RAM_END, E820_RESERVED)]
    if mem_size > HIGH_RAM_START:
        entries.append((HIGH_RAM_START, mem_size - HIGH_RAM_START, E820_RAM))
    return entries


def load_bzimage(path: Path, mem: GuestRam, cmdline: str = "", initrd: Path | None = None) -> BootPlan:
    """Put a bzImage, its command line and initrd into ``mem``; the plan
    enters the kernel's 32-bit entry with ``esi`` = boot_params."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror}") from None
    hdr = parse_header(data, path)
    kernel = data[hdr.setup_size :]
    need = max(len(kernel), hdr.init_size)
    if mem.size < KERNEL_LOAD_ADDR + need + (16 << 20):
        raise ImageError(
            f"{path}: the kernel needs {need >> 20} MiB above 1 MiB to decompress; "
            f"guest RAM is {mem.size >> 20} MiB: give the VM more memory (--mem)"
        )
    mem.write(KERNEL_LOAD_ADDR, kernel)
    write_boot_params(data, hdr, mem, cmdline, initrd, KERNEL_LOAD_ADDR + need, code32_start=KERNEL_LOAD_ADDR)
    return BootPlan(
        entry=KERNEL_LOAD_ADDR,
        start_info=BOOT_PARAMS_ADDR,
        mode="linux32",
        segments=[(KERNEL_LOAD_ADDR, len(kernel))],
    )


def write_boot_params(data: bytes, hdr: BzImageHeader, mem: GuestRam, cmdline: str, initrd: Path | None,
                      kernel_end: int, code32_start: int = 0, loadflags: int = 0) -> tuple[int, int] | None:
    """Write the command line, the initrd and ``boot_params`` (the setup
    header copied from the image, an e820 map) into ``mem``; the initrd
    goes at the top of RAM, above ``kernel_end``. ``loadflags`` are added
    to the image's. Returns the initrd's (address, size), None without one."""
    cmdline = cmdline.strip() or DEFAULT_CMDLINE
    raw_cmdline = cmdline.encode() + b"\0"
    limit = min(CMDLINE_MAX, hdr.cmdline_size + 1 if hdr.cmdline_size else CMDLINE_MAX)
    if len(raw_cmdline) > limit:
        raise ImageError(f"command line is {len(raw_cmdline) - 1} bytes; this kernel takes at most {limit - 1}")
    mem.write(CMDLINE_ADDR, raw_cmdline)

    bp = bytearray(PAGE)
    bp[BP_SETUP_HEADER : hdr.header_end] = data[BP_SETUP_HEADER : hdr.header_end]
    bp[HDR_TYPE_OF_LOADER] = LOADER_UNDEFINED
    bp[HDR_LOADFLAGS] = (hdr.loadflags | CAN_USE_HEAP | loadflags) & 0xFF
    struct.pack_into("<H", bp, HDR_HEAP_END_PTR, 0xFE00)
    struct.pack_into("<I", bp, HDR_CODE32_START, code32_start)
    struct.pack_into("<I", bp, HDR_CMD_LINE_PTR, CMDLINE_ADDR)

    placed = None
    if initrd is not None:
        try:
            blob = Path(initrd).read_bytes()
        except OSError as e:
            raise ImageError(f"{initrd}: cannot read initrd: {e.strerror}") from None
        ceiling = min(mem.size, (hdr.initrd_addr_max or 0x37FFFFFF) + 1)
        addr = (ceiling - len(blob)) & ~(PAGE - 1)
        if addr < kernel_end:
            raise ImageError(f"{initrd}: initrd of {len(blob) >> 20} MiB does not fit above the kernel in {mem.size >> 20} MiB of guest RAM (--mem)")
        mem.write(addr, blob)
        struct.pack_into("<II", bp, HDR_RAMDISK_IMAGE, addr, len(blob))
        placed = (addr, len(blob))

    entries = e820_map(mem.size)
    bp[BP_E820_ENTRIES] = len(entries)
    for i, (start, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", bp, BP_E820_TABLE + 20 * i, start, size, kind)
    mem.write(BOOT_PARAMS_ADDR, bytes(bp))
    return placed


KVM_CAP_TSC_DEADLINE_TIMER = 72
CPUID1_ECX_TSC_DEADLINE = 1 << 24
CPUID1_ECX_HYPERVISOR = 1 << 31


def tune_cpuid(kvm_fd: int, entries) -> None:
    """Adjust KVM_GET_SUPPORTED_CPUID's table for a Linux guest, in place.

    KVM leaves two bits to the VMM, and both matter to Linux's boot time:
    the hypervisor bit (without it Linux never looks at KVM's leaves, so no
    kvmclock: it calibrates the TSC against the PIT, which is slow and
    noisy nested) and the TSC-deadline timer (KVM emulates it whenever
    KVM_CAP_TSC_DEADLINE_TIMER says so; with it Linux skips calibrating the
    LAPIC timer against the PIT, which fails verification under a nested
    KVM and leaves every CPU on PIT broadcast ticks).
    """
    from vmscope.kvm import abi
    from vmscope.kvm.abi import ioctl

    deadline = ioctl(kvm_fd, abi.KVM_CHECK_EXTENSION, KVM_CAP_TSC_DEADLINE_TIMER, "KVM_CHECK_EXTENSION") > 0
    for e in entries:
        if e.function == 1:
            e.ecx |= CPUID1_ECX_HYPERVISOR | (CPUID1_ECX_TSC_DEADLINE if deadline else 0)


def attach_platform(machine, out) -> None:
    """Give ``machine`` (a KvmMachine being built, before its vCPUs exist)
    the PC around a Linux guest.

    The in-kernel irqchip must exist before the vCPUs: KVM then creates
    every vCPU but the first in the wait-for-SIPI state, and the kernel's
    INIT/SIPI through the in-kernel LAPIC starts them (no VMM exit).
    """
    from vmscope.kvm import abi
    from vmscope.kvm.abi import ioctl
    from vmscope.kvm.boot.acpi import write_tables
    from vmscope.kvm.devices.acpi_pm import AcpiPmEvents, ResetPorts
    from vmscope.kvm.devices.i8042 import I8042
    from vmscope.kvm.devices.irq import IrqLine
    from vmscope.kvm.devices.rtc import CmosRtc
    from vmscope.devices.uart16550 import COM1
    from vmscope.kvm.devices.uart_irq import InterruptingSerial

    ioctl(machine.vm_fd, abi.KVM_CREATE_IRQCHIP, 0, "KVM_CREATE_IRQCHIP")
    ioctl(machine.vm_fd, abi.KVM_CREATE_PIT2, abi.KvmPitConfig(flags=0), "KVM_CREATE_PIT2")
    machine.serial = InterruptingSerial(out, IrqLine(machine.vm_fd, 4))
    machine.bus.register(COM1, 8, machine.serial)
    machine.bus.register(0x70, 2, CmosRtc())
    reset = ResetPorts(machine)
    machine.bus.register(0x60, 1, I8042(reset, data_port=True))
    machine.bus.register(0x64, 1, I8042(reset, data_port=False))
    machine.bus.register(0xCF8, 8, reset)
    machine.bus.register(0x600, 4, AcpiPmEvents())
    rsdp = write_tables(machine.mem, machine.config.cpus)
    machine.mem.write(BOOT_PARAMS_ADDR + BP_ACPI_RSDP_ADDR, struct.pack("<Q", rsdp))
