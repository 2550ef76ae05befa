"""Debug exits of the arm64 KVM target (vCPU threads): BRK (ours -> a stop;
the guest's own -> delivered through VBAR_EL1), single steps with DAIF
masked, hardware breakpoints, and watchpoints, including those inside a
load/store-exclusive sequence, which is rerun natively to its end.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmscope.gdbserver.target import SIGTRAP, StopEvent
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.arm64 import abi
from vmscope.gdbserver.toolkit import WATCH_STOP_KIND
from vmscope.kvm.arm64.debugarch import (
    bcr_value,
    brk_esr,
    bvr_value,
    changes_daif,
    decode_esr,
    exclusive_sequence,
    is_brk,
    watch_covers,
)
from vmscope.kvm.arm64.vcpu import Arm64Vcpu

STEP_MASK = abi.PSTATE_A | abi.PSTATE_I | abi.PSTATE_F
VECTOR_TABLE_SIZE = 0x800


@dataclass
class AtomicRun:
    """A watchpoint hit inside a load/store-exclusive sequence, being
    completed by rerunning the sequence natively up to ``end``."""

    event: StopEvent
    start: int
    end: int
    status_reg: int
    tries: int = 0
    done: bool = False


@dataclass
class StepState:
    """DAIF bits masked for a single step, and the instruction stepped."""

    saved: int
    insn: int | None
    vbar: int

class Arm64DebugExits:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: debug exits and single steps."""

    def on_debug_exit(self, v: Arm64Vcpu) -> None:
        dbg = v.run.exit.debug
        ex = decode_esr(dbg.hsr)
        tid = v.index + 1
        if ex.cause == "brk":
            self._brk(v, ex.comment or 0)
        elif ex.cause == "step":
            if v.index in self._step_over:  # stepped off a hardware breakpoint: go on
                self._step_over.discard(v.index)
                self._apply_debug(v, step=False)
                return
            self._restore_daif(v)
            if self._stepping == v.index:
                self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))
            else:
                self._apply_debug(v, step=False)
        elif ex.cause == "hw-breakpoint":
            if self.on_entry_break(v):
                return
            run = self._atomic.get(v.index)
            if run is not None and not run.done and v.pc == run.end:
                self._atomic_done(v)
                return
            self.m.request_stop(StopEvent("hwbreak", tid=tid))
        elif ex.cause == "watchpoint":
            with self._lock:
                hit = next((w for w in self.watches for wvr, wcr in w.regs if watch_covers(wvr, wcr, dbg.far)), None)
                hit = hit or (self.watches[0] if self.watches else None)
            if hit is None:
                self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))
                return
            # A hit that loses the race against another vCPU's stop is simply
            # dropped: the exception came before the access, so the vCPU
            # runs into it again when resumed.
            event = StopEvent(WATCH_STOP_KIND[hit.kind], tid=tid, addr=hit.addr)
            seq = exclusive_sequence(v.pc, lambda a: self._insn_at(v, a))
            if seq is not None and self.m.hw_bp_slots > 0:
                # One vCPU at a time completes its sequence, and none once a
                # stop is on its way: a second store before the debugger looks
                # would skip a value. The others' stores have not happened
                # (the exception comes first), so they just hit again later.
                with self._lock:
                    if self._atomic or self.m.stop_pending:
                        return
                    self._atomic[v.index] = AtomicRun(event, seq.start, seq.end, seq.status_reg)
                self._atomic_run(v)
                return
            self.m.request_stop(event)
        else:
            self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))

    def _atomic_run(self, v: Arm64Vcpu) -> None:
        """Rerun the exclusive sequence from its load-exclusive with the
        watchpoints off and one hardware breakpoint just after its
        store-exclusive: no debug exit can then clear the monitor between
        the two, so the store succeeds (stopping at the store, as the
        watchpoint did, makes it fail forever). The watchpoint stop is
        reported after the access, where GDB sees the new value."""
        run = self._atomic[v.index]
        run.tries += 1
        v.set_core(abi.CORE_PC, run.start)
        control = kvm_abi.KVM_GUESTDBG_ENABLE | kvm_abi.KVM_GUESTDBG_USE_SW_BP | kvm_abi.KVM_GUESTDBG_USE_HW_BP
        v.set_guest_debug(control, ((bvr_value(run.end), bcr_value()),), ())

    def _atomic_done(self, v: Arm64Vcpu) -> None:
        run = self._atomic[v.index]
        stored = v.core(abi.CORE_X0 + 8 * run.status_reg) & 0xFFFF_FFFF == 0 if run.status_reg < 31 else True
        if not stored and run.tries < 1000:
            self._atomic_run(v)  # another CPU or an interrupt broke it: again
            return
        self._apply_debug(v, step=False)
        run.done = True  # stays in _atomic (blocking other sequences) until the next resume
        self.m.request_stop(run.event, keep_if_busy=lambda e: self._pending.__setitem__(v.index, e))

    def _brk(self, v: Arm64Vcpu, comment: int) -> None:
        pc = v.pc
        with self._lock:
            ours = pc in self.sw
        if ours:
            self.m.request_stop(StopEvent("swbreak", tid=v.index + 1))
            return
        insn = self._insn_at(v, pc)
        if insn is None or not is_brk(insn):
            return  # our breakpoint, removed meanwhile: run the original instruction
        if not self.inject_brk(v, comment):
            # No vector table to take it: the debugger is the only one to tell.
            self.m.request_stop(StopEvent("signal", tid=v.index + 1, signal=SIGTRAP))

    def inject_brk(self, v: Arm64Vcpu, comment: int) -> bool:
        """Deliver the guest's own ``BRK #comment`` at pc as the exception
        the CPU would have taken: to EL1 through VBAR_EL1, at offset 0x000
        (from EL1t), 0x200 (EL1h) or 0x400 (from EL0). False when the guest
        has no vector table (VBAR_EL1 = 0)."""
        vbar = v.sys("VBAR_EL1")
        if not vbar:
            return False
        pstate, pc = v.pstate, v.pc
        el = (pstate >> abi.PSTATE_EL_SHIFT) & 3
        offset = 0x400 if el == 0 else (0x200 if pstate & abi.PSTATE_SP else 0x000)
        v.set_sys("ESR_EL1", brk_esr(comment))
        v.set_core(abi.CORE_ELR_EL1, pc)
        v.set_core(abi.CORE_SPSR_EL1, pstate & 0xFFFF_FFFF)
        v.set_core(abi.CORE_PSTATE, (pstate & ~(0x3FF | abi.PSTATE_SS)) | abi.PSTATE_DAIF | abi.PSTATE_EL1H)
        v.set_core(abi.CORE_PC, vbar + offset)
        return True

    def _mask_for_step(self, v: Arm64Vcpu) -> None:
        pstate = v.pstate
        self._step_state[v.index] = StepState(pstate & STEP_MASK, self._insn_at(v, v.pc), v.sys("VBAR_EL1"))
        if pstate & STEP_MASK != STEP_MASK:
            v.set_core(abi.CORE_PSTATE, pstate | STEP_MASK)

    def _restore_daif(self, v: Arm64Vcpu) -> None:
        state = self._step_state.pop(v.index, None)
        if state is None or state.saved == STEP_MASK:
            return
        if state.insn is not None and changes_daif(state.insn):
            return
        pc = v.pc
        if state.vbar and state.vbar <= pc < state.vbar + VECTOR_TABLE_SIZE:
            # The step entered an exception: the mask we set is in SPSR_EL1.
            spsr = v.core(abi.CORE_SPSR_EL1)
            v.set_core(abi.CORE_SPSR_EL1, (spsr & ~STEP_MASK) | state.saved)
            return
        v.set_core(abi.CORE_PSTATE, (v.pstate & ~STEP_MASK) | state.saved)
