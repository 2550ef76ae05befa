"""One emulated vCPU: a Unicorn instance over the shared guest RAM, with a
register cache. The architectures (``x86_64.py``, ``aarch64.py``) add
register names to Unicorn ids, reset state, breakpoint exceptions, halts,
firmware calls and address translation.

Registers are read in one batch and cached until the CPU runs again, so a
stop followed by ``g``, ``p`` and expedited-register requests costs one
round of Unicorn calls.
"""

from __future__ import annotations

import ctypes
import errno
from typing import Mapping

from unicorn import UC_PROT_ALL, Uc, UcError, arm64_const, x86_const

try:  # the binding's C entry point: one call for ~80 registers, no per-register Python
    from unicorn.unicorn_py3.unicorn import uclib as _uclib
except ImportError:  # another binding layout: fall back to Uc.reg_read_batch
    _uclib = None

from vmscope.arch.registers import Arch
from vmscope.devices.ram import GuestRam
from vmscope.gdbserver.target import TargetError
from vmscope.vmi.errors import VmiError


def unicorn_registers(arch: Arch) -> dict[str, int]:
    """Table name -> Unicorn register id, from the arch table's ``unicorn``
    column (constant names, so the tables need no Unicorn import)."""
    out = {}
    for reg in arch.registers:
        if reg.unicorn is not None:
            module = x86_const if reg.unicorn.startswith("UC_X86_") else arm64_const
            out[reg.name] = getattr(module, reg.unicorn)
    return out


class EmuCpu:
    """Common part: the Unicorn instance over the shared RAM and the
    register cache. Subclasses fill in the architecture."""

    arch: Arch
    uc_arch: int
    uc_mode: int
    #: table name -> Unicorn register id, for registers read in one batch:
    #: the arch table's ``unicorn`` column (see :func:`unicorn_registers`)
    simple_registers: dict[str, int]
    #: registers also read in the batch, as their raw little-endian bytes
    #: (x87's 80-bit mantissa + exponent), but written by ``write_special``
    packed_registers: dict[str, int] = {}
    #: Unicorn's id of the pc register
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
        #: never runs: an x86 application processor a PVH guest did not ask
        #: to start waits for an INIT/SIPI, and this target has no local APIC
        #: to deliver one (under KVM it waits the same way)
        self.parked = False
        self._cache: dict[str, int] | None = None
        # Registers as data: the arch table says which Unicorn id holds each
        # (an architecture's own dict, where it still has one, says the same).
        self.simple_registers = unicorn_registers(self.arch)
        self._encoded_registers: dict | None = None
        batch = {**self.simple_registers, **self.packed_registers}
        self._batch_names = list(batch)
        self._batch_ids = list(batch.values())
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
            values.update({name: self._read_encoded(reg) for name, reg in self._by_encoding.items()})
            values.update(self.read_special())
            self._cache = self.arrange(values)
        return self._cache

    def arrange(self, values: dict[str, int]) -> dict[str, int]:
        """Turn raw Unicorn reads into the table's registers (x86 names its
        x87 registers relative to the stack top)."""
        return values

    def _read_batch(self) -> dict[str, int]:
        """Every simply-typed register in one ``uc_reg_read_batch`` call
        (about 10 us for 80 registers, against 100+ us through the
        binding's per-register Python path)."""
        if _uclib is None:
            values = dict(zip(self.simple_registers, self.uc.reg_read_batch(list(self.simple_registers.values()))))
            for name, reg_id in self.packed_registers.items():
                mantissa, exponent = self.uc.reg_read(reg_id)
                values[name] = (exponent << 64) | mantissa
            return values
        ctypes.memset(self._slots, 0, len(self._slots))
        status = _uclib.uc_reg_read_batch(self.uc._uch, self._slot_ids, self._slot_ptrs, len(self._slot_ids))
        if status != 0:
            raise UcError(status)
        raw = bytes(self._slots)
        return {name: int.from_bytes(raw[16 * i : 16 * i + 16], "little") for i, name in enumerate(self._batch_names)}

    def write_registers(self, values: Mapping[str, int]) -> None:
        current = self.registers()
        special = []
        for name, value in values.items():
            if current.get(name) == value:
                continue  # G writes every register: leave the unchanged ones alone
            reg_id = self.simple_registers.get(name)
            if reg_id is not None:
                self.uc.reg_write(reg_id, value)
            elif name in self._by_encoding:
                self._write_encoded(self._by_encoding[name], value)
                special.append(name)
            else:
                self.write_special(name, value)
                special.append(name)
            if name == self.arch.pc:
                self.halted = False
        self.invalidate()
        # A register the architecture derives or makes read-only (CurrentEL,
        # MPIDR_EL1) is refused, not accepted and dropped.
        after = self.registers() if special else {}
        dropped = [n for n in special if after[n] != values[n]]
        if dropped:
            raise TargetError(f"{', '.join(dropped)}: read-only on this CPU (the value did not change)", errno.EINVAL)

    @property
    def pc(self) -> int:
        if self._cache is not None:
            return self._cache[self.arch.pc]
        return self.uc.reg_read(self.pc_id)

    @pc.setter
    def pc(self, value: int) -> None:
        self.uc.reg_write(self.pc_id, value)
        self.invalidate()

    @property
    def _by_encoding(self) -> dict:
        """Table lines with only an MSR number or a system-register encoding,
        reached through Unicorn's MSR / CP_REG ids, unless the architecture
        derives them itself (``read_special``): so a new MSR or system
        register is its table line here too. Found on first use (the
        subclass is fully set up by then)."""
        if self._encoded_registers is None:
            derived = set(self.read_special())
            self._encoded_registers = {
                r.name: r for r in self.arch.registers
                if r.name not in self.simple_registers and r.name not in derived
                and (r.msr is not None or r.sysreg is not None)}
        return self._encoded_registers

    def _read_encoded(self, reg) -> int:
        if reg.msr is not None:
            return self.uc.reg_read(x86_const.UC_X86_REG_MSR, reg.msr)
        op0, op1, crn, crm, op2 = reg.sysreg
        return self.uc.reg_read(arm64_const.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2))

    def _write_encoded(self, reg, value: int) -> None:
        if reg.msr is not None:
            self.uc.reg_write(x86_const.UC_X86_REG_MSR, (reg.msr, value))
        else:
            op0, op1, crn, crm, op2 = reg.sysreg
            self.uc.reg_write(arm64_const.UC_ARM64_REG_CP_REG, (crn, crm, op0, op1, op2, value))

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
        if reg_id is not None:
            return self.uc.reg_read(reg_id)
        if name in self._by_encoding:
            return self._read_encoded(self._by_encoding[name])
        return self.read_special()[name]

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
