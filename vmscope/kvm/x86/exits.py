"""How the x86 machine serves its vCPUs' exits: port I/O to the port bus
(after the coalesced console writes KVM queued), MMIO, debug exits and MSR
filter exits to the debug target, halts, shutdowns and failures as reports.

Why a mixin of :class:`~vmscope.kvm.x86.machine.KvmMachine`: this is the
``handle_exit`` hook of :class:`vmscope.kvm.runcontrol.RunControl`, kept
apart from the machine's construction so each reads on its own.
"""

from __future__ import annotations

import ctypes

from vmscope.kvm import abi
from vmscope.kvm.runcontrol import VcpuSlot
from vmscope.kvm.x86.vcpu import Vcpu

EXIT_PORT = 0xF4
PM1A_CNT = 0x604
PM1_SLP_EN = 1 << 13


class X86Exits:
    """Needs ``self.target``, ``self.bus``, ``self.serial``, ``self.coalesced``,
    ``self._storm`` and RunControl's ``end``/``idle``/``flush_console``."""

    def handle_exit(self, slot: VcpuSlot) -> None:
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
                self.idle(slot)  # no interrupt controller can wake it: wait for the debugger
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


class ExitPort:
    """Port 0xf4: writing byte N ends the VM with status N (test guests)."""

    def __init__(self, m):
        self.m = m

    def read(self, port: int, size: int) -> int:
        return 0xFF

    def write(self, port: int, size: int, value: int) -> None:
        status = value & 0xFF
        self.m.end(status, None if status == 0 else f"guest wrote exit status {status} to port {port:#x}")


class PowerPort:
    """ACPI PM1a control: writing SLP_EN powers off, exit status 0."""

    def __init__(self, m):
        self.m = m

    def read(self, port: int, size: int) -> int:
        return 0

    def write(self, port: int, size: int, value: int) -> None:
        if value & PM1_SLP_EN:
            self.m.end(0, None)


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


def _internal_error_text(run: abi.KvmRun) -> str:
    ie = run.exit.internal
    if ie.suberror == abi.KVM_INTERNAL_ERROR_EMULATION:
        ef = run.exit.emulation_failure
        if ie.ndata >= 2 and ef.flags & 1 and ef.insn_size:
            insn = bytes(ef.insn_bytes[: min(ef.insn_size, 15)])
            return f"instruction bytes {insn.hex(' ')}"
        return "emulator gave up"
    return f"internal error suberror {ie.suberror}"
