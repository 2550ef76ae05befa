"""The emulated-CPU target through its Target API, on the real demo guests
(x86_64 and aarch64) running in real Unicorn: no stub, no GDB.

Each test boots its own machine; a run of the demo guest costs milliseconds.
"""

from __future__ import annotations

import io
import os
import select
import shutil
import subprocess
import time

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from vmscope.emu import EmuMachine
from vmscope.gdbserver.target import SIGINT, SIGTRAP, ResumeAction, ResumeActions, TargetError
from vmscope.guests import guest_elf, guest_symbols
from vmscope.machine import ImageError, MachineConfig

ARCHES = ["x86_64", "aarch64"]
CONTINUE = ResumeActions(default=ResumeAction("continue"))
ENTRY_SYMBOL = {"x86_64": "start64", "aarch64": "_start"}
PC = {"x86_64": "rip", "aarch64": "pc"}
#: the register the demo guest keeps its CPU index in
CPU_INDEX_REG = {"x86_64": "rbx", "aarch64": "x19"}


def step(tid: int = 1) -> ResumeActions:
    return ResumeActions(per_thread={tid: ResumeAction("step")})


def wait_stop(target, timeout: float = 30.0):
    ready, _, _ = select.select([target.stop_fd()], [], [], timeout)
    assert ready, f"no stop within {timeout} s"
    event = target.take_stop()
    assert event is not None
    assert not target.is_running()
    return event


def u64(target, addr: int, tid: int = 1) -> int:
    return int.from_bytes(target.read_memory(addr, 8, tid), "little")


def elf_bytes(path, addr: int, length: int) -> bytes:
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                off = addr - seg["p_vaddr"]
                return seg.data()[off : off + length]
    raise AssertionError(f"{addr:#x} is not in a loaded segment")


