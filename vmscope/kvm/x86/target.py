"""``KvmTarget``: the GDB stub's view of a :class:`~vmscope.kvm.x86.machine.KvmMachine`.

Threads are vCPUs (tid = index + 1); all-stop: a stop of one vCPU parks
them all (see :mod:`vmscope.kvm.runcontrol`). While one vCPU single-steps, the
others stay parked (as QEMU's and kvmtool's stubs do), whatever the
``vCont`` asked of them; so ``stepi`` never lets another vCPU move.

How each debug feature maps onto KVM, and the quirks of this machine's
software KVM (PVM) it copes with:

- Software breakpoints patch 0xCC into guest RAM (through the memfd) with
  ``KVM_GUESTDBG_USE_SW_BP``. Hardware KVM reports an INT3 as
  ``KVM_EXIT_DEBUG`` (#BP, rip at the 0xCC); PVM reports it as an emulation
  failure (``KVM_EXIT_INTERNAL_ERROR`` suberror 1) with rip at the 0xCC.
  Both paths land in :meth:`KvmTarget._int3`: ours -> ``swbreak`` stop; the
  guest's own -> #BP injected through ``KVM_SET_VCPU_EVENTS`` (after an
  emulation failure rip is first moved past the INT3, since nothing in KVM
  recorded the instruction length). Reads hide our 0xCC bytes.
- Hardware breakpoints use DR0-DR3. RFLAGS.RF is ignored on PVM, so a vCPU
  resumed at an enabled hardware breakpoint first steps one instruction
  with the breakpoints off.
- Watchpoints: debug registers where they fire (hardware KVM, aligned
  1/2/4/8-byte write or access watches, while slots last); on PVM data
  breakpoints never fire for emulated ring-0 stores, so watchpoints are
  backed by page protection: the watched page is mapped read-only (write
  watches) or removed from the memory slots (read/access watches). Guest
  accesses to it then exit as MMIO; the VMM performs the access on the
  memfd, lets KVM finish the instruction (``immediate_exit`` re-entry),
  and reports the stop after it, with the new value in memory, as GDB's
  ``watch`` needs. There is no 4-slot limit. Limits: code must not execute
  from a read/access-watched page, and the page tables must not share it.
  Force a mechanism with ``VMSCOPE_KVM_WATCH=pages`` or ``=debugregs``.

Where each part lives: registers (``registers.py``), memory
(``memaccess.py``), INT3 and debug registers (``breakpoints.py``), page
protection (``pageprot.py``), stepping on protected pages
(``pagestep.py``, ``decode.py``), the mechanism choice (``mechanisms.py``),
``monitor`` (``monitor.py``); this module ties them together with threads
and run control.
"""

from __future__ import annotations

import threading

from vmscope.arch.x86_64 import X86_64
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
from vmscope.kvm import abi
from vmscope.kvm.targetbase import KvmTargetBase
from vmscope.kvm.x86.linux_support import LinuxSupport
from vmscope.kvm.x86.breakpoints import Watch, X86Breakpoints
from vmscope.kvm.x86.mechanisms import DebugMechanisms
from vmscope.kvm.x86.memaccess import X86Memory
from vmscope.kvm.x86.monitor import X86Monitor
from vmscope.kvm.x86.pageprot import X86PageProtection
from vmscope.kvm.x86.pagestep import X86PageStepping
from vmscope.kvm.x86.registers import X86Registers
from vmscope.kvm.x86.translate import Translator
from vmscope.kvm.x86.vcpu import Vcpu

RFLAGS_TF = 1 << 8


