"""The emulated x86_64 vCPU: starts where a PVH loader starts a CPU.

A PVH ELF starts at its 32-bit entry (``XEN_ELFNOTE_PHYS32_ENTRY``) in
protected mode, paging off, flat segments, ``ebx`` = the hvm_start_info
(:meth:`X86Cpu.reset_pvh32`), exactly as under the KVM target, QEMU,
Firecracker and Cloud Hypervisor; the guest then builds its page tables,
sets EFER.LME (``wrmsr``, which Unicorn carries out itself: it has no hook
for it) and CR0.PG and far-jumps to 64-bit code, and Unicorn follows.

Why the detour in :meth:`X86Cpu.reset_pvh32`: the CPU is a UC_MODE_64
instance (so every 64-bit register stays readable after the guest's mode
switch), and Unicorn resets such an instance into long mode, with EFER.LMA
and the "64-bit code" flag of its translator set; writing CS there changes
only the selector, and writing EFER keeps LMA (measured: the 32-bit entry
then runs as 64-bit code and never gets out of its first loop). Turning
CR0.PG on and off again leaves long mode the architectural way, which
clears both.

An ELF without a PVH note (the tests' tiny guests) starts at its ELF entry
in 64-bit mode instead (:meth:`X86Cpu.reset`): first 1 GiB identity-mapped,
with the GDT, page tables and stacks :func:`x86_write_boot_tables` puts
below 512 KiB.
"""

from __future__ import annotations

import struct

from unicorn import UC_ARCH_X86, UC_MODE_64
from unicorn import x86_const as X

from vmscope.arch.x86_64 import X86_64
from vmscope.emu.cpu import EmuCpu
from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.target import TargetError
from vmscope.vmi.paging import X86_64Paging

CR0_PG = 1 << 31
CR0_PE_ET = 0x11  # protected mode, paging off (ET is hard-wired to 1)
CR4_PAE = 0x20
PVH_CODE_SELECTOR, PVH_DATA_SELECTOR = 0x10, 0x18  # as the KVM target loads them
MSR_EFER = 0xC000_0080

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

    def reset_pvh32(self, entry: int, start_info: int, stack: int) -> None:
        """The PVH entry state: 32-bit protected mode, paging off, flat
        segments, interrupts off, ``ebx`` = ``start_info``."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR4, CR4_PAE)
        uc.reg_write(X.UC_X86_REG_CR0, CR0_PE_ET | CR0_PG)  # (in long mode already)
        uc.reg_write(X.UC_X86_REG_CR0, CR0_PE_ET)  # paging off with EFER.LMA: leaves long mode
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0))
        uc.reg_write(X.UC_X86_REG_CR4, 0)
        uc.reg_write(X.UC_X86_REG_CR3, 0)
        uc.reg_write(X.UC_X86_REG_RBX, start_info)
        self._start_at(entry, stack, PVH_CODE_SELECTOR, PVH_DATA_SELECTOR)

    def reset(self, entry: int) -> None:
        """Long mode, paging on with the 1 GiB identity map, interrupts off and
        a scratch stack below 512 KiB: for 64-bit ELFs without a PVH note."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CR3, PML4_ADDR)
        uc.reg_write(X.UC_X86_REG_CR4, 0x20 | 0x200 | 0x400)  # PAE, OSFXSR, OSXMMEXCPT
        uc.reg_write(X.UC_X86_REG_MSR, (MSR_EFER, 0x500))  # LME | LMA
        uc.reg_write(X.UC_X86_REG_CR0, 0x8000_0033)  # PG | NE | ET | MP | PE
        uc.reg_write(X.UC_X86_REG_GDTR, (0, GDT_ADDR, 23, 0))
        self._start_at(entry, BOOT_STACK_TOP - self.index * 0x1000, CODE64_SELECTOR, DATA_SELECTOR)

    def _start_at(self, entry: int, stack: int, code_selector: int, data_selector: int) -> None:
        """What both start states share: selectors, interrupts off, FPU/SSE
        reset values, stack and entry."""
        uc = self.uc
        uc.reg_write(X.UC_X86_REG_CS, code_selector)
        for seg in (X.UC_X86_REG_SS, X.UC_X86_REG_DS, X.UC_X86_REG_ES):
            uc.reg_write(seg, data_selector)
        uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
        uc.reg_write(X.UC_X86_REG_MXCSR, 0x1F80)
        uc.reg_write(X.UC_X86_REG_FPCW, 0x37F)
        uc.reg_write(X.UC_X86_REG_RSP, stack)
        uc.reg_write(X.UC_X86_REG_RIP, entry)
        self.invalidate()

    #: Unicorn's FP0..FP7 are the physical x87 registers; GDB's st0..st7
    #: count from the stack top (FSW.TOP), as QEMU's gdbstub does (measured:
    #: after fld1 the value is in FP7)
    packed_registers = {f"_fpr{i}": X.UC_X86_REG_FP0 + i for i in range(8)}

    def arrange(self, values: dict[str, int]) -> dict[str, int]:
        top = (values["fstat"] >> 11) & 7
        physical = [values.pop(f"_fpr{i}") for i in range(8)]
        for i in range(8):
            values[f"st{i}"] = physical[(top + i) & 7]
        return values

    def write_special(self, name: str, value: int) -> None:
        if name.startswith("st") and name[2:].isdigit():
            mantissa, exponent = value & ((1 << 64) - 1), value >> 64
            top = (self.uc.reg_read(X.UC_X86_REG_FPSW) >> 11) & 7
            self.uc.reg_write(X.UC_X86_REG_FP0 + ((top + int(name[2:])) & 7), (mantissa, exponent))

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
