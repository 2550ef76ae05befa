"""x86_64 as GDB sees it: the i386:x86-64 core and SSE features, then
segment bases and the system registers QEMU's gdbstub also exposes.

Layout of ``g`` (GDB's amd64 numbering): rax..r15, rip, eflags, segment
selectors, x87, SSE, then fs_base/gs_base/k_gs_base and cr0/cr2/cr3/cr4/
cr8/efer. GDB shows the integer-typed system registers in ``info registers``.
"""

from __future__ import annotations

from vmscope.arch.registers import Arch, Feature, Register

CORE = "org.gnu.gdb.i386.core"
SSE = "org.gnu.gdb.i386.sse"
SEGMENTS = "org.gnu.gdb.i386.segments"
SYSTEM = "org.vmscope.x86.system"

_CORE_TYPES = """
    <flags id="i386_eflags" size="4">
      <field name="CF" start="0" end="0"/>
      <field name="" start="1" end="1"/>
      <field name="PF" start="2" end="2"/>
      <field name="AF" start="4" end="4"/>
      <field name="ZF" start="6" end="6"/>
      <field name="SF" start="7" end="7"/>
      <field name="TF" start="8" end="8"/>
      <field name="IF" start="9" end="9"/>
      <field name="DF" start="10" end="10"/>
      <field name="OF" start="11" end="11"/>
      <field name="NT" start="14" end="14"/>
      <field name="RF" start="16" end="16"/>
      <field name="VM" start="17" end="17"/>
      <field name="AC" start="18" end="18"/>
      <field name="VIF" start="19" end="19"/>
      <field name="VIP" start="20" end="20"/>
      <field name="ID" start="21" end="21"/>
    </flags>"""

_SSE_TYPES = """
    <vector id="v8bf16" type="bfloat16" count="8"/>
    <vector id="v4f" type="ieee_single" count="4"/>
    <vector id="v2d" type="ieee_double" count="2"/>
    <vector id="v16i8" type="int8" count="16"/>
    <vector id="v8i16" type="int16" count="8"/>
    <vector id="v4i32" type="int32" count="4"/>
    <vector id="v2i64" type="int64" count="2"/>
    <union id="vec128">
      <field name="v8_bfloat16" type="v8bf16"/>
      <field name="v4_float" type="v4f"/>
      <field name="v2_double" type="v2d"/>
      <field name="v16_int8" type="v16i8"/>
      <field name="v8_int16" type="v8i16"/>
      <field name="v4_int32" type="v4i32"/>
      <field name="v2_int64" type="v2i64"/>
      <field name="uint128" type="uint128"/>
    </union>
    <flags id="i386_mxcsr" size="4">
      <field name="IE" start="0" end="0"/>
      <field name="DE" start="1" end="1"/>
      <field name="ZE" start="2" end="2"/>
      <field name="OE" start="3" end="3"/>
      <field name="UE" start="4" end="4"/>
      <field name="PE" start="5" end="5"/>
      <field name="DAZ" start="6" end="6"/>
      <field name="IM" start="7" end="7"/>
      <field name="DM" start="8" end="8"/>
      <field name="ZM" start="9" end="9"/>
      <field name="OM" start="10" end="10"/>
      <field name="UM" start="11" end="11"/>
      <field name="PM" start="12" end="12"/>
      <field name="FZ" start="15" end="15"/>
    </flags>"""

def _reg(name: str, bits: int, feature: str, type: str = "int", group: str | None = None, **access) -> Register:
    return Register(name, bits, feature, type, group, **access)


def _gpr(name: str, type: str = "int64") -> Register:
    return _reg(name, 64, CORE, type, kvm=f"regs.{name}", unicorn=f"UC_X86_REG_{name.upper()}")


