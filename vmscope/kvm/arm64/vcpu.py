"""One arm64 vCPU: its KVM fd, ``kvm_run`` page and a register cache.

Every register is one KVM_GET_ONE_REG, so values read during a stop are
cached until the vCPU runs again; writes go through at once and update the
cache. Only the owning thread calls KVM_RUN; the stub's thread may use the
other ioctls while the vCPU is parked (KVM serialises them per vCPU).
"""

from __future__ import annotations

import ctypes
import mmap
import os

from vmscope.kvm.abi import KVM_CREATE_VCPU
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.abi import ioctl
from vmscope.kvm.vcpu import KvmVcpu


class Arm64Vcpu(KvmVcpu):
    def __init__(self, vm_fd: int, index: int, mmap_size: int, init: abi.KvmVcpuInit):
        self.index = index
        self.fd = ioctl(vm_fd, KVM_CREATE_VCPU, index, "KVM_CREATE_VCPU")
        try:
            ioctl(self.fd, abi.KVM_ARM_VCPU_INIT, init, "KVM_ARM_VCPU_INIT")
            self._run_map = mmap.mmap(self.fd, mmap_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        except BaseException:
            os.close(self.fd)
            raise
        self.run = abi.KvmRunArm64.from_buffer(self._run_map)
        self._cache: dict[int, int] = {}
        self._buf = (ctypes.c_uint64 * 2)()
        self._one = abi.KvmOneReg(0, ctypes.addressof(self._buf))
        self._debug: tuple | None = None

    # --- registers -------------------------------------------------------------------

    def get(self, reg_id: int) -> int:
        """The value of ONE_REG ``reg_id`` (32, 64 or 128 bits), cached while parked."""
        value = self._cache.get(reg_id)
        if value is None:
            self._one.id = reg_id
            ioctl(self.fd, abi.KVM_GET_ONE_REG, self._one, f"KVM_GET_ONE_REG {reg_id:#x}")
            size = 1 << ((reg_id >> 52) & 0xF)
            value = int.from_bytes(bytes(self._buf)[:size], "little")
            self._cache[reg_id] = value
        return value

    def read_fresh(self, reg_id: int) -> int:
        """``get`` without the cache: for registers that change while the
        vCPU is parked (the virtual counter)."""
        self._cache.pop(reg_id, None)
        return self.get(reg_id)

    def set(self, reg_id: int, value: int) -> None:
        size = 1 << ((reg_id >> 52) & 0xF)
        value &= (1 << (8 * size)) - 1
        ctypes.memmove(self._buf, value.to_bytes(size, "little") + bytes(16 - size), 16)
        self._one.id = reg_id
        ioctl(self.fd, abi.KVM_SET_ONE_REG, self._one, f"KVM_SET_ONE_REG {reg_id:#x}")
        self._cache[reg_id] = value

    def core(self, offset: int) -> int:
        return self.get(abi.core_reg(offset))

    def set_core(self, offset: int, value: int) -> None:
        self.set(abi.core_reg(offset), value)

    @property
    def pc(self) -> int:
        return self.core(abi.CORE_PC)

    @property
    def pstate(self) -> int:
        return self.core(abi.CORE_PSTATE)

    def sys(self, name: str) -> int:
        return self.get(abi.sysreg(*abi.SYSREGS[name]))

    def set_sys(self, name: str, value: int) -> None:
        self.set(abi.sysreg(*abi.SYSREGS[name]), value)

    def invalidate(self) -> None:
        self._cache.clear()

    # --- debug ---------------------------------------------------------------------------

    def set_guest_debug(self, control: int, bps: tuple[tuple[int, int], ...] = (),
                        wps: tuple[tuple[int, int], ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG with (bvr, bcr) and (wvr, wcr) pairs; skipped
        when nothing changed since the last call."""
        key = (control, bps, wps)
        if key == self._debug:
            return
        dbg = abi.KvmGuestDebugArm64(control=control)
        for i, (bvr, bcr) in enumerate(bps):
            dbg.dbg_bvr[i], dbg.dbg_bcr[i] = bvr, bcr
        for i, (wvr, wcr) in enumerate(wps):
            dbg.dbg_wvr[i], dbg.dbg_wcr[i] = wvr, wcr
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, dbg, "KVM_SET_GUEST_DEBUG")
        self._debug = key

    # --- running -------------------------------------------------------------------------

    def summary(self) -> str:
        try:
            return (f"vCPU {self.index}: pc={self.pc:#x} pstate={self.pstate:#x} "
                    f"x0={self.core(abi.CORE_X0):#x} sctlr={self.sys('SCTLR_EL1'):#x} "
                    f"esr={self.sys('ESR_EL1'):#x} vbar={self.sys('VBAR_EL1'):#x}")
        except OSError as e:
            return f"vCPU {self.index}: registers unreadable ({e})"

