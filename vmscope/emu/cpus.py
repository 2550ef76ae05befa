"""One emulated vCPU per Unicorn instance, with the per-architecture parts:
register names to Unicorn ids, reset state, breakpoint exceptions, halts and
address translation.

Registers are read in one batch and cached until the CPU runs again, so a
stop followed by ``g``, ``p`` and expedited-register requests costs one
round of Unicorn calls.
"""

from __future__ import annotations

import ctypes
import errno
import struct
from typing import Mapping

from unicorn import UC_ARCH_ARM64, UC_ARCH_X86, UC_MODE_64, UC_MODE_ARM, UC_PROT_ALL, Uc, UcError
from unicorn import arm64_const as A
from unicorn import x86_const as X

try:  # the binding's C entry point: one call for ~80 registers, no per-register Python
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:  # another binding layout: fall back to Uc.reg_read_batch
    _uclib = None

from vmscope.arch.aarch64 import AARCH64
from vmscope.arch.registers import Arch
from vmscope.arch.x86_64 import X86_64
from vmscope.emu.memory import GuestRam
from vmscope.gdbserver.target import TargetError
from vmscope.vmi.errors import VmiError
from vmscope.vmi.paging import Aarch64Paging, X86_64Paging


class EmuCpu:
    """Common part: the Unicorn instance over the shared RAM and the
    register cache. Subclasses fill in the architecture."""

    arch: Arch
    uc_arch: int
    uc_mode: int
    #: table name -> Unicorn register id, for registers read in one batch
    simple_registers: dict[str, int]
    #: name of the Unicorn pc register id
    pc_id: int
    #: instruction bytes that leave the CPU halted until an interrupt
    halt_opcodes: tuple[bytes, ...] = ()
    #: Unicorn's exception number for an undefined instruction
    undefined_instruction_exception: int = -1

    def __init__(self, index: int, ram: GuestRam) -> None:
        self.index = index
        self.tid = index + 1
        self.ram = ram
        self.uc = Uc(self.uc_arch, self.uc_mode)
        self.uc.mem_map_ptr(ram.base, ram.size, UC_PROT_ALL, ram.host_address)
        self.halted = False
        self._cache: dict[str, int] | None = None
        self._batch_names = list(self.simple_registers)
        self._batch_ids = list(self.simple_registers.values())
        count = len(self._batch_ids)
        # one 16-byte slot per register (wide enough for xmm/q registers)
        self._slots = (ctypes.c_uint8 * (16 * count))()
        base = ctypes.addressof(self._slots)
        self._slot_ptrs = (ctypes.c_void_p * count)(*(base + 16 * i for i in range(count)))
        self._slot_ids = (ctypes.c_int * count)(*self._batch_ids)

    # --- registers ---------------------------------------------------------

    def invalidate(self) -> None:
        """The CPU ran (or was written): cached registers are stale."""
        self._cache = None

    def registers(self) -> dict[str, int]:
        if self._cache is None:
            values = self._read_batch()
            values.update(self.read_special())
            self._cache = values
        return self._cache

    def _read_batch(self) -> dict[str, int]:
        """Every simply-typed register in one ``uc_reg_read_batch`` call
        (about 10 us for 80 registers, against 100+ us through the
        binding's per-register Python path)."""
        if _uclib is None:
            return dict(zip(self._batch_names, self.uc.reg_read_batch(self._batch_ids)))
        ctypes.memset(self._slots, 0, len(self._slots))
        status = _uclib.uc_reg_read_batch(self.uc._uch, self._slot_ids, self._slot_ptrs, len(self._slot_ids))
        if status != 0:
            raise UcError(status)
        raw = bytes(self._slots)
        return {name: int.from_bytes(raw[16 * i : 16 * i + 16], "little") for i, name in enumerate(self._batch_names)}

    def write_registers(self, values: Mapping[str, int]) -> None:
        current = self.registers()
        for name, value in values.items():
            if current.get(name) == value:
                continue  # G writes every register: leave the unchanged ones alone
            reg_id = self.simple_registers.get(name)
            if reg_id is not None:
                self.uc.reg_write(reg_id, value)
            else:
                self.write_special(name, value)
            if name == self.arch.pc:
                self.halted = False
        self.invalidate()

    @property
    def pc(self) -> int:
        if self._cache is not None:
            return self._cache[self.arch.pc]
        return self.uc.reg_read(self.pc_id)

    @pc.setter
    def pc(self, value: int) -> None:
        self.uc.reg_write(self.pc_id, value)
        self.invalidate()

    def read_special(self) -> dict[str, int]:
        return {}

    def write_special(self, name: str, value: int) -> None:
        pass  # read-only or not modelled: ignored like QEMU does

    # --- architecture hooks --------------------------------------------------

    def breakpoint_address(self, intno: int) -> int | None:
        """If exception ``intno`` is a breakpoint instruction, its address."""
        raise NotImplementedError

    def deliver_breakpoint(self) -> bool:
        """Enter the guest's own breakpoint handler, as the hardware would
        for a breakpoint instruction that is not the debugger's (Unicorn
        only reports exceptions). False when the guest has no handler set
        up, and the stop then goes to the debugger as SIGTRAP."""
        return False

    def is_firmware_call(self, intno: int) -> bool:
        """Is exception ``intno`` a call to firmware?"""
        return False

    def firmware_call(self) -> int | None:
        """Carry out that call (results in registers, pc past it); an exit
        status if it powers the machine off."""
        return None

    def _write_virtual(self, addr: int, data: bytes) -> None:
        self.ram.write(self.translate(addr), data)  # stacks and tables do not cross pages here

    def _read_virtual(self, addr: int, length: int) -> bytes:
        return self.ram.read(self.translate(addr), length)

    def translate(self, addr: int) -> int:
        """Guest-virtual to guest-physical through the guest's own page
        tables (the vmi walkers over the shared RAM); identity when the
        MMU is off. Raises TargetError naming the address."""
        try:
            return self._translate(addr)
        except (VmiError, ValueError) as e:
            raise TargetError(f"cannot translate {addr:#x} on vcpu {self.index}: {e}", errno.EFAULT) from None

    def _translate(self, addr: int) -> int:
        raise NotImplementedError

    def _live(self, *names: str) -> list[int]:
        """Register values without filling the cache (hooks call this while
        the CPU runs, when a cache would go stale at once)."""
        if self._cache is not None:
            return [self._cache[n] for n in names]
        return [self._read_one(n) for n in names]

    def _read_one(self, name: str) -> int:
        reg_id = self.simple_registers.get(name)
        return self.uc.reg_read(reg_id) if reg_id is not None else self.read_special()[name]

    def is_halted_after_run(self) -> bool:
        """Did the slice end on a halt instruction (pc just past it)?"""
        for op in self.halt_opcodes:
            try:
                phys = self.translate(self.pc - len(op))
                if self.ram.contains(phys, len(op)) and self.ram.read(phys, len(op)) == op:
                    return True
            except Exception:
                return False
        return False