class Booted:
    def __init__(self, arch: str, cpus: int = 2, kernel=None) -> None:
        self.arch = arch
        self.serial = io.BytesIO()
        self.machine = EmuMachine(MachineConfig(arch=arch, cpus=cpus, kernel=kernel, serial_out=self.serial))
        self.target = self.machine.debug_target()
        self.sym = guest_symbols("demo", arch) if kernel is None else {}
        self.pc = PC[arch]

    def regs(self, tid: int = 1):
        return self.target.read_registers(tid)

    def run_until_stop(self):
        self.target.resume(CONTINUE)
        return wait_stop(self.target)

    def wait_serial(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while text.encode() not in self.serial.getvalue():
            assert time.monotonic() < deadline, f"{text!r} not printed; serial: {self.serial.getvalue()!r}"
            time.sleep(0.02)


@pytest.fixture(params=ARCHES)
def vm(request):
    booted = Booted(request.param)
    booted.machine.start(paused=True)
    yield booted
    booted.machine.shutdown()


@pytest.fixture(params=ARCHES)
def vm1(request):
    """One CPU: counts per stop are exact."""
    booted = Booted(request.param, cpus=1)
    booted.machine.start(paused=True)
    yield booted
    booted.machine.shutdown()


def test_starts_paused_at_the_entry_with_no_instruction_run(vm):
    entry = vm.sym[ENTRY_SYMBOL[vm.arch]]
    assert vm.target.threads() == [1, 2]
    assert vm.target.initial_stop().signal == SIGTRAP
    assert [vm.regs(tid)[vm.pc] for tid in (1, 2)] == [entry, entry]
    time.sleep(0.2)
    assert vm.serial.getvalue() == b""
    assert u64(vm.target, vm.sym["counter"]) == 0


def test_each_cpu_prints_its_line_on_the_uart(vm):
    vm.target.resume(CONTINUE)
    vm.wait_serial("vmscope demo guest: cpu 1 up\n")
    assert b"vmscope demo guest: cpu 0 up\n" in vm.serial.getvalue()
    vm.target.interrupt()
    assert wait_stop(vm.target).signal == SIGINT


def test_interrupt_stops_a_running_guest_which_then_resumes(vm):
    vm.target.resume(CONTINUE)
    time.sleep(0.3)
    assert vm.target.is_running()
    vm.target.interrupt()
    event = wait_stop(vm.target)
    assert event.kind == "signal" and event.signal == SIGINT and event.tid in (1, 2)
    first = u64(vm.target, vm.sym["counter"])
    assert first > 0
    vm.target.resume(CONTINUE)
    time.sleep(0.2)
    vm.target.interrupt()
    wait_stop(vm.target)
    assert u64(vm.target, vm.sym["counter"]) > first


def test_two_cpus_are_two_threads_with_their_own_state(vm):
    vm.target.resume(CONTINUE)
    vm.wait_serial("cpu 1 up")
    time.sleep(0.2)
    vm.target.interrupt()
    wait_stop(vm.target)
    per_cpu = [u64(vm.target, vm.sym["per_cpu_counter"] + 8 * i) for i in range(2)]
    assert all(n > 0 for n in per_cpu), per_cpu
    # tick bumps counter, then per_cpu_counter: a CPU stopped between the
    # two is one ahead; anything else means an instruction ran twice or not at all
    assert 0 <= u64(vm.target, vm.sym["counter"]) - sum(per_cpu) <= 2
    index = CPU_INDEX_REG[vm.arch]
    assert {vm.regs(1)[index], vm.regs(2)[index]} == {0, 1}
    assert vm.target.thread_name(2) == "vcpu 1"
    if vm.arch == "aarch64":
        assert [vm.regs(t)["MPIDR_EL1"] & 0xFF for t in (1, 2)] == [0, 1]


def test_register_writes_read_back(vm):
    reg = "x5" if vm.arch == "aarch64" else "r12"
    vm.target.write_registers(2, {reg: 0x1122334455667788})
    assert vm.regs(2)[reg] == 0x1122334455667788
    assert vm.regs(1)[reg] != 0x1122334455667788
    vec = "v3" if vm.arch == "aarch64" else "xmm3"
    vm.target.write_registers(1, {vec: (1 << 127) | 0xABCDEF})
    assert vm.regs(1)[vec] == (1 << 127) | 0xABCDEF
    with pytest.raises(TargetError, match="no register"):
        vm.target.write_registers(1, {"nosuchreg": 1})
    with pytest.raises(TargetError, match="no thread 3"):
        vm.target.read_registers(3)


def test_system_registers_describe_the_boot_state(vm):
    regs = vm.regs(1)
    if vm.arch == "x86_64":
        assert regs["cr0"] & (1 << 31) and regs["cr3"] and regs["efer"] & 0x500 == 0x500
        assert regs["cs"] == 0x08 and not regs["eflags"] & 0x200  # long mode, interrupts off
    else:
        assert regs["CurrentEL"] == 4 and regs["cpsr"] & 0xF == 0x5  # EL1h
        assert not regs["SCTLR_EL1"] & 1  # MMU off


def test_memory_round_trip_and_errors(vm):
    t, counter = vm.target, vm.sym["counter"]
    t.write_memory(counter, bytes(range(16)), 1)
    assert t.read_memory(counter, 16, 2) == bytes(range(16))
    assert t.read_physical(counter, 16) == bytes(range(16))
    end = t.ram.end
    assert t.read_memory(end - 4, 64, 1) == bytes(4)  # stops at the end of RAM
    with pytest.raises(TargetError, match="outside RAM"):
        t.read_memory(end + 0x1000, 8, 1)
    with pytest.raises(TargetError):
        t.write_memory(end - 4, bytes(8), 1)  # all or nothing
    assert t.read_memory(end - 4, 4, 1) == bytes(4)


def test_software_breakpoint_hits_tick_again_and_again(vm):
    t, tick = vm.target, vm.sym["tick"]
    kind = t.arch.breakpoint_kind
    original = elf_bytes(vm.machine.kernel, tick, len(t.arch.breakpoint))
    values, tids = [], set()
    t.add_sw_breakpoint(tick, kind)
    assert t.read_physical(tick, len(original)) == t.arch.breakpoint  # patched in RAM...
    assert t.read_memory(tick, len(original), 1) == original  # ...but reads show the original
    for _ in range(20):
        event = vm.run_until_stop()
        assert event.kind == "swbreak" and event.signal == SIGTRAP
        assert vm.regs(event.tid)[vm.pc] == tick
        values.append(u64(t, vm.sym["counter"]))
        tids.add(event.tid)
        # step over it the way GDB does: remove, single-step, re-insert
        t.remove_sw_breakpoint(tick, kind)
        t.resume(step(event.tid))
        assert wait_stop(t).signal == SIGTRAP
        t.add_sw_breakpoint(tick, kind)
    assert values == sorted(values) and values[-1] > values[0]
    assert tids == {1, 2}  # both vCPUs get to run between hits
    t.remove_sw_breakpoint(tick, kind)
    assert t.read_physical(tick, len(original)) == original  # detach leaves the code unpatched
    t.detach()
    assert t.is_running()
    t.interrupt()
    wait_stop(t)


def test_guest_memory_writes_under_a_breakpoint_keep_it(vm):
    t, tick = vm.target, vm.sym["tick"]
    kind = t.arch.breakpoint_kind
    t.add_sw_breakpoint(tick, kind)
    t.write_memory(tick, b"\x90" * len(t.arch.breakpoint), 1)
    assert t.read_memory(tick, len(t.arch.breakpoint), 1) == b"\x90" * len(t.arch.breakpoint)
    assert t.read_physical(tick, len(t.arch.breakpoint)) == t.arch.breakpoint
    t.remove_sw_breakpoint(tick, kind)
    assert t.read_physical(tick, len(t.arch.breakpoint)) == b"\x90" * len(t.arch.breakpoint)


def test_hardware_breakpoint_stops_before_tick_and_continues_past_it(vm1):
    t, tick = vm1.target, vm1.sym["tick"]
    t.add_hw_breakpoint(tick, 1)
    counts = []
    for _ in range(5):
        event = vm1.run_until_stop()
        assert event.kind == "hwbreak"
        assert vm1.regs(1)[vm1.pc] == tick
        counts.append(u64(t, vm1.sym["counter"]))
    assert counts == list(range(counts[0], counts[0] + 5))  # one tick per continue
    assert t.read_physical(tick, 4) == elf_bytes(vm1.machine.kernel, tick, 4)  # nothing patched
    t.remove_hw_breakpoint(tick, 1)
    t.resume(CONTINUE)
    time.sleep(0.1)
    t.interrupt()
    assert wait_stop(t).signal == SIGINT


def test_write_watchpoint_stops_after_the_store_with_the_new_value(vm1):
    t, counter = vm1.target, vm1.sym["counter"]
    t.add_watchpoint(counter, 8, "write")
    for _ in range(5):
        before = u64(t, counter)
        event = vm1.run_until_stop()
        assert event.kind == "watch" and event.addr == counter
        assert u64(t, counter) == before + 1  # stored exactly once, and already visible
        pc = vm1.regs(1)[vm1.pc]
        assert vm1.sym["tick"] < pc < vm1.sym["tick"] + 0x40  # past the store, still in tick
    t.remove_watchpoint(counter, 8, "write")


def test_read_and_access_watchpoints(vm1):
    t, per_cpu = vm1.target, vm1.sym["per_cpu_counter"]
    t.add_watchpoint(per_cpu, 8, "read")
    event = vm1.run_until_stop()
    assert event.kind == "rwatch" and event.addr == per_cpu
    t.remove_watchpoint(per_cpu, 8, "read")
    t.add_watchpoint(per_cpu + 4, 2, "access")  # inside the 8-byte counter: overlap counts
    event = vm1.run_until_stop()
    assert event.kind == "awatch" and event.addr == per_cpu + 4
    t.remove_watchpoint(per_cpu + 4, 2, "access")


def _insn_length(arch: str, code: bytes, addr: int) -> int:
    if arch == "aarch64":
        md = capstone.Cs(capstone.CS_ARCH_ARM64, capstone.CS_MODE_ARM)
    else:
        md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    return next(md.disasm(code, addr)).size


def test_single_step_moves_one_instruction(vm1):
    t, tick = vm1.target, vm1.sym["tick"]
    t.add_hw_breakpoint(tick, 1)
    vm1.run_until_stop()
    t.remove_hw_breakpoint(tick, 1)
    length = _insn_length(vm1.arch, t.read_memory(tick, 16, 1), tick)
    t.resume(step(1))
    event = wait_stop(t)
    assert event.kind == "signal" and event.signal == SIGTRAP and event.tid == 1
    assert vm1.regs(1)[vm1.pc] == tick + length
    before = u64(t, vm1.sym["counter"])
    text = {vm1.regs(1)[vm1.pc]}
    for _ in range(1000):
        t.resume(step(1))
        wait_stop(t)
        text.add(vm1.regs(1)[vm1.pc])
    loop = vm1.sym["main_loop"]
    assert all(loop - 0x100 < pc < tick + 0x100 for pc in text)
    assert len(text) > 5
    assert u64(t, vm1.sym["counter"]) > before


def test_kill_ends_the_machine_with_status_0(vm):
    vm.target.resume(CONTINUE)
    time.sleep(0.1)
    vm.target.kill()
    assert vm.machine.wait(10) == 0


def test_monitor_commands(vm):
    assert "cpus" in vm.target.monitor("help")
    out = vm.target.monitor("cpus")
    assert "2 vCPU(s)" in out and "thread 2: vcpu 1" in out
    counter = vm.sym["counter"]
    assert f"physical {counter:#x}" in vm.target.monitor(f"translate {counter:#x}")
    assert "unknown monitor command" in vm.target.monitor("frobnicate")


def test_bad_images_are_named(tmp_path):
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"not an elf at all")
    with pytest.raises(ImageError, match="junk.elf: not a loadable ELF"):
        EmuMachine(MachineConfig(arch="x86_64", kernel=junk))
    with pytest.raises(ImageError, match="e_machine is EM_AARCH64, expected EM_X86_64"):
        EmuMachine(MachineConfig(arch="x86_64", kernel=guest_elf("demo", "aarch64")))
    with pytest.raises(ValueError, match="unsupported --arch 'riscv64'"):
        EmuMachine(MachineConfig(arch="riscv64"))


