"""Breakpoints and watchpoints of the x86 KVM debug target that the CPU
serves: INT3 patched into RAM (``KVM_GUESTDBG_USE_SW_BP``), debug registers
DR0-DR3 for hardware breakpoints and aligned watchpoints, and the debug
exits they cause. Where this KVM does not serve them (see
:mod:`vmscope.kvm.x86.mechanisms`), page protection takes over
(:mod:`vmscope.kvm.x86.pageprot`).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vmscope.gdbserver.target import SIGTRAP, StopEvent, TargetError, WatchKind
from vmscope.gdbserver.toolkit import WATCH_STOP_KIND, InsertedBreakpoint
from vmscope.kvm import abi
from vmscope.kvm.x86.delivery import deliver_by_hand
from vmscope.kvm.x86.memaccess import INT3
from vmscope.kvm.x86.translate import PAGE
from vmscope.kvm.x86.vcpu import Vcpu

BP_VECTOR, DB_VECTOR, UD_VECTOR = 3, 1, 6
DR6_BS = 1 << 14
DR7_RW = {"exec": 0b00, "write": 0b01, "access": 0b11}
DR7_LEN = {1: 0b00, 2: 0b01, 4: 0b11, 8: 0b10}


@dataclass
class Watch:
    addr: int
    length: int
    kind: WatchKind
    phys: list[tuple[int, int]]  # (guest-physical start, length) pieces
    dr_slot: int | None = None  # debug register, or None: page protection


class X86Breakpoints:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`."""

    def add_sw_breakpoint(self, addr: int, kind: int) -> None:
        if self.sw_pages:
            return self._add_exec_page_breakpoint(addr, "swbreak")
        with self._lock:
            if addr in self.sw:
                return
            phys = self._phys_page(addr & ~(PAGE - 1), 1)
            if phys is None:
                raise TargetError(f"cannot set a breakpoint at {addr:#x}: address not mapped")
            phys |= addr & (PAGE - 1)
            self.sw[addr] = InsertedBreakpoint(phys, bytes(self.mem.view[phys : phys + 1]))
            self.mem.view[phys] = INT3

    def remove_sw_breakpoint(self, addr: int, kind: int) -> None:
        if self.sw_pages:
            return self._remove_exec_page_breakpoint(addr)
        with self._lock:
            bp = self.sw.pop(addr, None)
            if bp is None:
                return
            if self.mem.view[bp.phys] == INT3:
                self.mem.view[bp.phys] = bp.orig[0]

    def _dr_slots_used(self) -> set[int]:
        return set(self.hw.values()) | {w.dr_slot for w in self.watches if w.dr_slot is not None}

    def _free_dr_slot(self) -> int | None:
        used = self._dr_slots_used()
        return next((i for i in range(4) if i not in used), None)

    def add_hw_breakpoint(self, addr: int, kind: int) -> None:
        if self.hw_pages:
            return self._add_exec_page_breakpoint(addr, "hwbreak")
        with self._lock:
            if addr in self.hw:
                return
            slot = self._free_dr_slot()
            if slot is None:
                raise TargetError("all 4 debug registers are in use (hardware breakpoints and watchpoints)", errno.ENOSPC)
            self.hw[addr] = slot

    def remove_hw_breakpoint(self, addr: int, kind: int) -> None:
        if self.hw_pages:
            return self._remove_exec_page_breakpoint(addr)
        with self._lock:
            self.hw.pop(addr, None)

    def _debugregs(self, with_exec: bool = True) -> tuple[int, ...]:
        dr = [0] * 8
        dr7 = 0
        if with_exec:
            for addr, slot in self.hw.items():
                dr[slot] = addr
                dr7 |= 1 << (slot * 2)
        for w in self.watches:
            if w.dr_slot is not None:
                dr[w.dr_slot] = w.addr
                dr7 |= (1 << (w.dr_slot * 2)) | (DR7_RW[w.kind] << (16 + 4 * w.dr_slot)) | (DR7_LEN[w.length] << (18 + 4 * w.dr_slot))
        dr[7] = dr7
        return tuple(dr)

    def add_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        if kind not in WATCH_STOP_KIND:
            raise TargetError(f"unknown watchpoint kind {kind!r}", errno.EINVAL)
        if length <= 0:
            raise TargetError(f"watchpoint length must be positive, got {length}", errno.EINVAL)
        with self._lock:
            if any(w.addr == addr and w.length == length and w.kind == kind for w in self.watches):
                return
            pieces, bad = self._pieces(addr, length, 1)
            if bad is not None:
                raise TargetError(f"cannot watch {addr:#x}+{length}: address {bad:#x} not mapped")
            w = Watch(addr, length, kind, pieces)
            if self.dr_watch and kind != "read" and length in DR7_LEN and addr % length == 0:
                w.dr_slot = self._free_dr_slot()
            self.watches.append(w)
            self._protection_changed()

    def remove_watchpoint(self, addr: int, length: int, kind: WatchKind) -> None:
        with self._lock:
            self.watches = [w for w in self.watches if not (w.addr == addr and w.length == length and w.kind == kind)]
            self._protection_changed()

    def _int3(self, v: Vcpu, rip: int, current: int | None, after_emulation_failure: bool) -> None:
        with self._lock:
            ours = rip in self.sw
        if ours:
            self.m.request_stop(StopEvent("swbreak", tid=v.index + 1, signal=SIGTRAP))
            return
        if current != INT3:
            return  # our breakpoint, removed meanwhile: just run the original instruction
        # The guest's own INT3: deliver #BP to the guest (by hand when
        # KVM's delivery would touch a page-protected page: delivery.py).
        if deliver_by_hand(self, v, BP_VECTOR, rip + 1):
            return
        if after_emulation_failure:
            r = v.regs()
            r.rip = rip + 1
            v.set_regs(r)
        v.inject_exception(BP_VECTOR)

    def on_debug_exit(self, v: Vcpu) -> None:
        dbg = v.run.exit.debug
        tid = v.index + 1
        if dbg.exception == BP_VECTOR:
            rip = v.regs().rip
            try:
                current = self.read_memory_raw(rip, v)
            except TargetError:
                current = None
            self._int3(v, rip, current, after_emulation_failure=False)
            return
        dr6 = dbg.dr6
        if v.index in self._step_over and dr6 & DR6_BS:
            # Stepped off a hardware breakpoint: put the breakpoints back, go on.
            self._step_over.discard(v.index)
            self._apply_debug(v, step=False)
            return
        with self._lock:
            for slot in range(4):
                if not dr6 & (1 << slot):
                    continue
                for addr, s in self.hw.items():
                    if s == slot:
                        self.m.request_stop(StopEvent("hwbreak", tid=tid))
                        return
                for w in self.watches:
                    if w.dr_slot == slot:
                        ev = StopEvent(WATCH_STOP_KIND[w.kind], tid=tid, addr=w.addr)
                        self.m.request_stop(ev, keep_if_busy=lambda e: self._pending.__setitem__(v.index, e))
                        return
        # A single step, or a #DB we cannot place: report a plain SIGTRAP.
        self.m.request_stop(StopEvent("signal", tid=tid, signal=SIGTRAP))

    def on_internal_error(self, v: Vcpu) -> bool:
        """An emulation failure; True when it was an INT3 we dealt with."""
        run = v.run
        if run.exit.internal.suberror != abi.KVM_INTERNAL_ERROR_EMULATION:
            return False
        rip = v.regs().rip
        ef = run.exit.emulation_failure
        insn_is_int3 = run.exit.internal.ndata >= 2 and ef.flags & 1 and ef.insn_size >= 1 and ef.insn_bytes[0] == INT3
        if insn_is_int3:
            with self._lock:
                ours = rip in self.sw
            if ours:  # the common case, a hit: no translation and memory read needed
                self.m.request_stop(StopEvent("swbreak", tid=v.index + 1, signal=SIGTRAP))
                return True
        try:
            current = self.read_memory_raw(rip, v)
        except TargetError:
            current = None
        if not insn_is_int3 and current != INT3:
            return self._fetch_from_watched_page(v, rip)
        self._int3(v, rip, current, after_emulation_failure=True)
        return True
