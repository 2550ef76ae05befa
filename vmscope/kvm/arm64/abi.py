"""The arm64 slice of the KVM userspace ABI, from ``<asm/kvm.h>`` (arm64)
and ``<linux/kvm.h>``.

arm64 has no ``KVM_GET_REGS``/``KVM_SET_REGS``: every register, core or
system, is one ``KVM_GET_ONE_REG``/``KVM_SET_ONE_REG`` call named by a 64-bit
id. Core registers are ``KVM_REG_ARM64 | size | KVM_REG_ARM_CORE`` plus
their byte offset in ``struct kvm_regs`` divided by 4; system registers are
``KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG`` plus their
(op0, op1, CRn, CRm, op2) encoding, as in the Arm ARM's MRS/MSR tables.

The generic ioctl plumbing (GIL released around each call) is the x86
back end's :func:`vmscope.kvm.abi.ioctl`; only numbers and layouts differ.
"""

from __future__ import annotations

import ctypes

from vmscope.arch.aarch64 import AARCH64
from vmscope.arch.registers import Register
from vmscope.kvm.abi import ExitMmio, ExitSystemEvent, _ioc, ioctl  # noqa: F401  (re-exported)
from vmscope.kvm.fields import resolve

u8, u32, u64 = ctypes.c_uint8, ctypes.c_uint32, ctypes.c_uint64

# --- register ids --------------------------------------------------------------

KVM_REG_ARM64 = 0x6000_0000_0000_0000
KVM_REG_SIZE_U32 = 0x0020_0000_0000_0000
KVM_REG_SIZE_U64 = 0x0030_0000_0000_0000
KVM_REG_SIZE_U128 = 0x0040_0000_0000_0000
KVM_REG_ARM_CORE = 0x0010 << 16
KVM_REG_ARM64_SYSREG = 0x0013 << 16

# byte offsets in struct kvm_regs: user_pt_regs {regs[31], sp, pc, pstate},
# sp_el1, elr_el1, spsr[5], then user_fpsimd_state (16-byte aligned):
# vregs[32] (128-bit), fpsr, fpcr.
CORE_X0 = 0
CORE_SP_EL0 = 31 * 8  # user_pt_regs.sp is SP_EL0
CORE_PC = 32 * 8
CORE_PSTATE = 33 * 8
CORE_SP_EL1 = 34 * 8
CORE_ELR_EL1 = 35 * 8
CORE_SPSR_EL1 = 36 * 8  # spsr[KVM_SPSR_EL1 = 0]
CORE_VREGS = 336  # 36*8 + 5*8 = 328, rounded up to 16
CORE_FPSR = CORE_VREGS + 32 * 16
CORE_FPCR = CORE_FPSR + 4


