"""``Arm64KvmMachine``: vmscope's micro-VMM on an arm64 host's KVM.

The guest-visible machine follows QEMU's ``virt`` board so the same ELF runs
under both: RAM from 0x40000000, a PL011 at 0x09000000 (an MMIO exit per
access; only DR and FR matter to a polling driver), PSCI 0.2 served by KVM
itself through ``hvc`` (SYSTEM_OFF ends the VM with status 0). No GIC: the
bare-metal guests vmscope boots poll.

Every vCPU is set up with ``KVM_ARM_PREFERRED_TARGET`` then
``KVM_ARM_VCPU_INIT``, which resets it to EL1h with DAIF masked and the MMU
off; MPIDR_EL1.Aff0 is set to the vCPU index (KVM's own reset value
only carries the low 4 bits there). Guests whose ELF carries vmscope's
"every CPU starts at the entry" note (the demo) start all vCPUs at the entry;
others start vCPU 0 and power the rest off (``KVM_ARM_VCPU_POWER_OFF``) for
the guest to start with PSCI CPU_ON, as on real firmware.

Run control is the x86 VMM's (crosvm/kvmtool style): vCPU threads loop
"park until allowed -> KVM_RUN -> handle the exit"; a stop clears every
``runnable`` flag, sets ``immediate_exit`` and signals the threads out of
KVM_RUN; the last vCPU to park posts the stop.
"""

from __future__ import annotations

import contextlib
import os
import platform
import signal
import sys
import threading
from pathlib import Path

from vmscope.devices.console import SerialSink
from vmscope.devices.elf import load_elf
from vmscope.devices.pl011 import Pl011
from vmscope.devices.ram import GuestRam
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.abi import KvmUserspaceMemoryRegion
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.abi import ioctl
from vmscope.kvm.arm64.vcpu import Arm64Vcpu
from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

KVM_DEVICE = "/dev/kvm"
RAM_BASE = 0x4000_0000
UART_BASE = 0x0900_0000
KICK_SIGNAL = signal.SIGRTMIN + 2  # as the x86 VMM: one handler serves both
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