class KvmTarget(
    LinuxSupport, X86Registers, X86Memory, X86Breakpoints, X86PageProtection, X86PageStepping, X86Monitor,
    DebugMechanisms, KvmTargetBase, Target, SwBreakpoints, HwBreakpoints, Watchpoints, MonitorCommands,
    AddressTranslation, PhysicalMemory, ThreadNames, TargetFiles,
):
    """The debug target of a :class:`~vmscope.kvm.x86.machine.KvmMachine`
    (``machine``: its run control, vCPU slots, RAM and memory slots)."""

    arch = X86_64
    serves_debugger_from_vcpu = True

    def __init__(self, machine):
        self.m = machine
        self.mem = machine.mem
        self._init_stop_notifier()
        self.translator = Translator(machine.mem)
        self._lock = threading.RLock()  # breakpoint tables (vCPU threads read them)
        self._absent_pages: frozenset[int] = frozenset()
        self.sw: dict[int, InsertedBreakpoint] = {}
        self.hw: dict[int, int] = {}  # exec address -> DR slot
        self.watches: list[Watch] = []
        self.attached = False
        self._stepping: int | None = None  # vCPU index that single-steps
        self._step_over: set[int] = set()  # vCPUs stepping off a hw breakpoint
        self._pending: dict[int, StopEvent] = {}  # unreported watch hits by vCPU
        # Watched writes of vCPUs that lost the race against another stop:
        # held back (the guest thinks they are done) until that vCPU's own
        # hit is reported, so GDB sees each write's old and new value.
        self._deferred_writes: dict[int, list[tuple[int, bytes]]] = {}
        self._write_claimed: dict[int, bool] = {}  # vCPU index -> its MMIO write claimed the stop
        self._msr_cache: dict[int, int] = {}
        self._watchdog = None  # a RunWatchdog, made on the first protected-page step
        self.blocked_steps = 0  # protected-page steps that hit the watchdog's limit
        self._init_mechanisms()
        self._exec_pages: dict[int, int] = {}  # page-backed exec breakpoint -> guest-physical
        self._exec_kind: dict[int, str] = {}  # ... -> "swbreak" | "hwbreak"
        self._skip_exec: dict[int, int] = {}  # vCPU index -> breakpoint it resumes on
        self._protection_dirty = False  # memory slots to rebuild at the next resume (pageprot.py)

    def thread_name(self, tid: int) -> str:
        slot = self.m.vcpus[tid - 1]
        return f"vCPU {tid - 1}" + ("" if slot.online else " (waiting for SIPI)")

    def debug_state(self) -> str:
        return (f"{super().debug_state()}, {len(self._exec_pages)} on pulled pages, "
                f"{len(self.m.slots.protected)} protected pages{', slots to rebuild' if self._protection_dirty else ''}")

    def _apply_debug(self, v: Vcpu, step: bool) -> None:
        """Debug state for a vCPU about to run. A vCPU sitting on an enabled
        hardware breakpoint first steps with the exec breakpoints off
        (RFLAGS.RF is ignored on PVM)."""
        if not self.attached:
            v.set_guest_debug(0)
            return
        control = abi.KVM_GUESTDBG_ENABLE | abi.KVM_GUESTDBG_USE_SW_BP
        with self._lock:
            on_hw_bp = bool(self.hw) and v.regs().rip in self.hw
            regs = self._debugregs(with_exec=not on_hw_bp)
        if regs[7]:
            control |= abi.KVM_GUESTDBG_USE_HW_BP
        if step or on_hw_bp:
            control |= abi.KVM_GUESTDBG_SINGLESTEP | self._step_irq_block()
        if on_hw_bp and not step:
            self._step_over.add(v.index)
        v.set_guest_debug(control, regs)

    def resume(self, actions: ResumeActions) -> None:
        self.attached = True
        if self._protection_dirty:
            with self._lock:
                self._protection_dirty = False
                self._apply_protection()
        if self._post_pending():
            return
        self.translator.clear()
        self._msr_cache.clear()
        self._step_over.clear()
        self._skip_exec.clear()
        if self._exec_pages:
            for slot in self.m.vcpus:
                if slot.online:
                    rip = slot.vcpu.regs().rip
                    if rip in self._exec_pages:
                        self._skip_exec[slot.vcpu.index] = rip
        stepping = [t for t in actions.stepping if 1 <= t <= len(self.m.vcpus)]
        run: dict[int, bool] = {}
        if stepping:
            idx = stepping[0] - 1
            self._stepping = idx
            self._apply_debug(self.m.vcpus[idx].vcpu, step=True)
            run[idx] = True
        else:
            self._stepping = None
            for slot in self.m.vcpus:
                action = actions.action_for(slot.vcpu.index + 1)
                if action is not None and action.kind == "continue" and slot.online:
                    self._apply_debug(slot.vcpu, step=False)
                    run[slot.vcpu.index] = True
        self.m.run_vcpus(run)

    def _post_pending(self) -> bool:
        """Report a watch hit that lost the race against another stop."""
        if not self._pending:
            return False
        idx, ev = self._pending.popitem()
        self._apply_deferred_writes(idx)
        self.notifier.post(ev)
        return True

    def _stop_taken(self) -> None:
        self.prepare_stop()

    def initial_stop(self) -> StopEvent:
        event = super().initial_stop()
        self.start_known_kernel_symbols()  # a directly booted kernel: symbols from the first stop
        return event

    def detach(self) -> None:
        """Drop every breakpoint, watchpoint and debug flag, then let all
        vCPUs run. Works on a running guest too (a vanished client): the
        vCPUs are parked for the clean-up, since vCPU ioctls would block
        until KVM_RUN returns."""
        with self.m.quiesced():
            with self._lock:
                for addr in list(self.sw):
                    self.remove_sw_breakpoint(addr, 1)
                self.hw.clear()
                self.watches.clear()
                self._exec_pages.clear()
                self._exec_kind.clear()
                self._protection_dirty = False
                self._apply_protection()
            self.attached = False
            self.disarm_kernel_entry()
            self._pending.clear()
            self._apply_deferred_writes()
            self._stepping = None
            for slot in self.m.vcpus:
                slot.vcpu.set_guest_debug(0)
        self.resume_all_undebugged()

    def resume_all_undebugged(self) -> None:
        self.translator.clear()
        self.m.run_vcpus({s.vcpu.index: True for s in self.m.vcpus if s.online})
