"""The arm64 KVM back end's pure parts, checked against values from the Arm
ARM and from the kernel's uapi headers (as QEMU and kvmtool spell them),
so they run on any host. The back end itself runs in the arm64 lab
(tests/lab/test_arm64_kvm.py)."""

from __future__ import annotations

import platform

import pytest

from vmscope.arch.aarch64 import AARCH64
from vmscope.kvm.arm64 import abi
from vmscope.kvm.arm64.debugarch import (
    bcr_value,
    brk_esr,
    bvr_value,
    changes_daif,
    decode_esr,
    is_brk,
    watch_covers,
    watch_registers,
)
from vmscope.kvm.arm64.registers import REGISTER_IDS, live_sp_offset


# --- ONE_REG ids ----------------------------------------------------------------------

@pytest.mark.parametrize("offset, bits, expected", [
    (abi.CORE_X0, 64, 0x6030_0000_0010_0000),           # regs.regs[0]
    (abi.CORE_X0 + 8 * 30, 64, 0x6030_0000_0010_003C),  # regs.regs[30] (lr)
    (abi.CORE_SP_EL0, 64, 0x6030_0000_0010_003E),       # regs.sp
    (abi.CORE_PC, 64, 0x6030_0000_0010_0040),           # regs.pc
    (abi.CORE_PSTATE, 64, 0x6030_0000_0010_0042),       # regs.pstate
    (abi.CORE_SP_EL1, 64, 0x6030_0000_0010_0044),
    (abi.CORE_ELR_EL1, 64, 0x6030_0000_0010_0046),
    (abi.CORE_SPSR_EL1, 64, 0x6030_0000_0010_0048),     # spsr[KVM_SPSR_EL1]
    (abi.CORE_VREGS, 128, 0x6040_0000_0010_0054),       # fp_regs.vregs[0], 16-byte aligned
    (abi.CORE_VREGS + 16 * 31, 128, 0x6040_0000_0010_00D0),
    (abi.CORE_FPSR, 32, 0x6020_0000_0010_00D4),
    (abi.CORE_FPCR, 32, 0x6020_0000_0010_00D5),
])
def test_core_register_ids_match_struct_kvm_regs(offset, bits, expected):
    assert abi.core_reg(offset, bits) == expected


@pytest.mark.parametrize("name, expected", [
    ("MPIDR_EL1", 0x6030_0000_0013_C005),   # S3_0_C0_C0_5
    ("SCTLR_EL1", 0x6030_0000_0013_C080),   # S3_0_C1_C0_0
    ("TTBR0_EL1", 0x6030_0000_0013_C100),
    ("TTBR1_EL1", 0x6030_0000_0013_C101),
    ("TCR_EL1", 0x6030_0000_0013_C102),
    ("ESR_EL1", 0x6030_0000_0013_C290),     # S3_0_C5_C2_0
    ("FAR_EL1", 0x6030_0000_0013_C300),
    ("MAIR_EL1", 0x6030_0000_0013_C510),
    ("VBAR_EL1", 0x6030_0000_0013_C600),
    ("TPIDR_EL1", 0x6030_0000_0013_C684),
    ("TPIDR_EL0", 0x6030_0000_0013_DE82),   # S3_3_C13_C0_2
])
def test_system_register_ids_follow_the_mrs_encoding(name, expected):
    assert abi.sysreg(*abi.SYSREGS[name]) == expected


def test_bad_register_encodings_are_refused_with_the_field_named():
    with pytest.raises(ValueError, match="CRn=16"):
        abi.sysreg(3, 0, 16, 0, 0)
    with pytest.raises(ValueError, match="multiple of 4"):
        abi.core_reg(6)


def test_ioctl_numbers_match_the_uapi_headers():
    assert abi.KVM_GET_ONE_REG == 0x4010_AEAB
    assert abi.KVM_SET_ONE_REG == 0x4010_AEAC
    assert abi.KVM_ARM_VCPU_INIT == 0x4020_AEAE
    assert abi.KVM_ARM_PREFERRED_TARGET == 0x8020_AEAF
    # struct kvm_guest_debug on arm64: control, pad, 4 x 16 debug registers
    assert abi.KVM_SET_GUEST_DEBUG == 0x4208_AE9B


