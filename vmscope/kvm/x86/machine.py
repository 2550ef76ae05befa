"""``KvmMachine``: the x86 micro-VMM, a KVM VM with guest RAM, vCPU threads
and port devices.

Run control (vCPU threads, debug stops, exclusive turns, the end) is the
architecture-neutral :class:`vmscope.kvm.runcontrol.RunControl`; exits are
served by :class:`vmscope.kvm.x86.exits.X86Exits`. This module builds the
machine: capabilities, RAM and memory slots, the boot plan, devices, vCPUs
with CPUID and their entry state.

Guest-visible machine: RAM from 0, COM1 16550 on stdio, port 0x604 (ACPI
PM1a control: writing SLP_EN powers off, exit status 0) and port 0xf4 (an
"exit device": writing byte N ends the VM with status N, for test guests).
Other ports read as 0xff..ff and ignore writes. Linux guests (bzImage) get
the PC platform of :func:`vmscope.kvm.boot.linux.attach_platform`.
"""

from __future__ import annotations

import ctypes
import errno
import sys

from vmscope.kvm import abi
from vmscope.kvm.abi import KvmIoctlError, ioctl
from vmscope.devices.ram import GuestRam
from vmscope.devices.uart16550 import COM1, Serial16550
from vmscope.kvm.boot import BootPlan, load_kernel
from vmscope.kvm.devices.bus import PortBus
from vmscope.kvm.runcontrol import PAUSE_NOTICE_SECONDS, RunControl, VcpuSlot
from vmscope.kvm.slots import MemorySlots
from vmscope.kvm.system import KICK_SIGNAL, KVM_DEVICE, check_extension, create_vm, open_kvm, require_capabilities
from vmscope.kvm.x86.exits import EXIT_PORT, PM1A_CNT, ExitPort, PowerPort, X86Exits
from vmscope.kvm.x86.target import KvmTarget
from vmscope.kvm.x86.vcpu import Vcpu
from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

__all__ = ["KICK_SIGNAL", "KVM_DEVICE", "KvmMachine", "open_kvm"]

TSS_ADDR = 0xFFFBD000
CR0_PE, CR0_ET, CR0_NE, CR0_PG = 1, 1 << 4, 1 << 5, 1 << 31
CR4_PAE = 1 << 5
EFER_LME, EFER_LMA = 1 << 8, 1 << 10


