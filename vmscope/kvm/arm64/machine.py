"""``Arm64KvmMachine``: vmscope's micro-VMM on an arm64 host's KVM.

Two kinds of guest, told apart by the file:

- an ELF is a bare-metal guest (the demo): the guest-visible machine follows
  QEMU's ``virt`` board so the same ELF runs under both: RAM from
  0x40000000, a PL011 at 0x09000000 (an MMIO exit per access; only DR and
  FR matter to a polling driver), PSCI 0.2 served by KVM itself through
  ``hvc`` (SYSTEM_OFF ends the VM with status 0). No GIC: those guests poll.
- anything else is a Linux ``Image`` (gzip'd or not): the platform of
  :mod:`vmscope.kvm.arm64.platform` (in-kernel GIC and timer, a 16550 with
  its interrupt, a device tree in x0; loader in :mod:`.image`).

Every vCPU is set up with ``KVM_ARM_PREFERRED_TARGET`` then
``KVM_ARM_VCPU_INIT``, which resets it to EL1h with DAIF masked and the MMU
off; MPIDR_EL1.Aff0 is set to the vCPU index (KVM's own reset value
only carries the low 4 bits there). Guests whose ELF carries vmscope's
"every CPU starts at the entry" note (the demo) start all vCPUs at the entry;
others start vCPU 0 and power the rest off (``KVM_ARM_VCPU_POWER_OFF``) for
the guest to start with PSCI CPU_ON, as on real firmware.

Run control is :class:`vmscope.kvm.runcontrol.RunControl`, the same as
the x86 machine's (crosvm/kvmtool style); this module supplies the machine
and its ``handle_exit`` hook.
"""

from __future__ import annotations

import contextlib
import os
import platform
import sys
from pathlib import Path

from vmscope.devices.console import SerialSink
from vmscope.devices.elf import load_elf
from vmscope.devices.pl011 import Pl011
from vmscope.devices.ram import GuestRam
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.abi import ioctl
from vmscope.kvm.arm64.exits import UART_BASE, Arm64Exits
from vmscope.kvm.arm64.platform import LinuxPlatform, is_linux_image
from vmscope.kvm.arm64.target import Arm64KvmTarget
from vmscope.kvm.arm64.vcpu import Arm64Vcpu
from vmscope.kvm.arm64.virtual_time import StopHider
from vmscope.kvm.runcontrol import PAUSE_NOTICE_SECONDS, RunControl, VcpuSlot
from vmscope.kvm.slots import MemorySlots
from vmscope.kvm.system import check_extension, create_vm, require_capabilities
from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

RAM_BASE = 0x4000_0000
MAX_CPUS = 64


def host_is_arm64() -> bool:
    return platform.machine() in ("aarch64", "arm64")


def starts_all_cpus(path: Path) -> bool:
    """Does the ELF carry vmscope's note (name "vmscope", type 1) saying
    every CPU starts at the entry?"""
    from elftools.elf.elffile import ELFFile
    from elftools.elf.sections import NoteSection

    with open(path, "rb") as f:
        for sec in ELFFile(f).iter_sections():
            if isinstance(sec, NoteSection):
                for note in sec.iter_notes():
                    # pyelftools names type 1 after GNU's note of that number
                    if note["n_name"] == "vmscope" and note["n_type"] in (1, "NT_GNU_ABI_TAG"):
                        return True
    return False