# --- x86_64 ------------------------------------------------------------------

_X86_GPRS = "rax rbx rcx rdx rsi rdi rbp rsp r8 r9 r10 r11 r12 r13 r14 r15 rip eflags cs ss ds es fs gs".split()
CR0_PG = 1 << 31
MSR_EFER = 0xC000_0080
MSR_KERNEL_GS_BASE = 0xC000_0102

#: guest-physical layout of the boot state the emulated x86 CPUs start in
GDT_ADDR = 0x500
PML4_ADDR = 0x1000  # PML4, PDPT and one PD of 2 MiB pages: 1 GiB identity map
BOOT_STACK_TOP = 0x80000  # CPU n starts with rsp = top - n * 4 KiB ("any stack")
#: the guest-physical range the boot state above occupies (64 CPUs' stacks included)
BOOT_AREA = (GDT_ADDR, BOOT_STACK_TOP)
CODE64_SELECTOR = 0x08
DATA_SELECTOR = 0x10


def x86_write_boot_tables(ram: GuestRam) -> None:
    """A GDT (null, 64-bit code, data) and page tables identity-mapping the
    first 1 GiB, below 1 MiB where the demo guest does not load."""
    gdt = struct.pack("<3Q", 0, 0x00AF_9A00_0000_FFFF, 0x00CF_9200_0000_FFFF)
    ram.write(GDT_ADDR, gdt)
    ram.write(PML4_ADDR, struct.pack("<Q", (PML4_ADDR + 0x1000) | 3))
    ram.write(PML4_ADDR + 0x1000, struct.pack("<Q", (PML4_ADDR + 0x2000) | 3))
    ram.write(PML4_ADDR + 0x2000, b"".join(struct.pack("<Q", (i << 21) | 0x83) for i in range(512)))


