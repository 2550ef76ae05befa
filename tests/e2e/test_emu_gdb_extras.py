"""What the emulated target adds beyond the shared GDB scenario
(tests/e2e/test_gdb_scenario.py), checked through ``vmscope run --accel emu``
and a real gdb-multiarch / gdb: the arm64 system registers and the
architecture picked from target.xml alone, per-vCPU state, monitor commands,
single steps that land exactly one instruction on, and the CLI booting the
demo guests without a debugger.
"""

from __future__ import annotations

import re
import signal
import socket
import subprocess

import pytest

from tests.support import Gdb, VmProcess
from vmscope.guests import guest_elf, guest_symbols

#: this file's TCP ports (15000-15999 belong to the emulated-target tests)
PORT_BASE = 15100


def _port(offset: int) -> int:
    port = PORT_BASE + offset
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # fails loudly if something else holds it
    return port


class Session:
    def __init__(self, arch: str, port: int, *, with_elf: bool = True):
        self.arch = arch
        self.elf = guest_elf("demo", arch)
        self.sym = guest_symbols("demo", arch)
        self.port = port
        self.vm = VmProcess("--accel", "emu", "--arch", arch, "--cpus", "2", gdb_port=port)
        self.vm.wait_listening()
        self.gdb = Gdb(self.elf if with_elf else None, binary="gdb-multiarch" if arch == "aarch64" else "gdb")
        out = self.gdb.cmd(f"target remote 127.0.0.1:{port}")
        assert "Remote debugging using" in out, out

    def close(self):
        self.gdb.close()
        self.vm.close()

    def check(self, cond: bool, what: str) -> None:
        assert cond, f"{what}\n--- gdb ---\n{self.gdb.transcript()}\n--- vmscope stderr ---\n{self.vm.stderr[-2000:]}"


