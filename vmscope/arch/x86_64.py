"""x86_64 as GDB sees it: the i386:x86-64 core and SSE features, then
segment bases and the system registers QEMU's gdbstub also exposes.

Layout of ``g`` (GDB's amd64 numbering): rax..r15, rip, eflags, segment
selectors, x87, SSE, then fs_base/gs_base/k_gs_base and cr0/cr2/cr3/cr4/
cr8/efer. GDB shows the integer-typed system registers in ``info registers``.
"""

from __future__ import annotations

from vmscope.arch.registers import Arch, Feature, Register, regs

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

REGISTERS: tuple[Register, ...] = tuple(
    regs(CORE, "rax rbx rcx rdx rsi rdi", 64, "int64")
    + [Register("rbp", 64, CORE, "data_ptr"), Register("rsp", 64, CORE, "data_ptr")]
    + regs(CORE, "r8 r9 r10 r11 r12 r13 r14 r15", 64, "int64")
    + [Register("rip", 64, CORE, "code_ptr"), Register("eflags", 32, CORE, "i386_eflags")]
    + regs(CORE, "cs ss ds es fs gs", 32, "int32")
    + regs(CORE, "st0 st1 st2 st3 st4 st5 st6 st7", 80, "i387_ext")
    + regs(CORE, "fctrl fstat ftag fiseg fioff foseg fooff fop", 32, "int", "float")
    + regs(SSE, " ".join(f"xmm{i}" for i in range(16)), 128, "vec128")
    + [Register("mxcsr", 32, SSE, "i386_mxcsr", "vector")]
    + regs(SEGMENTS, "fs_base gs_base", 64, "int")
    + regs(SYSTEM, "k_gs_base cr0 cr2 cr3 cr4 cr8 efer", 64, "int")
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