# --- a guest's own breakpoint instruction -----------------------------------------------

_OWN_BRK = {
    "aarch64": (["aarch64-linux-gnu-as"], ["aarch64-linux-gnu-ld", "-Ttext=0x40080000"],
                ".globl _start\n_start:\n mov x0, #7\n brk #0\n mov x0, #8\n b .\n"),
    "x86_64": (["as", "--64"], ["ld", "-Ttext=0x100000", "-e", "start64"],
               ".globl start64\nstart64:\n mov $7, %eax\n int3\n mov $8, %eax\n jmp .\n"),
}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_guests_own_breakpoint_is_reported_as_sigtrap(arch, tmp_path):
    assemble, link, source = _OWN_BRK[arch]
    for tool in (assemble[0], link[0]):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed (binutils / binutils-aarch64-linux-gnu)")
    (tmp_path / "g.S").write_text(source)
    subprocess.run([*assemble, "-o", str(tmp_path / "g.o"), str(tmp_path / "g.S")], check=True)
    subprocess.run([*link, "-o", str(tmp_path / "g.elf"), str(tmp_path / "g.o")], check=True)
    booted = Booted(arch, cpus=1, kernel=tmp_path / "g.elf")
    try:
        booted.machine.start()
        event = wait_stop(booted.target)
        assert event.kind == "signal" and event.signal == SIGTRAP
        regs = booted.regs(1)
        assert regs["x0" if arch == "aarch64" else "rax"] == 7
    finally:
        booted.machine.shutdown()