@pytest.fixture(scope="module")
def arm():
    s = Session("aarch64", _port(0), with_elf=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def x86():
    s = Session("x86_64", _port(1))
    yield s
    s.close()


@pytest.mark.e2e
class TestArm64:
    def test_architecture_comes_from_target_xml_alone(self, arm):
        # no ELF loaded and no "set architecture": gdb-multiarch must pick aarch64
        out = arm.gdb.cmd("show architecture")
        arm.check('(currently "aarch64")' in out, "gdb-multiarch did not pick aarch64 from target.xml")
        out = arm.gdb.cmd("x/i $pc")
        arm.check("msr" in out or "mrs" in out, f"first instruction does not disassemble as arm64: {out}")

    def test_core_fpu_and_system_registers(self, arm):
        arm.check(arm.gdb.value("$CurrentEL") == 4, "CurrentEL is not EL1")
        arm.check(arm.gdb.value("$cpsr") & 0xF == 0x5, "cpsr is not EL1h")
        arm.check(arm.gdb.value("$SCTLR_EL1") & 1 == 0, "MMU should be off at entry")
        out = arm.gdb.cmd("info registers cpsr")
        arm.check("EL=1" in out, f"cpsr flags not decoded: {out}")
        arm.gdb.cmd("set $v2.d.u[0] = 0x1122334455667788")
        arm.check(arm.gdb.value("$v2.d.u[0]") == 0x1122334455667788, "v2 did not round-trip")
        out = arm.gdb.cmd("info registers system")
        for name in ("TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "VBAR_EL1", "ESR_EL1", "FAR_EL1"):
            arm.check(re.search(rf"^{name}\s", out, re.M) is not None, f"{name} missing from info registers system")

    def test_each_thread_has_its_own_mpidr(self, arm):
        arm.gdb.cmd("thread 2")
        arm.check(arm.gdb.value("$MPIDR_EL1") == 0x80000001, "thread 2 is not CPU 1")
        arm.gdb.cmd("thread 1")
        arm.check(arm.gdb.value("$MPIDR_EL1") == 0x80000000, "thread 1 is not CPU 0")
        out = arm.gdb.cmd("info threads")
        arm.check("vcpu 0" in out and "vcpu 1" in out, f"thread names missing: {out}")

    def test_monitor_commands(self, arm):
        out = arm.gdb.cmd("monitor cpus")
        arm.check("2 vCPU(s), aarch64" in out and "thread 2: vcpu 1" in out, f"monitor cpus: {out}")
        out = arm.gdb.cmd("monitor help")
        arm.check("translate" in out, f"monitor help: {out}")

    def test_stepi_lands_one_instruction_on(self, arm):
        # main_loop: mov x0, x19; bl tick -> tick: ldr x1, =counter; ldxr...
        # (GDB itself steps over a whole ldxr/stxr sequence, so stop before it)
        loop, tick = arm.sym["main_loop"], arm.sym["tick"]
        arm.gdb.cmd(f"hbreak *{loop:#x}")
        out = arm.gdb.cmd("continue", timeout=60)
        arm.check(arm.gdb.value("$pc") == loop, f"hbreak at main_loop not hit: {out}")
        arm.gdb.cmd("delete")
        for expected in (loop + 4, tick, tick + 4):
            arm.gdb.cmd("stepi")
            arm.check(arm.gdb.value("$pc") == expected, f"stepi did not land on {expected:#x}")


@pytest.mark.e2e
class TestX86:
    def test_control_registers_and_long_mode(self, x86):
        # attached at the PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info
        x86.check(x86.gdb.value("$pc") == x86.sym["pvh_entry"], "not stopped at the PVH entry")
        x86.check(x86.gdb.value("$cr0") & 0x80000001 == 1 and x86.gdb.value("$efer") == 0, "not the PVH entry state")
        x86.check(x86.gdb.value("*(unsigned int *)$rbx") == 0x336EC578, "ebx does not point to the hvm_start_info")
        # the guest's own switch to long mode, run by Unicorn; stop in main_loop,
        # after CPU 0 took index 0 (a stop at start64, before its `lock xadd`,
        # would let CPU 1 take it first when the round resumes with CPU 1)
        x86.gdb.cmd("hbreak main_loop")
        x86.gdb.cmd("continue", timeout=60)
        x86.gdb.cmd("delete")
        x86.check(x86.gdb.value("$pc") == x86.sym["main_loop"], "not stopped in main_loop")
        x86.check(x86.gdb.value("$cr0") >> 31 == 1, "paging is off")
        x86.check(x86.gdb.value("$efer") & 0x500 == 0x500, "long mode not active")
        x86.check(x86.gdb.value("$cs") == 8, "cs is not the 64-bit code selector")

    def test_watch_counter_then_watch_per_cpu_counter_of_cpu_1(self, x86):
        x86.gdb.cmd("watch per_cpu_counter[1]")
        out = x86.gdb.cmd("continue", timeout=60)
        m = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
        x86.check(m is not None and int(m.group(2)) == int(m.group(1)) + 1, f"watch per_cpu_counter[1]: {out}")
        x86.check("Thread 2" in out, f"the store was CPU 1's (thread 2): {out}")
        x86.gdb.cmd("delete")


@pytest.mark.e2e
@pytest.mark.parametrize("arch", ["x86_64", "aarch64"])
def test_vmscope_run_boots_the_demo_on_the_emulated_cpu(arch):
    vm = VmProcess("--accel", "emu", "--arch", arch, "--cpus", "2")
    try:
        vm.wait_for(r"cpu 0 up", timeout=60)
        vm.wait_for(r"cpu 1 up", timeout=60)
        vm.proc.send_signal(signal.SIGINT)
        vm.wait_exit(30)
    finally:
        vm.close()


@pytest.mark.e2e
def test_auto_accel_falls_back_to_the_emulated_cpu_for_arm64_with_one_line():
    vm = VmProcess("--arch", "aarch64")
    try:
        vm.wait_for(r"cpu 0 up", timeout=60)
        notices = [line for line in vm.stderr.splitlines() if "emulated CPU" in line]
        assert len(notices) == 1, vm.stderr
    finally:
        vm.close()


@pytest.mark.e2e
def test_guest_exit_reaches_gdb_and_the_exit_status(tmp_path):
    (tmp_path / "e.S").write_text(".globl start64\nstart64:\n mov $3, %al\n out %al, $0xf4\n jmp .\n")
    subprocess.run(["as", "--64", "-o", str(tmp_path / "e.o"), str(tmp_path / "e.S")], check=True)
    subprocess.run(["ld", "-Ttext=0x100000", "-e", "start64", "-o", str(tmp_path / "e.elf"), str(tmp_path / "e.o")],
                   check=True)
    port = _port(2)
    vm = VmProcess("--accel", "emu", "--arch", "x86_64", "--kernel", str(tmp_path / "e.elf"), gdb_port=port)
    gdb = None
    try:
        vm.wait_listening()
        gdb = Gdb(tmp_path / "e.elf")
        assert "Remote debugging using" in gdb.cmd(f"target remote 127.0.0.1:{port}")
        out = gdb.cmd("continue", timeout=60)
        assert "exited with code 03" in out, out
        assert vm.wait_exit(30) == 3
    finally:
        if gdb is not None:
            gdb.close()
        vm.close()
