"""The foundation scenario: a real GDB debugging a guest under ``vmscope run``.

One VM and one interactive GDB per back end (class-scoped), driven step by
step as a user would: attach, registers, memory, breakpoints, watchpoints,
stepping, threads, Ctrl-C, detach, a second debugger, kill.

Back ends: the KVM micro-VMM on this machine's /dev/kvm, the same VMM inside
the nested lab (real KVM on QEMU TCG's SVM: page-protection breakpoints), and
the emulated CPU (x86_64 and aarch64, the latter through gdb-multiarch). The
x86_64 guests are the same on both back ends, all started at their 32-bit
PVH entry: the demo guest, a second one with its own IDT and INT3s, and
``walk``, a standard PVH guest with none of vmscope's conventions (its loop
function is ``visit``, its counter ``visits``).
"""

from __future__ import annotations

import re
import time

import pytest
from tests.support import Gdb, VmProcess, elf_bytes_at, elf_symbols, free_port, require_kvm, require_tool

BACKENDS = [
    pytest.param(("kvm", "x86_64", "demo"), id="kvm-x86_64-demo"),
    pytest.param(("kvm", "x86_64", "idt"), id="kvm-x86_64-idt"),
    pytest.param(("kvm", "x86_64", "walk"), id="kvm-x86_64-walk"),
    pytest.param(("emu", "x86_64", "demo"), id="emu-x86_64-demo"),
    pytest.param(("emu", "x86_64", "idt"), id="emu-x86_64-idt"),
    pytest.param(("emu", "x86_64", "walk"), id="emu-x86_64-walk"),
    pytest.param(("emu", "aarch64", "demo"), id="emu-aarch64-demo"),
]
# Hardware-KVM semantics (AMD SVM): vmscope inside the nested lab (KVM on QEMU
# TCG's SVM), gdb on the host through a forwarded port. There neither INT3 nor
# debug-register hits reach KVM, so breakpoints use page protection.
BACKENDS.append(pytest.param(("lab-kvm", "x86_64", "demo"), id="lab-kvm-x86_64-demo",
                             marks=[pytest.mark.lab, pytest.mark.slow]))

LAB_GUEST_PORT = 25500
LAB_PORTS = (25000, 25199)


class LabVm:
    """``vmscope run`` inside the nested lab, with the VmProcess interface
    the scenario uses (serial output, waits, exit status)."""

    def __init__(self, args: list[str]):
        from vmscope.lab import Lab

        self.lab = Lab(cpus=2, mem_mib=2048, forward=[LAB_GUEST_PORT], port_range=LAB_PORTS)
        self.lab.__enter__()
        self.proc = self.lab.spawn(["python3", "-m", "vmscope", "run", *args, "--gdb", f"0.0.0.0:{LAB_GUEST_PORT}"])
        self.port = self.lab.host_port(LAB_GUEST_PORT)

    @property
    def serial(self) -> str:
        return self.proc.stdout

    @property
    def stderr(self) -> str:
        return self.proc.stderr

    def wait_for(self, pattern: str, timeout: float = 60, stream: str = "serial") -> re.Match:
        return self.proc.wait_for_output(pattern, timeout * 3, "stdout" if stream == "serial" else "stderr")

    def wait_listening(self, timeout: float = 60) -> None:
        self.wait_for(r"waiting for gdb", 120, stream="stderr")

    def wait_exit(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout * 3).returncode

    def close(self) -> None:
        try:
            self.proc.__exit__(None, None, None)
        finally:
            self.lab.__exit__(None, None, None)

TICK_HITS = 50
#: per guest: the function its loop calls, the 64-bit global that function
#: increments, and the loop itself
LOOP_NAMES = {"demo": ("tick", "counter", "main_loop"), "idt": ("tick", "counter", "main_loop"),
              "walk": ("visit", "visits", "walk_loop")}


class Scenario:
    def __init__(self, accel: str, arch: str, guest: str):
        from vmscope.guests import guest_elf

        self.accel, self.arch, self.guest = accel, arch, guest
        self.elf = guest_elf(guest, arch)
        self.symbols = elf_symbols(self.elf)
        self.tick, self.counter, self.loop = LOOP_NAMES[guest]
        args = ["--accel", "kvm" if accel == "lab-kvm" else accel, "--arch", arch, "--cpus", "2"]
        if guest != "demo":
            args += ["--kernel", str(self.elf)]
        if accel == "lab-kvm":
            self.vm = LabVm(args)
            self.port = self.vm.port
        else:
            self.port = free_port()
            self.vm = VmProcess(*args, gdb_port=self.port)
        self.vm.wait_listening()
        self.gdb = Gdb(self.elf, binary="gdb" if arch == "x86_64" else "gdb-multiarch")
        self.pc = "$pc"

    def counter_expr(self) -> str:
        out = self.gdb.cmd(f"ptype {self.counter}")
        return self.counter if "type = " in out and "unknown" not in out else f"*(unsigned long long *)&{self.counter}"

    def close(self) -> None:
        self.gdb.close()
        self.vm.close()


