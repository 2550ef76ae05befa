"""EmuMachine: a whole emulated computer behind :class:`vmscope.machine.Machine`.

It runs where /dev/kvm is missing or unusable, so ``vmscope run`` (and the
tests) have a full debug target on any machine. Layouts follow QEMU so the
same ELF boots under both:

- x86_64: RAM from 0, a 16550 at I/O port 0x3f8, power-off by SLP_EN at
  port 0x604 and an exit device at port 0xf4 (byte N ends the machine with
  status N), as in vmscope's KVM VMM. A PVH ELF is loaded and started as
  the KVM target starts it (``vmscope.devices.pvh``): CPU 0 (every CPU
  when the image carries vmscope's all-CPUs note) at the 32-bit entry,
  ``ebx`` = hvm_start_info; the other CPUs wait for an INIT/SIPI that never
  comes. An ELF without a PVH note starts every CPU at its ELF entry in
  long mode (first 1 GiB identity-mapped by tables below 512 KiB).
- aarch64: RAM from 0x40000000 (QEMU virt), a PL011 at 0x09000000, PSCI
  through hvc/smc (SYSTEM_OFF ends the machine with status 0). Every
  CPU starts at the ELF entry at EL1h, MMU off, with MPIDR_EL1.Aff0 = its
  index (trapped ``mrs``: separate Unicorn instances all say CPU 0).
"""

from __future__ import annotations

import threading
from pathlib import Path

from unicorn import UC_HOOK_INSN
from unicorn import arm64_const as A
from unicorn import x86_const as X

from vmscope.devices.console import ConsoleInput, SerialSink
from vmscope.devices.elf import load_elf
from vmscope.devices.pl011 import Pl011
from vmscope.devices.pvh import BootPlan, has_pvh_entry, load_pvh
from vmscope.devices.ram import GuestRam
from vmscope.devices.uart16550 import Serial16550
from vmscope.emu.cpus import BOOT_AREA, CPU_CLASSES, Arm64Cpu, EmuCpu, X86Cpu, x86_write_boot_tables
from vmscope.emu.target import EmuTarget
from vmscope.gdbserver.target import ResumeAction, ResumeActions
from vmscope.machine import ImageError, MachineConfig

RAM_BASE = {"x86_64": 0, "aarch64": 0x4000_0000}
EXIT_PORT = 0xF4  # test guests: "out N" ends the machine with status N
PM1A_CNT, PM1_SLP_EN = 0x604, 1 << 13  # ACPI power-off, as the KVM VMM has
MAX_CPUS = 64


def _default_kernel(arch: str) -> Path:
    from vmscope.guests import guest_elf

    return guest_elf("demo", arch)