def core_reg(offset: int, size_bits: int = 64) -> int:
    """The ONE_REG id of the ``struct kvm_regs`` field at byte ``offset``."""
    size = {32: KVM_REG_SIZE_U32, 64: KVM_REG_SIZE_U64, 128: KVM_REG_SIZE_U128}[size_bits]
    if offset % 4:
        raise ValueError(f"core register offset {offset} is not a multiple of 4")
    return KVM_REG_ARM64 | size | KVM_REG_ARM_CORE | (offset // 4)


def sysreg(op0: int, op1: int, crn: int, crm: int, op2: int) -> int:
    """The ONE_REG id of a system register given its MRS encoding."""
    for name, value, bits in (("op0", op0, 2), ("op1", op1, 3), ("CRn", crn, 4), ("CRm", crm, 4), ("op2", op2, 3)):
        if not 0 <= value < 1 << bits:
            raise ValueError(f"system register {name}={value} does not fit in {bits} bits")
    return (KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG
            | op0 << 14 | op1 << 11 | crn << 7 | crm << 3 | op2)


#: system registers through KVM_REG_ARM64_SYSREG (op0, op1, CRn, CRm, op2),
#: from the arch table's ``sysreg`` column
SYSREGS = {r.name: r.sysreg for r in AARCH64.registers if r.sysreg is not None}


# --- structures ------------------------------------------------------------------

KVM_ARM_MAX_DBG_REGS = 16


class KvmVcpuInit(ctypes.Structure):
    _fields_ = [("target", u32), ("features", u32 * 7)]


class KvmOneReg(ctypes.Structure):
    _fields_ = [("id", u64), ("addr", u64)]


class KvmGuestDebugArm64(ctypes.Structure):
    """struct kvm_guest_debug with arm64's kvm_guest_debug_arch."""

    _fields_ = [
        ("control", u32), ("pad", u32),
        ("dbg_bcr", u64 * KVM_ARM_MAX_DBG_REGS), ("dbg_bvr", u64 * KVM_ARM_MAX_DBG_REGS),
        ("dbg_wcr", u64 * KVM_ARM_MAX_DBG_REGS), ("dbg_wvr", u64 * KVM_ARM_MAX_DBG_REGS),
    ]


class ExitDebugArm64(ctypes.Structure):
    """kvm_run.debug.arch on arm64: the ESR (``hsr``) and, for watchpoints, FAR."""

    _fields_ = [("hsr", u32), ("hsr_high", u32), ("far", u64)]


class ExitUnionArm64(ctypes.Union):
    _fields_ = [("mmio", ExitMmio), ("debug", ExitDebugArm64), ("system_event", ExitSystemEvent),
                ("padding", u8 * 256)]


class KvmRunArm64(ctypes.Structure):
    _fields_ = [
        ("request_interrupt_window", u8), ("immediate_exit", u8), ("padding1", u8 * 6),
        ("exit_reason", u32), ("ready_for_interrupt_injection", u8), ("if_flag", u8),
        ("flags", ctypes.c_uint16), ("cr8", u64), ("apic_base", u64), ("exit", ExitUnionArm64),
    ]


class UserPtRegs(ctypes.Structure):
    _fields_ = [("regs", u64 * 31), ("sp", u64), ("pc", u64), ("pstate", u64)]


class UserFpsimdState(ctypes.Structure):
    # __uint128_t vregs[32]: two u64 each; the structure is 16-byte aligned in C
    _fields_ = [("vregs", (u64 * 2) * 32), ("fpsr", u32), ("fpcr", u32), ("reserved", u32 * 2)]


class KvmRegsArm64(ctypes.Structure):
    """arm64 ``struct kvm_regs``: core registers are ONE_REG ids by their
    offset here (the arch table names them by path, e.g. ``regs.pc``)."""

    _fields_ = [("regs", UserPtRegs), ("sp_el1", u64), ("elr_el1", u64), ("spsr", u64 * 5),
                ("_align", u64), ("fp_regs", UserFpsimdState)]


def register_id(reg: Register) -> int | None:
    """The ONE_REG id of an arch-table register: its ``struct kvm_regs``
    field (``Register.kvm``) or its system-register encoding
    (``Register.sysreg``); None for registers the target derives (sp,
    CurrentEL)."""
    if reg.kvm is not None:
        ref = resolve(KvmRegsArm64, reg.kvm)
        return core_reg(ref.offset, 8 * ref.size)  # KVM wants the field's own size
    if reg.sysreg is not None:
        return sysreg(*reg.sysreg)
    return None


# --- ioctls ------------------------------------------------------------------------

KVM_GET_ONE_REG = _ioc(1, 0xAB, ctypes.sizeof(KvmOneReg))
KVM_SET_ONE_REG = _ioc(1, 0xAC, ctypes.sizeof(KvmOneReg))
KVM_ARM_VCPU_INIT = _ioc(1, 0xAE, ctypes.sizeof(KvmVcpuInit))
KVM_ARM_PREFERRED_TARGET = _ioc(2, 0xAF, ctypes.sizeof(KvmVcpuInit))
KVM_SET_GUEST_DEBUG = _ioc(1, 0x9B, ctypes.sizeof(KvmGuestDebugArm64))

# vCPU features (bit numbers in kvm_vcpu_init.features[0])
KVM_ARM_VCPU_POWER_OFF = 0
KVM_ARM_VCPU_PSCI_0_2 = 2

# capabilities
KVM_CAP_ARM_PSCI_0_2 = 102
KVM_CAP_GUEST_DEBUG_HW_BPS = 119
KVM_CAP_GUEST_DEBUG_HW_WPS = 120

# system events
KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2

# PSTATE bits
PSTATE_SP = 1 << 0  # SPSel: 1 = SP_ELx
PSTATE_EL_SHIFT = 2
PSTATE_F, PSTATE_I, PSTATE_A, PSTATE_D = 1 << 6, 1 << 7, 1 << 8, 1 << 9
PSTATE_DAIF = PSTATE_D | PSTATE_A | PSTATE_I | PSTATE_F
PSTATE_SS = 1 << 21
PSTATE_EL1H = 0b0101  # M[3:0]: EL1 with SP_EL1

assert ctypes.sizeof(KvmGuestDebugArm64) == 520
assert ctypes.sizeof(ExitUnionArm64) == 256
assert core_reg(CORE_PC) == 0x6030_0000_0010_0040  # QEMU's and kvmtool's value
assert KvmRegsArm64.fp_regs.offset == CORE_VREGS and resolve(KvmRegsArm64, "fp_regs.fpcr").offset == CORE_FPCR
