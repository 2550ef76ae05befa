"""The guests' multi-CPU paths, run on Unicorn CPUs that share one RAM.

QEMU starts only the boot CPU at a guest's entry, so the code every other
CPU runs under vmscope (several vCPUs entering at once, taking indexes,
stacks, taking turns on the serial port, counting) is exercised here: one
Unicorn instance per CPU over a single shared mapping, switched every few
instructions so that CPUs interleave inside the boot path, the console
turn-taking and tick.

x86_64 guests start at their real 32-bit PVH entry (Unicorn's 32-bit mode
is the PVH entry state: protected mode, flat segments, paging off) and
switch to long mode themselves; they also start at ``start64`` in the state
vmscope's emulated target provides. The arm64 demo starts at ``_start`` at
EL1 with the MMU off, MPIDR_EL1 answered per CPU by an MRS hook.
"""

from __future__ import annotations

import ctypes
import mmap
import struct

import pytest
from elftools.elf.elffile import ELFFile
from unicorn import (UC_ARCH_ARM64, UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_MODE_32, UC_MODE_64, UC_MODE_ARM,
                     UC_PROT_ALL, Uc)
from unicorn import arm64_const as arm64
from unicorn import x86_const as x86

from vmscope.guests import guest_elf, guest_symbols

SLICE = 37  # instructions per CPU turn: prime, so switches land everywhere
COM1_DATA, COM1_LSR = 0x3F8, 0x3FD


class SharedRam:
    """One host buffer that every CPU instance maps at ``base``."""

    def __init__(self, base: int, size: int):
        self.base = base
        self.size = size
        self.buffer = mmap.mmap(-1, size)
        self.address = ctypes.addressof(ctypes.c_char.from_buffer(self.buffer))

    def map_into(self, uc: Uc) -> None:
        uc.mem_map_ptr(self.base, self.size, UC_PROT_ALL, self.address)

    def load_elf(self, path) -> None:
        with open(path, "rb") as stream:
            for segment in ELFFile(stream).iter_segments():
                if segment["p_type"] == "PT_LOAD":
                    offset = segment["p_paddr"] - self.base
                    data = segment.data()
                    self.buffer[offset:offset + len(data)] = data

    def u64(self, address: int, count: int = 1) -> tuple[int, ...]:
        return struct.unpack_from(f"<{count}Q", self.buffer, address - self.base)


class Console:
    """Serial output, and which CPU wrote each byte."""

    def __init__(self):
        self.bytes = bytearray()

    @property
    def text(self) -> str:
        return self.bytes.decode()


def run_round_robin(cpus: list, done, max_rounds: int = 20000) -> None:
    """Run each (uc, pc_register) for SLICE instructions in turn until done()."""
    pcs = [start for _, _, start in cpus]
    for _ in range(max_rounds):
        for i, (uc, pc_register, _) in enumerate(cpus):
            uc.emu_start(pcs[i], 0, count=SLICE)
            pcs[i] = uc.reg_read(pc_register)
        if done():
            return
    raise AssertionError("the guest did not get there within the instruction budget")


def deliver_through_idt(uc: Uc, vector: int, _data) -> None:
    """Unicorn hands software interrupts to a hook instead of the guest's
    IDT; do what the CPU does in 64-bit mode: push SS, RSP, RFLAGS, CS, RIP
    (already past the int3) and jump to the gate's handler."""
    _, base, _, _ = uc.reg_read(x86.UC_X86_REG_IDTR)
    low, selector, _, middle, high, _ = struct.unpack("<HHHHII", uc.mem_read(base + vector * 16, 16))
    rsp = uc.reg_read(x86.UC_X86_REG_ESP)
    frame = struct.pack("<5Q", uc.reg_read(x86.UC_X86_REG_EIP), uc.reg_read(x86.UC_X86_REG_CS),
                        uc.reg_read(x86.UC_X86_REG_EFLAGS), rsp, uc.reg_read(x86.UC_X86_REG_SS))
    uc.mem_write(rsp - len(frame), frame)
    uc.reg_write(x86.UC_X86_REG_ESP, rsp - len(frame))
    uc.reg_write(x86.UC_X86_REG_EIP, low | middle << 16 | high << 32)