class EmuMachine:
    """Guest RAM, devices and one Unicorn CPU per vCPU, plus its EmuTarget."""

    def __init__(self, config: MachineConfig) -> None:
        if config.arch not in CPU_CLASSES:
            raise ValueError(f"unsupported --arch {config.arch!r} for the emulated target; choose x86_64 or aarch64")
        if not 1 <= config.cpus <= MAX_CPUS:
            raise ValueError(f"--cpus {config.cpus}: the emulated target runs 1 to {MAX_CPUS} CPUs")
        if config.mem_mib < 2:
            raise ValueError(f"--mem {config.mem_mib} MiB is too small: the emulated target needs at least 2 MiB")
        if config.initrd is not None:
            raise ImageError(f"{config.initrd}: the emulated target boots bare-metal ELF guests only (no initrd)")
        self.config = config
        self.kernel = Path(config.kernel) if config.kernel is not None else _default_kernel(config.arch)
        self.ram = GuestRam(RAM_BASE[config.arch], config.mem_mib << 20, name="vmscope-emu-ram")
        self.serial = SerialSink(config.serial_out)
        try:
            self.cpus: list[EmuCpu] = [CPU_CLASSES[config.arch](i, self.ram) for i in range(config.cpus)]
            self._load(config)
        except BaseException:
            self.ram.close()
            raise
        if config.arch == "x86_64":
            self.uart = Serial16550(self.serial)
            for cpu in self.cpus:
                cpu.uc.hook_add(UC_HOOK_INSN, self._port_in, cpu, 1, 0, X.UC_X86_INS_IN)
                cpu.uc.hook_add(UC_HOOK_INSN, self._port_out, cpu, 1, 0, X.UC_X86_INS_OUT)
        else:
            self.uart = Pl011(self.serial)
            for cpu in self.cpus:
                cpu.uc.mmio_map(self.uart.base, Pl011.SIZE, self._mmio_read, None, self._mmio_write, None)
                cpu.uc.hook_add(UC_HOOK_INSN, self._mrs, cpu, 1, 0, A.UC_ARM64_INS_MRS)
        self.target = EmuTarget(self.cpus, self.ram, self.cpus[0].arch)
        self._input = None
        self._started = False
        self._shut = threading.Event()

    def _load(self, config: MachineConfig) -> None:
        """Load the image and put every CPU in its start state: the PVH
        entry state for a PVH ELF, else the ELF entry (in long mode on x86)."""
        if config.arch == "x86_64" and has_pvh_entry(self.kernel):
            plan: BootPlan = load_pvh(self.kernel, self.ram, config.append)
            for cpu in self.cpus:
                assert isinstance(cpu, X86Cpu)
                cpu.reset_pvh32(plan.entry, plan.start_info, plan.boot_stack)
                cpu.parked = cpu.index > 0 and not plan.all_cpus_at_entry
            return
        if config.arch == "x86_64":
            lo, hi = BOOT_AREA
            reserved = ((lo, hi - lo, "the emulated x86_64 target keeps its GDT, page tables and boot stacks"),)
            image = load_elf(self.kernel, config.arch, self.ram, reserved)
            x86_write_boot_tables(self.ram)
        else:
            image = load_elf(self.kernel, config.arch, self.ram)
        for cpu in self.cpus:
            cpu.reset(image.entry)

    # --- devices -------------------------------------------------------------

    def _port_in(self, uc, port: int, size: int, _data) -> int:
        return self.uart.read(port, size) if self.uart.handles(port) else (1 << (8 * size)) - 1

    def _port_out(self, uc, port: int, size: int, value: int, cpu: EmuCpu) -> None:
        if self.uart.handles(port):
            self.uart.write(port, size, value)
        elif port == EXIT_PORT:
            self.target.request_exit(cpu, value & 0xFF)
        elif port == PM1A_CNT and value & PM1_SLP_EN:
            self.target.request_exit(cpu, 0)

    def _mmio_read(self, uc, offset: int, size: int, _data) -> int:
        return self.uart.read(offset)

    def _mmio_write(self, uc, offset: int, size: int, value: int, _data) -> None:
        self.uart.write(offset, value)

    @staticmethod
    def _mrs(uc, reg: int, cp, cpu: Arm64Cpu) -> int:
        return 1 if cpu.emulate_mrs(reg, cp) else 0

    # --- Machine protocol ----------------------------------------------------

    def start(self, paused: bool = False) -> None:
        if self._started:
            raise RuntimeError("machine already started")
        self._started = True
        if self.config.serial_in is not None:
            from vmscope.devices.console import ConsoleInput  # the KVM VMM's console, Ctrl-A x included

            self._input = ConsoleInput(self.config.serial_in, self.uart.feed, self.target.kill)
            self._input.start()
        if not paused:
            self.target.resume(ResumeActions(default=ResumeAction("continue")))

    def debug_target(self) -> EmuTarget:
        return self.target

    def wait(self, timeout: float | None = None) -> int | None:
        if self.target.exited.wait(timeout):
            return self.target.exit_status
        return None

    def shutdown(self) -> None:
        if self._shut.is_set():
            return
        self._shut.set()
        if self._input is not None:
            self._input.stop()
        self.target.close()
        self.ram.close_fd()  # the Unicorn instances keep the mapping itself
        try:
            self.serial.out.flush()
        except (OSError, ValueError):
            pass
