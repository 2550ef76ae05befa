"""The emulated target on tiny guests assembled here, one behaviour each:
the guest's own breakpoints, halts, power-off, console input, the MMU.

They need ``as``/``ld`` and ``aarch64-linux-gnu-as``/``-ld`` (binutils,
binutils-aarch64-linux-gnu).
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import time

import pytest
from elftools.elf.elffile import ELFFile

from tests.emu_support import ARCHES, CONTINUE, Booted, step, u64, wait_stop
from vmscope.emu import EmuMachine
from vmscope.gdbserver.target import SIGINT, SIGTRAP, TargetError
from vmscope.guests import guest_elf, guest_symbols
from vmscope.machine import ImageError, MachineConfig

_TOOLS = {
    "aarch64": (["aarch64-linux-gnu-as"], ["aarch64-linux-gnu-ld", "-Ttext=0x40080000"]),
    "x86_64": (["as", "--64"], ["ld", "-Ttext=0x100000", "-e", "start64"]),
}


def build(tmp_path, arch: str, source: str, name: str = "guest", link: list[str] | None = None):
    """Assemble and link ``source`` for ``arch``; the ELF's path."""
    assemble, default_link = _TOOLS[arch]
    link = link or default_link
    for tool in (assemble[0], link[0]):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (binutils / binutils-aarch64-linux-gnu)")
    src, obj, elf = (tmp_path / f"{name}{ext}" for ext in (".S", ".o", ".elf"))
    src.write_text(source)
    subprocess.run([*assemble, "-o", str(obj), str(src)], check=True)
    subprocess.run([*link, "-o", str(elf), str(obj)], check=True)
    return elf


# --- a guest's own breakpoint instruction -----------------------------------------------

_OWN_BRK = {
    "aarch64": ".globl _start\n_start:\n mov x0, #7\n brk #0\n mov x0, #8\n b .\n",
    "x86_64": ".globl start64\nstart64:\n mov $7, %eax\n int3\n mov $8, %eax\n jmp .\n",
}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_guests_own_breakpoint_is_reported_as_sigtrap(arch, tmp_path):
    booted = Booted(arch, cpus=1, kernel=build(tmp_path, arch, _OWN_BRK[arch]))
    try:
        booted.machine.start()
        event = wait_stop(booted.target)
        assert event.kind == "signal" and event.signal == SIGTRAP
        regs = booted.regs(1)
        assert regs["x0" if arch == "aarch64" else "rax"] == 7
    finally:
        booted.machine.shutdown()


_HALTING = {
    "aarch64": ".globl _start\n_start:\n add x0, x0, #1\n wfi\n b _start\n",
    "x86_64": ".globl start64\nstart64:\n inc %eax\n hlt\n jmp start64\n",
}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_halted_guest_idles_and_still_stops_on_ctrl_c(arch, tmp_path):
    booted = Booted(arch, cpus=2, kernel=build(tmp_path, arch, _HALTING[arch]))
    try:
        booted.machine.start()
        time.sleep(0.3)
        booted.target.interrupt()
        assert wait_stop(booted.target).signal == SIGINT
        woken = booted.regs(1)["x0" if arch == "aarch64" else "rax"]
        # resumed after each halt at most once per idle round (10 ms), not spinning
        assert 1 <= woken < 1000
    finally:
        booted.machine.shutdown()


_HANDLED_BRK = (
    ".globl _start\n_start:\n ldr x0, =vectors\n msr vbar_el1, x0\n isb\n"
    "1: brk #0x42\n add x21, x21, #1\n b 1b\n"
    ".balign 2048\nvectors:\n .skip 0x200\n"  # current EL with SP_EL1, synchronous
    " mrs x22, esr_el1\n add x20, x20, #1\n mrs x23, elr_el1\n add x23, x23, #4\n msr elr_el1, x23\n eret\n"
)


def test_arm64_guest_brk_goes_to_its_vbar_handler(tmp_path):
    booted = Booted("aarch64", cpus=1, kernel=build(tmp_path, "aarch64", _HANDLED_BRK))
    try:
        booted.machine.start()
        time.sleep(0.3)
        booted.target.interrupt()
        assert wait_stop(booted.target).signal == SIGINT  # no SIGTRAP: the guest handled every BRK
        regs = booted.regs(1)
        assert regs["x20"] > 100 and regs["x21"] in (regs["x20"], regs["x20"] - 1)
        assert regs["x22"] == (0x3C << 26) | (1 << 25) | 0x42  # ESR_EL1: BRK #0x42
    finally:
        booted.machine.shutdown()


