"""x86 register access of the KVM debug target, driven by the arch table.

Each register of :data:`vmscope.arch.x86_64.X86_64` says where KVM keeps it
(``Register.kvm``: a field of ``kvm_regs``, ``kvm_sregs`` or ``kvm_fpu``;
else ``Register.msr``: an MSR). Reads fetch a structure once per stop (the
vCPU caches it) and take every register in it; writes patch the fetched
structure and set it back in one ioctl per structure, MSRs in one
KVM_SET_MSRS. Adding a register is its table line; nothing here names one.

A register KVM does not keep (``fiseg``/``foseg``: FXSAVE in 64-bit mode
stores no x87 selectors) reads as 0 and refuses any other value, rather than
accept a write and drop it.
"""

from __future__ import annotations

import errno
from typing import Mapping

from vmscope.arch.registers import Arch, Register
from vmscope.gdbserver.target import TargetError
from vmscope.gdbserver.toolkit import LazyRegisters
from vmscope.kvm import abi
from vmscope.kvm.fields import FieldRef, read_field, resolve, write_field
from vmscope.kvm.x86.vcpu import Vcpu

#: which ctypes structure each ``Register.kvm`` prefix names
STRUCTS = {"regs": abi.KvmRegs, "sregs": abi.KvmSregs, "fpu": abi.KvmFpu}


class Access:
    """How one register is reached: ``group`` ("regs", "sregs", "fpu",
    "msr" or None: not kept by KVM), the field, and a conversion."""

    __slots__ = ("reg", "group", "ref", "convert", "msr")

    def __init__(self, reg: Register):
        self.reg = reg
        self.ref: FieldRef | None = None
        self.convert = None
        self.msr = None
        if reg.kvm is not None:
            spec, _, self.convert = reg.kvm.partition(":")
            self.group, _, path = spec.partition(".")
            self.ref = resolve(STRUCTS[self.group], path)
        elif reg.msr is not None:
            self.group, self.msr = "msr", reg.msr
        else:
            self.group = None

    def get(self, state) -> int:
        raw = read_field(state, self.ref, self.reg.size)
        return _full_tag_word(raw) if self.convert == "tag" else raw

    def put(self, state, value: int) -> None:
        if self.convert == "tag":
            value = _abridged_tag_word(value)
        width = min(self.reg.size, self.ref.size)
        if value >> (8 * width):
            raise TargetError(f"{self.reg.name} holds {8 * width} bits under KVM; {value:#x} does not fit", errno.EINVAL)
        write_field(state, self.ref, self.reg.size, value)


class AccessTable:
    """Every register of an x86 arch table, by name."""

    def __init__(self, arch: Arch):
        self.by_name: dict[str, Access] = {r.name: Access(r) for r in arch.registers}


_TABLES: dict[int, tuple[Arch, AccessTable]] = {}


def access_table(arch: Arch) -> AccessTable:
    """The (cached) access table of ``arch``: X86_64, or a table with more lines."""
    entry = _TABLES.get(id(arch))
    if entry is None or entry[0] is not arch:
        entry = _TABLES[id(arch)] = (arch, AccessTable(arch))
    return entry[1]


#: registers that are whole fields of KVM's GPR structure under their own names
_GPR_FIELDS = frozenset(name for name, _ in abi.KvmRegs._fields_)
_FETCH = {"regs": Vcpu.regs, "sregs": Vcpu.sregs, "fpu": Vcpu.fpu}
_STORE = {"regs": Vcpu.set_regs, "sregs": Vcpu.set_sregs, "fpu": Vcpu.set_fpu}