class Arm64KvmMachine(Arm64Exits, RunControl):
    """An arm64 KVM virtual machine implementing :class:`vmscope.machine.Machine`."""

    def __init__(self, config: MachineConfig | None = None):
        self.config = config = config or MachineConfig(arch="aarch64")
        if config.arch != "aarch64":
            raise MachineUnavailable(f"the arm64 KVM back end runs aarch64 guests, not {config.arch}")
        if not host_is_arm64():
            raise MachineUnavailable(f"arm64 KVM needs an arm64 host; this one is {platform.machine()} "
                                     "(use --accel emu, or the arm64 lab)")
        if not 1 <= config.cpus <= MAX_CPUS:
            raise ValueError(f"--cpus must be 1..{MAX_CPUS}, got {config.cpus}")
        if config.mem_mib < 2:
            raise ValueError(f"guest memory must be at least 2 MiB, got {config.mem_mib} MiB")
        self._init_run_control()
        self.ram: GuestRam | None = None
        self.stop_hider: StopHider | None = None  # takes long debug stops off the virtual counter
        self.linux: LinuxPlatform | None = None
        self._open_and_create(config, missing_hint="boot the kernel at EL2, or use --accel emu")
        self.target = Arm64KvmTarget(self)

    def _create(self, config: MachineConfig) -> None:
        kvm = self.kvm_fd
        require_capabilities(kvm, ((kvm_abi.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"),
                                   (kvm_abi.KVM_CAP_SET_GUEST_DEBUG, "guest debug"),
                                   (abi.KVM_CAP_ARM_PSCI_0_2, "PSCI 0.2")))
        self.vm_fd = create_vm(kvm)
        #: hardware breakpoint and watchpoint slots KVM offers the debugger
        self.hw_bp_slots = check_extension(self.vm_fd, abi.KVM_CAP_GUEST_DEBUG_HW_BPS)
        self.hw_wp_slots = check_extension(self.vm_fd, abi.KVM_CAP_GUEST_DEBUG_HW_WPS)
        self.ram = GuestRam(RAM_BASE, config.mem_mib << 20, name="vmscope-arm64-ram")
        self.slots = MemorySlots(self.vm_fd, self.ram.host_address, RAM_BASE, self.ram.size)
        self.slots.map_ram()

        kernel = Path(config.kernel) if config.kernel is not None else _demo_guest()
        self.kernel_path = kernel
        out = config.serial_out if config.serial_out is not None else sys.stdout.buffer
        if is_linux_image(kernel):
            self.linux = LinuxPlatform(self.vm_fd, self.ram, kernel, config.initrd, config.append,
                                       config.cpus, out)
            self.serial = self.linux.serial
            self.uart = None
            entry, all_at_entry, x0 = self.linux.layout.entry, False, self.linux.layout.fdt_addr
        else:
            if config.initrd is not None:
                raise ImageError(f"{config.initrd}: an initrd goes with a Linux Image; {kernel} is an ELF "
                                 "(a bare-metal guest)")
            self.image = load_elf(kernel, "aarch64", self.ram)
            all_at_entry = starts_all_cpus(kernel)
            entry, x0 = self.image.entry, 0  # no device tree
            self.serial = SerialSink(out)
            self.uart = Pl011(self.serial, UART_BASE)

        preferred = abi.KvmVcpuInit()
        ioctl(self.vm_fd, abi.KVM_ARM_PREFERRED_TARGET, preferred, "KVM_ARM_PREFERRED_TARGET")
        mmap_size = ioctl(kvm, kvm_abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        for i in range(config.cpus):
            online = i == 0 or all_at_entry
            init = abi.KvmVcpuInit(target=preferred.target)
            init.features[0] = 1 << abi.KVM_ARM_VCPU_PSCI_0_2 | (0 if online else 1 << abi.KVM_ARM_VCPU_POWER_OFF)
            v = Arm64Vcpu(self.vm_fd, i, mmap_size, init)
            # Online for run control even when powered off: KVM blocks its
            # KVM_RUN until PSCI CPU_ON, and a stop must kick it out.
            self.vcpus.append(VcpuSlot(v, online=True))
            v.set_core(abi.CORE_PC, entry)
            v.set_core(abi.CORE_X0, x0)
            mpidr = v.sys("MPIDR_EL1")
            with contextlib.suppress(OSError):  # older KVMs keep their own value
                v.set_sys("MPIDR_EL1", (mpidr & ~0xFF_00FF_FFFF) | (i & 0xFF))
        with contextlib.suppress(OSError):  # no counter to read: stops are not hidden
            self.stop_hider = StopHider([s.vcpu for s in self.vcpus])
        if self.linux is not None:
            # the cpu nodes' reg must be each vCPU's MPIDR affinity, whichever value KVM kept
            self.linux.finish([s.vcpu.sys("MPIDR_EL1") & 0xFF_00FF_FFFF for s in self.vcpus])
            self._coalesce_console(mmap_size)

    def guest_was_held(self, seconds: float) -> None:
        """A stop of PAUSE_NOTICE_SECONDS or more is taken off the virtual
        counter (:mod:`vmscope.kvm.arm64.virtual_time`), so Linux does not
        report the held time as soft lockups or RCU stalls."""
        if seconds >= PAUSE_NOTICE_SECONDS and self.stop_hider is not None:
            with contextlib.suppress(OSError):  # a KVM that refuses the write: the guest sees the time
                self.stop_hider.stop_ended(seconds)

    def _coalesce_console(self, mmap_size: int) -> None:
        """Queue the UART's character writes in KVM's coalesced-MMIO ring
        (as the x86 machine does for COM1's port): each console character
        then costs one exit (the status read), not two. Without the
        capability every write exits."""
        from vmscope.kvm.devices.coalesced import CoalescedPorts

        try:
            self.coalesced = CoalescedPorts(self.kvm_fd, self.vm_fd, self.vcpus[0].vcpu.fd, mmap_size,
                                            self.serial.write, pio=False, machine_stopped=lambda: self.stopped)
        except OSError:
            return
        self.serial.use_coalescing(self.coalesced)

    def flush_console(self) -> None:
        if self.coalesced is not None and self.coalesced.active:
            with contextlib.suppress(ValueError, OSError):
                self.coalesced.drain()

    # --- Machine protocol ----------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        self.start_console_input(self.config.serial_in, (self.uart or self.serial).feed)
        self.start_vcpu_threads(paused)

    def release_resources(self) -> None:
        if self.linux is not None:
            with contextlib.suppress(OSError):
                os.close(self.linux.vgic.fd)
        if self.ram is not None:
            self.ram.close()


def _demo_guest() -> Path:
    try:
        from vmscope.guests import guest_elf
    except ImportError:
        raise ImageError("no kernel given and the embedded demo guest (vmscope.guests) is not available") from None
    return guest_elf("demo", "aarch64")