# ids as <uapi/asm/kvm.h> defines them: core registers by their offset in
# struct kvm_regs / 4, system registers by their MRS encoding
@pytest.mark.parametrize("name, expected", [
    ("x0", 0x6030_0000_0010_0000), ("x30", 0x6030_0000_0010_003C), ("SP_EL0", 0x6030_0000_0010_003E),
    ("pc", 0x6030_0000_0010_0040), ("cpsr", 0x6030_0000_0010_0042), ("SP_EL1", 0x6030_0000_0010_0044),
    ("ELR_EL1", 0x6030_0000_0010_0046), ("SPSR_EL1", 0x6030_0000_0010_0048),
    ("v0", 0x6040_0000_0010_0054), ("v31", 0x6040_0000_0010_00D0),
    ("fpsr", 0x6020_0000_0010_00D4), ("fpcr", 0x6020_0000_0010_00D5),
    ("MPIDR_EL1", 0x6030_0000_0013_C005), ("SCTLR_EL1", 0x6030_0000_0013_C080),
    ("TTBR0_EL1", 0x6030_0000_0013_C100), ("TTBR1_EL1", 0x6030_0000_0013_C101), ("TCR_EL1", 0x6030_0000_0013_C102),
    ("ESR_EL1", 0x6030_0000_0013_C290), ("FAR_EL1", 0x6030_0000_0013_C300), ("MAIR_EL1", 0x6030_0000_0013_C510),
    ("VBAR_EL1", 0x6030_0000_0013_C600), ("TPIDR_EL1", 0x6030_0000_0013_C684), ("TPIDR_EL0", 0x6030_0000_0013_DE82),
])
def test_arch_table_lines_map_to_kvm_one_reg_ids(name, expected):
    assert abi.register_id(AARCH64.register(name)) == expected
    assert REGISTER_IDS[name] == expected


def test_every_table_register_has_a_kvm_id_or_is_derived_from_pstate():
    derived = {r.name for r in AARCH64.registers if abi.register_id(r) is None}
    assert derived == {"sp", "CurrentEL"}
    for r in AARCH64.registers:  # the id's size holds the whole register
        if r.name not in derived:
            assert 8 << (abi.register_id(r) >> 52 & 0xF) >= r.bitsize, r.name


def test_every_register_gdb_asks_for_has_a_source():
    served = set(REGISTER_IDS) | {"sp", "CurrentEL"}
    assert set(AARCH64.index) <= served
    assert REGISTER_IDS["ELR_EL1"] == abi.core_reg(abi.CORE_ELR_EL1)
    assert REGISTER_IDS["v31"] >> 52 & 0xF == 4  # 128-bit


@pytest.mark.parametrize("pstate, live", [
    (0x3C5, abi.CORE_SP_EL1),   # EL1h, DAIF masked: the reset state
    (0x3C4, abi.CORE_SP_EL0),   # EL1t
    (0x000, abi.CORE_SP_EL0),   # EL0t
    (0x6000_0005, abi.CORE_SP_EL1),  # EL1h with Z and C set
])
def test_sp_is_the_stack_pointer_selected_by_pstate(pstate, live):
    assert live_sp_offset(pstate) == live


# --- ESR decoding ---------------------------------------------------------------------

@pytest.mark.parametrize("esr, cause, extra", [
    (0xF200_0000, "brk", {"comment": 0}),           # BRK #0, EC 0x3C, IL
    (0xF200_1234, "brk", {"comment": 0x1234}),
    (0xCA00_0022, "step", {}),                       # software step, lower EL, EX=0
    (0xC200_0022, "hw-breakpoint", {}),              # breakpoint, lower EL
    (0xD200_0062, "watchpoint", {"write": True}),    # watchpoint, WnR=1, DFSC debug
    (0xD200_0022, "watchpoint", {"write": False}),
    (0x5A00_0000, "unknown", {}),                    # HVC64: not a debug exit
])
def test_esr_exception_class_gives_the_stop_cause(esr, cause, extra):
    ex = decode_esr(esr)
    assert ex.cause == cause
    for k, v in extra.items():
        assert getattr(ex, k) == v


def test_brk_syndrome_for_reinjection():
    assert brk_esr(0) == 0xF200_0000
    assert brk_esr(0x3E8) == 0xF200_03E8  # Linux's BUG() immediate
    assert decode_esr(brk_esr(0x800)).comment == 0x800


def test_brk_instruction_recognised_with_any_immediate():
    assert is_brk(0xD420_0000)
    assert is_brk(0xD422_4680)  # brk #0x1234
    assert not is_brk(0xD400_0002)  # hvc #0
    assert not is_brk(0xD503_201F)  # nop


# --- breakpoint and watchpoint registers -------------------------------------------------

def test_breakpoint_control_matches_the_hypervisor_stubs():
    # E=1, PMC=0b11 (EL1 and EL0), BAS=0b1111: QEMU's KVM arm64 stub uses the same
    assert bcr_value() == 0x1E7
    assert bvr_value(0x4008_0010) == 0x4008_0010
    with pytest.raises(ValueError, match="not 4-byte aligned"):
        bvr_value(0x4008_0012)


@pytest.mark.parametrize("addr, length, kind, wvr, wcr", [
    (0x4008_1000, 8, "write", 0x4008_1000, 0x1FF7),   # BAS=0xff, LSC=10, PAC=11, E
    (0x4008_1000, 8, "read", 0x4008_1000, 0x1FEF),    # LSC=01
    (0x4008_1000, 8, "access", 0x4008_1000, 0x1FFF),  # LSC=11
    (0x4008_1004, 2, "access", 0x4008_1000, 0x061F),  # BAS=0b00110000
    (0x4008_1007, 1, "write", 0x4008_1000, 0x1017),   # BAS=0b10000000
    (0x4008_1010, 16, "write", 0x4008_1010, 0x0400_1FF7),  # MASK=4: a 16-byte block
])
def test_watchpoint_registers(addr, length, kind, wvr, wcr):
    assert watch_registers(addr, length, kind) == (wvr, wcr)
    assert watch_covers(wvr, wcr, addr) and watch_covers(wvr, wcr, addr + length - 1)
    assert not watch_covers(wvr, wcr, addr + length)
    assert not watch_covers(wvr, wcr, addr - 1)


