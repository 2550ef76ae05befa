"""Breakpoints and watchpoints of the arm64 KVM debug target: BRK #0
patched into RAM, and the DBGBVR/BCR and DBGWVR/WCR slots KVM offers
(``KVM_GUESTDBG_USE_HW``), set on each vCPU before it runs.
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from vmscope.gdbserver.target import TargetError, WatchKind
from vmscope.gdbserver.toolkit import WATCH_STOP_KIND, InsertedBreakpoint
from vmscope.kvm import abi as kvm_abi
from vmscope.kvm.arm64.debugarch import bcr_value, bvr_value, watch_registers
from vmscope.kvm.arm64.memaccess import BRK0
from vmscope.kvm.arm64.vcpu import Arm64Vcpu


@dataclass
class Watch:
    addr: int
    length: int
    kind: WatchKind
    regs: list[tuple[int, int]]  # (DBGWVR, DBGWCR) pieces

class Arm64Breakpoints:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: breakpoint and watchpoint tables, debug state per vCPU."""

    def add_sw_breakpoint(self, addr: int, kind: int) -> None:
        if addr & 3:
            raise TargetError(f"breakpoint address {addr:#x} is not 4-byte aligned", errno.EINVAL)
        with self._lock:
            if addr in self.sw:
                return
            phys = self._phys(addr, self._vcpu(1))
            if not self.ram.contains(phys, 4):
                raise TargetError(f"breakpoint address {addr:#x} (physical {phys:#x}) is not in guest RAM")
            self.sw[addr] = InsertedBreakpoint(phys, self.ram.read(phys, 4))
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

    def _debug_regs(self, with_exec: bool):
        with self._lock:
            bps = tuple((bvr_value(a), bcr_value()) for a in self.hw) if with_exec else ()
            entry = self.entry_break  # monitor kernel-entry (kernel_entry.py)
            if entry is not None:
                bps += ((bvr_value(entry), bcr_value()),)
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
