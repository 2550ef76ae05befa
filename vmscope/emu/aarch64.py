"""The emulated arm64 vCPU: EL1h, MMU off, at the ELF entry.

Separate Unicorn instances all read MPIDR_EL1 as CPU 0, so ``mrs`` of it is
trapped and answered with the CPU's own index; hvc/smc (Unicorn's CPU has
no EL2/EL3) are answered as PSCI firmware.
"""

from __future__ import annotations

import struct

from unicorn import UC_ARCH_ARM64, UC_MODE_ARM
from unicorn import arm64_const as A

from vmscope.arch.aarch64 import AARCH64
from vmscope.emu.cpu import EmuCpu
from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.target import TargetError
from vmscope.vmi.paging import stage1_address

#: SPSR_EL1 as Unicorn's UC_ARM64_REG_CP_REG names it: (crn, crm, op0, op1, op2)
#: (the registers GDB sees are reached through the arch table's ``sysreg``)
SPSR_EL1_CP = (4, 0, 3, 0, 0)
MPIDR_EL1_ENCODING = (3, 0, 0, 0, 5)  # op0, op1, crn, crm, op2
HVC_0, SMC_0 = 0xD400_0002, 0xD400_0003  # with the imm16 field masked out
PSCI_VERSION, PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET = 0x8400_0000, 0x8400_0008, 0x8400_0009
PSCI_VERSION_1_0 = 0x1_0000
PSCI_NOT_SUPPORTED = (1 << 64) - 1  # -1
EXCP_UDEF = 1
EXCP_HVC, EXCP_SMC = 11, 13
EXCP_BKPT = 7