def _install_kick_handler() -> None:
    """KVM_RUN returns EINTR on a signal only if the signal has a handler
    (the default action would kill the process)."""
    if signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineUnavailable("the first KVM machine must be created in the main thread "
                                 f"(it installs the vCPU kick handler for signal {int(KICK_SIGNAL)})")
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def open_kvm() -> int:
    try:
        fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MachineUnavailable(f"{KVM_DEVICE} does not exist: this arm64 host has no KVM "
                                 "(boot the kernel at EL2, or use --accel emu)") from None
    except OSError as e:
        raise MachineUnavailable(f"{KVM_DEVICE}: {e.strerror}") from None
    version = ioctl(fd, kvm_abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    if version != 12:
        os.close(fd)
        raise MachineUnavailable(f"{KVM_DEVICE}: KVM API version {version}, vmscope needs 12")
    return fd


class VcpuSlot:
    """A vCPU plus its run-control flags (guarded by the machine's lock)."""

    def __init__(self, vcpu: Arm64Vcpu, online: bool):
        self.vcpu = vcpu
        self.online = online  # False: powered off until PSCI CPU_ON (KVM runs it then)
        self.runnable = False
        self.parked = True
        self.thread: threading.Thread | None = None


class Arm64KvmMachine:
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
        if config.initrd is not None:
            raise ImageError(f"{config.initrd}: the arm64 KVM back end boots bare-metal ELF guests only (no initrd)")
        self._cond = threading.Condition()
        self._status: int | None = None
        self._ending = False
        self._stopped = True
        self._stop_event = None
        self._closed = False
        self.vcpus: list[VcpuSlot] = []
        self.kvm_fd = open_kvm()
        self.vm_fd: int | None = None
        self.ram: GuestRam | None = None
        self._input = None
        try:
            self._create(config)
        except BaseException:
            self._release()
            raise
        from vmscope.kvm.arm64.target import Arm64KvmTarget

        self.target = Arm64KvmTarget(self)

    def _create(self, config: MachineConfig) -> None:
        kvm = self.kvm_fd
        for cap, what in ((kvm_abi.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"),
                          (kvm_abi.KVM_CAP_SET_GUEST_DEBUG, "guest debug"),
                          (abi.KVM_CAP_ARM_PSCI_0_2, "PSCI 0.2")):
            if ioctl(kvm, kvm_abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION") <= 0:
                raise MachineUnavailable(f"{KVM_DEVICE} lacks the {what} capability vmscope needs")
        try:
            self.vm_fd = ioctl(kvm, kvm_abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        except OSError as e:
            raise MachineUnavailable(f"{KVM_DEVICE}: cannot create a VM: {e}") from None
        #: hardware breakpoint and watchpoint slots KVM offers the debugger
        self.hw_bp_slots = max(0, ioctl(self.vm_fd, kvm_abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_GUEST_DEBUG_HW_BPS, "KVM_CHECK_EXTENSION"))
        self.hw_wp_slots = max(0, ioctl(self.vm_fd, kvm_abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_GUEST_DEBUG_HW_WPS, "KVM_CHECK_EXTENSION"))
        self.ram = GuestRam(RAM_BASE, config.mem_mib << 20, name="vmscope-arm64-ram")
        region = KvmUserspaceMemoryRegion(slot=0, flags=0, guest_phys_addr=RAM_BASE,
                                          memory_size=self.ram.size, userspace_addr=self.ram.host_address)
        ioctl(self.vm_fd, kvm_abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

        kernel = Path(config.kernel) if config.kernel is not None else _demo_guest()
        self.kernel_path = kernel
        self.image = load_elf(kernel, "aarch64", self.ram)
        all_at_entry = starts_all_cpus(kernel)

        self.serial = SerialSink(config.serial_out if config.serial_out is not None else sys.stdout.buffer)
        self.uart = Pl011(self.serial, UART_BASE)

        preferred = abi.KvmVcpuInit()
        ioctl(self.vm_fd, abi.KVM_ARM_PREFERRED_TARGET, preferred, "KVM_ARM_PREFERRED_TARGET")
        mmap_size = ioctl(kvm, kvm_abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        for i in range(config.cpus):
            online = i == 0 or all_at_entry
            init = abi.KvmVcpuInit(target=preferred.target)
            init.features[0] = 1 << abi.KVM_ARM_VCPU_PSCI_0_2 | (0 if online else 1 << abi.KVM_ARM_VCPU_POWER_OFF)
            v = Arm64Vcpu(self.vm_fd, i, mmap_size, init)
            self.vcpus.append(VcpuSlot(v, online))
            v.set_core(abi.CORE_PC, self.image.entry)
            v.set_core(abi.CORE_X0, 0)  # no device tree
            mpidr = v.sys("MPIDR_EL1")
            with contextlib.suppress(OSError):  # older KVMs keep their own value
                v.set_sys("MPIDR_EL1", (mpidr & ~0xFF_00FF_FFFF) | (i & 0xFF))

    # --- Machine protocol ----------------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        _install_kick_handler()
        if self.config.serial_in is not None:
            from vmscope.devices.console import ConsoleInput

            self._input = ConsoleInput(self.config.serial_in, self.uart.feed, lambda: self.end(0, None))
            self._input.start()
        with self._cond:
            self._stopped = paused
            for slot in self.vcpus:
                # A powered-off vCPU still runs KVM_RUN: KVM blocks it until CPU_ON.
                slot.runnable = not paused
                slot.thread = threading.Thread(target=self._vcpu_loop, args=(slot,),
                                               name=f"vcpu{slot.vcpu.index}", daemon=True)
                slot.thread.start()

    def debug_target(self):
        return self.target

    def wait(self, timeout: float | None = None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self._status is not None, timeout)
            return self._status

    def shutdown(self) -> None:
        self.end(None, None)
        for slot in self.vcpus:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(timeout=5)
        if self._input is not None:
            self._input.stop()
        self._release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self.vcpus:
            if slot.thread is None or not slot.thread.is_alive():
                slot.vcpu.close()
        for fd in (self.vm_fd, self.kvm_fd):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        if self.ram is not None:
            self.ram.close()

    def end(self, status: int | None, report: str | None) -> None:
        """End the VM with ``status`` (None: torn down by the host)."""
        with self._cond:
            if self._ending:
                return
            self._ending = True
            self._status = status if status is not None else (self._status or 0)
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked()
            self._cond.notify_all()
        if report:
            print(f"vmscope: {report}", file=sys.stderr, flush=True)
        if status is not None and hasattr(self, "target"):
            self.target.guest_ended(status)

    @property
    def ending(self) -> bool:
        return self._ending

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def stop_pending(self) -> bool:
        """A stop is requested or reported: vCPUs are parking or parked."""
        return self._stop_event is not None or self._stopped or self._ending

    # --- run control --------------------------------------------------------------------

    def _kick_locked(self) -> None:
        for slot in self.vcpus:
            slot.vcpu.run.immediate_exit = 1
            t = slot.thread
            if not slot.parked and t is not None and t.ident is not None and t.is_alive():
                with contextlib.suppress(ProcessLookupError, OSError):
                    signal.pthread_kill(t.ident, KICK_SIGNAL)

    def _maybe_post_locked(self) -> None:
        if self._stop_event is not None and all(s.parked for s in self.vcpus):
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
            ev, self._stop_event = self._stop_event, None
            self._stopped = True
            self.target.post_stop(ev)

    def request_stop(self, event, keep_if_busy=None) -> None:
        """Stop every vCPU, then report ``event``; the first stop wins and
        ``keep_if_busy`` gets a later one the caller must not lose."""
        with self._cond:
            if self._ending:
                return
            if self._stop_event is not None or self._stopped:
                if keep_if_busy is not None:
                    keep_if_busy(event)
                return
            self._stop_event = event
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked()
            self._maybe_post_locked()

    def pause_quietly(self, timeout: float = 10.0) -> None:
        """Park every vCPU without reporting a stop (detach on a running
        guest: vCPU ioctls would otherwise wait for KVM_RUN to return)."""
        with self._cond:
            if self._stopped or self._ending:
                return
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked()
            self._cond.wait_for(lambda: all(s.parked for s in self.vcpus) or self._ending, timeout)
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
            self._stopped = True

    def run_vcpus(self, which: dict[int, bool]) -> None:
        with self._cond:
            if self._ending:
                return
            self._stopped = not any(which.values())
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
                slot.runnable = which.get(slot.vcpu.index, False)
            self._cond.notify_all()

    def _park(self, slot: VcpuSlot) -> bool:
        with self._cond:
            if slot.runnable and not self._ending:
                slot.parked = False
                return True
            slot.parked = True
            self._maybe_post_locked()
            self._cond.notify_all()
            while not slot.runnable and not self._ending:
                self._cond.wait()
            slot.parked = False
            return not self._ending

    def _vcpu_loop(self, slot: VcpuSlot) -> None:
        v = slot.vcpu
        try:
            while self._park(slot):
                if v.enter():
                    self._handle_exit(v)
        except Exception as e:  # a bug or a dead fd: end the VM, loudly
            if not self._ending:
                self.end(1, f"vCPU {v.index} thread failed: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                slot.parked = True
                self._maybe_post_locked()
                self._cond.notify_all()

    # --- exits --------------------------------------------------------------------------

    def _handle_exit(self, v: Arm64Vcpu) -> None:
        reason = v.run.exit_reason
        if reason == kvm_abi.KVM_EXIT_MMIO:
            self._mmio(v)
        elif reason == kvm_abi.KVM_EXIT_DEBUG:
            self.target.on_debug_exit(v)
        elif reason == kvm_abi.KVM_EXIT_SYSTEM_EVENT:
            kind = v.run.exit.system_event.type
            if kind in (abi.KVM_SYSTEM_EVENT_SHUTDOWN, abi.KVM_SYSTEM_EVENT_RESET):
                self.end(0, None)
            else:
                self._fatal(v, f"system event {kind}")
        elif reason == kvm_abi.KVM_EXIT_FAIL_ENTRY:
            self._fatal(v, "VM entry failed")
        else:
            self._fatal(v, f"unhandled exit {kvm_abi.EXIT_NAMES.get(reason, reason)}")

    def _mmio(self, v: Arm64Vcpu) -> None:
        """The PL011; elsewhere outside RAM reads as 0 and writes are dropped."""
        mmio = v.run.exit.mmio
        n = min(mmio.len, 8)
        offset = mmio.phys_addr - UART_BASE
        in_uart = 0 <= offset < Pl011.SIZE
        if mmio.is_write:
            if in_uart:
                self.uart.write(offset, int.from_bytes(bytes(mmio.data[:n]), "little"))
        else:
            value = self.uart.read(offset) if in_uart else 0
            for i, b in enumerate(value.to_bytes(8, "little")[:n]):
                mmio.data[i] = b

    def _fatal(self, v: Arm64Vcpu, why: str) -> None:
        self.end(1, f"guest stopped: {why}; {v.summary()}")


def _demo_guest() -> Path:
    try:
        from vmscope.guests import guest_elf
    except ImportError:
        raise ImageError("no kernel given and the embedded demo guest (vmscope.guests) is not available") from None
    return guest_elf("demo", "aarch64")
