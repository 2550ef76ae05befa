"""The micro-VMM: a KVM VM with guest RAM, vCPU threads and port devices.

Run control (how a debug stop pauses every vCPU, as crosvm and kvmtool do):
each vCPU thread loops "park until allowed to run -> KVM_RUN -> handle the
exit". To stop them all, the stopper clears every vCPU's ``runnable`` flag,
sets ``kvm_run.immediate_exit`` (so a thread about to enter KVM_RUN returns
at once) and sends the thread a signal (so a thread inside KVM_RUN returns
with EINTR). The last vCPU to park posts the pending stop event, so the
debugger only ever sees a machine whose vCPUs are all parked.

Guest-visible machine: RAM from 0, COM1 16550 on stdio, port 0x604 (ACPI
PM1a control: writing SLP_EN powers off, exit status 0) and port 0xf4 (an
"exit device": writing byte N ends the VM with status N, for test guests).
Other ports read as 0xff..ff and ignore writes.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import sys
import threading
from typing import Callable

from vmscope.kvm import abi
from vmscope.kvm.abi import KvmIoctlError, ioctl
from vmscope.kvm.boot import BootPlan, load_kernel
from vmscope.kvm.devices.bus import PortBus
from vmscope.devices.uart16550 import COM1, Serial16550
from vmscope.devices.ram import GuestRam
from vmscope.kvm.vcpu import Vcpu
from vmscope.machine import ImageError, MachineConfig, MachineUnavailable

KVM_DEVICE = "/dev/kvm"
KICK_SIGNAL = signal.SIGRTMIN + 2
TSS_ADDR = 0xFFFBD000
EXIT_PORT = 0xF4
PM1A_CNT = 0x604
PM1_SLP_EN = 1 << 13


def _install_kick_handler() -> None:
    """The kick signal needs a handler (the default action would kill the
    process); the handler does nothing, its only job is to make KVM_RUN
    return EINTR. Python only lets the main thread install handlers."""
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return
    if threading.current_thread() is not threading.main_thread():
        raise MachineUnavailable(
            "the first KvmMachine must be created in the main thread "
            f"(it installs the vCPU kick handler for signal {int(KICK_SIGNAL)})"
        )
    signal.signal(KICK_SIGNAL, lambda signum, frame: None)


def _reset_state_note(v: Vcpu) -> str:
    """On AMD SVM, KVM resets the vCPU before it reports a shutdown (the
    VMCB is undefined after one), so the registers read afterwards are the
    reset state (rip 0xfff0, cs 0xf000), not the faulting ones: say so
    rather than let a report point at the reset vector."""
    try:
        if v.regs().rip == 0xFFF0 and v.sregs().cs.selector == 0xF000:
            return ("; KVM reset this vCPU before reporting the fault (AMD SVM does), so the registers "
                    "below are its reset state, not where it faulted")
    except OSError:
        pass
    return ""


def open_kvm(path: str = KVM_DEVICE) -> int:
    """Open /dev/kvm and check the API version; MachineUnavailable says why not."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise MachineUnavailable(f"{path} does not exist: this host has no KVM (load kvm-intel/kvm-amd, or use the emulated target)") from None
    except PermissionError:
        raise MachineUnavailable(f"{path}: permission denied (add your user to the 'kvm' group)") from None
    except OSError as e:
        raise MachineUnavailable(f"{path}: cannot open: {e.strerror}") from None
    try:
        version = ioctl(fd, abi.KVM_GET_API_VERSION, 0, "KVM_GET_API_VERSION")
    except OSError as e:
        os.close(fd)
        raise MachineUnavailable(f"{path}: not a KVM device ({e})") from None
    if version != 12:
        os.close(fd)
        raise MachineUnavailable(f"{path}: KVM API version {version}, vmscope needs 12")
    return fd


class VcpuSlot:
    """A vCPU plus its run-control flags (guarded by the machine's lock)."""

    def __init__(self, vcpu: Vcpu):
        self.vcpu = vcpu
        self.runnable = False
        self.parked = True
        self.online = False  # False: waiting for INIT/SIPI, never runs
        self.thread: threading.Thread | None = None