def test_x86_guest_int3_goes_to_its_idt_while_our_breakpoints_still_stop():
    sym = guest_symbols("idt", "x86_64")
    booted = Booted("x86_64", cpus=2, kernel=guest_elf("idt", "x86_64"))
    t = booted.target
    try:
        booted.machine.start()
        booted.wait_serial("cpu 1 up")
        time.sleep(0.3)
        t.interrupt()
        assert wait_stop(t).signal == SIGINT
        counter, bp_count = u64(t, sym["counter"]), u64(t, sym["bp_count"])
        assert bp_count > 10 and abs(bp_count - counter // 16) <= 2  # one guest int3 every 16 ticks
        t.add_sw_breakpoint(sym["tick"], 1)
        for _ in range(5):
            event = booted.run_until_stop()
            assert event.kind == "swbreak" and booted.regs(event.tid)["rip"] == sym["tick"]
            t.remove_sw_breakpoint(sym["tick"], 1)
            t.resume(step(event.tid))
            wait_stop(t)
            t.add_sw_breakpoint(sym["tick"], 1)
        t.remove_sw_breakpoint(sym["tick"], 1)
    finally:
        booted.machine.shutdown()


def test_x86_image_over_the_boot_tables_is_refused(tmp_path):
    low = build(tmp_path, "x86_64", ".globl start64\nstart64:\n jmp .\n", "low",
                link=["ld", "-Ttext=0x2000", "-e", "start64"])
    with pytest.raises(ImageError, match=r"low.elf: PT_LOAD at 0x[0-9a-f]+ .* overlaps 0x500-0x80000"):
        EmuMachine(MachineConfig(arch="x86_64", kernel=low))


_POWER_OFF = {
    "x86-exit-device": ("x86_64", ".globl start64\nstart64:\n mov $3, %al\n out %al, $0xf4\n jmp .\n", 3),
    "x86-acpi": ("x86_64", ".globl start64\nstart64:\n mov $0x2000, %ax\n mov $0x604, %dx\n out %ax, %dx\n jmp .\n", 0),
    "arm64-psci": ("aarch64", ".globl _start\n_start:\n ldr x0, =0x84000000\n hvc #0\n mov x5, x0\n"
                   " ldr x0, =0x84000001\n smc #0\n mov x6, x0\n ldr x0, =0x84000008\n hvc #0\n b .\n", 0),
}


@pytest.mark.parametrize("case", sorted(_POWER_OFF))
def test_guest_power_off_ends_the_machine_with_its_status(case, tmp_path):
    arch, source, status = _POWER_OFF[case]
    booted = Booted(arch, cpus=2, kernel=build(tmp_path, arch, source))
    try:
        booted.machine.start()
        event = wait_stop(booted.target)
        assert event.kind == "exited" and event.code == status
        assert booted.machine.wait(10) == status
        if arch == "aarch64":
            regs = booted.regs(event.tid)
            assert regs["x5"] == 0x10000 and regs["x6"] == (1 << 64) - 1  # PSCI 1.0; CPU_SUSPEND unsupported
        with pytest.raises(TargetError, match="shut down"):
            booted.target.resume(CONTINUE)
    finally:
        booted.machine.shutdown()


_ECHO = {
    "x86_64": ".globl start64\nstart64:\n mov $0x3fd, %dx\n1: in %dx, %al\n test $1, %al\n jz 1b\n"
              " mov $0x3f8, %dx\n in %dx, %al\n out %al, %dx\n mov $0x3fd, %dx\n jmp 1b\n",
    "aarch64": ".globl _start\n_start:\n ldr x1, =0x09000000\n1: ldr w2, [x1, #0x18]\n tbnz w2, #4, 1b\n"
               " ldr w0, [x1]\n str w0, [x1]\n b 1b\n",
}


@pytest.mark.parametrize("arch", ARCHES)
def test_console_input_reaches_the_guest_uart(arch, tmp_path):
    echo = build(tmp_path, arch, _ECHO[arch])
    read_end, write_end = os.pipe()
    serial = io.BytesIO()
    machine = EmuMachine(MachineConfig(arch=arch, kernel=echo, serial_out=serial, serial_in=read_end))
    try:
        machine.start()
        os.write(write_end, b"echo me\n")
        deadline = time.monotonic() + 30
        while serial.getvalue() != b"echo me\n":
            assert time.monotonic() < deadline, serial.getvalue()
            time.sleep(0.02)
        machine.debug_target().interrupt()  # a loop of device reads still stops
        assert wait_stop(machine.debug_target()).signal == SIGINT
    finally:
        machine.shutdown()
        os.close(write_end)
        os.close(read_end)


#: arm64 guest that turns the MMU on (TTBR0 identity, TTBR1 maps HIGH + RAM)
#: and then runs and counts only at the high addresses, as a kernel does
_MMU_GUEST = """        .equ HIGH, 0xffffff8000000000
        .globl _start
_start:
        ldr x0, =ttbr0_l1
        ldr x1, =0x40000000 | (1 << 10) | (3 << 8) | 1   // 1 GiB block, AF, inner shareable, attr 0
        str x1, [x0, #8]                                 // VA 0x40000000 (index 1)
        ldr x0, =ttbr1_l1
        str x1, [x0, #8]                                 // VA HIGH + 0x40000000 (index 1)
        ldr x0, =ttbr0_l1
        msr ttbr0_el1, x0
        ldr x0, =ttbr1_l1
        msr ttbr1_el1, x0
        mov x0, #0xff
        msr mair_el1, x0
        ldr x0, =25 | (25 << 16) | (2 << 30) | (2 << 32)
        msr tcr_el1, x0
        isb
        mrs x0, sctlr_el1
        orr x0, x0, #1
        msr sctlr_el1, x0
        isb
        ldr x2, =HIGH
        ldr x1, =hi_loop
        add x1, x1, x2
        ldr x3, =hi_counter
        add x3, x3, x2
        br x1
        .globl hi_loop
hi_loop:
        ldr x4, [x3]
        add x4, x4, #1
        str x4, [x3]
        b hi_loop
        .ltorg
        .data
        .balign 8
        .globl hi_counter
hi_counter: .quad 0
        .balign 4096
ttbr0_l1: .skip 4096
ttbr1_l1: .skip 4096
"""
HIGH = 0xFFFFFF8000000000


def test_arm64_guest_with_the_mmu_on_is_debugged_at_virtual_addresses(tmp_path):
    elf = build(tmp_path, "aarch64", _MMU_GUEST)
    with open(elf, "rb") as f:
        sym = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name}
    booted = Booted("aarch64", cpus=1, kernel=elf)
    t = booted.target
    try:
        booted.machine.start()
        time.sleep(0.2)
        t.interrupt()
        wait_stop(t)
        regs = booted.regs(1)
        assert regs["SCTLR_EL1"] & 1 and regs["pc"] >= HIGH
        high_counter = sym["hi_counter"] + HIGH
        assert u64(t, high_counter) == int.from_bytes(t.read_physical(sym["hi_counter"], 8), "little") > 0
        assert t.translate(high_counter, 1) == sym["hi_counter"]
        assert "physical" in t.monitor(f"translate {sym['hi_loop'] + HIGH:#x}")
        with pytest.raises(TargetError, match="cannot translate"):
            t.read_memory(HIGH + 0x8000_0000, 8, 1)  # TTBR1 maps only the second GiB
        t.add_sw_breakpoint(sym["hi_loop"] + HIGH, 4)
        event = booted.run_until_stop()
        assert event.kind == "swbreak" and booted.regs(1)["pc"] == sym["hi_loop"] + HIGH
        t.remove_sw_breakpoint(sym["hi_loop"] + HIGH, 4)
        t.add_hw_breakpoint(sym["hi_loop"] + HIGH + 4, 1)
        event = booted.run_until_stop()
        assert event.kind == "hwbreak" and booted.regs(1)["pc"] == sym["hi_loop"] + HIGH + 4
        t.remove_hw_breakpoint(sym["hi_loop"] + HIGH + 4, 1)
        t.add_watchpoint(high_counter, 8, "write")
        before = u64(t, high_counter)
        event = booted.run_until_stop()
        assert event.kind == "watch" and event.addr == high_counter and u64(t, high_counter) == before + 1
        with pytest.raises(TargetError, match="cannot translate"):
            t.add_watchpoint(HIGH + 0x8000_0000, 8, "write")
    finally:
        booted.machine.shutdown()


def test_x87_registers_count_from_the_stack_top(tmp_path):
    elf = build(tmp_path, "x86_64", ".globl start64\nstart64:\n fld1\n fldz\n fldpi\n int3\n jmp .\n")
    booted = Booted("x86_64", cpus=1, kernel=elf)
    try:
        booted.machine.start()
        assert wait_stop(booted.target).signal == SIGTRAP
        regs = booted.regs(1)
        one, pi = (0x3FFF << 64) | (1 << 63), 0x4000C90FDAA22168C235
        assert [regs[f"st{i}"] for i in range(3)] == [pi, 0, one]  # last pushed is st0, as GDB shows it
        booted.target.write_registers(1, {"st1": one})
        assert [booted.regs(1)[f"st{i}"] for i in range(3)] == [pi, one, one]
    finally:
        booted.machine.shutdown()
