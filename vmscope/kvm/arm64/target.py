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
"""

from __future__ import annotations

import errno
import struct
import threading
from dataclasses import dataclass
from typing import Mapping

from vmscope.arch.aarch64 import AARCH64
from vmscope.gdbserver.target import (
    SIGINT,
    SIGTRAP,
    AddressTranslation,
    HwBreakpoints,
    MonitorCommands,
    PhysicalMemory,
    ResumeActions,
    StopEvent,
    StopNotifier,
    SwBreakpoints,
    Target,
    TargetError,
    ThreadNames,
    WatchKind,
    Watchpoints,
)
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.debugarch import (
    bcr_value,
    brk_esr,
    bvr_value,
    changes_daif,
    decode_esr,
    exclusive_sequence,
    is_brk,
    watch_covers,
    watch_registers,
)
from vmscope.kvm.arm64.icache import clear_cache
from vmscope.kvm.arm64.vcpu import Arm64Vcpu
from vmscope.vmi.errors import VmiError
from vmscope.vmi.paging import Aarch64Paging, TranslationCache

PAGE = 4096
BRK0 = AARCH64.breakpoint  # d4200000, little-endian
SCTLR_M = 1
STEP_MASK = abi.PSTATE_A | abi.PSTATE_I | abi.PSTATE_F
WATCH_STOP_KIND = {"write": "watch", "read": "rwatch", "access": "awatch"}
VECTOR_TABLE_SIZE = 0x800

#: GDB register name -> ONE_REG id, from the arch table (every register
#: but sp and CurrentEL, which PSTATE decides)
REGISTER_IDS: dict[str, int] = {
    r.name: reg_id for r in AARCH64.registers if (reg_id := abi.register_id(r)) is not None
}
#: register name -> mask of its bits, where KVM's field is wider (cpsr in the 64-bit pstate)
_NARROW = {r.name: (1 << r.bitsize) - 1 for r in AARCH64.registers
           if r.name in REGISTER_IDS and r.bitsize < 8 << (REGISTER_IDS[r.name] >> 52 & 0xF)}


def live_sp_offset(pstate: int) -> int:
    """The ``struct kvm_regs`` offset of the stack pointer in use: SP_EL1 at
    EL1 with SPSel=1 (EL1h), SP_EL0 otherwise (EL0, EL1t)."""
    el = (pstate >> abi.PSTATE_EL_SHIFT) & 3
    return abi.CORE_SP_EL1 if el >= 1 and pstate & abi.PSTATE_SP else abi.CORE_SP_EL0


def read_register(v: Arm64Vcpu, name: str) -> int:
    if name == "sp":
        return v.core(live_sp_offset(v.pstate))
    if name == "CurrentEL":
        return v.pstate & 0xC
    value = v.get(REGISTER_IDS[name])
    return value & _NARROW[name] if name in _NARROW else value


def write_register(v: Arm64Vcpu, name: str, value: int) -> None:
    """One register through its table line; a register narrower than KVM's
    field (cpsr) keeps the field's other bits."""
    if name == "CurrentEL":
        if value != v.pstate & 0xC:
            raise TargetError("CurrentEL is read-only (write cpsr to change the exception level)", errno.EINVAL)
        return
    if name == "sp":
        v.set_core(live_sp_offset(v.pstate), value)
        return
    reg_id = REGISTER_IDS[name]
    if name in _NARROW:
        value = (v.get(reg_id) & ~_NARROW[name]) | (value & _NARROW[name])
    try:
        v.set(reg_id, value)
    except OSError as e:
        raise TargetError(f"KVM refused to write {name}: {e}", errno.EINVAL) from None


class _LazyRegisters(Mapping):
    """Register values by name, each fetched (and cached by the vCPU) on first
    use: a stop reply needs pc, sp and x29 only."""

    def __init__(self, v: Arm64Vcpu):
        self._v = v
        self._names = AARCH64.index

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        try:
            return read_register(self._v, name)
        except OSError as e:
            raise TargetError(f"cannot read {name} of vCPU {self._v.index}: {e}", errno.EIO) from None

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


@dataclass
class SwBreak:
    phys: int
    orig: bytes


@dataclass
class Watch:
    addr: int
    length: int
    kind: WatchKind
    regs: list[tuple[int, int]]  # (DBGWVR, DBGWCR) pieces


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