#: One line per register (families by comprehension): GDB's name, size,
#: feature, type, group, then where KVM and Unicorn keep it.
REGISTERS: tuple[Register, ...] = (
    *(_gpr(n) for n in "rax rbx rcx rdx rsi rdi".split()),
    _gpr("rbp", "data_ptr"),
    _gpr("rsp", "data_ptr"),
    *(_gpr(f"r{i}") for i in range(8, 16)),
    _gpr("rip", "code_ptr"),
    _reg("eflags", 32, CORE, "i386_eflags", kvm="regs.rflags", unicorn="UC_X86_REG_EFLAGS"),
    *(_reg(n, 32, CORE, "int32", kvm=f"sregs.{n}.selector", unicorn=f"UC_X86_REG_{n.upper()}")
      for n in "cs ss ds es fs gs".split()),
    # Unicorn keeps the x87 registers physically (FP0-FP7); the emulated CPU
    # maps GDB's stack-relative st0-st7 onto them itself.
    *(_reg(f"st{i}", 80, CORE, "i387_ext", kvm=f"fpu.fpr[{i}]") for i in range(8)),
    _reg("fctrl", 32, CORE, "int", "float", kvm="fpu.fcw", unicorn="UC_X86_REG_FPCW"),
    _reg("fstat", 32, CORE, "int", "float", kvm="fpu.fsw", unicorn="UC_X86_REG_FPSW"),
    _reg("ftag", 32, CORE, "int", "float", kvm="fpu.ftwx:tag", unicorn="UC_X86_REG_FPTAG"),
    # KVM_GET_FPU (FXSAVE in 64-bit mode) keeps no x87 selectors: read as 0 there
    _reg("fiseg", 32, CORE, "int", "float", unicorn="UC_X86_REG_FCS"),
    _reg("fioff", 32, CORE, "int", "float", kvm="fpu.last_ip", unicorn="UC_X86_REG_FIP"),
    _reg("foseg", 32, CORE, "int", "float", unicorn="UC_X86_REG_FDS"),
    _reg("fooff", 32, CORE, "int", "float", kvm="fpu.last_dp", unicorn="UC_X86_REG_FDP"),
    _reg("fop", 32, CORE, "int", "float", kvm="fpu.last_opcode", unicorn="UC_X86_REG_FOP"),
    *(_reg(f"xmm{i}", 128, SSE, "vec128", kvm=f"fpu.xmm[{i}]", unicorn=f"UC_X86_REG_XMM{i}") for i in range(16)),
    _reg("mxcsr", 32, SSE, "i386_mxcsr", "vector", kvm="fpu.mxcsr", unicorn="UC_X86_REG_MXCSR"),
    _reg("fs_base", 64, SEGMENTS, kvm="sregs.fs.base", unicorn="UC_X86_REG_FS_BASE"),
    _reg("gs_base", 64, SEGMENTS, kvm="sregs.gs.base", unicorn="UC_X86_REG_GS_BASE"),
    _reg("k_gs_base", 64, SYSTEM, msr=0xC000_0102),  # IA32_KERNEL_GS_BASE (swapgs)
    _reg("cr0", 64, SYSTEM, kvm="sregs.cr0", unicorn="UC_X86_REG_CR0"),
    _reg("cr2", 64, SYSTEM, kvm="sregs.cr2", unicorn="UC_X86_REG_CR2"),
    _reg("cr3", 64, SYSTEM, kvm="sregs.cr3", unicorn="UC_X86_REG_CR3"),
    _reg("cr4", 64, SYSTEM, kvm="sregs.cr4", unicorn="UC_X86_REG_CR4"),
    _reg("cr8", 64, SYSTEM, kvm="sregs.cr8", unicorn="UC_X86_REG_CR8"),
    _reg("efer", 64, SYSTEM, kvm="sregs.efer", msr=0xC000_0080),  # IA32_EFER
)

X86_64 = Arch(
    name="i386:x86-64",
    features=(
        Feature(CORE, _CORE_TYPES),
        Feature(SSE, _SSE_TYPES),
        Feature(SEGMENTS),
        Feature(SYSTEM),
    ),
    registers=REGISTERS,
    pc="rip",
    sp="rsp",
    fp="rbp",
    breakpoint=b"\xcc",
    breakpoint_kind=1,
)
