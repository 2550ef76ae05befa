"""x86 register access of the KVM debug target: GPRs (KVM_GET/SET_REGS),
segment and control registers (KVM_GET/SET_SREGS), x87/SSE (KVM_GET/SET_FPU)
and MSRs (KVM_GET/SET_MSRS), read lazily by group.
"""

from __future__ import annotations

import errno
from typing import Mapping

from vmscope.gdbserver.target import TargetError
from vmscope.kvm import abi
from vmscope.kvm.x86.vcpu import Vcpu

MSR_KERNEL_GS_BASE = 0xC0000102

GPRS = ("rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip").split()
SEGS = ("cs", "ss", "ds", "es", "fs", "gs")
FPU_NAMES = frozenset(
    [f"st{i}" for i in range(8)] + [f"xmm{i}" for i in range(16)]
    + "fctrl fstat ftag fiseg fioff foseg fooff fop mxcsr".split()
)
SREG_NAMES = frozenset(SEGS + ("fs_base", "gs_base", "cr0", "cr2", "cr3", "cr4", "cr8", "efer"))


class _LazyRegisters(Mapping):
    """Register values by name, each group read from KVM on first access
    (and then cached by the vCPU until it runs again)."""

    def __init__(self, target, v: Vcpu):
        self._t, self._v = target, v
        self._values: dict[str, int] = {}
        self._names = target.arch.index

    def _group(self, name: str) -> dict[str, int]:
        if name in FPU_NAMES:
            return self._t._fpu_values(self._v)
        if name in SREG_NAMES:
            return self._t._sreg_values(self._v)
        if name == "k_gs_base":
            return {"k_gs_base": self._t._msr(self._v, MSR_KERNEL_GS_BASE)}
        return self._t._gpr_values(self._v)

    def __getitem__(self, name: str) -> int:
        if name not in self._names:
            raise KeyError(name)
        if name not in self._values:
            self._values.update(self._group(name))
        return self._values[name]

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class X86Registers:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`: registers by name."""

    def read_registers(self, tid: int) -> Mapping[str, int]:
        """A mapping that fetches each group (GPRs, control/segment state,
        FPU/SSE, MSRs) on first use: a stop reply needs only rip/rsp/rbp,
        so stepping costs one KVM_GET_REGS, not four ioctls."""
        self._require_stopped()  # a vCPU ioctl would block until KVM_RUN returns
        return _LazyRegisters(self, self._vcpu(tid))

    def _gpr_values(self, v: Vcpu) -> dict[str, int]:
        r = v.regs()
        out = {name: getattr(r, name) for name in GPRS}
        out["eflags"] = r.rflags
        return out

    def _sreg_values(self, v: Vcpu) -> dict[str, int]:
        s = v.sregs()
        out = {name: getattr(s, name).selector for name in SEGS}
        out["fs_base"], out["gs_base"] = s.fs.base, s.gs.base
        for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer"):
            out[name] = getattr(s, name)
        return out

    def _fpu_values(self, v: Vcpu) -> dict[str, int]:
        f = v.fpu()
        out = {}
        for i in range(8):
            out[f"st{i}"] = int.from_bytes(bytes(f.fpr[i])[:10], "little")
        out["fctrl"], out["fstat"] = f.fcw, f.fsw
        out["ftag"] = _full_tag_word(f.ftwx)
        out["fioff"], out["fooff"], out["fop"] = f.last_ip & 0xFFFFFFFF, f.last_dp & 0xFFFFFFFF, f.last_opcode
        out["fiseg"] = out["foseg"] = 0  # FXSAVE in 64-bit mode keeps no selectors
        for i in range(16):
            out[f"xmm{i}"] = int.from_bytes(bytes(f.xmm[i]), "little")
        out["mxcsr"] = f.mxcsr
        return out

    def _msr(self, v: Vcpu, index: int) -> int:
        key = (v.index << 32) | index
        if key not in self._msr_cache:
            msrs = abi.msrs_struct(1)()
            msrs.nmsrs = 1
            msrs.entries[0].index = index
            try:
                n = abi.ioctl(v.fd, abi.KVM_GET_MSRS, msrs, "KVM_GET_MSRS")
            except OSError:
                n = 0
            self._msr_cache[key] = msrs.entries[0].data if n == 1 else 0
        return self._msr_cache[key]

    def write_registers(self, tid: int, values: Mapping[str, int]) -> None:
        self._require_stopped()
        v = self._vcpu(tid)
        names = set(values)
        unknown = names - set(self.arch.index)
        if unknown:
            raise TargetError(f"no such register(s): {', '.join(sorted(unknown))}", errno.EINVAL)
        if names & (set(GPRS) | {"eflags"}):
            r = v.regs()
            for name in names & set(GPRS):
                setattr(r, name, values[name] & (2**64 - 1))
            if "eflags" in names:
                r.rflags = values["eflags"] & 0xFFFFFFFF
            v.set_regs(r)
        if names & SREG_NAMES:
            s = v.sregs()
            for name in names & set(SEGS):
                getattr(s, name).selector = values[name] & 0xFFFF
            if "fs_base" in names:
                s.fs.base = values["fs_base"]
            if "gs_base" in names:
                s.gs.base = values["gs_base"]
            for name in names & {"cr0", "cr2", "cr3", "cr4", "cr8", "efer"}:
                setattr(s, name, values[name])
            v.set_sregs(s)
            self.translator.clear()
        if names & FPU_NAMES:
            f = v.fpu()
            for i in range(8):
                if f"st{i}" in names:
                    raw = values[f"st{i}"].to_bytes(10, "little") + bytes(6)
                    for j, b in enumerate(raw):
                        f.fpr[i][j] = b
            for i in range(16):
                if f"xmm{i}" in names:
                    for j, b in enumerate(values[f"xmm{i}"].to_bytes(16, "little")):
                        f.xmm[i][j] = b
            if "fctrl" in names:
                f.fcw = values["fctrl"] & 0xFFFF
            if "fstat" in names:
                f.fsw = values["fstat"] & 0xFFFF
            if "ftag" in names:
                f.ftwx = _abridged_tag_word(values["ftag"])
            if "fop" in names:
                f.last_opcode = values["fop"] & 0xFFFF
            if "fioff" in names:
                f.last_ip = values["fioff"]
            if "fooff" in names:
                f.last_dp = values["fooff"]
            if "mxcsr" in names:
                f.mxcsr = values["mxcsr"] & 0xFFFFFFFF
            v.set_fpu(f)


def _full_tag_word(ftwx: int) -> int:
    """FXSAVE's abridged tag byte -> the x87 tag word GDB shows (valid or
    empty; the finer zero/special tags need the register values)."""
    tag = 0
    for i in range(8):
        tag |= (0b00 if ftwx & (1 << i) else 0b11) << (2 * i)
    return tag


def _abridged_tag_word(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 0b11 != 0b11)