class X86Cpu(EmuCpu):
    arch = X86_64
    uc_arch = UC_ARCH_X86
    uc_mode = UC_MODE_64
    pc_id = X.UC_X86_REG_RIP
    halt_opcodes = (b"\xf4",)
    undefined_instruction_exception = 6  # #UD
    simple_registers = {
        **{n: getattr(X, f"UC_X86_REG_{n.upper()}") for n in _X86_GPRS},
        **{f"xmm{i}": getattr(X, f"UC_X86_REG_XMM{i}") for i in range(16)},
        "fctrl": X.UC_X86_REG_FPCW,
        "fstat": X.UC_X86_REG_FPSW,
        "ftag": X.UC_X86_REG_FPTAG,
        "fiseg": X.UC_X86_REG_FCS,
        "fioff": X.UC_X86_REG_FIP,
        "foseg": X.UC_X86_REG_FDS,
        "fooff": X.UC_X86_REG_FDP,
        "fop": X.UC_X86_REG_FOP,
        "mxcsr": X.UC_X86_REG_MXCSR,
        "fs_base": X.UC_X86_REG_FS_BASE,
        "gs_base": X.UC_X86_REG_GS_BASE,
        "cr0": X.UC_X86_REG_CR0,
        "cr2": X.UC_X86_REG_CR2,
        "cr3": X.UC_X86_REG_CR3,
        "cr4": X.UC_X86_REG_CR4,
        "cr8": X.UC_X86_REG_CR8,
    }

    def reset(self, entry: int) -> None:
        """Long mode, paging on with the 1 GiB identity map, interrupts off and
        a scratch stack below 512 KiB: the state ``start64`` of the demo
        guest expects (the PVH 32-bit entry is skipped)."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR3, PML4_ADDR)
        uc.reg_write(X.UC_X86_REG_CR4, 0x20 | 0x200 | 0x400)  # PAE, OSFXSR, OSXMMEXCPT
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0x500))  # LME | LMA
        uc.reg_write(X.UC_X86_REG_CR0, 0x8000_0033)  # PG | NE | ET | MP | PE
        uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT_ADDR, 23, 0))
        uc.reg_write(X.UC_X86_REG_CS, CODE64_SELECTOR)
        for seg in (X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_ES):
            uc.reg_write(seg, DATA_SELECTOR)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        uc.reg_write(X.UC_X86_REG_FPCW, 0x37F)
        uc.reg_write(X.UC_X86_REG_RSP, BOOT_STACK_TOP - self.index * 0x1000)
        uc.reg_write(X.UC_X86_REG_RIP, entry)
        self.invalidate()

    def read_special(self) -> dict[str, int]:
        out = {}
        for i in range(8):
            mantissa, exponent = self.uc.reg_read(X.UC_X86_REG_FP0 + i)
            out[f"st{i}"] = (exponent << 64) | mantissa
        out["k_gs_base"] = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_KERNEL_GS_BASE)
        out["efer"] = self.uc.reg_read(X.UC_X86_REG_MSR, MSR_EFER)
        return out

    def write_special(self, name: str, value: int) -> None:
        if name.startswith("st") and name[2:].isdigit():
            mantissa, exponent = value & ((1 << 64) - 1), value >> 64
            self.uc.reg_write(X.UC_X86_REG_FP0 + int(name[2:]), (mantissa, exponent))
        elif name == "k_gs_base":
            self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_KERNEL_GS_BASE, value))
        elif name == "efer":
            self.uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, value))

    def breakpoint_address(self, intno: int) -> int | None:
        # Unicorn reports #BP with rip already past the one-byte int3
        return self.uc.reg_read(X.UC_X86_REG_RIP) - 1 if intno == 3 else None

    def deliver_breakpoint(self) -> bool:
        """#BP through the guest's IDT in long mode: push SS, RSP, RFLAGS,
        CS and the return rip (past the int3) on the handler's stack (TSS
        RSP0 from ring 3, the IST stack if the gate names one) and jump."""
        uc = self.uc
        _, idt_base, idt_limit, _ = uc.reg_read(X.UC_X86_REG_IDTR)
        if idt_limit < 3 * 16 + 15:
            return False
        try:
            gate = self._read_virtual(idt_base + 3 * 16, 16)
            lo, selector, ist, attrs, mid, hi, _ = struct.unpack("<HHBBHII", gate)
            if not attrs & 0x80 or attrs & 0x0F not in (0xE, 0xF):
                return False  # not present, or not a 64-bit interrupt/trap gate
            r = self.registers()
            rsp, cpl = r["rsp"], r["cs"] & 3
            if ist or cpl:
                _, tss_base, _, _ = uc.reg_read(X.UC_X86_REG_TR)
                slot = 0x24 + 8 * (ist - 1) if ist else 0x04  # ISTn or RSP0
                rsp = struct.unpack("<Q", self._read_virtual(tss_base + slot, 8))[0]
            rsp &= ~0xF
            frame = struct.pack("<5Q", r["rip"], r["cs"], r["eflags"], r["rsp"], r["ss"])
            rsp -= len(frame)
            self._write_virtual(rsp, frame)
        except TargetError:
            return False
        flags = r["eflags"] & ~((1 << 8) | (1 << 14) | (1 << 16))  # TF, NT, RF
        if attrs & 0x0F == 0xE:
            flags &= ~(1 << 9)  # an interrupt gate also clears IF
        if cpl:
            uc.reg_write(X.UC_X86_REG_SS, 0)
        uc.reg_write(X.UC_X86_REG_CS, selector)
        uc.reg_write(X.UC_X86_REG_RSP, rsp)
        uc.reg_write(X.UC_X86_REG_EFLAGS, flags)
        uc.reg_write(X.UC_X86_REG_RIP, lo | (mid << 16) | (hi << 32))
        self.invalidate()
        return True

    def _translate(self, addr: int) -> int:
        cr0, cr3, cr4 = self._live("cr0", "cr3", "cr4")
        if not cr0 & CR0_PG:
            return addr
        return X86_64Paging(self.ram, cr3, cr4=cr4).translate(addr).paddr


# --- aarch64 -----------------------------------------------------------------

#: system registers Unicorn only reaches through UC_ARM64_REG_CP_REG:
#: name -> (crn, crm, op0, op1, op2)
_ARM64_CP_REGS = {
    "SCTLR_EL1": (1, 0, 3, 0, 0),
    "TCR_EL1": (2, 0, 3, 0, 2),
    "SPSR_EL1": (4, 0, 3, 0, 0),
}
MPIDR_EL1_ENCODING = (3, 0, 0, 0, 5)  # op0, op1, crn, crm, op2
SCTLR_M = 1  # stage-1 MMU enable
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
    simple_registers = {
        **{f"x{i}": getattr(A, f"UC_ARM64_REG_X{i}") for i in range(31)},
        "sp": A.UC_ARM64_REG_SP,
        "pc": A.UC_ARM64_REG_PC,
        "cpsr": A.UC_ARM64_REG_PSTATE,
        **{f"v{i}": getattr(A, f"UC_ARM64_REG_Q{i}") for i in range(32)},
        "fpsr": A.UC_ARM64_REG_FPSR,
        "fpcr": A.UC_ARM64_REG_FPCR,
        **{
            n: getattr(A, f"UC_ARM64_REG_{n}")
            for n in "TTBR0_EL1 TTBR1_EL1 MAIR_EL1 VBAR_EL1 ESR_EL1 FAR_EL1 ELR_EL1 SP_EL0 SP_EL1 TPIDR_EL0 TPIDR_EL1".split()
        },
    }

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
        out = {name: self.uc.reg_read(A.UC_ARM64_REG_CP_REG, enc) for name, enc in _ARM64_CP_REGS.items()}
        pstate = self.uc.reg_read(A.UC_ARM64_REG_PSTATE)
        out["CurrentEL"] = pstate & 0xC
        out["MPIDR_EL1"] = self.mpidr
        if pstate & 1 and (pstate >> 2) & 3 == 1:  # EL1h: SP_EL1 is the live sp
            out["SP_EL1"] = self.uc.reg_read(A.UC_ARM64_REG_SP)
        return out

    def write_special(self, name: str, value: int) -> None:
        enc = _ARM64_CP_REGS.get(name)
        if enc is not None:
            self.uc.reg_write(A.UC_ARM64_REG_CP_REG, (*enc, value))

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
        uc.reg_write(A.UC_ARM64_REG_CP_REG, (*_ARM64_CP_REGS["SPSR_EL1"], pstate))
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
        if not sctlr & SCTLR_M:
            return addr
        return Aarch64Paging(self.ram, ttbr0, ttbr1, tcr).translate(addr).paddr


CPU_CLASSES: dict[str, type[EmuCpu]] = {"x86_64": X86Cpu, "aarch64": Arm64Cpu}

__all__ = ["EmuCpu", "X86Cpu", "Arm64Cpu", "CPU_CLASSES", "UcError", "x86_write_boot_tables"]
