"""``Arm64KvmTarget``: the GDB stub's view of an :class:`Arm64KvmMachine`.

Threads are vCPUs (tid = index + 1), all-stop; while one vCPU
single-steps the others stay parked, as in the x86 back end.

How each debug feature maps onto arm64 KVM:

- Registers: one KVM_GET/SET_ONE_REG each, read lazily. GDB's ``sp`` is
  the stack pointer in use: SP_EL1 at EL1h, SP_EL0 at EL0 or EL1t
  (KVM keeps both; ``user_pt_regs.sp`` is SP_EL0).
- Software breakpoints: ``BRK #0`` written through the RAM memfd, then
  instruction-cache maintenance (:mod:`.icache`), with
  ``KVM_GUESTDBG_USE_SW_BP`` so BRKs exit to the VMM (EC 0x3C). A BRK that is
  not ours is the guest's own: it is delivered to the guest as the
  synchronous exception it would have taken without a debugger, through
  VBAR_EL1 (ESR_EL1, ELR_EL1, SPSR_EL1 and PSTATE set by hand; KVM has no
  ioctl to inject one). Reads hide our BRKs.
- Hardware breakpoints and watchpoints: DBGBVR/BCR and DBGWVR/WCR values
  in ``KVM_SET_GUEST_DEBUG`` (``KVM_GUESTDBG_USE_HW``); as many as KVM's
  KVM_CAP_GUEST_DEBUG_HW_BPS/WPS say. Both exceptions are taken before the
  instruction completes and arm64 has no resume flag, so continuing from a
  hardware breakpoint first steps over it with the breakpoints off. A
  watchpoint stop is reported before the access; GDB's aarch64 support
  (``have_nonsteppable_watchpoint``) steps over it itself to show the new
  value. Except inside a load/store-exclusive sequence (``ldxr``...
  ``stxr``): any debug exit there clears the exclusive monitor, so the
  store would fail and retry for ever; such a sequence is rerun natively
  from its load-exclusive to just past its store (a temporary hardware
  breakpoint, watchpoints off, one vCPU at a time) and the stop reported
  after the store.
- Single-step: ``KVM_GUESTDBG_SINGLESTEP`` (EC 0x32). IRQ, FIQ and SError
  are masked in PSTATE for the step, so a pending interrupt cannot divert
  it into a vector, and put back afterwards unless the stepped instruction
  itself wrote DAIF (``msr daifset``, ``eret``...); when the step entered an
  exception vector the saved mask goes into SPSR_EL1 instead.
- Virtual addresses: a software walk of TTBR0_EL1/TTBR1_EL1 per TCR_EL1
  (:class:`vmscope.vmi.paging.Aarch64Paging`); KVM_TRANSLATE does not exist
  on arm64. With SCTLR_EL1.M clear addresses are physical.

Where each part lives: registers (``registers.py``), memory
(``memaccess.py``), breakpoint and watchpoint tables (``breakpoints.py``),
debug exits and steps (``debugexits.py``), ``monitor`` (``monitor.py``);
this module ties them together with threads and run control.
"""

from __future__ import annotations

import threading

from vmscope.arch.aarch64 import AARCH64
from vmscope.gdbserver.target import (
    AddressTranslation,
    HwBreakpoints,
    MonitorCommands,
    PhysicalMemory,
    ResumeActions,
    StopEvent,
    SwBreakpoints,
    Target,
    TargetFiles,
    ThreadNames,
    Watchpoints,
)
from vmscope.gdbserver.toolkit import InsertedBreakpoint
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.breakpoints import Arm64Breakpoints, Watch
from vmscope.kvm.arm64.debugexits import Arm64DebugExits, AtomicRun, StepState
from vmscope.kvm.arm64.kernel_entry import Arm64KernelEntry
from vmscope.kvm.arm64.linux_symbols import Arm64LinuxSymbols
from vmscope.kvm.arm64.memaccess import Arm64Memory
from vmscope.kvm.arm64.monitor import Arm64Monitor
from vmscope.kvm.arm64.registers import Arm64Registers
from vmscope.kvm.targetbase import KvmTargetBase
from vmscope.vmi.paging import TranslationCache