class _LazyRegisters(LazyRegisters):
    """Register values by name, each structure read from KVM on first use
    (and then cached by the vCPU until it runs again)."""

    def __init__(self, target, v: Vcpu):
        super().__init__(target.arch.index)
        self._t, self._v = target, v
        self._values: dict[str, int] = {}
        self._table = access_table(target.arch)

    def _fetch(self, name: str) -> int:
        """One register: its structure comes from the vCPU's cache (one
        ioctl per structure and stop, none for what KVM synced), and only
        the asked field is decoded: a stop reply decodes 3 of 18 GPRs."""
        value = self._values.get(name)
        if value is None:
            access = self._table.by_name[name]
            if access.group in _FETCH:
                value = access.get(_FETCH[access.group](self._v))
            elif access.group == "msr":
                value = self._t._msr(self._v, access.msr)
            else:
                value = 0
            self._values[name] = value
        return value


class X86Registers:
    """Mixin of :class:`~vmscope.kvm.x86.target.KvmTarget`: registers by name."""

    def read_registers(self, tid: int) -> Mapping[str, int]:
        """A mapping that fetches each structure (GPRs, control/segment
        state, FPU/SSE, MSRs) on first use: a stop reply needs only
        rip/rsp/rbp, so stepping costs one KVM_GET_REGS, not four ioctls."""
        self._require_stopped()  # a vCPU ioctl would block until KVM_RUN returns
        return _LazyRegisters(self, self._vcpu(tid))

    def stop_registers(self, tid: int, names: tuple[str, ...]) -> Mapping[str, int]:
        """The stop reply's registers (rip, rsp, rbp) straight from the GPR
        structure KVM synced at the exit: the lazy mapping decodes each
        field through its table entry, 8 us of a 17 us stop reply."""
        self._require_stopped()
        regs = self._vcpu(tid).regs()
        if all(name in _GPR_FIELDS for name in names):
            return {name: getattr(regs, name) for name in names}
        return self.read_registers(tid)

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
        table = access_table(self.arch).by_name
        unknown = set(values) - set(table)
        if unknown:
            raise TargetError(f"no such register(s): {', '.join(sorted(unknown))}", errno.EINVAL)
        by_group: dict[str | None, list[Access]] = {}
        for name in values:
            access = table[name]
            by_group.setdefault(access.group, []).append(access)
        for access in by_group.get(None, ()):
            if values[access.reg.name] != 0:
                raise TargetError(f"{access.reg.name} is not kept by KVM (reads as 0) and cannot be set", errno.EINVAL)
        for group, store in _STORE.items():
            if group in by_group:
                state = _FETCH[group](v)
                for access in by_group[group]:
                    access.put(state, values[access.reg.name])
                try:
                    store(v, state)
                except OSError as e:  # KVM refuses a state no CPU can be in (e.g. CR0.PG without PE)
                    names = ", ".join(a.reg.name for a in by_group[group])
                    raise TargetError(f"KVM refused these values of {names}: {e.strerror or e}", errno.EINVAL) \
                        from None
        msrs = {a.msr: values[a.reg.name] for a in by_group.get("msr", ())}
        if msrs:
            too_wide = [a.reg.name for a in by_group["msr"] if values[a.reg.name] >> a.reg.bitsize]
            if too_wide:
                raise TargetError(f"value too wide for {', '.join(too_wide)}", errno.EINVAL)
            try:
                v.set_msrs(msrs)
            except OSError as e:
                raise TargetError(str(e), errno.EINVAL) from None
            for index in msrs:  # read back from KVM next time: what it holds, not what we sent
                self._msr_cache.pop((v.index << 32) | index, None)
        if "sregs" in by_group:
            self.translator.clear()


def _full_tag_word(ftwx: int) -> int:
    """FXSAVE's abridged tag byte -> the x87 tag word GDB shows (valid or
    empty; the finer zero/special tags need the register values)."""
    tag = 0
    for i in range(8):
        tag |= (0b00 if ftwx & (1 << i) else 0b11) << (2 * i)
    return tag


def _abridged_tag_word(tag: int) -> int:
    return sum(1 << i for i in range(8) if (tag >> (2 * i)) & 0b11 != 0b11)