class Arm64KvmTarget(
    Target, SwBreakpoints, HwBreakpoints, Watchpoints, MonitorCommands,
    AddressTranslation, PhysicalMemory, ThreadNames,
):
    arch = AARCH64

    def __init__(self, machine):
        """``machine``: an :class:`~vmscope.kvm.arm64.machine.Arm64KvmMachine`
        (its run control, vCPU slots, RAM and debug slot counts)."""
        self.m = machine
        self.ram = machine.ram
        self.notifier = StopNotifier()
        self.walks = TranslationCache()
        self._lock = threading.RLock()
        self.sw: dict[int, SwBreak] = {}
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

    # --- threads ------------------------------------------------------------------------

    def _vcpu(self, tid: int) -> Arm64Vcpu:
        if tid <= 0:
            tid = 1
        if tid > len(self.m.vcpus):
            raise TargetError(f"no thread {tid}: the VM has {len(self.m.vcpus)} vCPUs "
                              f"(threads 1..{len(self.m.vcpus)})", errno.ESRCH)
        return self.m.vcpus[tid - 1].vcpu

    def threads(self) -> list[int]:
        return [i + 1 for i in range(len(self.m.vcpus))]

    def thread_name(self, tid: int) -> str:
        return f"vCPU {tid - 1}"

    def _require_stopped(self) -> None:
        if not self.m.stopped:
            raise TargetError("the guest is running; stop it first", errno.EBUSY)

    # --- registers ----------------------------------------------------------------------

    def read_registers(self, tid: int) -> Mapping[str, int]:
        return _LazyRegisters(self._vcpu(tid))

    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        self._require_stopped()
        v = self._vcpu(tid)
        unknown = set(values) - set(self.arch.index)
        if unknown:
            raise TargetError(f"no such register(s): {', '.join(sorted(unknown))}", errno.EINVAL)
        # PSTATE first: it decides which stack pointer "sp" is.
        for name in sorted(values, key=lambda n: n != "cpsr"):
            write_register(v, name, values[name])
        if set(values) & {"SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1"}:
            self.walks.invalidate()

    # --- memory -------------------------------------------------------------------------

    def _phys(self, vaddr: int, v: Arm64Vcpu) -> int:
        """Guest-physical address of ``vaddr`` for vCPU ``v`` (TargetError if unmapped)."""
        try:
            if not v.sys("SCTLR_EL1") & SCTLR_M:
                return vaddr
            walker = Aarch64Paging(self.ram, v.sys("TTBR0_EL1"), v.sys("TTBR1_EL1"), v.sys("TCR_EL1"), self.walks)
            return walker.translate(vaddr).paddr
        except (VmiError, TargetError, ValueError) as e:
            raise TargetError(f"virtual address {vaddr:#x} is not mapped: {e}") from None

    def translate(self, addr: int, tid: int) -> int:
        return self._phys(addr, self._vcpu(tid))

    def _pieces(self, addr: int, length: int, tid: int) -> tuple[list[tuple[int, int]], int | None]:
        """Physical (start, length) pieces of a virtual range inside RAM, up
        to the first page that is unmapped or not RAM (returned too)."""
        v = self._vcpu(tid)
        pieces: list[tuple[int, int]] = []
        cur, end = addr, addr + length
        while cur < end:
            n = min(end, (cur & ~(PAGE - 1)) + PAGE) - cur
            try:
                start = self._phys(cur, v)
            except TargetError:
                return pieces, cur
            if not self.ram.contains(start, n):
                return pieces, cur
            if pieces and pieces[-1][0] + pieces[-1][1] == start:
                pieces[-1] = (pieces[-1][0], pieces[-1][1] + n)
            else:
                pieces.append((start, n))
            cur += n
        return pieces, None

    def read_memory(self, addr: int, length: int, tid: int) -> bytes:
        if length <= 0:
            return b""
        if addr < 0 or addr + length > 1 << 64:
            raise TargetError(f"address {addr:#x}+{length} is outside the 64-bit address space", errno.EINVAL)
        pieces, bad = self._pieces(addr, length, tid)
        if not pieces:
            raise TargetError(f"cannot read {addr:#x}: not mapped to guest RAM")
        data = bytearray()
        for start, n in pieces:
            data += self.ram.read(start, n)
        with self._lock:
            for vaddr, bp in self.sw.items():
                for i in range(4):
                    if addr <= vaddr + i < addr + len(data):
                        data[vaddr + i - addr] = bp.orig[i]
        return bytes(data)

    def write_memory(self, addr: int, data: bytes, tid: int) -> None:
        if not data:
            return
        pieces, bad = self._pieces(addr, len(data), tid)
        if bad is not None:
            raise TargetError(f"cannot write {addr:#x}+{len(data)}: {bad:#x} is not mapped to guest RAM")
        buf = bytearray(data)
        with self._lock:
            for vaddr, bp in self.sw.items():  # keep our BRK, remember the new bytes under it
                orig = bytearray(bp.orig)
                for i in range(4):
                    if addr <= vaddr + i < addr + len(buf):
                        orig[i] = buf[vaddr + i - addr]
                        buf[vaddr + i - addr] = BRK0[i]
                bp.orig = bytes(orig)
            off = 0
            for start, n in pieces:
                self.ram.write(start, bytes(buf[off: off + n]))
                self._code_changed(start, n)
                off += n

    def _code_changed(self, phys: int, length: int) -> None:
        clear_cache(self.ram.host_address + phys - self.ram.base, length)

    def read_physical(self, addr: int, length: int) -> bytes:
        if not self.ram.contains(addr, 1):
            raise TargetError(f"guest-physical address {addr:#x} is outside RAM ({self.ram.base:#x}-{self.ram.end:#x})")
        return self.ram.read(addr, min(length, self.ram.end - addr))

    def write_physical(self, addr: int, data: bytes) -> None:
        if not self.ram.contains(addr, len(data)):
            raise TargetError(f"guest-physical range {addr:#x}+{len(data)} is outside RAM")
        self.ram.write(addr, data)
        self._code_changed(addr, len(data))

    # --- breakpoints and watchpoints ----------------------------------------------------

    def add_sw_breakpoint(self, addr: int, kind: int) -> None:
        if addr & 3:
            raise TargetError(f"breakpoint address {addr:#x} is not 4-byte aligned", errno.EINVAL)
        with self._lock:
            if addr in self.sw:
                return
            phys = self._phys(addr, self._vcpu(1))
            if not self.ram.contains(phys, 4):
                raise TargetError(f"breakpoint address {addr:#x} (physical {phys:#x}) is not in guest RAM")
            self.sw[addr] = SwBreak(phys, self.ram.read(phys, 4))
            self.ram.write(phys, BRK0)
            self._code_changed(phys, 4)

    def remove_sw_breakpoint(self, addr: int, kind: int) -> None:
        with self._lock:
            bp = self.sw.pop(addr, None)
            if bp is not None:
                self.ram.write(bp.phys, bp.orig)
                self._code_changed(bp.phys, 4)

    def add_hw_breakpoint(self, addr: int, kind: int) -> None:
        try:
            bvr_value(addr)
        except ValueError as e:
            raise TargetError(str(e), errno.EINVAL) from None
        with self._lock:
            if addr in self.hw:
                return
            if len(self.hw) >= self.m.hw_bp_slots:
                raise TargetError(f"all {self.m.hw_bp_slots} hardware breakpoint slots are in use", errno.ENOSPC)
            self.hw.append(addr)

    def remove_hw_breakpoint(self, addr: int, kind: int) -> None:
        with self._lock:
            if addr in self.hw:
                self.hw.remove(addr)

    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        regs = []
        cur, end = addr, addr + length
        try:
            while cur < end:  # one register per aligned doubleword touched
                n = min(end, (cur & ~7) + 8) - cur
                regs.append(watch_registers(cur, n, kind))
                cur += n
        except ValueError as e:
            raise TargetError(str(e), errno.EINVAL) from None
        with self._lock:
            used = sum(len(w.regs) for w in self.watches)
            if used + len(regs) > self.m.hw_wp_slots:
                raise TargetError(f"watching {length} bytes at {addr:#x} needs {len(regs)} of "
                                  f"{self.m.hw_wp_slots} watchpoint slots; {used} are in use", errno.ENOSPC)
            self.watches.append(Watch(addr, length, kind, regs))

    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        with self._lock:
            for w in self.watches:
                if (w.addr, w.length, w.kind) == (addr, length, kind):
                    self.watches.remove(w)
                    break
            # a hit not yet told is moot once its watchpoint is gone
            for idx, ev in list(self._pending.items()):
                if ev.addr == addr and ev.kind == WATCH_STOP_KIND[kind]:
                    del self._pending[idx]

    # --- debug exits (vCPU threads) -----------------------------------------------------

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

    def _insn_at(self, v: Arm64Vcpu, pc: int) -> int | None:
        """The instruction in guest RAM at ``pc`` (our BRKs included)."""
        try:
            phys = self._phys(pc, v)
            return struct.unpack("<I", self.ram.read(phys, 4))[0]
        except TargetError:
            return None

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

    # --- run control ----------------------------------------------------------------------

    def _debug_regs(self, with_exec: bool):
        with self._lock:
            bps = tuple((bvr_value(a), bcr_value()) for a in self.hw) if with_exec else ()
            wps = tuple(r for w in self.watches for r in w.regs)
        return bps, wps

    def _apply_debug(self, v: Arm64Vcpu, step: bool) -> None:
        """Debug state for a vCPU about to run. One sitting on an enabled
        hardware breakpoint first steps with the execution breakpoints off."""
        if not self.attached:
            v.set_guest_debug(0)
            return
        on_hw_bp = bool(self.hw) and v.pc in self.hw
        bps, wps = self._debug_regs(with_exec=not on_hw_bp)
        control = kvm_abi.KVM_GUESTDBG_ENABLE | kvm_abi.KVM_GUESTDBG_USE_SW_BP
        if bps or wps:
            control |= kvm_abi.KVM_GUESTDBG_USE_HW_BP
        if step or on_hw_bp:
            control |= kvm_abi.KVM_GUESTDBG_SINGLESTEP
        if on_hw_bp and not step:
            self._step_over.add(v.index)
        v.set_guest_debug(control, bps, wps)

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

    def post_stop(self, event: StopEvent) -> None:
        self.notifier.post(event)

    def guest_ended(self, status: int) -> None:
        self.notifier.post(StopEvent("exited", code=status))

    def interrupt(self) -> None:
        self.m.request_stop(StopEvent("signal", tid=1, signal=SIGINT))

    def stop_fd(self) -> int:
        return self.notifier.fd

    def take_stop(self) -> StopEvent | None:
        return self.notifier.take()

    def is_running(self) -> bool:
        return not self.m.stopped and not self.m.ending

    def initial_stop(self) -> StopEvent:
        self.attached = True
        return StopEvent("signal", tid=1, signal=SIGTRAP)

    def stop(self, timeout: float = 10.0) -> StopEvent | None:
        """Stop a running guest and wait for the stop (tests, helpers)."""
        import select

        self.interrupt()
        ready, _, _ = select.select([self.notifier.fd], [], [], timeout)
        return self.take_stop() if ready else None

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
            self._pending.clear()
            self._stepping = None
            for slot in self.m.vcpus:
                self._restore_daif(slot.vcpu)
                slot.vcpu.set_guest_debug(0)
        self.walks.invalidate()
        self.m.run_vcpus({s.vcpu.index: True for s in self.m.vcpus})

    def kill(self) -> None:
        self.m.end(0, None)

    # --- monitor ------------------------------------------------------------------------

    def monitor(self, command: str) -> str:
        words = command.split()
        if not words or words[0] == "help":
            return ("vmscope arm64 KVM monitor commands:\n"
                    "  help             this text\n"
                    "  cpus             exception level, pc, SCTLR_EL1 and TTBRs of every vCPU\n"
                    "  translate ADDR   guest-virtual ADDR -> guest-physical (vCPU 0's tables)\n"
                    f"debug slots: {self.m.hw_bp_slots} breakpoints, {self.m.hw_wp_slots} watchpoints\n")
        cmd, args = words[0], words[1:]
        if cmd == "cpus":
            lines = []
            for slot in self.m.vcpus:
                v = slot.vcpu
                p = v.pstate
                lines.append(f"vCPU {v.index}: EL{(p >> 2) & 3}{'h' if p & 1 else 't'} pc={v.pc:#x} "
                             f"sctlr={v.sys('SCTLR_EL1'):#x} ttbr0={v.sys('TTBR0_EL1'):#x} "
                             f"ttbr1={v.sys('TTBR1_EL1'):#x}")
            return "\n".join(lines) + "\n"
        if cmd == "translate":
            if len(args) != 1:
                return "usage: translate ADDR\n"
            try:
                addr = int(args[0], 0)
            except ValueError:
                return f"translate: {args[0]!r} is not a number (use 0x... for hex)\n"
            try:
                return f"{addr:#x} -> {self.translate(addr, 1):#x}\n"
            except TargetError as e:
                return f"translate: {e}\n"
        return f"unknown monitor command {cmd!r}; try 'monitor help'\n"