class Arm64KvmTarget(
    Arm64Registers, Arm64Memory, Arm64Breakpoints, Arm64DebugExits, Arm64Monitor, Arm64LinuxSymbols,
    Arm64KernelEntry, KvmTargetBase, Target, SwBreakpoints, HwBreakpoints, Watchpoints, MonitorCommands,
    AddressTranslation, PhysicalMemory, ThreadNames, TargetFiles,
):
    arch = AARCH64

    def __init__(self, machine):
        """``machine``: an :class:`~vmscope.kvm.arm64.machine.Arm64KvmMachine`
        (its run control, vCPU slots, RAM and debug slot counts)."""
        self.m = machine
        self.ram = machine.ram
        self._init_stop_notifier()
        self.walks = TranslationCache()
        self._lock = threading.RLock()
        self.sw: dict[int, InsertedBreakpoint] = {}
        self.hw: list[int] = []  # execution breakpoint addresses, one slot each
        self.watches: list[Watch] = []
        self.attached = False
        self._stepping: int | None = None
        self._step_state: dict[int, StepState] = {}
        self._step_over: set[int] = set()
        self._atomic: dict[int, AtomicRun] = {}
        #: watch hits whose access completed while another stop was being
        #: reported; told on the next continue (not on a step: GDB expects
        #: the stepping thread then)
        self._pending: dict[int, StopEvent] = {}

    def thread_name(self, tid: int) -> str:
        return f"vCPU {tid - 1}"

    def resume(self, actions: ResumeActions) -> None:
        self.attached = True
        self.walks.invalidate()
        self._step_over.clear()
        for idx, run in self._atomic.items():  # stopped by another vCPU's stop meanwhile
            v = self.m.vcpus[idx].vcpu
            if not run.done and v.pc == run.end and (run.status_reg == 31 or v.core(abi.CORE_X0 + 8 * run.status_reg) & 0xFFFF_FFFF == 0):
                self._pending[idx] = run.event  # stored just before the stop: tell it
        self._atomic.clear()
        stepping = [t for t in actions.stepping if 1 <= t <= len(self.m.vcpus)]
        if self._pending and not stepping:
            _, event = self._pending.popitem()
            self.notifier.post(event)
            return
        run: dict[int, bool] = {}
        if stepping:
            v = self.m.vcpus[stepping[0] - 1].vcpu
            self._stepping = v.index
            self._mask_for_step(v)
            self._apply_debug(v, step=True)
            run[v.index] = True
        else:
            self._stepping = None
            for slot in self.m.vcpus:
                action = actions.action_for(slot.vcpu.index + 1)
                if action is not None and action.kind == "continue":
                    self._apply_debug(slot.vcpu, step=False)
                    run[slot.vcpu.index] = True
        self.m.run_vcpus(run)

    def _stop_taken(self) -> None:
        self.prepare_stop()  # the kernel's symbol file starts building at a stop (Arm64LinuxSymbols)

    def detach(self) -> None:
        """Put every patched instruction back, drop all debug state and let
        every vCPU run (a running guest is parked for the clean-up)."""
        with self.m.quiesced():
            with self._lock:
                for addr in list(self.sw):
                    self.remove_sw_breakpoint(addr, 4)
                self.hw.clear()
                self.watches.clear()
            self.attached = False
            self.disarm_kernel_entry()
            self._pending.clear()
            self._stepping = None
            for slot in self.m.vcpus:
                self._restore_daif(slot.vcpu)
                slot.vcpu.set_guest_debug(0)
        self.walks.invalidate()
        self.m.run_vcpus({s.vcpu.index: True for s in self.m.vcpus})