def x86_cpu(ram: SharedRam, console: Console, mode: int) -> Uc:
    uc = Uc(UC_ARCH_X86, mode)
    ram.map_into(uc)
    uc.hook_add(UC_HOOK_INSN, lambda uc, port, size, _: 0x20 if port == COM1_LSR else 0, None, 1, 0,
                x86.UC_X86_INS_IN)

    def on_out(uc, port, size, value, _):
        if port == COM1_DATA:
            console.bytes.append(value & 0xFF)

    uc.hook_add(UC_HOOK_INSN, on_out, None, 1, 0, x86.UC_X86_INS_OUT)
    uc.hook_add(UC_HOOK_INTR, deliver_through_idt)
    return uc


FOREIGN_TABLES = 0x1000  # where start64's caller keeps its GDT and page tables


def enter_long_mode_like_the_emulated_target(uc: Uc, ram: SharedRam) -> None:
    """The state start64 expects: long mode, 1 GiB identity map, interrupts
    off; the GDT is the caller's (not the guest's) and there is no stack."""
    gdt, pml4, pdpt, pd = (FOREIGN_TABLES + i * 0x1000 for i in range(4))
    ram.buffer[gdt:gdt + 24] = struct.pack("<3Q", 0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF)
    ram.buffer[pml4:pml4 + 8] = struct.pack("<Q", pdpt | 3)
    ram.buffer[pdpt:pdpt + 8] = struct.pack("<Q", pd | 3)
    ram.buffer[pd:pd + 4096] = b"".join(struct.pack("<Q", i << 21 | 0x83) for i in range(512))
    uc.reg_write(x86.UC_X86_REG_GDTR, (0, gdt, 23, 0))
    uc.reg_write(x86.UC_X86_REG_CR3, pml4)
    uc.reg_write(x86.UC_X86_REG_CR4, 0x20)
    uc.reg_write(x86.UC_X86_REG_CR0, 0x80000011)
    uc.reg_write(x86.UC_X86_REG_RSP, 0)
    uc.reg_write(x86.UC_X86_REG_RFLAGS, 0x2)


def boot_x86(name: str, entry: str, ncpus: int, enough_ticks: int):
    ram = SharedRam(0, 4 << 20)
    ram.load_elf(guest_elf(name))
    symbols = guest_symbols(name)
    console = Console()
    cpus = []
    for _ in range(ncpus):
        if entry == "pvh_entry":
            uc = x86_cpu(ram, console, UC_MODE_32)
            cpus.append((uc, x86.UC_X86_REG_EIP, symbols["pvh_entry"]))
        else:
            uc = x86_cpu(ram, console, UC_MODE_64)
            enter_long_mode_like_the_emulated_target(uc, ram)
            cpus.append((uc, x86.UC_X86_REG_RIP, symbols["start64"]))

    def done():
        return min(ram.u64(symbols["per_cpu_counter"], ncpus)) >= enough_ticks

    run_round_robin(cpus, done)
    return ram, symbols, console, cpus


def expected_lines(banner: str, ncpus: int) -> str:
    return "".join(f"{banner}: cpu {i} up\n" for i in range(ncpus))


@pytest.mark.parametrize("entry,ncpus", [("pvh_entry", 3), ("start64", 3), ("pvh_entry", 12)])
def test_x86_demo_on_several_cpus_entering_together(entry, ncpus):
    ram, symbols, console, cpus = boot_x86("demo", entry, ncpus, enough_ticks=100)
    assert console.text == expected_lines("vmscope demo guest", ncpus)
    per_cpu = ram.u64(symbols["per_cpu_counter"], ncpus + 1)
    assert per_cpu[ncpus] == 0
    # lock incq is one instruction, so no increment is lost: the two can only
    # differ by the ticks caught half-way when the CPUs were stopped
    assert abs(ram.u64(symbols["counter"])[0] - sum(per_cpu)) <= ncpus
    for uc, _, _ in cpus:
        assert uc.reg_read(x86.UC_X86_REG_CS) == 0x08, "runs on the guest's own GDT"
        assert uc.reg_read(x86.UC_X86_REG_SS) == 0x10


def test_x86_demo_stacks_are_per_cpu():
    ram, symbols, console, cpus = boot_x86("demo", "pvh_entry", 2, enough_ticks=10)
    stacks = symbols["stacks"]
    for index, (uc, _, _) in enumerate(cpus):
        rsp = uc.reg_read(x86.UC_X86_REG_ESP)
        assert stacks + index * 4096 < rsp <= stacks + (index + 1) * 4096


