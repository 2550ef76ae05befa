"""Architectures as data: one register table per architecture.

From a table come the ``target.xml`` GDB reads, the ``g``/``G`` packet layout,
``p``/``P`` register numbering, the expedited registers in stop replies and
the software-breakpoint opcode. Each line also says how every back end
reaches the register (``kvm``, ``msr``, ``sysreg``, ``unicorn``), and the
targets read and write generically from that, so adding a register (an x86
MSR, an arm64 system register) is one line in the table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Mapping


def quoteattr(value: str) -> str:
    """An XML attribute value in double quotes (xml.sax.saxutils would pull
    in urllib and http.client: 0.5 s of start-up in the nested lab)."""
    return '"' + value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;") + '"'


@dataclass(frozen=True)
class Register:
    """One register as GDB sees it.

    ``type`` is a GDB target-description type (``int64``, ``code_ptr``,
    ``i387_ext``, ``vec128``, or one defined in the feature's ``types``).
    ``group`` is GDB's register group (``None`` lets GDB decide: integer
    registers then show in ``info registers``).

    How back ends reach it (None: that way does not apply):

    - ``kvm``: a field of KVM's state structures, as a dotted path. x86:
      ``regs.<kvm_regs field>``, ``sregs.<kvm_sregs field>`` (``sregs.cs.selector``),
      ``fpu.<kvm_fpu field>`` (``fpu.xmm[3]``; a ``:tag`` suffix converts
      FXSAVE's abridged x87 tag byte). arm64: a ``struct kvm_regs`` path
      (``regs.regs[3]``, ``fp_regs.vregs[0]``, ``spsr[0]``), one ONE_REG id.
      A register narrower than its field is written read-modify-write.
    - ``msr``: an x86 MSR number (KVM_GET/SET_MSRS; Unicorn's
      ``UC_X86_REG_MSR``), used where ``kvm`` is None.
    - ``sysreg``: an arm64 system register's (op0, op1, CRn, CRm, op2)
      (KVM's ``KVM_REG_ARM64_SYSREG`` id; Unicorn's ``UC_ARM64_REG_CP_REG``),
      used where ``kvm`` is None.
    - ``unicorn``: the name of Unicorn's register constant
      (``UC_X86_REG_RAX``), for the emulated target.

    A register a back end has no way to reach is one it derives (arm64
    ``sp``: the stack pointer PSTATE selects) or cannot hold (x86 ``fiseg``
    under KVM: FXSAVE in 64-bit mode keeps no selectors); targets say which.
    """

    name: str
    bitsize: int
    feature: str
    type: str = "int"
    group: str | None = None
    kvm: str | None = None
    msr: int | None = None
    sysreg: tuple[int, int, int, int, int] | None = None
    unicorn: str | None = None

    @property
    def size(self) -> int:
        return self.bitsize // 8


@dataclass(frozen=True)
class Feature:
    """A ``<feature>`` of target.xml: its name and any type definitions."""

    name: str
    types_xml: str = ""


@dataclass(frozen=True)
class Arch:
    """An architecture: registers, features and breakpoint encoding."""

    name: str  # GDB's <architecture>, e.g. "i386:x86-64"
    features: tuple[Feature, ...]
    registers: tuple[Register, ...]
    pc: str
    sp: str
    fp: str
    breakpoint: bytes  # the software breakpoint instruction
    breakpoint_kind: int  # GDB's Z0 "kind" for it
    osabi: str | None = None
    expedite: tuple[str, ...] = field(default=())

    # --- lookups ----------------------------------------------------------

    @cached_property
    def index(self) -> dict[str, int]:
        """Register name -> GDB register number."""
        return {r.name: i for i, r in enumerate(self.registers)}

    def register(self, name_or_num: str | int) -> Register:
        if isinstance(name_or_num, int):
            return self.registers[name_or_num]
        return self.registers[self.index[name_or_num]]

    @cached_property
    def g_size(self) -> int:
        """Bytes of register data in a ``g`` reply."""
        return sum(r.size for r in self.registers)

    @property
    def expedited(self) -> tuple[str, ...]:
        """Registers sent with every stop reply, so GDB needs no ``g``."""
        return self.expedite or (self.pc, self.sp, self.fp)

    # --- encodings ----------------------------------------------------------

    def encode_register(self, name_or_num: str | int, value: int) -> bytes:
        reg = self.register(name_or_num)
        mask = (1 << reg.bitsize) - 1
        return (value & mask).to_bytes(reg.size, "little")

    def decode_register(self, name_or_num: str | int, raw: bytes) -> int:
        reg = self.register(name_or_num)
        if len(raw) != reg.size:
            raise ValueError(f"register {reg.name} is {reg.size} bytes, got {len(raw)}")
        return int.from_bytes(raw, "little")

    def encode_g(self, values: Mapping[str, int]) -> bytes:
        """All registers in table order, little-endian; missing ones are 0."""
        return b"".join(self.encode_register(r.name, values.get(r.name, 0)) for r in self.registers)

    def decode_g(self, raw: bytes) -> dict[str, int]:
        """Inverse of :meth:`encode_g`; a shorter packet sets a prefix of the
        registers (GDB may send fewer than we advertise)."""
        out: dict[str, int] = {}
        off = 0
        for r in self.registers:
            if off + r.size > len(raw):
                break
            out[r.name] = int.from_bytes(raw[off : off + r.size], "little")
            off += r.size
        return out

    @cached_property
    def target_xml(self) -> str:
        """The whole target description in one document."""
        lines = [
            '<?xml version="1.0"?>',
            '<!DOCTYPE target SYSTEM "gdb-target.dtd">',
            "<target>",
            f"  <architecture>{self.name}</architecture>",
        ]
        if self.osabi:
            lines.append(f"  <osabi>{self.osabi}</osabi>")
        for feat in self.features:
            lines.append(f"  <feature name={quoteattr(feat.name)}>")
            if feat.types_xml:
                lines.append(feat.types_xml.strip("\n"))
            for num, reg in enumerate(self.registers):
                if reg.feature != feat.name:
                    continue
                attrs = f'name="{reg.name}" bitsize="{reg.bitsize}" type="{reg.type}" regnum="{num}"'
                if reg.group:
                    attrs += f' group="{reg.group}"'
                lines.append(f"    <reg {attrs}/>")
            lines.append("  </feature>")
        lines.append("</target>")
        return "\n".join(lines) + "\n"


def regs(feature: str, names: str, bitsize: int, type: str = "int", group: str | None = None) -> list[Register]:
    """Several registers of one shape: ``regs(F, "x0 x1 x2", 64)``."""
    return [Register(n, bitsize, feature, type, group) for n in names.split()]