def test_unwatchable_ranges_say_why():
    with pytest.raises(ValueError, match="aligned doubleword"):
        watch_registers(0x4008_1006, 3, "write")
    with pytest.raises(ValueError, match="not read, write or access"):
        watch_registers(0x4008_1000, 8, "exec")


@pytest.mark.parametrize("insn, changes", [
    (0xD503_43DF, True),   # msr daifset, #3
    (0xD503_42FF, True),   # msr daifclr, #2
    (0xD51B_4220, True),   # msr daif, x0
    (0xD69F_03E0, True),   # eret
    (0xD503_201F, False),  # nop
    (0xD53B_4220, False),  # mrs x0, daif (reads only)
    (0xD500_409F, False),  # msr pan, #0 (op1=0, op2=4)
])
def test_instructions_that_write_daif(insn, changes):
    assert changes_daif(insn) is changes


def test_cache_maintenance_routine_is_what_its_comment_says():
    import capstone

    from vmscope.kvm.arm64.icache import CLEAR_CACHE_A64

    md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    text = [f"{i.mnemonic} {i.op_str}".strip() for i in md.disasm(CLEAR_CACHE_A64, 0)]
    assert len(text) * 4 == len(CLEAR_CACHE_A64)
    assert "dc cvau, x2" in text and "ic ivau, x2" in text
    assert text.index("dc cvau, x2") < text.index("ic ivau, x2")
    assert text[-3:] == ["dsb ish", "isb", "ret"]


@pytest.mark.skipif(platform.machine() == "aarch64", reason="checks the refusal on other hosts")
def test_machine_refuses_a_non_arm64_host_clearly():
    from vmscope.kvm.arm64 import Arm64KvmMachine
    from vmscope.machine import MachineConfig, MachineUnavailable

    with pytest.raises(MachineUnavailable, match="needs an arm64 host"):
        Arm64KvmMachine(MachineConfig(arch="aarch64"))
    with pytest.raises(MachineUnavailable, match="runs aarch64 guests"):
        Arm64KvmMachine(MachineConfig(arch="x86_64"))


# --- load/store-exclusive sequences (the demo guest's tick) -------------------------------

def _demo_fetch():
    import struct

    from elftools.elf.elffile import ELFFile

    from vmscope.guests import guest_elf

    with open(guest_elf("demo", "aarch64"), "rb") as f:
        elf = ELFFile(f)
        seg = next(s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD" and s["p_flags"] & 1)
        data, base = seg.data(), seg["p_vaddr"]
        symbols = {s.name: s["st_value"] for s in elf.get_section_by_name(".symtab").iter_symbols()}

    def fetch(addr):
        off = addr - base
        return struct.unpack_from("<I", data, off)[0] if 0 <= off <= len(data) - 4 else None

    return fetch, symbols


def test_exclusive_sequence_found_from_its_load_body_and_store():
    from vmscope.kvm.arm64.debugarch import exclusive_sequence, is_load_exclusive, is_store_exclusive

    fetch, sym = _demo_fetch()
    tick = sym["tick"]
    # tick: ldr x1, =counter; 1: ldxr x2, [x1]; add x2, x2, #1; stxr w3, x2, [x1]; cbnz w3, 1b
    assert is_load_exclusive(fetch(tick + 4)) and is_store_exclusive(fetch(tick + 12))
    for pc in (tick + 4, tick + 8, tick + 12):
        seq = exclusive_sequence(pc, fetch)
        assert (seq.start, seq.end, seq.status_reg) == (tick + 4, tick + 16, 3)
    assert exclusive_sequence(tick, fetch) is None  # before the ldxr
    assert exclusive_sequence(tick + 16, fetch) is None  # the cbnz after the store
    assert exclusive_sequence(sym["announce"] + 12, fetch) is None  # ldar: acquire, not exclusive


@pytest.mark.parametrize("insn, load, store", [
    (0xC85F_7C22, True, False),   # ldxr x2, [x1]
    (0xC85F_FC22, True, False),   # ldaxr x2, [x1]
    (0xC803_7C22, False, True),   # stxr w3, x2, [x1]
    (0x8803_FC22, False, True),   # stlxr w3, w2, [x1]
    (0x88DF_FC22, False, False),  # ldar w2, [x1]
    (0x889F_FC22, False, False),  # stlr w2, [x1]
    (0xC8A3_7C22, False, False),  # cas x3, x2, [x1] (LSE)
])
def test_exclusive_instruction_classes(insn, load, store):
    from vmscope.kvm.arm64.debugarch import is_load_exclusive, is_store_exclusive

    assert is_load_exclusive(insn) is load
    assert is_store_exclusive(insn) is store