@pytest.mark.parametrize("entry", ["pvh_entry", "start64"])
def test_x86_idt_guest_counts_its_own_int3_on_every_cpu(entry):
    ram, symbols, console, _ = boot_x86("idt", entry, 2, enough_ticks=64)
    assert console.text == expected_lines("vmscope idt guest", 2)
    counter = ram.u64(symbols["counter"])[0]
    bp_count = ram.u64(symbols["bp_count"])[0]
    assert abs(counter - sum(ram.u64(symbols["per_cpu_counter"], 2))) <= 2
    # one int3 per 16 ticks on each CPU (a CPU may be mid-way to its next one)
    assert counter // 16 - 2 <= bp_count <= counter // 16


def test_x86_cpus_beyond_the_guest_limit_park_quietly():
    """A guest supports as many CPUs as per_cpu_counter has slots (64, what
    vmscope allows): one more takes the next index and halts, printing
    nothing, while the others come up as usual."""
    ram = SharedRam(0, 4 << 20)
    ram.load_elf(guest_elf("idt"))
    symbols = guest_symbols("idt")
    with guest_elf("idt").open("rb") as stream:
        slots = ELFFile(stream).get_section_by_name(".symtab").get_symbol_by_name("per_cpu_counter")[0]["st_size"] // 8
    assert slots == 64
    console = Console()
    cpus = [(x86_cpu(ram, console, UC_MODE_32), x86.UC_X86_REG_EIP, symbols["pvh_entry"]) for _ in range(slots + 1)]
    run_round_robin(cpus, lambda: console.text.count("\n") == slots)
    assert console.text == expected_lines("vmscope idt guest", slots)
    parked = [uc for uc, _, _ in cpus if uc.mem_read(uc.reg_read(x86.UC_X86_REG_EIP) - 1, 1) == b"\xf4"]
    assert len(parked) == 1, "exactly one CPU sits after a hlt"


RAM_BASE_ARM = 0x40000000
PL011 = 0x09000000
MPIDR_EL1 = (3, 0, 0, 0, 5)  # op0, op1, CRn, CRm, op2


def arm_cpu(ram: SharedRam, console: Console, index: int) -> Uc:
    uc = Uc(UC_ARCH_ARM64, UC_MODE_ARM)
    ram.map_into(uc)

    def uart_read(uc, offset, size, _):
        return 0  # FR: transmit FIFO never full

    def uart_write(uc, offset, size, value, _):
        if offset == 0:
            console.bytes.append(value & 0xFF)

    uc.mmio_map(PL011, 0x1000, uart_read, None, uart_write, None)

    def on_mrs(uc, reg, cp, _):
        if (cp.op0, cp.op1, cp.crn, cp.crm, cp.op2) == MPIDR_EL1:
            uc.reg_write(reg, 0x80000000 | index)
            return True
        return False

    uc.hook_add(UC_HOOK_INSN, on_mrs, None, 1, 0, arm64.UC_ARM64_INS_MRS)
    return uc


@pytest.mark.parametrize("ncpus", [3, 12])
def test_arm64_demo_on_several_cpus_entering_together(ncpus):
    ram = SharedRam(RAM_BASE_ARM, 2 << 20)
    ram.load_elf(guest_elf("demo", "aarch64"))
    symbols = guest_symbols("demo", "aarch64")
    console = Console()
    cpus = [(arm_cpu(ram, console, i), arm64.UC_ARM64_REG_PC, symbols["_start"]) for i in range(ncpus)]
    run_round_robin(cpus, lambda: min(ram.u64(symbols["per_cpu_counter"], ncpus)) >= 100)
    assert console.text == expected_lines("vmscope demo guest", ncpus)
    per_cpu = ram.u64(symbols["per_cpu_counter"], ncpus + 1)
    assert per_cpu[ncpus] == 0
    counter = ram.u64(symbols["counter"])[0]
    # separate instances share no exclusive monitor: an increment can be lost
    assert 0 < counter <= sum(per_cpu) + ncpus
    stacks = symbols["stacks"]
    for index, (uc, _, _) in enumerate(cpus):
        assert stacks + index * 4096 < uc.reg_read(arm64.UC_ARM64_REG_SP) <= stacks + (index + 1) * 4096


def test_arm64_cpu_beyond_the_guest_limit_parks_quietly():
    ram = SharedRam(RAM_BASE_ARM, 2 << 20)
    ram.load_elf(guest_elf("demo", "aarch64"))
    symbols = guest_symbols("demo", "aarch64")
    console = Console()
    uc = arm_cpu(ram, console, 64)  # Aff0 = 64: one past the 64 supported CPUs
    uc.emu_start(symbols["_start"], 0, count=1000)
    assert console.text == ""
    assert symbols["park"] <= uc.reg_read(arm64.UC_ARM64_REG_PC) < symbols["park"] + 8
