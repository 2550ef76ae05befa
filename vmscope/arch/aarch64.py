"""AArch64 as GDB sees it: the ``org.gnu.gdb.aarch64.core`` and ``.fpu``
features exactly as GDB's own aarch64-core.xml/aarch64-fpu.xml describe them,
then a vmscope feature with the EL1 system registers kernel work needs.

Layout of ``g`` (GDB's aarch64 numbering): x0..x30, sp, pc (64 bits each)
and cpsr (32 bits) make the 268-byte core; v0..v31 (128 bits), fpsr and
fpcr follow as registers 34..67; the system registers come last. Because the
core and fpu features match GDB's built-in ones, ``gdb-multiarch`` picks the
aarch64 architecture from target.xml alone (no ``set architecture``).

The software breakpoint is ``BRK #0`` (``d4200000``), GDB's Z0 kind 4.
"""

from __future__ import annotations

from vmscope.arch.registers import Arch, Feature, Register

CORE = "org.gnu.gdb.aarch64.core"
FPU = "org.gnu.gdb.aarch64.fpu"
SYSTEM = "org.vmscope.aarch64.system"

_CORE_TYPES = """
    <flags id="cpsr_flags" size="4">
      <field name="SP" start="0" end="0"/>
      <field name="" start="1" end="1"/>
      <field name="EL" start="2" end="3"/>
      <field name="nRW" start="4" end="4"/>
      <field name="" start="5" end="5"/>
      <field name="F" start="6" end="6"/>
      <field name="I" start="7" end="7"/>
      <field name="A" start="8" end="8"/>
      <field name="D" start="9" end="9"/>
      <field name="IL" start="20" end="20"/>
      <field name="SS" start="21" end="21"/>
      <field name="V" start="28" end="28"/>
      <field name="C" start="29" end="29"/>
      <field name="Z" start="30" end="30"/>
      <field name="N" start="31" end="31"/>
    </flags>"""

_FPU_TYPES = """
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v2u" type="uint64" count="2"/>
    <vector id="v2i" type="int64" count="2"/>
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v4u" type="uint32" count="4"/>
    <vector id="v4i" type="int32" count="4"/>
    <vector id="v8f" type="ieee_half" count="8"/>
    <vector id="v8u" type="uint16" count="8"/>
    <vector id="v8i" type="int16" count="8"/>
    <vector id="v8bf16" type="bfloat16" count="8"/>
    <vector id="v16u" type="uint8" count="16"/>
    <vector id="v16i" type="int8" count="16"/>
    <vector id="v1u" type="uint128" count="1"/>
    <vector id="v1i" type="int128" count="1"/>
    <union id="vnd">
      <field name="f" type="v2d"/>
      <field name="u" type="v2u"/>
      <field name="s" type="v2i"/>
    </union>
    <union id="vns">
      <field name="f" type="v4f"/>
      <field name="u" type="v4u"/>
      <field name="s" type="v4i"/>
    </union>
    <union id="vnh">
      <field name="bf" type="v8bf16"/>
      <field name="f" type="v8f"/>
      <field name="u" type="v8u"/>
      <field name="s" type="v8i"/>
    </union>
    <union id="vnb">
      <field name="u" type="v16u"/>
      <field name="s" type="v16i"/>
    </union>
    <union id="vnq">
      <field name="u" type="v1u"/>
      <field name="s" type="v1i"/>
    </union>
    <union id="aarch64v">
      <field name="d" type="vnd"/>
      <field name="s" type="vns"/>
      <field name="h" type="vnh"/>
      <field name="b" type="vnb"/>
      <field name="q" type="vnq"/>
    </union>"""

def _reg(name: str, bits: int, feature: str, type: str = "int", group: str | None = None, **access) -> Register:
    return Register(name, bits, feature, type, group, **access)


def _sys(name: str, unicorn: bool = True, **access) -> Register:
    """An EL1 system register worth seeing while debugging a kernel. Names
    are the architectural ones (``p $TTBR1_EL1`` in GDB)."""
    return _reg(name, 64, SYSTEM, "uint64", "system", unicorn=f"UC_ARM64_REG_{name}" if unicorn else None, **access)


#: One line per register (families by comprehension): GDB's name, size,
#: feature, type, group, then where KVM (struct kvm_regs path or system
#: register encoding) and Unicorn keep it. ``sp`` is the stack pointer in
#: use (SP_EL0 or SP_EL1, by PSTATE) and ``CurrentEL`` comes from PSTATE.EL:
#: targets derive both.
REGISTERS: tuple[Register, ...] = (
    *(_reg(f"x{i}", 64, CORE, "int64", kvm=f"regs.regs[{i}]", unicorn=f"UC_ARM64_REG_X{i}") for i in range(31)),
    _reg("sp", 64, CORE, "data_ptr", unicorn="UC_ARM64_REG_SP"),
    _reg("pc", 64, CORE, "code_ptr", kvm="regs.pc", unicorn="UC_ARM64_REG_PC"),
    _reg("cpsr", 32, CORE, "cpsr_flags", kvm="regs.pstate", unicorn="UC_ARM64_REG_PSTATE"),
    *(_reg(f"v{i}", 128, FPU, "aarch64v", kvm=f"fp_regs.vregs[{i}]", unicorn=f"UC_ARM64_REG_Q{i}") for i in range(32)),
    _reg("fpsr", 32, FPU, kvm="fp_regs.fpsr", unicorn="UC_ARM64_REG_FPSR"),
    _reg("fpcr", 32, FPU, kvm="fp_regs.fpcr", unicorn="UC_ARM64_REG_FPCR"),
    _sys("SCTLR_EL1", unicorn=False, sysreg=(3, 0, 1, 0, 0)),
    _sys("TCR_EL1", unicorn=False, sysreg=(3, 0, 2, 0, 2)),
    _sys("TTBR0_EL1", sysreg=(3, 0, 2, 0, 0)),
    _sys("TTBR1_EL1", sysreg=(3, 0, 2, 0, 1)),
    _sys("MAIR_EL1", sysreg=(3, 0, 10, 2, 0)),
    _sys("VBAR_EL1", sysreg=(3, 0, 12, 0, 0)),
    _sys("ESR_EL1", sysreg=(3, 0, 5, 2, 0)),
    _sys("FAR_EL1", sysreg=(3, 0, 6, 0, 0)),
    _sys("ELR_EL1", kvm="elr_el1"),
    _sys("SPSR_EL1", unicorn=False, kvm="spsr[0]", sysreg=(3, 0, 4, 0, 0)),
    _sys("SP_EL0", kvm="regs.sp"),  # user_pt_regs.sp is SP_EL0
    _sys("SP_EL1", kvm="sp_el1"),
    _sys("TPIDR_EL0", sysreg=(3, 3, 13, 0, 2)),
    _sys("TPIDR_EL1", sysreg=(3, 0, 13, 0, 4)),
    _sys("MPIDR_EL1", unicorn=False, sysreg=(3, 0, 0, 0, 5)),
    _sys("CurrentEL", unicorn=False),
)

AARCH64 = Arch(
    name="aarch64",
    features=(
        Feature(CORE, _CORE_TYPES),
        Feature(FPU, _FPU_TYPES),
        Feature(SYSTEM),
    ),
    registers=REGISTERS,
    pc="pc",
    sp="sp",
    fp="x29",
    breakpoint=bytes.fromhex("000020d4"),  # BRK #0, little-endian
    breakpoint_kind=4,
)