@pytest.fixture(scope="class", params=BACKENDS)
def sc(request):
    accel, arch, guest = request.param
    if accel == "kvm":
        require_kvm()
    if accel == "lab-kvm":
        for tool in ("qemu-system-x86_64", "apt-get", "dpkg-deb", "/usr/bin/python3.11"):
            require_tool(tool)
    s = Scenario(accel, arch, guest)
    yield s
    s.close()


def _check(sc: Scenario, cond: bool, what: str) -> None:
    assert cond, f"{what}\n--- gdb transcript ---\n{sc.gdb.transcript()}\n--- vmscope stderr ---\n{sc.vm.stderr[-3000:]}"


@pytest.mark.e2e
class TestGdbScenario:
    def test_attach_stops_before_first_instruction(self, sc):
        out = sc.gdb.cmd(f"target remote 127.0.0.1:{sc.port}")
        _check(sc, "Remote debugging using" in out, "target remote failed")
        pc = sc.gdb.value("$pc")
        entries = {sc.symbols.get(n) for n in ("pvh_entry", "start64", "_start")} - {None}
        _check(sc, pc in entries, f"pc {pc:#x} is not an entry point {sorted(map(hex, entries))}")
        _check(sc, "cpu 0 up" not in sc.vm.serial, "guest ran before the debugger continued")

    def test_info_registers(self, sc):
        out = sc.gdb.cmd("info registers")
        names = ["rip", "cr3", "efer", "eflags", "cs"] if sc.arch == "x86_64" else ["pc", "cpsr", "sp", "x0"]
        for name in names:
            _check(sc, re.search(rf"^{name}\s", out, re.M) is not None, f"{name} missing from info registers")

    def test_memory_roundtrip(self, sc):
        out = sc.gdb.cmd(f"x/8xg &{sc.counter}")
        _check(sc, len(re.findall(r"0x[0-9a-f]{16}", out)) == 8, "x/8xg did not show 8 quadwords")
        expr = sc.counter_expr()
        sc.gdb.cmd(f"set var {expr} = 0x1122334455667788")
        _check(sc, sc.gdb.value(expr) == 0x1122334455667788, "set var did not round-trip")
        sc.gdb.cmd(f"set var {expr} = 0")
        _check(sc, sc.gdb.value(expr) == 0, "set var 0 did not round-trip")

    def test_break_tick_hits_repeatedly(self, sc):
        out = sc.gdb.cmd(f"break {sc.tick}")
        _check(sc, "Breakpoint 1 at" in out, "break tick failed")
        tick = sc.symbols[sc.tick]
        expr = sc.counter_expr()
        values = []
        for i in range(TICK_HITS):
            out = sc.gdb.cmd("continue", timeout=120)
            _check(sc, "Breakpoint 1," in out and sc.tick in out, f"hit {i} not reported")
            pc = sc.gdb.value("$pc")
            _check(sc, tick <= pc < tick + 16, f"stopped at {pc:#x}, not in tick {tick:#x}")
            values.append(sc.gdb.value(expr))
        _check(sc, values == sorted(values) and values[-1] > values[0], f"counter did not advance: {values[:5]}...")
        sc.gdb.cmd("delete")

    def test_hbreak(self, sc):
        out = sc.gdb.cmd(f"hbreak {sc.tick}")
        _check(sc, "Hardware assisted breakpoint" in out, "hbreak not accepted")
        for _ in range(3):
            out = sc.gdb.cmd("continue", timeout=120)
            _check(sc, sc.tick in out and "Breakpoint" in out, "hbreak did not hit")
        sc.gdb.cmd("delete")

    def test_watch_counter_reports_old_and_new(self, sc):
        expr = sc.counter_expr()
        out = sc.gdb.cmd(f"watch {expr}")
        _check(sc, "atchpoint" in out, "watch not accepted")
        for _ in range(3):
            out = sc.gdb.cmd("continue", timeout=120)
            m = re.search(r"Old value = (\d+)\s+New value = (\d+)", out)
            _check(sc, m is not None, "watchpoint hit without old/new values")
            old, new = int(m.group(1)), int(m.group(2))
            _check(sc, new == old + 1, f"counter went {old} -> {new}")
            _check(sc, new == sc.gdb.value(expr), "memory does not hold the new value at the stop")
        sc.gdb.cmd("delete")

    def test_rwatch(self, sc):
        expr = sc.counter_expr()
        out = sc.gdb.cmd(f"rwatch {expr}")
        _check(sc, "read watchpoint" in out, "rwatch not accepted")
        out = sc.gdb.cmd("continue", timeout=120)
        _check(sc, "read watchpoint" in out and "Value = " in out, "rwatch did not trigger")
        sc.gdb.cmd("delete")

    def test_stepi_1000(self, sc):
        before = sc.gdb.value("$pc")
        seen = {before}
        for _ in range(5):
            sc.gdb.cmd("stepi")
            seen.add(sc.gdb.value("$pc"))
        _check(sc, len(seen) > 1, "stepi does not move the pc")
        out = sc.gdb.cmd("stepi 1000", timeout=300)
        _check(sc, "Cannot" not in out and "error" not in out.lower(), f"stepi 1000 failed: {out[-300:]}")
        text = {sc.symbols[n] for n in (sc.tick, sc.loop) if n in sc.symbols}
        pc = sc.gdb.value("$pc")
        _check(sc, any(abs(pc - t) < 0x400 for t in text), f"after 1000 steps pc {pc:#x} is not in the guest loop")

    def test_threads(self, sc):
        out = sc.gdb.cmd("info threads")
        _check(sc, len(re.findall(r"^\*?\s+\d+\s+Thread", out, re.M)) == 2, "info threads does not list 2 vCPUs")
        out = sc.gdb.cmd("thread 2")
        _check(sc, "Switching to thread 2" in out, "cannot select thread 2")
        out = sc.gdb.cmd("info registers " + ("rip" if sc.arch == "x86_64" else "pc"))
        _check(sc, "0x" in out, "no registers for thread 2")
        sc.gdb.cmd("thread 1")

    def test_ctrl_c_stops_running_guest(self, sc):
        sc.gdb.start("continue")
        time.sleep(1.0)
        out = sc.gdb.interrupt()
        _check(sc, "SIGINT" in out, "Ctrl-C did not stop the guest")

    def test_detach_leaves_guest_running_unpatched(self, sc):
        sc.gdb.cmd(f"break {sc.tick}")
        sc.gdb.cmd(f"hbreak {sc.loop}" if sc.loop in sc.symbols else "info breakpoints")
        expr = sc.counter_expr()
        at_detach = sc.gdb.value(expr)
        beats = sc.vm.serial.count("heartbeat")
        out = sc.gdb.cmd("detach")
        _check(sc, "Detaching" in out or "detached" in out.lower(), "detach failed")
        if sc.guest == "demo" and sc.arch == "x86_64":  # its console goes on: new heartbeat lines
            sc.vm.wait_for(r"(?s)" + "heartbeat.*" * (beats + 2), timeout=60)
        # A second debugger sees the original bytes and a counter that moved on.
        time.sleep(0.5)
        gdb2 = Gdb(sc.elf, binary="gdb" if sc.arch == "x86_64" else "gdb-multiarch")
        try:
            out = gdb2.cmd(f"target remote 127.0.0.1:{sc.port}")
            assert "Remote debugging using" in out, out
            tick = sc.symbols[sc.tick]
            raw = gdb2.cmd(f"x/8xb {tick}")
            got = bytes(int(b, 16) for b in re.findall(r"0x([0-9a-f]{2})\b", raw.split(":", 1)[1]))
            assert got == elf_bytes_at(sc.elf, tick, 8), f"tick bytes {got.hex()} differ from the ELF"
            assert gdb2.value(expr) > at_detach, "guest did not run after detach"
            gdb2.cmd("detach")
        finally:
            gdb2.close()

    def test_kill_ends_vmm_with_status_0(self, sc):
        out = sc.gdb.cmd(f"target remote 127.0.0.1:{sc.port}")
        _check(sc, "Remote debugging using" in out, "re-attach failed")
        sc.gdb.cmd("kill")
        status = sc.vm.wait_exit(30)
        _check(sc, status == 0, f"vmscope exited with {status}")
