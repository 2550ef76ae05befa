"""The emulated-CPU target through its Target API, on the real demo guests
(x86_64 and aarch64) running in real Unicorn: no stub, no GDB.

Each test boots its own machine; a run of the demo guest costs milliseconds.
"""

from __future__ import annotations

import time

import capstone
import pytest
from elftools.elf.elffile import ELFFile

from tests.emu_support import ARCHES, CONTINUE, Booted, step, u64, wait_stop
from vmscope.emu import EmuMachine
from vmscope.gdbserver.target import SIGINT, SIGTRAP, TargetError
from vmscope.guests import guest_elf
from vmscope.machine import ImageError, MachineConfig

ENTRY_SYMBOL = {"x86_64": "pvh_entry", "aarch64": "_start"}
#: the register the demo guest keeps its CPU index in
CPU_INDEX_REG = {"x86_64": "rbx", "aarch64": "x19"}


def elf_bytes(path, addr: int, length: int) -> bytes:
    with open(path, "rb") as f:
        for seg in ELFFile(f).iter_segments():
            if seg["p_type"] == "PT_LOAD" and seg["p_vaddr"] <= addr < seg["p_vaddr"] + seg["p_filesz"]:
                off = addr - seg["p_vaddr"]
                return seg.data()[off : off + length]
    raise AssertionError(f"{addr:#x} is not in a loaded segment")


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
        # the PVH entry state: protected mode, paging off, ebx = hvm_start_info
        assert regs["cr0"] & 1 and not regs["cr0"] & (1 << 31) and regs["efer"] == 0
        assert int.from_bytes(vm.target.read_physical(regs["rbx"], 4), "little") == 0x336EC578  # its magic
        # the guest's own switch to long mode, as Unicorn carried it out
        vm.target.add_sw_breakpoint(vm.sym["tick"], 1)
        assert vm.run_until_stop().kind == "swbreak"
        regs = vm.regs(1)
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