class KvmMachine:
    """A KVM virtual machine implementing :class:`vmscope.machine.Machine`."""

    def __init__(self, config: MachineConfig | None = None):
        self.config = config = config or MachineConfig()
        if config.arch != "x86_64":
            raise MachineUnavailable(f"the KVM back end runs x86_64 guests only, not {config.arch}")
        if config.cpus < 1 or config.cpus > 64:
            raise ValueError(f"--cpus must be 1..64, got {config.cpus}")
        self._cond = threading.Condition()
        self._status: int | None = None
        self._ending = False
        self._stop_event = None  # event waiting for every vCPU to park
        self._stopped = True
        self._exclusive: VcpuSlot | bool | None = None
        self._generation = 0
        self._stops_posted = 0
        self._closed = False
        self._fds: list[int] = []
        self.mem: GuestRam | None = None
        self.vcpus: list[VcpuSlot] = []
        self.kvm_fd = open_kvm()
        self._fds.append(self.kvm_fd)
        try:
            self._create(config)
        except BaseException:
            self._release()
            raise
        from vmscope.kvm.debug import KvmTarget

        self.target = KvmTarget(self)

    # --- construction ---------------------------------------------------------

    def _coalesce_console(self, mmap_size: int) -> None:
        """Queue the console's character writes in KVM instead of exiting
        for each (vmscope.kvm.devices.coalesced); without the capability
        every write exits, as before."""
        from vmscope.kvm.devices.coalesced import CoalescedPorts

        try:
            self.coalesced = CoalescedPorts(self.kvm_fd, self.vm_fd, self.vcpus[0].vcpu.fd, mmap_size, self.bus.write)
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
        for cap, name in ((abi.KVM_CAP_USER_MEMORY, "user memory"), (abi.KVM_CAP_IMMEDIATE_EXIT, "immediate exit"), (abi.KVM_CAP_SET_GUEST_DEBUG, "guest debug")):
            if ioctl(kvm, abi.KVM_CHECK_EXTENSION, cap, "KVM_CHECK_EXTENSION") <= 0:
                raise MachineUnavailable(f"{KVM_DEVICE} lacks the {name} capability vmscope needs")
        self.readonly_mem = ioctl(kvm, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_READONLY_MEM, "KVM_CHECK_EXTENSION") > 0
        # KVM_GUESTDBG_* flags beyond the basic ones (BLOCKIRQ: Linux 5.15+); 0 where unknown
        self.guest_debug_flags = max(0, ioctl(kvm, abi.KVM_CHECK_EXTENSION, abi.KVM_CAP_SET_GUEST_DEBUG2,
                                              "KVM_CHECK_EXTENSION"))
        try:
            self.vm_fd = ioctl(kvm, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
        except OSError as e:
            raise MachineUnavailable(f"{KVM_DEVICE}: cannot create a VM: {e}") from None
        self._fds.append(self.vm_fd)
        try:
            ioctl(self.vm_fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
        except OSError:
            pass  # only VMX needs it; software KVM and SVM may refuse
        if config.mem_mib < 2:
            raise ValueError(f"guest memory must be at least 2 MiB, got {config.mem_mib} MiB")
        self.mem = GuestRam(0, config.mem_mib << 20)
        self.slots = MemorySlots(self)
        self.slots.map_ram()
        kernel = config.kernel
        if kernel is None:
            kernel = _demo_guest()
        self.kernel_path = kernel
        self.plan: BootPlan = load_kernel(kernel, self.mem, config.append, config.initrd)

        self.bus = PortBus()
        out = config.serial_out if config.serial_out is not None else sys.stdout.buffer
        if self.plan.mode == "linux32":
            from vmscope.kvm.boot.linux import attach_platform

            attach_platform(self, out)  # irqchip + PIT (before the vCPUs), COM1 on IRQ 4, RTC, ACPI
        else:
            self.serial = Serial16550(out)
            self.bus.register(COM1, 8, self.serial)
        self.bus.register(EXIT_PORT, 1, _ExitPort(self))
        self.bus.register(PM1A_CNT, 2, _PowerPort(self))

        mmap_size = ioctl(kvm, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
        cpuid = self._supported_cpuid()
        if cpuid is not None and self.plan.mode == "linux32":
            from vmscope.kvm.boot.linux import tune_cpuid

            tune_cpuid(self.kvm_fd, cpuid)  # hypervisor bit (kvmclock, PV features), TSC-deadline timer
        for i in range(config.cpus):
            v = Vcpu(self.vm_fd, i, mmap_size)
            self._fds.append(v.fd)
            self.vcpus.append(VcpuSlot(v))
            if cpuid is not None:
                _set_apic_id(cpuid, i)
                try:
                    v.set_cpuid(cpuid)
                except OSError:
                    pass
        self._input = None
        self._storm = None
        self.coalesced = None
        self._coalesce_console(mmap_size)
        if self.plan.mode == "linux32":  # test guests may loop on a port on purpose (exit benchmarks)
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
        v.set_sregs(s)
        r = abi.KvmRegs(rip=plan.entry, rbx=plan.start_info, rsp=plan.boot_stack, rflags=0x2)
        if plan.mode == "linux32":  # the Linux boot protocol: esi = boot_params, ebx = 0
            r.rsi, r.rbx = plan.start_info, 0
        v.set_regs(r)

    # --- Machine protocol ---------------------------------------------------------

    def start(self, paused: bool = False) -> None:
        _install_kick_handler()
        for slot in self.vcpus:
            v = slot.vcpu
            if v.index == 0 or self.plan.all_cpus_at_entry:
                self._setup_vcpu_state(v, self.plan)
                slot.online = True
            elif self.plan.mode == "linux32":
                slot.online = True  # in KVM_RUN, waiting in the kernel for the guest's INIT/SIPI
        if self.config.serial_in is not None:
            from vmscope.devices.console import ConsoleInput

            self._input = ConsoleInput(self.config.serial_in, self.serial.feed, lambda: self.end(0, None))
            self._input.start()
        with self._cond:
            self._stopped = paused
            for slot in self.vcpus:
                slot.runnable = slot.online and not paused
                slot.thread = threading.Thread(target=self._vcpu_loop, args=(slot,), name=f"vcpu{slot.vcpu.index}", daemon=True)
                slot.thread.start()

    def debug_target(self):
        return self.target

    def wait(self, timeout: float | None = None) -> int | None:
        with self._cond:
            self._cond.wait_for(lambda: self._status is not None, timeout)
            return self._status

    @property
    def status(self) -> int | None:
        return self._status

    def shutdown(self) -> None:
        self.end(None, None)
        for slot in self.vcpus:
            if slot.thread is not None and slot.thread is not threading.current_thread():
                slot.thread.join(timeout=5)
        if self._input is not None:
            self._input.stop()
        if self.coalesced is not None:
            self.coalesced.close()
        self._release()

    def _release(self) -> None:
        if self._closed:
            return
        self._closed = True
        for slot in self.vcpus:
            if slot.thread is None or not slot.thread.is_alive():
                slot.vcpu.close()
        for fd in (self.kvm_fd, getattr(self, "vm_fd", None)):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        if self.mem is not None:
            self.mem.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()

    # --- ending -----------------------------------------------------------------

    def end(self, status: int | None, report: str | None) -> None:
        """End the VM with ``status`` (None: torn down by the host, no
        status); ``report`` is the one-line reason printed on stderr."""
        with self._cond:
            if self._ending:
                return
            self._ending = True
            if status is not None:
                self._status = status
            elif self._status is None:
                self._status = 0
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked()
            self._cond.notify_all()
        self.flush_console()
        if report:
            print(f"vmscope: {report}", file=sys.stderr, flush=True)
        if status is not None:
            self.target.guest_ended(status)

    @property
    def ending(self) -> bool:
        return self._ending

    # --- run control ----------------------------------------------------------------

    def _kick_locked(self) -> None:
        for slot in self.vcpus:
            slot.vcpu.run.immediate_exit = 1
            if not slot.parked and slot.thread is not None and slot.thread.ident is not None and slot.thread.is_alive():
                try:
                    signal.pthread_kill(slot.thread.ident, KICK_SIGNAL)
                except (ProcessLookupError, OSError):
                    pass

    def _all_parked_locked(self) -> bool:
        return all(slot.parked or not slot.online for slot in self.vcpus)

    def _maybe_post_locked(self) -> None:
        if self._stop_event is not None and self._all_parked_locked():
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
            ev, self._stop_event = self._stop_event, None
            self._stopped = True
            self._stops_posted += 1
            self.target.post_stop(ev)

    def request_stop(self, event, keep_if_busy: Callable | None = None) -> bool:
        """Stop every vCPU, then report ``event`` to the debugger.

        If a stop is already under way, or the machine is already stopped,
        the first event wins; ``keep_if_busy`` is called with ours (under the
        lock, so nothing can interleave) so the caller may keep it for later
        (events that will not happen again). True when ours won.
        """
        with self._cond:
            if self._ending:
                return False
            if self._stop_event is not None or self._stopped:
                if keep_if_busy is not None:
                    keep_if_busy(event)
                return False
            self._stop_event = event
            for slot in self.vcpus:
                slot.runnable = False
            self._kick_locked()
            self._maybe_post_locked()
            return True

    def run_vcpus(self, which: dict[int, bool]) -> None:
        """Let the listed vCPU indexes run (the debug target has already
        applied their debug state)."""
        with self._cond:
            if self._ending:
                return
            self._stopped = False
            self._generation += 1  # wakes idle (halted) vCPUs: a debugger resumed them
            for slot in self.vcpus:
                slot.vcpu.run.immediate_exit = 0
                slot.runnable = slot.online and which.get(slot.vcpu.index, False)
            if not any(slot.runnable for slot in self.vcpus):
                self._stopped = True
            self._cond.notify_all()

    def quiesced(self):
        """Park every vCPU for the body when the guest is running (for
        changes that must not happen under a running vCPU: memory slots,
        vCPU ioctls, which would block until KVM_RUN returns); nothing to
        do when the machine is already stopped."""
        if self._stopped or self._ending:
            return contextlib.nullcontext()
        return self.exclusive(None)

    @contextlib.contextmanager
    def exclusive(self, v: Vcpu | None):
        """Run the body with every other vCPU parked: for the debug target's
        one-instruction steps with a watched page briefly mapped (changing
        memory slots under a running vCPU can make PVM shut the guest down,
        and the others must not touch the page unwatched meanwhile). A vCPU
        waiting here counts as parked, so two of them cannot deadlock.
        Yields False (body must do nothing) when a debug stop came first."""
        me = self.vcpus[v.index] if v is not None else None
        others = [s for s in self.vcpus if s is not me]
        with self._cond:
            stops_before = self._stops_posted
            if me is not None:
                me.parked = True
                self._maybe_post_locked()
                self._cond.notify_all()
            while self._exclusive is not None and not self._ending:
                self._cond.wait()
            if me is not None:
                me.parked = False
                # While we waited (counted as parked) a debug stop may have
                # been reported and the debugger may have changed breakpoints,
                # registers or memory: the vCPU must re-run the instruction.
                if (self._stops_posted != stops_before or self._stop_event is not None
                        or self._stopped or not me.runnable or self._ending):
                    yield False
                    return
            self._exclusive = me or True
            saved = {id(s): s.runnable for s in others}
            for s in others:
                s.runnable = False
                s.vcpu.run.immediate_exit = 1
                if not s.parked and s.thread is not None and s.thread.ident is not None:
                    try:
                        signal.pthread_kill(s.thread.ident, KICK_SIGNAL)
                    except (ProcessLookupError, OSError):
                        pass
            while not all(s.parked or not s.online for s in others) and not self._ending:
                self._cond.wait()
        try:
            yield True
        finally:
            with self._cond:
                self._exclusive = None
                if self._stop_event is None and not self._stopped and not self._ending:
                    for s in others:
                        s.vcpu.run.immediate_exit = 0
                        s.runnable = saved[id(s)]
                self._cond.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopped

    def _park(self, slot: VcpuSlot) -> bool:
        """Wait until this vCPU may run; False when the VM is ending."""
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

    def _idle(self, slot: VcpuSlot) -> None:
        """A vCPU halted with interrupts on: nothing can wake it (no
        interrupt controller yet), so it waits, counted as parked, until a
        debugger resumes the machine (then it runs on past the HLT)."""
        with self._cond:
            slot.parked = True
            self._maybe_post_locked()
            generation = self._generation
            while slot.runnable and generation == self._generation and not self._ending:
                self._cond.wait()
            slot.parked = False

    def _vcpu_loop(self, slot: VcpuSlot) -> None:
        v = slot.vcpu
        try:
            while self._park(slot):
                if not v.enter():
                    continue
                self._handle_exit(slot)
        except Exception as e:  # a bug or a dead fd: end the VM, loudly
            if not self._ending:
                self.end(1, f"vCPU {v.index} thread failed: {type(e).__name__}: {e}")
        finally:
            with self._cond:
                slot.parked = True
                self._maybe_post_locked()
                self._cond.notify_all()

    # --- exits --------------------------------------------------------------------

    def _handle_exit(self, slot: VcpuSlot) -> None:
        v = slot.vcpu
        run = v.run
        reason = run.exit_reason
        if self.target.watching_for_kernel:  # kernel symbols are built as soon as the kernel runs
            self.target.on_exit_watch(v)
        coalesced = self.coalesced
        if coalesced is not None and coalesced.active:
            # Writes KVM queued come first; port exits are served under the
            # ring's lock so the drain thread cannot interleave with them.
            with coalesced.lock:
                if coalesced.drain() and self._storm is not None:
                    self._storm.reset()  # queued writes were exits too: no run of one port
                if reason == abi.KVM_EXIT_IO:
                    self._handle_io(v)
                    return
        if reason == abi.KVM_EXIT_IO:
            self._handle_io(v)
        elif reason == abi.KVM_EXIT_MMIO:
            self.target.on_mmio(v)
        elif reason == abi.KVM_EXIT_DEBUG:
            self.target.on_debug_exit(v)
        elif reason == abi.KVM_EXIT_INTERNAL_ERROR:
            if not self.target.on_internal_error(v):
                self._fatal(v, f"emulation failure ({_internal_error_text(run)})")
        elif reason == abi.KVM_EXIT_HLT:
            if v.regs().rflags & 0x200:
                self._idle(slot)
            else:
                self._fatal(v, "halted with interrupts off")
        elif reason == abi.KVM_EXIT_SHUTDOWN:
            self._fatal(v, "triple fault (shutdown exit)" + _reset_state_note(v))
        elif reason in (abi.KVM_EXIT_X86_WRMSR, abi.KVM_EXIT_X86_RDMSR):
            self.target.on_msr_exit(v)  # an MSR filter of the debug target
        elif reason == abi.KVM_EXIT_SYSTEM_EVENT:
            self.end(0, None)
        elif reason == abi.KVM_EXIT_FAIL_ENTRY:
            self._fatal(v, f"VM entry failed (hardware reason {run.exit.fail_entry.hardware_entry_failure_reason:#x})")
        else:
            self._fatal(v, f"unhandled exit {abi.EXIT_NAMES.get(reason, reason)}")

    def handle_exit_of(self, v: Vcpu) -> None:
        """Handle the exit ``v`` just took (for the debug target's nested
        KVM_RUN while it completes an emulated access)."""
        self._handle_exit(self.vcpus[v.index])

    def _fatal(self, v: Vcpu, why: str) -> None:
        self.flush_console()
        report = f"guest stopped: {why}; {v.summary()}"
        tail = getattr(self.serial, "console_tail", None)  # Linux guests' COM1 keeps the last lines
        if tail is not None and tail():
            report += "\nlast console lines:\n  " + "\n  ".join(tail()[-20:])
        self.end(1, report)

    def _handle_io(self, v: Vcpu) -> None:
        io = v.run.exit.io
        if self._storm is not None:
            storm = self._storm.io(v.index, io.port, io.direction == abi.KVM_EXIT_IO_OUT)
            if storm:
                self._fatal(v, storm)
                return
        base = ctypes.addressof(v.run) + io.data_offset
        size = io.size
        for i in range(io.count):
            addr = base + i * size
            if io.direction == abi.KVM_EXIT_IO_OUT:
                value = int.from_bytes(ctypes.string_at(addr, size), "little")
                self.bus.write(io.port, size, value)
            else:
                value = self.bus.read(io.port, size)
                ctypes.memmove(addr, value.to_bytes(size, "little"), size)


class MemorySlots:
    """KVM memory slots over the one RAM memfd.

    Normally one slot covers all RAM. Watchpoints that debug registers cannot
    serve split it: the watched page gets a read-only slot (write watches)
    or no slot at all (read/access watches), so guest accesses exit to the
    VMM as MMIO. Slot 0 and up are rebuilt from the protected-page set on
    every change, which is cheap (a handful of ioctls per watchpoint edit).
    """

    def __init__(self, machine: KvmMachine):
        self.m = machine
        self.active: int = 0  # slots currently defined
        self.protected: dict[int, str] = {}  # page number -> "readonly" | "absent"

    def map_ram(self) -> None:
        self._rebuild()

    def set_protection(self, protected: dict[int, str]) -> None:
        if protected != self.protected:
            self.protected = dict(protected)
            self._rebuild()

    def _set(self, slot: int, gpa: int, size: int, flags: int) -> None:
        mem = self.m.mem
        region = abi.KvmUserspaceMemoryRegion(slot=slot, flags=flags, guest_phys_addr=gpa, memory_size=size, userspace_addr=mem.host_address + gpa if size else 0)
        ioctl(self.m.vm_fd, abi.KVM_SET_USER_MEMORY_REGION, region, "KVM_SET_USER_MEMORY_REGION")

    def _rebuild(self) -> None:
        from vmscope.devices.ram import PAGE

        size = self.m.mem.size
        pieces: list[tuple[int, int, int]] = []  # gpa, size, flags
        cursor = 0
        for page in sorted(self.protected):
            start = page * PAGE
            if start >= size:
                continue
            if start > cursor:
                pieces.append((cursor, start - cursor, 0))
            if self.protected[page] == "readonly":
                pieces.append((start, PAGE, abi.KVM_MEM_READONLY))
            cursor = start + PAGE
        if cursor < size:
            pieces.append((cursor, size - cursor, 0))
        # Delete old slots first: KVM refuses overlapping slots.
        for slot in range(self.active):
            self._set(slot, 0, 0, 0)
        for slot, (gpa, sz, flags) in enumerate(pieces):
            self._set(slot, gpa, sz, flags)
        self.active = len(pieces)


class _ExitPort:
    def __init__(self, m: KvmMachine):
        self.m = m

    def read(self, port: int, size: int) -> int:
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        status = value & 0xFF
        self.m.end(status, None if status == 0 else f"guest wrote exit status {status} to port {port:#x}")


class _PowerPort:
    def __init__(self, m: KvmMachine):
        self.m = m

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        if value & PM1_SLP_EN:
            self.m.end(0, None)


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


def _internal_error_text(run: abi.KvmRun) -> str:
    ie = run.exit.internal
    if ie.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
        ef = run.exit.emulation_failure
        if ie.ndata >= 2 and ef.flags & 1 and ef.insn_size:
            insn = bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
            return f"instruction bytes {insn.hex(' ')}"
        return "emulator gave up"
    return f"internal error suberror {ie.suberror}"


def _demo_guest():
    try:
        from vmscope.guests import guest_elf
    except ImportError:
        raise ImageError("no kernel given and the embedded demo guest (vmscope.guests) is not available") from None
    return guest_elf("demo", "x86_64")