_HALTING = {
    "aarch64": (["aarch64-linux-gnu-as"], ["aarch64-linux-gnu-ld", "-Ttext=0x40080000"],
                ".globl _start\n_start:\n add x0, x0, #1\n wfi\n b _start\n"),
    "x86_64": (["as", "--64"], ["ld", "-Ttext=0x100000", "-e", "start64"],
               ".globl start64\nstart64:\n inc %eax\n hlt\n jmp start64\n"),
}


@pytest.mark.parametrize("arch", ARCHES)
def test_a_halted_guest_idles_and_still_stops_on_ctrl_c(arch, tmp_path):
    assemble, link, source = _HALTING[arch]
    (tmp_path / "h.S").write_text(source)
    subprocess.run([*assemble, "-o", str(tmp_path / "h.o"), str(tmp_path / "h.S")], check=True)
    subprocess.run([*link, "-o", str(tmp_path / "h.elf"), str(tmp_path / "h.o")], check=True)
    booted = Booted(arch, cpus=2, kernel=tmp_path / "h.elf")
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
    (tmp_path / "v.S").write_text(_HANDLED_BRK)
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(tmp_path / "v.o"), str(tmp_path / "v.S")], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-Ttext=0x40080000", "-o", str(tmp_path / "v.elf"), str(tmp_path / "v.o")],
                   check=True)
    booted = Booted("aarch64", cpus=1, kernel=tmp_path / "v.elf")
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
    (tmp_path / "low.S").write_text(".globl start64\nstart64:\n jmp .\n")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "low.o"), str(tmp_path / "low.S")], check=True)
    subprocess.run(["ld", "-Ttext=0x2000", "-e", "start64", "-o", str(tmp_path / "low.elf"), str(tmp_path / "low.o")],
                   check=True)
    with pytest.raises(ImageError, match=r"low.elf: PT_LOAD at 0x[0-9a-f]+ .* overlaps 0x500-0x80000"):
        EmuMachine(MachineConfig(arch="x86_64", kernel=tmp_path / "low.elf"))