class KvmMachine(X86Exits, RunControl):
    """A KVM virtual machine implementing :class:`vmscope.machine.Machine`."""

    def __init__(self, config: MachineConfig | None = None):
        self.config = config = config or MachineConfig()
        if config.arch != "x86_64":
            raise MachineUnavailable(f"the KVM back end runs x86_64 guests only, not {config.arch}")
        if config.cpus < 1 or config.cpus > 64:
            raise ValueError(f"--cpus must be 1..64, got {config.cpus}")
        self._init_run_control()
        self._held_seconds = 0.0  # held at debug stops since the guest was last told (guest_was_held)
        self.mem: GuestRam | None = None
        self._storm = None
        self._open_and_create(config)
        self.target = KvmTarget(self)

    # --- construction ---------------------------------------------------------

    def _coalesce_console(self, mmap_size: int) -> None:
        """Queue the console's character writes in KVM instead of exiting
        for each (vmscope.kvm.devices.coalesced); without the capability
        every write exits, as before."""
        from vmscope.kvm.devices.coalesced import CoalescedPorts

        try:
            self.coalesced = CoalescedPorts(self.kvm_fd, self.vm_fd, self.vcpus[0].vcpu.fd, mmap_size, self.bus.write,
                                            machine_stopped=lambda: self.stopped)
        except OSError:
            return
        attach = getattr(self.serial, "use_coalescing", None)
        if attach is not None:
            attach(self.coalesced)

    def flush_console(self) -> None:
        """Replay console writes KVM still holds (before a report, at the end)."""
        if self.coalesced is not None and self.coalesced.active:
            try:
                self.coalesced.drain()
            except (ValueError, OSError):
                pass

    def _create(self, config: MachineConfig) -> None:
        kvm = self.kvm_fd
        require_capabilities(kvm, ((abi.KVM_CAP_USER_MEMORY, "user memory"), (abi.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"),
                                   (abi.KVM_CAP_SET_GUEST_DEBUG, "guest debug")))
        self.readonly_mem = check_extension(kvm, abi.KVM_CAP_READONLY_MEM) > 0
        # KVM_GUESTDBG_* flags beyond the basic ones (BLOCKIRQ: Linux 5.15+); 0 where unknown
        self.guest_debug_flags = check_extension(kvm, abi.KVM_CAP_SET_GUEST_DEBUG2)
        self.vm_fd = create_vm(kvm)
        try:
            ioctl(self.vm_fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
        except OSError:
            pass  # only VMX needs it; software KVM and SVM may refuse
        if config.mem_mib < 2:
            raise ValueError(f"guest memory must be at least 2 MiB, got {config.mem_mib} MiB")
        self.mem = GuestRam(0, config.mem_mib << 20)
        self.slots = MemorySlots(self.vm_fd, self.mem.host_address, 0, self.mem.size)
        self.slots.map_ram()
        kernel = config.kernel
        if kernel is None:
            kernel = _demo_guest()
        self.kernel_path = kernel
        self.plan: BootPlan = load_kernel(kernel, self.mem, config.append, config.initrd, config.boot)

        self.bus = PortBus()
        out = config.serial_out if config.serial_out is not None else sys.stdout.buffer
        if self.plan.linux:
            from vmscope.kvm.boot.linux import attach_platform

            attach_platform(self, out)  # irqchip + PIT (before the vCPUs), COM1 on IRQ 4, RTC, ACPI
        else:
            self.serial = Serial16550(out)
            self.bus.register(COM1, 8, self.serial)
        self.bus.register(EXIT_PORT, 1, ExitPort(self))
        self.bus.register(PM1A_CNT, 2, PowerPort(self))

        mmap_size = ioctl(kvm, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        cpuid = self._supported_cpuid()
        if cpuid is not None:
            from vmscope.kvm.x86.xsave_probe import fit_cpuid_to_kvm

            fit_cpuid_to_kvm(self.kvm_fd, cpuid)  # XSAVE hidden where KVM cannot follow XCR0
        if cpuid is not None and self.plan.linux:
            from vmscope.kvm.boot.linux import tune_cpuid

            tune_cpuid(self.kvm_fd, cpuid)  # hypervisor bit (kvmclock, PV features), TSC-deadline timer
        for i in range(config.cpus):
            v = Vcpu(self.vm_fd, i, mmap_size)
            self.vcpus.append(VcpuSlot(v))
            if cpuid is not None:
                _set_apic_id(cpuid, i)
                try:
                    v.set_cpuid(cpuid)
                except OSError:
                    pass
        self._coalesce_console(mmap_size)
        if self.plan.linux:  # test guests may loop on a port on purpose (exit benchmarks)
            from vmscope.kvm.devices.storm import ExitStormDetector

            self._storm = ExitStormDetector(config.cpus)

    def _supported_cpuid(self):
        for n in (100, 200, 400):
            s = abi.cpuid2_struct(n)()
            s.nent = n
            try:
                ioctl(self.kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, s, "KVM_GET_SUPPORTED_CPUID")
            except KvmIoctlError as e:
                if e.errno == errno.E2BIG:
                    continue
                return None
            arr = (abi.KvmCpuidEntry2 * s.nent)()
            ctypes.memmove(arr, s.entries, ctypes.sizeof(arr))
            return arr
        return None

    def _setup_vcpu_state(self, v: Vcpu, plan: BootPlan) -> None:
        s = v.sregs()
        flat_code = dict(base=0, limit=0xFFFFFFFF, selector=0x10, type=0xB, present=1, dpl=0, db=1, s=1, l=0, g=1)
        flat_data = dict(flat_code, selector=0x18, type=0x3)
        for name in ("cs",):
            _set_seg(getattr(s, name), flat_code)
        for name in ("ds", "es", "fs", "gs", "ss"):
            _set_seg(getattr(s, name), flat_data)
        _set_seg(s.tr, dict(base=0, limit=0x67, selector=0x20, type=0xB, present=1, dpl=0, db=0, s=0, l=0, g=0))
        s.cr0 = 0x11  # PE | ET: protected mode, paging off
        s.cr3 = s.cr4 = s.efer = 0
        if plan.mode == "linux64":  # long mode on the VMM's identity map (vmscope.kvm.boot.vmlinux)
            lm = plan.long_mode
            _set_seg(s.cs, dict(flat_code, db=0, l=1))
            s.gdt.base, s.gdt.limit = lm.gdt_base, lm.gdt_limit
            s.cr3, s.cr4 = lm.cr3, CR4_PAE
            s.efer = EFER_LME | EFER_LMA
            s.cr0 = CR0_PE | CR0_ET | CR0_NE | CR0_PG
        v.set_sregs(s)
        r = abi.KvmRegs(rip=plan.entry, rbx=plan.start_info, rsp=plan.boot_stack, rflags=0x2)
        if plan.linux:  # the Linux boot protocol: esi = boot_params, ebx = 0
            r.rsi, r.rbx = plan.start_info, 0
        v.set_regs(r)

    # --- Machine protocol -------------------------------------------------------

    def guest_was_held(self, seconds: float) -> None:
        """Once held for PAUSE_NOTICE_SECONDS in all, kvmclock's "guest
        stopped" flag on every vCPU (``KVM_KVMCLOCK_CTRL``, as QEMU sets it
        at each resume), so Linux's soft-lockup watchdog and RCU stall
        detector do not report the held time; the guest's clock still
        shows the real time. Short stops add up: single-stepping for a
        minute holds the guest as long as one long stop."""
        self._held_seconds += seconds
        if self._held_seconds >= PAUSE_NOTICE_SECONDS:
            self._held_seconds = 0.0
            for slot in self.vcpus:
                slot.vcpu.guest_paused()

    def debug_target(self) -> KvmTarget:
        """The stub's target. A debugger will attach: when the VMM placed the
        kernel itself (direct boot), its symbols are built from now on, in
        the background, so they are ready by gdb's first request (GDB gives
        a reply 2 s)."""
        self.target.start_known_kernel_symbols()
        return self.target

    def start(self, paused: bool = False) -> None:
        for slot in self.vcpus:
            v = slot.vcpu
            if v.index == 0 or self.plan.all_cpus_at_entry:
                self._setup_vcpu_state(v, self.plan)
                slot.online = True
            elif self.plan.linux:
                slot.online = True  # in KVM_RUN, waiting in the kernel for the guest's INIT/SIPI
        self.start_console_input(self.config.serial_in, self.serial.feed)
        self.start_vcpu_threads(paused)

    def release_resources(self) -> None:
        if self.mem is not None:
            self.mem.close()


def _set_seg(seg: abi.KvmSegment, fields: dict) -> None:
    for k, val in fields.items():
        setattr(seg, k, val)
    seg.unusable = 0


def _set_apic_id(cpuid, index: int) -> None:
    for e in cpuid:
        if e.function == 1:
            e.ebx = (e.ebx & 0x00FFFFFF) | (index << 24)
        elif e.function in (0xB, 0x1F):
            e.edx = index


def _demo_guest():
    try:
        from vmscope.guests import guest_elf
    except ImportError:
        raise ImageError("no kernel given and the embedded demo guest (vmscope.guests) is not available") from None
    return guest_elf("demo", "x86_64")