class Arm64Cpu(EmuCpu):
    arch = AARCH64
    uc_arch = UC_ARCH_ARM64
    uc_mode = UC_MODE_ARM
    pc_id = A.UC_ARM64_REG_PC
    halt_opcodes = (bytes.fromhex("7f2003d5"), bytes.fromhex("5f2003d5"))  # wfi, wfe
    undefined_instruction_exception = 1  # EXCP_UDEF

    def __init__(self, index: int, ram: GuestRam) -> None:
        super().__init__(index, ram)
        #: what this CPU's MPIDR_EL1 reads as: Aff0 = CPU index, bit 31 RES1
        self.mpidr = 0x8000_0000 | (index & 0xFFFF)  # Aff1:Aff0

    def reset(self, entry: int) -> None:
        """EL1h with the MMU off, interrupts masked, at the ELF entry (Unicorn's
        own reset state, measured: PSTATE 0x3c5)."""
        self.uc.reg_write(A.UC_ARM64_REG_PC, entry)
        self.invalidate()

    def read_special(self) -> dict[str, int]:
        pstate = self.uc.reg_read(A.UC_ARM64_REG_PSTATE)
        out = {"CurrentEL": pstate & 0xC}
        out["MPIDR_EL1"] = self.mpidr
        if pstate & 1 and (pstate >> 2) & 3 == 1:  # EL1h: SP_EL1 is the live sp
            out["SP_EL1"] = self.uc.reg_read(A.UC_ARM64_REG_SP)
        return out

    def write_registers(self, values) -> None:
        """At EL1h the live sp is SP_EL1 (``read_special`` reports it so);
        Unicorn keeps a banked SP_EL1 apart from it, so a changed SP_EL1 is
        written to the live sp, else the write would read back unchanged."""
        pstate = self.registers()["cpsr"]
        if "SP_EL1" in values and pstate & 1 and (pstate >> 2) & 3 == 1:
            values = dict(values)
            sp_el1 = values.pop("SP_EL1")
            if sp_el1 != self.registers()["SP_EL1"]:
                values["sp"] = sp_el1
        super().write_registers(values)

    def emulate_mrs(self, reg: int, cp) -> bool:
        """MRS hook: answer MPIDR_EL1 with this CPU's index (every Unicorn
        instance would otherwise report CPU 0). True = handled."""
        if (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2) == MPIDR_EL1_ENCODING:
            self.uc.reg_write(reg, self.mpidr)
            return True
        return False

    def breakpoint_address(self, intno: int) -> int | None:
        # BRK leaves pc on the instruction (measured)
        return self.uc.reg_read(A.UC_ARM64_REG_PC) if intno == EXCP_BKPT else None

    def deliver_breakpoint(self) -> bool:
        """A synchronous exception to EL1 through VBAR_EL1 (when the guest
        set one): ESR_EL1 = BRK (EC 0x3c) with its immediate, ELR_EL1 = the
        BRK itself (the handler steps past it), SPSR_EL1 = PSTATE, then EL1h
        with DAIF masked. Only for a BRK taken at EL1."""
        uc = self.uc
        r = self.registers()
        vbar, pstate, pc = r["VBAR_EL1"], r["cpsr"], r["pc"]
        if not vbar or (pstate >> 2) & 3 != 1:
            return False
        try:
            insn = struct.unpack("<I", self._read_virtual(pc, 4))[0]
        except TargetError:
            return False
        on_sp_el1 = pstate & 1
        vector = vbar + (0x200 if on_sp_el1 else 0x000)
        uc.reg_write(A.UC_ARM64_REG_ESR_EL1, (0x3C << 26) | (1 << 25) | ((insn >> 5) & 0xFFFF))
        uc.reg_write(A.UC_ARM64_REG_ELR_EL1, pc)
        uc.reg_write(A.UC_ARM64_REG_CP_REG, (*SPSR_EL1_CP, pstate))
        if not on_sp_el1:  # EL1t -> EL1h: the handler runs on SP_EL1
            uc.reg_write(A.UC_ARM64_REG_SP_EL0, r["sp"])
            sp_el1 = uc.reg_read(A.UC_ARM64_REG_SP_EL1)
        uc.reg_write(A.UC_ARM64_REG_PSTATE, (pstate & ~0x3FF & ~(1 << 21)) | 0x3C5)  # DAIF, EL1h, SS clear
        if not on_sp_el1:
            uc.reg_write(A.UC_ARM64_REG_SP, sp_el1)
        uc.reg_write(A.UC_ARM64_REG_PC, vector)
        self.invalidate()
        return True

    def is_firmware_call(self, intno: int) -> bool:
        # Unicorn's CPU has no EL2: hvc is undefined and traps with pc on it;
        # smc arrives as EXCP_SMC with pc already past it. Either way the
        # emulated machine plays PSCI firmware.
        pc = self.uc.reg_read(A.UC_ARM64_REG_PC)
        at = {EXCP_UDEF: pc, EXCP_HVC: pc - 4, EXCP_SMC: pc - 4}.get(intno)
        if at is None:
            return False
        try:
            insn = struct.unpack("<I", self._read_virtual(at, 4))[0]
        except TargetError:
            return False
        if insn & 0xFFE0_001F not in (HVC_0, SMC_0):
            return False
        self._firmware_return = at + 4
        return True

    def firmware_call(self) -> int | None:
        """PSCI 1.0 as QEMU's virt offers it, minus what needs a powered-off
        CPU (every vCPU is already running): SYSTEM_OFF ends the machine with
        status 0, PSCI_VERSION answers 1.0, anything else NOT_SUPPORTED."""
        function = self.uc.reg_read(A.UC_ARM64_REG_X0) & 0xFFFF_FFFF
        if function in (PSCI_SYSTEM_OFF, PSCI_SYSTEM_RESET):
            return 0
        result = PSCI_VERSION_1_0 if function == PSCI_VERSION else PSCI_NOT_SUPPORTED
        self.uc.reg_write(A.UC_ARM64_REG_X0, result)
        self.uc.reg_write(A.UC_ARM64_REG_PC, self._firmware_return)
        self.invalidate()
        return None

    def _translate(self, addr: int) -> int:
        sctlr, tcr, ttbr0, ttbr1 = self._live("SCTLR_EL1", "TCR_EL1", "TTBR0_EL1", "TTBR1_EL1")
        return stage1_address(self.ram, addr, sctlr, tcr, ttbr0, ttbr1)