_POWER_OFF = {
    "x86-exit-device": ("x86_64", ".globl start64\nstart64:\n mov $3, %al\n out %al, $0xf4\n jmp .\n", 3),
    "x86-acpi": ("x86_64", ".globl start64\nstart64:\n mov $0x2000, %ax\n mov $0x604, %dx\n out %ax, %dx\n jmp .\n", 0),
    "arm64-psci": ("aarch64", ".globl _start\n_start:\n ldr x0, =0x84000000\n hvc #0\n mov x5, x0\n"
                   " ldr x0, =0x84000001\n smc #0\n mov x6, x0\n ldr x0, =0x84000008\n hvc #0\n b .\n", 0),
}


@pytest.mark.parametrize("case", sorted(_POWER_OFF))
def test_guest_power_off_ends_the_machine_with_its_status(case, tmp_path):
    arch, source, status = _POWER_OFF[case]
    assemble, link, _ = _OWN_BRK[arch]
    (tmp_path / "p.S").write_text(source)
    subprocess.run([*assemble, "-o", str(tmp_path / "p.o"), str(tmp_path / "p.S")], check=True)
    subprocess.run([*link, "-o", str(tmp_path / "p.elf"), str(tmp_path / "p.o")], check=True)
    booted = Booted(arch, cpus=2, kernel=tmp_path / "p.elf")
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
    assemble, link, _ = _OWN_BRK[arch]
    (tmp_path / "echo.S").write_text(_ECHO[arch])
    subprocess.run([*assemble, "-o", str(tmp_path / "echo.o"), str(tmp_path / "echo.S")], check=True)
    subprocess.run([*link, "-o", str(tmp_path / "echo.elf"), str(tmp_path / "echo.o")], check=True)
    read_end, write_end = os.pipe()
    serial = io.BytesIO()
    machine = EmuMachine(MachineConfig(arch=arch, kernel=tmp_path / "echo.elf", serial_out=serial, serial_in=read_end))
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
    (tmp_path / "mmu.S").write_text(_MMU_GUEST)
    subprocess.run(["aarch64-linux-gnu-as", "-o", str(tmp_path / "mmu.o"), str(tmp_path / "mmu.S")], check=True)
    subprocess.run(["aarch64-linux-gnu-ld", "-Ttext=0x40080000", "-o", str(tmp_path / "mmu.elf"), str(tmp_path / "mmu.o")],
                   check=True)
    with open(tmp_path / "mmu.elf", "rb") as f:
        sym = {s.name: s["st_value"] for s in ELFFile(f).get_section_by_name(".symtab").iter_symbols() if s.name}
    booted = Booted("aarch64", cpus=1, kernel=tmp_path / "mmu.elf")
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
