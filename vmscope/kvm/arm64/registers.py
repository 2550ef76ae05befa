"""arm64 register access of the KVM debug target, driven by the arch
table: each register of :data:`vmscope.arch.aarch64.AARCH64` names its
``struct kvm_regs`` field or system-register encoding, which
:func:`vmscope.kvm.arm64.abi.register_id` turns into a ONE_REG id. GDB's
``sp`` is the stack pointer in use (SP_EL1 at EL1h, SP_EL0 at EL0 or EL1t)
and ``CurrentEL`` is PSTATE.EL: those two are derived.
"""

from __future__ import annotations

import errno
from typing import Mapping

from vmscope.arch.aarch64 import AARCH64
from vmscope.gdbserver.target import TargetError
from vmscope.gdbserver.toolkit import LazyRegisters
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.vcpu import Arm64Vcpu


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


class _LazyRegisters(LazyRegisters):
    """Register values by name, each fetched (and cached by the vCPU) on first
    use: a stop reply needs pc, sp and x29 only."""

    def __init__(self, v: Arm64Vcpu):
        super().__init__(AARCH64.index)
        self._v = v

    def _fetch(self, name: str) -> int:
        try:
            return read_register(self._v, name)
        except OSError as e:
            raise TargetError(f"cannot read {name} of vCPU {self._v.index}: {e}", errno.EIO) from None


class Arm64Registers:
    """Mixin of :class:`~vmscope.kvm.arm64.target.Arm64KvmTarget`: registers by name."""

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
